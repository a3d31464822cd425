"""A model directory written block by block: the state of a run that can be resumed, and its output.

After each decoder block, `save_block` writes the block's tensors (its pruned weights, or its experts and
routers, compressed as the model directory would store them) to `block-NNNNN.safetensors` through a
temporary file and a rename, then records it (file, sha256, the custom layers it holds, what the job
reported of it) in `state.json`, itself replaced atomically. A process killed at any moment leaves either
the previous state or the new one, never a half-written block. `--resume DIR` reopens the directory: the
run's settings must be the ones recorded, every recorded file must still have its checksum, and the run
continues after the last recorded block (blocks/`restore` put the saved ones back).

`finish` writes the rest of the model (embeddings, final norm, ...), config, tokenizer and the manifest
(io/model_dir.py) next to the block files and renames the directory to the output: the block files are the
output's weight files, so a finished block is written once and never held in memory again.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import UsageError
from ..layers.protocol import unique_tensor_bytes
from .atomic import atomic_write_text, move_into_place
from .compressed import COMPRESSED_WEIGHTS_FILE, ENCODINGS, load_compressed, save_compressed
from .model_dir import FORMAT, MANIFEST_FILE, file_sha256, write_manifest

STATE_FILE = "state.json"
# The tensors outside the blocks: the usual file name of a compressed directory (dense: a name that no Hugging
# Face loader mistakes for a whole checkpoint).
REST_FILES = {"compressed": COMPRESSED_WEIGHTS_FILE, "dense": "rest.safetensors"}


def default_state_dir(out: str | os.PathLike) -> Path:
    """Where a run writing `out` keeps its state: `OUT.partial` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def check_fingerprint(recorded, current: dict, path: Path) -> None:
    """A one-line error naming the first setting in which a resumed run differs from the interrupted one."""
    if not isinstance(recorded, dict):
        raise UsageError(f"{path / STATE_FILE} is not the state of a sparse-expansion run")
    differ = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
    if differ:
        key = differ[0]
        raise UsageError(f"--resume {path}: the interrupted run had {key}={recorded.get(key)!r}, this one "
                         f"{current.get(key)!r}; resume with the same options")


class BlockStore:
    def __init__(self, path: str | os.PathLike, fingerprint: dict, resume: bool = False):
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from JSON
        state_file = self.path / STATE_FILE
        if resume:
            if not state_file.is_file():
                raise UsageError(f"--resume {self.path}: no interrupted run there (no {STATE_FILE})")
            try:
                self.state = json.loads(state_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise UsageError(f"{state_file} is not valid JSON: {exc}") from None
            self._check_resumable()
        else:
            if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
                hint = (f"pass --resume {self.path} to continue it, or delete it" if state_file.is_file()
                        else "delete it or choose another output")
                raise UsageError(f"{self.path} already holds an interrupted run's state; {hint}")
            self.path.mkdir(parents=True, exist_ok=True)
            self.state = {"format": FORMAT, "fingerprint": self.fingerprint, "blocks": []}
            self._write_state()

    def _check_resumable(self) -> None:
        if not isinstance(self.state.get("blocks"), list):
            raise UsageError(f"{self.path / STATE_FILE} is not the state of a sparse-expansion run")
        check_fingerprint(self.state.get("fingerprint"), self.fingerprint, self.path)
        for entry in self.state["blocks"]:
            file = self.path / entry["file"]
            if not file.is_file() or file_sha256(file) != entry["sha256"]:
                raise UsageError(f"{file} is missing or corrupted (its sha256 differs from {STATE_FILE})")

    def _write_state(self) -> None:
        atomic_write_text(self.path / STATE_FILE, json.dumps(self.state, indent=1) + "\n")

    @property
    def done(self) -> int:
        """Blocks completed (0 .. done-1)."""
        return len(self.state["blocks"])

    def record(self, index: int) -> dict:
        return self.state["blocks"][index]["record"]

    def layers(self, index: int) -> dict:
        return self.state["blocks"][index]["layers"]

    def _write_tensors(self, state: dict[str, torch.Tensor], name: str, encoding: str) -> str:
        allow, pack = ENCODINGS[encoding]
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.path)
        os.close(fd)
        try:
            save_compressed(state, tmp, allow=allow, pack=pack)
            os.replace(tmp, self.path / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return file_sha256(self.path / name)

    def save_block(self, index: int, state: dict[str, torch.Tensor], layers: dict, record: dict,
                   encoding: str) -> None:
        """Write block `index` (full tensor names), then record it: the run can resume after it."""
        if index != self.done:
            raise ValueError(f"block {index} saved after {self.done} blocks")
        name = f"block-{index:05d}.safetensors"
        digest = self._write_tensors(state, name, encoding)
        self.state["blocks"].append({"file": name, "sha256": digest, "layers": layers, "record": record,
                                     "dense_bytes": unique_tensor_bytes(state.values())})
        self._write_state()

    def load_block(self, index: int) -> dict[str, torch.Tensor]:
        return load_compressed(self.path / self.state["blocks"][index]["file"])

    def dense_bytes(self, rest: dict[str, torch.Tensor]) -> int:
        """Bytes of every tensor as it is in memory (tied ones once): the blocks' and the rest's."""
        return sum(e["dense_bytes"] for e in self.state["blocks"]) + unique_tensor_bytes(rest.values())

    def finish(self, out: str | os.PathLike, rest: dict[str, torch.Tensor], save_config, tokenizer, manifest: dict,
               encoding: str) -> Path:
        """Write the rest of the model, config, tokenizer and manifest; the directory becomes `out`."""
        self._write_tensors(rest, REST_FILES[encoding], encoding)
        save_config(self.path)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.path)
        layers = {}
        for entry in self.state["blocks"]:
            layers.update(entry["layers"])
        write_manifest(self.path, manifest, "state-dict", encoding, self.dense_bytes(rest), layers)
        (self.path / STATE_FILE).unlink()
        final = Path(out)
        final.parent.mkdir(parents=True, exist_ok=True)
        move_into_place(self.path, final)
        return final

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


__all__ = ["BlockStore", "MANIFEST_FILE", "check_fingerprint", "REST_FILES", "STATE_FILE", "default_state_dir"]
