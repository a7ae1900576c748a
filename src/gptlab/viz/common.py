"""What every picture shares: where it is written, its size in pixels, how a token is shown."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from gptlab.cache import atomic_path
from gptlab.errors import UserError
from gptlab.tokenizers import Tokenizer

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
"""Pixels per inch of every PNG; figure sizes are kept to whole hundredths of an inch, so a
figure of (w, h) inches is exactly (round(100 w), round(100 h)) pixels."""

# Whitespace and control characters drawn visibly, so a token's edges can be seen.
VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}


def output_path(out: str | Path | None, default_name: str, force: bool) -> Path:
    """The PNG to write: ``out``, or ``viz/DEFAULT_NAME`` in the current directory.

    Checked before any work is done, so a long computation never ends in a refusal.
    """
    path = Path(out) if out is not None else Path("viz") / default_name
    if path.suffix.lower() != ".png":
        raise UserError(f"--out {path} must be a .png file; give a name ending in .png")
    if path.is_dir():
        raise UserError(f"--out {path} is a folder; give a .png file name")
    if path.exists() and not force:
        raise UserError(f"{path} already exists; choose another --out or pass --force to replace it")
    return path


def inches(x: float) -> float:
    """A figure dimension rounded to a whole number of pixels."""
    return round(x * DPI) / DPI


def pixel_size(figsize: tuple[float, float]) -> tuple[int, int]:
    """(width, height) in pixels of a figure of ``figsize`` inches saved by ``save``."""
    return round(figsize[0] * DPI), round(figsize[1] * DPI)


def pyplot():  # noqa: ANN201 - the matplotlib.pyplot module
    """matplotlib.pyplot on the Agg backend: files only, no window, works without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` to ``path`` atomically and close it.

    No ``bbox_inches="tight"``: the file has exactly the size the layout asked for.
    """
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # Tokens may hold characters (CJK, emoji) the bundled fonts lack: they are drawn as
        # boxes, and the terminal and HTML renderings show them; one warning each is noise.
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(tmp, dpi=DPI, format="png")
    pyplot().close(fig)
    return path


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """The text of one token with its whitespace made visible; bytes that are not whole UTF-8
    characters (a piece of a multi-byte character) are shown as hex, ``<e2 80>``."""
    raw = tokenizer.decode_bytes([token_id])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "<" + " ".join(f"{b:02x}" for b in raw) + ">"
    return visible(text)


def visible(text: str) -> str:
    """``text`` with whitespace and other unprintable characters replaced by visible marks."""
    return "".join(VISIBLE.get(c, c if c.isprintable() else f"\\x{ord(c):02x}") for c in text)


def plot_label(text: str) -> str:
    """``text`` with ``$`` escaped, so that matplotlib shows it instead of reading ``$...$`` as
    mathematics."""
    return text.replace("$", r"\$")
