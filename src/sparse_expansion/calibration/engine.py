"""The sequential calibration engine: it knows models, not algorithms.

1. Capture. The model runs once on each calibration batch with every decoder block replaced by a recorder
   that keeps what the model passes to that block and returns its input unchanged: block 0's hidden
   states, and for *every* block its own keyword arguments (attention mask, position embeddings, and
   whatever is specific to its layer type: Gemma-2/3 alternate sliding-window and global attention with
   different masks and rotary tables), with the KV cache off. No block computes anything during capture and
   the last recorder stops the forward pass. Replaying each block's own arguments is what makes this work
   across architectures without per-family code.
2. For each block in turn, on the compute device, the stages of a `Step`:
   observe  - statistics (calibration/observers.py) watch named modules' inputs or outputs while the
              calibration batches run through the block;
   reduce   - combine statistics (identity in one process; across the ranks of a torch.distributed run, each
              of which captured its own contiguous share of the calibration batches: distributed.py);
   modify   - change the block (prune, expand, ...);
   propagate- run the batches through the *modified* block to produce the next block's inputs, so that
              errors accumulate as they will in the compressed model (as in SparseGPT);
   after    - a callback with the block's outputs (checkpoints, observe-only analyses).
   An observe-only step (`modifies = False`) needs one pass per block: it observes while propagating.
   `BlockHooks(stop_after=N)` ends the walk after block N.

Only one block is on the compute device at a time. Activations are kept on `store_device`; by default
("auto") that is the compute device when the calibration activations fit comfortably in its free memory
(no host/device copies per block on a GPU), else the CPU.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..models.discovery import ModelLayout, discover

# Keyword arguments that carry the KV cache; calibration runs without one.
_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past")


class OnDisk:
    """A calibration batch's hidden states written to a file (`--offload-dir`), read back when needed."""

    def __init__(self, tensor: torch.Tensor, path: Path):
        from safetensors.torch import save_file

        save_file({"hidden": tensor.detach().contiguous().cpu()}, str(path))
        self.path = path

    def load(self) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(self.path))["hidden"]

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


@dataclass
class BlockBatch:
    """One calibration batch at the current block."""

    stored: torch.Tensor | OnDisk  # (batch, seq, hidden) input of the current block, in memory or on disk
    calls: list[tuple[tuple, dict]]  # per block: the extra positional and keyword arguments the model passes

    @property
    def hidden(self) -> torch.Tensor:
        return self.stored.load() if isinstance(self.stored, OnDisk) else self.stored

    def discard(self) -> None:
        if isinstance(self.stored, OnDisk):
            self.stored.discard()


@dataclass
class Watch:
    """Feed `statistic.update` with the input (or output) of the module at `module` inside the block."""

    module: str  # path inside the block; "" is the block itself
    statistic: object  # has update(tensor) and merge(other)
    on: str = "input"  # "input" or "output"


class HiddenStates:
    """The blocks' outputs handed to `after_block`, batch by batch (read from disk only when asked for)."""

    def __init__(self, batches: list[BlockBatch]):
        self._batches = batches

    def __len__(self) -> int:
        return len(self._batches)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._batches[i].hidden

    def __iter__(self):
        return (b.hidden for b in self._batches)


class Step:
    """What a job plugs into the engine; override the stages it needs."""

    modifies = True  # False: observe-only (one pass per block, no change to the model)

    def observe(self, index: int, block: nn.Module) -> dict[str, Watch]:
        return {}

    def modify(self, index: int, block: nn.Module, statistics: dict[str, object]) -> None:
        pass


def identity_reduce(statistics: dict[str, object]) -> dict[str, object]:
    return statistics


def reduce_across_ranks(statistics: dict[str, object]) -> dict[str, object]:
    """The default reduce: every statistic combined over the ranks of a torch.distributed run (the identity
    in one process), in a fixed order so that every rank issues the same collectives."""
    for name in sorted(statistics):
        reducer = getattr(statistics[name], "all_reduce", None)
        if reducer is not None:
            reducer()
    return statistics


@dataclass
class BlockHooks:
    """What a caller plugs into a walk around the blocks (every field optional).

    start/restore: blocks before `start` were done by an interrupted run; `restore(index, block)` puts their saved
    state back and they only propagate, so later blocks see what an uninterrupted run would.
    onload/offload: run before and after a block's turn (e.g. read its weights from disk, free it once saved),
    instead of moving the block back to where it was.
    after_block(index, block, hidden, statistics): the block's outputs (checkpoints, observe-only analyses).
    stop_after: end the walk after this block.
    """

    start: int = 0
    restore: Callable[[int, nn.Module], None] | None = None
    onload: Callable[[int, nn.Module], None] | None = None
    offload: Callable[[int, nn.Module], None] | None = None
    after_block: Callable[[int, nn.Module, HiddenStates, dict], None] | None = None
    stop_after: int | None = None

    def __post_init__(self):
        if self.start and self.restore is None:
            raise ValueError("resuming at a later block needs restore")


class _StopForward(Exception):
    pass


def _to(value, device, memo: dict):
    """Move tensors (inside tuples, lists and dicts) to `device`, keeping shared tensors shared."""
    if isinstance(value, torch.Tensor):
        key = id(value)
        if key not in memo:
            memo[key] = value.to(device)
        return memo[key]
    if isinstance(value, tuple):
        return tuple(_to(v, device, memo) for v in value)
    if isinstance(value, list):
        return [_to(v, device, memo) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device, memo) for k, v in value.items()}
    return value


def _hidden_output(output):
    # transformers >= 5 returns a tensor; older versions and some families return a tuple.
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def watching(block: nn.Module, watches: dict[str, Watch]) -> Iterator[None]:
    """While active, every forward of a watched module feeds its input (or output) to the statistic."""
    handles = []
    for watch in watches.values():
        module = block.get_submodule(watch.module)

        # Under torch.distributed, statistics that can keep their batches for the reduce do (observers.py).
        feed = getattr(watch.statistic, "defer", None) if distributed.active() else None
        feed = feed or watch.statistic.update

        def hook(_module, args, output, watch=watch, feed=feed):
            tensor = args[0] if watch.on == "input" else _hidden_output(output)
            feed(tensor.detach())

        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def batch_starts(count: int, batch_size: int) -> list[int]:
    """The first window of each of this rank's batches (every batch in one process), in window order: the batches
    the engine captures and propagates."""
    starts = list(range(0, count, max(1, batch_size)))
    return [starts[i] for i in distributed.shard(len(starts))]


def move_non_block_parts(model: nn.Module, layout: ModelLayout, device: torch.device | str) -> None:
    """Move embeddings, norms, rotary tables, ... but not the (possibly large, possibly empty) blocks."""
    path = layout.blocks_path
    blocks = model.get_submodule(path)
    model.set_submodule(path, nn.ModuleList())
    try:
        model.to(device)
    finally:
        model.set_submodule(path, blocks)


class SequentialCalibration:
    def __init__(self, model: nn.Module, layout: ModelLayout, device: torch.device | str = "cpu",
                 store_device: torch.device | str = "auto", batch_size: int = 8, progress: bool = True,
                 desc: str = "blocks", hooks: BlockHooks | None = None, offload_dir: str | Path | None = None):
        """`hooks`: per-block callbacks (BlockHooks); `offload_dir`: keep the calibration activations in files
        there (a private subdirectory, removed at the end of each run), not in memory."""
        self.model = model
        self.layout = layout
        self.device = torch.device(device)
        self.store_device = None if str(store_device) == "auto" else torch.device(store_device)
        self.home = next(model.parameters()).device  # where blocks go back to after their turn
        self.batch_size = max(1, batch_size)
        self.progress = progress
        self.desc = desc
        self.hooks = hooks or BlockHooks()
        self.offload_root = None if offload_dir is None else Path(offload_dir)
        self.offload_dir: Path | None = None  # this run's private directory under offload_root

    def _move_non_block_parts(self, device: torch.device) -> None:
        move_non_block_parts(self.model, self.layout, device)

    def _choose_store_device(self, windows: torch.Tensor) -> torch.device:
        """The compute device when two copies of the activations (a block's inputs and outputs) take at
        most half of its free memory; else the CPU."""
        if self.device.type != "cuda":
            return self.device
        dtype = next(self.layout.blocks.parameters()).dtype
        needed = 2 * windows.numel() * self.layout.hidden_size * torch.empty(0, dtype=dtype).element_size()
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.device if needed <= free // 2 else torch.device("cpu")

    @torch.no_grad()
    def capture(self, windows: torch.Tensor) -> list[BlockBatch]:
        """Block 0's inputs and every block's own arguments, for every calibration batch."""
        if self.store_device is None:
            self.store_device = self._choose_store_device(windows)
        blocks = self.layout.blocks
        last = len(blocks) - 1
        memo: dict = {}
        current: dict = {}

        def recorder(index: int):
            def forward(*args, **kwargs):
                if args:
                    hidden, extra = args[0], args[1:]
                else:
                    hidden, extra = kwargs.pop("hidden_states"), ()
                kept = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
                if "use_cache" in kept:
                    kept["use_cache"] = False
                if index == 0:
                    current["hidden"] = self._keep(hidden, f"capture-{len(batches)}")
                current["calls"].append((_to(extra, self.store_device, memo), _to(kept, self.store_device, memo)))
                if index == last:
                    raise _StopForward
                return hidden
            return forward

        batches: list[BlockBatch] = []
        starts = batch_starts(windows.shape[0], self.batch_size)
        self._move_non_block_parts(self.device)
        for index, block in enumerate(blocks):
            block.forward = recorder(index)  # an instance attribute: nn.Module.__call__ runs it
        try:
            for start in starts:
                current.clear()
                current["calls"] = []
                memo.clear()
                try:
                    self.model(input_ids=windows[start:start + self.batch_size].to(self.device), use_cache=False)
                except _StopForward:
                    pass
                if len(current["calls"]) != len(blocks):
                    raise RuntimeError(f"the model called {len(current['calls'])} of its {len(blocks)} blocks")
                batches.append(BlockBatch(current["hidden"], current["calls"]))
        finally:
            for block in blocks:
                del block.forward
            self._move_non_block_parts(self.home)
        return batches

    @torch.no_grad()
    def forward_block(self, index: int, block: nn.Module, batches: list[BlockBatch],
                      keep_outputs: bool) -> list[BlockBatch]:
        outputs = []
        for batch in batches:
            memo: dict = {}
            args, kwargs = batch.calls[index]
            out = block(batch.hidden.to(self.device), *_to(args, self.device, memo), **_to(kwargs, self.device, memo))
            if keep_outputs:
                kept = self._keep(_hidden_output(out), f"block-{index}-{len(outputs)}")
                outputs.append(BlockBatch(kept, batch.calls))
        return outputs

    def _keep(self, hidden: torch.Tensor, name: str) -> torch.Tensor | OnDisk:
        """Hidden states where the engine keeps them: on disk with an offload directory, else `store_device`."""
        if self.offload_dir is not None:
            return OnDisk(hidden, self.offload_dir / f"{name}.safetensors")
        return hidden.to(self.store_device)

    def _propagate(self, index: int, block: nn.Module, batches: list[BlockBatch]) -> list[BlockBatch]:
        outputs = self.forward_block(index, block, batches, keep_outputs=True)
        for batch in batches:
            batch.discard()
        return outputs

    def run(self, windows: torch.Tensor, step: Step | None = None,
            reduce: Callable[[dict], dict] = reduce_across_ranks) -> None:
        """Walk the blocks through the stages of `step` (see the module docstring), with the engine's hooks."""
        if self.offload_root is None:
            self._walk(windows, step, reduce)
            return
        self.offload_root.mkdir(parents=True, exist_ok=True)
        self.offload_dir = Path(tempfile.mkdtemp(prefix="activations-", dir=self.offload_root))
        try:
            self._walk(windows, step, reduce)
        finally:
            shutil.rmtree(self.offload_dir, ignore_errors=True)
            self.offload_dir = None

    def _walk(self, windows, step, reduce) -> None:
        hooks = self.hooks
        batches = self.capture(windows)
        blocks = self.layout.blocks
        count = len(blocks) if hooks.stop_after is None else min(len(blocks), hooks.stop_after + 1)
        for index in tqdm(range(count), desc=self.desc, disable=not self.progress, leave=False):
            if index < hooks.start:  # `restore` gives the block every tensor: nothing to read from the source
                hooks.restore(index, blocks[index])
                block = blocks[index].to(self.device)
                batches = self._propagate(index, block, batches)
                self._release(index, blocks[index], hooks.offload)
                continue
            if hooks.onload is not None:
                hooks.onload(index, blocks[index])
            block = blocks[index].to(self.device)
            watches = step.observe(index, block) if step is not None else {}
            if step is not None and step.modifies:
                if watches:
                    with watching(block, watches):
                        self.forward_block(index, block, batches, keep_outputs=False)
                statistics = reduce({name: watch.statistic for name, watch in watches.items()})
                step.modify(index, block, statistics)
                batches = self._propagate(index, block, batches)
            else:
                with watching(block, watches):
                    batches = self._propagate(index, block, batches)
                statistics = reduce({name: watch.statistic for name, watch in watches.items()})
                if step is not None:
                    step.modify(index, block, statistics)
            if hooks.after_block is not None:
                hooks.after_block(index, block, HiddenStates(batches), statistics)
            self._release(index, blocks[index], hooks.offload)

    def _release(self, index: int, block: nn.Module, offload) -> None:
        if offload is not None:
            offload(index, block)
        else:
            block.to(self.home)


@torch.no_grad()
def block_outputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8, device: torch.device | str = "cpu",
                  stop_after: int | None = None, layout: ModelLayout | None = None) -> list[torch.Tensor]:
    """Each decoder block's output hidden states (n, seq, hidden), as the engine propagates `input_ids`
    through the unchanged model: observe-only, one block on `device` at a time, results on the CPU."""
    layout = layout or discover(model)
    outputs: list[torch.Tensor] = []
    hooks = BlockHooks(after_block=lambda index, block, hidden, stats: outputs.append(
        torch.cat([h.cpu() for h in hidden])), stop_after=stop_after)
    engine = SequentialCalibration(model, layout, device=device, batch_size=batch_size, progress=False, hooks=hooks)
    engine.run(input_ids)
    return outputs
