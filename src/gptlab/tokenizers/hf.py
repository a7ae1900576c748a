"""Hugging Face tokenizers: a ``tokenizer.json`` run through the ``tokenizers`` library.

Imported models bring their own tokenizer. Rather than re-implement every normaliser and
pre-tokeniser in the zoo, gptlab wraps the ``tokenizers`` library behind the same interface
as its own tokenizers, so ids are Hugging Face's by construction. The wrapped file is kept
verbatim: a checkpoint's ``tokenizer.json`` is then a file both gptlab and ``transformers``
read.

``to_hf_json`` goes the other way for gptlab's own tokenizers (byte-level BPE and
character level), so an exported from-scratch model loads with ``AutoTokenizer``.
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
    elif isinstance(tokenizer, CharTokenizer):
        hf = _HF(models.WordLevel(vocab={c: i for i, c in enumerate(tokenizer.chars)}, unk_token=None))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        hf.decoder = decoders.Fuse()
    else:
        raise UserError(f"cannot convert a {type(tokenizer).__name__} to a Hugging Face tokenizer")
    d = json.loads(hf.to_str())
    d["added_tokens"] = [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True} for s, i in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
    ]
    return d
