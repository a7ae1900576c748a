"""Tokenizers: character level, byte-level BPE trained from scratch, GPT-2's vocabulary, Hugging
Face tokenizer.json files and SentencePiece BPE models (Llama 2, Mistral, Gemma).

``build_tokenizer(spec, text)`` turns a command-line spec into a tokenizer:
``char`` | ``bpe:N`` | ``gpt2`` | ``gpt2:FOLDER`` | a path to a tokenizer file (a JSON file
saved by gptlab, a Hugging Face tokenizer.json, or a SentencePiece tokenizer.model).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from gptlab.errors import UserError
from gptlab.tokenizers.base import Tokenizer, tokenizer_from_dict
from gptlab.tokenizers.base import load_tokenizer_file as load_tokenizer_json
from gptlab.tokenizers.bpe import BPETokenizer
from gptlab.tokenizers.char import CharTokenizer
from gptlab.tokenizers.gpt2 import gpt2_tokenizer
from gptlab.tokenizers.hf import HFTokenizer, to_hf_json
from gptlab.tokenizers.sentencepiece import SentencePieceTokenizer

__all__ = [
    "BPETokenizer",
    "CharTokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "gpt2_tokenizer",
    "load_tokenizer_file",
    "to_hf_json",
    "tokenizer_file_in",
    "tokenizer_from_dict",
]

SPEC_HELP = ("char | bpe:VOCAB_SIZE | gpt2 | gpt2:FOLDER (holding encoder.json and vocab.bpe) | "
             "PATH to a tokenizer .json (gptlab's or Hugging Face's) or a SentencePiece tokenizer.model")

#: the tokenizer files a Hugging Face model directory may hold, the preferred one first
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def load_tokenizer_file(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer file: a SentencePiece model (``*.model``, such as a Hugging Face
    directory's ``tokenizer.model``), or else JSON: a tokenizer saved by ``Tokenizer.save`` or
    a Hugging Face ``tokenizer.json``."""
    if Path(path).suffix == ".model":
        return SentencePieceTokenizer.from_model_file(path)
    return load_tokenizer_json(path)


def tokenizer_file_in(folder: str | os.PathLike) -> Path | None:
    """The tokenizer file of a model directory: ``tokenizer.json`` where there is one (it says
    everything, special tokens included), else a SentencePiece ``tokenizer.model``; None if neither."""
    return next((Path(folder) / name for name in HF_TOKENIZER_FILES if (Path(folder) / name).is_file()), None)


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
