"""Multiple choice by log-likelihood (``gptlab eval --choices FILE``), as lm-evaluation-harness
scores HellaSwag, ARC, PIQA and the like, so that the same records give the same numbers.

A record is ``{"context": str, "endings": [str, ...], "label": int}``, one per line. Each ending
is scored as the continuation ``" " + ending`` of the context (the harness's default
``target_delimiter``), tokenized the harness's way (``_encode_pair``): whitespace that ends the
context moves to the front of the continuation, the context and context + continuation are
tokenized, and the continuation's tokens are those of the whole after the context's. A model
that reads a BOS token before its text (``chat_template.bos_id``) gets one in front, as the
harness gives it; no other is added. Then

- ``acc``: the ending with the highest summed log-likelihood is the label;
- ``acc_norm``: the same after dividing each log-likelihood by the ending's length. The harness's
  code divides by ``len(choice)`` of the Python string, its characters (its documentation says
  bytes, which is the same for ASCII text such as HellaSwag's and ARC's); we use characters, as
  its code does, so the numbers match it for every text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gptlab.errors import UserError, is_int
from gptlab.inference.eval_scoring import Row, Scorer, continuation_row, encode_exactly, jsonl_file_records
from gptlab.tokenizers import Tokenizer

EXAMPLE = '{"context": "The man opens the door", "endings": ["and walks in.", "of the sky."], "label": 0}'


@dataclass(frozen=True)
class ChoiceItem:
    where: str
    """FILE:LINE of the record"""
    context: str
    endings: list[str]
    label: int


def read_choices(path: str | Path) -> list[ChoiceItem]:
    """The records of a multiple-choice JSONL file, each checked, errors named by FILE:LINE."""
    return [_check_record(value, where) for where, value in jsonl_file_records(path, EXAMPLE)]


def _check_record(value: Any, where: str) -> ChoiceItem:
    if not isinstance(value, dict) or not {"context", "endings", "label"} <= set(value):
        raise UserError(f"{where}: expected an object with 'context', 'endings' and 'label', such as {EXAMPLE}")
    context, endings, label = value["context"], value["endings"], value["label"]
    if not isinstance(context, str) or not context.strip():
        raise UserError(f"{where}: 'context' must be a non-empty string")
    if not isinstance(endings, list) or not all(isinstance(e, str) and e for e in endings):
        raise UserError(f"{where}: 'endings' must be a list of non-empty strings")
    if len(endings) < 2:
        raise UserError(f"{where}: {len(endings)} ending(s); a choice needs at least two")
    if not is_int(label) or not 0 <= label < len(endings):
        raise UserError(f"{where}: 'label' must be the index of the right ending, 0 to {len(endings) - 1}; "
                        f"got {label!r}")
    return ChoiceItem(where, context, endings, label)


def harness_row(tokenizer: Tokenizer, context: str, ending: str, block_size: int, where: str,
                bos: int | None = None) -> Row:
    """The row that scores ``" " + ending`` after ``context`` (and ``bos``, if not None),
    tokenized as the harness does."""
    continuation = " " + ending
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = encode_exactly(tokenizer, context + continuation, where)
    context_ids = tokenizer.encode(context)
    return continuation_row(context_ids, whole[len(context_ids):], block_size, where, bos)


@dataclass(frozen=True)
class ChoiceResult:
    items: int
    acc: float
    acc_norm: float
    chance: float
    """the mean of 1 / (number of endings): what guessing scores"""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def evaluate_choices(scorer: Scorer, tokenizer: Tokenizer, items: list[ChoiceItem]) -> ChoiceResult:
    """acc and acc_norm over ``items`` (see the module docstring)."""
    rows = [harness_row(tokenizer, item.context, ending, scorer.block_size, item.where, scorer.bos_id)
            for item in items for ending in item.endings]
    logliks = iter(scorer.score(rows, desc="eval choices", unit="ending"))
    acc = acc_norm = 0
    for item in items:
        ll = [next(logliks) for _ in item.endings]
        acc += argmax(ll) == item.label
        acc_norm += argmax([v / len(e) for v, e in zip(ll, item.endings)]) == item.label
    n = len(items)
    return ChoiceResult(n, acc / n, acc_norm / n, sum(1 / len(i.endings) for i in items) / n)
