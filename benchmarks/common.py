"""What every benchmark writes besides its rows: the command, the date, the machine and its rounding environment."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys

import torch


def write_results(path: str, rows: list[dict], **extra) -> None:
    """Write {"command", "date", "machine", "environment", **extra, "results": rows} to `path` atomically."""
    from sparse_expansion.workflow.report import machine_environment

    payload = {
        "command": "python " + " ".join(sys.argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "environment": machine_environment(),
        **extra,
        "results": rows,
    }
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2)
    os.replace(tmp, path)


def llama7b_shaped(tokenizer, blocks: int, dtype: torch.dtype, device: str = "cpu"):
    """A random Llama-7B-shaped model (hidden 4096, FFN 11008, 32 heads) with `blocks` decoder blocks, seed 0,
    initialized on `device` and returned on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                         num_hidden_layers=blocks, vocab_size=len(tokenizer), max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval().to("cpu")
