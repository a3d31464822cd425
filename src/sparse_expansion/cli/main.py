"""The entry point: parse, join the ranks under torchrun, dispatch, and map errors to one line and an exit code."""

from __future__ import annotations

import functools
import logging
import os
import sys

import tqdm
from transformers.utils import logging as hf_logging

from .. import distributed
from ..errors import UsageError
from ..settings import SettingError
from . import build_commands, model_commands, study_commands
from .parser import Command, Parsed, build_parser

COMMANDS: dict[str, Command] = {c.name: c for c in (*build_commands.COMMANDS, *model_commands.COMMANDS,
                                                     *study_commands.COMMANDS)}

# Commands that run data-parallel under torchrun (each rank a share of the windows, rank 0 writes).
DISTRIBUTED_COMMANDS = ("prune", "expand", "eval", "compare")


def parser():
    return build_parser(COMMANDS)[0]


def _join_ranks(parsed: Parsed, argv: list[str] | None) -> None:
    """Under torchrun: join the process group, check that every rank got the same command, keep the other
    ranks quiet (rank 0 prints and writes)."""
    if not distributed.launched():
        return
    name = parsed.command.name
    if name not in DISTRIBUTED_COMMANDS:
        raise UsageError(f"{name} does not run under torchrun; run it as one process (distributed: "
                         f"{', '.join(DISTRIBUTED_COMMANDS)})")
    namespace = parsed.namespace
    namespace.device = distributed.init_from_env(getattr(namespace, "device", "cpu"))
    distributed.check_same(list(sys.argv[1:] if argv is None else argv), "arguments")
    if not distributed.is_main():
        namespace.quiet = True
        sys.stdout = open(os.devnull, "w")


def _quiet_libraries() -> None:
    """No progress bars from the libraries either. tqdm reads TQDM_DISABLE when it is first imported, which the
    front end's imports already did: its bars are switched off on the class (a bar asked for explicitly still
    shows); the variable covers child processes."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    tqdm.std.tqdm.__init__ = functools.partialmethod(tqdm.std.tqdm.__init__, disable=True)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _error(message: str) -> None:
    where = "" if distributed.is_main() else f" (rank {distributed.rank()})"
    print(f"sparse-expansion: error{where}: {message}", file=sys.stderr)


def _system_error(exc: OSError) -> str:
    """A full disk, a read-only or vanished path, permissions: the system, not the input."""
    reason = exc.strerror or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{exc.filename}: {reason}" if exc.filename else reason


def main(argv: list[str] | None = None) -> int:
    top, flags = build_parser(COMMANDS)
    namespace = top.parse_args(argv)
    parsed = Parsed(COMMANDS[namespace.command], namespace, flags[namespace.command])
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        _join_ranks(parsed, argv)
        if getattr(namespace, "quiet", False):
            _quiet_libraries()
        return parsed.command.run(parsed)
    except SettingError as exc:
        _error(parsed.message(exc))
        return 2
    except UsageError as exc:
        _error(str(exc))
        return 2
    except OSError as exc:
        _error(_system_error(exc))
        return 1
    except KeyboardInterrupt:
        print("sparse-expansion: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
