"""A key/value cache, so that generating a token costs one token's work, not the whole context's.

Without a cache every new token reruns the model over all earlier tokens, although their keys
and values never change (attention is causal). The cache keeps them: the prompt is run once
("prefill", many tokens), then each new token attends to the stored keys and values plus its
own ("decode", one token).

A *static* cache keeps every shape fixed: each layer attends over all ``max_len`` slots, with the
slots not yet written hidden by the causal mask (they lie after every query), and new keys are
written at a position held in a tensor, not a Python int. A one-token decode step then has the
same shapes at every step of an answer, so ``torch.compile`` builds it once (fixed shapes are
also what CUDA graphs need); a growing cache would change shape, and so recompile, every step.
Caches of another length (the next answer's) are served by the same graph because
``compile_decode`` marks the slot count symbolic.
"""

from __future__ import annotations

import torch

from gptlab.errors import UserError
from gptlab.model.config import ModelConfig


class KVCache:
    """Keys and values of every layer for up to ``max_len`` tokens, preallocated.

    Each layer's keys (and values) live in one (B, K, max_len, D) tensor: B prompts, K = n_kv_head
    heads (grouped-query attention stores only these), D = head_dim. The tensors are allocated
    on the first ``update``, in the dtype and on the device of the keys given (bf16 under
    autocast), and reused after ``reset``.

    A forward pass with the cache calls ``update`` once per layer with its new keys and values,
    then ``advance`` with the number of new tokens; ``length`` counts the tokens stored.
    With ``static``, ``update`` returns all ``max_len`` slots (see the module's docstring).

    Local (sliding-window) layers keep every key as well, and their attention mask hides the
    keys that have left their window: one layout for every kind of layer, at the price of
    memory a ring buffer of sliding_window slots per local layer would spare.
    """

    def __init__(self, config: ModelConfig, max_len: int | None = None, static: bool = False) -> None:
        max_len = config.block_size if max_len is None else max_len
        if not 0 < max_len <= config.block_size:
            raise UserError(
                f"a KV cache of {max_len} tokens does not fit the model: it must hold between 1 "
                f"and block_size={config.block_size} tokens"
            )
        self.n_layer = config.n_layer
        self.max_len = max_len
        self.keys: torch.Tensor | None = None  # (n_layer, B, K, max_len, D)
        self.values: torch.Tensor | None = None
        self.static = static
        # () int64 on the cache's device, equal to length: where a static update writes. A
        # compiled step reads it as a tensor, so a new length is new data, not a new graph.
        self.position: torch.Tensor | None = None
        self._length = 0

    @property
    def length(self) -> int:
        """Tokens stored so far; the next token's position."""
        return self._length

    def reset(self) -> None:
        """Forget every stored token (the memory is kept for the next prompt)."""
        self._length = 0
        if self.position is not None:
            self.position.zero_()

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer ``layer``'s new keys and values (B, K, T, D) after the ones already there;
        return all of them, (B, K, length + T, D) views into the cache, or with ``static`` all
        (B, K, max_len, D) slots, of which those after the last new token are stale or zero."""
        B, K, T, D = k.shape
        if self.keys is None:
            shape = (self.n_layer, B, K, self.max_len, D)
            self.keys = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.values = torch.zeros(shape, dtype=v.dtype, device=v.device)
            self.position = torch.tensor(self._length, device=k.device)
        if B != self.keys.size(1):
            raise UserError(
                f"this KV cache holds {self.keys.size(1)} sequences, not {B}; make a new cache "
                "for another batch size"
            )
        if self.static:
            # Index the whole tensor (an index_put_ on it), not a view of the layer's slice:
            # inductor then writes in place, where through a view it copied the whole cache
            # twice per step. The indexed dims (layer, slot) broadcast to (T,) and come first.
            slots = self.position + torch.arange(T, device=k.device)  # (T,)
            at = (torch.tensor([layer], device=k.device), slice(None), slice(None), slots)
            self.keys[at] = k.permute(2, 0, 1, 3)  # (T, B, K, D)
            self.values[at] = v.permute(2, 0, 1, 3)
            return self.keys[layer], self.values[layer]
        end = self._length + T
        self.keys[layer, :, :, self._length : end] = k
        self.values[layer, :, :, self._length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def repeated(self, n: int) -> KVCache:
        """A new cache holding ``n`` copies of this cache's one sequence, at the same length, with
        room for as many more tokens: sequences that share a prefix run it once (``gptlab eval``
        scores every ending of one context after its keys and values)."""
        if self.keys is None or self.values is None or self.keys.size(1) != 1:
            raise ValueError("only a cache holding one sequence, after a forward pass, can be repeated")
        copy = KVCache.__new__(KVCache)
        copy.__dict__.update(self.__dict__)
        copy.keys = self.keys.expand(-1, n, -1, -1, -1).clone()  # (n_layer, n, K, max_len, D)
        copy.values = self.values.expand(-1, n, -1, -1, -1).clone()
        copy.position = None if self.position is None else self.position.clone()
        return copy

    def rewind(self, length: int) -> None:
        """Keep only the first ``length`` tokens (speculative decoding drops the keys of draft
        tokens the model rejected); the slots after them are written over next."""
        if not 0 <= length <= self._length:
            raise ValueError(f"cannot rewind a cache of {self._length} tokens to {length}")
        if self.position is not None:
            self.position -= self._length - length
        self._length = length

    def advance(self, n_tokens: int) -> None:
        """Count ``n_tokens`` new tokens as stored, once every layer has stored them."""
        self._length += n_tokens
        if self.position is not None:
            self.position += n_tokens
