"""Loss, perplexity and bits per byte of a model on a whole text (``gptlab eval --corpus``).

The text is tokenized once and read in windows of at most ``window`` input tokens (the model's
block size by default, or fewer where its vocabulary is large: ``DEFAULT_WINDOW_LOGITS``). Every
token after the first is predicted exactly once:

- non-overlapping (the default, stride = window): window k reads tokens [kW, kW + W) and
  predicts [kW + 1, kW + W], so a window's first token was the previous window's last target;
- sliding (``stride`` S < W): windows start every S tokens and each scores only the tokens no
  earlier window scored, so after the first window every token is predicted with at least
  W - S + 1 tokens of context (as in Hugging Face's perplexity guide), at about W / S times the cost.

A model that reads a BOS token before its text (Gemma, Llama 2: ``chat_template.bos_id``) gets
one before every window, as it was trained; the BOS takes one of the W inputs, the first token
is predicted too (from the BOS), and by default windows start every W - 1 tokens, so that a
window's first token is again the previous window's last target.

Bits per byte divide the total negative log-likelihood, in bits, by the UTF-8 bytes of the text:
a quantity of the text, not of the vocabulary, so char, BPE and pretrained models compare on it
(loss per token and perplexity do not: a token is a character for one and a word for another).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from gptlab.errors import UserError
from gptlab.inference.eval_scoring import Row, Scorer, encode_exactly
from gptlab.tokenizers import Tokenizer


@dataclass(frozen=True)
class Window:
    """Tokens [start, stop) of the text in one forward pass; the last ``n_scored`` are predicted."""

    start: int
    stop: int
    n_scored: int


def plan_windows(n_tokens: int, window: int, stride: int, bos: bool = False) -> list[Window]:
    """The windows that predict tokens 1 .. n_tokens - 1 once each (see the module docstring);
    with ``bos``, each window is read after a BOS, which takes one of its ``window`` inputs and
    lets the first window predict token 0 too."""
    if not 1 <= stride <= window:
        raise ValueError(f"stride {stride} must be between 1 and the window {window}")
    windows, start, done = [], 0, 0 if bos else 1  # done: the first token not yet predicted
    while done < n_tokens:
        stop = min(start + window + (0 if bos else 1), n_tokens)
        windows.append(Window(start, stop, stop - done))
        done, start = stop, start + stride
    return windows


@dataclass(frozen=True)
class TextResult:
    tokens: int
    """tokens of the whole text"""
    predicted: int
    """tokens scored: every one after the first (fewer with ``limit``)"""
    bytes: int
    """UTF-8 bytes of the text those tokens cover"""
    windows: int
    window: int
    stride: int
    nats: float
    """total negative log-likelihood of the predicted tokens"""

    @property
    def loss(self) -> float:
        """nats per predicted token"""
        return self.nats / self.predicted

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / self.bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


#: the most logits (float32: 2 GiB) a window of the default size makes: a model with a large
#: vocabulary and a long context (Gemma 3's 262,144 tokens and 32,768 positions) is read in
#: shorter windows (2,048 tokens) unless --window says otherwise
DEFAULT_WINDOW_LOGITS = 1 << 29


def check_window(block_size: int, window: int | None, stride: int | None, bos: bool = False,
                 vocab_size: int = 1) -> tuple[int, int]:
    """``(window, stride)`` with their defaults: the block size (at most ``DEFAULT_WINDOW_LOGITS``
    logits of ``vocab_size``), and windows that overlap by the one token a window's first target
    is predicted from (by the BOS alone otherwise, with ``bos``)."""
    window = min(block_size, max(DEFAULT_WINDOW_LOGITS // vocab_size, 1)) if window is None else window
    if window > block_size:
        raise UserError(f"--window {window} is more than the model's context of {block_size} tokens; give at most "
                        f"{block_size}")
    if stride is None:
        stride = max(window - 1, 1) if bos else window
    if stride > window:
        raise UserError(f"--stride {stride} is more than the window of {window} tokens, so the tokens between "
                        f"windows would never be predicted; give a stride of at most {window}")
    return window, stride


def evaluate_text(scorer: Scorer, tokenizer: Tokenizer, text: str, name: str, window: int | None = None,
                  stride: int | None = None, limit: int | None = None) -> TextResult:
    """Score ``text`` (called ``name`` in errors) in windows, each after the model's BOS where it
    reads one (``scorer.bos_id``); ``limit`` keeps the first windows only."""
    bos = scorer.bos_id
    window, stride = check_window(scorer.block_size, window, stride, bos is not None, scorer.model.config.vocab_size)
    ids = encode_exactly(tokenizer, text, name)
    needed = 1 if bos is not None else 2  # a token to predict, and one (or the BOS) to predict it from
    if len(ids) < needed:
        raise UserError(f"{name} is {len(ids)} token(s) long as the model's tokenizer splits it, too short for one "
                        f"window: at least {needed} are needed to predict one; give a longer text")
    plan = plan_windows(len(ids), window, stride, bos is not None)[:limit]
    head = [] if bos is None else [bos]
    rows = [Row(head + ids[w.start : w.stop], w.n_scored) for w in plan]
    logliks = scorer.score(rows, desc="eval text", unit="window")
    covered = plan[-1].stop
    return TextResult(tokens=len(ids), predicted=covered - (1 if bos is None else 0),
                      bytes=covered_bytes(tokenizer, text, ids, covered), windows=len(plan), window=window,
                      stride=stride, nats=-sum(logliks))


def covered_bytes(tokenizer: Tokenizer, text: str, ids: list[int], covered: int) -> int:
    """The UTF-8 bytes of the text that its first ``covered`` tokens spell: the whole text's when
    all are. A token's bytes (``decode_bytes``) can hold more than the text: the space that a
    SentencePiece vocabulary puts in front of it (Llama 2's), which is not the text's."""
    added = len(tokenizer.decode_bytes(ids)) - len(text.encode("utf-8"))
    return len(tokenizer.decode_bytes(ids[:covered])) - added
