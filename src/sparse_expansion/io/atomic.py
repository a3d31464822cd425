"""Atomic outputs: everything is written under a temporary sibling path, then renamed into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import UsageError, literal
from ..settings import SettingError


def check_output_path(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Validate an output path before any expensive work starts."""
    out = Path(path)
    if out.exists() and not overwrite:
        if out.is_dir() and not any(out.iterdir()):
            return out
        raise SettingError("overwrite", f"output path {literal(out)} already exists; pass {{overwrite}} to replace it")
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:  # the nearest ancestor that exists must be a directory
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"cannot write {out}: {parent} is not a directory")
    return out


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` only if the block finishes without error."""
    final = check_output_path(path, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    move_into_place(tmp, final)


def move_into_place(done: Path, final: Path) -> None:
    """Rename a complete directory to `final` (same file system); an old `final` is kept until the swap."""
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        os.replace(final, trash / "old")
        os.replace(done, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(done, final)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file through a temporary file in the same directory, then rename it."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return final
