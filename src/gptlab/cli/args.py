"""Argument types and helpers shared by the command groups: whole numbers, fractions, JSON
objects, one flag per config dataclass field, and refusing to overwrite what a user made."""

from __future__ import annotations

import argparse
from pathlib import Path

from gptlab.errors import UserError


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


def fraction(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {v}")
    return v


def json_object(s: str) -> dict:
    import json

    try:
        v = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r} ({e.msg})") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"rope_type\": \"linear\"}}', got {s!r}")
    return v


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


def add_config_flags(group: argparse._ArgumentGroup, cls: type, preset: dict, skip: tuple[str, ...] = (),
                     label: str = "the default preset") -> list[str]:
    """One flag per dataclass field (``n_layer`` -> ``--n-layer``), typed from its annotation.

    The help shows the value the command uses when the flag is left out: ``preset``'s where it
    sets one (``label`` says where that comes from), else the dataclass default.

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
        default = f"{preset[f.name]} in {label}" if f.name in preset else f.default
        help_text = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")
        if kind == "bool":
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            conv = {"int": int, "float": float, "str": str}.get(kind, json_object)  # dict fields take JSON
            group.add_argument(flag, dest=f.name, type=conv, default=argparse.SUPPRESS,
                               metavar=kind.upper() if conv is not json_object else "JSON", help=help_text)
        names.append(f.name)
    return names


def given(args: argparse.Namespace, names: list[str]) -> dict:
    return {n: getattr(args, n) for n in names if hasattr(args, n)}


def refuse_overwrite(out: Path, force: bool) -> None:
    """Nothing a user made is replaced without --force: an existing file or a non-empty folder."""
    if not force and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists; choose another --out or pass --force to replace it")
