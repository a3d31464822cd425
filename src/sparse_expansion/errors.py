"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""


class UsageError(Exception):
    """Bad input from the user: a missing path, an invalid option, data too short, ...

    The message must fit on one line and say what to change.
    """
