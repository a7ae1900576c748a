"""Choosing the next token: pure functions on logits, and the one generation loop.

The filters take logits (..., V) and return logits of the same shape in which the tokens that
may not be chosen are set to -inf; they never modify their input. ``sample_next`` chains them
in a fixed order (temperature -> top-k -> top-p -> min-p -> draw) and is what ``sample``,
``chat``, the web page and the API all call. Randomness comes only from the ``generator``
passed in, so a seed reproduces a sample exactly.

The settings are checked once, where they come in (``check_sampling_args``, called by
``SamplingParams.check`` and at the start of ``generate``), not at every token: the functions
that run per token assume valid settings.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.errors import UserError


def check_sampling_args(
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
) -> None:
    """Raise ``UserError`` naming every out-of-range sampling setting at once."""
    problems = []
    is_number = isinstance(temperature, (int, float)) and math.isfinite(temperature)
    if not (is_number and temperature >= 0):
        problems.append(f"temperature={temperature!r} must be >= 0 (0 means greedy)")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        problems.append(f"top_k={top_k!r} must be an integer >= 1")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        problems.append(f"top_p={top_p!r} must be in (0, 1]")
    if min_p is not None and not (isinstance(min_p, (int, float)) and 0.0 <= min_p <= 1.0):
        problems.append(f"min_p={min_p!r} must be in [0, 1]")
    if repetition_penalty is not None and not (isinstance(repetition_penalty, (int, float))
                                               and math.isfinite(repetition_penalty) and repetition_penalty > 0):
        problems.append(f"repetition_penalty={repetition_penalty!r} must be a positive number (1 = off)")
    if problems:
        raise UserError("invalid sampling settings: " + "; ".join(problems))


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits by ``temperature`` > 0: below 1 sharpens the distribution, above 1 flattens.

    Temperature 0 (greedy) is a limit, not a division; ``sample_next`` handles it with argmax.
    """
    if temperature == 0:
        raise ValueError("temperature 0 means greedy decoding; take the argmax instead")
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the ``k`` highest logits in each row (all of them if k >= V).

    Ties at the boundary go to the lower token id (a stable sort), so the result is exactly
    k tokens and the same on every run and machine.
    """
    # Token ids ordered best first; among equal logits the lower id comes first.
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices  # (..., V)
    return logits.scatter(-1, order[..., k:], float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p.

    A token survives if the tokens ranked strictly above it hold less than ``p`` of the
    probability, so the most likely token always survives and p = 1 keeps everything. Ties
    are ranked by lower token id, as in ``top_k_filter``.
    """
    if p >= 1.0:
        # Rounding in the cumulative sum could otherwise drop a token of tiny probability.
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    probs = F.softmax(sorted_logits.float(), dim=-1)  # (..., V), best first
    mass_above = probs.cumsum(dim=-1) - probs  # probability of the better-ranked tokens
    drop_sorted = mass_above >= p
    # Undo the sort: position j of drop_sorted belongs to token id order[..., j].
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep the tokens whose probability is at least ``min_p`` times the most likely one's.

    Unlike top-p, the cut adapts to confidence: a peaked distribution keeps few tokens, a
    flat one keeps many. min_p = 0 keeps everything; the most likely token always survives.
    """
    if min_p == 0:
        return logits
    # p_i >= min_p * p_max  <=>  logit_i >= logit_max + ln(min_p); no softmax needed.
    max_logit = logits.max(dim=-1, keepdim=True).values  # (..., 1)
    return logits.masked_fill(logits < max_logit + math.log(min_p), float("-inf"))


def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already in ``previous`` (B, T) less likely in ``logits`` (B, V) (CTRL's rule,
    as Hugging Face applies it): a positive logit is divided by ``penalty``, a negative one
    multiplied, so either way the token loses ground. ``penalty`` 1 changes nothing; > 1 penalises.
    """
    seen = torch.gather(logits, 1, previous)  # (B, T): the logits of tokens that already occurred
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, previous, seen)


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token id per row of ``logits`` (B, V); returns a LongTensor (B,).

    Temperature 0 is greedy: the argmax, the lowest id among equal maxima, no randomness.
    Otherwise the logits are scaled by temperature, filtered by top-k, top-p and min-p (each
    only if given) and a token is drawn from the softmax using ``generator``.
    """
    if logits.dim() != 2:
        raise ValueError(f"sample_next expects logits of shape (B, V), got {tuple(logits.shape)}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    # float32: bf16 logits would make small probabilities round to zero or collide.
    logits = apply_temperature(logits.float(), temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    if min_p is not None:
        logits = min_p_filter(logits, min_p)
    probs = F.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)


@torch.no_grad()
def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    repetition_penalty: float | None = None,
    attention_mask: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Continue the prompts ``idx`` (B, T), yielding each step's new token ids as a (B,) tensor.

    Yielding step by step lets a caller stream text as it comes (``int(tok[0])`` for one
    prompt) or stop early by breaking out of the loop. ``model(idx)`` must return
    ``(logits, loss)`` and ``model.config.block_size`` bound its context: only the last
    block_size tokens are fed to it. Call ``model.eval()`` first, or dropout stays on.

    With ``use_cache`` and a model that has ``new_kv_cache()`` (``GPT`` does), the prompt is
    run once to fill a KV cache (prefill) and each further step feeds only the newest token
    (decode). Once prompt plus output would pass block_size the cache is full, and every
    further step reruns the last block_size tokens without it, exactly as ``use_cache=False``
    does: the output is the same either way, token for token, at any length; only speed
    differs. (Restarting the cache on a shorter context would be faster but would change the
    tokens, because the model would then see less than block_size of the past.)

    ``repetition_penalty`` (> 1 discourages repeats) counts every token of prompt and output.

    Prompts of different lengths go in one batch left-padded, with ``attention_mask`` (B, T)
    False (or 0) at the padding (the model must take ``attention_mask``, as ``GPT`` does).
    Each row then continues as it would alone: greedy decoding gives the same tokens.
    """
    if idx.dim() != 2 or idx.size(1) == 0:
        raise UserError(f"the prompt must hold at least one token, got shape {tuple(idx.shape)}")
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens={max_new_tokens} must be >= 0")
    check_sampling_args(temperature, top_k, top_p, min_p, repetition_penalty)
    block_size = model.config.block_size
    is_gpt = hasattr(model, "new_kv_cache")  # gptlab's GPT (test doubles take only idx)
    # A cache only as long as this generation can use: block_size may be thousands of tokens,
    # and allocating (and zeroing) all of it would cost more than a short prefill.
    cache = model.new_kv_cache(min(block_size, idx.size(1) + max_new_tokens)) if use_cache and is_gpt else None
    head = {"last_only": True} if is_gpt else {}  # only the last position's logits are sampled
    real = None if attention_mask is None else attention_mask.bool()  # (B, T), grows with idx
    for _ in range(max_new_tokens):
        if cache is not None and idx.size(1) <= cache.max_len:
            # The tokens not yet in the cache: the whole prompt first, then the last token.
            padding = {} if real is None else {"attention_mask": real}
            logits, _ = model(idx[:, cache.length :], kv_cache=cache, **head, **padding)  # (B, 1, V)
        else:
            padding = {} if real is None else {"attention_mask": real[:, -block_size:]}
            logits, _ = model(idx[:, -block_size:], **head, **padding)  # (B, 1 or T, V)
        last = logits[:, -1, :]  # (B, V)
        if repetition_penalty is not None and repetition_penalty != 1.0:
            # Padding ids are not part of the text: stand the last token (always real) in for them.
            seen = idx if real is None else torch.where(real, idx, idx[:, -1:])
            last = apply_repetition_penalty(last.float(), seen, repetition_penalty)
        next_ids = sample_next(
            last,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            generator=generator,
        )
        idx = torch.cat([idx, next_ids[:, None]], dim=1)  # (B, T + 1)
        if real is not None:
            real = F.pad(real, (0, 1), value=True)  # (B, T + 1)
        yield next_ids
