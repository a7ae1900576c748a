"""``gptlab train``: decide the run directory and configuration, then call the loop.

Run directories are never overwritten silently: a new run goes to ``runs/PRESET`` (numbered
``-2``, ``-3``, ... when taken) unless ``--out`` is given; an existing ``--out`` needs
``--force``, and even then only a directory that looks like a gptlab run is replaced.
``--resume DIR`` continues DIR; with ``--out OTHER`` it first copies the run there (a branch).
"""

from __future__ import annotations

import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptlab.config import DEFAULT_PRESET, PRESETS, TrainConfig, load_config_file, resolve_config
from gptlab.errors import UserError
from gptlab.weights import checkpoint as ckpt

if TYPE_CHECKING:  # the loop imports torch; commands that only parse flags should not pay for it
    from gptlab.train.loop import RunResult, SavedRun

RUN_MARKERS = ("last", "best", "metrics.csv")


def _looks_like_run(path: Path) -> bool:
    return any((path / m).exists() for m in RUN_MARKERS)


def fresh_run_dir(name: str) -> Path:
    base = Path("runs") / name
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def claim_out(out: Path, force: bool) -> None:
    """Make sure writing a run to ``out`` destroys nothing the user did not ask to replace."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a directory")
    if not force:
        raise UserError(f"--out {out} already holds a run; pass --force to replace it, --resume {out} to continue "
                        "it, or choose another --out")
    if not _looks_like_run(out):
        raise UserError(f"--out {out} is not empty and is not a gptlab run; refusing to delete it even with --force")
    shutil.rmtree(out)


def _explicit_model_keys(preset: str | None, config_file: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    if preset:
        keys.update(PRESETS[preset]["model"])
    if config_file:
        keys.update(load_config_file(config_file).get("model", {}))
    keys.update(overrides)
    keys.pop("vocab_size", None)
    return keys


def _resume_source(resume: str) -> Path:
    """The run directory ``--resume`` names: the run itself, or the run of its last/ or best/."""
    src = Path(resume)
    if src.name in ("last", "best") and (src / ckpt.WEIGHTS).exists():
        src = src.parent
    return src


def _resume_config(saved: SavedRun, run_dir: Path, preset: str | None, config_file: str | None,
                   model_overrides: dict[str, Any], train_overrides: dict[str, Any]) -> TrainConfig:
    """The saved run's training settings with the file's and the flags' on top; the model's may not change."""
    wanted = _explicit_model_keys(preset, config_file, model_overrides)
    differing = [f"{k}: run has {getattr(saved.model, k, None)!r}, asked for {v!r}"
                 for k, v in wanted.items() if getattr(saved.model, k, None) != v]
    if differing:
        raise UserError(f"cannot resume {run_dir} with a different model ({'; '.join(differing)}); "
                        "drop those settings or start a new run")
    train_d = dict(saved.train)
    if config_file:
        train_d.update(load_config_file(config_file).get("train", {}))
    train_d.update(train_overrides)
    _, train_cfg = resolve_config(None, None, saved.model.to_dict(), train_d)
    return train_cfg


def _branch(src: Path, out: str | None, force: bool) -> Path:
    """Where a resumed run goes on: in place, or (``--out OTHER``) in a copy of it."""
    if out is None or Path(out).resolve() == src.resolve():
        return src
    claim_out(Path(out), force)
    shutil.copytree(src, out, dirs_exist_ok=True)
    print(f"branching {src} into {out}")
    return Path(out)


def _new_run_dir(out: str | None, force: bool, name: str) -> Path:
    if out is None:
        return fresh_run_dir(name)
    claim_out(Path(out), force)
    return Path(out)


def summary_line(result: RunResult, took: float) -> str:
    """One line on how a run ended: why, where, how long, and its best validation loss."""
    best = "" if result.best_val_loss is None else f"; best validation loss {result.best_val_loss:.4f}"
    return (f"{result.stopped.replace('_', ' ')} after {result.step} steps ({result.tokens:,} tokens) in "
            f"{took:.0f} s{best}")


def run_training(preset: str | None = None, config_file: str | None = None, out: str | None = None,
                 resume: str | None = None, force: bool = False, model_overrides: dict[str, Any] | None = None,
                 train_overrides: dict[str, Any] | None = None, show_progress: bool = True) -> int:
    """Run ``gptlab train``; returns the process exit code (130 when stopped by Ctrl-C/SIGTERM)."""
    from gptlab.train import distributed
    from gptlab.train.loop import read_saved_run, train

    model_overrides, train_overrides = model_overrides or {}, train_overrides or {}
    saved = None
    if resume is not None:
        src = _resume_source(resume)
        saved = read_saved_run(src)  # the one read of its last checkpoint; the loop continues from it
        model_cfg = saved.model
        train_cfg = _resume_config(saved, src, preset, config_file, model_overrides, train_overrides)
        choose_run_dir = partial(_branch, src, out, force)
    else:
        if preset is None and config_file is None:
            preset = DEFAULT_PRESET
        model_cfg, train_cfg = resolve_config(preset, config_file, model_overrides, train_overrides)
        choose_run_dir = partial(_new_run_dir, out, force, preset or Path(config_file).stem)

    # The command owns the process group: it joins it before the run directory is chosen and hands it to the loop.
    with distributed.process_group(train_cfg.device) as d:
        run_dir = distributed.decided_by_main(d, choose_run_dir)  # only rank 0 changes the file system
        start = time.perf_counter()
        result = train(model_cfg, train_cfg, run_dir, resume=saved, show_progress=show_progress, d=d)
    took = time.perf_counter() - start
    code = 130 if result.stopped == "interrupted" else 0
    if d.is_main:
        _report(result, run_dir, took, code)
    return code


def _report(result: RunResult, run_dir: Path, took: float, code: int) -> None:
    """What the run left and what to do next."""
    if result.sample:  # none after Ctrl-C or SIGTERM, which save and stop at once
        print(f"\n--- sample ---\n{result.sample}\n--------------")
    print(summary_line(result, took))
    print(f"checkpoint: {ckpt.resolve_checkpoint(run_dir)}   (metrics.csv, loss.png and samples.txt in {run_dir})")
    if code:
        print(f"resume with: gptlab train --resume {run_dir}", file=sys.stderr)
    else:
        print(f"try: gptlab sample {run_dir} --prompt 'ROMEO:'")
