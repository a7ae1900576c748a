"""Read R data without R: the XDR serialisation format and the lazy-load databases packages ship.

An R package's ``data/`` folder often holds its datasets as a lazy-load database, two files:
``Rdata.rdx``, a compressed serialised list saying where each object lies, and ``Rdata.rdb``,
the objects one after another, each a 4-byte big-endian length followed by a zlib stream of its
own serialisation. A serialisation (format ``X``, XDR: big-endian) is a short header and then
one item; every item begins with a 32-bit flags word:

    bits 0-7   the type (16 = character vector, 19 = list, 9 = one string, ...)
    bit 8      is an object (has a class)     bit 9   has attributes     bit 10   has a tag
    bits 12-27 "levels": for a string, its encoding (UTF-8, Latin-1, ASCII, bytes)

Vectors follow as a length and their elements; attributes come after a vector's elements, as a
pairlist of (symbol, value). Symbols are stored once and later referred to by number.

This reader covers the types that datasets of text and numbers use: character, logical,
integer and double vectors, lists, pairlists, symbols and references to them. Anything else
(environments, functions, ALTREP compact vectors, bytecode) is refused with a clear error
rather than guessed at.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass, field

from gptlab.errors import UserError

# Type codes (R Internals, "Serialization Formats").
SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 1, 2, 9, 10, 13, 14, 16, 19
REFSXP, NILVALUE_SXP = 255, 254
NA_INTEGER = -(2**31)
# The encoding bit of a CHARSXP's levels that changes how its bytes are read (UTF-8 is 1 << 3, ASCII 1 << 6).
_LATIN1 = 1 << 2


class RList(list):
    """An R vector (character, logical, integer, double or list): its elements, and its attributes
    by name (``names``, ``class``, ...)."""

    def __init__(self, values: list, attributes: dict | None = None) -> None:
        super().__init__(values)
        self.attributes: dict = attributes or {}

    def named(self) -> dict:
        """The elements by their ``names`` attribute."""
        return dict(zip(self.attributes.get("names", []), self))


@dataclass
class _Reader:
    data: bytes
    where: str
    pos: int = 0
    refs: list = field(default_factory=list)  # symbols, in the order they were first stored

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise UserError(f"{self.where}: R serialisation ends early (wanted {n} bytes at offset {self.pos}); "
                            "the file is damaged, delete it and fetch again")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # a long vector: the length follows as two 32-bit halves
            upper, lower = struct.unpack(">II", self.take(8))
            n = (upper << 32) + lower
        return n

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == NILVALUE_SXP:
            return None
        if kind == REFSXP:
            index = flags >> 8 or self.int()
            if not 0 < index <= len(self.refs):
                raise UserError(f"{self.where}: a reference to symbol {index}, of {len(self.refs)} stored; the file "
                                "is damaged")
            return self.refs[index - 1]
        if kind == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == LISTSXP:
            return self.pairlist(has_attr, has_tag)
        if kind == CHARSXP:
            return self.string(flags >> 12)
        readers = {LGLSXP: self.logicals, INTSXP: self.integers, REALSXP: self.doubles, STRSXP: self.items,
                   VECSXP: self.items}
        if kind not in readers:
            raise UserError(f"{self.where}: holds an R object of type {kind} at offset {self.pos - 4}, which this "
                            "reader does not support (it reads vectors, lists and strings)")
        values = readers[kind](self.length())
        return RList(values, self.item() if has_attr else None)

    def pairlist(self, has_attr: int, has_tag: int) -> dict:
        """A pairlist as {tag: value}; R writes its cells one after another, each with its own flags."""
        out: dict = {}
        while True:
            if has_attr:
                self.item()  # attributes of a pairlist cell: none that a dataset needs
            tag = self.item() if has_tag else len(out)
            out[tag] = self.item()
            flags = self.int()
            if flags & 0xFF == NILVALUE_SXP:
                return out
            if flags & 0xFF != LISTSXP:
                raise UserError(f"{self.where}: a pairlist continues with type {flags & 0xFF}; the file is damaged")
            has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)

    def string(self, levels: int) -> str | None:
        n = self.int()
        if n == -1:
            return None  # NA_character_
        # Strings marked neither Latin-1 nor UTF-8 are in the writer's native encoding: UTF-8 on
        # the systems that build Debian's packages.
        return self.take(n).decode("latin-1" if levels & _LATIN1 else "utf-8", errors="replace")

    def items(self, n: int) -> list:
        return [self.item() for _ in range(n)]

    def logicals(self, n: int) -> list:
        return [None if v == NA_INTEGER else bool(v) for v in struct.unpack(f">{n}i", self.take(4 * n))]

    def integers(self, n: int) -> list:
        return [None if v == NA_INTEGER else v for v in struct.unpack(f">{n}i", self.take(4 * n))]

    def doubles(self, n: int) -> list:
        return list(struct.unpack(f">{n}d", self.take(8 * n)))


def unserialize(data: bytes, where: str = "R data"):
    """The object in one R serialisation (``serialize()``/``saveRDS()`` output, format ``X``,
    version 2 or 3; gzip-compressed input is decompressed first). ``where`` names it in errors."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise UserError(f"{where}: the gzip stream is damaged ({e}); fetch the file again") from None
    r = _Reader(data, where)
    if r.take(2) != b"X\n":
        raise UserError(f"{where}: not an R XDR serialisation (starts with {data[:2]!r}); only format X is read")
    version = r.int()
    r.take(8)  # the R versions that wrote it and that can read it
    if version == 3:
        r.take(r.int())  # the writer's native encoding; strings here carry their own
    elif version != 2:
        raise UserError(f"{where}: R serialisation version {version}; this reader knows versions 2 and 3")
    return r.item()


def read_lazyload_db(rdx: bytes, rdb: bytes, where: str = "Rdata") -> dict:
    """Every object of a lazy-load database, by name: ``rdx`` and ``rdb`` are the bytes of the
    ``.rdx`` index and the ``.rdb`` objects."""
    index = unserialize(rdx, f"{where}.rdx")
    index = index.named() if isinstance(index, RList) else {}
    if not isinstance(index.get("variables"), RList):
        raise UserError(f"{where}.rdx is not the index of a lazy-load database (no list 'variables')")
    compressed = index.get("compressed", [True])[0]
    if compressed is not True:
        raise UserError(f"{where}.rdx: objects compressed with R's method {compressed}; only zlib (TRUE) is read")
    objects = {}
    for name, (offset, size) in index["variables"].named().items():
        block = rdb[offset : offset + size]
        if len(block) != size or size < 4:
            raise UserError(f"{where}.rdb: object {name!r} lies past the end of the file; it is damaged")
        expected = struct.unpack(">I", block[:4])[0]
        try:
            data = zlib.decompress(block[4:])
        except zlib.error as e:
            raise UserError(f"{where}.rdb: object {name!r} does not decompress ({e}); the file is damaged") from None
        if len(data) != expected:
            raise UserError(f"{where}.rdb: object {name!r} is {len(data)} bytes, its header says {expected}")
        objects[name] = unserialize(data, f"{where}.rdb:{name}")
    return objects
