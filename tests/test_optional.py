"""Every command works after the README's install (`pip install torch==2.13.0 -e .`, no extras).

What the main path needs (serving a model included) is a plain dependency; what stays optional
ends, when missing, in one line that names the extra to install. Each optional package is hidden
in turn, as if it had never been installed, and every command is tried.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.metadata
import re
import sys

import pytest

from gptlab.cli import build_parser, main

#: import name -> the extra of pyproject.toml that installs it
OPTIONAL = {"sklearn": "viz", "huggingface_hub": "hf", "transformers": "hf", "pyarrow": "data", "zstandard": "data",
            "datasets": "data"}
#: what the README's install gives: the main path, the server included
MAIN_PATH = ("torch", "numpy", "tiktoken", "tokenizers", "safetensors", "gguf", "fastapi", "uvicorn")


def plain_requirements() -> set[str]:
    """The distribution names gptlab requires without any extra."""
    reqs = importlib.metadata.requires("gptlab") or []
    return {re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower() for r in reqs if "extra ==" not in r}


def test_the_main_path_needs_no_extra():
    assert set(MAIN_PATH) <= plain_requirements()
    for module in OPTIONAL:
        assert module.replace("sklearn", "scikit-learn") not in plain_requirements()


def commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and sub-command path of the gptlab parser (``("viz", "embeddings")``, ...)."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append((*prefix, name))
                found += commands(sub, (*prefix, name))
    return found


class Hidden(importlib.abc.MetaPathFinder):
    """An import finder that finds a package nowhere."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname: str, path, target=None):
        if fullname == self.name or fullname.startswith(self.name + "."):
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)


@pytest.fixture(params=sorted(OPTIONAL))
def missing(request, monkeypatch) -> str:
    """One optional package made unimportable, with everything of it already imported forgotten."""
    name = request.param
    for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, loaded)
    # `import name` now raises ModuleNotFoundError, and name is absent from sys.modules, as when it was never
    # installed (scikit-learn takes a None entry for pyarrow to be pyarrow)
    monkeypatch.setattr(sys, "meta_path", [Hidden(name), *sys.meta_path])
    with pytest.raises(ImportError):
        __import__(name)
    return name


def error_line(capsys, code: int) -> str:
    """The one ``error: ...`` line a failed command ends with (a ``loading ...`` line may come first)."""
    err = capsys.readouterr().err.strip()
    assert code == 1 and "Traceback" not in err, err
    *before, last = err.splitlines()
    assert last.startswith("error: ") and not any(line.startswith("error") for line in before), err
    return last


def one_line_naming_the_extra(capsys, code: int, extra: str) -> None:
    assert f'pip install "gptlab[{extra}]"' in error_line(capsys, code)


def test_every_command_shows_its_help_without_each_optional_package(missing, capsys):
    paths = commands(build_parser())
    assert len(paths) >= 20 and ("serve",) in paths and ("viz", "embeddings") in paths
    for path in paths:
        with pytest.raises(SystemExit) as exit_:
            main([*path, "--help"])
        assert exit_.value.code == 0, path
        assert "usage: gptlab" in capsys.readouterr().out


def test_a_command_that_needs_a_missing_package_names_its_extra(missing, engine, tmp_path, monkeypatch, capsys):
    from gptlab.weights.checkpoint import save_checkpoint

    monkeypatch.chdir(tmp_path)
    save_checkpoint(tmp_path / "tiny", engine.model, engine.tokenizer)
    embeddings = main(["viz", "embeddings", str(tmp_path / "tiny"), "--count", "10", "--out", "e.png"])
    if missing == "sklearn":
        one_line_naming_the_extra(capsys, embeddings, "viz")
    else:
        assert embeddings == 0 and (tmp_path / "e.png").exists()
    for command in (["import", "hf:org/model", "--out", "imported"], ["sample", "hf:org/model", "--prompt", "hi"],
                    ["chat", "hf:org/model"], ["serve", "hf:org/model"]):
        code = main(command)
        if missing == "huggingface_hub":
            one_line_naming_the_extra(capsys, code, "hf")
        else:  # the package is there; offline, the download fails in one line of its own
            assert "Hugging Face Hub" in error_line(capsys, code)


#: a corpus that needs each package of the data extra
NEEDS_DATA_EXTRA = {"pyarrow": "c.parquet", "zstandard": "c.txt.zst", "datasets": "hf:org/corpus"}


@pytest.mark.parametrize("missing", sorted(NEEDS_DATA_EXTRA), indirect=True)
def test_a_corpus_that_needs_a_missing_package_names_the_data_extra(missing, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    corpus = NEEDS_DATA_EXTRA[missing]
    if not corpus.startswith("hf:"):
        (tmp_path / corpus).write_bytes(b"not read: the reader needs its package first")
    for command in (["prepare", "--corpus", corpus, "--out", "data"],
                    ["tokenizer", "train", "--corpus", corpus, "--out", "t.json"]):
        one_line_naming_the_extra(capsys, main(command), "data")
    assert not (tmp_path / "data").exists()
