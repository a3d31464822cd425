"""One model directory format, one save path and one load path, for dense, pruned and expanded models.

A directory holds:
- `config.json` (+ `generation_config.json`) and the tokenizer files, as Hugging Face writes them;
- the weights, in one of two forms:
  - `hf`: a plain Hugging Face checkpoint (`model.safetensors`, or shards and their index) that any tool
    reads: only for models whose every layer is the model's own (dense or pruned, `--format dense`);
  - `state-dict`: the state dict in safetensors files written by io/compressed.py, tied tensors once:
    `model.compressed.safetensors` (sparse tensors as bitmask or CSR plus zstd byte planes) or, with
    `--format dense`, `model.safetensors` with every tensor stored as it is; a build streamed block by
    block (io/block_store.py) writes one file per decoder block and one for the rest;
- `manifest.json`: `format` (`sparse-expansion/model`, version), `weights` (form, files and the sha256 of
  every weight file), `custom_layers` (every layer the toolkit created, by path: its kind and the spec
  that rebuilds it, layers/protocol.py), and what the job that wrote it recorded (settings, data,
  measured sparsity per layer under `layers`).

Loading verifies every checksum first: a truncated or altered file is refused with a one-line error that
names it. Then a `hf` directory loads through `from_pretrained`; a `state-dict` one is built from the
config with empty weights, its custom layers rebuilt by their kinds, and the state dict assigned strictly,
so a reload reproduces the logits bit for bit. A directory without a manifest is an ordinary Hugging Face
directory (loaded as such, nothing to verify).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ..errors import UsageError
from ..layers.protocol import kind_named, kind_of, unique_tensor_bytes
from ..runtime import first_line, release_memory
from .atomic import atomic_output_dir, atomic_write_text
from .compressed import COMPRESSED_WEIGHTS_FILE, ENCODINGS, load_compressed, resolve_weight_format, save_compressed

FORMAT = "sparse-expansion/model"
FORMAT_VERSION = 2
MANIFEST_FILE = "manifest.json"
STATE_DICT_FILE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def save_model_dir(model: nn.Module, tokenizer, out: str | Path, manifest: dict | None = None,
                   weight_format: str = "auto", overwrite: bool = False) -> Path:
    """Write a model directory atomically. `weight_format`: `compressed` (sparse tensors as bitmask/CSR),
    `dense` (every tensor as it is; a plain Hugging Face checkpoint when the model has no custom layers) or
    `auto` (compressed whenever that is smaller)."""
    layers = describe_layers(model)  # first: a layer that cannot be saved says so before anything is written
    state = model.state_dict()
    weight_format = resolve_weight_format(state, weight_format)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        if weight_format == "dense" and not layers:
            form = "hf"
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            form = "state-dict"
            save_config(model, tmp)
            name = COMPRESSED_WEIGHTS_FILE if weight_format == "compressed" else STATE_DICT_FILE
            allow, pack = ENCODINGS[weight_format]
            save_compressed(state, tmp / name, allow=allow, pack=pack)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_manifest(tmp, manifest, form, weight_format, unique_tensor_bytes(state.values()), layers)
    return Path(out)


def save_config(model: nn.Module, directory: Path) -> None:
    """config.json, and generation_config.json when the model has one."""
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)


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


def write_manifest(directory: Path, manifest: dict | None, form: str, encoding: str, dense_bytes: int,
                   layers: dict) -> dict:
    """The manifest of a directory whose weight files are written: checksums of every weight file."""
    files = sorted(p.name for p in directory.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    data = {**(manifest or {}), "format": FORMAT, "version": FORMAT_VERSION,
            "weights": {"form": form, "encoding": encoding,
                        "bytes": sum((directory / f).stat().st_size for f in files),
                        "dense_bytes": dense_bytes,
                        "sha256": {f: file_sha256(directory / f) for f in files}},
            "custom_layers": layers}
    (directory / MANIFEST_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return data


def update_manifest(path: str | Path, fields: dict) -> None:
    """Add fields to a written directory's manifest (atomically; the weight files and checksums stay)."""
    file = Path(path) / MANIFEST_FILE
    data = json.loads(file.read_text(encoding="utf-8"))
    atomic_write_text(file, json.dumps({**data, **fields}, indent=2) + "\n")


def read_manifest(path: Path) -> dict | None:
    """The manifest of a directory this tool wrote, or None for an ordinary Hugging Face directory."""
    file = path / MANIFEST_FILE
    if not file.is_file():
        if (path / COMPRESSED_WEIGHTS_FILE).is_file():
            raise UsageError(f"{path} has compressed weights but no {MANIFEST_FILE} to check them against")
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{file} is not valid JSON: {exc}") from None
    if data.get("format") != FORMAT:
        if (path / "expansion.json").is_file() or (path / COMPRESSED_WEIGHTS_FILE).is_file():
            raise UsageError(f"{path} was written by an older sparse-expansion (no checksums); prune or expand again")
        return None  # someone else's manifest.json: an ordinary directory
    if data.get("version") != FORMAT_VERSION:
        raise UsageError(f"{file}: {FORMAT} version {data.get('version')} is not supported (expected {FORMAT_VERSION})")
    return data


def verify_weights(path: Path, manifest: dict) -> None:
    """Every weight file listed in the manifest exists and has its recorded sha256."""
    checksums = manifest.get("weights", {}).get("sha256") or {}
    if not checksums:
        raise UsageError(f"{path / MANIFEST_FILE} lists no weight files")
    for name, expected in checksums.items():
        file = path / name
        if not file.is_file():
            raise UsageError(f"{file} is missing (listed in {MANIFEST_FILE})")
        if file_sha256(file) != expected:
            raise UsageError(f"{file} is corrupted or truncated (its sha256 differs from {MANIFEST_FILE})")


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


def _compact(model: nn.Module, names: list[str]) -> None:
    """Hold the layers whose tensors were just loaded in their compressed form (their kinds decide)."""
    for name in {n.rsplit(".", 1)[0] for n in names}:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        kind = kind_of(module)
        if kind is not None:
            kind.compact(module)


def _state_dict_model(path: Path, manifest: dict, dtype: torch.dtype, trust_remote_code: bool,
                      compact: bool = False):
    files = [f for f in manifest["weights"]["sha256"] if f.endswith(".safetensors")]
    if not files:
        raise UsageError(f"{path / MANIFEST_FILE}: a state-dict directory lists no weight file")
    model = empty_model(path, dtype, trust_remote_code)
    try:
        rebuild_layers(model, manifest.get("custom_layers", {}), dtype)
    except (KeyError, IndexError, AttributeError, TypeError) as exc:
        raise UsageError(f"{path / MANIFEST_FILE} does not match the model in config.json: {first_line(exc)}") from None
    for name in files:  # one file, or one per block and one for the rest (a streamed build)
        state = load_compressed(path / name)
        try:
            result = model.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as exc:
            raise UsageError(f"{path / name} does not match {MANIFEST_FILE}: {first_line(exc)}") from None
        if result.unexpected_keys:
            raise UsageError(f"{path / name} has tensors the model does not: {', '.join(result.unexpected_keys[:3])}")
        if compact and dtype == torch.float32:
            _compact(model, list(state))  # this file's dense experts go before the next file is read
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
    compressed form keep only that, file by file as they are read (an expanded model's experts as CSR
    copies, not k dense copies of every FFN matrix)."""
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
