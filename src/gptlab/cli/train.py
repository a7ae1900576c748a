"""``gptlab train``: the flags come from the config dataclasses."""

from __future__ import annotations

import argparse

from gptlab.cli.args import add_config_flags, given

# --- gptlab train --------------------------------------------------------------------------

MODEL_FLAGS: list[str] = []
TRAIN_FLAGS: list[str] = []


def _train(args: argparse.Namespace) -> int:
    from gptlab.train.run import run_training

    return run_training(preset=args.preset, config_file=args.config, out=args.out, resume=args.resume,
                        force=args.force, model_overrides=given(args, MODEL_FLAGS),
                        train_overrides=given(args, TRAIN_FLAGS), show_progress=not args.no_progress)


def add_train(sub: argparse._SubParsersAction) -> None:
    from gptlab.config import DEFAULT_PRESET, PRESETS, TrainConfig
    from gptlab.model.config import ModelConfig

    p = sub.add_parser(
        "train", help="train a GPT (default: character-level Shakespeare on the CPU)",
        description="Train a GPT from scratch. With no arguments: fetch shakespeare-tiny, prepare it at character "
                    f"level and train the {DEFAULT_PRESET} preset. Settings combine as defaults < --preset < "
                    "--config < flags.")
    p.add_argument("--preset", default=None, choices=list(PRESETS), metavar="NAME",
                   help=f"one of {', '.join(PRESETS)} (default: {DEFAULT_PRESET} unless --config is given)")
    p.add_argument("--config", default=None, metavar="FILE", help='JSON file {"model": {...}, "train": {...}}')
    p.add_argument("--out", default=None, metavar="DIR", help="run directory (default: runs/PRESET, numbered if taken)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR exactly where it stopped")
    p.add_argument("--force", action="store_true", help="replace an existing run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    default = PRESETS[DEFAULT_PRESET]
    MODEL_FLAGS[:] = add_config_flags(p.add_argument_group("model shape"), ModelConfig, default["model"],
                                      skip=("vocab_size", "arch"))
    TRAIN_FLAGS[:] = add_config_flags(p.add_argument_group("training"), TrainConfig, default["train"])
    p.set_defaults(func=_train)
