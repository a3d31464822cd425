"""A model into a model directory and back: the module side of the format in io/model_dir.py.

Saving describes the model's custom layers by their kinds (layers/protocol.py) and hands its state dict,
those descriptions and its config and checkpoint writers to io/model_dir.py. Loading verifies the
directory there, then builds a `state-dict` one from its config with empty weights, rebuilds its custom
layers by their kinds and assigns the state dict strictly (a reload reproduces the logits bit for bit); a
`hf` directory, or one without a manifest, loads through `from_pretrained`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ..errors import UsageError
from ..io.compressed import BitmaskTensor, load_compressed
from ..io.model_dir import MANIFEST_FILE, read_manifest, state_dict_files, verify_weights, write_model_dir
from ..kernels import native
from ..layers.packed import packed_stack
from ..layers.protocol import kind_named, kind_of
from ..layers.sparse_linear import MIN_SPARSITY
from ..runtime import first_line, release_memory

__all__ = ["describe_layers", "empty_model", "load_model_dir", "meta_tensors", "rebuild_layers", "save_config",
           "save_model_dir"]


# -- saving -------------------------------------------------------------------------------------------------
def describe_layers(model: nn.Module) -> dict[str, dict]:
    """Every module whose kind has a spec of its own (routers, expert layers, ...), by path, in model order."""
    names = {id(module): name for name, module in model.named_modules()}

    def name_of(module: nn.Module) -> str:
        return names[id(module)]

    layers = {}
    for name, module in model.named_modules():
        kind = kind_of(module)
        spec = kind.describe(module, name_of) if kind is not None else None
        if spec is not None:
            layers[name] = {"kind": kind.name, **spec}
    return layers


def save_config(model: nn.Module, directory: Path) -> None:
    """config.json, and generation_config.json when the model has one."""
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)


def save_model_dir(model: nn.Module, tokenizer, out: str | Path, manifest: dict | None = None,
                   weight_format: str = "auto", overwrite: bool = False) -> Path:
    """Write a model directory atomically. `weight_format`: `compressed` (sparse tensors as bitmask/CSR),
    `dense` (every tensor as it is; a plain Hugging Face checkpoint when the model has no custom layers) or
    `auto` (compressed whenever that is smaller)."""
    layers = describe_layers(model)  # first: a layer that cannot be saved says so before anything is written
    return write_model_dir(out, model.state_dict(), layers, tokenizer=tokenizer, manifest=manifest,
                           weight_format=weight_format, overwrite=overwrite,
                           write_config=lambda directory: save_config(model, directory),
                           write_checkpoint=lambda directory: model.save_pretrained(directory, safe_serialization=True))


# -- loading ------------------------------------------------------------------------------------------------
def empty_model(path: Path, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """The model that `path`'s config.json describes, its weights empty (meta) and its buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"could not load model directory {path}: {first_line(exc)}") from None


def meta_tensors(model: nn.Module, skip_prefix: str | None = None) -> list[str]:
    """Names of the parameters and buffers still without data (outside `skip_prefix`)."""
    return [name for name, t in (*model.named_parameters(), *model.named_buffers())
            if t.is_meta and not (skip_prefix and name.startswith(skip_prefix))]


def _install(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at `path`, creating ModuleDict containers that the model does not have (routers)."""
    parent_path, _, name = path.rpartition(".")
    parent = model
    for part in parent_path.split(".") if parent_path else []:
        if not hasattr(parent, part):
            parent.add_module(part, nn.ModuleDict())
        parent = getattr(parent, part)
    if isinstance(parent, nn.ModuleDict):
        parent[name] = module
    else:
        setattr(parent, name, module)


def rebuild_layers(model: nn.Module, layers: dict[str, dict], dtype: torch.dtype) -> None:
    """Swap in the custom layers a manifest describes (a layer may refer to another: it is built first)."""
    built: dict[str, nn.Module] = {}

    def resolve(name: str) -> nn.Module:
        if name not in built:
            if name not in layers:
                return model.get_submodule(name)
            spec = layers[name]
            built[name] = kind_named(spec["kind"]).rebuild(spec, resolve, dtype)
            _install(model, name, built[name])
        return built[name]

    for name in layers:
        resolve(name)


def compact_layers(model: nn.Module, names: list[str]) -> None:
    """Hold the layers whose tensors were just loaded in their compressed form (their kinds decide)."""
    for name in {n.rsplit(".", 1)[0] for n in names}:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        kind = kind_of(module)
        if kind is not None:
            kind.compact(module)


def packable_weights(model: nn.Module) -> dict[str, tuple[str, object]]:
    """Tensor name -> (module path, kind) of every parameter that loading for inference may hold in its sparse
    form only (`LayerKind.packed_parameter`: pruned linear layers, expert stacks)."""
    found = {}
    for path, module in model.named_modules():
        kind = kind_of(module)
        parameter = kind.packed_parameter(module) if kind is not None else None
        if parameter:
            found[f"{path}.{parameter}" if path else parameter] = (path, kind)
    return found


def hold_packed(model: nn.Module, encoded: dict[str, BitmaskTensor], packable: dict, dtype: torch.dtype,
                bits: int | None, file: Path) -> dict[str, torch.Tensor]:
    """Give each layer whose weight the file stores as a bitmask that weight's sparse forms (values in `dtype`, or
    the codes of their grid for a `bits`-bit model), never decoded to dense. Returns, decoded, the tensors too
    dense for the kernels (loaded as ordinary tensors)."""
    dense = {}
    for name, tensor in encoded.items():
        path, kind = packable[name]
        expected = tuple(model.get_parameter(name).shape)
        if tuple(tensor.shape) != expected:
            raise UsageError(f"{file} does not match {MANIFEST_FILE}: {name} has shape {list(tensor.shape)}, the model "
                             f"{list(expected)}")
        kernels = packed_stack(tensor.mask, tensor.values, tensor.shape, dtype, bits)
        if any(1 - k.density < MIN_SPARSITY for k in kernels):
            dense[name] = torch.stack([k.to_dense(dtype) for k in kernels]).reshape(tensor.shape)
            continue
        module = model.get_submodule(path)
        held = kind.hold_packed(module, kernels)
        if held is not module:
            model.set_submodule(path, held)
    return dense


def _assign(model: nn.Module, state: dict, file: Path) -> None:
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise UsageError(f"{file} does not match {MANIFEST_FILE}: {first_line(exc)}") from None
    if result.unexpected_keys:
        raise UsageError(f"{file} has tensors the model does not: {', '.join(result.unexpected_keys[:3])}")


def _state_dict_model(path: Path, manifest: dict, dtype: torch.dtype, trust_remote_code: bool,
                      compact: bool = False):
    files = state_dict_files(path, manifest)
    model = empty_model(path, dtype, trust_remote_code)
    try:
        rebuild_layers(model, manifest.get("custom_layers", {}), dtype)
    except (KeyError, IndexError, AttributeError, TypeError) as exc:
        raise UsageError(f"{path / MANIFEST_FILE} does not match the model in config.json: {first_line(exc)}") from None
    packable = packable_weights(model) if compact and native.available() else {}
    for name in files:  # one file, or one per block and one for the rest (a streamed build)
        state = load_compressed(path / name, keep_bitmask=packable.__contains__)
        encoded = {key: state.pop(key) for key in list(state) if isinstance(state[key], BitmaskTensor)}
        _assign(model, state, path / name)
        if encoded:  # after the rest: a layer held packed keeps the bias loaded with it
            _assign(model, hold_packed(model, encoded, packable, dtype, manifest.get("bits"), path / name),
                    path / name)
        if compact:
            compact_layers(model, list(state))  # this file's dense experts go before the next file is read
        del state
        if compact:
            release_memory()  # the freed dense stacks, handed back to the system (not kept by the allocator)
    model.tie_weights()
    missing = meta_tensors(model)
    if missing:
        raise UsageError(f"{path} lacks tensors of the model: {', '.join(missing[:3])}")
    return model.to(dtype)


def load_model_dir(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                   compact: bool = False):
    """Load any directory: this tool's (checksums verified, custom layers rebuilt) or a plain Hugging Face
    one. Returns (model, tokenizer, manifest or None). `compact` (inference only): layers whose kind has a
    compressed form keep only that, straight from the file where it stores them as bitmasks (pruned linear
    layers and an expanded model's experts as bitmask + values in `dtype`, or their grid's codes for a `--bits`
    model: no dense copy is ever made), else file by file as they are read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UsageError(f"{path} is not a model directory (no config.json)")
    manifest = read_manifest(path)
    try:
        if manifest is not None:
            verify_weights(path, manifest)
        if manifest is not None and manifest["weights"]["form"] == "state-dict":
            model = _state_dict_model(path, manifest, dtype, trust_remote_code, compact)
        else:
            try:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                             trust_remote_code=trust_remote_code)
            except SafetensorError as exc:
                raise UsageError(f"could not load model directory {path}: a weight file is corrupted or truncated "
                                 f"({first_line(exc)})") from None
            except RuntimeError as exc:  # tensor shapes that differ from config.json
                raise UsageError(f"could not load model directory {path}: its weights do not match config.json "
                                 f"({first_line(exc)})") from None
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"could not load model directory {path}: {first_line(exc)}") from None
    model.eval()
    return model, tokenizer, manifest
