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

This module is the byte format: it writes a given state dict, layer descriptions and manifest, and reads
and verifies manifests. Turning a model into those and back (describing and rebuilding its layers) is
models/model_dir.py.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import UsageError
from ..layers.protocol import unique_tensor_bytes
from .atomic import atomic_output_dir, atomic_write_text
from .compressed import COMPRESSED_WEIGHTS_FILE, ENCODINGS, resolve_weight_format, save_compressed

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


def write_model_dir(out: str | Path, state: dict[str, torch.Tensor], layers: dict[str, dict], *,
                    write_config: Callable[[Path], None], write_checkpoint: Callable[[Path], None],
                    tokenizer=None, manifest: dict | None = None, weight_format: str = "auto",
                    overwrite: bool = False) -> Path:
    """Write a model directory atomically from a model's state dict and the specs of its custom layers
    (`layers`, by path). `weight_format`: `compressed` (sparse tensors as bitmask/CSR), `dense` (every
    tensor as it is; a plain Hugging Face checkpoint, written by `write_checkpoint(directory)`, when there
    are no custom layers) or `auto` (compressed whenever that is smaller). A state-dict directory gets its
    config from `write_config(directory)`."""
    weight_format = resolve_weight_format(state, weight_format)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        if weight_format == "dense" and not layers:
            form = "hf"
            write_checkpoint(tmp)
        else:
            form = "state-dict"
            write_config(tmp)
            name = COMPRESSED_WEIGHTS_FILE if weight_format == "compressed" else STATE_DICT_FILE
            allow, pack = ENCODINGS[weight_format]
            save_compressed(state, tmp / name, allow=allow, pack=pack)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_manifest(tmp, manifest, form, weight_format, unique_tensor_bytes(state.values()), layers)
    return Path(out)


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


def state_dict_files(path: Path, manifest: dict) -> list[str]:
    """The safetensors files of a state-dict directory, in manifest order: one, or one per block and one for
    the rest (a streamed build)."""
    files = [f for f in manifest["weights"]["sha256"] if f.endswith(".safetensors")]
    if not files:
        raise UsageError(f"{path / MANIFEST_FILE}: a state-dict directory lists no weight file")
    return files
