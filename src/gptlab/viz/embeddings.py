"""Token embeddings seen in two dimensions, and which tokens lie close to which.

Each token id has a learned vector (a row of ``embed_tokens``, (V, C)). PCA keeps the two
directions along which those vectors vary most (a linear view, distances roughly kept); t-SNE
places points so that near neighbours in C dimensions stay near (a non-linear view: clusters
mean something, distances between clusters do not).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from gptlab.errors import UserError
from gptlab.tokenizers import Tokenizer
from gptlab.viz.common import inches, output_path, plot_label, pyplot, save, token_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# t-SNE needs a handful of points to mean anything.
MIN_POINTS = 5


def project(vectors: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """PCA and t-SNE coordinates of ``vectors`` (N, C), each (N, 2), and the share of the
    variance the two principal components explain."""
    try:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits
    except ImportError:
        raise UserError("gptlab viz embeddings needs scikit-learn: pip install \"gptlab[viz]\"") from None

    pca = PCA(n_components=2, random_state=seed)
    pca_xy = pca.fit_transform(vectors)
    # Perplexity is about the number of neighbours each point is fitted to; it must stay below N.
    perplexity = min(30.0, (len(vectors) - 1) / 3)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    # scikit-learn ships its own OpenMP runtime; once torch's has run, their threads spin
    # against each other and t-SNE of 300 tokens took 75 s instead of 3 s on 2 cores.
    with threadpool_limits(1, user_api="openmp"):
        tsne_xy = tsne.fit_transform(vectors)
    return pca_xy, tsne_xy, float(pca.explained_variance_ratio_.sum())


def nearest(embeddings: torch.Tensor, token_id: int, k: int) -> list[tuple[int, float]]:
    """The ``k`` tokens whose embeddings (rows of (V, C)) have the highest cosine similarity to
    ``token_id``'s, itself excluded: [(id, cosine), ...], most similar first."""
    unit = torch.nn.functional.normalize(embeddings.float(), dim=-1)  # (V, C)
    cos = unit @ unit[token_id]  # (V,)
    cos[token_id] = -float("inf")
    top = cos.topk(min(k, len(cos) - 1))
    return list(zip(top.indices.tolist(), top.values.tolist()))


def parse_token(tokenizer: Tokenizer, spec: str) -> int:
    """The id named by ``--neighbours``: text that is exactly one token, or ``id:N``."""
    if spec.startswith("id:"):
        try:
            token_id = int(spec[3:])
        except ValueError:
            raise UserError(f"--neighbours {spec!r}: expected id:NUMBER such as id:42") from None
        if not 0 <= token_id < tokenizer.vocab_size:
            raise UserError(f"--neighbours {spec!r}: ids run from 0 to {tokenizer.vocab_size - 1}")
        return token_id
    ids = tokenizer.encode(spec, allowed_special="all")
    if len(ids) != 1:
        raise UserError(f"--neighbours {spec!r} is {len(ids)} tokens {ids}, not one; give a single token "
                        "(mind a leading space) or id:NUMBER")
    return ids[0]


def embeddings_figsize(n_points: int) -> tuple[float, float]:
    """(width, height) in inches: two square panels that grow with the number of labels."""
    side = min(max(5.0 + n_points / 60, 6.0), 12.0)
    return inches(2 * side), inches(side + 0.6)


def plot_embeddings(pca_xy: np.ndarray, tsne_xy: np.ndarray, labels: list[str], explained: float,
                    title: str) -> Figure:
    """PCA and t-SNE scatter plots side by side, each point labelled with its token."""
    plt = pyplot()
    fig, (ax_pca, ax_tsne) = plt.subplots(1, 2, figsize=embeddings_figsize(len(labels)), layout="constrained")
    fontsize = 7 if len(labels) <= 150 else 5
    panels = ((ax_pca, pca_xy, f"PCA: the 2 directions of most variance ({explained:.0%} of it)"),
              (ax_tsne, tsne_xy, "t-SNE: near neighbours kept near (distances between clusters mean little)"))
    for ax, xy, name in panels:
        ax.scatter(xy[:, 0], xy[:, 1], s=6, color="tab:blue", alpha=0.5)
        for (x, y), label in zip(xy, labels):
            ax.annotate(label, (x, y), fontsize=fontsize, alpha=0.8, xytext=(2, 2), textcoords="offset points")
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=11)
    return fig


def run_embeddings(model: str, out: str | Path | None = None, force: bool = False, count: int = 200,
                   start: int = 0, neighbours: list[str] | None = None, k: int = 8, seed: int = 0) -> Path:
    """Plot ``count`` token embeddings of ``model`` from id ``start``, print the neighbours of
    each token in ``neighbours`` (over the whole vocabulary), and write the PNG."""
    from gptlab.weights.load import load_checkpoint

    path = output_path(out, "embeddings.png", force)
    ckpt = load_checkpoint(model)
    table = ckpt.model.embed_tokens.weight.detach().float().cpu()  # (V, C)
    V = table.shape[0]
    if not 0 <= start < V:
        raise UserError(f"--start {start} is outside the vocabulary of {V} tokens; give 0 to {V - 1}")
    stop = min(start + count, V)
    if stop - start < MIN_POINTS:
        raise UserError(f"ids {start}..{stop - 1} are only {stop - start} tokens; plot at least {MIN_POINTS} "
                        "(lower --start or raise --count)")
    queries = [parse_token(ckpt.tokenizer, spec) for spec in neighbours or []]
    if queries:
        print("nearest neighbours by cosine similarity of the token embeddings:")
    for token_id in queries:
        near = ", ".join(f"{token_text(ckpt.tokenizer, i)} ({i}) {c:.3f}" for i, c in nearest(table, token_id, k))
        print(f"  {token_text(ckpt.tokenizer, token_id)} ({token_id}): {near}")
    pca_xy, tsne_xy, explained = project(table[start:stop].numpy(), seed)
    labels = [plot_label(token_text(ckpt.tokenizer, i)) for i in range(start, stop)]
    title = (f"token embeddings of {ckpt.path.name or model}: ids {start}..{stop - 1} of {V} "
             f"({table.shape[1]} dimensions each)")
    return save(plot_embeddings(pca_xy, tsne_xy, labels, explained, title), path)
