"""BERT: an encoder-only Transformer that reads the whole text at once, in both directions.

Where the decoder in ``transformer.py`` predicts the next token and so may only look back,
an encoder gives every token a vector that depends on every other token of the text. BERT
(Devlin et al. 2018) was trained to fill in masked tokens (the MLM head below); its hidden
states, averaged over a sentence, make sentence embeddings (``gptlab.inference.embed``).

It differs from GPT-2 in four places: a third embedding (the token type, "sentence A or B"),
a LayerNorm right after the embeddings, *post*-norm blocks (normalise after adding each
branch, as the 2017 Transformer did), and the exact (erf) GELU. Attention is the same module
as the decoder's, given a padding mask instead of the causal one.

Parameter names follow gptlab's Llama-style tree; ``gptlab.weights.bert`` maps Hugging Face's
``BertModel`` / ``BertForMaskedLM`` names onto them one to one:

    embed_tokens.weight                      (V, C)       embeddings.word_embeddings
    embed_positions.weight                   (P, C)       embeddings.position_embeddings
    embed_token_types.weight                 (types, C)   embeddings.token_type_embeddings
    embed_layernorm.{weight,bias}            (C,)         embeddings.LayerNorm
    layers.N.self_attn.{q,k,v}_proj.{weight,bias}         encoder.layer.N.attention.self.{query,key,value}
    layers.N.self_attn.o_proj.{weight,bias}               encoder.layer.N.attention.output.dense
    layers.N.post_attention_layernorm.{weight,bias}       encoder.layer.N.attention.output.LayerNorm
    layers.N.mlp.up_proj.{weight,bias}       (I, C)       encoder.layer.N.intermediate.dense
    layers.N.mlp.down_proj.{weight,bias}     (C, I)       encoder.layer.N.output.dense
    layers.N.post_mlp_layernorm.{weight,bias}             encoder.layer.N.output.LayerNorm
    mlm_head.dense.{weight,bias}             (C, C)       cls.predictions.transform.dense
    mlm_head.layernorm.{weight,bias}                      cls.predictions.transform.LayerNorm
    mlm_head.bias                            (V,)         cls.predictions.bias

The MLM decoder matrix is ``embed_tokens.weight`` itself (tied), so it has no entry.
Shapes: B = batch, T = tokens, C = hidden_size, V = vocab_size, P = max_position_embeddings,
I = intermediate_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.errors import Problems, Settings, UserError, is_int
from gptlab.model.config import ModelConfig
from gptlab.model.layers import CausalSelfAttention, LayerNorm


@dataclass
class BertConfig(Settings):
    """Hyper-parameters of a BERT encoder, named as in Hugging Face's ``BertConfig``.

    Defaults are BERT-base (110M). ``weights.bert.config_from_hf`` reads a config.json into it.
    """

    WHAT = "BERT config"

    vocab_size: int = 30522
    """Number of token ids (WordPiece vocabulary); the MLM head scores all of them."""
    hidden_size: int = 768
    """Width C of the residual stream; must be divisible by num_attention_heads."""
    num_hidden_layers: int = 12
    """Number of encoder blocks."""
    num_attention_heads: int = 12
    """Attention heads per block, each hidden_size // num_attention_heads wide."""
    intermediate_size: int = 3072
    """Hidden width of each block's MLP (4 x hidden_size in BERT)."""
    max_position_embeddings: int = 512
    """Rows of the learned position table: the longest input, [CLS] and [SEP] included."""
    type_vocab_size: int = 2
    """Number of token types (segment A / B for sentence pairs)."""
    layer_norm_eps: float = 1e-12
    """Added to the variance in every LayerNorm (BERT uses 1e-12, far below GPT-2's 1e-5)."""
    hidden_dropout_prob: float = 0.1
    """Dropout on the embeddings and on each branch's output before it is added back."""
    attention_probs_dropout_prob: float = 0.1
    """Dropout on the attention probabilities."""
    initializer_range: float = 0.02
    """Standard deviation of the normal initialisation of embeddings and Linear weights."""
    pad_token_id: int = 0
    """Id of [PAD], the token that fills short texts up to the batch's length."""
    mlm_head: bool = True
    """Whether the model carries the masked-LM head (BertForMaskedLM) or only the encoder
    (BertModel, as sentence-embedding checkpoints ship)."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def _check(self, p: Problems) -> None:
        p.whole("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size")
        heads_ok = is_int(self.hidden_size) and is_int(self.num_attention_heads) and self.num_attention_heads > 0
        p.add(not heads_ok or self.hidden_size % self.num_attention_heads == 0,
              f"{p.said('hidden_size')} must be divisible by {p.said('num_attention_heads')}")
        p.positive("layer_norm_eps", "initializer_range")
        p.within("hidden_dropout_prob", 0.0, 1.0)
        p.within("attention_probs_dropout_prob", 0.0, 1.0)
        p.must(is_int(self.pad_token_id) and 0 <= self.pad_token_id
               and not (is_int(self.vocab_size) and self.pad_token_id >= self.vocab_size),
               "pad_token_id", f"a token id below {p.spell('vocab_size')}")
        p.boolean("mlm_head")

    def attention_config(self) -> ModelConfig:
        """The ``ModelConfig`` that makes ``CausalSelfAttention`` BERT's attention: full-width
        heads with biases. Causality comes only from the mask, and BERT always passes one."""
        return ModelConfig(vocab_size=self.vocab_size, block_size=self.max_position_embeddings,
                           n_layer=self.num_hidden_layers, n_head=self.num_attention_heads,
                           n_embd=self.hidden_size, dropout=self.attention_probs_dropout_prob, bias=True)


class BertMLP(nn.Module):
    """down(gelu(up(x))) with the exact GELU, x * Phi(x) through erf, which BERT was trained
    with (``layers.MLP`` uses GPT-2's tanh approximation, about 1e-3 away)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.gelu(self.up_proj(x))))  # (B, T, I) -> (B, T, C)


class BertBlock(nn.Module):
    """One post-norm block: x = LN(x + attn(x)), then x = LN(x + mlp(x)).

    Normalising after the residual sum (not before each branch, as the decoder does) is the
    original Transformer's order; BERT's weights were trained with it, so it must be kept.
    """

    def __init__(self, config: BertConfig, layer_idx: int) -> None:
        super().__init__()
        C, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = CausalSelfAttention(config.attention_config(), layer_idx)
        # The attention output is dropped at the hidden rate, its probabilities at the attention rate.
        self.self_attn.resid_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.post_attention_layernorm = LayerNorm(C, bias=True, eps=eps)
        self.mlp = BertMLP(config)
        self.post_mlp_layernorm = LayerNorm(C, bias=True, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.post_attention_layernorm(x + self.self_attn(x, mask=mask))  # (B, T, C)
        return self.post_mlp_layernorm(x + self.mlp(x))


class BertMLMHead(nn.Module):
    """Scores every vocabulary token at every position: dense + GELU + LayerNorm, then the
    tied (V, C) word-embedding matrix and a per-token bias."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layernorm = LayerNorm(config.hidden_size, bias=True, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.empty(config.vocab_size))

    def forward(self, h: torch.Tensor, embed_tokens: torch.Tensor) -> torch.Tensor:
        h = self.layernorm(F.gelu(self.dense(h)))  # (B, T, C)
        return h @ embed_tokens.t() + self.bias  # (B, T, V)


class Bert(nn.Module):
    """A BERT encoder, every layer written out; ``forward`` gives hidden states (B, T, C)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        C = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, C)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, C)
        self.embed_token_types = nn.Embedding(config.type_vocab_size, C)
        self.embed_layernorm = LayerNorm(C, bias=True, eps=config.layer_norm_eps)
        self.embed_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList(BertBlock(config, i) for i in range(config.num_hidden_layers))
        self.mlm_head = BertMLMHead(config) if config.mlm_head else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Give every parameter its starting value; the only place initialisation happens.

        As BERT's own recipe (``initializer_range`` = 0.02 by default):
        - ``embed_tokens``, ``embed_positions``, ``embed_token_types``: normal(0, initializer_range)
        - every Linear weight (q/k/v/o projections, MLP, MLM dense): normal(0, initializer_range)
        - every Linear bias and ``mlm_head.bias``: 0
        - every LayerNorm: weight 1, bias 0
        Post-norm blocks renormalise the residual stream after each branch, so unlike the
        pre-norm decoder no 1/sqrt(layers) scaling of the output projections is needed.
        """
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Embedding, nn.Linear)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
            elif isinstance(module, LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.mlm_head is not None:
            nn.init.zeros_(self.mlm_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, T, C) of ``input_ids`` (B, T).

        ``attention_mask`` (B, T): 1 (or True) for real tokens, 0 for padding; None means no
        padding. Padding keys are hidden from every query, so a text's vectors do not depend
        on how much padding its batch needed. ``token_type_ids`` (B, T): segment of each
        token, None means all 0 (one sentence).
        """
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise UserError(f"{T} tokens exceed BERT's {self.config.max_position_embeddings} positions; "
                            "truncate the input")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(T, device=input_ids.device)
        # Three lookups summed: what the token is, where it is, which segment; (B, T, C).
        x = self.embed_tokens(input_ids) + self.embed_positions(positions) + self.embed_token_types(token_type_ids)
        x = self.embed_dropout(self.embed_layernorm(x))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # (B, 1, 1, T) bool, True = attend: broadcasts over heads and queries, so every query
        # sees every real token before and after it and no padding.
        mask = attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def mlm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Masked-LM scores (B, T, V): at each position, how likely each token is to belong there."""
        if self.mlm_head is None:
            raise UserError("this BERT has no masked-LM head (it was loaded from a BertModel checkpoint); "
                            "use a BertForMaskedLM checkpoint for mlm_logits")
        return self.mlm_head(self.forward(input_ids, attention_mask, token_type_ids), self.embed_tokens.weight)

    def num_parameters(self) -> int:
        """Number of distinct parameters (the tied MLM decoder is the embedding, counted once)."""
        return sum(p.numel() for p in self.parameters())
