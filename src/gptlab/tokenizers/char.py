"""Character-level tokenizer: one id per distinct character of the training text.

The simplest tokenizer there is and the right first rung: the vocabulary is tiny (65 symbols
for Shakespeare), so the model's output layer is cheap and every prediction is one letter.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from gptlab.errors import UserError
from gptlab.tokenizers.base import AllowedSpecial, Tokenizer, register

UNK = "<unk>"


@register
class CharTokenizer(Tokenizer):
    """Ids 0..len(chars)-1 are the characters in sorted order; special tokens follow.

    With ``unk=True`` an ``<unk>`` special token is added and any character outside the
    vocabulary encodes to it; otherwise such a character is an error naming it.
    """

    kind = "char"

    def __init__(self, chars: Iterable[str], special_tokens: Iterable[str] = (), unk: bool = False):
        self.chars = sorted(set(chars))
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("CharTokenizer vocabulary entries must be single characters")
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        specials = list(dict.fromkeys(special_tokens))
        if unk and UNK not in specials:
            specials.append(UNK)
        self.special_tokens = {s: len(self.chars) + i for i, s in enumerate(specials)}
        self.unk_id = self.special_tokens.get(UNK)
        self._itos = self.chars + specials

    @classmethod
    def train(cls, text: str, special_tokens: Iterable[str] = (), unk: bool = False) -> "CharTokenizer":
        if not text:
            raise UserError("cannot build a character vocabulary from empty text")
        return cls(set(text), special_tokens, unk)

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        ids: list[int] = []
        for special, part in self._split_special(text, allowed_special):
            if special:
                ids.append(self.special_tokens[part])
            else:
                ids.extend(self._encode_chunk(part))
        return ids

    def _encode_chunk(self, text: str) -> list[int]:
        stoi = self.stoi
        if self.unk_id is not None:
            unk = self.unk_id
            return [stoi.get(c, unk) for c in text]
        try:
            return [stoi[c] for c in text]
        except KeyError:
            pos = next(i for i, c in enumerate(text) if c not in stoi)
            raise UserError(
                f"character {text[pos]!r} (U+{ord(text[pos]):04X}) at position {pos} is not in the "
                f"character vocabulary of {len(self.chars)} symbols; rebuild the tokenizer on text that "
                "contains it, or build it with unk=True (--unk) to map unknown characters to <unk>"
            ) from None

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def decode(self, ids: Sequence[int]) -> str:
        itos, n = self._itos, len(self._itos)
        # An id outside the vocabulary decodes to U+FFFD rather than raising: decoding never fails.
        return "".join(itos[i] if 0 <= i < n else "\ufffd" for i in ids)

    def to_dict(self) -> dict[str, Any]:
        specials = sorted(self.special_tokens, key=self.special_tokens.__getitem__)
        return {"chars": "".join(self.chars), "special_tokens": specials, "unk": self.unk_id is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CharTokenizer":
        chars, specials = d.get("chars"), d.get("special_tokens", [])
        if not (isinstance(chars, str) and isinstance(specials, list) and all(isinstance(s, str) for s in specials)):
            raise UserError("the character tokenizer description is invalid (it needs \"chars\": a string and "
                            "\"special_tokens\": a list of strings); was it saved by gptlab?")
        return cls(chars, [s for s in specials if s != UNK], bool(d.get("unk", False)))
