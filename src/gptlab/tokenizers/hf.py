"""Hugging Face tokenizers: a ``tokenizer.json`` run through the ``tokenizers`` library.

Imported models bring their own tokenizer. Rather than re-implement every normaliser and
pre-tokeniser in the zoo, gptlab wraps the ``tokenizers`` library behind the same interface
as its own tokenizers, so ids are Hugging Face's by construction. The wrapped file is kept
verbatim: a checkpoint's ``tokenizer.json`` is then a file both gptlab and ``transformers``
read.

``to_hf_json`` goes the other way for gptlab's own tokenizers (byte-level BPE, character
level, and SentencePiece vocabularies such as Gemma's read from a GGUF), so an exported model
loads with ``AutoTokenizer``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from gptlab.errors import UserError, is_rust_panic
from gptlab.tokenizers.base import AllowedSpecial, Tokenizer, register


@register
class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` behind gptlab's interface."""

    kind = "hf"

    def __init__(self, hf_json: dict[str, Any]):
        self.hf_json = hf_json
        self._tok = _load(hf_json)
        self.special_tokens = {t["content"]: t["id"] for t in hf_json.get("added_tokens", []) if t.get("special")}
        # The library matches special-token strings anywhere in the text. gptlab encodes them
        # as ordinary text unless allowed, so plain text goes through a copy that has no
        # special tokens at all; allowed ones are cut out first (Tokenizer._split_special).
        plain = dict(hf_json, added_tokens=[t for t in hf_json.get("added_tokens", []) if not t.get("special")])
        self._plain = _load(plain) if self.special_tokens else self._tok
        self._byte_level = _uses_byte_level(hf_json)
        self._id_to_piece = {i: t for t, i in self._tok.get_vocab(with_added_tokens=True).items()}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        ids: list[int] = []
        for special, piece in self._split_special(text, allowed_special):
            if special:
                ids.append(self.special_tokens[piece])
            else:
                # add_special_tokens=False: no BOS/EOS from a post-processor; callers add them.
                with _damaged_file_errors("encoding"):
                    ids.extend(self._plain.encode(piece, add_special_tokens=False).ids)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        piece = self._id_to_piece.get(token_id)
        if piece is None:
            return "\ufffd".encode()
        if piece in self.special_tokens:
            return piece.encode("utf-8")
        if self._byte_level:
            from gptlab.tokenizers.bpe import parse_token

            try:
                return parse_token(piece)
            except (KeyError, ValueError):
                return piece.encode("utf-8")
        with _damaged_file_errors("decoding"):
            return self._tok.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        if self._byte_level:
            return b"".join(self.token_bytes(i) for i in ids)
        return self.decode(ids).encode("utf-8")

    def decode(self, ids: Sequence[int]) -> str:
        if self._byte_level:
            return super().decode(ids)  # from the raw bytes, invalid UTF-8 replaced
        n = self.vocab_size
        with _damaged_file_errors("decoding"):
            return self._tok.decode([i for i in ids if 0 <= i < n], skip_special_tokens=False)

    def to_dict(self) -> dict[str, Any]:
        return {"tokenizer": self.hf_json}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HFTokenizer":
        return cls(d["tokenizer"] if "tokenizer" in d else d)

    def save(self, path) -> None:
        """Write the Hugging Face file itself, so transformers reads it too."""
        from gptlab.cache import atomic_write_json

        atomic_write_json(path, self.hf_json)


def _load(hf_json: dict[str, Any]):
    from tokenizers import Tokenizer as _HF

    # A file may switch on padding or truncation (MiniLM pads everything to 128); encode() must
    # return a text's own ids, so those stay off here and batching code pads explicitly.
    hf_json = {**hf_json, "padding": None, "truncation": None}
    with _damaged_file_errors("loading"):
        return _HF.from_str(json.dumps(hf_json))


@contextmanager
def _damaged_file_errors(doing: str) -> Iterator[None]:
    """The library's errors on a malformed file (a bare Exception) and its panics on a damaged
    one that it accepted (see ``is_rust_panic``) as one UserError line."""
    try:
        yield
    except BaseException as e:
        if not (isinstance(e, Exception) or is_rust_panic(e)) or isinstance(e, UserError):
            raise
        detail = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"the Hugging Face tokenizer failed while {doing} ({detail}); "
                        "the tokenizer file is damaged or not one the tokenizers library reads") from None


def _uses_byte_level(hf_json: dict[str, Any]) -> bool:
    decoder = hf_json.get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(p.get("type") == "ByteLevel" for p in parts)


def to_hf_json(tokenizer: Tokenizer) -> dict[str, Any]:
    """A Hugging Face tokenizer.json equivalent to one of gptlab's tokenizers."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as _HF

    from gptlab.tokenizers.bpe import BPETokenizer, render_token
    from gptlab.tokenizers.char import CharTokenizer
    from gptlab.tokenizers.sentencepiece import SentencePieceTokenizer

    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.hf_json
    if isinstance(tokenizer, BPETokenizer):
        by_id = sorted(tokenizer.ranks.items(), key=lambda kv: kv[1])
        vocab = {render_token(b): i for b, i in by_id}
        tokens = [render_token(b) for b, _ in by_id]
        merges = [(tokens[a], tokens[b]) for a, b in (tokenizer.merges or [])]
        hf = _HF(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        # Our regex splits first, then bytes map to GPT-2's printable characters.
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        hf.decoder = decoders.ByteLevel()
    elif isinstance(tokenizer, SentencePieceTokenizer):
        return _sentencepiece_json(tokenizer)
    elif isinstance(tokenizer, CharTokenizer):
        hf = _HF(models.WordLevel(vocab={c: i for i, c in enumerate(tokenizer.chars)}, unk_token=None))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        hf.decoder = decoders.Fuse()
    else:
        raise UserError(f"cannot convert a {type(tokenizer).__name__} to a Hugging Face tokenizer")
    d = json.loads(hf.to_str())
    d["added_tokens"] = [_added_token(s, i, special=True)
                         for s, i in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])]
    return d


def _added_token(content: str, token_id: int, special: bool, normalized: bool = False) -> dict[str, Any]:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": normalized, "special": special}


def sentencepiece_merges(tokenizer) -> list[tuple[str, str]]:
    """SentencePiece's scores as a list of merges, for a BPE that ranks merges instead: every
    way of cutting a piece into two pieces, the pieces taken from the highest score down (ties
    by id), so the pair that SentencePiece would join first has the lowest rank."""
    scores = tokenizer.mergeable_scores
    order = sorted(scores, key=lambda piece: (-scores[piece], tokenizer.piece_id(piece)))
    return [(piece[:k], piece[k:]) for piece in order for k in range(1, len(piece))
            if piece[:k] in scores and piece[k:] in scores]


def _sentencepiece_json(tokenizer) -> dict[str, Any]:
    """A SentencePiece BPE vocabulary as the ``tokenizers`` library writes Llama 2's and Gemma's:
    spaces become "▁" (and one "▁" goes in front of the text with ``add_space_prefix``), the
    text is one word for BPE, byte pieces spell what the pieces cannot; control pieces are
    special added tokens, user-defined pieces ordinary added tokens found in the normalised text.
    Like transformers' own conversion, it puts no "▁" in front of text that follows an added
    token (gptlab does, as SentencePiece does)."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as _HF

    from gptlab.tokenizers.sentencepiece import CONTROL, SPACE, UNKNOWN, USER_DEFINED

    vocab: dict[str, int] = {}
    for i, piece in enumerate(tokenizer.pieces):
        vocab.setdefault(piece, i)
    unk = tokenizer.pieces[tokenizer.unk_id] if tokenizer.unk_id is not None else None
    hf = _HF(models.BPE(vocab=vocab, merges=sentencepiece_merges(tokenizer), unk_token=unk, fuse_unk=True,
                        byte_fallback=tokenizer.byte_fallback))
    steps = [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    # Spaces become "▁" in the normaliser, so user-defined pieces with a "▁" are found there.
    hf.normalizer = normalizers.Sequence([*(steps if tokenizer.remove_extra_whitespaces else []),
                                          normalizers.Replace(" ", SPACE)])
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, split=False,
                                                prepend_scheme="first" if tokenizer.add_space_prefix else "never")
    parts = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if tokenizer.add_space_prefix:
        parts.append(decoders.Strip(" ", 1, 0))
    hf.decoder = decoders.Sequence(parts)
    d = json.loads(hf.to_str())
    d["added_tokens"] = [
        _added_token(piece, i, special=kind in (CONTROL, UNKNOWN), normalized=kind == USER_DEFINED)
        for i, (piece, kind) in enumerate(zip(tokenizer.pieces, tokenizer.types))
        if kind in (CONTROL, UNKNOWN, USER_DEFINED)]
    return d
