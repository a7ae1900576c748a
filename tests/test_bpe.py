"""Byte-level BPE trained from scratch: hand-checked merges, the incremental trainer against a
naive one, encoding paths (pure Python and tiktoken) against each other, saving and loading."""

from __future__ import annotations

import json
import random
import warnings
from collections import Counter

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptlab.errors import UserError
from gptlab.tokenizers import BPETokenizer, load_tokenizer_file
from gptlab.tokenizers.bpe import GPT2_PATTERN, GPT4_PATTERN, bpe_merge, render_token

EOT = "<|endoftext|>"
ANY_TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=80)
# Text close to the training corpus, so that learned merges actually fire.
NEAR_TEXT = st.text(alphabet=st.sampled_from(list("the cat sat on a mat, its hat's flat!\n\t 12 é😀")), max_size=120)


def corpus(n_words: int, seed: int = 0) -> str:
    """Seeded pseudo-English with digits, punctuation, whitespace runs and a few non-ASCII words."""
    rng = random.Random(seed)
    vocab = "the cat sat on a mat with its hat and the dog's flat at that time café naïve 東京 😀 1999 42".split()
    seps = [" "] * 12 + [", ", ". ", "\n", "\n\n", "  ", "\t", "! "]
    return "".join(rng.choice(vocab) + rng.choice(seps) for _ in range(n_words))


@pytest.fixture(scope="module")
def small() -> BPETokenizer:
    return BPETokenizer.train(corpus(3000) + EOT + corpus(500, seed=1), vocab_size=320, special_tokens=[EOT])


@pytest.fixture(scope="module")
def small_pure(small) -> BPETokenizer:
    return BPETokenizer(small.ranks, small.pattern, small.special_tokens, small.merges, use_tiktoken=False)


# --- training: worked examples ----------------------------------------------------------------

def test_merges_worked_out_by_hand():
    # "ab ab abc" is cut by GPT-2's pattern into "ab", " ab", " abc": spaces stick to the
    # following word, so the pair (b, " ") can never be counted.
    #   pairs: (a,b) 3, (" ",a) 2, (b,c) 1          -> merge (97, 98) "ab"  = 256
    #   words: [256], [32,256], [32,256,99]
    #   pairs: (" ",ab) 2, (ab,c) 1                 -> merge (32, 256) " ab" = 257
    #   words: [256], [257], [257,99]; the one pair left occurs once -> stop
    tok = BPETokenizer.train("ab ab abc", vocab_size=258)
    assert tok.merges == [(97, 98), (32, 256)]
    assert tok.token_bytes(256) == b"ab" and tok.token_bytes(257) == b" ab"
    assert tok.encode("ab abc") == [256, 257, 99]


def test_ties_go_to_the_smallest_pair_of_ids():
    # "aaabdaaabac" is one chunk. Pairs: aa 4 (twice in each "aaa"), ab 2, bd da ba ac 1.
    #   merge (97, 97) "aa" = 256; left to right: aa a b d aa a b a c
    #   pairs: (aa,a) 2, (a,b) 2, others 1 -- a tie; (97, 98) < (256, 97) wins: "ab" = 257
    #   aa ab d aa ab a c: (aa,ab) 2 -> "aaab" = 258; then every pair occurs once.
    tok = BPETokenizer.train("aaabdaaabac", vocab_size=259)
    assert tok.merges == [(97, 97), (97, 98), (256, 257)]
    # "ba ba dc dc": " dc" occurs twice, "ba" and " ba" once each. Pairs with count 2:
    # (98, 97) "ba", (32, 100) " d", (100, 99) "dc"; the smallest, (32, 100), goes first.
    assert BPETokenizer.train("ba ba dc dc", vocab_size=257).merges == [(32, 100)]


def test_training_ignores_chunk_order():
    words = regex.findall(r"\p{L}+", corpus(400))
    shuffled = words[:]
    random.Random(1).shuffle(shuffled)
    a = BPETokenizer.train("".join(" " + w for w in words), vocab_size=300)
    b = BPETokenizer.train("".join(" " + w for w in shuffled), vocab_size=300)
    assert a.merges == b.merges and a.ranks == b.ranks


def test_stops_early_with_a_warning_when_the_text_runs_out_of_pairs():
    with pytest.warns(UserWarning, match="supports only 260 tokens"):
        tok = BPETokenizer.train("aaabdaaabac", vocab_size=1000, special_tokens=[EOT])
    assert tok.vocab_size == 260 and tok.special_tokens == {EOT: 259}


def test_vocab_size_below_bytes_plus_specials_is_a_user_error():
    with pytest.raises(UserError, match="at least 258"):
        BPETokenizer.train("hello", vocab_size=257, special_tokens=[EOT, "<pad>"])


def test_bad_patterns_are_user_errors():
    with pytest.raises(UserError, match="not a valid regex"):
        BPETokenizer.train("hello", vocab_size=300, pattern="(")
    with pytest.raises(UserError, match="capturing groups"):
        BPETokenizer.train("hello", vocab_size=300, pattern=r"(\w+)|\s")


def test_special_strings_in_the_training_text_only_separate_chunks():
    with pytest.warns(UserWarning, match="supports only 258"):
        tok = BPETokenizer.train((EOT + "ab") * 50, vocab_size=300, special_tokens=[EOT])
    learned = {tok.token_bytes(i) for i in range(256, tok.vocab_size - 1)}
    assert learned == {b"ab"}


# --- training: incremental updates against recounting everything -------------------------------

def naive_train(text: str, vocab_size: int, pattern: str = GPT2_PATTERN) -> tuple[list[bytes], list[tuple[int, int]]]:
    """The textbook trainer: every chunk occurrence kept, all pairs recounted before each merge."""
    words = [list(chunk.encode("utf-8")) for chunk in regex.findall(pattern, text)]
    vocab = [bytes([b]) for b in range(256)]
    merges = []
    while len(vocab) < vocab_size:
        counts = Counter(pair for w in words for pair in zip(w, w[1:]))
        if not counts:
            break
        (a, b), count = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if count < 2:
            break
        new = len(vocab)
        vocab.append(vocab[a] + vocab[b])
        merges.append((a, b))
        for k, w in enumerate(words):
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[k] = out
    return vocab, merges


def random_text(seed: int) -> str:
    rng = random.Random(seed)
    alphabet = rng.choice(["ab ", "abc \n", "aab  c.", "xyz12 ,", "éa😀 b"])
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(200, 1500)))


def test_incremental_trainer_equals_naive_trainer():
    for seed in range(12):
        text = random_text(seed)
        vocab, merges = naive_train(text, 256 + 80)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a few of these texts run out of pairs early
            tok = BPETokenizer.train(text, vocab_size=256 + 80)
        assert tok.merges == merges, seed
        assert [tok.token_bytes(i) for i in range(tok.vocab_size)] == vocab
        # Merge i made token 256 + i: the merged bytes never existed already.
        assert all(tok.ranks[vocab[a] + vocab[b]] == 256 + i for i, (a, b) in enumerate(merges))


def test_incremental_trainer_equals_naive_trainer_with_gpt4_pattern():
    text = corpus(600, seed=3)
    vocab, merges = naive_train(text, 320, GPT4_PATTERN)
    tok = BPETokenizer.train(text, vocab_size=320, pattern=GPT4_PATTERN)
    assert tok.merges == merges and tok.pattern == GPT4_PATTERN


# --- encoding ----------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(ANY_TEXT, NEAR_TEXT))
def test_round_trip_and_both_paths_agree(small, small_pure, text):
    ids = small.encode(text)
    assert small.decode(ids) == text
    assert small_pure.encode(text) == ids


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from([NEAR_TEXT, st.just(EOT), st.just("<|endoftext|"), ANY_TEXT]), max_size=5).flatmap(
    lambda strategies: st.tuples(*strategies)).map("".join))
def test_allowed_special_on_both_paths(small, small_pure, text):
    for allowed in [(), "all"]:
        ids = small.encode(text, allowed_special=allowed)
        assert small_pure.encode(text, allowed_special=allowed) == ids
        assert small.decode(ids) == text
    assert small.encode(text, "all").count(small.eot_id) == text.count(EOT)
    assert small.eot_id not in small.encode(text)  # not allowed: spelled out as ordinary text


def test_both_paths_agree_on_a_longer_text(small, small_pure):
    text = corpus(20_000, seed=7) + "".join(chr(random.Random(7).randint(32, 0x2FFFF)) for _ in range(3000))
    text = text.encode("utf-8", "replace").decode("utf-8")
    assert small.encode(text) == small_pure.encode(text)
    assert small.encode_batch(text.split("\n")) == small_pure.encode_batch(text.split("\n"))


def test_gpt4_pattern_and_user_patterns_on_both_paths():
    text = corpus(2000, seed=5) + " 1234567 don'T\r\n\r\n  x"
    for pattern in [GPT4_PATTERN, r"\s*\S+|\s+"]:
        tok = BPETokenizer.train(text, vocab_size=300, pattern=pattern)
        pure = BPETokenizer(tok.ranks, pattern, use_tiktoken=False)
        assert tok.encode(text) == pure.encode(text)
        assert tok.decode(tok.encode(text)) == text


def test_patterns_tiktoken_cannot_run_fall_back_to_pure_python():
    tok = BPETokenizer.train(corpus(300), vocab_size=280, pattern=r"\m\w+|\W")  # \m: start of word
    with pytest.warns(UserWarning, match="pure Python"):
        ids = tok.encode("the cat sat")
    assert ids == BPETokenizer(tok.ranks, tok.pattern, use_tiktoken=False).encode("the cat sat")


def test_bpe_merge_follows_lowest_rank_of_the_concatenation():
    # Tokens: the bytes, then "bc" (256), "ab" (257), "abc" (258). In "abc" the pair (b, c)
    # has the lower rank and goes first, then "a" + "bc" -> "abc"; on a tie the left pair wins.
    ranks = {bytes([i]): i for i in range(256)} | {b"bc": 256, b"ab": 257, b"abc": 258}
    assert bpe_merge(b"abc", ranks) == [258]
    assert bpe_merge(b"abcbc", ranks) == [258, 256]
    assert bpe_merge(b"abab", ranks) == [257, 257]
    assert bpe_merge(b"xabx", ranks) == [ord("x"), 257, ord("x")]


def test_surrogates_are_replaced_like_tiktoken(small, small_pure):
    for text in ["a\ud83d\ude00b", "lone \udc00 low", "\ud800"]:
        assert small.encode(text) == small_pure.encode(text)
        assert small.decode(small.encode(text)) == text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(min_value=-(2 ** 40), max_value=2 ** 40) | st.integers(0, 330), max_size=40))
def test_decode_never_fails(small, ids):
    assert isinstance(small.decode(ids), str)
    assert small.decode_bytes(ids) == b"".join(
        small.token_bytes(i) if 0 <= i < small.vocab_size else "\ufffd".encode() for i in ids)


def test_token_bytes_outside_the_vocabulary_is_a_user_error(small):
    with pytest.raises(UserError, match="outside"):
        small.token_bytes(small.vocab_size)


def test_special_tokens_with_given_ids_leave_gaps_that_decode_to_replacement():
    ranks = {bytes([i]): i for i in range(256)}
    tok = BPETokenizer(ranks, special_tokens={"<a>": 300, "<b>": 258})
    assert tok.vocab_size == 301
    assert tok.encode("x<a><b>", "all") == [120, 300, 258]
    assert tok.decode([120, 256, 300]) == "x\ufffd<a>"
    with pytest.raises(ValueError, match="special token ids"):
        BPETokenizer(ranks, special_tokens={"<a>": 65})


# --- saving and loading ------------------------------------------------------------------------

def test_save_load_round_trip(small, tmp_path):
    path = tmp_path / "bpe.json"
    small.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["type"] == "bpe" and data["special_tokens"] == {EOT: small.eot_id}
    assert data["tokens"][256:] == [render_token(small.token_bytes(i)) for i in range(256, small.vocab_size - 1)]
    assert any("Ġ" in t for t in data["tokens"])  # human-readable: " the" is written "Ġthe"
    loaded = load_tokenizer_file(path)
    assert isinstance(loaded, BPETokenizer)
    assert (loaded.ranks, loaded.merges, loaded.special_tokens, loaded.pattern) == (
        small.ranks, small.merges, small.special_tokens, small.pattern)
    text = corpus(500, seed=9) + EOT + "tail"
    assert loaded.encode(text, "all") == small.encode(text, "all")


def test_round_trip_without_merges(tmp_path):
    tok = BPETokenizer({bytes([i]): i for i in range(256)} | {b"hi": 256}, GPT4_PATTERN)
    tok.save(tmp_path / "t.json")
    loaded = load_tokenizer_file(tmp_path / "t.json")
    assert loaded.merges is None and loaded.ranks == tok.ranks and loaded.pattern == GPT4_PATTERN


@pytest.mark.parametrize("damage, message", [
    (lambda d: d["tokens"].append(d["tokens"][300]), "more than once"),
    (lambda d: d["tokens"].pop(65), "single-byte tokens"),
    (lambda d: d["tokens"].__setitem__(300, "a b"), "not in GPT-2's byte alphabet"),
    (lambda d: d["special_tokens"].__setitem__(EOT, 3), "special token ids"),
    (lambda d: d.pop("tokens"), "tokens"),
    (lambda d: d["merges"].__setitem__(0, "Ġ"), "invalid"),
])
def test_damaged_files_are_user_errors(small, damage, message):
    d = json.loads(json.dumps(small.to_dict()))
    damage(d)
    with pytest.raises(UserError, match=message):
        BPETokenizer.from_dict(d)
