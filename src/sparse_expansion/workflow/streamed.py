"""Build a pruned or expanded model block by block into its output directory, resumably.

Each finished block goes to the output's state directory (io/block_store.py) through the engine's
after-block callback and, unless the model is wanted whole afterwards, leaves memory (its tensors are
freed; with a streamed source the next block is read from disk only at its turn): the build holds one
block, its calibration activations and the parts outside the blocks. A run interrupted at any point is
continued by `--resume DIR`: the recorded blocks are put back (`restore`) and only propagate the
calibration batches, so every later block calibrates on exactly what an uninterrupted run would see; the
result is the same, bit for bit.

Under torch.distributed every rank computes, rank 0 writes, and every rank restores from the same directory.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from .. import distributed
from ..calibration import BlockHooks
from ..io.block_store import BlockStore
from ..io.compressed import resolve_weight_format
from ..models import discover
from ..models.costs import block_ffn_costs, sum_block_costs
from ..models.model_dir import describe_layers, rebuild_layers, save_config
from ..models.streaming import free_block
from .jobs import evaluate_streamed
from .session import Session

# job(model, hooks, report) -> report, filled by the blocks this run builds (the restored ones are added after)
Job = Callable[[nn.Module, BlockHooks, object], object]


def _record_of(report, prefix: str) -> dict:
    record = {"layers": {k: v for k, v in report.layers.items() if k.startswith(prefix)}}
    routers = getattr(report, "routers", None)
    if routers is not None:
        record["routers"] = {k: v for k, v in routers.items() if k.startswith(prefix)}
    return record


def _prepend_records(report, records: list[dict]) -> None:
    """The restored blocks' layers (and routers) ahead of the ones this run built, in model order."""
    layers = {}
    for record in records:
        layers.update(record["layers"])
    report.layers = {**layers, **report.layers}
    if getattr(report, "routers", None) is not None:
        routers = {}
        for record in records:
            routers.update(record.get("routers", {}))
        report.routers = {**routers, **report.routers}


def meta_copy(model: nn.Module, layout) -> nn.Module:
    """A copy of `model` whose decoder blocks hold no tensors (meta, filled at their turn by `copy_blocks_from`):
    a build into a store needs no second whole model."""
    memo = {}
    for block in layout.blocks:
        for tensor in (*block.parameters(), *block.buffers()):
            empty = torch.empty_like(tensor, device="meta")
            memo[id(tensor)] = nn.Parameter(empty, requires_grad=False) if isinstance(tensor, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def copy_blocks_from(blocks: nn.ModuleList) -> Callable[[int, nn.Module], None]:
    """An engine `onload` that gives a `meta_copy` block its own copy of the source block's tensors."""
    def onload(index: int, block: nn.Module) -> None:
        for name, module in blocks[index].named_modules():
            target = block.get_submodule(name)
            for key, tensor in module._parameters.items():
                if tensor is not None:
                    target._parameters[key] = nn.Parameter(tensor.detach().clone(), requires_grad=False)
            for key, tensor in module._buffers.items():
                if tensor is not None:
                    target._buffers[key] = tensor.clone()
    return onload


def store_loader(model: nn.Module, store: BlockStore, dtype: torch.dtype) -> Callable[[int, nn.Module], None]:
    """An engine `onload` (or `restore`) that puts block i back from the store: its layers rebuilt as recorded,
    every tensor assigned."""
    def load(index: int, block: nn.Module) -> None:
        rebuild_layers(model, store.layers(index), dtype)
        result = model.load_state_dict(store.load_block(index), strict=False, assign=True)
        assert not result.unexpected_keys, result.unexpected_keys
    return load


def build_streamed(session: Session, store: BlockStore, job: Job, report, weight_format: str,
                   keep_model: bool = False, model: nn.Module | None = None,
                   onload: Callable[[int, nn.Module], None] | None = None) -> object:
    """Run `job` with the engine hooks that save every block to `store` (and restore the ones it has);
    blocks leave memory after being saved unless `keep_model`. `model`: another model than the session's
    (a copy, as `compare` builds; a `meta_copy` with `onload=copy_blocks_from(...)`). Returns the job's report."""
    if model is None or model is session.model:
        model, layout, streamed = session.model, session.layout, session.loaded.streamed
    else:
        layout, streamed = discover(model), None
    if onload is None and streamed is not None:
        onload = streamed.onload
    dtype = next((p.dtype for p in model.parameters() if not p.is_meta), torch.float32)
    encoding = store.state.get("encoding")
    start = store.done
    restore = store_loader(model, store, dtype)

    def after_block(index: int, block: nn.Module, hidden, statistics) -> None:
        nonlocal encoding
        prefix = f"{layout.blocks_path}.{index}."
        if distributed.is_main():
            state = {name: t.detach().cpu() for name, t in block.state_dict(prefix=prefix).items()}
            if encoding is None:
                encoding = resolve_weight_format(state, weight_format)
                store.state["encoding"] = encoding
            layers = {k: v for k, v in describe_layers(model).items() if k.startswith(prefix)}
            record = {**_record_of(report, prefix), "costs": block_ffn_costs(block, layout)}
            store.save_block(index, state, layers, record, encoding)
            del state
        distributed.barrier()

    def offload(index: int, block: nn.Module) -> None:
        if keep_model:
            block.to("cpu")
        else:
            free_block(index, block)  # saved: its tensors are no longer needed here

    hooks = BlockHooks(start=start, restore=restore, after_block=after_block, offload=offload, onload=onload)
    result = job(model, hooks, report)
    _prepend_records(result, [store.record(i) for i in range(start)])
    if encoding is None:
        encoding = resolve_weight_format({}, "compressed" if weight_format == "auto" else weight_format)
    store.state["encoding"] = encoding
    # Rank 0 recorded the blocks it wrote; every rank reads them back (a streamed evaluation from the store).
    store.state = distributed.gather_objects(store.state)[0]
    return result


def _rest(session: Session) -> dict[str, torch.Tensor]:
    blocks_prefix = session.layout.blocks_path + "."
    return {name: t.detach().cpu() for name, t in session.model.state_dict().items()
            if not name.startswith(blocks_prefix)}


def streamed_costs(session: Session, store: BlockStore) -> dict:
    """`ffn_costs` of the built model, from what each block recorded (the blocks are no longer in memory)."""
    return sum_block_costs([store.record(i)["costs"] for i in range(store.done)], store.dense_bytes(_rest(session)))


def finish_streamed(session: Session, store: BlockStore | None, out: str, manifest: dict) -> None:
    """Write the parts outside the blocks, config, tokenizer and manifest; the state directory becomes `out`."""
    if distributed.is_main():
        store.finish(out, _rest(session), lambda directory: save_config(session.model, directory), session.tokenizer,
                     manifest, store.state["encoding"])
    distributed.barrier()


def source_onload(session: Session) -> Callable[[int, nn.Module], None]:
    """The engine `onload` that gives a `meta_copy` of the session's model block i of that model: copied from memory,
    or read from disk at its turn when the session's blocks wait there (a streamed session)."""
    streamed = session.loaded.streamed
    if streamed is None:
        return copy_blocks_from(session.layout.blocks)
    return streamed.block_onload


@contextlib.contextmanager
def scratch_store(session: Session, description: dict) -> Iterator[BlockStore]:
    """A block store in a temporary directory (under `offload_dir` when set), the same on every rank (rank 0
    creates it), removed afterwards whatever happens."""
    path = None
    if distributed.is_main():
        path = tempfile.mkdtemp(prefix="job-", dir=session.settings.offload_dir)
    path = Path(distributed.gather_objects(path)[0])
    try:
        yield BlockStore(path / "job", description, resume=None)
    finally:
        distributed.barrier()
        if distributed.is_main():
            shutil.rmtree(path, ignore_errors=True)


def build_and_evaluate_streamed(session: Session, job: Job, report, description: dict, desc: str) -> tuple:
    """`job` on a copy of the session's model built block by block into a scratch store (each source block put in
    at its turn, freed once saved), then that model evaluated from the store one block at a time: (report, the
    evaluation's figures). Memory: one block, whether the session's model is held or streamed."""
    with scratch_store(session, description) as store:
        model = meta_copy(session.model, session.layout)
        report = build_streamed(session, store, job, report, "dense", model=model, onload=source_onload(session))
        result = evaluate_from_store(session, model, store, desc)
    return report, result


def evaluate_from_store(session: Session, model: nn.Module, store: BlockStore, desc: str) -> dict:
    """`evaluate_streamed` of a model built into `store`: each block put back from there at its turn, then freed."""
    dtype = next(p.dtype for p in model.parameters())
    return evaluate_streamed(session, desc, model, store_loader(model, store, dtype), free_block)
