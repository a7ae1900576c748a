"""The one exception type for mistakes a user can cause.

The CLI prints a ``UserError`` as a single line ``error: ...`` and exits with code 1; any
other exception is a bug and shows its traceback. Messages say what went wrong, with which
input, and what to do about it.
"""

from collections.abc import Iterable


class UserError(Exception):
    """A problem with the user's input or environment, reported as one clear line.

    The message is kept on one line whatever it quotes: a library's complaint about a damaged
    file can hold bytes of that file, line breaks included."""

    def __init__(self, message: str = "") -> None:
        super().__init__(" ".join(str(message).splitlines()))


def is_rust_panic(e: BaseException) -> bool:
    """Whether ``e`` is a panic inside a Rust extension (tiktoken, tokenizers) on input it could
    not handle: pyo3 raises those as ``PanicException``, a ``BaseException`` that ``except
    Exception`` lets through."""
    return type(e).__name__ == "PanicException"


def names(items: Iterable[object]) -> str:
    """Names read from a file (keys, tensor names), joined for a one-line message: each as it is,
    or as its repr() when it holds a line break or another unprintable character."""
    return ", ".join(s if isinstance(s, str) and s.isprintable() else repr(s) for s in items)
