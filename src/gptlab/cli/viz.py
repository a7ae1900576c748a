"""``gptlab viz``: argument parsing for the pictures; the work lives in ``gptlab.viz``.

``gptlab.cli`` calls ``add_viz(sub)``; each sub-subcommand sets ``func``, which writes its PNG
and prints the path.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gptlab.cli.args import positive_int

MODEL_HELP = "checkpoint, run directory, Hugging Face directory, .gguf file or named model (smollm2-135m-instruct)"


def _wrote(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as image:
        print(f"wrote {path} ({image.width} x {image.height} pixels)")


def _attention(args: argparse.Namespace) -> None:
    from gptlab.viz.attention import run_attention

    _wrote(run_attention(args.model, args.text, args.out, args.force, max_tokens=args.max_tokens, layers=args.layers))


def _embeddings(args: argparse.Namespace) -> None:
    from gptlab.viz.embeddings import run_embeddings

    _wrote(run_embeddings(args.model, args.out, args.force, count=args.count, start=args.start,
                          neighbours=args.neighbours, k=args.k, seed=args.seed))


def _tokens(args: argparse.Namespace) -> None:
    from gptlab.viz.tokens import run_tokens

    png, html = run_tokens(args.tokenizer, args.text, args.out, args.force, width=args.width)
    _wrote(png)
    print(f"wrote {html}")


def _curves(args: argparse.Namespace) -> None:
    from gptlab.viz.curves import run_curves

    _wrote(run_curves(args.run_dirs, args.out, args.force, x=args.x))


def _positions(args: argparse.Namespace) -> None:
    from gptlab.viz.positions import run_positions

    _wrote(run_positions(args.model, args.out, args.force, n_positions=args.positions, dim=args.dim, seed=args.seed))


def _out_flags(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--out", default=None, metavar="FILE.png", help=f"PNG to write (default: viz/{name}.png)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


def add_viz(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("viz", help="draw attention maps, embeddings, tokens, training curves, positions",
                       description="Draw pictures of a model and its data as PNG files (default: under viz/). "
                                   "An existing file is replaced only with --force.")
    vsub = p.add_subparsers(dest="viz_command", required=True, metavar="{attention,embeddings,tokens,curves,positions}")

    pa = vsub.add_parser("attention", help="attention weights of every layer and head over a text",
                         description="A grid of heatmaps, one per layer (rows) and head (columns): how much each "
                                     "token (row) attends to each earlier token (column), as the model computes it.")
    pa.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    pa.add_argument("--text", required=True, help="the text whose attention to draw")
    pa.add_argument("--max-tokens", type=positive_int, default=32,
                    help="draw at most this many tokens, the first ones (default: 32)")
    pa.add_argument("--layers", default=None,
                    help="layers to draw: all, or numbers such as 0,5,-1 (default: all up to 12 layers, else 12 "
                         "evenly spaced)")
    _out_flags(pa, "attention")
    pa.set_defaults(func=_attention)

    pe = vsub.add_parser("embeddings", help="token embeddings in 2-D (PCA and t-SNE) and nearest neighbours",
                         description="Project token embeddings to two dimensions by PCA and by t-SNE, side by side, "
                                     "labelled with their tokens; print the nearest neighbours (cosine) of chosen "
                                     "tokens over the whole vocabulary. Needs scikit-learn.")
    pe.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    pe.add_argument("--count", type=positive_int, default=200, help="how many tokens to plot (default: 200)")
    pe.add_argument("--start", type=int, default=0,
                    help="first token id to plot; byte-level BPE's merged tokens start at 256 (default: 0)")
    pe.add_argument("--neighbours", action="append", default=None, metavar="TOKEN",
                    help="print the nearest neighbours of TOKEN (text that is one token, or id:N; repeatable)")
    pe.add_argument("--k", type=positive_int, default=8, help="neighbours printed per token (default: 8)")
    pe.add_argument("--seed", type=int, default=0, help="random seed of t-SNE (default: 0)")
    _out_flags(pe, "embeddings")
    pe.set_defaults(func=_embeddings)

    pt = vsub.add_parser("tokens", help="a text coloured by its tokens (terminal, HTML, PNG)",
                         description="Print the text with each token on its own colour and the ids listed, and write "
                                     "it as a PNG and as an HTML page next to it (same name, .html).")
    pt.add_argument("tokenizer", metavar="TOKENIZER",
                    help="char (built from the text), gpt2, bpe:N (trained on the text), a tokenizer .json file, "
                         "or a MODEL (" + MODEL_HELP + ")")
    pt.add_argument("--text", required=True, help="the text to cut into tokens")
    pt.add_argument("--width", type=positive_int, default=80, help="characters per line of the PNG (default: 80)")
    _out_flags(pt, "tokens")
    pt.set_defaults(func=_tokens)

    pc = vsub.add_parser("curves", help="loss and learning rate of one or several runs on one chart",
                         description="Train loss, validation loss and learning rate from each run's metrics.csv, "
                                     "one colour per run.")
    pc.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directory made by gptlab train (or its "
                                                                     "metrics.csv)")
    pc.add_argument("--x", choices=("step", "tokens"), default="step",
                    help="horizontal axis: optimizer steps, or tokens seen to compare runs of different batch sizes "
                         "(default: step)")
    _out_flags(pc, "curves")
    pc.set_defaults(func=_curves)

    pp = vsub.add_parser("positions", help="sinusoidal, learned and rotary position encodings side by side",
                         description="Draw the fixed sinusoidal encoding, a learned position table (a model's, or a "
                                     "random initialisation, as the title says) and RoPE's rotation angles.")
    pp.add_argument("model", nargs="?", default=None, metavar="MODEL",
                    help="take the width, context, learned table and RoPE settings from this model (default: none)")
    pp.add_argument("--positions", type=positive_int, default=128,
                    help="number of positions drawn, at most the model's context (default: 128)")
    pp.add_argument("--dim", type=positive_int, default=64, help="width without a MODEL (default: 64)")
    pp.add_argument("--seed", type=int, default=0, help="seed of the random learned table (default: 0)")
    _out_flags(pp, "positions")
    pp.set_defaults(func=_positions)
