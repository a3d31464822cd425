"""A model whose decoder blocks stay on disk until their turn: peak memory grows with one block.

`open_streamed(path)` builds the model from its config with empty (meta) weights, reads everything but
the decoder blocks from the checkpoint's safetensors files, and returns `StreamedBlocks`, whose `onload`
reads one block's tensors when the calibration engine reaches it and whose `offload` drops them again
(back to meta) once the block is written out. Works for Hugging Face checkpoints in safetensors (one file
or shards with an index) whose tensor names are the model's own (what `save_pretrained` writes; the
embedded model's cache is one); `streamable(path)` says whether a directory is one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError
from ..io.compressed import compressed_names, load_compressed
from ..io.model_dir import read_manifest, state_dict_files, verify_weights
from ..layers import kind_of
from ..runtime import release_memory
from .discovery import ModelLayout, discover
from .model_dir import compact_layers, empty_model, meta_tensors, rebuild_layers


def _weight_files(path: Path) -> list[Path] | None:
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
            return None
        return [path / name for name in names]
    return None


def streamable(path: str | Path | None) -> bool:
    """A local Hugging Face directory in safetensors (not a pruned or expanded model of this tool's format)."""
    if path is None:
        return False
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file() or _weight_files(path) is None:
        return False
    manifest = read_manifest(path)
    return manifest is None or manifest["weights"]["form"] == "hf"


def free_block(index: int, block: nn.Module) -> None:
    """An engine `offload` for a block whose tensors are on disk: they are dropped (back to meta), with every copy
    its layers hold beside them (`LayerKind.release`: a compact expert layer's CSR copies, a router's memo), and
    the freed memory handed back to the system."""
    for module in block.modules():
        kind = kind_of(module)
        if kind is not None:
            kind.release(module)
    block.to("meta")
    release_memory()


class StreamedBlocks:
    """Reads a block's tensors from the checkpoint on `onload`, frees them on `offload`."""

    def __init__(self, model: nn.Module, layout: ModelLayout, locations: dict[str, Path], dtype: torch.dtype):
        self.model, self.layout, self.locations, self.dtype = model, layout, locations, dtype

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.locations[name], []).append(name)
        tensors = {}
        for file, keys in by_file.items():
            with safe_open(str(file), framework="pt") as handle:
                for key in keys:
                    tensors[key] = handle.get_tensor(key).to(self.dtype)
        return tensors

    def block_names(self, index: int) -> list[str]:
        prefix = f"{self.layout.blocks_path}.{index}."
        return [name for name in self.locations if name.startswith(prefix)]

    def onload(self, index: int, block: nn.Module) -> None:
        prefix = f"{self.layout.blocks_path}.{index}."
        state = {name[len(prefix):]: tensor for name, tensor in self._read(self.block_names(index)).items()}
        missing = [n for n, p in (*block.named_parameters(), *block.named_buffers())
                   if p.is_meta and n not in state]
        if missing:
            raise UsageError(f"the checkpoint has no tensor {prefix}{missing[0]}; it cannot be streamed")
        block.load_state_dict(state, strict=False, assign=True)

    block_onload = onload  # fills any block of this structure (a copy's too)
    custom_blocks = False  # a plain checkpoint: its blocks are the model's own layers

    @staticmethod
    def offload(index: int, block: nn.Module) -> None:
        block.to("meta")


def open_streamed(path: str | Path, dtype: torch.dtype, trust_remote_code: bool = False):
    """(model with empty blocks, StreamedBlocks) for a `streamable` directory."""
    from safetensors import safe_open

    path = Path(path)
    manifest = read_manifest(path)
    if manifest is not None:
        verify_weights(path, manifest)
    model = empty_model(path, dtype, trust_remote_code)
    layout = discover(model)
    locations: dict[str, Path] = {}
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                locations[key] = file
    streamed = StreamedBlocks(model, layout, locations, dtype)
    blocks_prefix = layout.blocks_path + "."
    _load_rest(model, streamed._read([n for n in locations if not n.startswith(blocks_prefix)]), blocks_prefix, path)
    return model, streamed


def _load_rest(model: nn.Module, rest: dict[str, torch.Tensor], blocks_prefix: str, path: Path) -> None:
    """Everything outside the blocks into `model` (which then must have no empty tensor there), ties, eval mode."""
    result = model.load_state_dict(rest, strict=False, assign=True)
    if result.unexpected_keys:
        raise UsageError(f"{path}: tensors the model does not have ({result.unexpected_keys[0]}); it cannot be "
                         "streamed")
    model.tie_weights()
    missing = meta_tensors(model, skip_prefix=blocks_prefix)
    if missing:
        raise UsageError(f"{path}: the checkpoint has no tensor {missing[0]}; it cannot be streamed")
    model.eval()


class StreamedStateDict:
    """A state-dict directory of this tool (pruned, expanded, selective, thresholded): `onload` rebuilds one
    block's custom layers from the manifest and reads only that block's tensors (from its own file after a
    streamed build, else by name from the one file); `compact` keeps a layer's compressed form only (CPU
    inference), as whole-model loading does; `offload` frees the block again."""

    def __init__(self, model: nn.Module, layout: ModelLayout, path: Path, files: list[str], layers: dict[str, dict],
                 dtype: torch.dtype, compact: bool):
        self.model, self.layout, self.path, self.layers, self.dtype, self.compact = (model, layout, path, layers,
                                                                                     dtype, compact)
        self.files = {name: compressed_names(path / name) for name in files}

    def _read(self, select) -> dict[str, torch.Tensor]:
        state = {}
        for name, names in self.files.items():
            if any(select(n) for n in names):
                state.update(load_compressed(self.path / name, select))
        return state

    def onload(self, index: int, block: nn.Module) -> None:
        """Block i's layers rebuilt and filled one module at a time: each module's tensors decoded, assigned and (with
        `compact`) compacted before the next is decoded, so an expanded block never holds all its dense expert
        stacks at once (one stack at most, beside the block's compact form)."""
        prefix = f"{self.layout.blocks_path}.{index}."
        rebuild_layers(self.model, {k: v for k, v in self.layers.items() if k.startswith(prefix)}, self.dtype)
        modules: dict[str, set[str]] = {}
        for names in self.files.values():
            for name in names:
                if name.startswith(prefix):
                    modules.setdefault(name.rsplit(".", 1)[0], set()).add(name)
        compact = self.compact
        for names in modules.values():
            state = self._read(names.__contains__)
            result = self.model.load_state_dict(state, strict=False, assign=True)
            if result.unexpected_keys:
                raise UsageError(f"{self.path}: tensors the model does not have ({result.unexpected_keys[0]})")
            if compact:
                self.model.get_submodule(next(iter(names)).rsplit(".", 1)[0]).to(self.dtype)
                compact_layers(self.model, list(state))  # as whole-model loading does
            del state
            release_memory()  # the decoded dense stack, handed back to the system before the next is decoded
        missing = meta_tensors(block)
        if missing:
            raise UsageError(f"{self.path} lacks tensors of the model: {prefix}{missing[0]}")
        block.to(self.dtype)

    @property
    def custom_blocks(self) -> bool:
        """Whether the blocks hold this tool's layers (experts, thresholds), rebuilt into `model` at their turn."""
        prefix = self.layout.blocks_path + "."
        return any(name.startswith(prefix) for name in self.layers)

    def block_onload(self, index: int, block: nn.Module) -> None:
        """Block i's tensors into `block`, another module of the blocks' structure (a copy of the model's block);
        only for blocks without custom layers, which are rebuilt into the model itself."""
        if self.custom_blocks:
            raise UsageError(f"{self.path} holds expanded or thresholded layers: its blocks are read into the model "
                             "itself only (load it whole, without streaming)")
        prefix = f"{self.layout.blocks_path}.{index}."
        state = {name[len(prefix):]: t for name, t in self._read(lambda name: name.startswith(prefix)).items()}
        block.load_state_dict(state, strict=True, assign=True)
        block.to(self.dtype)

    @staticmethod
    def offload(index: int, block: nn.Module) -> None:
        free_block(index, block)


def open_streamed_dir(path: str | Path, dtype: torch.dtype, trust_remote_code: bool = False, compact: bool = False):
    """(model with empty blocks, its block reader) for any model directory: a plain Hugging Face one in safetensors
    (`open_streamed`) or this tool's state-dict form (StreamedStateDict); checksums verified first."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None or manifest["weights"]["form"] == "hf":
        if not streamable(path):
            raise UsageError(f"{path}: only safetensors checkpoints can be evaluated block by block")
        return open_streamed(path, dtype, trust_remote_code)
    verify_weights(path, manifest)
    model = empty_model(path, dtype, trust_remote_code)
    layout = discover(model)
    blocks_prefix = layout.blocks_path + "."
    layers = manifest.get("custom_layers", {})
    rebuild_layers(model, {k: v for k, v in layers.items() if not k.startswith(blocks_prefix)}, dtype)
    streamed = StreamedStateDict(model, layout, path, state_dict_files(path, manifest), layers, dtype, compact)
    _load_rest(model, streamed._read(lambda name: not name.startswith(blocks_prefix)), blocks_prefix, path)
    return model, streamed
