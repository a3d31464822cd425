"""Train a small Llama-style decoder (gated FFN, ReLU/SiLU/GELU) from scratch on token windows, saving
checkpoints at intervals; an interrupted run resumes from its last checkpoint.

A run directory (io/state_dir.py) holds `run.json` (the configuration, as the fingerprint) and `ckpt-NNNNNN/`
folders, each with `model.safetensors` (the weights), `optimizer.safetensors` (the optimizer's `state_dict()`: its
tensors, and the rest as JSON in the file's metadata) and `state.json` (step, tokens seen, loss, seconds).
Checkpoints are written to a temporary folder and renamed, so a kill leaves the previous one intact.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import UsageError
from ..io import atomic_output_dir, atomic_write_text
from ..io.state_dir import StateDir
from ..settings import AtLeast, Positive, SettingError, check_fields, setting

ACTIVATIONS = {"relu": "relu", "silu": "silu", "gelu": "gelu_pytorch_tanh"}
RUN_FILE = "run.json"
OPTIMIZER_FILE = "optimizer.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    """One small decoder trained from scratch (checked on construction)."""

    activation: str = setting("relu", "activation of the FFN", choices=tuple(ACTIVATIONS), cli=False)
    hidden: int = setting(128, "hidden size", AtLeast(1))
    layers: int = setting(4, "decoder layers", AtLeast(1))
    heads: int = setting(4, "attention heads", AtLeast(1))
    ffn_ratio: float = setting(2.5, "FFN width over hidden size (d_f / d_h, as the paper's models)", Positive())
    vocab: int = setting(8192, "most frequent corpus tokens kept (the rest map to one id)", AtLeast(1))
    seqlen: int = setting(128, "tokens per training window", AtLeast(2))
    batch: int = setting(16, "windows per step", AtLeast(1))
    steps: int = setting(600, "training steps of each main run", AtLeast(1))
    checkpoint_every: int = setting(60, "steps between checkpoints (each measured)", AtLeast(1))
    lr: float = setting(3e-3, "peak learning rate (AdamW)", Positive())
    warmup: int = setting(50, "linear warm-up steps", AtLeast(0))
    weight_decay: float = setting(0.1, "AdamW weight decay", AtLeast(0))
    seed: int = setting(0, "seed of the initialisation and the batches")

    def __post_init__(self):
        check_fields(self)
        if self.hidden % self.heads:
            raise SettingError("hidden", f"{{hidden}} {self.hidden} is not divisible by {self.heads} heads")

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


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """`optimizer.state_dict()` without pickle: its tensors as `state.<param index>.<name>` in a safetensors file,
    the rest (the other per-parameter values, the parameter groups) as JSON in the file's metadata."""
    saved = optimizer.state_dict()
    tensors, values = {}, {}
    for index, slot in saved["state"].items():
        for name, value in slot.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                values.setdefault(str(index), {})[name] = value
    rest = {"state": values, "param_groups": saved["param_groups"]}
    save_file(tensors, path, metadata={"optimizer": json.dumps(rest)})


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """The inverse of `save_optimizer`: `optimizer.load_state_dict` of what it wrote."""
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        if "optimizer" not in metadata:
            raise UsageError(f"{path} holds no optimizer state; delete its checkpoint to resume from the one before")
        rest = json.loads(metadata["optimizer"])
        state = {int(index): dict(slot) for index, slot in rest["state"].items()}
        for key in handle.keys():
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = handle.get_tensor(key)
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def _save_checkpoint(run: Path, model, optimizer, state: dict) -> Path:
    final = run / f"ckpt-{state['step']:06d}"
    with atomic_output_dir(final, overwrite=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
                   if k != "lm_head.weight"}, tmp / "model.safetensors")
        save_optimizer(optimizer, tmp / OPTIMIZER_FILE)
        atomic_write_text(tmp / "state.json", json.dumps(state, indent=1))
    return final


def load_weights(model, checkpoint: Path) -> None:
    state = load_file(checkpoint / "model.safetensors")
    model.load_state_dict(state, strict=False)
    model.tie_weights()


def _resume(model, optimizer, checkpoint: Path) -> dict:
    """Weights and optimizer state (on the model's device) from `checkpoint`; returns its state."""
    load_weights(model, checkpoint)
    load_optimizer(optimizer, checkpoint / OPTIMIZER_FILE)
    return json.loads((checkpoint / "state.json").read_text())


def open_run(run: Path, config: TrainConfig) -> StateDir:
    """Create the run directory, or reopen one that holds this very configuration."""
    return StateDir(run, asdict(config), resume=None, file=RUN_FILE, what="training run")


def train(run: Path, config: TrainConfig, tokens: torch.Tensor, progress: bool = True,
          device: torch.device | str = "cpu") -> list[Path]:
    """Train (or resume) the run on `tokens` (1-D, compact vocabulary) on `device`; returns its checkpoints."""
    open_run(run, config)
    torch.manual_seed(config.seed)
    model = config.model()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": other, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    model.to(device)
    existing = checkpoints(run)
    state = _resume(model, optimizer, existing[-1]) if existing else {"step": 0, "tokens": 0}
    if state["step"] >= config.steps:
        return existing
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
