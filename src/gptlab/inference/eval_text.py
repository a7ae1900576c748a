"""Loss, perplexity and bits per byte of a model on a whole text (``gptlab eval --corpus``).

The text is tokenized once and read in windows of at most ``window`` input tokens (the model's
block size by default). Every token after the first is predicted exactly once:

- non-overlapping (the default, stride = window): window k reads tokens [kW, kW + W) and
  predicts [kW + 1, kW + W], so a window's first token was the previous window's last target;
- sliding (``stride`` S < W): windows start every S tokens and each scores only the tokens no
  earlier window scored, so after the first window every token is predicted with at least
  W - S + 1 tokens of context (as in Hugging Face's perplexity guide), at about W / S times the cost.

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


def plan_windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """The windows that predict tokens 1 .. n_tokens - 1 once each (see the module docstring)."""
    if not 1 <= stride <= window:
        raise ValueError(f"stride {stride} must be between 1 and the window {window}")
    windows, start, done = [], 0, 1  # done: the first token not yet predicted
    while done < n_tokens:
        stop = min(start + window + 1, n_tokens)
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


def check_window(block_size: int, window: int | None, stride: int | None) -> tuple[int, int]:
    """``(window, stride)`` with their defaults (the block size; non-overlapping windows)."""
    window = block_size if window is None else window
    if window > block_size:
        raise UserError(f"--window {window} is more than the model's context of {block_size} tokens; give at most "
                        f"{block_size}")
    stride = window if stride is None else stride
    if stride > window:
        raise UserError(f"--stride {stride} is more than the window of {window} tokens, so the tokens between "
                        f"windows would never be predicted; give a stride of at most {window}")
    return window, stride


def evaluate_text(scorer: Scorer, tokenizer: Tokenizer, text: str, name: str, window: int | None = None,
                  stride: int | None = None, limit: int | None = None) -> TextResult:
    """Score ``text`` (called ``name`` in errors) in windows; ``limit`` keeps the first windows only."""
    window, stride = check_window(scorer.block_size, window, stride)
    ids = encode_exactly(tokenizer, text, name)
    if len(ids) < 2:
        raise UserError(f"{name} is {len(ids)} token(s) long as the model's tokenizer splits it, too short for one "
                        "window: at least 2 tokens are needed to predict one; give a longer text")
    plan = plan_windows(len(ids), window, stride)[:limit]
    rows = [Row(ids[w.start : w.stop], w.n_scored) for w in plan]
    logliks = scorer.score(rows, desc="eval text", unit="window")
    covered = plan[-1].stop
    # The bytes of the tokens read; the whole text's when nothing is left out, since
    # encode_exactly checked that the tokens decode to the text.
    n_bytes = len(tokenizer.decode_bytes(ids[:covered]))
    return TextResult(tokens=len(ids), predicted=covered - 1, bytes=n_bytes, windows=len(plan), window=window,
                      stride=stride, nats=-sum(logliks))
