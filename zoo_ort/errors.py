"""The one error type the CLI turns into a one-line message and exit code 2."""


class ZooError(Exception):
    """A user-facing error: bad input, missing files, unsupported settings.

    The message must fit on one line and say what to do about it.
    """
