"""The layer rule of DESIGN.md, checked on every import of the package.

Units, bottom to top; a unit imports only from units below it, inside functions too, so a reader
of any file knows that nothing above it can change what it does. Units on one line stand side by
side and do not import each other.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "gptlab"
LAYERS = [
    ("errors",),
    ("cache", "device"),
    ("tokenizers", "model"),
    ("config",),
    ("weights", "data"),
    ("inference",),
    ("train",),
    ("finetune",),
    ("viz",),
    ("serve",),
    ("cli",),
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
#: the package's own __init__ (its version) is below everything; __main__ only starts the cli
ROOT_FILES = {"__init__": -1, "__main__": len(LAYERS)}


def unit_of(module: str) -> str:
    """``gptlab.train.loop`` -> ``train``; ``gptlab`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def rank_of(unit: str) -> int:
    return ROOT_FILES[unit] if unit in ROOT_FILES else RANK[unit]


def imports() -> list[tuple[str, str, str]]:
    """(importing unit, imported unit, 'file:line') for every import of a gptlab module anywhere
    in the package, module level or inside a function."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        here = unit_of(module) if path.parent != SRC else path.stem
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}:{node.lineno}: use absolute imports"
                targets = [node.module or ""]
                if node.module == "gptlab":  # from gptlab import x: x is a unit (or the version)
                    targets = [f"gptlab.{a.name}" if a.name in RANK else "gptlab" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                if target == "gptlab" or target.startswith("gptlab."):
                    there = unit_of(target)
                    if there != here:
                        found.append((here, there, f"{path.relative_to(SRC)}:{node.lineno}"))
    return found


def test_every_unit_of_the_package_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
             if (p.suffix == ".py" or (p / "__init__.py").is_file())}
    assert units - set(ROOT_FILES) == set(RANK), "add the new unit to LAYERS (and to DESIGN.md's diagram)"


def test_no_unit_imports_a_unit_above_it_or_beside_it():
    found = imports()
    assert len(found) > 100  # the walk sees the package's imports, inside functions too
    wrong = [f"{where}: {here} imports {there}" for here, there, where in found if rank_of(there) >= rank_of(here)]
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_units_form_no_cycle():
    graph = defaultdict(set)
    for here, there, _ in imports():
        graph[here].add(there)
    state: dict[str, str] = {}

    def visit(unit: str, path: list[str]) -> None:
        state[unit] = "open"
        for nxt in sorted(graph[unit]):
            assert state.get(nxt) != "open", "cycle: " + " -> ".join([*path, unit, nxt])
            if nxt not in state:
                visit(nxt, [*path, unit])
        state[unit] = "done"

    for unit in sorted(graph):
        if unit not in state:
            visit(unit, [])


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule is not vacuous: a model file importing the training loop is caught."""
    pkg = tmp_path / "gptlab"
    for unit in ("model", "train"):
        (pkg / unit).mkdir(parents=True)
        (pkg / unit / "__init__.py").write_text("")
    (pkg / "model" / "bad.py").write_text("def f():\n    from gptlab.train.loop import run_job\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", pkg)
    assert imports() == [("model", "train", "model/bad.py:2")]
