"""A key/value cache, so that generating a token costs one token's work, not the whole context's.

Without a cache every new token reruns the model over all earlier tokens, although their keys
and values never change (attention is causal). The cache keeps them: the prompt is run once
("prefill", many tokens), then each new token attends to the stored keys and values plus its
own ("decode", one token).
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
    """

    def __init__(self, config: ModelConfig, max_len: int | None = None) -> None:
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
        self._length = 0

    @property
    def length(self) -> int:
        """Tokens stored so far; the next token's position."""
        return self._length

    def reset(self) -> None:
        """Forget every stored token (the memory is kept for the next prompt)."""
        self._length = 0

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer ``layer``'s new keys and values (B, K, T, D) after the ones already there;
        return all of them, (B, K, length + T, D) views into the cache."""
        B, K, T, D = k.shape
        if self.keys is None:
            shape = (self.n_layer, B, K, self.max_len, D)
            self.keys = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.values = torch.zeros(shape, dtype=v.dtype, device=v.device)
        if B != self.keys.size(1):
            raise UserError(
                f"this KV cache holds {self.keys.size(1)} sequences, not {B}; make a new cache "
                "for another batch size"
            )
        end = self._length + T
        self.keys[layer, :, :, self._length : end] = k
        self.values[layer, :, :, self._length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, n_tokens: int) -> None:
        """Count ``n_tokens`` new tokens as stored, once every layer has stored them."""
        self._length += n_tokens
