"""The main job, measured: wall time of `gptlab train` with no arguments, and its validation loss.

    python benchmarks/default_run.py            # runs `gptlab train` in a temporary directory
    python benchmarks/default_run.py --min-lr-ratio 0   # the same with flags of `gptlab train` added

Prints the wall time of the whole command (data fetch and preparation included, from a warm
or cold cache as it happens to be), the loop's own estimate of the validation loss, and the
loss of the best checkpoint over the *entire* held-out split (the last 10% of
shakespeare-tiny, cut into consecutive block_size windows), plus the final sample.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gptlab.cache import cache_dir
from gptlab.data.batches import sliding_windows
from gptlab.data.prepare import load_prepared
from gptlab.train.metrics import read_metrics
from gptlab.weights.load import load_checkpoint


@torch.no_grad()
def full_split_loss(run_dir: Path, data_dir: Path) -> tuple[float, int]:
    loaded = load_checkpoint(run_dir)
    model = loaded.model.eval()
    tokens = load_prepared(data_dir).tokens("val")
    total, count = 0.0, 0
    for x, y in sliding_windows(tokens, model.config.block_size, batch_size=64):
        _, loss = model(x, y)
        total += loss.item() * y.numel()
        count += y.numel()
    return total / count, count


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="gptlab-default-run-"))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gptlab.cli", "train", "--no-progress", *sys.argv[1:]], cwd=workdir,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"gptlab train failed:\n{proc.stderr}")
    run_dir = workdir / "runs" / "shakespeare-char"
    rows = [r for r in read_metrics(run_dir / "metrics.csv") if "val_loss" in r]
    loss, n = full_split_loss(run_dir, cache_dir() / "prepared" / "shakespeare-tiny-char")
    print(proc.stdout.split("--- sample ---")[1].split("--------------")[0].strip("\n"))
    print("-" * 60)
    print(f"wall time of `gptlab train`: {wall:.1f} s")
    print(f"loop's last validation estimate: {rows[-1]['val_loss']:.4f} at step {int(rows[-1]['step'])}")
    print(f"best checkpoint on the whole validation split ({n:,} predictions): {loss:.4f} nats/char "
          f"({loss / math.log(2):.3f} bits/char)")
    shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
