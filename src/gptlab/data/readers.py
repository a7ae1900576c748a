"""Corpus files read as streams of documents, never a whole file in memory.

Formats, told by the file name:
- plain text (``.txt``, ``.md``, or any file named on its own): the file is one document;
- JSON Lines (``.jsonl``): each non-blank line is an object whose ``"text"`` field is a document;
- Parquet (``.parquet``, as FineWeb and nanochat ship their shards): each row's ``text`` column
  is a document (another column with ``text_column``; ``pip install "gptlab[data]"``);
- any text or JSONL file compressed with gzip (``.txt.gz``) or zstd (``.jsonl.zst``; zstd needs
  the ``data`` extra), decompressed as it is read.

A document comes as an iterator of text blocks: a long text file in blocks of about a megabyte,
a JSONL or Parquet document in one block. Documents without text are left out. Every error
names the file and where in it: the byte offset of invalid UTF-8 (in the decompressed stream),
the line of bad JSON, the compressed offset of a damaged gzip or zstd member, the columns a
Parquet file has when the text column is not among them.
"""

from __future__ import annotations

import codecs
import gzip
import importlib
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gptlab.data.jsonl import json_line_records
from gptlab.errors import UserError, names

#: bytes read from a file at a time
BLOCK_BYTES = 1 << 20
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
#: the files a folder or glob contributes (each also compressed); others are skipped
CORPUS_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
ROWS_PER_BATCH = 1024  # Parquet rows read at a time

Document = Iterator[str]


@dataclass(frozen=True)
class CorpusFile:
    """A file of a corpus, and the name messages and ``meta.json`` give it (a URL for a download)."""

    path: Path
    name: str

    @property
    def compression(self) -> str | None:
        return COMPRESSIONS.get(self.path.suffix)

    @property
    def format(self) -> str:
        """``text``, ``jsonl`` or ``parquet``, from the suffix under any compression suffix."""
        suffix = Path(self.path.stem).suffix if self.compression else self.path.suffix
        return {".jsonl": "jsonl", ".parquet": "parquet"}.get(suffix, "text")


def is_corpus_file(path: Path) -> bool:
    """Whether a folder or glob should read ``path`` (``a.txt``, ``b.jsonl.gz``, ``c.parquet``)."""
    inner = Path(path.stem) if path.suffix in COMPRESSIONS else path
    return inner.suffix in CORPUS_SUFFIXES


def optional_module(module: str, purpose: str) -> object:
    """Import a package of the ``data`` extra, or say in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise UserError(f"{purpose} needs the {package} package: pip install \"gptlab[data]\"") from None


def file_documents(f: CorpusFile, errors: str = "strict", text_column: str = "text") -> Iterator[Document]:
    """The documents of one file, in order (see the module docstring)."""
    if f.format == "parquet":
        return _parquet_documents(f, text_column)
    if f.format == "jsonl":
        return _jsonl_documents(f, errors, text_column)
    blocks = _text_blocks(f, errors)
    first = next(blocks, None)
    return iter(()) if first is None else iter([_chain(first, blocks)])


def _chain(first: str, rest: Iterator[str]) -> Document:
    yield first
    yield from rest


# --- bytes: the file, decompressed -------------------------------------------------------------

def _gzip_blocks(raw: BinaryIO) -> Iterator[bytes]:
    stream = gzip.GzipFile(fileobj=raw)  # every member of a multi-member file, in turn
    while block := stream.read(BLOCK_BYTES):
        yield block


def _zstd_blocks(raw: BinaryIO, zstandard) -> Iterator[bytes]:
    """Every frame of a zstd file in turn; a file that ends inside a frame is damaged (zstd's own
    stream reader would just stop there)."""
    context = zstandard.ZstdDecompressor()
    frame, inside = context.decompressobj(), False
    while data := raw.read(BLOCK_BYTES // 16):  # zstd expands text ~10x: keep each output block small
        while data:
            inside = True
            if out := frame.decompress(data):
                yield out
            data = b""
            if frame.eof:  # the frame ended within this data: the rest begins the next frame
                data, frame, inside = frame.unused_data, context.decompressobj(), False
    if inside:
        raise EOFError("the file ends inside a frame")


def _chunks(f: CorpusFile) -> Iterator[bytes]:
    """The file's bytes after decompression, a block at a time; a damaged compressed stream
    ends in a ``UserError`` naming the file and about where in it the damage is."""
    try:
        raw = open(f.path, "rb")  # noqa: SIM115 (closed by the with below, also when the reader stops early)
    except OSError as e:
        raise UserError(f"cannot read {f.name}: {e.strerror}") from None
    with raw:
        if f.compression is None:
            while block := raw.read(BLOCK_BYTES):
                yield block
            return
        if f.compression == "gzip":
            blocks, damaged = _gzip_blocks(raw), (gzip.BadGzipFile, EOFError, zlib.error)
        else:
            zstandard = optional_module("zstandard", f"reading {f.name} (zstd)")
            blocks, damaged = _zstd_blocks(raw, zstandard), (zstandard.ZstdError, EOFError)
        try:
            yield from blocks
        except damaged as e:
            raise _damaged(f, raw.tell(), e) from None


def _damaged(f: CorpusFile, offset: int, e: BaseException) -> UserError:
    return UserError(f"{f.name} is damaged: its {f.compression} data breaks off or is corrupt at about byte "
                     f"{offset:,} of the compressed file ({e or type(e).__name__}); download or compress it again")


# --- text: UTF-8, decoded incrementally ------------------------------------------------------------

class _Utf8:
    """Decodes a byte stream piece by piece, naming the file and byte offset of the first bad byte."""

    def __init__(self, f: CorpusFile, errors: str):
        self.f, self.strict = f, errors == "strict"
        self.decoder = codecs.getincrementaldecoder("utf-8")("strict" if self.strict else "replace")
        self.offset = 0  # bytes given to the decoder so far

    def decode(self, data: bytes, final: bool = False) -> str:
        if self.strict and (nul := data.find(b"\x00")) != -1:
            raise UserError(f"{self.f.name} looks like a binary file (NUL byte at offset {self.offset + nul}); "
                            "give a text file")
        pending = self.decoder.getstate()[0]  # bytes of an unfinished character from the last call
        try:
            text = self.decoder.decode(data, final)
        except UnicodeDecodeError as e:
            at = self.offset - len(pending) + e.start
            raise UserError(f"{self.f.name} is not valid UTF-8 (byte 0x{(pending + data)[e.start]:02x} at offset "
                            f"{at}); convert it to UTF-8 or pass --replace-bad-bytes") from None
        self.offset += len(data)
        return text


def _text_blocks(f: CorpusFile, errors: str) -> Iterator[str]:
    utf8 = _Utf8(f, errors)
    for chunk in _chunks(f):
        if text := utf8.decode(chunk):
            yield text
    if tail := utf8.decode(b"", final=True):
        yield tail


def _lines(f: CorpusFile, errors: str) -> Iterator[str]:
    """The file's lines, split at "\\n" only (as ``gptlab.data.jsonl`` explains), decoded."""
    utf8, rest = _Utf8(f, errors), b""
    for chunk in _chunks(f):
        *lines, rest = (rest + chunk).split(b"\n")
        for line in lines:
            yield utf8.decode(line + b"\n")[:-1]
    yield utf8.decode(rest, final=True)


def _jsonl_documents(f: CorpusFile, errors: str, field: str) -> Iterator[Document]:
    for where, row in json_line_records(_lines(f, errors), f.name, f'{{"{field}": "..."}}'):
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise UserError(f'{where}: no string field "{field}"; each line must be an object such as '
                            f'{{"{field}": "..."}} (choose the field with --text-column)')
        if row[field]:
            yield iter((row[field],))


# --- Parquet ---------------------------------------------------------------------------------

def _parquet_documents(f: CorpusFile, column: str) -> Iterator[Document]:
    if f.compression:
        raise UserError(f"{f.name}: a Parquet file compresses its own columns; give the .parquet file itself")
    pq = optional_module("pyarrow.parquet", f"reading {f.name} (Parquet)")
    try:
        table = pq.ParquetFile(f.path)
    except Exception as e:  # pyarrow's ArrowInvalid and OSError, whose import we leave to pyarrow
        raise UserError(f"{f.name} is not a readable Parquet file ({e})") from None
    with table:
        columns = table.schema_arrow.names
        if column not in columns:
            raise UserError(f"{f.name} has no column {column!r}; its columns are {names(columns)}; "
                            "choose one with --text-column")
        kind = str(table.schema_arrow.field(column).type)
        if kind not in ("string", "large_string", "string_view"):
            raise UserError(f"{f.name}: column {column!r} holds {kind}, not text; choose a text column with "
                            "--text-column")
        for batch in table.iter_batches(batch_size=ROWS_PER_BATCH, columns=[column]):
            for text in batch.column(0).to_pylist():
                if text:  # a null or empty row has no text
                    yield iter((text,))


def documents_of(files: Iterable[CorpusFile], errors: str = "strict", text_column: str = "text") -> Iterator[Document]:
    """The documents of several files, one file after another."""
    for f in files:
        yield from file_documents(f, errors, text_column)
