"""The decoder-only language model: embeddings -> blocks -> final norm -> head.

GPT-2, Llama, Qwen2, Mistral and Gemma 3 are all this one model with different
``ModelConfig`` options. Parameter names follow the Hugging Face Llama tree, so importing
weights is a table of names:

    embed_tokens.weight                      (V, C)
    embed_positions.weight                   (block_size, C)   only with learned positions
    layers.N.input_layernorm.{weight,bias}
    layers.N.self_attn.q_proj.{weight,bias}  (H * D, C), H * D = C unless head_dim is set
    layers.N.self_attn.{k,v}_proj.{weight,bias}   (K * D, C) with K = n_kv_head
    layers.N.self_attn.{q,k}_norm.weight     (D,), only with learned_qk_norm
    layers.N.self_attn.o_proj.{weight,bias}  (C, H * D)
    layers.N.post_attention_layernorm.{weight,bias}
    layers.N.pre_feedforward_layernorm.weight    only with sandwich_norm
    layers.N.post_feedforward_layernorm.weight   only with sandwich_norm
    layers.N.mlp.gate_proj.{weight,bias}     only with the gated MLPs (swiglu, geglu)
    layers.N.mlp.{up,down}_proj.{weight,bias}
    norm.{weight,bias}
    lm_head.weight                           (V, C), the same tensor as embed_tokens when tied

Biases exist only when ``config.bias`` (q/k/v: ``config.qkv_has_bias``); RMSNorm has none.
``post_attention_layernorm`` is the MLP's input norm in a pre-norm block (Llama's name), and
the norm of the attention's output in a sandwich block (Gemma's), as Hugging Face names them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.errors import UserError
from gptlab.model.config import ModelConfig
from gptlab.model.kv_cache import KVCache
from gptlab.model.bigram import Bigram
from gptlab.model.layers import (
    MLP, CausalSelfAttention, LayerNorm, RMSNorm, alibi_bias, alibi_slopes, make_norm, rope_tables,
    sinusoidal_positions, token_positions,
)  # fmt: skip
from gptlab.model.layers import attention_mask as build_attention_mask

# The names of the RoPE buffers of each kind of layer: rope_cos and rope_sin, rope_local_cos ...
ROPE_PREFIX = {"global": "rope", "local": "rope_local"}


class Block(nn.Module):
    """One pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    Normalising the input of each branch (not its output, as the 2017 Transformer did) keeps
    the residual stream an untouched sum, so gradients reach early layers undiminished and
    training is stable with little learning-rate warm-up. With ``sandwich_norm`` (Gemma) each
    branch's output is normalised as well before it is added: x + norm(attn(norm(x))), then
    x + norm(mlp(norm(x))); the stream stays a sum, of terms no larger than a norm's scale.

    ``attn_kind`` is "local" (a sliding window) or "global": which RoPE table and mask the
    model hands this block.
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_kind = config.layer_kind(layer_idx)
        sandwich = config.sandwich_norm
        self.input_layernorm = make_norm(config)
        self.self_attn = CausalSelfAttention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config)
        self.pre_feedforward_layernorm = make_norm(config) if sandwich else None
        self.mlp = MLP(config)
        self.post_feedforward_layernorm = make_norm(config) if sandwich else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), rope, mask, kv_cache)  # (B, T, C)
        if self.pre_feedforward_layernorm is None:  # pre-norm
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attn)  # sandwich
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GPT(nn.Module):
    """A decoder-only Transformer language model, every layer written out.

    The config's options choose GPT-2's parts (learned positions, LayerNorm, GELU) or Llama's
    (RoPE, RMSNorm, SwiGLU, grouped-query attention), Qwen2's q/k/v biases, Mistral's
    sliding window, or Gemma 3's (local and global layers, each with its RoPE base; scaled
    embeddings; sandwich norms; QK-norm; GeGLU; soft-capping); ``ModelConfig.for_family``
    fills them in by name.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        learned = config.pos_embedding == "learned"
        self.embed_positions = nn.Embedding(config.block_size, config.n_embd) if learned else None
        # The other position encodings are buffers, not parameters: computed from the config,
        # so not saved (persistent=False). RoPE: cos and sin of every position's angles,
        # (block_size, D), and a second pair for local layers with a base of their own;
        # sinusoidal: the (block_size, C) table; ALiBi: one slope per head.
        if config.pos_embedding == "rope":
            shape = (config.block_size, config.head_dim)
            for kind in self._rope_kinds():
                self.register_buffer(f"{ROPE_PREFIX[kind]}_cos", torch.empty(shape), persistent=False)
                self.register_buffer(f"{ROPE_PREFIX[kind]}_sin", torch.empty(shape), persistent=False)
        elif config.pos_embedding == "sinusoidal":
            self.register_buffer("sinusoid", torch.empty(config.block_size, config.n_embd), persistent=False)
        elif config.pos_embedding == "alibi":
            self.register_buffer("alibi_slopes", torch.empty(config.n_head), persistent=False)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # One (V, C) matrix both reads tokens in and scores them out: fewer parameters,
            # and tokens that are used alike get alike vectors from both ends.
            self.lm_head.weight = self.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Give every parameter its starting value; the only place initialisation happens.

        - ``embed_tokens.weight``, ``embed_positions.weight`` (learned positions only):
          normal(0, 0.02)
        - ``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj`` (SwiGLU only), ``up_proj``
          weights: normal(0, 0.02)
        - ``o_proj``, ``down_proj`` weights: normal(0, 0.02 / sqrt(2 * n_layer)). These write
          into the residual stream, which sums 2 * n_layer of them; scaling keeps the
          stream's variance at the top about what it is at the bottom. With
          ``zero_init_residual``: 0, so each block starts as the identity.
        - every Linear bias: 0
        - every norm (``input_layernorm``, ``post_attention_layernorm``, the sandwich norms,
          ``q_norm``/``k_norm``, ``norm``): the identity scale, weight 1 (0 for
          "rmsnorm_offset", whose scale is 1 + weight) and, for LayerNorm with bias, bias 0,
          so it starts as a plain standardisation
        - ``lm_head.weight``: the token embedding when tied, else normal(0, 0.02)
        - the (not learned) buffers: with RoPE ``rope_cos``/``rope_sin``, the rotation tables
          (and ``rope_local_cos``/``rope_local_sin`` with ``rope_local_theta``); sinusoidal,
          ``sinusoid``, the sin/cos table; ALiBi, ``alibi_slopes``, one per head

        With these, the logits start near zero and the loss near ln(vocab_size).
        """
        std = 0.02
        resid_std = std / math.sqrt(2 * self.config.n_layer)
        nn.init.normal_(self.embed_tokens.weight, mean=0.0, std=std)
        pos_embedding = self.config.pos_embedding
        if pos_embedding == "learned":
            nn.init.normal_(self.embed_positions.weight, mean=0.0, std=std)
        elif pos_embedding == "sinusoidal":
            self.sinusoid.copy_(sinusoidal_positions(self.config.block_size, self.config.n_embd))
        elif pos_embedding == "alibi":
            self.alibi_slopes.copy_(alibi_slopes(self.config.n_head))
        else:
            for kind in self._rope_kinds():
                cos, sin = rope_tables(self.config, self.config.block_size, kind)
                getattr(self, f"{ROPE_PREFIX[kind]}_cos").copy_(cos)
                getattr(self, f"{ROPE_PREFIX[kind]}_sin").copy_(sin)
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            residual = (attn.o_proj, mlp.down_proj)
            gate = (mlp.gate_proj,) if mlp.gate_proj is not None else ()
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, *gate, mlp.up_proj, *residual):
                if linear in residual and self.config.zero_init_residual:
                    nn.init.zeros_(linear.weight)
                else:
                    nn.init.normal_(linear.weight, mean=0.0, std=resid_std if linear in residual else std)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
        for norm in self.modules():
            if isinstance(norm, (LayerNorm, RMSNorm)):
                zero_centred = isinstance(norm, RMSNorm) and norm.unit_offset  # its scale is 1 + weight
                nn.init.constant_(norm.weight, 0.0 if zero_centred else 1.0)
                if getattr(norm, "bias", None) is not None:
                    nn.init.zeros_(norm.bias)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=std)

    def _rope_kinds(self) -> tuple[str, ...]:
        """The kinds of layer with a RoPE table of their own: "global" always (local layers
        share it unless ``rope_local_theta`` gives them a base of their own)."""
        own_local = self.config.rope_local_theta is not None and "local" in self.config.attention_kinds
        return ("global", "local") if own_local else ("global",)

    def new_kv_cache(self, max_len: int | None = None, static: bool = False) -> KVCache:
        """An empty KV cache for this model, for up to ``max_len`` (default block_size) tokens;
        ``static`` keeps its shapes fixed (see ``KVCache``)."""
        return KVCache(self.config, max_len, static=static)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        ignore_index: int = -100,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) for token ids ``idx`` (B, T); with ``targets`` (B, T), also the loss.

        ``last_only`` returns only the last position's logits (B, 1, V): all that generation
        needs, and it spares the output head's (T, C) x (C, V) matmul over a long prompt.

        The loss is the mean cross entropy over targets that are not ``ignore_index``
        (NaN if every target is ignored), computed in float32 even under autocast.

        With ``kv_cache``, ``idx`` holds only the tokens after those already cached: they sit
        at positions kv_cache.length onwards, attend to the cached tokens and themselves, and
        are added to the cache.

        ``attention_mask`` (B, cached + T), 1 or True for real tokens and 0 for padding, lets
        prompts of different lengths share a batch, left-padded so that every sequence's next
        token is in the last column. Padding is never attended to, and positions count only
        real tokens, so each sequence gets the logits it would get alone.
        """
        B, T = idx.shape
        start = self._first_position(T, kv_cache)
        if last_only and targets is not None:
            raise ValueError("last_only=True gives no loss: the loss needs every position's logits")
        real = _real_tokens(attention_mask, (B, start + T))  # (B, start + T) bool, or None
        x, rope = self.embed(idx, token_positions(start, T, real, idx.device))  # (B, T, C)
        mask = {kind: self._attention_mask(T, start, kv_cache, real, idx.device, self.config.window(kind))
                for kind in self.config.attention_kinds}
        logits = self.blocks_and_head(x, rope, mask, kv_cache, last_only)  # (B, T or 1, V)
        if kv_cache is not None:
            kv_cache.advance(T)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(B * T, -1), targets.reshape(B * T), ignore_index=ignore_index
            )
        return logits, loss

    def _first_position(self, n_new: int, kv_cache: KVCache | None) -> int:
        """The position of the first of ``n_new`` tokens (the number already cached); a
        ``UserError`` if they do not fit in the context (or the cache) after those."""
        start = 0 if kv_cache is None else kv_cache.length
        limit = self.config.block_size if kv_cache is None else kv_cache.max_len
        if start + n_new > limit:
            where = "" if kv_cache is None else f" after the {start} cached ones"
            raise UserError(
                f"{n_new} tokens{where} exceed the model's context of {limit} tokens (block_size "
                f"{self.config.block_size}); keep only the last {limit - start} tokens"
            )
        return start

    def embed(
        self, idx: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor] | None]]:
        """The tokens ``idx`` (B, T) at positions ``pos`` (T,) or (B, T), as vectors x (B, T, C),
        with their positions added in (learned, sinusoidal), and for each kind of layer
        ("global", "local") the RoPE tables its blocks rotate queries and keys by (None for the
        other encodings; ALiBi is in the mask)."""
        x = self.embed_tokens(idx)  # (B, T, C)
        if self.config.embed_scale:
            # sqrt(C) rounded to the embedding's dtype first, as Gemma's reference does.
            x = x * torch.tensor(self.config.n_embd**0.5).to(x.dtype)
        rope = dict.fromkeys(self.config.attention_kinds)
        pos_embedding = self.config.pos_embedding
        if pos_embedding == "learned":
            # Token identity plus position, (B, T, C) + (T or B, T, C).
            x = x + self.embed_positions(pos)
        elif pos_embedding == "sinusoidal":
            # As in the paper, embeddings are scaled by sqrt(C) so that the fixed table, whose
            # entries are about 0.7 in size, does not drown them: (B, T, C) + (T or B, T, C).
            x = x * math.sqrt(self.config.n_embd) + self.sinusoid[pos].to(x.dtype)
        elif pos_embedding == "rope":
            own = self._rope_kinds()
            for kind in rope:
                prefix = ROPE_PREFIX[kind if kind in own else "global"]
                cos, sin = getattr(self, f"{prefix}_cos")[pos], getattr(self, f"{prefix}_sin")[pos]  # (T or B, T, D)
                rope[kind] = (cos, sin) if pos.dim() == 1 else (cos[:, None], sin[:, None])  # (B, 1, T, D): every head
        return self.embed_dropout(x), rope

    def _attention_mask(
        self, n_new: int, start: int, kv_cache: KVCache | None, real: torch.Tensor | None, device: torch.device,
        window: int | None,
    ) -> torch.Tensor | None:  # fmt: skip
        """What each of the ``n_new`` tokens after ``start`` cached ones may attend to in a
        layer that sees the last ``window`` tokens (None: all): None where SDPA needs no mask,
        else a bool (T, S) or (B, 1, T, S) mask, or ALiBi's float (H or B, H, T, S) bias.
        ``real`` (B, start + T) is False at padding."""
        static = kv_cache is not None and kv_cache.static
        if not self._needs_mask(n_new, start, static, real is not None, window):
            return None
        # A static cache's keys are all its max_len slots; those after the new tokens are
        # hidden by causality, so padding them with any value is the same.
        n_keys = kv_cache.max_len if static else start + n_new
        if static and real is not None:
            real = F.pad(real, (0, n_keys - start - n_new))  # (B, max_len)
        mask = build_attention_mask(n_new, n_keys, window, device, real, first_query=start)
        if self.config.pos_embedding == "alibi":
            mask = alibi_bias(self.alibi_slopes, mask, first_query=start)  # (H or B, H, T, S) float
        return mask

    def _needs_mask(self, n_new: int, start: int, static: bool, padded: bool, window: int | None) -> bool:
        """Whether attention needs an explicit mask. Without one SDPA uses its fast causal
        kernel (T tokens among themselves) or none at all (one new token after cached ones
        sees every key); padding, a sliding window, several new tokens after cached ones,
        ALiBi's bias or a static cache (whose unwritten slots must be hidden) each need one."""
        several_after_cached = start > 0 and n_new > 1
        return (padded or window is not None or several_after_cached
                or self.config.pos_embedding == "alibi" or static)

    def blocks_and_head(
        self,
        x: torch.Tensor,
        rope: dict[str, tuple[torch.Tensor, torch.Tensor] | None],
        mask: dict[str, torch.Tensor | None],
        kv_cache: KVCache | None,
        last_only: bool,
    ) -> torch.Tensor:
        """The embedded tokens ``x`` (B, T, C) through every block, the final norm and the
        head: logits (B, T, V), or (B, 1, V) with ``last_only``. ``rope`` and ``mask`` hold
        one entry per kind of layer ("global", "local"); each block takes its kind's. Only
        tensors vary from one decode step to the next here, which is what lets
        ``gptlab.inference.compiled_decode`` compile it once."""
        for layer in self.layers:
            x = layer(x, rope[layer.attn_kind], mask[layer.attn_kind], kv_cache)
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C)
        logits = self.lm_head(self.norm(x))
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap  # no logit beyond +-cap
        return logits

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied head is counted once, as the embedding).

        ``exclude_embeddings`` leaves out the lookup tables ``embed_tokens`` and
        ``embed_positions`` (and so a tied head), the usual "N" of scaling laws.
        """
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(p.numel() for p in self._embedding_tables())
        return n

    def _embedding_tables(self) -> list[nn.Parameter]:
        tables = [self.embed_tokens.weight]
        if self.embed_positions is not None:
            tables.append(self.embed_positions.weight)
        return tables

    def flops_per_token(self) -> int:
        """Floating-point operations to train on one token: 6N + 12·L·H·Q·T (PaLM, appendix B).

        N counts the parameters used in matrix multiplies: every non-embedding parameter plus
        the head's (V, C) matrix, which costs a matmul even when it is the tied embedding (a
        lookup costs nothing). Each such weight does 2 FLOPs per token forward (multiply and
        add) and 4 backward, hence 6N. Attention scores (Q K^T) and their weighted sum (P V)
        add 2·2·Q·T per head per layer forward, tripled for forward plus backward, at full
        context T = block_size: 12·L·H·Q·T. Biases and norms are counted in N, a negligible
        overestimate.
        """
        cfg = self.config
        n = self.num_parameters(exclude_embeddings=True)
        if cfg.tie_embeddings:
            n += self.lm_head.weight.numel()
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.block_size

    def configure_optimizer_groups(
        self, weight_decay: float, decay_embeddings: bool = False
    ) -> list[dict[str, Any]]:
        """Two parameter groups for AdamW: ``[{"params": decayed, "weight_decay": wd},
        {"params": rest, "weight_decay": 0.0}]``.

        Weight decay pulls matrices (Linear weights, 2-D) toward zero; biases and norm
        weights are 1-D offsets and scales that decay would only distort. Embeddings are
        lookup tables of which each step touches a few rows, so by default they are not
        decayed either (``decay_embeddings=True`` decays them; a tied head follows the
        embedding). Each parameter appears once; frozen ones (requires_grad False) are left out.
        """
        embeddings = {id(p) for p in self._embedding_tables()}
        decay, no_decay = [], []
        for p in self.parameters():  # parameters() yields a tied tensor once
            if not p.requires_grad:
                continue
            if p.dim() >= 2 and (decay_embeddings or id(p) not in embeddings):
                decay.append(p)
            else:
                no_decay.append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]


def _real_tokens(attention_mask: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor | None:
    """``attention_mask`` (1/0 or bool, of ``shape`` (B, cached + T)) as bool, True at real
    tokens and False at left padding; None (no padding) stays None."""
    if attention_mask is None:
        return None
    if attention_mask.shape != shape:
        raise ValueError(f"attention_mask must be (B, cached + T) = {shape}, got {tuple(attention_mask.shape)}")
    return attention_mask.bool()


def build_model(config: ModelConfig) -> GPT | Bigram:
    """The model ``config`` describes: the bigram baseline for arch "bigram", else the Transformer."""
    return Bigram(config) if config.arch == "bigram" else GPT(config)
