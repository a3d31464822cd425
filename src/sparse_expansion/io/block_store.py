"""A model directory written block by block: the state of a run that can be resumed, and its output.

After each decoder block, `save_block` writes the block's tensors (its pruned weights, or its experts and
routers, compressed as the model directory would store them) to `block-NNNNN.safetensors` through a
temporary file and a rename, then records it (file, sha256, the custom layers it holds, what the job
reported of it) in `state.json`, itself replaced atomically. A process killed at any moment leaves either
the previous state or the new one, never a half-written block. `--resume DIR` reopens the directory: the
run's settings must be the ones recorded, every recorded file must still have its checksum, and the run
continues after the last recorded block (blocks/`restore` put the saved ones back).
The directory itself (state file, fingerprint check, checksums, rank 0 first) is a StateDir (state_dir.py).

`finish` writes the rest of the model (embeddings, final norm, ...), config, tokenizer and the manifest
(io/model_dir.py) next to the block files and renames the directory to the output: the block files are the
output's weight files, so a finished block is written once and never held in memory again.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..layers.protocol import unique_tensor_bytes
from .atomic import move_into_place
from .compressed import COMPRESSED_WEIGHTS_FILE, ENCODINGS, load_compressed, save_compressed
from .model_dir import FORMAT, MANIFEST_FILE, write_manifest
from .state_dir import STATE_FILE, StateDir

# The tensors outside the blocks: the usual file name of a compressed directory (dense: a name that no Hugging
# Face loader mistakes for a whole checkpoint).
REST_FILES = {"compressed": COMPRESSED_WEIGHTS_FILE, "dense": "rest.safetensors"}


def default_state_dir(out: str | os.PathLike) -> Path:
    """Where a run writing `out` keeps its state: `OUT.partial` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


class BlockStore(StateDir):
    """`resume`: as StateDir's (None: continue the run recorded there, if any). Under torch.distributed every
    rank opens it (rank 0 first); rank 0 saves the blocks and finishes."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict, resume: bool | None = False):
        super().__init__(path, fingerprint, resume, initial={"format": FORMAT, "blocks": []})

    def verify_files(self) -> None:
        for entry in self.state["blocks"]:
            self.verify(entry["file"], entry["sha256"])

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
        return self.write_file(name, lambda tmp: save_compressed(state, tmp, allow=allow, pack=pack))

    def save_block(self, index: int, state: dict[str, torch.Tensor], layers: dict, record: dict,
                   encoding: str) -> None:
        """Write block `index` (full tensor names), then record it: the run can resume after it."""
        if index != self.done:
            raise ValueError(f"block {index} saved after {self.done} blocks")
        name = f"block-{index:05d}.safetensors"
        digest = self._write_tensors(state, name, encoding)
        self.state["blocks"].append({"file": name, "sha256": digest, "layers": layers, "record": record,
                                     "dense_bytes": unique_tensor_bytes(state.values())})
        self.save()

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
        self.file.unlink()
        final = Path(out)
        final.parent.mkdir(parents=True, exist_ok=True)
        move_into_place(self.path, final)
        return final


__all__ = ["BlockStore", "MANIFEST_FILE", "REST_FILES", "STATE_FILE", "default_state_dir"]
