"""Streaming, parallel, sharded ``gptlab prepare``, its readers, and the loader that reads shards.

The reference everywhere is the plainest possible encoding: each document encoded whole, in
one process, the documents joined with the end-of-text id. Tasks and pieces are made tiny here
(``small_tasks``) so a corpus of a few hundred kilobytes crosses many task, piece and shard
boundaries.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard

from gptlab.cli import main
from gptlab.data import pieces, shards
from gptlab.data.batches import RandomBatches
from gptlab.data.prepare import load_prepared, prepare
from gptlab.errors import UserError
from gptlab.tokenizers import BPETokenizer, CharTokenizer, load_tokenizer_file
from gptlab.train.distributed import Dist, shard_batch

EOT = "<|endoftext|>"


def document(i: int) -> str:
    """A document of varied length, with long lines, blank lines, indentation and non-ASCII text."""
    lines = [f"Document {i}, line {j}: the quick brown fox — naïve café {i * j}." for j in range(i % 17 + 1)]
    return "\n".join(lines) + ("\n\n  indented tail\n" if i % 3 == 0 else "")


DOCS = [document(i) for i in range(300)]


@pytest.fixture
def small_tasks(monkeypatch):
    """Tasks of about 2,000 characters and pieces of 500: many boundaries in a small corpus."""
    monkeypatch.setattr(pieces, "TASK_CHARS", 2000)
    monkeypatch.setattr(pieces, "PIECE_CHARS", 500)


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory) -> str:
    """A small byte-level BPE with an end-of-text token, saved as a file (a --tokenizer FILE)."""
    path = tmp_path_factory.mktemp("tok") / "bpe.json"
    BPETokenizer.train("\n\n".join(DOCS[:60]), vocab_size=300, special_tokens=[EOT]).save(path)
    return str(path)


def write_jsonl(path: Path, docs: list[str], opener=open) -> str:
    with opener(path, "wt", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc, "id": len(doc)}) + "\n")
    return str(path)


def reference_ids(tokenizer_file: str, docs: list[str], val_fraction: float = 0.1) -> dict[str, list[int]]:
    """Each document encoded whole, joined with the end-of-text id; the last documents are val."""
    tok = load_tokenizer_file(tokenizer_file)
    n_val = pieces.val_documents(len(docs), val_fraction)
    splits = {"train": docs[:-n_val], "val": docs[-n_val:]}
    out = {}
    for split, chosen in splits.items():
        ids: list[int] = []
        for k, doc in enumerate(chosen):
            ids += ([tok.eot_id] if k else []) + tok.encode(doc)
        out[split] = ids
    return out


def ids_of(data_dir: Path) -> dict[str, list[int]]:
    data = load_prepared(data_dir)
    return {split: np.concatenate(data.shards(split)).tolist() for split in ("train", "val")}


# --- the ids ------------------------------------------------------------------------------------

@pytest.mark.parametrize("workers, shard_tokens", [(1, 10**8), (1, 997), (2, 997), (2, 4096)])
def test_ids_equal_encoding_each_document_whole(tmp_path, small_tasks, bpe_file, workers, shard_tokens):
    corpus = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    prepare(corpus, bpe_file, tmp_path / "out", workers=workers, shard_tokens=shard_tokens, show_progress=False)
    assert ids_of(tmp_path / "out") == reference_ids(bpe_file, DOCS)


def test_documents_are_joined_by_the_end_of_text_token_and_its_text_stays_text(tmp_path, bpe_file):
    docs = ["first one", f"second mentions {EOT} in its text", "third", "fourth", "fifth"]
    corpus = write_jsonl(tmp_path / "docs.jsonl", docs)
    data = prepare(corpus, bpe_file, tmp_path / "out", val_fraction=0.4, show_progress=False)
    tok = data.tokenizer()
    train, val = (data.tokens(s).tolist() for s in ("train", "val"))
    assert train.count(tok.eot_id) == 2 and val.count(tok.eot_id) == 1  # between documents, not around them
    assert tok.decode(train) == EOT.join(docs[:3]) and tok.decode(val) == EOT.join(docs[3:])
    assert data.meta["documents"] == {"train": 3, "val": 2}
    assert data.meta["tokenizer"]["separator"] == {"ids": [tok.eot_id], "text": EOT}


def test_a_tokenizer_without_end_of_text_joins_documents_with_a_blank_line(tmp_path):
    (tmp_path / "d").mkdir()
    for i, text in enumerate(["alpha beta", "gamma", "delta\nepsilon"]):
        (tmp_path / "d" / f"{i}.txt").write_text(text)
    data = prepare(str(tmp_path / "d"), "char", tmp_path / "out", val_fraction=0.3, show_progress=False)
    tok = data.tokenizer()
    assert tok.decode(data.tokens("train").tolist()) == "alpha beta\n\ngamma"
    assert tok.decode(data.tokens("val").tolist()) == "delta\nepsilon"
    assert data.meta["tokenizer"]["separator"]["text"] == "\n\n"


def test_one_document_is_split_inside_its_text_at_a_line_break(tmp_path, small_tasks):
    text = "".join(f"line {i}: some words here\n" for i in range(3000))
    (tmp_path / "one.txt").write_text(text)
    data = prepare(str(tmp_path / "one.txt"), "char", tmp_path / "out", shard_tokens=5000, workers=2,
                   show_progress=False)
    cut = pieces.split_point(text, 0.1)
    assert text[cut - 1] == "\n"
    tok = data.tokenizer()
    assert tok.decode(ids_of(tmp_path / "out")["train"]) == text[:cut]
    assert tok.decode(ids_of(tmp_path / "out")["val"]) == text[cut:]


@pytest.mark.parametrize("text", [
    "".join(f"line {i}\n" for i in range(500)),  # a line break just after the 90% point
    "x" * 3000 + "\n" + "y" * 300,  # none within 1% of it: cut at the exact place
    "é" * 900 + "\n" + "ü" * 99 + "\n",  # non-ASCII, a break at the end of the window
])
@pytest.mark.parametrize("block", [1, 7, 1000, 10**6])
def test_one_text_read_in_blocks_is_cut_where_split_point_cuts_it_whole(text, block):
    blocks = iter([[text[i:i + block] for i in range(0, len(text), block)]])
    tagged = list(pieces.split_blocks(blocks, 1, len(text), 0.1))
    train = "".join(b for split, _, b in tagged if split == "train")
    assert train + "".join(b for split, _, b in tagged if split == "val") == text
    assert len(train) == pieces.split_point(text, 0.1)


def test_a_named_corpus_is_prepared_as_its_documents(tmp_path, tiny_corpus_text):
    """shakespeare-tiny is seven plays: the last one, The Tempest, is the validation split."""
    data = prepare("shakespeare-tiny", "char", tmp_path / "out", show_progress=False)
    tok = data.tokenizer()
    train, val = (tok.decode(data.tokens(split).tolist()) for split in ("train", "val"))
    assert train + "\n\n" + val == tiny_corpus_text and val.startswith("THE TEMPEST")
    assert data.meta["documents"] == {"train": 6, "val": 1}


def test_shards_are_full_but_the_last_and_listed_in_order(tmp_path, small_tasks, bpe_file):
    corpus = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    data = prepare(corpus, bpe_file, tmp_path / "out", shard_tokens=6000, show_progress=False)
    train = data.meta["shards"]["train"]
    assert [s["path"] for s in train] == [f"train-{i:06d}.bin" for i in range(len(train))] and len(train) > 3
    assert all(s["tokens"] == 6000 for s in train[:-1]) and 0 < train[-1]["tokens"] <= 6000
    assert sum(s["tokens"] for s in train) == data.meta["train_tokens"]
    assert data.meta["shards"]["val"] == [{"path": "val.bin", "tokens": data.meta["val_tokens"]}]  # one: no number
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [s["path"] for s in train] + ["val.bin", "meta.json", "tokenizer.json"])
    (tmp_path / "out" / train[1]["path"]).write_bytes(b"\x00\x00")
    with pytest.raises(UserError, match="wrong size"):
        load_prepared(tmp_path / "out")


def test_a_dataset_from_before_shards_still_loads(tmp_path):
    """meta.json without "shards": train.bin and val.bin, as gptlab wrote them before."""
    out = tmp_path / "old"
    out.mkdir()
    np.arange(100, dtype=np.uint16).tofile(out / "train.bin")
    np.arange(20, dtype=np.uint16).tofile(out / "val.bin")
    CharTokenizer.train("".join(map(chr, range(32, 132)))).save(out / "tokenizer.json")
    (out / "meta.json").write_text(json.dumps({"dtype": "uint16", "train_tokens": 100, "val_tokens": 20}))
    data = load_prepared(out)
    assert data.tokens("train").tolist() == list(range(100)) and len(data.shards("val")) == 1
    assert data.tokenizer().vocab_size == 100
    (out / "val.bin").write_bytes(b"\x00")
    with pytest.raises(UserError, match="wrong size"):
        load_prepared(out)


def _text_file(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "corpus.txt"
    f.write_text(text)
    return f


# --- inputs: Parquet, gzip, zstd, hf: ------------------------------------------------------------

def write_parquet(path: Path, docs: list[str], column: str = "text") -> str:
    table = pa.table({"id": list(range(len(docs))), column: docs})
    pq.write_table(table, path, row_group_size=37)  # several row groups
    return str(path)


def zstd_open(path, mode, encoding):
    return zstandard.open(path, mode, encoding=encoding)


@pytest.mark.parametrize("name", ["docs.parquet", "docs.jsonl.gz", "docs.jsonl.zst"])
def test_parquet_gzip_and_zstd_give_the_ids_of_plain_jsonl(tmp_path, small_tasks, bpe_file, name):
    path = tmp_path / name
    if name.endswith(".parquet"):
        corpus = write_parquet(path, DOCS)
    else:
        corpus = write_jsonl(path, DOCS, gzip.open if name.endswith(".gz") else zstd_open)
    data = prepare(corpus, bpe_file, tmp_path / "out", workers=2, show_progress=False)
    assert ids_of(tmp_path / "out") == reference_ids(bpe_file, DOCS)
    assert data.meta["sources"][0]["bytes"] == path.stat().st_size  # of the file as it is on disk


def test_compressed_text_files_in_a_folder(tmp_path):
    (tmp_path / "d").mkdir()
    with gzip.open(tmp_path / "d" / "a.txt.gz", "wt") as f:
        f.write("first file\n" * 50)
    with zstandard.open(tmp_path / "d" / "b.md.zst", "wt") as f:
        f.write("second file\n" * 50)
    (tmp_path / "d" / "skip.bin.gz").write_bytes(gzip.compress(b"\x00"))
    data = prepare(str(tmp_path / "d"), "char", tmp_path / "out", val_fraction=0.5, show_progress=False)
    tok = data.tokenizer()
    assert tok.decode(data.tokens("train").tolist()) == "first file\n" * 50
    assert tok.decode(data.tokens("val").tolist()) == "second file\n" * 50


def test_parquet_text_column_is_chosen_and_a_missing_one_names_the_columns(tmp_path, bpe_file):
    corpus = write_parquet(tmp_path / "docs.parquet", DOCS[:20], column="content")
    with pytest.raises(UserError, match=r"no column 'text'; its columns are id, content; .*--text-column"):
        prepare(corpus, bpe_file, tmp_path / "out", show_progress=False)
    with pytest.raises(UserError, match="holds int64, not text"):
        prepare(corpus, bpe_file, tmp_path / "out", text_column="id", show_progress=False)
    prepare(corpus, bpe_file, tmp_path / "out", text_column="content", show_progress=False)
    assert ids_of(tmp_path / "out") == reference_ids(bpe_file, DOCS[:20])


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_a_damaged_compressed_file_is_named_with_the_offset(tmp_path, kind, damage):
    text = "".join(f"line {i} of a text that compresses\n" for i in range(20000)).encode()
    # with a checksum, as the zstd command writes by default
    data = gzip.compress(text) if kind == "gzip" else zstandard.ZstdCompressor(write_checksum=True).compress(text)
    middle = len(data) // 2
    data = data[:middle] + bytes(b ^ 0x55 for b in data[middle:middle + 64]) + data[middle + 64:] \
        if damage == "corrupt" else data[:middle]
    f = tmp_path / ("c.txt.gz" if kind == "gzip" else "c.txt.zst")
    f.write_bytes(data)
    with pytest.raises(UserError) as e:
        prepare(str(f), "char", tmp_path / "out", show_progress=False)
    assert f"{f} is damaged" in str(e.value) and f"{kind} data" in str(e.value) and "at about byte" in str(e.value)


def test_hf_dataset_is_streamed_through_the_datasets_library(tmp_path, monkeypatch, small_tasks, bpe_file):
    """Offline: a stand-in for ``datasets`` streams the rows of a local Parquet file."""
    parquet = write_parquet(tmp_path / "docs.parquet", DOCS)
    calls = []

    class Streamed:
        info = types.SimpleNamespace(splits={"train": types.SimpleNamespace(num_examples=len(DOCS))})

        def __iter__(self):
            yield from pq.read_table(parquet).to_pylist()

    def load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return Streamed()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    data = prepare("hf:someone/corpus:sample-10BT", bpe_file, tmp_path / "out", workers=2, show_progress=False)
    assert ids_of(tmp_path / "out") == reference_ids(bpe_file, DOCS)
    assert set(calls) == {("someone/corpus", "sample-10BT", "train", True)}
    assert data.meta["sources"] == [{"name": "hf:someone/corpus:sample-10BT"}]
    # The declared row count spares a first pass over the stream: it is read once to encode.
    assert len(calls) == 2  # one call to read the card, one to encode


def test_hf_dataset_with_another_text_field_and_a_bad_spec(tmp_path, monkeypatch):
    rows = [{"content": "hello there\n" * 20}, {"content": "general kenobi\n" * 20}]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: iter(rows)))
    with pytest.raises(UserError, match=r"row 0 has no field 'text' \(it has content\)"):
        prepare("hf:x/y", "char", tmp_path / "out", show_progress=False)
    data = prepare("hf:x/y", "char", tmp_path / "out", text_column="content", val_fraction=0.5, show_progress=False)
    assert data.tokenizer().decode(data.tokens("val").tolist()) == "general kenobi\n" * 20
    with pytest.raises(UserError, match="hf:DATASET:CONFIG:SPLIT"):
        prepare("hf:a:b:c:d", "char", tmp_path / "out2", show_progress=False)


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", ["", " \n\t \n"])
def test_an_empty_or_blank_corpus_is_refused_by_every_command(tmp_path, monkeypatch, capsys, content):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    Path("blank.txt").write_text(content)
    write_parquet(tmp_path / "blank.parquet", [content, None])
    for corpus in ("blank.txt", "blank.parquet"):
        for argv in (["prepare", "--corpus", corpus, "--out", "data"],
                     ["tokenizer", "train", "--corpus", corpus, "--vocab-size", "300", "--out", "t.json"],
                     ["train", "--preset", "tiny", "--corpus", corpus, "--max-steps", "4", "--out", "run"],
                     ["eval", "runs/none", "--corpus", corpus]):  # the corpus is read before the model
            assert main(argv) == 1, argv
            assert "is empty (no text, or only whitespace)" in capsys.readouterr().err, argv
    assert not any(Path(p).exists() for p in ("data", "t.json", "run"))


def test_workers_must_be_between_one_and_the_cores(tmp_path, capsys):
    corpus = str(_text_file(tmp_path, "some text\n" * 50))
    cores = len(os.sched_getaffinity(0))
    for workers in (0, cores + 1):
        assert main(["prepare", "--corpus", corpus, "--out", str(tmp_path / "out"), "--workers", str(workers)]) == 1
        assert f"--workers {workers}: give a number from 1 to {cores}" in capsys.readouterr().err


def test_a_full_disk_leaves_no_partial_shard_says_what_is_needed_and_resumes(tmp_path, monkeypatch, small_tasks,
                                                                             bpe_file):
    corpus = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    prepare(corpus, bpe_file, tmp_path / "reference", shard_tokens=5000, show_progress=False)
    writes, append = [], shards._append

    def fill_up(f, ids):
        writes.append(len(ids))
        if len(writes) > 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        append(f, ids)

    monkeypatch.setattr(shards, "_append", fill_up)
    with pytest.raises(UserError, match=r"is full \(No space left on device\): the remaining shards need about "
                                        r"0\.\d MB more and [\d,.]+ MB are free; .* run the same command again") as e:
        prepare(corpus, bpe_file, tmp_path / "out", shard_tokens=5000, show_progress=False)
    work = tmp_path / ".out.partial"
    kept = sorted(p.name for p in work.glob("*.bin"))
    assert kept and not list(work.glob("*.part")) and not (tmp_path / "out").exists()
    assert f"the {len(kept)} finished shards are kept" in str(e.value)
    monkeypatch.setattr(shards, "_append", append)
    prepare(corpus, bpe_file, tmp_path / "out", shard_tokens=5000, show_progress=False)
    assert ids_of(tmp_path / "out") == ids_of(tmp_path / "reference") and not work.exists()


# --- resuming after kill -9 ------------------------------------------------------------------------

#: prepare in a child process whose encoding is slowed down, so it can be killed half-way
SLOW_PREPARE = """import signal, sys, time
# Ctrl-C as a terminal delivers it: a shell starts background jobs with SIGINT ignored, and
# Python then never raises KeyboardInterrupt (so a test run started in the background failed).
signal.signal(signal.SIGINT, signal.default_int_handler)
from gptlab.data import encoder_pool, pieces, prepare
pieces.TASK_CHARS, pieces.PIECE_CHARS = 2000, 500
encode = encoder_pool.encode_pieces
def slow(p):
    time.sleep(0.03)
    return encode(p)
encoder_pool.encode_pieces = slow
prepare.prepare(sys.argv[1], sys.argv[2], sys.argv[3], workers=1, shard_tokens=3000, show_progress=False)
"""


def finished_shards(work: Path) -> list[dict]:
    """The training shards a preparation in ``work`` has recorded as finished."""
    try:
        return json.loads((work / shards.PROGRESS).read_text())["shards"]["train"]
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill -9", "Ctrl-C"])
def test_a_preparation_stopped_half_way_continues_to_identical_shards(tmp_path, small_tasks, bpe_file, capsys, sig):
    corpus = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    prepare(corpus, bpe_file, tmp_path / "reference", workers=1, shard_tokens=3000, show_progress=False)
    work = tmp_path / ".out.partial"
    child = subprocess.Popen([sys.executable, "-c", SLOW_PREPARE, corpus, bpe_file, str(tmp_path / "out")],
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while child.poll() is None and time.monotonic() < deadline and len(finished_shards(work)) < 3:
        time.sleep(0.01)
    child.send_signal(sig)
    _, err = child.communicate(timeout=60)
    assert child.returncode != 0, "the preparation ended before it was stopped"
    finished = finished_shards(work)
    assert len(finished) >= 3 and not (tmp_path / "out").exists()
    if sig == signal.SIGINT:  # Ctrl-C: the unfinished shard is removed, and the way on is said
        assert not list(work.glob("*.part")) and "the same command continues from the finished shards" in err
    prepare(corpus, bpe_file, tmp_path / "out", workers=2, shard_tokens=3000, show_progress=False)
    assert f"continuing the preparation in {work}: {len(finished)} shards already written" in capsys.readouterr().err
    reference = {p.name: p.read_bytes() for p in (tmp_path / "reference").iterdir() if p.suffix == ".bin"}
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.suffix == ".bin"} == reference
    meta = [json.loads((tmp_path / d / "meta.json").read_text()) for d in ("reference", "out")]
    assert meta[0] == meta[1] and not work.exists()


# --- memory ---------------------------------------------------------------------------------------

#: peak resident memory before and after preparing a corpus, in kB (Linux's VmHWM)
MEASURE = """import sys
from gptlab.data.prepare import prepare
def peak():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
before = peak()
prepare(sys.argv[1], "char", sys.argv[2], workers=1, show_progress=False)
print(before, peak())
"""


def _peak_growth_kb(tmp_path: Path, n_docs: int) -> tuple[int, int]:
    """(peak memory growth while preparing, corpus size), both in kB, for ``n_docs`` documents of 2 kB."""
    corpus = tmp_path / f"{n_docs}.jsonl"
    with open(corpus, "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"text": f"document {i}\n" + "words and more words, " * 90}) + "\n")
    result = subprocess.run([sys.executable, "-c", MEASURE, str(corpus), str(tmp_path / f"out-{n_docs}")],
                            capture_output=True, text=True, check=True)
    before, after = map(int, result.stdout.split()[-2:])
    return after - before, corpus.stat().st_size // 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak memory from /proc")
def test_peak_memory_is_flat_in_the_corpus_size(tmp_path):
    small, small_kb = _peak_growth_kb(tmp_path, 2_000)
    large, size_kb = _peak_growth_kb(tmp_path, 16_000)
    # The large corpus's text alone is 31 MB and its ids as int64 would be 250 MB; a streamed
    # preparation holds a task of a megabyte or so and its ids, whatever the corpus size. The
    # allocator's peak still wanders by 1-2.5 MB from run to run (measured on a 2-core AMD EPYC
    # with AVX2), so the growth is compared with a quarter of the extra text, not with zero.
    assert large < size_kb and large - small < (size_kb - small_kb) / 4, (small, large, size_kb)


# --- the loader ----------------------------------------------------------------------------------

def numbered_shards(sizes: list[int]) -> list[np.ndarray]:
    """Shards whose ids say where they are: shard i holds i * 100_000 + position."""
    return [(i * 100_000 + np.arange(n)).astype(np.uint32) for i, n in enumerate(sizes)]


def test_windows_are_drawn_across_shards_in_proportion_to_their_size():
    block, sizes = 16, [1_000, 3_000, 6_016, 10]  # the last is too short for a window: never drawn
    batches = RandomBatches(numbered_shards(sizes), block, batch_size=256, seed=0)
    counts = np.zeros(len(sizes))
    for _ in range(40):
        x, y = batches.next()
        shard = (x[:, 0] // 100_000).numpy()
        assert ((x[:, 1:] - x[:, :-1]) == 1).all() and (y[:, -1] - x[:, 0] == block).all()  # inside one shard
        counts += np.bincount(shard, minlength=len(sizes))
    starts = np.array([max(n - block, 0) for n in sizes])
    np.testing.assert_allclose(counts / counts.sum(), starts / starts.sum(), atol=0.02)
    assert counts[-1] == 0


def test_one_shard_draws_exactly_what_one_array_did():
    """A dataset prepared before shards (one array) trains on exactly the same windows."""
    tokens = np.arange(5_000, dtype=np.uint16)
    a, b = RandomBatches(tokens, 32, 8, seed=3), RandomBatches([tokens], 32, 8, seed=3)
    for _ in range(5):
        assert all(torch.equal(u, v) for u, v in zip(a.next(), b.next()))


def test_ddp_ranks_take_disjoint_deterministic_parts_of_one_global_draw():
    sizes, world, per_rank = [2_000, 5_000, 3_000], 4, 8
    parts = []
    for rank in range(world):  # each process builds its own loader from the same seed, as under torchrun
        batches = RandomBatches(numbered_shards(sizes), 64, per_rank * world, seed=11)
        parts.append([shard_batch(batches.next(), Dist(rank=rank, world=world))[0] for _ in range(3)])
    whole = RandomBatches(numbered_shards(sizes), 64, per_rank * world, seed=11)
    for step in range(3):
        expected = whole.next()[0]
        mine = [parts[rank][step] for rank in range(world)]
        assert all(m.shape == (per_rank, 64) for m in mine)
        assert torch.equal(torch.cat(mine), expected)  # the ranks' rows make up the global batch, each once


def test_the_loader_position_resumes_exactly_and_refuses_other_shards():
    shards_ = numbered_shards([3_000, 4_000])
    straight = RandomBatches(shards_, 32, 16, seed=5)
    expected = [straight.next() for _ in range(6)]
    first = RandomBatches(shards_, 32, 16, seed=5)
    got = [first.next() for _ in range(3)]
    state = first.state_dict()
    resumed = RandomBatches(shards_, 32, 16, seed=999)
    resumed.load_state_dict(state)
    got += [resumed.next() for _ in range(3)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, got))
    with pytest.raises(UserError, match="trained on shards of"):
        RandomBatches(numbered_shards([3_000, 4_001]), 32, 16, seed=5).load_state_dict(state)


def test_training_on_shards_resumes_bit_for_bit(tmp_path, monkeypatch, small_tasks):
    """A tiny run on a dataset of several shards: 12 steps straight, or 6 + resume + 6, end identical."""
    from safetensors.torch import load_file

    from gptlab.config import resolve_config
    from gptlab.train import loop
    from gptlab.weights import checkpoint as ckpt

    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    text = "".join(f"{who}: line {i} of the play\n" for i in range(400) for who in ("ROMEO", "JULIET"))
    data = prepare(str(_text_file(tmp_path, text)), "char", tmp_path / "data", shard_tokens=4_000,
                   show_progress=False)
    assert len(data.meta["shards"]["train"]) >= 4

    def config(**train):
        return resolve_config("tiny", model_overrides={"dropout": 0.1, "block_size": 32},
                              train_overrides={"data": str(tmp_path / "data"), "eval_interval": 6, "max_steps": 12,
                                               **train})

    loop.train(*config(), tmp_path / "straight", show_progress=False)
    model_cfg, cfg = config(max_tokens=6 * 32 * config()[1].batch_size)
    assert loop.train(model_cfg, cfg, tmp_path / "split", show_progress=False).step == 6
    loop.train(*config(), tmp_path / "split", resume=loop.read_saved_run(tmp_path / "split"), show_progress=False)
    a, b = (load_file(str(tmp_path / run / "last" / ckpt.WEIGHTS)) for run in ("straight", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
