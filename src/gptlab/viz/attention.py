"""Attention maps: how much each token attends to each earlier token, per layer and head.

The weights are the model's own: every ``CausalSelfAttention`` can record the softmax
probabilities of its reference path (``save_weights``), which the fused SDPA kernel never
materialises. They include everything the model applies (RoPE and its scaling, grouped-query
heads, a sliding window), because they are computed by the code that computes the output.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gptlab.errors import UserError
from gptlab.viz.common import inches, output_path, plot_label, pyplot, save, token_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from gptlab.model.transformer import GPT

# Figure margins in inches: room for token labels on the left and bottom, titles on top.
LEFT, RIGHT, BOTTOM, TOP = 1.5, 0.9, 1.2, 0.9
# Models deeper than this show evenly spaced layers unless --layers says which.
MAX_DEFAULT_LAYERS = 12


@torch.no_grad()
def attention_weights(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of every layer for one sequence ``ids`` (T,): (L, H, T, T) float32.

    Row i of head h in layer l holds query token i's weights over key tokens 0..T-1; each row
    sums to 1 and is zero right of the diagonal (causal). Dropout is off (eval mode) while
    recording; the model's modes and recording switches are restored afterwards.
    """
    attns = [layer.self_attn for layer in model.layers]
    was_training = model.training
    model.eval()
    try:
        for attn in attns:
            attn.save_weights = True
        model(ids[None].to(model.embed_tokens.weight.device))
        return torch.stack([attn.attn_weights[0].float().cpu() for attn in attns])  # (L, H, T, T)
    finally:
        for attn in attns:
            attn.save_weights = False
            attn.attn_weights = None
        model.train(was_training)


def parse_layers(spec: str | None, n_layer: int) -> list[int]:
    """Layer indices from ``--layers`` ("0,5,-1", negative counts from the end; "all").

    None: every layer of a model up to MAX_DEFAULT_LAYERS deep, else that many evenly spaced
    from the first to the last, so a deep model still gives a picture of sensible size.
    """
    if spec is None:
        if n_layer <= MAX_DEFAULT_LAYERS:
            return list(range(n_layer))
        step = (n_layer - 1) / (MAX_DEFAULT_LAYERS - 1)
        return sorted({round(i * step) for i in range(MAX_DEFAULT_LAYERS)})
    if spec == "all":
        return list(range(n_layer))
    layers = []
    for part in spec.split(","):
        try:
            index = int(part)
        except ValueError:
            raise UserError(f"--layers {spec!r}: {part!r} is not a layer number; give numbers such as 0,5,-1") from None
        if not -n_layer <= index < n_layer:
            raise UserError(f"--layers {spec!r}: layer {index} does not exist; the model has layers 0..{n_layer - 1}")
        layers.append(index % n_layer)
    return layers


def panel_size(n_tokens: int) -> float:
    """Side of one heatmap in inches: about 0.18 in per token, within 1.6 to 5 inches."""
    return inches(min(max(0.18 * n_tokens + 0.7, 1.6), 5.0))


def attention_figsize(n_rows: int, n_heads: int, n_tokens: int) -> tuple[float, float]:
    """(width, height) in inches of the grid: one panel per head across, one per layer down."""
    p = panel_size(n_tokens)
    return inches(LEFT + n_heads * p + RIGHT), inches(TOP + n_rows * p + BOTTOM)


def plot_attention(weights: torch.Tensor, layers: list[int], labels: list[str], title: str) -> Figure:
    """A grid of heatmaps of ``weights`` (len(layers), H, T, T): rows are layers, columns heads.

    Query tokens run down the left column's y axis, key tokens along the bottom row's x axis;
    the colour scale is the same 0..1 probability in every panel.
    """
    plt = pyplot()
    R, H, T, _ = weights.shape
    width, height = attention_figsize(R, H, T)
    fig = plt.figure(figsize=(width, height))
    axes = fig.subplots(R, H, squeeze=False, gridspec_kw={
        "left": LEFT / width, "right": 1 - RIGHT / width, "bottom": BOTTOM / height, "top": 1 - TOP / height,
        "wspace": 0.06, "hspace": 0.06})
    # A row of one panel is panel_size / T inches tall; fit the label font to it (72 pt per inch).
    fontsize = min(max(0.75 * 72 * panel_size(T) / T, 4.0), 9.0)
    image = None
    for r, layer in enumerate(layers):
        for h in range(H):
            ax = axes[r, h]
            image = ax.imshow(weights[r, h].numpy(), cmap="viridis", vmin=0.0, vmax=1.0,
                              aspect="auto", interpolation="nearest")
            # Token labels on the outer panels only; inner panels get no ticks (drawing
            # thousands of empty ticks is most of the time on a deep model).
            ax.set_xticks(range(T) if r == R - 1 else [], labels if r == R - 1 else [], rotation=90,
                          fontsize=fontsize)
            ax.set_yticks(range(T) if h == 0 else [], labels if h == 0 else [], fontsize=fontsize)
            ax.tick_params(length=0)
            if r == 0:
                ax.set_title(f"head {h}", fontsize=9)
            if h == 0:
                ax.set_ylabel(f"layer {layer}\nquery", fontsize=9)
            if r == R - 1:
                ax.set_xlabel("key (attended to)", fontsize=8)
    colorbar = fig.add_axes((1 - (RIGHT - 0.15) / width, BOTTOM / height, 0.15 / width, 1 - (BOTTOM + TOP) / height))
    fig.colorbar(image, cax=colorbar, label="attention weight")
    fig.suptitle(title, fontsize=10, y=1 - 0.1 / height, va="top")  # in the top margin, whatever the height
    return fig


def run_attention(model: str, text: str, out: str | Path | None = None, force: bool = False,
                  max_tokens: int = 32, layers: str | None = None) -> Path:
    """Draw the attention of ``model`` (any MODEL argument) over ``text`` and write the PNG."""
    from gptlab.weights.load import load_checkpoint

    path = output_path(out, "attention.png", force)
    if not text:
        raise UserError("--text is empty; give the text whose attention to draw, such as --text 'The cat sat'")
    ckpt = load_checkpoint(model)
    ids = ckpt.tokenizer.encode(text, allowed_special="all")
    if not ids:
        raise UserError(f"--text {text!r} encodes to no tokens; give some text the tokenizer keeps")
    limit = min(max_tokens, ckpt.config.block_size)
    if len(ids) > limit:
        # Attention is causal: the first `limit` tokens attend exactly as they do in the full text.
        print(f"showing the first {limit} of {len(ids)} tokens (--max-tokens {max_tokens}, "
              f"context {ckpt.config.block_size}); later tokens do not change these maps")
        ids = ids[:limit]
    chosen = parse_layers(layers, ckpt.config.n_layer)
    if layers is None and len(chosen) < ckpt.config.n_layer:
        print(f"showing {len(chosen)} of {ckpt.config.n_layer} layers ({', '.join(map(str, chosen))}); "
              "--layers all or --layers 0,5,-1 to choose")
    weights = attention_weights(ckpt.model, torch.tensor(ids))[chosen]
    cfg = ckpt.config
    heads = f"{cfg.n_head} heads" + (f" sharing {cfg.kv_heads} key/value heads" if cfg.kv_heads != cfg.n_head else "")
    title = (f"attention of {ckpt.path.name or model} ({cfg.arch}, {cfg.pos_embedding} positions, {heads}) "
             f"over {len(ids)} tokens\nrows: layers, columns: heads; each row of a map is one query's weights")
    return save(plot_attention(weights, chosen, [plot_label(token_text(ckpt.tokenizer, i)) for i in ids], title), path)
