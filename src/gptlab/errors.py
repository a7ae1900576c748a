"""The one exception type for mistakes a user can cause.

The CLI prints a ``UserError`` as a single line ``error: ...`` and exits with code 1; any
other exception is a bug and shows its traceback. Messages say what went wrong, with which
input, and what to do about it.
"""


class UserError(Exception):
    """A problem with the user's input or environment, reported as one clear line."""
