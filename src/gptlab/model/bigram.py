"""The bigram model: the first rung of the ladder, a table of next-token logits and nothing else.

Row ``a`` of a (V, V) table holds the logits of the token that follows token ``a``. No context,
no attention, no layers: each prediction looks at one token. Trained with the same loop, loss,
checkpoints and sampling as the Transformer (``ModelConfig(arch="bigram")``, preset ``bigram``),
it sets the baseline that every later idea must beat: on characters it learns which letter tends
to follow which (after "q" comes "u"), and its samples are pronounceable nonsense.

Training converges to the corpus's bigram statistics: the best table holds
log P(next = b | current = a) (up to a constant per row), the log of the counts of each pair.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.model.config import ModelConfig


class Bigram(nn.Module):
    """Next-token logits looked up from the current token: ``logits = embed_tokens[idx]``.

    The table is named ``embed_tokens`` like the Transformer's input embedding: it is one, whose
    vectors happen to be V wide and to be read directly as logits. Only ``config.vocab_size``
    shapes the model; ``block_size`` bounds the windows it trains on and the context generation
    keeps, and the Transformer's other fields are ignored.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.vocab_size)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """``embed_tokens.weight``: zeros, so every next token starts equally likely and the
        loss at step 0 is exactly ln(vocab_size)."""
        nn.init.zeros_(self.embed_tokens.weight)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        ignore_index: int = -100,
        last_only: bool = False,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) for token ids ``idx`` (B, T), and with ``targets`` the mean cross entropy.

        The same call as ``GPT.forward``. ``last_only`` returns (B, 1, V). ``attention_mask``
        (padding) is accepted and changes nothing: each position reads only its own token, so
        padding elsewhere cannot reach it.
        """
        if last_only:
            if targets is not None:
                raise ValueError("last_only=True gives no loss: the loss needs every position's logits")
            idx = idx[:, -1:]
        logits = self.embed_tokens(idx)  # (B, T, V): row idx[b, t] of the table
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)
        return logits, loss

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """V * V, or 0 without the embedding table (which is all there is)."""
        return 0 if exclude_embeddings else self.embed_tokens.weight.numel()

    def configure_optimizer_groups(
        self, weight_decay: float, decay_embeddings: bool = False
    ) -> list[dict[str, Any]]:
        """AdamW groups as ``GPT``'s: the table is an embedding, decayed only with ``decay_embeddings``."""
        params = [self.embed_tokens.weight] if self.embed_tokens.weight.requires_grad else []
        decay, no_decay = (params, []) if decay_embeddings else ([], params)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
