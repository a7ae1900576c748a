"""A text cut into its tokens: each token on its own colour, with its id.

Three renderings of the same pieces: ANSI colours for the terminal, an HTML page (every piece
escaped), and a PNG. A byte-level tokenizer may split one character's UTF-8 bytes over several
tokens; such tokens are shown together as one piece carrying all their ids, so the pieces
always spell the decoded text exactly once, in order.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gptlab.cache import atomic_write_text
from gptlab.errors import UserError
from gptlab.tokenizers import SPEC_HELP, Tokenizer, build_tokenizer, load_tokenizer_file
from gptlab.viz.common import inches, output_path, plot_label, pyplot, save, token_text, visible

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Background colours cycled over the pieces: (HTML/PNG hex, nearest xterm-256 colour).
PALETTE = [("#fde2a6", 223), ("#c6e5b3", 151), ("#bfd9f2", 153), ("#f6c1c1", 217), ("#d9c8ef", 183),
           ("#c2ebe6", 158)]
RESET = "\x1b[0m"
# PNG layout: a monospace grid of CHAR_W-inch cells, each row a text line above an id line.
CHAR_W, ROW_H, MARGIN = 0.1, 0.45, 0.25


@dataclass
class Piece:
    """A stretch of the text and the ids of the tokens that spell it (usually one)."""

    text: str
    ids: list[int]


def token_pieces(tokenizer: Tokenizer, ids: list[int]) -> list[Piece]:
    """Group ``ids`` into pieces of whole characters, in order.

    A token whose bytes end inside a UTF-8 character waits for the next tokens until the
    character is complete; bytes that can never be valid UTF-8 become U+FFFD, as in decode.
    """
    pieces: list[Piece] = []
    buffer, pending = b"", []
    for token_id in ids:
        buffer += tokenizer.decode_bytes([token_id])
        pending.append(token_id)
        try:
            text = buffer.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.reason == "unexpected end of data":  # the character continues in the next token
                continue
            text = buffer.decode("utf-8", errors="replace")
        pieces.append(Piece(text, pending))
        buffer, pending = b"", []
    if pending:
        pieces.append(Piece(buffer.decode("utf-8", errors="replace"), pending))
    return pieces


def to_ansi(pieces: list[Piece]) -> str:
    """The text with one background colour per piece, newlines shown as ↵, then the ids in the
    same colours."""
    def colour(i: int) -> str:
        return f"\x1b[48;5;{PALETTE[i % len(PALETTE)][1]};38;5;16m"  # background, black text

    def paint(i: int, text: str) -> str:
        # Line breaks go outside the colour, so the background does not run to the terminal's edge.
        lines = text.split("\n")
        marked = [line + "↵" for line in lines[:-1]] + lines[-1:]
        return "\n".join(colour(i) + line + RESET if line else "" for line in marked)

    text = "".join(paint(i, p.text) for i, p in enumerate(pieces))
    ids = " ".join(colour(i) + " ".join(map(str, p.ids)) + RESET for i, p in enumerate(pieces))
    return f"{text}\n\nids: {ids}"


def to_html(pieces: list[Piece], tokenizer: Tokenizer, title: str) -> str:
    """A self-contained HTML page: the coloured text (ids on hover), then a table of tokens."""
    spans = []
    rows = []
    index = 0
    for i, piece in enumerate(pieces):
        shown = piece.text.replace("\n", "↵\n")
        ids = " ".join(map(str, piece.ids))
        spans.append(f'<span style="background:{PALETTE[i % len(PALETTE)][0]}" title="id {ids}">'
                     f"{html.escape(shown)}</span>")
        for token_id in piece.ids:
            rows.append(f"<tr><td>{index}</td><td>{token_id}</td>"
                        f"<td><code>{html.escape(token_text(tokenizer, token_id))}</code></td></tr>")
            index += 1
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em}"
            ".text{font-family:monospace;font-size:16px;white-space:pre-wrap;line-height:1.8}"
            "td{padding:0 1em;font-family:monospace}</style></head><body>\n"
            f"<h1>{html.escape(title)}</h1>\n<div class=\"text\">{''.join(spans)}</div>\n"
            "<h2>tokens</h2>\n<table><tr><th>#</th><th>id</th><th>text</th></tr>\n"
            + "\n".join(rows) + "\n</table></body></html>\n")


def layout(pieces: list[Piece], width: int) -> list[tuple[int, int, int]]:
    """(row, column, cells) of each piece on a grid ``width`` cells wide; a piece takes as many
    cells as its text or its ids need, plus a gap, and a line break in the text starts a row."""
    places = []
    row = col = 0
    for piece in pieces:
        cells = max(len(visible(piece.text)), len(" ".join(map(str, piece.ids)))) + 1
        if col and col + cells > width:
            row, col = row + 1, 0
        places.append((row, col, cells))
        col += cells
        if "\n" in piece.text:
            row, col = row + 1, 0
    return places


def tokens_figsize(n_rows: int, width: int) -> tuple[float, float]:
    """(width, height) in inches of the PNG of ``n_rows`` rows of ``width`` cells."""
    return inches(2 * MARGIN + width * CHAR_W), inches(2 * MARGIN + 0.3 + n_rows * ROW_H)


def plot_tokens(pieces: list[Piece], title: str, width: int = 80) -> Figure:
    """The pieces as coloured boxes on a character grid, each with its ids underneath."""
    plt = pyplot()
    places = layout(pieces, width)
    n_rows = places[-1][0] + 1 if places else 1
    fig_w, fig_h = tokens_figsize(n_rows, width)
    fig = plt.figure(figsize=(fig_w, fig_h))
    # Axes in inches: x counts cells, y counts rows downwards.
    ax = fig.add_axes((MARGIN / fig_w, MARGIN / fig_h, width * CHAR_W / fig_w, n_rows * ROW_H / fig_h))
    ax.set_xlim(0, width)
    ax.set_ylim(n_rows, 0)
    ax.axis("off")
    for i, (piece, (row, col, cells)) in enumerate(zip(pieces, places)):
        ax.add_patch(plt.Rectangle((col, row + 0.05), cells - 0.3, 0.55, color=PALETTE[i % len(PALETTE)][0]))
        ax.text(col + 0.1, row + 0.33, plot_label(visible(piece.text)), family="monospace", fontsize=11,
                va="center")
        ax.text(col + 0.1, row + 0.8, " ".join(map(str, piece.ids)), family="monospace", fontsize=7,
                va="center", color="dimgray")
    fig.suptitle(title, fontsize=10, y=1 - 0.12 / fig_h, va="top")
    return fig


def load_tokenizer(spec: str, text: str) -> Tokenizer:
    """The tokenizer named by ``spec``: char (built from ``text``), gpt2, bpe:N (trained on
    ``text``), a tokenizer .json file (gptlab's or Hugging Face's), or any MODEL argument
    (checkpoint or run directory, Hugging Face directory, .gguf, named model), whose tokenizer
    is used."""
    from gptlab.weights.checkpoint import TOKENIZER
    from gptlab.weights.load import load_checkpoint
    from gptlab.weights.named import NAMED_MODELS

    if spec in ("char", "gpt2") or spec.startswith(("gpt2:", "bpe:")) or (os.path.isfile(spec)
                                                                         and not spec.endswith(".gguf")):
        return build_tokenizer(spec, text)
    path = Path(spec)
    # A checkpoint or run directory: read its tokenizer.json without loading the weights.
    for folder in (path, path / "best", path / "last"):
        if (folder / TOKENIZER).is_file():
            return load_tokenizer_file(folder / TOKENIZER)
    if path.exists() or spec in NAMED_MODELS or spec.startswith("hf:"):
        return load_checkpoint(spec).tokenizer
    raise UserError(f"tokenizer {spec!r} is neither a known kind, a file nor a model; use {SPEC_HELP}, "
                    "or a checkpoint, run directory or named model")


def run_tokens(tokenizer: str, text: str, out: str | Path | None = None, force: bool = False,
               width: int = 80) -> tuple[Path, Path]:
    """Print ``text`` coloured by the tokens of ``tokenizer`` and write it as PNG and as HTML
    (next to the PNG, with the suffix .html). Returns both paths."""
    path = output_path(out, "tokens.png", force)
    html_path = path.with_suffix(".html")
    if html_path.exists() and not force:
        raise UserError(f"{html_path} already exists; choose another --out or pass --force to replace it")
    if not text:
        raise UserError("--text is empty; give the text to cut into tokens, such as --text 'Hello world'")
    tok = load_tokenizer(tokenizer, text)
    ids = tok.encode(text, allowed_special="all")
    pieces = token_pieces(tok, ids)
    decoded = "".join(p.text for p in pieces)
    print(to_ansi(pieces))
    print(f"{len(ids)} tokens, {len(text)} characters ({len(text) / max(len(ids), 1):.2f} characters per token)")
    if decoded != text:
        print("note: this tokenizer does not give the text back unchanged; the pieces spell its decoded form")
    title = f"{len(ids)} tokens of {tokenizer}"
    atomic_write_text(html_path, to_html(pieces, tok, title))
    save(plot_tokens(pieces, title, width), path)
    return path, html_path
