"""Train a small Llama-style decoder (gated FFN, ReLU/SiLU/GELU) from scratch on token windows, saving
checkpoints at intervals; an interrupted run resumes from its last checkpoint.

A run directory holds `run.json` (the configuration) and `ckpt-NNNNNN/` folders, each with `model.safetensors`
(the weights), `optimizer.safetensors` (AdamW's moments) and `state.json` (step, tokens seen, loss, the data
generator's position). Checkpoints are written to a temporary folder and renamed, so a kill leaves the previous
one intact.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import UsageError

ACTIVATIONS = {"relu": "relu", "silu": "silu", "gelu": "gelu_pytorch_tanh"}
RUN_FILE = "run.json"


@dataclass(frozen=True)
class TrainConfig:
    activation: str = "relu"
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    ffn_ratio: float = 2.5  # d_f / d_h, as the paper's models
    vocab: int = 8192  # the most frequent tokens of the corpus (the rest map to one id)
    seqlen: int = 128
    batch: int = 16
    steps: int = 1500
    checkpoint_every: int = 150
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    seed: int = 0

    def validate(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise UsageError(f"unknown activation {self.activation!r}; choose from {', '.join(ACTIVATIONS)}")
        for name in ("hidden", "layers", "heads", "vocab", "seqlen", "batch", "steps", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.hidden % self.heads:
            raise UsageError(f"--hidden {self.hidden} is not divisible by {self.heads} heads")
        if self.seqlen < 2:
            raise UsageError("--seqlen must be at least 2 (a token and the next one to predict)")
        if not self.lr > 0:
            raise UsageError(f"--lr must be positive, got {self.lr:g}")

    @property
    def intermediate(self) -> int:
        return max(1, round(self.hidden * self.ffn_ratio))

    def model(self):
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                             num_hidden_layers=self.layers, num_attention_heads=self.heads,
                             num_key_value_heads=self.heads, max_position_embeddings=self.seqlen,
                             hidden_act=ACTIVATIONS[self.activation], tie_word_embeddings=True)
        torch.manual_seed(self.seed)
        return LlamaForCausalLM(config)

    def non_embedding_parameters(self) -> int:
        d, f = self.hidden, self.intermediate
        return self.layers * (4 * d * d + 3 * d * f + 2 * d) + d


def compact_vocabulary(ids: torch.Tensor, size: int) -> torch.Tensor:
    """A map from the tokenizer's ids to 0..size-1: the size-1 most frequent ids of `ids` keep a slot each (by
    frequency, ties by id), every other id shares the last one."""
    counts = torch.bincount(ids)
    order = torch.sort(-counts, stable=True).indices[: size - 1]
    mapping = torch.full((counts.numel(),), size - 1, dtype=torch.int64)
    mapping[order] = torch.arange(order.numel())
    return mapping


def _lr(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def checkpoints(run: Path) -> list[Path]:
    return sorted(p for p in run.glob("ckpt-*") if (p / "state.json").is_file())


def _save_checkpoint(run: Path, model, optimizer, state: dict) -> Path:
    final = run / f"ckpt-{state['step']:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=run))
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              tmp / "model.safetensors")
    moments = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            slot = optimizer.state.get(p)
            if slot:
                moments[f"{names[id(p)]}.exp_avg"] = slot["exp_avg"].cpu().contiguous()
                moments[f"{names[id(p)]}.exp_avg_sq"] = slot["exp_avg_sq"].cpu().contiguous()
                state.setdefault("adam_step", float(slot["step"]))
    save_file(moments, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_weights(model, checkpoint: Path) -> None:
    state = load_file(checkpoint / "model.safetensors")
    model.load_state_dict(state, strict=False)
    model.tie_weights()


def _resume(model, optimizer, checkpoint: Path) -> dict:
    load_weights(model, checkpoint)
    moments = load_file(checkpoint / "optimizer.safetensors")
    state = json.loads((checkpoint / "state.json").read_text())
    for name, p in model.named_parameters():
        if f"{name}.exp_avg" in moments:
            optimizer.state[p] = {"step": torch.tensor(state["adam_step"]), "exp_avg": moments[f"{name}.exp_avg"],
                                  "exp_avg_sq": moments[f"{name}.exp_avg_sq"]}
    return state


def open_run(run: Path, config: TrainConfig) -> None:
    """Create the run directory, or accept an existing one that holds this very configuration."""
    file = run / RUN_FILE
    if file.is_file():
        if json.loads(file.read_text()) != asdict(config):
            raise UsageError(f"{run} holds a run with another configuration; choose another --out")
        return
    if run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise UsageError(f"{run} exists and is not a training run (no {RUN_FILE}); choose another --out")
    run.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(asdict(config), indent=1))


def train(run: Path, config: TrainConfig, tokens: torch.Tensor, progress: bool = True,
          device: torch.device | str = "cpu") -> list[Path]:
    """Train (or resume) the run on `tokens` (1-D, compact vocabulary) on `device`; returns its checkpoints."""
    config.validate()
    open_run(run, config)
    torch.manual_seed(config.seed)
    model = config.model()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": other, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    state = {"step": 0, "tokens": 0}
    existing = checkpoints(run)
    if existing:
        state = _resume(model, optimizer, existing[-1])
    if state["step"] >= config.steps:
        return checkpoints(run)
    model.to(device)
    for slot in optimizer.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            slot[key] = slot[key].to(device)
    generator = torch.Generator().manual_seed(config.seed)
    span = tokens.numel() - config.seqlen - 1
    for _ in range(state["step"]):  # the same batches as an uninterrupted run
        torch.randint(span, (config.batch,), generator=generator)
    model.train()
    bar = tqdm(range(state["step"], config.steps), desc=f"train {run.name}", disable=not progress, leave=False)
    start = time.perf_counter()
    for step in bar:
        starts = torch.randint(span, (config.batch,), generator=generator)
        batch = torch.stack([tokens[s:s + config.seqlen + 1] for s in starts.tolist()]).to(device)
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, config)
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone()).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if done % config.checkpoint_every == 0 or done == config.steps:
            state = {"step": done, "tokens": done * config.batch * config.seqlen, "loss": loss.item(),
                     "seconds": state.get("seconds", 0.0) + time.perf_counter() - start}
            start = time.perf_counter()
            _save_checkpoint(run, model, optimizer, state)
    return checkpoints(run)
