"""The gptlab command: help for every subcommand, and the data/tokenizer/prepare commands."""

from __future__ import annotations

import json

import pytest

from gptlab.cli import build_parser, main
from gptlab.tokenizers import load_tokenizer_file

TEXT = "The quick brown fox jumps over the lazy dog.\nPack my box with five dozen liquor jugs!\n" * 60


@pytest.fixture
def corpus(tmp_path) -> str:
    f = tmp_path / "corpus.txt"
    f.write_text(TEXT)
    return str(f)


def _parsers(parser, path=()) -> list[tuple[tuple[str, ...], object]]:
    """Every (command path, parser) pair, e.g. (("data", "fetch"), <parser>), found by walking."""
    import argparse

    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append(((*path, name), sub))
                found += _parsers(sub, (*path, name))
    return found


PARSERS = _parsers(build_parser())


@pytest.mark.parametrize("path, parser", PARSERS, ids=[" ".join(p) for p, _ in PARSERS])
def test_every_command_has_help_for_every_flag(path, parser, capsys):
    import argparse

    undocumented = [a.dest for a in parser._actions
                    if not isinstance(a, argparse._SubParsersAction) and not (a.help and a.help.strip())]
    assert undocumented == []
    with pytest.raises(SystemExit) as e:
        main([*path, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: gptlab " + " ".join(path))


def test_data_list_names_the_corpora(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "shakespeare " in out and "shakespeare-tiny" in out and "(default)" in out


def test_data_fetch(capsys, tiny_corpus_text):
    assert main(["data", "fetch", "shakespeare-tiny"]) == 0
    assert f"({len(tiny_corpus_text.encode()):,} bytes)" in capsys.readouterr().out
    assert main(["data", "fetch", "hamlet"]) == 1
    assert "known corpora: shakespeare, shakespeare-tiny" in capsys.readouterr().err


def test_tokenizer_train(tmp_path, corpus, capsys):
    out = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--corpus", corpus, "--vocab-size", "300", "--out", str(out)]) == 0
    tok = load_tokenizer_file(out)
    assert tok.vocab_size == 300 and tok.special_tokens == {"<|endoftext|>": 299}
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert "bytes per token" in capsys.readouterr().out

    before = out.read_bytes()
    assert main(["tokenizer", "train", "--corpus", corpus, "--vocab-size", "290", "--out", str(out)]) == 1
    assert "--force" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["tokenizer", "train", "--corpus", corpus, "--vocab-size", "290", "--out", str(out),
                 "--pattern", "gpt4", "--force"]) == 0
    assert load_tokenizer_file(out).vocab_size == 290


def test_tokenizer_vocab_too_small_is_one_line(tmp_path, corpus, capsys):
    assert main(["tokenizer", "train", "--corpus", corpus, "--vocab-size", "200", "--out",
                 str(tmp_path / "t.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "257" in err
    assert not (tmp_path / "t.json").exists()


def test_tokenizer_vocab_larger_than_the_corpus_supports_stops_early(tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("abcabc")
    with pytest.warns(UserWarning):
        assert main(["tokenizer", "train", "--corpus", str(small), "--vocab-size", "5000", "--out",
                     str(tmp_path / "t.json")]) == 0
    assert load_tokenizer_file(tmp_path / "t.json").vocab_size < 300


def test_prepare_command(tmp_path, corpus, capsys):
    out = tmp_path / "data"
    assert main(["prepare", "--corpus", corpus, "--tokenizer", "bpe:300", "--out", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 300 and meta["dtype"] == "uint16" and meta["tokenizer"]["type"] == "bpe"
    assert meta["train_tokens"] * 2 == (out / "train.bin").stat().st_size
    assert main(["prepare", "--corpus", corpus, "--tokenizer", "bpe:300", "--out", str(out)]) == 0
    assert "reusing" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["prepare", "--corpus", "no-such-corpus"], "known corpus name"),
    (["prepare", "--tokenizer", "wordpiece"], "neither a known kind"),
    (["tokenizer", "train", "--corpus", "/nonexistent/x.txt", "--out", "t.json"], "not a known corpus name"),
])
def test_bad_input_is_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["prepare", "--val-fraction", "1.5"], ["tokenizer", "train", "--vocab-size", "-3",
                                                                          "--out", "x"], ["sample", "--top-k", "0"]])
def test_malformed_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    from gptlab.errors import UserError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError):
        main(["--debug", "prepare", "--corpus", "no-such-corpus"])
