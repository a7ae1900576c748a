"""The original Transformer (Vaswani et al. 2017, "Attention Is All You Need"): encoder-decoder.

Before GPT kept only the decoder, the Transformer translated: an encoder reads the whole
source sentence, every token seeing every other one; a decoder writes the target one token at
a time, seeing the target so far (causal self-attention) and the encoder's output
(cross-attention: queries from the decoder, keys and values from the encoder).

    source ids -> embed * sqrt(C) + sinusoid -> N x EncoderLayer ------------> memory
    target ids -> embed * sqrt(C) + sinusoid -> N x DecoderLayer(memory) -> head -> logits

As in the paper: post-norm residuals (x = norm(x + sublayer(x)), "Add & Norm"), sinusoidal
positions, one embedding matrix shared by source, target and output head, scaled by sqrt(C).
Reused from the decoder-only GPT: its LayerNorm, its MLP (GELU where the paper has ReLU) and
its CausalSelfAttention, which takes an explicit mask for the encoder. Padding: the source is
right-padded with PAD, and no query attends to a PAD key; the target is right-padded too, but
causal attention already keeps every real token from seeing later padding, and padding
positions carry no loss.

Shapes: B batch, S source length, T target length, C = n_embd, V = vocab_size.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from gptlab.cache import atomic_dir, atomic_write_json
from gptlab.errors import UserError
from gptlab.model.config import ModelConfig
from gptlab.model.layers import MLP, CausalSelfAttention, LayerNorm, sinusoidal_positions

WEIGHTS, CONFIG, TRAIN_STATE = "model.safetensors", "config.json", "train_state.pt"


@dataclass
class Seq2SeqConfig:
    """Shape of an encoder-decoder Transformer. Defaults: a small model for the toy tasks."""

    vocab_size: int = 13
    """Token ids shared by source and target (one embedding matrix, as in the paper)."""
    block_size: int = 16
    """Longest source or target sequence (rows of the position table)."""
    n_layer: int = 2
    """Layers in the encoder, and as many in the decoder."""
    n_head: int = 4
    """Attention heads per attention layer."""
    n_embd: int = 64
    """Width of the residual stream; must be divisible by n_head (and even, for the sinusoids)."""
    intermediate_size: int | None = None
    """Hidden width of each MLP; None: 4 * n_embd."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and sub-layer outputs."""
    pad_id: int = 0
    """The padding token id, never attended to in the source."""

    def layer_config(self) -> ModelConfig:
        """The ``ModelConfig`` that gptlab's layers (MLP, CausalSelfAttention) read their shapes
        from; raises ``UserError`` naming every bad field (an odd n_embd too: the sinusoidal
        positions come in sin/cos pairs)."""
        return ModelConfig(vocab_size=self.vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                           n_head=self.n_head, n_embd=self.n_embd, intermediate_size=self.intermediate_size,
                           dropout=self.dropout, bias=True, mlp="gelu", norm="layernorm",
                           pos_embedding="sinusoidal").validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class CrossAttention(nn.Module):
    """Multi-head attention from decoder queries to encoder keys and values.

    The only attention the decoder-only GPT lacks: queries come from ``x`` (B, T, C) and keys
    and values from ``memory`` (B, S, C), so each target position can look up any source token.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.dropout = config.n_head, config.head_dim, config.dropout
        C = config.n_embd
        self.q_proj = nn.Linear(C, C)
        self.k_proj = nn.Linear(C, C)
        self.v_proj = nn.Linear(C, C)
        self.o_proj = nn.Linear(C, C)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        """``memory_mask`` (B, 1, 1, S) bool, True where the source token is real."""
        B, T, C = x.shape
        S = memory.size(1)
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(memory).view(B, S, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, S, D)
        v = self.v_proj(memory).view(B, S, self.n_head, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=memory_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.o_proj(y.transpose(1, 2).reshape(B, T, C)))


class EncoderLayer(nn.Module):
    """x = norm(x + self_attn(x)); x = norm(x + mlp(x)). Every source token sees every real one."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = CausalSelfAttention(config)
        self.self_attn_norm = LayerNorm(config.n_embd, bias=True, eps=config.norm_eps)
        self.mlp = MLP(config)
        self.mlp_norm = LayerNorm(config.n_embd, bias=True, eps=config.norm_eps)

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        # An explicit (B, 1, 1, S) mask replaces the causal one: no future to hide in the source.
        # Each sub-layer applies dropout to its own output.
        x = self.self_attn_norm(x + self.self_attn(x, mask=src_mask))
        return self.mlp_norm(x + self.mlp(x))


class DecoderLayer(nn.Module):
    """Causal self-attention over the target so far, cross-attention to the encoder's output,
    then the MLP, each followed by Add & Norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = CausalSelfAttention(config)
        self.self_attn_norm = LayerNorm(config.n_embd, bias=True, eps=config.norm_eps)
        self.cross_attn = CrossAttention(config)
        self.cross_attn_norm = LayerNorm(config.n_embd, bias=True, eps=config.norm_eps)
        self.mlp = MLP(config)
        self.mlp_norm = LayerNorm(config.n_embd, bias=True, eps=config.norm_eps)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        x = self.self_attn_norm(x + self.self_attn(x))  # mask None: causal
        x = self.cross_attn_norm(x + self.cross_attn(x, memory, src_mask))
        return self.mlp_norm(x + self.mlp(x))


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder Transformer: ``forward(src, tgt_in, targets)`` -> (logits, loss)."""

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = config
        layer_config = config.layer_config()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        # Fixed, not learned: a buffer computed from the config, not saved with the weights.
        self.register_buffer("positions", sinusoidal_positions(config.block_size, config.n_embd), persistent=False)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(layer_config) for _ in range(config.n_layer))
        self.decoder = nn.ModuleList(DecoderLayer(layer_config) for _ in range(config.n_layer))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Every parameter's starting value, in one place.

        - ``embed_tokens.weight``: normal(0, 1 / sqrt(C)). Multiplied by sqrt(C) on the way in
          it gives unit-variance vectors, as loud as the sinusoids; used as the output head it
          gives logits of about unit variance from the normalised (norm ~ sqrt(C)) last layer.
        - every Linear weight (attention projections, MLP): normal(0, 0.02); biases 0
        - every LayerNorm: weight 1, bias 0
        """
        nn.init.normal_(self.embed_tokens.weight, std=self.config.n_embd ** -0.5)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings scaled by sqrt(C) plus sinusoidal positions, (B, L) -> (B, L, C)."""
        L = ids.size(1)
        if L > self.config.block_size:
            raise UserError(f"a sequence of {L} tokens exceeds the model's block_size of "
                            f"{self.config.block_size}; give shorter inputs")
        x = self.embed_tokens(ids) * math.sqrt(self.config.n_embd) + self.positions[:L]
        return self.embed_dropout(x)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's output for source ids (B, S): memory (B, S, C) and its mask (B, 1, 1, S)."""
        src_mask = (src != self.config.pad_id)[:, None, None, :]  # True at real source tokens
        x = self.embed(src)
        for layer in self.encoder:
            x = layer(x, src_mask)
        return x, src_mask

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, V) for the target so far ``tgt`` (B, T), given the encoder's output."""
        x = self.embed(tgt)
        for layer in self.decoder:
            x = layer(x, memory, src_mask)
        return F.linear(x, self.embed_tokens.weight)  # the head shares the embedding matrix

    def forward(
        self, src: torch.Tensor, tgt: torch.Tensor, targets: torch.Tensor | None = None,
        ignore_index: int = -100,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """Logits (B, T, V) for source ``src`` (B, S) and decoder input ``tgt`` (B, T); with
        ``targets`` (B, T), also the mean cross entropy over targets that are not ``ignore_index``."""
        logits = self.decode(tgt, *self.encode(src))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)
        return logits, loss

    @torch.no_grad()
    def greedy_decode(self, src: torch.Tensor, bos_id: int, eos_id: int, max_len: int) -> torch.Tensor:
        """Answers (B, <= max_len) for sources ``src`` (B, S): the most likely token at each step.

        The source is encoded once; the decoder reruns on the answer so far each step (the
        sequences are short; a KV cache would make each step cost one token). Stops when every
        row has produced ``eos_id``; a row's tokens after its EOS are meaningless.
        """
        memory, src_mask = self.encode(src)
        out = torch.full((src.size(0), 1), bos_id, device=src.device)
        done = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            next_id = self.decode(out, memory, src_mask)[:, -1].argmax(-1)  # (B,)
            out = torch.cat([out, next_id[:, None]], dim=1)
            done |= next_id == eos_id
            if done.all():
                break
        return out[:, 1:]

    def num_parameters(self) -> int:
        """Number of parameters (the shared embedding and head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def configure_optimizer_groups(
        self, weight_decay: float, decay_embeddings: bool = False
    ) -> list[dict[str, Any]]:
        """AdamW groups as ``GPT``'s: decay matrices, not biases, norms or (unless asked) the embedding."""
        decay, no_decay = [], []
        for p in self.parameters():
            if not p.requires_grad:
                continue
            if p.dim() >= 2 and (decay_embeddings or p is not self.embed_tokens.weight):
                decay.append(p)
            else:
                no_decay.append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def save_seq2seq(path: str | Path, model: Seq2SeqTransformer, extra: dict[str, Any] | None = None,
                 train_state: dict[str, Any] | None = None) -> None:
    """A checkpoint directory: ``model.safetensors``, ``config.json`` ({"model": config, **extra}) and,
    to resume training, ``train_state.pt``; written atomically."""
    with atomic_dir(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS))
        atomic_write_json(tmp / CONFIG, {"model": model.config.to_dict(), **(extra or {})})
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)


def load_seq2seq(path: str | Path) -> tuple[Seq2SeqTransformer, dict[str, Any]]:
    """The model saved by ``save_seq2seq`` and the rest of its config.json."""
    path = Path(path)
    if not (path / WEIGHTS).is_file():
        raise UserError(f"{path} is not a seq2seq checkpoint (no {WEIGHTS}); give a folder that save_seq2seq wrote")
    meta = json.loads((path / CONFIG).read_text())
    model = Seq2SeqTransformer(Seq2SeqConfig(**meta.pop("model")))
    model.load_state_dict(load_file(str(path / WEIGHTS)))
    return model, meta
