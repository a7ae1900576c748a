"""The one tokenizer interface every tokenizer in gptlab implements.

A tokenizer maps text to a list of integer ids and back. Special tokens (``<|endoftext|>``,
chat markers) are strings with reserved ids; they are recognised in text only when the caller
allows them, so a corpus that happens to contain ``<|endoftext|>`` is encoded as plain text
unless asked otherwise.

Every tokenizer saves to, and loads from, one JSON file whose ``"type"`` field names its class.
"""

from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

from gptlab.cache import atomic_write_json
from gptlab.errors import UserError

AllowedSpecial = Union[Literal["all"], Iterable[str]]


class Tokenizer(ABC):
    """Text <-> ids. Subclasses set ``kind`` and implement the abstract methods."""

    kind: ClassVar[str]
    #: special token string -> id
    special_tokens: dict[str, int]

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (ids are 0 .. vocab_size-1)."""

    @abstractmethod
    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        """Encode ``text``; special-token strings in ``allowed_special`` map to their ids,
        all others are encoded as ordinary text."""

    @abstractmethod
    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The raw bytes of ``ids``, which may end in an incomplete UTF-8 sequence."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description; ``from_dict`` of the same class inverts it."""

    @classmethod
    @abstractmethod
    def from_dict(cls, d: dict[str, Any]) -> "Tokenizer":
        ...

    # --- shared behaviour -------------------------------------------------------------

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text; never fails on any id sequence (invalid UTF-8 becomes U+FFFD)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def encode_batch(self, texts: Sequence[str], allowed_special: AllowedSpecial = ()) -> list[list[int]]:
        return [self.encode(t, allowed_special) for t in texts]

    def _allowed(self, allowed_special: AllowedSpecial) -> set[str]:
        if allowed_special == "all":
            return set(self.special_tokens)
        allowed = set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ValueError(f"unknown special tokens {sorted(unknown)}; this tokenizer has {sorted(self.special_tokens)}")
        return allowed

    def _split_special(self, text: str, allowed_special: AllowedSpecial) -> Iterator[tuple[bool, str]]:
        """Yield ``(is_special, piece)`` with the allowed special strings cut out of ``text``."""
        allowed = self._allowed(allowed_special)
        if not allowed:
            if text:
                yield False, text
            return
        # Longest first, so a special token that contains another one wins.
        pattern = "(" + "|".join(re.escape(s) for s in sorted(allowed, key=len, reverse=True)) + ")"
        for i, piece in enumerate(re.split(pattern, text)):
            if piece:
                yield bool(i % 2), piece

    def token_id(self, special: str) -> int:
        """The id of a special token, e.g. ``tok.token_id("<|endoftext|>")``."""
        try:
            return self.special_tokens[special]
        except KeyError:
            raise UserError(f"the tokenizer has no special token {special!r} (it has {sorted(self.special_tokens)})") from None

    @property
    def eot_id(self) -> int | None:
        """The end-of-text id if the tokenizer has one (used to separate documents)."""
        return self.special_tokens.get("<|endoftext|>")

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as one JSON file (atomically)."""
        atomic_write_json(path, {"type": self.kind, **self.to_dict()})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, special_tokens={len(self.special_tokens)})"


#: kind -> class, filled by ``register``
TOKENIZER_TYPES: dict[str, type[Tokenizer]] = {}


def register(cls: type[Tokenizer]) -> type[Tokenizer]:
    TOKENIZER_TYPES[cls.kind] = cls
    return cls


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    kind = d.get("type")
    if not isinstance(kind, str) or kind not in TOKENIZER_TYPES:
        raise UserError(f"unknown tokenizer type {kind!r}; known types: {', '.join(sorted(TOKENIZER_TYPES))}")
    return TOKENIZER_TYPES[kind].from_dict(d)


def load_tokenizer_file(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer saved by ``Tokenizer.save``."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"tokenizer file {path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"tokenizer file {path} is not valid JSON ({e}); was it written by gptlab?") from None
    if not isinstance(d, dict):
        raise UserError(f"tokenizer file {path} does not hold a JSON object")
    if "type" not in d and isinstance(d.get("model"), dict):
        d = {"type": "hf", "tokenizer": d}  # a Hugging Face tokenizer.json, used as it is
    try:
        return tokenizer_from_dict(d)
    except UserError as e:  # the description's own complaint, said of this file
        raise UserError(f"tokenizer file {path}: {e}") from None
