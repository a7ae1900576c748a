"""SentencePiece BPE: the vocabularies of Llama 2, Mistral and Gemma, written out by hand.

A SentencePiece vocabulary is a list of *pieces*, each with a *score* and a *type*; a piece's
id is its place in the list. Where byte-level BPE (``bpe.py``) works on bytes, SentencePiece
works on characters, and where byte-level BPE has a list of merges, SentencePiece lets the
scores decide. Encoding a text goes:

1. Normalise: every space becomes "▁" (U+2581), so that a word's leading space is part of the
   word's pieces (``"▁the"``), and, when ``add_space_prefix`` is on (SentencePiece's
   ``add_dummy_prefix``), one "▁" goes in front, so a text's first word is spelled like every
   other word.
2. Cut the text into its characters: ``"▁the"`` -> ``▁ t h e``.
3. Merge, again and again, the adjacent pair whose concatenation is a piece with the highest
   score (the leftmost such pair on a tie), until no adjacent pair forms a piece:
   ``▁ t h e`` -> ``▁ t he`` -> ``▁t he`` -> ``▁the`` when "he" scores above "▁t", and "▁t"
   above "▁the". A trainer gives earlier-learned pieces higher scores, so this replays the
   training's merges in order. A heap of candidate pairs keeps it O(n log n) in the length.
4. A character that is not a piece (say an emoji the vocabulary never saw) is spelled by its
   UTF-8 bytes as byte pieces ``<0xF0> <0x9F> <0x98> <0x80>`` when the vocabulary has them
   (*byte fallback*; Llama 2 and Gemma do), or else as the unknown piece ``<unk>`` (one for a
   run of unknown characters).

Pieces have types (the numbers are SentencePiece's and GGUF's): 1 normal; 2 unknown; 3 control
(``<s>``, ``</s>``: never part of ordinary text, so they are gptlab's ``special_tokens``, read
in text only where ``allowed_special`` allows); 4 user-defined (Gemma's ``<start_of_image>``,
runs of newlines or spaces: always read whole, wherever they occur); 5 unused (merging may
form one, and it is kept, as llama.cpp keeps it; SentencePiece would split it back into the two
pieces it was made of); 6 byte.

Allowed special tokens are cut out of the text first and each piece of text between them is
encoded as a text of its own, with its own leading "▁": llama.cpp does this, and so did Meta's
Llama 2 code, which encoded each turn of a chat alone and put ``<s>``/``</s>`` around it.
User-defined pieces are part of the text: they are cut out of the normalised text, as
SentencePiece does. Decoding maps "▁" back to spaces and byte pieces back to bytes, and drops
the space that encoding put in front of each piece of text, so ``decode(encode(t)) == t`` for
any text the vocabulary can spell (one without a "▁" of its own).

``SentencePieceTokenizer.from_model_file`` reads a Hugging Face ``tokenizer.model`` (a
serialised SentencePiece ``ModelProto``) with a small protobuf reader written here; the GGUF
importer builds the same class from a file's ``tokenizer.ggml.*`` metadata. Only BPE models are
read: a Unigram model (T5, ALBERT) is refused in one line.
"""

from __future__ import annotations

import heapq
import math
import os
import re
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptlab.errors import UserError
from gptlab.tokenizers.base import AllowedSpecial, Tokenizer, register
from gptlab.tokenizers.bpe import REPLACEMENT, _without_surrogates

#: what SentencePiece writes for a space, so that spaces are ordinary characters of pieces
SPACE = "\u2581"

# Piece types, numbered as in SentencePiece's ModelProto and in GGUF's tokenizer.ggml.token_type.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
TYPE_NAMES = {NORMAL: "normal", UNKNOWN: "unknown", CONTROL: "control", USER_DEFINED: "user-defined",
              UNUSED: "unused", BYTE: "byte"}
#: the types whose pieces merging may produce (control, unknown and byte pieces never are)
MERGEABLE = (NORMAL, USER_DEFINED, UNUSED)

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

#: words up to this many characters have their ids cached (real text repeats its words)
_CACHED_WORD_CHARS = 64
_WORD_CACHE_LIMIT = 1 << 18


def bpe_segment(text: str, scores: Mapping[str, float]) -> list[str]:
    """Cut ``text`` into pieces by SentencePiece's BPE rule: start from single characters and,
    while some adjacent pair concatenates to a piece of ``scores``, merge the pair whose piece
    scores highest (the leftmost one on a tie). Characters that no merge reaches stay single,
    whether or not they are pieces; the caller decides what they become.

    The current pieces form a linked list over character offsets: the piece starting at ``i``
    ends at ``nxt[i]`` (``-1`` once it has been merged into its left neighbour). A heap holds
    the candidate merges as ``(-score, start, end)``: popping gives the highest score, then the
    smallest start. A candidate whose two pieces have changed since it was pushed (its left
    piece was merged away, or its right piece no longer ends at ``end``) is skipped when popped.
    """
    n = len(text)
    nxt = list(range(1, n + 1))
    prv = list(range(-1, n - 1))
    heap = [(-s, i, i + 2) for i in range(n - 1) if (s := scores.get(text[i : i + 2])) is not None]
    heapq.heapify(heap)

    def push(start: int, end: int) -> None:
        if (s := scores.get(text[start:end])) is not None:
            heapq.heappush(heap, (-s, start, end))

    while heap:
        _, i, end = heapq.heappop(heap)
        mid = nxt[i]
        if mid < 0 or mid >= n or nxt[mid] != end:
            continue  # stale: one of its two pieces has been merged with another since
        nxt[i], nxt[mid] = end, -1  # the right piece joins the left one
        if end < n:
            prv[end] = i
            push(i, nxt[end])
        if prv[i] >= 0:
            push(prv[i], end)
    pieces, i = [], 0
    while i < n:
        pieces.append(text[i : nxt[i]])
        i = nxt[i]
    return pieces


def literal_matcher(strings: Iterable[str]) -> re.Pattern | None:
    """A regex that finds the given strings in a text, the longest where several start at one
    place; None when there are none. The strings become a trie written as nested groups
    (``<s>``, ``<sep>`` -> ``<s(?:>|ep>)``), so a search costs about the same for a vocabulary's
    six thousand control tokens as for three, where a plain ``a|b|c`` alternation would try
    every string at every position."""
    trie: dict[str, Any] = {}
    for s in strings:
        node = trie
        for ch in s:
            node = node.setdefault(ch, {})
        node[""] = {}  # a string ends here

    def pattern(node: dict[str, Any]) -> str:
        branches = [re.escape(ch) + pattern(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        # Where a string also ends here, the longer ones are tried first (a greedy "?").
        return f"(?:{body})?" if "" in node else body

    return re.compile(pattern(trie)) if trie else None


def word_splitter(pieces: Iterable[str]) -> re.Pattern:
    """A zero-width regex for the places where a normalised text can be cut into words that
    encode independently: before a "▁" that follows a character which, in ``pieces``, never
    comes right before a "▁".

    BPE never merges across such a place, because no piece spans it, so each word's merges are
    the same alone as in the whole text (the heap's order within a word does not change). Cut
    there, words repeat and their ids can be cached. Llama 2's pieces never hold "▁" after
    another character except in runs of "▁"; Gemma's have one such piece (``>▁</``)."""
    glued = {p[k - 1] for p in pieces if SPACE in p[1:] for k in range(1, len(p)) if p[k] == SPACE}
    keep_together = re.escape("".join(sorted(glued | {SPACE})))
    return re.compile(f"(?<=[^{keep_together}])(?={SPACE})")


@register
class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece BPE vocabulary: ``pieces[i]`` is the text of id ``i``, ``scores[i]`` its
    merge priority (higher merges first), ``types[i]`` its type (``NORMAL`` ... ``BYTE``).

    ``add_space_prefix`` puts a "▁" before each piece of text (SentencePiece's
    ``add_dummy_prefix``; on for Llama 2 and Mistral, off for Gemma); ``remove_extra_whitespaces``
    first drops leading and trailing spaces and joins runs of spaces into one. ``unk_id`` is the
    id of the unknown piece (default: the piece of type ``UNKNOWN``, if any). Byte fallback is on
    when the vocabulary has all 256 byte pieces ``<0x00>`` ... ``<0xFF>``.
    """

    kind = "sentencepiece"

    def __init__(self, pieces: Sequence[str], scores: Sequence[float] | None = None,
                 types: Sequence[int] | None = None, *, add_space_prefix: bool = True,
                 remove_extra_whitespaces: bool = False, unk_id: int | None = None):
        n = len(pieces)
        self.pieces = [str(p) for p in pieces]
        self.scores = [float(s) for s in (scores if scores is not None else [0.0] * n)]
        self.types = [int(t) for t in (types if types is not None else [NORMAL] * n)]
        if len(self.scores) != n or len(self.types) != n:
            raise ValueError(f"it has {n} pieces but {len(self.scores)} scores and {len(self.types)} types")
        if any(math.isnan(s) for s in self.scores):  # NaN would break the heap's order
            raise ValueError("a score is not a number (NaN)")
        bad = next((i for i, t in enumerate(self.types) if t not in TYPE_NAMES), None)
        if bad is not None:
            raise ValueError(f"piece {bad} has type {self.types[bad]}, which SentencePiece does not define (1-6)")
        self.add_space_prefix = bool(add_space_prefix)
        self.remove_extra_whitespaces = bool(remove_extra_whitespaces)
        if unk_id is None:
            unk_id = next((i for i, t in enumerate(self.types) if t == UNKNOWN), None)
        if unk_id is not None and not 0 <= unk_id < n:
            raise ValueError(f"the unknown token's id {unk_id} is outside the {n} pieces")
        self.unk_id = unk_id

        # Later duplicates win, as in llama.cpp's token table.
        self._scores = {p: s for p, s, t in zip(self.pieces, self.scores, self.types) if t in MERGEABLE}
        self._ids = {p: i for i, (p, t) in enumerate(zip(self.pieces, self.types)) if t in MERGEABLE}
        self._byte_ids = _byte_ids(self.pieces, self.types)
        self.special_tokens = {p: i for i, (p, t) in enumerate(zip(self.pieces, self.types)) if t in (CONTROL, UNKNOWN)}
        # Matched whole in the normalised text, where every space is already a "▁".
        self.user_defined = {p: i for i, (p, t) in enumerate(zip(self.pieces, self.types)) if t == USER_DEFINED}
        self._user_defined_matcher = literal_matcher(self.user_defined)
        self._special_matchers: dict[frozenset[str], re.Pattern | None] = {}
        self._control_ids = {i for i, t in enumerate(self.types) if t == CONTROL}
        self._words = word_splitter(self._scores)
        self._word_cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    @property
    def mergeable_scores(self) -> Mapping[str, float]:
        """The pieces that merging can form, and their scores."""
        return self._scores

    def piece_id(self, piece: str) -> int:
        """The id of a piece that merging can form."""
        return self._ids[piece]

    @property
    def byte_fallback(self) -> bool:
        """Whether characters outside the vocabulary are spelled as byte pieces."""
        return self._byte_ids is not None

    # --- encoding -------------------------------------------------------------------------

    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        allowed = self._allowed(allowed_special)
        key = frozenset(allowed)
        if key not in self._special_matchers:
            self._special_matchers[key] = literal_matcher(allowed)
        ids: list[int] = []
        for token_id, fragment in _cut(_without_surrogates(text), self._special_matchers[key], self.special_tokens):
            if token_id is not None:
                ids.append(token_id)
            else:
                ids.extend(self._encode_fragment(fragment))
        return ids

    def _encode_fragment(self, text: str) -> list[int]:
        """The ids of a piece of text with no special tokens in it: normalise it, cut out the
        user-defined pieces, encode each word of the rest. A run of unknown characters becomes
        one unknown token."""
        if self.remove_extra_whitespaces:
            text = " ".join(word for word in text.split(" ") if word)
        if not text:
            return []
        if self.add_space_prefix:
            text = " " + text
        ids: list[int] = []
        for user_defined_id, part in _cut(text.replace(" ", SPACE), self._user_defined_matcher, self.user_defined):
            part_ids = [user_defined_id] if user_defined_id is not None else self._encode_words(part)
            for token_id in part_ids:
                if not (token_id == self.unk_id and ids and ids[-1] == token_id):
                    ids.append(token_id)
        return ids

    def _encode_words(self, text: str) -> Iterator[int]:
        for word in self._words.split(text):
            yield from self._encode_word(word)

    def _encode_word(self, word: str) -> list[int]:
        cached = self._word_cache.get(word)
        if cached is not None:
            return cached
        ids: list[int] = []
        for piece in bpe_segment(word, self._scores):
            token_id = self._ids.get(piece)
            if token_id is not None:
                ids.append(token_id)
            elif self._byte_ids is not None:
                ids.extend(self._byte_ids[b] for b in piece.encode("utf-8"))
            elif self.unk_id is not None:
                ids.append(self.unk_id)
            else:
                raise UserError(f"this SentencePiece vocabulary cannot spell {piece!r}: it has neither byte pieces nor "
                                "an unknown token; remove the character from the text")
        if len(word) <= _CACHED_WORD_CHARS:
            if len(self._word_cache) >= _WORD_CACHE_LIMIT:
                self._word_cache.clear()
            self._word_cache[word] = ids
        return ids

    # --- decoding -------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token: its piece with "▁" as spaces, a byte piece's byte, a special
        token's own string. The space a text's first piece carries is kept (see ``decode``)."""
        if not 0 <= token_id < len(self.pieces):
            raise UserError(f"token id {token_id} is outside this tokenizer's ids 0..{len(self.pieces) - 1}")
        piece, kind = self.pieces[token_id], self.types[token_id]
        if kind == BYTE and (m := _BYTE_PIECE.fullmatch(piece)):
            return bytes([int(m.group(1), 16)])
        if kind in (CONTROL, UNKNOWN):
            return piece.encode("utf-8")
        return piece.replace(SPACE, " ").encode("utf-8")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The tokens' bytes one after another, each as ``token_bytes`` gives it: what a stream
        of tokens shows, so "▁world" after "▁Hello" is " world"."""
        n = len(self.pieces)
        return b"".join(self.token_bytes(i) if 0 <= i < n else REPLACEMENT for i in ids)

    def decode(self, ids: Sequence[int]) -> str:
        """The text ``ids`` encode: with ``add_space_prefix``, the space that encoding put in
        front of the text, and after each control token, is dropped again."""
        if not self.add_space_prefix:
            return super().decode(ids)
        parts, text_starts, n = [], True, len(self.pieces)
        for i in ids:
            if not 0 <= i < n:
                parts.append(REPLACEMENT)
                continue
            raw = self.token_bytes(i)
            if i in self._control_ids:
                text_starts = True
            elif text_starts:
                raw, text_starts = raw.removeprefix(b" "), False
            parts.append(raw)
        return b"".join(parts).decode("utf-8", errors="replace")

    # --- saving and loading ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"pieces": self.pieces, "scores": self.scores, "types": self.types,
                "add_space_prefix": self.add_space_prefix, "remove_extra_whitespaces": self.remove_extra_whitespaces,
                "unk_id": self.unk_id}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SentencePieceTokenizer":
        try:
            return cls(d["pieces"], d["scores"], d["types"], add_space_prefix=d.get("add_space_prefix", True),
                       remove_extra_whitespaces=d.get("remove_extra_whitespaces", False), unk_id=d.get("unk_id"))
        except (KeyError, TypeError, ValueError) as e:
            what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise UserError(f"the SentencePiece tokenizer description is invalid ({what}); "
                            "was it saved by gptlab?") from None

    @classmethod
    def from_model_file(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
        """Read a SentencePiece ``tokenizer.model`` (a BPE model; others are refused)."""
        path = Path(path)
        try:
            model = read_model_proto(path.read_bytes())
        except FileNotFoundError:
            raise UserError(f"SentencePiece model {path} does not exist") from None
        except (ValueError, OSError) as e:  # UnicodeDecodeError is a ValueError
            raise UserError(f"{path} cannot be read as a SentencePiece model ({str(e)[:160]}); the file is "
                            "truncated, damaged or not a tokenizer.model") from None
        problem = model.unsupported()
        if problem:
            raise UserError(f"{path} is a SentencePiece model of an unsupported kind ({problem}); gptlab reads "
                            "BPE models with SentencePiece's plain text handling (Llama 2, Mistral, Gemma)")
        try:
            return cls(model.pieces, model.scores, model.types, add_space_prefix=model.add_dummy_prefix,
                       remove_extra_whitespaces=model.remove_extra_whitespaces)
        except ValueError as e:
            raise UserError(f"{path}: the SentencePiece vocabulary is inconsistent ({e}); "
                            "the file is damaged") from None


def _cut(text: str, matcher: re.Pattern | None, ids: Mapping[str, int]) -> Iterator[tuple[int | None, str]]:
    """``(id, string)`` for each string ``matcher`` finds in ``text`` (its id from ``ids``) and
    ``(None, text)`` for each stretch of text around them."""
    start = 0
    for m in matcher.finditer(text) if matcher is not None else ():
        if m.start() > start:
            yield None, text[start : m.start()]
        yield ids[m.group()], m.group()
        start = m.end()
    if start < len(text):
        yield None, text[start:]


def _byte_ids(pieces: Sequence[str], types: Sequence[int]) -> list[int] | None:
    """Byte value -> id of its byte piece ``<0xNN>``, when the vocabulary has all 256; None when
    it has none (no byte fallback). Some but not all, or a byte piece spelled otherwise, is an error."""
    found: dict[int, int] = {}
    for i, (piece, kind) in enumerate(zip(pieces, types)):
        if kind == BYTE:
            m = _BYTE_PIECE.fullmatch(piece)
            if m is None:
                raise ValueError(f"piece {i} ({piece[:20]!r}) has the byte type but is not spelled <0xNN>")
            found.setdefault(int(m.group(1), 16), i)
    if not found:
        return None
    if len(found) < 256:
        raise ValueError(f"it has {len(found)} of the 256 byte pieces <0x00>..<0xFF>; byte fallback needs all")
    return [found[b] for b in range(256)]


# --- reading a tokenizer.model: a serialised SentencePiece ModelProto ------------------------
#
# Protobuf writes a message as a run of fields, each a key and a value. The key is a varint
# (7 bits a byte, low bits first, the top bit set on all bytes but the last) holding
# ``field_number << 3 | wire_type``; the wire type says how the value is stored: 0 a varint,
# 1 eight bytes, 2 a varint length and that many bytes (strings, and messages inside messages),
# 5 four bytes (a float). A field absent from the file has its default value.

MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``data[pos:]`` and the position after it."""
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("a number runs past the end of the data")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("a number is longer than protobuf allows")


def protobuf_fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """``(field number, value)`` for each field of a serialised message, in file order: an int
    for a varint, the raw bytes for the other wire types (a nested message is parsed again)."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, value
            continue
        if wire == 2:
            size, pos = _varint(data, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
        else:
            raise ValueError(f"field {number} has wire type {wire}, which a SentencePiece model never uses")
        if number == 0 or pos + size > len(data):
            raise ValueError(f"field {number} runs past the end of the data" if number else "a field has number 0")
        yield number, data[pos : pos + size]
        pos += size


def _message(value: int | bytes) -> bytes:
    if not isinstance(value, bytes):
        raise ValueError("a nested message is stored as a number")
    return value


def _number(value: int | bytes) -> int:
    if not isinstance(value, int):
        raise ValueError("a number field is stored as bytes")
    return value


@dataclass
class ModelProto:
    """The fields of SentencePiece's ``ModelProto`` that encoding needs, with protobuf's defaults."""

    pieces: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    has_trainer_spec: bool = False  # pieces, trainer_spec, normalizer_spec are written in this order,
    has_normalizer_spec: bool = False  # so a file cut off at a field's end lacks the later ones
    model_type: int = 1  # trainer_spec (2) field 3: UNIGRAM unless the file says otherwise
    byte_fallback: bool = False  # trainer_spec field 35
    treat_whitespace_as_suffix: bool = False  # trainer_spec field 24
    normalizer_name: str = ""  # normalizer_spec (3) field 1
    precompiled_charsmap: bytes = b""  # normalizer_spec field 2: a table for a non-identity normaliser
    add_dummy_prefix: bool = True  # normalizer_spec field 3
    remove_extra_whitespaces: bool = True  # normalizer_spec field 4
    escape_whitespaces: bool = True  # normalizer_spec field 5

    def unsupported(self) -> str | None:
        """What in this model gptlab does not implement, or None."""
        if self.model_type != 2:
            return f"a {MODEL_TYPES.get(self.model_type, f'type {self.model_type}')} model, not BPE"
        if self.precompiled_charsmap and self.normalizer_name != "identity":
            return f"its text normaliser {self.normalizer_name or 'custom'!r} rewrites characters"
        if self.treat_whitespace_as_suffix or not self.escape_whitespaces:
            return "it does not write spaces as a '▁' in front of words"
        return None


def read_model_proto(data: bytes) -> ModelProto:
    """Parse a ``tokenizer.model``; a damaged or foreign file raises ValueError."""
    model = ModelProto()
    for number, value in protobuf_fields(data):
        if number == 1:  # repeated SentencePiece {1: piece, 2: score, 3: type}
            piece, score, kind = "", 0.0, NORMAL
            for n, v in protobuf_fields(_message(value)):
                if n == 1:
                    piece = _message(v).decode("utf-8")
                elif n == 2:
                    if not isinstance(v, bytes) or len(v) != 4:
                        raise ValueError("a piece's score is not a 4-byte float")
                    score = struct.unpack("<f", v)[0]
                elif n == 3:
                    kind = _number(v)
            model.pieces.append(piece)
            model.scores.append(score)
            model.types.append(kind)
        elif number == 2:
            model.has_trainer_spec = True
            _read_trainer_spec(model, _message(value))
        elif number == 3:
            model.has_normalizer_spec = True
            _read_normalizer_spec(model, _message(value))
    if not model.pieces:
        raise ValueError("it holds no pieces")
    if not (model.has_trainer_spec and model.has_normalizer_spec):
        raise ValueError("it ends before its trainer and normaliser settings")
    if model.byte_fallback != any(t == BYTE for t in model.types):
        raise ValueError("its byte_fallback setting and its byte pieces disagree")
    return model


def _read_trainer_spec(model: ModelProto, data: bytes) -> None:
    for n, v in protobuf_fields(data):
        if n == 3:
            model.model_type = _number(v)
        elif n == 24:
            model.treat_whitespace_as_suffix = bool(_number(v))
        elif n == 35:
            model.byte_fallback = bool(_number(v))


def _read_normalizer_spec(model: ModelProto, data: bytes) -> None:
    for n, v in protobuf_fields(data):
        if n == 1:
            model.normalizer_name = _message(v).decode("utf-8")
        elif n == 2:
            model.precompiled_charsmap = _message(v)
        elif n in (3, 4, 5):
            setattr(model, {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}[n],
                    bool(_number(v)))
