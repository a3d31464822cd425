"""How settings are declared: each field of a settings dataclass states its default, its help text and its check
once, here in its metadata; the CLI's parser, the Python API's signatures and every check are derived from it.

    @dataclass(frozen=True)
    class ExpansionConfig:
        experts: int = setting(16, "experts per FFN linear", AtLeast(1))

        def __post_init__(self):
            check_fields(self)

A failed check raises `SettingError`, a `ValueError` (for Python callers) and a `UsageError` (for the CLI's
one-line errors) that names the parameter; the CLI names the flag instead (`SettingError.for_flags`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import UsageError


class SettingError(UsageError, ValueError):
    """An invalid value for one parameter. The message is a template whose `{name}` fields are parameter names:
    `str()` fills them with the names, `for_flags` with the CLI's flags (and a scaled value in the flag's units)."""

    def __init__(self, parameter: str, template: str, value: Any = None, check: Check | None = None):
        self.parameter, self.template, self.value, self.check = parameter, template, value, check
        super().__init__(template.format_map(_Names()))

    def for_flags(self, flags: dict[str, str], scale: float = 1.0) -> str:
        if self.check is not None and scale != 1.0:
            return (f"{flags.get(self.parameter, self.parameter)} must be {self.check.rule(scale)}, "
                    f"got {_show(self.value * scale)}")
        return self.template.format_map(_Names(flags))


class _Names(dict):
    def __missing__(self, key):
        return key


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)


class Check:
    """A rule one value must follow; `rule(scale)` says it in words (in a front end's units: `scale`)."""

    def ok(self, value: Any) -> bool:
        raise NotImplementedError

    def rule(self, scale: float = 1.0) -> str:
        raise NotImplementedError

    def __call__(self, parameter: str, value: Any) -> None:
        if not self.ok(value):
            raise SettingError(parameter, f"{{{parameter}}} must be {self.rule()}, got {_show(value)}", value, self)


@dataclass(frozen=True)
class AtLeast(Check):
    low: float

    def ok(self, value):
        return value >= self.low

    def rule(self, scale=1.0):
        return f"at least {_show(self.low * scale)}"


@dataclass(frozen=True)
class Positive(Check):
    def ok(self, value):
        return value > 0

    def rule(self, scale=1.0):
        return "positive"


@dataclass(frozen=True)
class Interval(Check):
    """low < value <= high by default (`closed_low`: low <= value; `open_high`: value < high)."""

    low: float
    high: float
    closed_low: bool = False
    open_high: bool = False
    what: str = ""

    def ok(self, value):
        above = value >= self.low if self.closed_low else value > self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def rule(self, scale=1.0):
        left, right = "[" if self.closed_low else "(", ")" if self.open_high else "]"
        what = f"{self.what} " if self.what else ""
        return f"{what}in {left}{_show(self.low * scale)}, {_show(self.high * scale)}{right}"


@dataclass(frozen=True)
class OneOf(Check):
    choices: tuple

    def ok(self, value):
        return value in self.choices

    def rule(self, scale=1.0):
        return "one of " + ", ".join(str(c) for c in self.choices)


@dataclass(frozen=True)
class Each(Check):
    """Every item of a sequence follows `check` (the first that does not is named)."""

    check: Check

    def ok(self, value):
        return all(self.check.ok(item) for item in value)

    def rule(self, scale=1.0):
        return self.check.rule(scale)

    def __call__(self, parameter: str, value: Any) -> None:
        for item in value:
            self.check(parameter, item)


def setting(default: Any = dataclasses.MISSING, help: str = "", check: Check | Callable | None = None, *,
            flag: str | None = None, choices: Sequence | Callable[[], Sequence] | None = None,
            parse: Callable[[str], Any] | None = None, off_flag: tuple[str, str] | None = None,
            scale: float = 1.0, metavar: str | None = None, cli: bool = True, factory: Callable | None = None,
            repeat: bool = False):
    """A settings field. `check(parameter, value)` raises `SettingError` (None values are not checked: None is
    the documented 'off' of an optional setting). CLI details: `flag` (default --field-name), `choices` (a list, or
    a function returning it, resolved when the parser is built), `parse` (text -> value, e.g. comma lists),
    `off_flag` ((flag, help): a flag that sets the field to None), `scale` (the flag takes value * scale, e.g. a
    percentage for a fraction), `repeat`: the flag may be given several times (a tuple of the values),
    `cli=False`: not on the command line."""
    if choices is not None and check is None:
        check = one_of(choices) if callable(choices) else OneOf(tuple(choices))
    metadata = {"help": help, "check": check, "flag": flag, "choices": choices, "parse": parse,
                "off_flag": off_flag, "scale": scale, "metavar": metavar, "cli": cli, "repeat": repeat}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_fields(obj) -> None:
    """Run every field's check (from `__post_init__`)."""
    for f in dataclasses.fields(obj):
        check = f.metadata.get("check")
        value = getattr(obj, f.name)
        if check is None or value is None:
            continue
        check(f.name, value)


def one_of(choices: Callable[[], Sequence]) -> Check:
    """A choice among names known only at run time (a registry): resolved on every check."""

    class _Registry(Check):
        def ok(self, value):
            return value in tuple(choices())

        def rule(self, scale=1.0):
            return "one of " + ", ".join(str(c) for c in choices())

    return _Registry()


def not_empty(parameter: str, value) -> None:
    """A check (for `setting(check=...)` or a `__post_init__`): a list setting must hold something."""
    if not value:
        raise SettingError(parameter, f"{{{parameter}}} is empty")


def field_default(f: dataclasses.Field) -> Any:
    """A field's default (its factory called), or MISSING."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def defaults(cls) -> dict[str, Any]:
    """Field name -> default of a settings dataclass (fields without one are left out)."""
    found = {f.name: field_default(f) for f in dataclasses.fields(cls)}
    return {name: value for name, value in found.items() if value is not dataclasses.MISSING}


def split(settings: dict[str, Any], *classes) -> list[dict[str, Any]]:
    """Divide keyword arguments among settings classes by field name; a name no class has is a TypeError, as
    for any function."""
    names = [{f.name for f in dataclasses.fields(c) if f.init} for c in classes]
    unknown = set(settings).difference(*names)
    if unknown:
        raise TypeError(f"unexpected keyword argument {sorted(unknown)[0]!r}")
    return [{k: v for k, v in settings.items() if k in n} for n in names]


# Parsers for settings given as text (the CLI's comma lists).

def comma_list(item: Callable[[str], Any], example: str) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(item(part.strip()) for part in text.split(",") if part.strip())
        except ValueError:
            raise ValueError(f"expects a comma-separated list, e.g. {example}; got {text!r}") from None
    return parse


ints = comma_list(int, "1,4,16")
floats = comma_list(float, "0.5,0.7")
names = comma_list(str, "a,b")
