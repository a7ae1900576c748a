"""Tokenizers: character level, byte-level BPE trained from scratch, and GPT-2's vocabulary.

``build_tokenizer(spec, text)`` turns a command-line spec into a tokenizer:
``char`` | ``bpe:N`` | ``gpt2`` | ``gpt2:FOLDER`` | a path to a saved tokenizer JSON file.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from gptlab.errors import UserError
from gptlab.tokenizers.base import Tokenizer, load_tokenizer_file, tokenizer_from_dict
from gptlab.tokenizers.bpe import BPETokenizer
from gptlab.tokenizers.char import CharTokenizer
from gptlab.tokenizers.gpt2 import gpt2_tokenizer
from gptlab.tokenizers.hf import HFTokenizer, to_hf_json

__all__ = [
    "BPETokenizer",
    "CharTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "gpt2_tokenizer",
    "load_tokenizer_file",
    "to_hf_json",
    "tokenizer_from_dict",
]

SPEC_HELP = ("char | bpe:VOCAB_SIZE | gpt2 | gpt2:FOLDER (holding encoder.json and vocab.bpe) | "
             "PATH to a tokenizer .json saved by gptlab")


def build_tokenizer(spec: str, text: str | Callable[[], str] | None = None) -> Tokenizer:
    """Make the tokenizer named by ``spec``; ``char`` and ``bpe:N`` are trained on ``text``.

    ``text`` may be a callable so that specs that need no training text never read it.
    """
    def training_text() -> str:
        t = text() if callable(text) else text
        if not t:
            raise UserError(f"tokenizer {spec!r} is trained on the corpus, but the corpus is empty")
        return t

    if spec == "char":
        return CharTokenizer.train(training_text())
    if spec == "gpt2":
        return gpt2_tokenizer()
    if spec.startswith("gpt2:"):
        return gpt2_tokenizer(spec[5:])
    if spec.startswith("bpe:"):
        try:
            vocab_size = int(spec[4:])
        except ValueError:
            raise UserError(f"--tokenizer {spec!r}: expected bpe:VOCAB_SIZE such as bpe:4096") from None
        return BPETokenizer.train(training_text(), vocab_size=vocab_size, special_tokens=["<|endoftext|>"])
    if os.path.exists(spec):
        return load_tokenizer_file(spec)
    raise UserError(f"--tokenizer {spec!r} is neither a known kind nor an existing file; use {SPEC_HELP}")
