"""The ``gptlab`` command: argument parsing and dispatch only; the work lives in the modules.

Every subcommand is a ``add_*`` function that declares its flags and sets ``func``, a small
function that calls into the library. A ``UserError`` becomes one ``error: ...`` line and
exit code 1; argparse's own usage errors exit with 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gptlab import __version__
from gptlab.cli.data import add_data, add_prepare, add_tokenizer
from gptlab.cli.evaluate import add_eval
from gptlab.cli.finetune import add_classify, add_finetune, add_merge
from gptlab.cli.generate import add_chat, add_sample, add_serve
from gptlab.cli.train import add_train
from gptlab.cli.viz import add_viz
from gptlab.cli.weights import add_embed, add_export, add_import
from gptlab.errors import UserError

# --- entry point ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptlab",
        description="Build a GPT from scratch: corpora, tokenizers, token shards, training and sampling.",
    )
    parser.add_argument("--version", action="version", version=f"gptlab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_data, add_tokenizer, add_prepare, add_train, add_sample, add_import, add_export, add_embed,
                add_chat, add_serve, add_finetune, add_merge, add_classify, add_eval, add_viz):
        add(sub)
    return parser


def default_out(args: argparse.Namespace) -> None:
    """Fill in output paths that depend on other flags."""
    if getattr(args, "command", None) == "prepare" and args.out is None:
        import re

        corpus = re.sub(r"[^A-Za-z0-9_.-]+", "_", args.corpus.rstrip("/").split("/")[-1]) or "corpus"
        tok = re.sub(r"[^A-Za-z0-9_.-]+", "_", args.tokenizer.split("/")[-1])
        args.out = f"data/{corpus}-{tok}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    default_out(args)
    try:
        code = args.func(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
