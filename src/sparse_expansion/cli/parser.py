"""The command-line parser, generated from the settings dataclasses (settings.py): each field gives its flag,
type, default, help and choices, so nothing is written twice. A small generator of our own rather than
transformers.HfArgumentParser: the CLI takes comma lists (`--sparsity 0.5,0.7`), `--no-X` switches that set a
field to None, flags in another unit than the field (`--selective` in percent), and one-line errors, none of
which HfArgumentParser maps without per-field code."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..runtime import __version__
from ..settings import SettingError, field_default


@dataclass(frozen=True)
class Group:
    """The fields of one settings dataclass that a command takes (`only`, less `exclude`)."""

    settings: type
    title: str
    only: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    required: tuple[str, ...] = ()

    def fields(self) -> list[dataclasses.Field]:
        chosen = [f for f in dataclasses.fields(self.settings) if f.metadata.get("cli", False)]
        if self.only is not None:
            unknown = set(self.only) - {f.name for f in chosen}
            assert not unknown, f"{self.settings.__name__} has no CLI field {sorted(unknown)}"
            chosen = [f for f in chosen if f.name in self.only]
        return [f for f in chosen if f.name not in self.exclude]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    groups: tuple[Group, ...]
    run: Callable[[Parsed], int]


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _base_type(cls: type, field: dataclasses.Field) -> type:
    hint = typing.get_type_hints(cls)[field.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join("x".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value)
    return str(value)


def _converter(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def add_group(parser: argparse.ArgumentParser, group: Group) -> dict[str, str]:
    """Add the group's flags; returns field name -> flag."""
    target = parser.add_argument_group(group.title)
    flags = {}
    for field in group.fields():
        meta = field.metadata
        flag, default = flag_of(field), field_default(field)
        default = None if default is dataclasses.MISSING else default
        kind = _base_type(group.settings, field)
        help_text = meta["help"]
        shown = default * meta["scale"] if meta["scale"] != 1.0 and default is not None else default
        if kind is not bool and shown not in (None, "", ()):
            help_text += f" (default {_shown(shown)})"
        kwargs: dict[str, Any] = {"dest": field.name, "help": help_text.replace("%", "%%")}
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        if kind is bool and meta["off_flag"] is not None:
            pass  # on by default: only its --no-X switch
        elif kind is bool:
            target.add_argument(flag, action="store_true", **kwargs)
        elif meta["repeat"]:
            target.add_argument(flag, action="append", default=None, **kwargs)
        else:
            choices = meta["choices"]
            if choices is not None:
                kwargs["choices"] = list(choices() if callable(choices) else choices)
            convert = meta["parse"] or (kind if kind in (int, float) else str)
            kwargs["type"] = _converter(convert) if meta["parse"] else convert
            target.add_argument(flag, default=argparse.SUPPRESS, required=field.name in group.required, **kwargs)
        off = meta["off_flag"]
        if off is not None:
            target.add_argument(off[0], action="store_true", dest=f"no_{field.name}", help=off[1])
        flags[field.name] = off[0] if kind is bool and off is not None else flag
    return flags


class Parsed:
    """A parsed command line: `get(Settings)` builds (and so checks) one settings object from its flags."""

    def __init__(self, command: Command, namespace: argparse.Namespace, flags: dict[str, str]):
        self.command, self.namespace, self.flags = command, namespace, flags

    def values(self, group: Group) -> dict[str, Any]:
        values = {}
        for field in group.fields():
            meta = field.metadata
            if getattr(self.namespace, f"no_{field.name}", False):
                values[field.name] = False if field.default is True else None
            elif field.name in self.namespace and getattr(self.namespace, field.name) is not None:
                value = getattr(self.namespace, field.name)
                if meta["repeat"]:
                    value = tuple(value)
                elif meta["scale"] != 1.0:
                    value = value / meta["scale"]
                values[field.name] = value
            elif field.name in self.namespace and meta["repeat"]:
                values[field.name] = None
        return values

    def get(self, settings: type, **override) -> Any:
        group = next(g for g in self.command.groups if g.settings is settings)
        return settings(**{**self.values(group), **override})

    def given(self, name: str) -> Any:
        return getattr(self.namespace, name, None)

    def message(self, error: SettingError) -> str:
        """The error in the CLI's words: flags, not parameter names (a scaled flag in its own unit)."""
        scale = 1.0
        for group in self.command.groups:
            for field in group.fields():
                if field.name == error.parameter:
                    scale = field.metadata["scale"]
        return error.for_flags(self.flags, scale)


class OneLineErrors(argparse.ArgumentParser):
    """A malformed command line is one line on stderr, like every other error (the usage is in --help)."""

    def error(self, message):
        command = self.prog.removeprefix("sparse-expansion").strip()
        self.exit(2, f"sparse-expansion: error: {command + ': ' if command else ''}{message} "
                     f"(see {self.prog} --help)\n")


def build_parser(commands: dict[str, Command]) -> tuple[argparse.ArgumentParser, dict[str, dict[str, str]]]:
    """The parser of every command, and each command's field -> flag map."""
    parser = OneLineErrors(prog="sparse-expansion", description="One-shot pruning and Sparse Expansion of causal LMs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    flags = {}
    for command in commands.values():
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        flags[command.name] = {}
        for group in command.groups:
            added = add_group(child, group)
            clash = set(added) & set(flags[command.name])
            assert not clash, f"{command.name}: fields {sorted(clash)} given by two groups"
            flags[command.name].update(added)
    return parser, flags
