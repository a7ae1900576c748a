"""What a run leaves behind to look at: metrics.csv, TensorBoard events and loss.png.

``metrics.csv`` has one row per logged step with the columns in ``COLUMNS``; evaluation
columns are filled on the rows where an evaluation ran and empty elsewhere. A resumed run
appends to the same file.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

COLUMNS = ["step", "tokens", "elapsed_s", "lr", "train_loss", "grad_norm", "tokens_per_s",
           "eval_train_loss", "val_loss", "val_ppl", "val_bits_per_byte", "val_accuracy"]


class MetricsLogger:
    """Writes each metrics row to CSV and TensorBoard as it comes."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.run_dir = run_dir
        self.csv_path = run_dir / "metrics.csv"
        new = not self.csv_path.exists()
        self._file = open(self.csv_path, "a", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=COLUMNS)
        if new:
            self._csv.writeheader()
        self._tb = None
        if tensorboard:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, row: dict[str, float]) -> None:
        self._csv.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._file.flush()
        if self._tb is not None:
            step = int(row["step"])
            for key, value in row.items():
                if key not in ("step", "elapsed_s") and value is not None:
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(csv_path: Path) -> list[dict[str, float]]:
    """Rows of a metrics.csv as floats (empty cells are left out of each row)."""
    with open(csv_path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def plot_loss(csv_path: Path, out: Path, title: str = "") -> None:
    """Train and validation loss against step, with the learning rate on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(csv_path)
    train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r and math.isfinite(r["train_loss"])]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    lr = [(r["step"], r["lr"]) for r in rows if "lr" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss (logged steps)", color="tab:blue", alpha=0.6, linewidth=1)
    if val:
        ax.plot(*zip(*val), label="validation loss", color="tab:red", marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.grid(alpha=0.3)
    if lr:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lr), color="tab:gray", linestyle="--", linewidth=1, label="learning rate")
        ax2.set_ylabel("learning rate")
        lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
        ax.legend(lines, labels, loc="upper right")
    else:
        ax.legend(loc="upper right")
    ax.set_title(title or csv_path.parent.name)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
