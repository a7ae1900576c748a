"""Three ways a Transformer knows word order, drawn as (position x dimension) heatmaps.

- sinusoidal (Vaswani et al. 2017, "Attention Is All You Need", section 3.5): a fixed table
  added to the token embeddings, PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(same);
- learned (GPT-2): a trained (block_size, C) table ``embed_positions``, also added;
- rotary (RoPE, Llama): nothing is added; queries and keys are rotated, pair i of a head by
  the angle p * theta_i. The panel shows cos and sin of those angles, which is what rotates.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gptlab.errors import UserError
from gptlab.model.config import ModelConfig
from gptlab.model.layers import rope_tables, sinusoidal_positions
from gptlab.viz.common import output_path, pyplot, save

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGSIZE = (15.0, 5.5)


def rotary(config: ModelConfig, n_positions: int) -> torch.Tensor:
    """cos and sin of each position's RoPE angles for one head, (n_positions, head_dim):
    columns 0..D/2-1 are cos(p * theta_i) of pair i, the rest sin(p * theta_i)."""
    cos, sin = rope_tables(config, n_positions)  # each (P, D), the D/2 angles repeated twice
    half = config.head_dim // 2
    return torch.cat([cos[:, :half], sin[:, :half]], dim=-1)


def plot_positions(panels: list[tuple[torch.Tensor, str, str]], title: str) -> Figure:
    """Heatmaps side by side, position down and dimension across; ``panels`` holds
    (table, panel title, x-axis label)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=FIGSIZE, layout="constrained")
    for ax, (table, name, xlabel) in zip(axes, panels):
        limit = float(table.abs().max()) or 1.0  # a symmetric scale, so 0 is the middle colour
        image = ax.imshow(table.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto",
                          interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("position")
        fig.colorbar(image, ax=ax, fraction=0.05)
    fig.suptitle(title, fontsize=11)
    return fig


def run_positions(model: str | None = None, out: str | Path | None = None, force: bool = False,
                  n_positions: int = 128, dim: int = 64, seed: int = 0) -> Path:
    """Draw the three encodings and write the PNG. With ``model``, its width, context, learned
    table (if it has one) and RoPE settings (if it uses them); without, width ``dim``."""
    path = output_path(out, "positions.png", force)
    learned, config, source = None, None, "no model given"
    if model is not None:
        from gptlab.weights.load import load_checkpoint

        ckpt = load_checkpoint(model)
        config, source = ckpt.config, f"model {ckpt.path.name or model}"
        n_positions = min(n_positions, config.block_size)
        dim = config.n_embd
        if ckpt.model.embed_positions is not None:
            learned = ckpt.model.embed_positions.weight.detach().float().cpu()[:n_positions]
    if dim % 2:
        raise UserError(f"--dim {dim} must be even: sinusoidal encodings come in sin/cos pairs")
    if learned is None:
        # As GPT.init_weights starts the table: normal(0, 0.02), before any training.
        generator = torch.Generator().manual_seed(seed)
        learned = torch.randn(n_positions, dim, generator=generator) * 0.02
        why = "this model uses RoPE, it has no learned table" if config is not None else "no checkpoint given"
        learned_title = f"learned: RANDOM INIT normal(0, 0.02), untrained\n({why})"
    else:
        learned_title = f"learned: embed_positions of {source}\n(as stored in it, added to token embeddings)"
    if config is not None and config.pos_embedding == "rope":
        rope_config, rope_note = config, f"{source}'s RoPE"
    else:
        # A single head of width `dim` with the usual base; stated in the title, not the model's.
        rope_config = ModelConfig.for_family("llama", n_embd=dim, n_head=1)
        rope_note = "not used by this model; " if config is not None else ""
        rope_note += f"theta {rope_config.rope_theta:g}, one head of width {dim}"
    D = rope_config.head_dim
    panels = [
        (sinusoidal_positions(n_positions, dim), f"sinusoidal (Vaswani et al. 2017), width {dim}\n(fixed, added to token "
                                       "embeddings)", "dimension (even: sin, odd: cos)"),
        (learned, learned_title, "dimension"),
        (rotary(rope_config, n_positions), f"rotary (RoPE), head_dim {D}: cos | sin of p * theta_i\n"
                                           f"rotates q and k, adds nothing\n({rope_note})",
         f"columns 0..{D // 2 - 1}: cos of pair i = column; then sin of the same pairs"),
    ]
    title = f"position encodings of {n_positions} positions ({source})"
    return save(plot_positions(panels, title), path)
