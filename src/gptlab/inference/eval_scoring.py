"""Log-likelihoods of token sequences, in batches: the one scoring routine under every task of
``gptlab eval`` (a text's windows, multiple-choice endings, chat replies).

A ``Row`` is the tokens of one forward pass and how many of its last tokens count. The model
reads ``tokens[:-1]`` and predicts ``tokens[1:]``; the row's score is the summed log-probability
of its last ``n_scored`` tokens. Rows of different lengths share a batch padded on the right:
a causal model's outputs at real positions never see the padding after them, so no attention
mask is needed and every row gets the numbers it would get alone.

Rows that start with the same context (the endings of one multiple-choice item, the candidate
replies of one conversation) share its forward pass: the context runs once into a KV cache, and
each row runs only its own tokens after a copy of it. The scores are the same up to float
rounding, and SmolLM2 scores held-out chitchat 2.1x as fast (benchmarks/eval_shared_prefix.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from gptlab.device import autocast
from gptlab.errors import UserError
from gptlab.model.kv_cache import KVCache
from gptlab.tokenizers import Tokenizer
from gptlab.tokenizers.base import AllowedSpecial
from gptlab.tokenizers.chat_template import with_bos


@dataclass(frozen=True)
class Row:
    """One forward pass: the model reads ``tokens[:-1]``; the last ``n_scored`` of ``tokens``
    are the targets that count."""

    tokens: list[int]
    n_scored: int


@dataclass
class Scorer:
    """A model ready to score rows: eval mode, on ``device``, autocast to ``dtype``."""

    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype = torch.float32
    batch_size: int = 8
    progress: bool = True
    max_tokens: int = 8192
    """input tokens per forward pass beyond its first row: bounds the (B, T, V) logits, so that a
    batch of long windows of a large vocabulary does not fill the memory"""
    bos_id: int | None = None
    """the id every row starts with where the model reads one (``chat_template.bos_id``): the
    tasks build their rows with it, so each window and record is read as the model was trained"""
    share_prefixes: bool = True
    """rows with the same tokens before their scored ones run those once (see the module
    docstring), where the model has a KV cache"""

    def __post_init__(self) -> None:
        self.model.eval()  # dropout off: a score is a property of the weights, not of a random mask

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    def score(self, rows: list[Row], desc: str, unit: str) -> list[float]:
        """The summed log-likelihood (nats, <= 0) of each row's scored tokens, in ``rows``' order."""
        groups, alone = self._shared_prefixes(rows)
        out = [0.0] * len(rows)
        with tqdm(total=len(rows), desc=desc, unit=unit, disable=not self.progress, leave=False) as bar:
            shared = ((g, self._score_shared([rows[i] for i in g])) for g in groups)
            for chunk, values in chain(self._longest_first(rows, alone, self._score_batch), shared):
                for i, value in zip(chunk, values):
                    out[i] = value
                bar.update(len(chunk))
        return out

    def _longest_first(self, rows: list[Row], indices: Iterable[int],
                       score_batch: Callable[[list[Row]], list[float]]) -> Iterator[tuple[list[int], list[float]]]:
        """The rows at ``indices`` in batches (``_batches``), longest first so that rows of similar
        length share a batch and little is padding: each batch's indices and ``score_batch``'s values."""
        order = sorted(indices, key=lambda i: -len(rows[i].tokens))
        for chunk in self._batches(order, rows):
            yield chunk, score_batch([rows[i] for i in chunk])

    def _shared_prefixes(self, rows: list[Row]) -> tuple[list[list[int]], set[int]]:
        """Groups of two or more rows whose tokens before the scored ones are the same (and more
        than one), and the indices of the other rows."""
        if not (self.share_prefixes and hasattr(self.model, "new_kv_cache")):
            return [], set(range(len(rows)))
        by_prefix: dict[tuple[int, ...], list[int]] = {}
        for i, row in enumerate(rows):
            by_prefix.setdefault(tuple(row.tokens[: len(row.tokens) - row.n_scored]), []).append(i)
        groups = [g for prefix, g in by_prefix.items() if len(g) > 1 and len(prefix) > 1]
        return groups, set(range(len(rows))).difference(*groups)

    def _batches(self, order: list[int], rows: list[Row]) -> Iterator[list[int]]:
        """Runs of ``order`` (longest row first) of at most ``batch_size`` rows and, beyond one
        row, at most ``max_tokens`` tokens padded to the first row's length."""
        batch: list[int] = []
        for i in order:
            if batch and (len(batch) == self.batch_size
                          or (len(batch) + 1) * len(rows[batch[0]].tokens) > self.max_tokens):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    @torch.no_grad()
    def _score_batch(self, rows: list[Row], kv_cache: KVCache | None = None) -> list[float]:
        """Each row's score; with ``kv_cache`` (one sequence per row), the rows' tokens come after
        the cached ones."""
        width = max(len(r.tokens) for r in rows) - 1
        inputs = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T), right-padded with id 0
        targets = torch.zeros_like(inputs)  # (B, T)
        scored = torch.zeros((len(rows), width), dtype=torch.bool)  # (B, T): the targets that count
        for b, row in enumerate(rows):
            n = len(row.tokens) - 1
            inputs[b, :n] = torch.tensor(row.tokens[:-1])
            targets[b, :n] = torch.tensor(row.tokens[1:])
            scored[b, n - row.n_scored : n] = True
        with autocast(self.device, self.dtype):
            cached = {} if kv_cache is None else {"kv_cache": kv_cache}
            logits = self.model(inputs.to(self.device), **cached)[0]  # (B, T, V)
        logp = target_logprobs(logits, targets.to(self.device))  # (B, T) float32
        return torch.where(scored.to(self.device), logp, 0.0).double().sum(1).tolist()

    @torch.no_grad()
    def _score_shared(self, rows: list[Row]) -> list[float]:
        """Rows that share their tokens before the scored ones: those but the last run once into a
        KV cache; then each row's last context token and scored tokens run after a copy of it, in
        batches bounded as ``_batches`` bounds them."""
        start = len(rows[0].tokens) - rows[0].n_scored - 1  # the cached tokens
        cache = self.model.new_kv_cache(max_len=start + max(r.n_scored for r in rows))
        with autocast(self.device, self.dtype):
            self.model(torch.tensor([rows[0].tokens[:start]], device=self.device), kv_cache=cache, last_only=True)
        own = [Row(r.tokens[start:], r.n_scored) for r in rows]
        out = [0.0] * len(rows)
        for chunk, values in self._longest_first(own, range(len(own)),
                                                 lambda batch: self._score_batch(batch, cache.repeated(len(batch)))):
            for i, value in zip(chunk, values):
                out[i] = value
        return out


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """log p(target) at each position: logits (B, T, V), targets (B, T) -> (B, T) float32.

    Computed ``chunk`` positions at a time, so the float32 log-softmax of a long window with a
    large vocabulary (8192 x 49152 floats is 1.6 GB) is never held whole."""
    B, T, V = logits.shape
    out = torch.empty((B, T), dtype=torch.float32, device=logits.device)
    for s in range(0, T, chunk):
        part = logits[:, s : s + chunk].float()  # (B, t, V)
        nll = F.cross_entropy(part.reshape(-1, V), targets[:, s : s + chunk].reshape(-1), reduction="none")
        out[:, s : s + chunk] = -nll.view(B, -1)
    return out


def continuation_row(context: list[int], continuation: list[int], block_size: int, where: str,
                     bos: int | None = None) -> Row:
    """The row that scores ``continuation`` after ``context``, the context cut from the left to
    fit the model's context (as lm-evaluation-harness does); with ``bos``, the row starts with it
    (``with_bos``) and the context is cut after it."""
    if not continuation:
        raise UserError(f"{where}: the text to score is empty once tokenized; give a non-empty one")
    if not context:
        raise UserError(f"{where}: the context is empty once tokenized, so the first token has nothing to be "
                        "predicted from; give a context")
    if len(continuation) > block_size:
        raise UserError(f"{where}: the text to score is {len(continuation)} tokens, more than the model's context "
                        f"of {block_size}; shorten it or drop the record")
    tokens = with_bos(context + continuation, bos)
    head = tokens[:1] if bos is not None else []
    return Row(head + tokens[len(head):][-(block_size + 1 - len(head)):], len(continuation))


def encode_exactly(tokenizer: Tokenizer, text: str, where: str, allowed_special: AllowedSpecial = ()) -> list[int]:
    """The ids of ``text``, refusing a tokenizer that cannot encode it, or that encodes it as a
    different text (unknown characters mapped to <unk>): the model would be scored on that."""
    try:
        ids = tokenizer.encode(text, allowed_special)
    except UserError as e:
        raise UserError(f"{where}: the model's tokenizer cannot encode this text ({e})") from None
    back = tokenizer.decode(ids)
    if back != text:
        at = next((i for i, (a, b) in enumerate(zip(text, back)) if a != b), min(len(text), len(back)))
        raise UserError(f"{where}: the model's tokenizer cannot encode this text exactly (it reads "
                        f"{text[at:at + 12]!r} at character {at} as {back[at:at + 12]!r}); evaluate a model whose "
                        "vocabulary covers the text")
    return ids


# --- input files ---------------------------------------------------------------------------------

def jsonl_file_records(path: str | Path, example: str) -> list[tuple[str, Any]]:
    """``(FILE:LINE, value)`` for each record of a JSONL file; one line for a file that is not there,
    not text or empty."""
    from gptlab.data.jsonl import jsonl_records

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"{path} is not a file; give a JSONL file of records such as {example}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); give a JSONL file") from None
    records = list(jsonl_records(text, str(path), example))
    if not records:
        raise UserError(f"{path} holds no records; give one JSON object per line such as {example}")
    return records
