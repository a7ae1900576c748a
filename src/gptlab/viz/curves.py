"""Training curves of one or several runs on one chart: loss above, learning rate below."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from gptlab.errors import UserError
from gptlab.train.metrics import read_metrics
from gptlab.viz.common import output_path, pyplot, save

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGSIZE = (10.0, 7.0)
X_AXES = {"step": "optimizer step", "tokens": "tokens seen"}


def load_run(run_dir: str | Path) -> list[dict[str, float]]:
    """The rows of ``RUN_DIR/metrics.csv`` (or of the metrics.csv file given)."""
    path = Path(run_dir)
    csv_path = path / "metrics.csv" if path.is_dir() else path
    if not path.exists():
        raise UserError(f"run directory {path} does not exist; give a run directory made by gptlab train")
    if not csv_path.is_file() or csv_path.name != "metrics.csv":
        raise UserError(f"{path} holds no metrics.csv; give a run directory made by gptlab train")
    rows = read_metrics(csv_path)
    if not rows:
        raise UserError(f"{csv_path} has no rows yet; let the run log a step first")
    return rows


def series(rows: list[dict[str, float]], x: str, y: str) -> tuple[list[float], list[float]]:
    """The (x, y) points of column ``y`` against column ``x``, over the rows that have both."""
    points = [(r[x], r[y]) for r in rows if x in r and y in r and math.isfinite(r[y])]
    return [p[0] for p in points], [p[1] for p in points]


def plot_curves(runs: dict[str, list[dict[str, float]]], x: str = "step") -> Figure:
    """Each run in its own colour: train loss as a thin line, validation loss with markers
    (upper panel), learning rate (lower panel), against ``x`` ("step" or "tokens")."""
    plt = pyplot()
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=FIGSIZE, sharex=True, height_ratios=(3, 1), layout="constrained")
    for i, (name, rows) in enumerate(runs.items()):
        colour = f"C{i}"
        ax_loss.plot(*series(rows, x, "train_loss"), color=colour, alpha=0.5, linewidth=1, label=f"{name} train")
        ax_loss.plot(*series(rows, x, "val_loss"), color=colour, marker="o", markersize=3, label=f"{name} validation")
        ax_lr.plot(*series(rows, x, "lr"), color=colour, linewidth=1, label=name)
    ax_loss.set_ylabel("cross-entropy loss (nats/token)")
    ax_loss.set_title("loss: thin line = train (logged steps), dots = validation", fontsize=10)
    ax_loss.legend(fontsize=8)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel(X_AXES[x])
    for ax in (ax_loss, ax_lr):
        ax.grid(alpha=0.3)
    return fig


def run_curves(run_dirs: list[str], out: str | Path | None = None, force: bool = False, x: str = "step") -> Path:
    """Plot the metrics of every run in ``run_dirs`` on one chart and write the PNG."""
    path = output_path(out, "curves.png", force)
    if not run_dirs:
        raise UserError("no run directories given; name one or more, such as runs/shakespeare-char")
    runs = {str(run_dir): load_run(run_dir) for run_dir in run_dirs}
    return save(plot_curves(runs, x), path)
