"""R's XDR serialisation written by hand, for the tests of gptlab.data.rdata: each function returns
the bytes R itself writes for that value (R Internals, "Serialization Formats")."""

from __future__ import annotations

import struct
import zlib

SYMSXP, LISTSXP, CLOSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 1, 2, 3, 9, 10, 13, 14, 16, 19
REFSXP, NIL = 255, 254
HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10
LATIN1, UTF8, ASCII = 1 << 2, 1 << 3, 1 << 6
NA_INTEGER = -(2**31)


def i32(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def header(version: int = 3) -> bytes:
    """``X\\n``, the format version, the R version that wrote it (4.2.1) and the oldest that reads it (3.5.0);
    version 3 adds the writer's native encoding."""
    return b"X\n" + i32(version, 0x040201, 0x030500) + (i32(5) + b"UTF-8" if version == 3 else b"")


def charsxp(s: str | None, encoding: int = UTF8) -> bytes:
    if s is None:
        return i32(CHARSXP, -1)  # NA_character_
    raw = s.encode("latin-1" if encoding == LATIN1 else "utf-8")
    return i32(CHARSXP | (encoding << 12), len(raw)) + raw


def symbol(name: str) -> bytes:
    return i32(SYMSXP) + charsxp(name, ASCII)


def ref(index: int) -> bytes:
    """A reference to the index-th symbol stored so far (1-based), packed into the flags."""
    return i32(REFSXP | (index << 8))


def names_attr(names: list[str], names_symbol: bytes) -> bytes:
    """An attribute pairlist holding only ``names``; ``names_symbol`` is ``symbol("names")`` the
    first time and ``ref(k)`` after."""
    return i32(LISTSXP | HAS_TAG) + names_symbol + strsxp(names) + i32(NIL)


def vector(kind: int, length: int, body: bytes, attrs: bytes = b"") -> bytes:
    return i32(kind | (HAS_ATTR if attrs else 0), length) + body + attrs


def strsxp(values: list, encodings: list[int] | None = None, attrs: bytes = b"") -> bytes:
    encodings = encodings or [UTF8] * len(values)
    return vector(STRSXP, len(values), b"".join(charsxp(v, e) for v, e in zip(values, encodings)), attrs)


def intsxp(values: list[int], attrs: bytes = b"") -> bytes:
    return vector(INTSXP, len(values), i32(*values), attrs)


def lglsxp(values: list[int], attrs: bytes = b"") -> bytes:
    return vector(LGLSXP, len(values), i32(*values), attrs)


def realsxp(values: list[float], attrs: bytes = b"") -> bytes:
    return vector(REALSXP, len(values), struct.pack(f">{len(values)}d", *values), attrs)


def vecsxp(items: list[bytes], attrs: bytes = b"") -> bytes:
    return vector(VECSXP, len(items), b"".join(items), attrs)


def lazyload_db(objects: dict[str, bytes], compressed: bytes | None = None) -> tuple[bytes, bytes]:
    """``(rdx, rdb)`` of a lazy-load database holding ``objects`` (name -> the serialised item,
    without header), laid out as R's makeLazyLoadDB does: the index is gzip-compressed, and
    ``compressed`` is TRUE (zlib) unless given (R writes 2L for bzip2, 3L for xz)."""
    import gzip

    rdb, offsets = b"", []
    for body in objects.values():
        data = header() + body
        block = struct.pack(">I", len(data)) + zlib.compress(data)
        offsets.append(intsxp([len(rdb), len(block)]))
        rdb += block
    # "names" is stored once, in the first names attribute, and referred to as symbol 1 after that.
    variables = vecsxp(offsets, names_attr(list(objects), symbol("names")))
    references = vecsxp([], names_attr([], ref(1)))
    index = vecsxp([variables, references, compressed or lglsxp([1])],
                   names_attr(["variables", "references", "compressed"], ref(1)))
    return gzip.compress(header() + index), rdb
