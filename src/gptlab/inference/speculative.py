"""Prompt-lookup speculative decoding: guess the next tokens by copying them from the context,
check every guess in one forward pass, keep those the model agrees with.

Decoding one token at batch 1 is bound by reading the weights: a forward pass over a handful
of tokens reads them once too, so it costs little more than a pass over one. When the text being
written repeats its context (a summary quoting its passage, an answer naming what the question
named, code edited in place), the tokens that followed the last few tokens where they occurred
before are a good guess for what comes next. So each step:

1. Draft: find the latest earlier occurrence of the last ``ngram`` tokens (3, else 2, else 1)
   and take up to ``draft_tokens`` of the tokens that followed it (``draft_from_context``).
2. Verify: run the model once over the newest token and the draft, with the KV cache: the
   logits at each position are the model's next-token choice after the tokens before it.
3. Accept the draft tokens up to the first one the model would not have chosen, then add the
   model's own choice there (so every step yields at least one token, and up to
   ``draft_tokens + 1``). The keys and values of the rejected draft tokens are dropped from the
   cache (``KVCache.rewind``).

Greedy only, and then exact: every token is the model's argmax after the tokens before it, so
the output is plain greedy decoding's, token for token (up to float rounding between a pass
over several tokens and a pass over one). Nothing is drafted when the context has no match;
a step then costs what a plain step costs, plus the search.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from gptlab.inference.sampling import generate

#: the longest and shortest tail searched for in the context
MAX_NGRAM, MIN_NGRAM = 3, 1


def draft_from_context(ids: list[int], max_tokens: int, max_ngram: int = MAX_NGRAM,
                       min_ngram: int = MIN_NGRAM) -> list[int]:
    """Up to ``max_tokens`` tokens that followed the latest earlier occurrence of the last n
    tokens of ``ids`` (n from ``max_ngram`` down to ``min_ngram``; the longest match wins),
    or [] when the tail occurs nowhere else."""
    if max_tokens < 1:
        return []
    for n in range(min(max_ngram, len(ids) - 1), min_ngram - 1, -1):
        tail = ids[-n:]
        for start in range(len(ids) - n - 1, -1, -1):  # latest first; never the tail itself
            if ids[start:start + n] == tail:
                return ids[start + n:start + n + max_tokens]
    return []


@dataclass
class SpeculationStats:
    """What the drafts bought: forward passes, tokens drafted and tokens accepted."""

    passes: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0

    @property
    def tokens_per_pass(self) -> float:
        return self.tokens / max(self.passes, 1)


@torch.no_grad()
def generate_speculative(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, draft_tokens: int = 8,
                         stats: SpeculationStats | None = None) -> Iterator[torch.Tensor]:
    """Greedy continuation of the one prompt ``idx`` (1, T), yielding each new token as a (1,)
    tensor, exactly as ``generate(..., temperature=0)`` yields them, with prompt-lookup drafts
    (see the module's docstring). Past the model's context it goes on as ``generate`` does
    there, without cache and without drafts."""
    stats = stats if stats is not None else SpeculationStats()
    ids = idx[0].tolist()
    cache = model.new_kv_cache(min(model.config.block_size, len(ids) + max_new_tokens))
    pending = idx  # the tokens not yet in the cache
    produced = 0
    while produced < max_new_tokens:
        free = cache.max_len - cache.length - pending.size(1)  # slots left for draft tokens
        if free < 0:  # the context is full: the plain loop's way from here on
            yield from generate(model, torch.tensor([ids], device=idx.device), max_new_tokens - produced,
                                temperature=0.0)
            return
        draft = draft_from_context(ids, min(draft_tokens, free, max_new_tokens - produced - 1))
        x = torch.cat([pending, torch.tensor([draft], dtype=idx.dtype, device=idx.device)], dim=1)
        logits, _ = model(x, kv_cache=cache, last_only=not draft)  # (1, L or 1, V)
        choices = logits[0, -len(draft) - 1:].argmax(-1).tolist()  # after the newest token, and after each draft
        accepted = 0
        while accepted < len(draft) and draft[accepted] == choices[accepted]:
            accepted += 1
        cache.rewind(cache.length - (len(draft) - accepted))  # forget the rejected drafts' keys
        new = draft[:accepted] + [choices[accepted]]
        stats.passes, stats.drafted, stats.accepted = stats.passes + 1, stats.drafted + len(draft), \
            stats.accepted + accepted
        for token in new:
            ids.append(token)
            produced += 1
            stats.tokens += 1
            yield torch.tensor([token], device=idx.device)
        pending = torch.tensor([[new[-1]]], dtype=idx.dtype, device=idx.device)
