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
from gptlab.errors import UserError


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


def _fraction(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {v}")
    return v


def _json_object(s: str) -> dict:
    import json

    try:
        v = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r} ({e.msg})") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"rope_type\": \"linear\"}}', got {s!r}")
    return v


# --- gptlab data ---------------------------------------------------------------------------

def _data_list(args: argparse.Namespace) -> None:
    from gptlab.data.sources import CORPORA, DEFAULT_CORPUS

    for name, corpus in CORPORA.items():
        mark = " (default)" if name == DEFAULT_CORPUS else ""
        print(f"{name:18} {corpus.description}{mark}")


def _data_fetch(args: argparse.Namespace) -> None:
    from gptlab.data.sources import fetch_named

    path = fetch_named(args.name, force=args.force)
    print(f"{args.name}: {path} ({path.stat().st_size:,} bytes)")


def add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="list and fetch named corpora", description="List and fetch named corpora.")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="{list,fetch}")
    pl = dsub.add_parser("list", help="list the named corpora", description="List the named corpora.")
    pl.set_defaults(func=_data_list)
    pf = dsub.add_parser("fetch", help="download a named corpus into the cache",
                         description="Download a named corpus into the cache ($GPTLAB_CACHE, default "
                                     "~/.cache/gptlab); a second fetch reuses it.")
    pf.add_argument("name", help="corpus name, see `gptlab data list`")
    pf.add_argument("--force", action="store_true", help="rebuild the cached corpus text even if present")
    pf.set_defaults(func=_data_fetch)


# --- gptlab tokenizer ----------------------------------------------------------------------

def _tokenizer_train(args: argparse.Namespace) -> None:
    import os
    import time

    from gptlab.data.sources import load_corpus
    from gptlab.tokenizers import BPETokenizer
    from gptlab.tokenizers.bpe import PATTERNS

    if os.path.exists(args.out) and not args.force:
        raise UserError(f"{args.out} already exists; choose another --out or pass --force to replace it")
    pattern = PATTERNS.get(args.pattern, args.pattern)
    text = load_corpus(args.corpus, errors="replace" if args.replace_bad_bytes else "strict").text
    start = time.perf_counter()
    tok = BPETokenizer.train(text, vocab_size=args.vocab_size, pattern=pattern, special_tokens=args.special or ["<|endoftext|>"])
    took = time.perf_counter() - start
    tok.save(args.out)
    n = len(tok.encode(text))
    print(f"wrote {args.out}: vocabulary {tok.vocab_size:,} in {took:.1f} s; "
          f"{len(text.encode('utf-8')) / max(n, 1):.2f} bytes per token on the training text")


def add_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer",
                       description="Train tokenizers.")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="{train}")
    pt = tsub.add_parser("train", help="train byte-level BPE on a corpus",
                         description="Learn a byte-level BPE vocabulary from a corpus and save it as one JSON file.")
    pt.add_argument("--corpus", default="shakespeare-tiny",
                    help="corpus name, file, folder, glob or URL (default: shakespeare-tiny)")
    pt.add_argument("--vocab-size", type=_positive_int, default=4096,
                    help="size of the vocabulary, at least 256 + special tokens (default: 4096)")
    pt.add_argument("--out", required=True, help="where to write the tokenizer .json")
    pt.add_argument("--pattern", default="gpt2",
                    help="pre-tokenisation regex: gpt2, gpt4, or a regular expression (default: gpt2)")
    pt.add_argument("--special", action="append", default=None, metavar="TOKEN",
                    help="add a special token (repeatable; default: <|endoftext|>)")
    pt.add_argument("--replace-bad-bytes", action="store_true",
                    help="replace invalid UTF-8 in the corpus instead of stopping")
    pt.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    pt.set_defaults(func=_tokenizer_train)


# --- gptlab prepare ------------------------------------------------------------------------

def _prepare(args: argparse.Namespace) -> None:
    from gptlab.data.prepare import prepare

    prepare(args.corpus, args.tokenizer, args.out, val_fraction=args.val_fraction, force=args.force,
            errors="replace" if args.replace_bad_bytes else "strict")


def add_prepare(sub: argparse._SubParsersAction) -> None:
    from gptlab.tokenizers import SPEC_HELP

    p = sub.add_parser("prepare", help="encode a corpus into token shards",
                       description="Encode a corpus into train.bin / val.bin token shards plus meta.json "
                                   "and tokenizer.json. Re-running with the same inputs reuses the result.")
    p.add_argument("--corpus", default="shakespeare-tiny",
                   help="corpus name, file, folder, glob or URL (default: shakespeare-tiny)")
    p.add_argument("--tokenizer", default="char", help=f"{SPEC_HELP} (default: char)")
    p.add_argument("--out", default=None, help="output directory (default: data/CORPUS-TOKENIZER)")
    p.add_argument("--val-fraction", type=_fraction, default=0.1,
                   help="fraction at the end of the text kept for validation (default: 0.1)")
    p.add_argument("--replace-bad-bytes", action="store_true",
                   help="replace invalid UTF-8 in the corpus instead of stopping")
    p.add_argument("--force", action="store_true", help="replace --out if it holds other data")
    p.set_defaults(func=_prepare)


# --- flags generated from the config dataclasses ---------------------------------------------

def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field (Python keeps these only in the source)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def add_config_flags(group: argparse._ArgumentGroup, cls: type, preset: dict, skip: tuple[str, ...] = ()) -> list[str]:
    """One flag per dataclass field (``n_layer`` -> ``--n-layer``), typed from its annotation.

    The help shows the value a plain ``gptlab train`` uses: the default preset's where it sets
    one (``preset``), else the dataclass default.

    Defaults are suppressed so the namespace holds only flags the user gave: they override the
    preset and config file, and everything else keeps its layered value.
    """
    import dataclasses

    docs = field_docs(cls)
    names = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type).replace(" | None", "")
        default = f"{preset[f.name]} in the default preset" if f.name in preset else f.default
        help_text = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")
        if kind == "bool":
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            conv = {"int": int, "float": float, "str": str}.get(kind, _json_object)  # dict fields take JSON
            group.add_argument(flag, dest=f.name, type=conv, default=argparse.SUPPRESS,
                               metavar=kind.upper() if conv is not _json_object else "JSON", help=help_text)
        names.append(f.name)
    return names


def given(args: argparse.Namespace, names: list[str]) -> dict:
    return {n: getattr(args, n) for n in names if hasattr(args, n)}


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


# --- gptlab sample -------------------------------------------------------------------------

def _sample(args: argparse.Namespace) -> None:
    from gptlab.inference.run import run_sample

    run_sample(args.model, prompt=args.prompt, num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
               temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k, top_p=args.top_p,
               min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, device=args.device)


def add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate text from a trained model",
                       description="Generate text from a checkpoint, streaming it to stdout.")
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="a run directory or checkpoint directory (default: the newest run under runs/)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--num-samples", type=_positive_int, default=1, help="how many samples (default: 1)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=500, help="tokens per sample (default: 500)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="divide logits by this; lower is more conservative, 0 is greedy (default: 0.8)")
    p.add_argument("--top-k", type=_positive_int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample only from the smallest set of tokens whose probability reaches p")
    p.add_argument("--min-p", type=float, default=None,
                   help="drop tokens less likely than min_p times the most likely one")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="above 1 discourages repeating earlier tokens (default: off)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (temperature 0)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    p.set_defaults(func=_sample)


def _refuse_overwrite(out: "Path", force: bool) -> None:
    """Nothing a user made is replaced without --force: an existing file or a non-empty folder."""
    if not force and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists; choose another --out or pass --force to replace it")


# --- gptlab import / export -------------------------------------------------------------------

def _import(args: argparse.Namespace) -> None:
    from pathlib import Path

    from gptlab.train.checkpoint import resolve_model_source
    from gptlab.weights.gguf import import_gguf, save_gguf_import
    from gptlab.weights.hf import import_hf, is_hf_dir, save_imported

    out = Path(args.out)
    _refuse_overwrite(out, args.force)
    src = resolve_model_source(args.src)
    if src.suffix == ".gguf":
        ckpt = import_gguf(src, dtype=args.dtype)
        save_gguf_import(ckpt, out)
    elif is_hf_dir(src):
        ckpt = import_hf(src, dtype=args.dtype)
        save_imported(ckpt, out, src)
    else:
        raise UserError(f"{src} is neither a Hugging Face model directory (config.json with a model_type), "
                        "a .gguf file, nor a named model (smollm2-135m-instruct)")
    print(f"imported {src} ({ckpt.model.num_parameters():,} parameters, {args.dtype}) into {out}")


def _export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from gptlab.train.checkpoint import load_checkpoint
    from gptlab.weights.hf import export_hf

    out = Path(args.out)
    _refuse_overwrite(out, args.force)
    ckpt = load_checkpoint(args.model)
    export_hf(ckpt, out, family=ckpt.config.arch)
    print(f"exported {ckpt.path} to {out} (Hugging Face {ckpt.config.arch} format)")


def add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="import a Hugging Face model, a GGUF file or a named model",
                       description="Convert a Hugging Face model directory (config.json, safetensors weights, "
                                   "tokenizer.json), hf:ORG/NAME, a .gguf file or a named model "
                                   "(smollm2-135m-instruct) into a gptlab checkpoint directory.")
    p.add_argument("src", help="Hugging Face directory, hf:ORG/NAME, .gguf file or named model")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="precision of the stored weights (default: fp32)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_import)


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint as a Hugging Face model directory",
                       description="Write a checkpoint as a directory that transformers' from_pretrained and "
                                   "AutoTokenizer load, with the same logits.")
    p.add_argument("model", help="run directory, checkpoint directory or Hugging Face directory")
    p.add_argument("--format", choices=["hf"], default="hf", help="output format (default: hf)")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_export)


# --- gptlab embed --------------------------------------------------------------------------

def _embed(args: argparse.Namespace) -> None:
    from gptlab.inference.embed import run_embed

    run_embed(args.model, args.text, batch_size=args.batch_size, normalize=not args.no_normalize, device=args.device)


def add_embed(sub: argparse._SubParsersAction) -> None:
    from gptlab.weights.bert import NAMED_BERTS

    p = sub.add_parser("embed", help="sentence embeddings from a BERT encoder",
                       description="Embed texts with a BERT encoder (mean pooling over the tokens, L2-normalised) "
                                   "and print each vector and, for several texts, their cosine similarities.")
    p.add_argument("model", metavar="MODEL",
                   help=f"a named model ({', '.join(NAMED_BERTS)}) or a Hugging Face BERT directory")
    p.add_argument("--text", action="append", required=True, metavar="TEXT", help="a text to embed (repeatable)")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="texts per forward pass (default: 32)")
    p.add_argument("--no-normalize", action="store_true", help="keep the mean-pooled vectors' own length")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    p.set_defaults(func=_embed)


# --- gptlab chat ---------------------------------------------------------------------------

def _chat(args: argparse.Namespace) -> None:
    from gptlab.inference.chat import run_chat
    from gptlab.inference.engine import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                            seed=args.seed)
    run_chat(args.model, system=args.system, params=params, device=args.device)


def add_chat_model_arg(p: argparse.ArgumentParser) -> None:
    """The optional MODEL of the commands that talk to a model; the default works offline."""
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="checkpoint, run directory, Hugging Face directory, .gguf file or named model "
                        "(default: smollm2-135m-instruct, which works offline)")


def add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="talk to a model in the terminal",
                       description="A multi-turn chat in the terminal, streamed as it is generated. Commands: "
                                   "/reset, /system TEXT, /temp X, /help, /quit; Ctrl-C stops the current answer.")
    add_chat_model_arg(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature, 0 = greedy (default: 0.7)")
    p.add_argument("--top-k", type=_positive_int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set reaching probability p")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="above 1 discourages repeating earlier tokens (default: off)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=256, help="longest answer in tokens (default: 256)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible answers")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    p.set_defaults(func=_chat)


# --- gptlab serve --------------------------------------------------------------------------

def _serve(args: argparse.Namespace) -> None:
    from gptlab.serve import run_server

    run_server(args.model, host=args.host, port=args.port, api_key=args.api_key, device=args.device)


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model: a chat web page and an OpenAI-compatible API",
                       description="A chat page at / and an OpenAI-compatible API at /v1 (models, chat/completions, "
                                   "completions; streaming or not).")
    add_chat_model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_positive_int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    p.set_defaults(func=_serve)


# --- entry point ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptlab",
        description="Build a GPT from scratch: corpora, tokenizers, token shards, training and sampling.",
    )
    parser.add_argument("--version", action="version", version=f"gptlab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_data, add_tokenizer, add_prepare, add_train, add_sample, add_import, add_export, add_embed, add_chat, add_serve):
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
