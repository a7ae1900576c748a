"""Self-attention built up in small steps, each one a function a reader can check by hand.

The production layer (``gptlab.model.layers.CausalSelfAttention``) does all of this at once in
batched matmuls. Here every idea gets its own function, and ``tests/test_attention_steps.py``
checks that each step computes what the one before it did (on inputs where they should agree)
and that the last steps equal the production layer, given the same weights.

1. ``average_loop``: each token's output is the mean of its own and every earlier token's
   vector: the simplest way to let a token "look at the past".
2. ``weighted_loop``: the same loop with a weight per (token, earlier token) instead of 1/n.
3. ``weighted_matrix`` / ``average_weights``: the loop is a matrix product with a
   lower-triangular weight matrix; softmax of a masked score matrix makes such weights.
4. ``attend`` / ``qkv_attention``: the weights come from the data: scores = Q K^T / sqrt(D),
   softmax over the keys, then a weighted sum of the values. Every token sees every token.
5. ``causal_attention``: the same with the causal mask, so a token sees only the past.
6. ``multi_head_attention``: several heads side by side, each in its own slice of the width,
   concatenated and mixed by an output projection.
7. ``grouped_query_attention``: fewer key/value heads than query heads, each shared by a group.

Weights are plain matrices applied as ``x @ w`` (C_in, C_out); an ``nn.Linear`` stores the
transpose, so ``linear.weight.T`` goes in here. Shapes: T tokens, C = width, D = head width.
Each function takes one sequence (T, C), or a batch (B, T, C) where noted, and has no biases.
"""

from __future__ import annotations

import math

import torch


def average_loop(x: torch.Tensor) -> torch.Tensor:
    """out[t] = mean(x[0], ..., x[t]) for each token of ``x`` (T, C), written as a loop.

    This is attention with every weight equal: a token mixes in the past, never the future.
    """
    T, C = x.shape
    out = torch.zeros(T, C, dtype=x.dtype)
    for t in range(T):
        out[t] = x[: t + 1].mean(dim=0)  # (t+1, C) -> (C,)
    return out


def weighted_loop(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum over s <= t of weights[t, s] * x[s], for ``x`` (T, C), ``weights`` (T, T).

    Weights above the diagonal (the future) are never read. With weights[t, s] = 1 / (t + 1)
    this is ``average_loop``.
    """
    T, C = x.shape
    out = torch.zeros(T, C, dtype=x.dtype)
    for t in range(T):
        for s in range(t + 1):
            out[t] += weights[t, s] * x[s]
    return out


def average_weights(T: int) -> torch.Tensor:
    """The (T, T) weights of ``average_loop``: row t holds 1 / (t + 1) up to the diagonal, 0 after.

    Made the way attention makes its weights: scores (here all 0) with -inf on the future,
    then a softmax along each row. exp(-inf) = 0 hides the future, and equal scores share the
    rest equally.
    """
    scores = torch.zeros(T, T)
    future = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)  # True above the diagonal
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


def weighted_matrix(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``weighted_loop`` as one matrix product: (T, T) lower-triangular weights @ (T, C) values.

    Row t of the product is exactly the loop's sum; zeroing the upper triangle first does what
    the loop's ``s <= t`` did. This is why attention runs fast: one matmul, no Python loop.
    """
    return weights.tril() @ x


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for queries, keys and values (..., T, D); the heart of step 4.

    Token t weighs token s by how well its query q_t matches s's key k_s (their dot product)
    and receives the weighted average of the values. Dividing the scores by sqrt(D) keeps
    their variance near 1 whatever D is, so the softmax does not saturate into a one-hot
    choice at initialisation. ``causal`` gives the future a score of -inf, weight 0.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (..., T, T): query t, key s
    if causal:
        T = q.size(-2)
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(diagonal=1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # (..., T, D)


def qkv_attention(
    x: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor
) -> torch.Tensor:
    """One head of attention over ``x`` (..., T, C) with trained weights (C, D), no mask.

    Each token asks a question (its query q = x w_q), offers a label (its key k = x w_k) and a
    message (its value v = x w_v); ``attend`` does the rest. Every token sees every other one,
    as in an encoder; ``causal_attention`` adds the mask a language model needs.
    """
    return attend(x @ w_q, x @ w_k, x @ w_v, causal=False)


def causal_attention(
    x: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor
) -> torch.Tensor:
    """``qkv_attention`` where token t sees only tokens 0..t: what a model predicting the next
    token needs, since in training every position predicts its successor at once and must not
    read the answer. Its weights are ``weighted_loop``'s, computed from the data."""
    return attend(x @ w_q, x @ w_k, x @ w_v, causal=True)


def multi_head_attention(
    x: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor,
    n_head: int,
) -> torch.Tensor:  # fmt: skip
    """Causal attention with ``n_head`` heads over ``x`` (B, T, C); w_q, w_k, w_v, w_o are (C, C).

    One head can only follow one pattern (say, "the previous word"); several heads each follow
    their own in a D = C / n_head slice of the width, for the same cost as one wide head: head
    h is ``causal_attention`` with the (C, D) column block h of w_q, w_k and w_v. The heads'
    outputs are concatenated back to C and mixed by ``w_o``.
    """
    return grouped_query_attention(x, w_q, w_k, w_v, w_o, n_head, n_kv_head=n_head)


def grouped_query_attention(
    x: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor,
    n_head: int, n_kv_head: int,
) -> torch.Tensor:  # fmt: skip
    """Multi-head causal attention in which ``n_kv_head`` key/value heads serve ``n_head`` query heads.

    ``x`` is (B, T, C); w_q and w_o are (C, C); w_k and w_v are (C, n_kv_head * D) with
    D = C / n_head. Query heads g * G .. g * G + G - 1 (G = n_head / n_kv_head) all read
    key/value head g. During generation every token's keys and values are kept (the KV cache),
    so sharing them shrinks that memory G times, for little loss of quality. n_kv_head = n_head
    is ``multi_head_attention``; n_kv_head = 1 is multi-query attention.

    The projections run once on the full width and are then cut into heads, which become a
    batch dimension, so one ``attend`` call runs every head.
    """
    B, T, C = x.shape
    D, G = C // n_head, n_head // n_kv_head

    def split_heads(y: torch.Tensor, n: int) -> torch.Tensor:
        return y.view(B, T, n, D).transpose(1, 2)  # (B, T, n * D) -> (B, n, T, D)

    q = split_heads(x @ w_q, n_head)  # (B, H, T, D)
    # Copy each key/value head to the G query heads of its group: (B, K, T, D) -> (B, H, T, D).
    k = split_heads(x @ w_k, n_kv_head).repeat_interleave(G, dim=1)
    v = split_heads(x @ w_v, n_kv_head).repeat_interleave(G, dim=1)
    y = attend(q, k, v, causal=True)  # (B, H, T, D)
    return y.transpose(1, 2).reshape(B, T, C) @ w_o  # concatenate the heads, then mix them
