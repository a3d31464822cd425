"""A resumable run's state directory: a JSON state file that records the run's fingerprint (the settings a
continued run must share with the interrupted one) and whatever the run saved so far, rewritten atomically.

`StateDir(path, fingerprint, resume)` opens one in one of three ways:
- `resume=False`: a new run. The directory must be absent or empty; it is created with its state file.
- `resume=True`: `--resume DIR`. The state file must be there and record the same fingerprint.
- `resume=None`: either (a training run, a law study: the same command run again continues): the state file
  is reopened where it is, else the directory is created as for a new run.
A fingerprint that differs is refused with one line naming the first differing setting and both values.

Files the run writes beside the state (`write_file`) go through a temporary file and a rename and are
recorded with their sha256, which `verify` checks before a resumed run trusts them.

Under torch.distributed rank 0 creates or checks the directory first; the other ranks then read it (or raise
rank 0's one-line error). Only rank 0 writes the state (`save`) and removes the directory (`discard`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .. import distributed
from ..errors import UsageError, literal
from ..settings import SettingError
from .atomic import atomic_write_text, check_output_path
from .model_dir import file_sha256

STATE_FILE = "state.json"


def first_difference(recorded: dict, current: dict) -> tuple[str, object, object] | None:
    """The first setting (in key order; a nested one as `outer.inner`) whose values differ, with both values."""
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_difference(a, b)
            if found is not None:
                return f"{key}.{found[0]}", found[1], found[2]
        elif a != b:
            return key, a, b
    return None


def _portable(error: Exception | None):
    """What the other ranks raise for rank 0's `error`: a SettingError as its parameter and template (so that the
    CLI names the flag on every rank), anything else as its message."""
    if isinstance(error, SettingError):
        return error.parameter, error.template
    return None if error is None else str(error)


class StateDir:
    """`state`: the state file's content, `{"fingerprint": ..., **initial}` for a new run. Subclasses check
    the files they recorded in `verify_files`."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict, resume: bool | None = False, *,
                 file: str = STATE_FILE, what: str = "run", initial: dict | None = None):
        self.path = Path(path)
        self.file = self.path / file
        self.what = what  # in messages: "no interrupted {what} there", "is not a {what}"
        self.resume = resume
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from JSON
        self._initial = json.loads(json.dumps(initial or {}))
        self.state: dict = {}
        refused = None
        if distributed.is_main():
            try:
                if resume is True or (resume is None and self.file.is_file()):
                    self._read()
                else:
                    self._create()
            except Exception as exc:  # shared with the other ranks before it is raised
                refused = exc
        message = distributed.gather_objects(_portable(refused))[0]  # also the barrier
        if refused is not None:
            raise refused
        if isinstance(message, tuple):
            raise SettingError(*message)
        if message is not None:
            raise UsageError(message)
        if not distributed.is_main():
            self._read()

    def _not_a_state(self) -> UsageError:
        return UsageError(f"{self.file} is not the state of a sparse-expansion {self.what}")

    def _read(self) -> None:
        if not self.file.is_file():
            raise SettingError("resume", f"{{resume}} {literal(self.path)}: no interrupted {self.what} there (no "
                                         f"{literal(self.file.name)})")
        try:
            state = json.loads(self.file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"{self.file} is not valid JSON: {exc}") from None
        if not (isinstance(state, dict) and isinstance(state.get("fingerprint"), dict)
                and all(isinstance(state.get(k), type(v)) for k, v in self._initial.items())):
            raise self._not_a_state()
        differ = first_difference(state["fingerprint"], self.fingerprint)
        if differ is not None:
            key, had, has = differ
            if self.resume is None:
                raise UsageError(f"{self.path} holds a {self.what} with other settings (it had {key}={had!r}, this "
                                 f"one {has!r}); choose another output or the same options")
            raise SettingError("resume", f"{{resume}} {literal(self.path)}: the interrupted {self.what} had "
                                         f"{literal(key)}={literal(repr(had))}, this one {literal(repr(has))}; resume "
                                         "with the same options")
        self.state = state
        self.verify_files()

    def _create(self) -> None:
        check_output_path(self.path, overwrite=True)  # its nearest existing ancestor is a directory
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"{self.path} is a file, not a directory; choose another output")
        if self.path.exists() and any(self.path.iterdir()):
            if self.file.is_file():
                raise SettingError("resume", f"{literal(self.path)} already holds an interrupted {self.what}'s "
                                             f"state; pass {{resume}} {literal(self.path)} to continue it, or delete "
                                             "it")
            raise UsageError(f"{self.path} exists and is not a {self.what} (no {self.file.name}); choose another "
                             "output")
        self.path.mkdir(parents=True, exist_ok=True)
        self.state = {"fingerprint": self.fingerprint, **copy.deepcopy(self._initial)}
        self.save()

    def verify_files(self) -> None:
        """Called on resume, after the fingerprint check: refuse recorded files that changed (`verify`)."""

    def verify(self, name: str, sha256: str) -> Path:
        """The directory's file `name`, refused unless it has the recorded `sha256`."""
        file = self.path / name
        if not file.is_file() or file_sha256(file) != sha256:
            raise UsageError(f"{file} is missing or corrupted (its sha256 differs from {self.file.name})")
        return file

    def write_file(self, name: str, write: Callable[[str], object]) -> str:
        """Make the directory's file `name` by `write(temporary path)`, then a rename (a kill leaves the file whole
        or absent); returns its sha256, for the state and `verify`. Rank 0 only."""
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.path)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, self.path / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return file_sha256(self.path / name)

    def save(self) -> None:
        """Replace the state file by `state`, atomically (rank 0; the other ranks keep theirs in memory)."""
        if distributed.is_main():
            atomic_write_text(self.file, json.dumps(self.state, indent=1) + "\n")

    def discard(self) -> None:
        """Remove the directory and everything in it (rank 0)."""
        if distributed.is_main():
            shutil.rmtree(self.path, ignore_errors=True)


__all__ = ["STATE_FILE", "StateDir", "first_difference"]
