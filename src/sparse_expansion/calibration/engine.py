"""The sequential calibration engine: it knows models, not pruning algorithms.

1. Run the model on the calibration windows until the first decoder block, and record what that
   block receives: the hidden states and its keyword arguments (attention mask, position
   embeddings, ...), with the KV cache turned off. Replaying the block's own keyword arguments is what
   makes this work across architectures without per-family code.
2. For each block in turn: move it to the compute device, let the caller process it (typically: run
   the calibration batches through it with statistics hooks, then change its weights), then run the
   batches through the *modified* block to produce the next block's inputs, so that errors
   accumulate as they will in the compressed model (as in SparseGPT).

Only one block is on the compute device at a time; activations are kept on `store_device`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.discovery import ModelLayout

# Keyword arguments that carry the KV cache; calibration runs without one.
_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past")


@dataclass
class BlockBatch:
    hidden: torch.Tensor  # (batch, seq, hidden) input of the current block
    args: tuple  # extra positional arguments (rare)
    kwargs: dict  # keyword arguments recorded at block 0


class _StopForward(Exception):
    pass


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _hidden_output(output):
    # transformers >= 5 returns a tensor; older versions and some families return a tuple.
    return output[0] if isinstance(output, (tuple, list)) else output


class SequentialCalibration:
    def __init__(self, model: nn.Module, layout: ModelLayout, device: torch.device | str = "cpu",
                 store_device: torch.device | str = "cpu", batch_size: int = 8, progress: bool = True,
                 desc: str = "blocks"):
        self.model = model
        self.layout = layout
        self.device = torch.device(device)
        self.store_device = torch.device(store_device)
        self.batch_size = max(1, batch_size)
        self.progress = progress
        self.desc = desc

    def _move_non_block_parts(self, device: torch.device) -> None:
        """Move embeddings, norms, rotary tables, ... but not the (possibly large) blocks."""
        path = self.layout.blocks_path
        blocks = self.model.get_submodule(path)
        self.model.set_submodule(path, nn.ModuleList())
        try:
            self.model.to(device)
        finally:
            self.model.set_submodule(path, blocks)

    @torch.no_grad()
    def capture(self, windows: torch.Tensor) -> list[BlockBatch]:
        """Inputs of the first block for every calibration batch."""
        first = self.layout.blocks[0]
        batches: list[BlockBatch] = []

        def grab(_module, args, kwargs):
            if args:
                hidden, extra = args[0], args[1:]
            else:
                hidden, extra = kwargs.pop("hidden_states"), ()
            kept = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
            if "use_cache" in kept:
                kept["use_cache"] = False
            batches.append(BlockBatch(hidden.to(self.store_device), _to(extra, self.store_device),
                                      _to(kept, self.store_device)))
            raise _StopForward

        self._move_non_block_parts(self.device)
        first.to(self.device)
        handle = first.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for start in range(0, windows.shape[0], self.batch_size):
                try:
                    self.model(input_ids=windows[start:start + self.batch_size].to(self.device), use_cache=False)
                except _StopForward:
                    pass
        finally:
            handle.remove()
            first.to(self.store_device)
            self._move_non_block_parts(self.store_device)
        return batches

    @torch.no_grad()
    def forward_block(self, block: nn.Module, batches: list[BlockBatch], keep_outputs: bool) -> list[BlockBatch]:
        outputs = []
        for batch in batches:
            out = block(batch.hidden.to(self.device), *_to(batch.args, self.device), **_to(batch.kwargs, self.device))
            if keep_outputs:
                outputs.append(BlockBatch(_hidden_output(out).to(self.store_device), batch.args, batch.kwargs))
        return outputs

    def run(self, windows: torch.Tensor,
            process_block: Callable[[int, nn.Module, Callable[[], None]], None]) -> None:
        """Walk the blocks; `process_block(index, block, feed)` may call `feed()` to run the calibration
        batches through the block (outputs discarded), e.g. with statistics hooks attached."""
        batches = self.capture(windows)
        blocks = self.layout.blocks
        for index in tqdm(range(len(blocks)), desc=self.desc, disable=not self.progress, leave=False):
            block = blocks[index].to(self.device)
            process_block(index, block, lambda: self.forward_block(block, batches, keep_outputs=False))
            batches = self.forward_block(block, batches, keep_outputs=True)
            blocks[index].to(self.store_device)
