"""JSON Lines, read one way everywhere: one JSON value per line, errors named by file and line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from gptlab.errors import UserError


def jsonl_records(text: str, name: str, example: str) -> Iterator[tuple[str, Any]]:
    """``(where, value)`` for each non-blank line of ``text``; ``where`` is ``NAME:LINE``, for
    the caller's own checks. ``example`` (``'{"text": "..."}'``) shows the expected shape in the
    error for a line that is not JSON.

    Lines end at "\\n" only, not at everything ``str.splitlines`` splits on: a JSON string may
    hold U+2028 and other characters that it treats as line ends.
    """
    return json_line_records(text.split("\n"), name, example)


def json_line_records(lines: Iterable[str], name: str, example: str) -> Iterator[tuple[str, Any]]:
    """``jsonl_records`` of lines already split (and read one at a time, from a file of any size)."""
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name}:{n}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one object "
                            f"such as {example}") from None
        yield where, value
