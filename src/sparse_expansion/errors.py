"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""


class UsageError(Exception):
    """Bad input from the user: a missing path, an invalid option, data too short, ...

    The message must fit on one line and say what to change.
    """


def literal(value) -> str:
    """`value` as text that stands for itself inside a `SettingError` template (settings.py): its braces doubled,
    so that a path or name holding `{` or `}` is neither filled in nor an error."""
    return str(value).replace("{", "{{").replace("}", "}}")
