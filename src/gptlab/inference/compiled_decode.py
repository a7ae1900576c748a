"""A compiled one-token decode step over a static KV cache (``Engine(compile=True)``, ``--compile``).

Decoding runs the model once per generated token, one token at a time, and each step's many
small kernels cost more in Python and launch overhead than in arithmetic. ``torch.compile``
fuses them into one graph, but a graph is built for fixed shapes, and a growing KV cache changes
shape every step. A static cache (``KVCache(static=True)``) keeps every shape fixed, so the
step ``GPT.blocks_and_head`` (the blocks, the final norm and the head: only tensors vary there
from one step to the next) is compiled once and reused at every step. Everything else stays
eager: prompts (prefill), calls without a cache and calls with autograd on. The tokens are the
same as eager decoding's.

Each answer's cache is as long as its prompt and answer, so the next turn of a chat, or the next
request to a server, brings a new cache length. So the step marks the cache's length (its
slots, and the masks over them) as a symbolic size for dynamo: one graph serves every length,
and every other size (layers, heads, widths) stays a constant the graph is specialised to. With
the first length fixed instead, the step compiled again at the second: SmolLM2 int8 on a 2-core
AVX2 CPU waited 84 s before a chat's first answer and 85 s more before its second; with the
mark, 86 s once, and it decodes as fast (benchmarks/compile_shapes.py). A new batch size still
compiles once more (after which dynamo makes the batch symbolic too).

An int8 model (``--quantize int8``) compiles too: fbgemm's product stays one operator of the
graph and the float steps around it are fused, which is where int8 decoding spends most of its
time (``gptlab.inference.quantize``). Fused float steps round in their own order, and int8
rounds each activation to a grid, where a last-bit difference can move a value one step: the
compiled int8 step's tokens are eager int8's except at near-ties of the two best logits
(benchmarks/RESULTS.md).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from gptlab.errors import UserError
from gptlab.model.kv_cache import KVCache
from gptlab.model.transformer import GPT


def compile_decode(model: GPT, **options: Any) -> None:
    """Compile ``model``'s one-token decode step, in place, for every cache length (``options``
    such as ``mode`` or ``backend`` go to ``torch.compile``); from now on ``model.new_kv_cache``
    gives static caches.

    The model keeps its forward pass, so its checks, masks, cache bookkeeping and hooks stay the
    one path; only its blocks-and-head stage is swapped, on this instance, for one that takes the
    compiled graph whenever a call is a decode step."""
    if not isinstance(model, GPT):
        raise UserError(f"--compile needs a Transformer; this model is a {type(model).__name__}: leave --compile out")
    eager = GPT.blocks_and_head.__get__(model)  # the class's method, even if compiled before
    compiled = torch.compile(eager, fullgraph=True, **options)

    def blocks_and_head(x: torch.Tensor, rope: dict[str, tuple[torch.Tensor, torch.Tensor] | None],
                        mask: dict[str, torch.Tensor | None], kv_cache: KVCache | None, last_only: bool) -> torch.Tensor:
        # One new token over a static cache is the shape the graph was made for. The compiled
        # step is for inference: with autograd on, its in-place cache writes would clash with
        # the saved tensors of a backward graph.
        step = kv_cache is not None and kv_cache.static and x.size(1) == 1 and not torch.is_grad_enabled()
        if step:
            length_is_symbolic(kv_cache, mask)
        return (compiled if step else eager)(x, rope, mask, kv_cache, last_only)

    model.blocks_and_head = blocks_and_head
    model.new_kv_cache = partial(GPT.new_kv_cache, model, static=True)


def length_is_symbolic(cache: KVCache, mask: dict[str, torch.Tensor | None]) -> None:
    """Tell dynamo that the cache's slot count (dim 3 of its (layer, B, K, slots, D) tensors) and
    the masks' last dim, the same size, may change between calls: a hint it keeps on each tensor,
    so the graph is traced with one symbol for them instead of the first call's number."""
    torch._dynamo.maybe_mark_dynamic(cache.keys, 3)
    torch._dynamo.maybe_mark_dynamic(cache.values, 3)
    for m in mask.values():
        if m is not None:
            torch._dynamo.maybe_mark_dynamic(m, m.dim() - 1)
