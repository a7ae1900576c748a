"""The R data reader on serialisations written byte by byte in the test (rdata_bytes), not by R."""

from __future__ import annotations

import gzip
import struct
import zlib

import pytest
from rdata_bytes import (ASCII, CLOSXP, LATIN1, NA_INTEGER, UTF8, header, i32, intsxp, lazyload_db, lglsxp,
                         names_attr, realsxp, ref, strsxp, symbol, vecsxp)

from gptlab.data.rdata import read_lazyload_db, unserialize
from gptlab.errors import UserError


def test_character_vector_in_each_encoding_with_na():
    data = header() + strsxp(["café", "plain", "naïve", None], [UTF8, ASCII, LATIN1, UTF8])
    assert unserialize(data) == ["café", "plain", "naïve", None]


def test_version_2_header_and_gzip_compression_are_read():
    assert unserialize(header(2) + strsxp(["a"])) == ["a"]
    assert unserialize(gzip.compress(header() + strsxp(["b"]))) == ["b"]


def test_named_list_of_numbers_with_a_symbol_referred_to_twice():
    # list(n = c(1L, NA), flags = c(TRUE, FALSE, NA), x = 0.5); the inner vector's names reuse the symbol.
    inner = intsxp([1, NA_INTEGER], names_attr(["a", "b"], symbol("names")))
    data = header() + vecsxp([inner, lglsxp([1, 0, NA_INTEGER]), realsxp([0.5])],
                             names_attr(["n", "flags", "x"], ref(1)))
    obj = unserialize(data)
    assert obj.named() == {"n": [1, None], "flags": [True, False, None], "x": [0.5]}
    assert obj[0].named() == {"a": 1, "b": None}
    assert obj.attributes["names"] == ["n", "flags", "x"]


def test_lazyload_database_round_trip():
    rdx, rdb = lazyload_db({"emma": strsxp(["EMMA", "", "CHAPTER I"]), "tiny": strsxp(["one line"])})
    assert read_lazyload_db(rdx, rdb) == {"emma": ["EMMA", "", "CHAPTER I"], "tiny": ["one line"]}


@pytest.mark.parametrize("data, message", [
    (header() + i32(16, 3) + i32(9 | (UTF8 << 12), 10) + b"abc", "ends early"),
    (header() + i32(CLOSXP), "does not support"),
    (header() + ref(2), "a reference to symbol 2, of 0 stored"),
    (b"A\n3\n", "not an R XDR serialisation"),
    (b"X\n" + i32(4, 0, 0), "version 4"),
    (b"\x1f\x8b" + b"not gzip", "gzip stream is damaged"),
])
def test_damaged_or_unsupported_data_is_one_clear_error(data, message):
    with pytest.raises(UserError, match=message) as e:
        unserialize(data, "thing.rds")
    assert str(e.value).startswith("thing.rds") and "\n" not in str(e.value)


def test_lazyload_database_errors():
    with pytest.raises(UserError, match="not the index of a lazy-load database"):
        read_lazyload_db(gzip.compress(header() + strsxp(["x"])), b"")
    rdx, rdb = lazyload_db({"a": strsxp(["x"])}, compressed=intsxp([3]))
    with pytest.raises(UserError, match="only zlib"):
        read_lazyload_db(rdx, rdb)
    rdx, rdb = lazyload_db({"a": strsxp(["x"])})
    with pytest.raises(UserError, match="past the end"):
        read_lazyload_db(rdx, rdb[:-3])
    with pytest.raises(UserError, match="does not decompress"):
        read_lazyload_db(rdx, rdb[:4] + b"\x00" * (len(rdb) - 4))
    wrong_length = struct.pack(">I", 999) + zlib.compress(header() + strsxp(["x"]))
    rdx, _ = lazyload_db({"a": strsxp(["x"])})
    rdx = gzip.compress(gzip.decompress(rdx).replace(i32(0, len(rdb)), i32(0, len(wrong_length))))
    with pytest.raises(UserError, match="header says 999"):
        read_lazyload_db(rdx, wrong_length)
