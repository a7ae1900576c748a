"""The character-level tokenizer and the shared tokenizer interface."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gptlab.errors import UserError
from gptlab.tokenizers import CharTokenizer, build_tokenizer, load_tokenizer_file


@given(st.text(min_size=1))
def test_round_trip_on_arbitrary_unicode(text):
    tok = CharTokenizer.train(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == len(set(text))


@given(st.lists(st.integers(min_value=-5, max_value=100)))
def test_decode_never_fails(ids):
    tok = CharTokenizer.train("abc", special_tokens=["<|endoftext|>"])
    assert isinstance(tok.decode(ids), str)


def test_vocabulary_is_sorted_and_specials_follow():
    tok = CharTokenizer.train("hello world", special_tokens=["<|endoftext|>"])
    assert tok.chars == [" ", "d", "e", "h", "l", "o", "r", "w"]
    assert tok.special_tokens == {"<|endoftext|>": 8}
    assert tok.encode("hold") == [3, 5, 4, 1]


def test_unknown_character_is_an_error_naming_it():
    tok = CharTokenizer.train("abc")
    with pytest.raises(UserError) as e:
        tok.encode("abz")
    assert "'z'" in str(e.value) and "position 2" in str(e.value) and "unk" in str(e.value)


def test_unknown_character_maps_to_unk_when_asked():
    tok = CharTokenizer.train("abc", unk=True)
    unk = tok.token_id("<unk>")
    assert tok.encode("azb") == [0, unk, 1]
    assert tok.decode([0, unk, 1]) == "a<unk>b"


def test_special_tokens_only_when_allowed():
    tok = CharTokenizer.train("ab<|endoftext|>", special_tokens=["<|endoftext|>"])
    eot = tok.eot_id
    assert tok.encode("a<|endoftext|>b", allowed_special="all") == [tok.stoi["a"], eot, tok.stoi["b"]]
    plain = tok.encode("a<|endoftext|>b")
    assert eot not in plain and tok.decode(plain) == "a<|endoftext|>b"
    with pytest.raises(ValueError, match="unknown special"):
        tok.encode("a", allowed_special={"<|nope|>"})


def test_save_load_round_trip(tmp_path):
    tok = CharTokenizer.train("Shakespeare's\nsonnets é😀", special_tokens=["<|endoftext|>"], unk=True)
    tok.save(tmp_path / "tok.json")
    again = load_tokenizer_file(tmp_path / "tok.json")
    assert isinstance(again, CharTokenizer)
    assert again.to_dict() == tok.to_dict() and again.special_tokens == tok.special_tokens
    text = "sonnets 😀 ?"
    assert again.encode(text) == tok.encode(text)


def test_bad_tokenizer_files_and_specs(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_tokenizer_file(tmp_path / "bad.json")
    (tmp_path / "odd.json").write_text('{"type": "wordpiece"}')
    with pytest.raises(UserError, match="unknown tokenizer type"):
        load_tokenizer_file(tmp_path / "odd.json")
    with pytest.raises(UserError, match="bpe:VOCAB_SIZE"):
        build_tokenizer("bpe:many", "text")
    with pytest.raises(UserError, match="neither a known kind"):
        build_tokenizer("sentencepiece", "text")
    with pytest.raises(UserError, match="empty"):
        build_tokenizer("char", "")
