"""The small part of YAML that data files such as the ChatterBot corpus use, read without PyYAML.

Covered: a top-level mapping of ``key:`` lines; block sequences (``- item``), nested compactly
(``- - first``); scalars plain, 'single-quoted' or "double-quoted", over one line or folded over
several, and literal blocks (``|``, ``|-``); full-line comments. Every scalar is read as a
string (``- 1963`` is "1963", not a number). Anything else (flow collections ``[a, b]``, anchors,
folded ``>`` blocks, nested mappings, tabs for indentation) is refused with the file and line,
not guessed at.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from gptlab.errors import UserError

_KEY = re.compile(r"([A-Za-z_][\w -]*):(?: +(.*))?")


@dataclass
class _Line:
    number: int
    indent: int
    text: str  # without the indentation


class _Parser:
    def __init__(self, text: str, where: str) -> None:
        self.where = where
        self.raw = text.removeprefix("\ufeff").replace("\r\n", "\n").split("\n")
        self.lines = [_Line(n, len(s) - len(s.lstrip(" ")), s.strip(" ")) for n, s in enumerate(self.raw, start=1)]
        self.i = 0

    def fail(self, line: _Line, what: str) -> UserError:
        return UserError(f"{self.where}:{line.number}: {what}; only a simple subset of YAML is read")

    def next_content(self) -> _Line | None:
        """The next line that is neither blank nor a comment (skipping them), or None at the end."""
        while self.i < len(self.lines):
            line = self.lines[self.i]
            if line.text.startswith("\t"):
                raise self.fail(line, "indentation with a tab")
            if line.text and not line.text.startswith("#"):
                return line
            self.i += 1
        return None

    def mapping(self) -> dict:
        out = {}
        while (line := self.next_content()) is not None:
            m = _KEY.fullmatch(line.text)
            if line.indent != 0 or m is None:
                raise self.fail(line, "expected a top-level 'key:'")
            self.i += 1
            if m.group(2) is not None:
                out[m.group(1)] = self.scalar(m.group(2), line, parent_indent=0)
            elif (after := self.next_content()) is not None and _is_item(after.text):
                out[m.group(1)] = self.sequence(after.indent)
            else:
                out[m.group(1)] = None
        return out

    def sequence(self, indent: int) -> list:
        items = []
        while (line := self.next_content()) is not None and line.indent == indent and _is_item(line.text):
            rest = line.text[2:].lstrip(" ")
            inner = indent + len(line.text) - len(rest)
            if _is_item(rest):  # "- - x": a sequence inside, starting on this line
                self.lines[self.i] = _Line(line.number, inner, rest)
                items.append(self.sequence(inner))
            else:
                self.i += 1
                items.append(self.scalar(rest, line, parent_indent=indent))
        if line is not None and line.indent > indent:
            raise self.fail(line, "unexpected indentation")
        return items

    def scalar(self, first: str, line: _Line, parent_indent: int) -> str:
        quote = first[:1] if first[:1] in "'\"" else ""
        if first[:1] in "[{&*!>%@`" or (not quote and re.search(r":( |$)", first)):
            raise self.fail(line, f"unsupported YAML syntax in {first[:30]!r}")
        if first[:1] == "|":
            return self.literal_block(first, line, parent_indent)
        parts = [first]
        while (not quote or _quoted_end(" ".join(parts), quote) is None) and self.i < len(self.lines):
            nxt = self.lines[self.i]
            if not quote and nxt.text and (nxt.indent <= parent_indent or nxt.text.startswith("#")):
                break
            parts.append(nxt.text)
            self.i += 1
        while len(parts) > 1 and not parts[-1]:
            parts.pop()  # blank lines after a plain scalar are not part of it
        text = _fold(parts)
        if not quote:
            return re.sub(r"\s+#.*$", "", text)
        end = _quoted_end(text, quote)
        if end is None:
            raise self.fail(line, f"a {quote}quoted{quote} string that never ends")
        if text[end + 1 :].strip() and not text[end + 1 :].strip().startswith("#"):
            raise self.fail(line, "text after a quoted string")
        if quote == "'":
            return text[1:end].replace("''", "'")
        try:
            return json.loads(text[: end + 1])  # JSON's escapes are a subset of YAML's
        except json.JSONDecodeError as e:
            raise self.fail(line, f"a double-quoted string with an escape not read here ({e.msg})") from None

    def literal_block(self, header: str, line: _Line, parent_indent: int) -> str:
        if header not in ("|", "|-"):
            raise self.fail(line, f"block header {header!r}")
        body: list[_Line] = []
        while self.i < len(self.lines) and (not self.lines[self.i].text or self.lines[self.i].indent > parent_indent):
            body.append(self.lines[self.i])
            self.i += 1
        indent = next((b.indent for b in body if b.text), 0)
        if any(b.text and b.indent < indent for b in body):
            raise self.fail(line, "a literal block whose lines are less indented than its first")
        text = "\n".join(self.raw[b.number - 1][indent:] for b in body).rstrip("\n")
        return text if header == "|-" else text + "\n"


def _is_item(text: str) -> bool:
    return text == "-" or text.startswith("- ")


def _quoted_end(text: str, quote: str) -> int | None:
    """The index of the quote that closes the string ``text`` opens, or None if it is still open.
    Inside '...', a quote is written twice; inside "...", escapes start with a backslash."""
    i = 1
    while i < len(text):
        if quote == "'" and text.startswith("''", i) or quote == '"' and text[i] == "\\":
            i += 2
        elif text[i] == quote:
            return i
        else:
            i += 1
    return None


def _fold(parts: list[str]) -> str:
    """Lines of a flow scalar joined as YAML folds them: a line break is a space, an empty line a newline."""
    out = parts[0]
    for part in parts[1:]:
        out += "\n" if not part else ("" if out.endswith("\n") else " ") + part
    return out


def load(text: str, where: str) -> dict:
    """The top-level mapping of a YAML document in the subset above; ``where`` names it in errors."""
    return _Parser(text, where).mapping()
