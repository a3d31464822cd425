"""Perplexity with one decoder block in memory: the test windows are embedded once, walked block by block through
the calibration engine (each block read from disk at its turn and freed after it, `onload`/`offload`), and the
last block's outputs go through the model's own final norm and output layer.

The final step runs the model's forward once more per batch with every block's `forward` replaced: block 0 returns
the batch's final hidden states, the others pass them on, so whatever a family does after its blocks (a final
norm, logit soft-capping, OPT's projection) is the model's own code. The blocks' output form (a tensor, or a tuple
in older transformers and some families) is recorded from the last block's real call. The score is
`perplexity.perplexity`'s: the mean over windows of each window's mean cross-entropy of tokens 2..L, per-window
losses gathered in window order under torch.distributed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..calibration import BlockHooks, SequentialCalibration, batch_starts, move_non_block_parts
from ..models import ModelLayout
from .perplexity import TOKENS_PER_BATCH, PerplexityResult


def _replace_forwards(blocks: nn.ModuleList, hidden: torch.Tensor, as_tuple: bool, extra: int) -> None:
    def wrap(value: torch.Tensor):
        return (value, *([None] * extra)) if as_tuple else value

    def first(*args, **kwargs):
        return wrap(hidden)

    def passing(*args, **kwargs):
        return wrap(args[0] if args else kwargs["hidden_states"])

    for index, block in enumerate(blocks):
        block.forward = first if index == 0 else passing


@torch.no_grad()
def streamed_perplexity(model: nn.Module, layout: ModelLayout, windows: torch.Tensor,
                        onload: Callable[[int, nn.Module], None], offload: Callable[[int, nn.Module], None],
                        device: torch.device | str = "cpu", batch_size: int | None = None, progress: bool = True,
                        desc: str = "perplexity (streamed)", bos: int | None = None,
                        offload_dir: str | Path | None = None) -> PerplexityResult:
    """`onload(index, block)` fills a block before its turn, `offload(index, block)` frees it after; the test
    activations live in `offload_dir` files when given (else on the CPU)."""
    count, seqlen = windows.shape
    if bos is not None and not bool((windows[:, 0] == bos).all()):
        raise ValueError(f"windows were said to start with BOS {bos} but do not")
    batch_size = batch_size or max(1, TOKENS_PER_BATCH // seqlen)
    device = torch.device(device)
    blocks = layout.blocks
    last = len(blocks) - 1
    form: dict = {}
    losses = [torch.zeros(0, dtype=torch.float64)]
    starts = batch_starts(count, batch_size)  # the engine's batches of this rank, in order

    def record(_module, _args, output) -> None:
        if "tuple" not in form:
            form["tuple"] = isinstance(output, (tuple, list))
            form["extra"] = len(output) - 1 if form["tuple"] else 0

    def on(index: int, block: nn.Module) -> None:
        onload(index, block)
        if index == last:
            form["handle"] = block.register_forward_hook(record)

    def score(index: int, block: nn.Module, hidden, statistics) -> None:
        if index != last:
            return
        form.pop("handle").remove()
        offload(index, block)  # the head pass needs no block weights
        move_non_block_parts(model, layout, device)
        try:
            for start, final in zip(starts, hidden, strict=True):
                batch = windows[start:start + batch_size].to(device)
                _replace_forwards(blocks, final.to(device), form["tuple"], form["extra"])
                logits = model(input_ids=batch, use_cache=False).logits.float()
                per_token = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                            reduction="none").view(batch.shape[0], -1)
                losses.append(per_token.mean(dim=1).cpu().double())
        finally:
            for block_ in blocks:
                block_.__dict__.pop("forward", None)
            move_non_block_parts(model, layout, "cpu")

    hooks = BlockHooks(onload=on, offload=offload, after_block=score)
    engine = SequentialCalibration(model, layout, device=device, store_device="cpu", batch_size=batch_size,
                                   progress=progress and distributed.is_main(), desc=desc, hooks=hooks,
                                   offload_dir=offload_dir)
    engine.run(windows)
    mean_nll = torch.cat(distributed.gather_tensors([torch.cat(losses)])).mean().item()
    return PerplexityResult(ppl=math.exp(mean_nll), mean_nll=mean_nll, windows=count, seqlen=seqlen, bos=bos)
