"""Prefill and decode speed of a model against a dense baseline, in the same process.

Both models see the same random prompt. Prefill: one forward pass over the prompt without a cache.
Decode: greedy steps of one token each with the KV cache, after a prefill that fills the cache.
Each measurement alternates baseline and candidate and keeps the median of `repeats`, so slow drift
of the machine affects both alike.

Both models are loaded for inference in `dtype` (fp32, bf16 or fp16): pruned layers and experts held in their
sparse form only, straight from the file (bitmask + values, or a `--bits` grid's codes). With `kernels="auto"`
they use the CPU sparse kernels where those measured faster (the dense baseline has no pruned layer, so it stays
dense). The physical limit of decoding: every token must read the weights it uses once (the sparse form where a
layer runs sparse at one token, one expert per router), so `decode_limit_tokens_per_s` = measured read bandwidth
/ `decode_bytes_per_token`, and `bandwidth_fraction` is the measured decode rate over that limit.
"""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import torch

from ..inference import accelerate
from ..models import discover, ffn_costs, load_model, weight_bytes_per_token
from .kernel import read_bandwidth_gbs


def _directory_bytes(path: Path | None) -> int | None:
    if path is None:
        return None
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


@torch.no_grad()
def _prefill_seconds(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    return time.perf_counter() - start


@torch.no_grad()
def _decode_seconds(model, ids: torch.Tensor, steps: int) -> float:
    out = model(input_ids=ids, use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - start


def model_benchmark(model: str, baseline: str | None = None, prompt_tokens: int = 128, new_tokens: int = 32,
                    repeats: int = 3, seed: int = 0, kernels: str = "auto", dtype: str = "float32") -> dict:
    """`prompt_tokens`, `new_tokens` and `repeats` as BenchSettings checks them (at least 1)."""
    candidate = load_model(model, dtype=dtype, quiet=True, compact=True)
    reference = load_model(baseline, dtype=dtype, quiet=True, compact=True)
    kernel_reports = {name: accelerate(loaded.model, kernels)
                      for name, loaded in (("baseline", reference), ("model", candidate))}
    vocab = min(candidate.model.config.vocab_size, reference.model.config.vocab_size)
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    times = {"baseline": {"prefill": [], "decode": []}, "model": {"prefill": [], "decode": []}}
    for _ in range(repeats):
        for name, loaded in (("baseline", reference), ("model", candidate)):
            times[name]["prefill"].append(_prefill_seconds(loaded.model, ids))
            times[name]["decode"].append(_decode_seconds(loaded.model, ids, new_tokens))
    result = {"model": str(model), "baseline": reference.source, "prompt_tokens": prompt_tokens,
              "new_tokens": new_tokens, "repeats": repeats, "threads": torch.get_num_threads(), "kernels": kernels,
              "dtype": dtype,
              "bandwidth_gbs": read_bandwidth_gbs()}
    for name, loaded in (("baseline", reference), ("model", candidate)):
        prefill = statistics.median(times[name]["prefill"])
        decode = statistics.median(times[name]["decode"])
        costs = ffn_costs(loaded.model, discover(loaded.model))
        result[name] = {"prefill_tokens_per_s": prompt_tokens / prefill, "decode_tokens_per_s": new_tokens / decode,
                        "disk_bytes": _directory_bytes(loaded.path), "parameter_bytes": costs["stored_bytes"],
                        "ffn_flops_per_token": costs["ffn_flops_per_token"],
                        "decode_bytes_per_token": weight_bytes_per_token(loaded.model),
                        "sparse_layers": kernel_reports[name]["layers"],
                        "sparse_experts": kernel_reports[name]["experts"],
                        "kernel_switch": kernel_reports[name]["switch"]}
        result[name]["decode_limit_tokens_per_s"] = (result["bandwidth_gbs"] * 1e9
                                                     / result[name]["decode_bytes_per_token"])
        result[name]["bandwidth_fraction"] = (result[name]["decode_tokens_per_s"]
                                              / result[name]["decode_limit_tokens_per_s"])
    result["prefill_speedup"] = result["model"]["prefill_tokens_per_s"] / result["baseline"]["prefill_tokens_per_s"]
    result["decode_speedup"] = result["model"]["decode_tokens_per_s"] / result["baseline"]["decode_tokens_per_s"]
    # Both models live in this process: the peak covers the pair.
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result
