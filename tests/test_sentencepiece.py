"""SentencePiece BPE (tokenizers/sentencepiece.py), checked against the sentencepiece library and
transformers on models trained here, read from a tokenizer.model and from GGUF metadata; the real
Gemma 3 vocabulary is checked against transformers in a slow test."""

from __future__ import annotations

import io
import json
import random
import warnings
from functools import lru_cache
from pathlib import Path

import pytest

from gptlab.errors import UserError
from gptlab.tokenizers import (
    SentencePieceTokenizer,
    build_tokenizer,
    load_tokenizer_file,
    tokenizer_file_in,
    tokenizer_from_dict,
)
from gptlab.tokenizers.sentencepiece import (
    bpe_segment,
    literal_matcher,
    read_model_proto,
    word_splitter,
)

WORDS = ("the quick brown fox jumps over the lazy dog café naïve résumé über Straße façade "
         "東京 大阪 日本語 テキスト 😀 12345 67890 3.14 hello world").split()
CONTROL = ["<|im_start|>", "<|im_end|>"]
# Starts with a letter: transformers adds no "▁" before a text that starts with a space or
# with a user-defined piece, where SentencePiece (and gptlab) add one; and holds no control
# token, after which transformers adds no "▁" either, where llama.cpp and gptlab do.
VARIED = ("Hello  world, naïve café résumé — “quotes” über Straße\n\n"
          "東京 大阪 日本語のテキスト 😀🎉 emoji 🦜 x<sep>y <sep> z\n"
          "digits 0123456789 3.14159 1,000,000\n"
          "tabs\tand\t\ttabs   three spaces    four     five          ten\n\n\n"
          "unseen: \x00\x01 Ω ∑ ا ק ᚠ 𝔘 \u2028 end  \n")


def sentencepiece():
    """The sentencepiece library, the reference (only the tests that compare with it need it)."""
    return pytest.importorskip("sentencepiece")


def model_proto(data: bytes):
    """``data`` parsed by protobuf with sentencepiece's own message definitions."""
    return pytest.importorskip("sentencepiece.sentencepiece_model_pb2").ModelProto.FromString(data)


def corpus_lines(n: int = 3000) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + " " * (i % 4) + f" {i}"
            for i in range(n)]


@lru_cache(maxsize=None)
def trained_model(**options) -> bytes:
    """A small SentencePiece BPE model trained here, as Llama 2's was (identity normaliser,
    spaces kept, whitespace-only pieces, split digits, byte fallback); ``options`` change it."""
    settings = {"model_type": "bpe", "vocab_size": 400, "byte_fallback": True, "normalization_rule_name": "identity",
                "remove_extra_whitespaces": False, "add_dummy_prefix": True, "allow_whitespace_only_pieces": True,
                "split_digits": True, "character_coverage": 0.9995, "user_defined_symbols": ["<sep>"],
                "control_symbols": CONTROL, "minloglevel": 2}
    # lru_cache needs hashable options, so lists come as tuples; the trainer wants lists.
    settings.update({k: list(v) if isinstance(v, tuple) else v for k, v in options.items()})
    out = io.BytesIO()
    sentencepiece().SentencePieceTrainer.train(sentence_iterator=iter(corpus_lines()), model_writer=out, **settings)
    return out.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A Hugging Face style directory holding only tokenizer.model."""
    folder = tmp_path_factory.mktemp("spm")
    (folder / "tokenizer.model").write_bytes(trained_model())
    return folder


@pytest.fixture(scope="module")
def reference(model_dir):
    return sentencepiece().SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = [*"the quick brown fox", " ", " ", "  ", "\n", "\t", "é", "ï", "東", "京", "😀", "ñ", "Ω", "7",
                "<sep>", "<", ">", "\x00"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(n)]


def one_line_error(match: str, fn, *args) -> str:
    with pytest.raises(UserError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


# --- the algorithm on hand-made vocabularies ------------------------------------------------------

def test_the_highest_scoring_pair_merges_first():
    scores = {"he": 3.0, "▁t": 2.0, "▁the": 1.0, "th": 0.5}
    # "he" outscores "th", so "t" and "h" never meet; then "▁t" + "he" forms "▁the".
    assert bpe_segment("▁the", scores) == ["▁the"]
    assert bpe_segment("aaa", {"aa": 1.0}) == ["aa", "a"]  # a tie goes to the leftmost pair
    # A word that is itself a piece is not necessarily one token: "bc" merges first, and
    # neither "abc" nor "bcd" is a piece, so "abcd" is never reached.
    assert bpe_segment("abcd", {"bc": 10.0, "ab": 5.0, "cd": 4.0, "abcd": 1.0}) == ["a", "bc", "d"]
    assert bpe_segment("", {}) == [] and bpe_segment("x", {}) == ["x"]


def test_literal_matcher_finds_the_longest_string():
    matcher = literal_matcher(["<s>", "<sep>", "<", "\n", "\n\n"])
    assert [m.group() for m in matcher.finditer("a<sep>b<s>c<d\n\n\ne")] == ["<sep>", "<s>", "<", "\n\n", "\n"]
    assert literal_matcher([]) is None


def test_words_are_cut_only_where_no_piece_spans():
    """Words are encoded (and cached) one by one; a piece with "▁" after another character (Gemma
    has ">▁</") keeps the words around that "▁" together."""
    assert word_splitter(["ab", "x▁y"]).split("▁ab▁x▁y▁z") == ["▁ab", "▁x▁y", "▁z"]
    pieces = ["<unk>", "▁", "a", ">", "<", "/", ">▁", ">▁<", ">▁</"]
    tok = SentencePieceTokenizer(pieces, [0.0, *range(-1, -9, -1)], [2, *[1] * 8], add_space_prefix=False)
    assert [tok.pieces[i] for i in tok.encode("a> </a")] == ["a", ">▁</", "a"]


def test_model_file_is_read_as_protobuf_reads_it(model_dir):
    data = (model_dir / "tokenizer.model").read_bytes()
    ours, theirs = read_model_proto(data), model_proto(data)
    assert ours.pieces == [p.piece for p in theirs.pieces]
    assert ours.scores == [p.score for p in theirs.pieces]
    assert ours.types == [p.type for p in theirs.pieces]
    spec, normalizer = theirs.trainer_spec, theirs.normalizer_spec
    assert (ours.model_type, ours.byte_fallback, ours.normalizer_name) == (spec.model_type, spec.byte_fallback,
                                                                           normalizer.name) == (2, True, "identity")
    assert (ours.add_dummy_prefix, ours.remove_extra_whitespaces) == (normalizer.add_dummy_prefix,
                                                                      normalizer.remove_extra_whitespaces)


# --- ids against sentencepiece and transformers ---------------------------------------------------

def test_ids_match_sentencepiece_and_transformers(model_dir, reference):
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer_file(model_dir / "tokenizer.model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.LlamaTokenizer.from_pretrained(model_dir)
    text = VARIED + "\n".join(corpus_lines(200))
    ids = tok.encode(text)
    assert ids == reference.encode(text) == hf.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == b" " + text.encode()  # token by token, the "▁" encoding added stays
    for t in random_texts(500, seed=1):
        assert tok.encode(t) == reference.encode(t), t
        if not t.startswith((" ", "<sep>")):
            assert tok.encode(t) == hf.encode(t, add_special_tokens=False), t
        assert tok.decode(tok.encode(t)) == t


def test_byte_fallback_leading_spaces_and_empty_text(model_dir, reference):
    tok = load_tokenizer_file(model_dir / "tokenizer.model")
    assert tok.byte_fallback and tok.unk_id == 0
    emoji = tok.encode("🦜")  # not in the training text: "▁" and the emoji's four UTF-8 bytes
    assert [tok.pieces[i] for i in emoji] == ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x9C>"]
    assert tok.decode(emoji) == "🦜" and tok.decode_bytes(emoji) == " 🦜".encode()
    for text in (" x", "  the", " ", "\n the", "the  "):
        assert tok.encode(text) == reference.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("") == [] and tok.decode([]) == ""
    assert tok.decode([tok.vocab_size + 5]) == "\ufffd"


@pytest.mark.parametrize("options", [
    {"remove_extra_whitespaces": True},
    {"add_dummy_prefix": False},
    {"byte_fallback": False, "vocab_size": 150, "character_coverage": 0.99},  # rare characters become <unk>
    {"user_defined_symbols": ("<sep>", "▁▁▁▁")},  # Gemma has user-defined runs of spaces
], ids=["remove-extra-whitespaces", "no-dummy-prefix", "unknown-token", "user-defined-spaces"])
def test_other_settings_match_sentencepiece(tmp_path, options):
    (tmp_path / "tokenizer.model").write_bytes(trained_model(**options))
    tok = load_tokenizer_file(tmp_path / "tokenizer.model")
    reference = sentencepiece().SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    for t in [VARIED, *random_texts(400, seed=2)]:
        assert tok.encode(t) == reference.encode(t), t
    if "byte_fallback" in options:  # a run of unknown characters is one unknown token
        assert not tok.byte_fallback
        assert tok.encode("ΩΩΩ") == reference.encode("ΩΩΩ") == [tok.pieces.index("▁"), tok.unk_id]


def test_special_tokens(model_dir, reference):
    tok = load_tokenizer_file(model_dir / "tokenizer.model")
    assert tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_start|>": 3, "<|im_end|>": 4}
    start = tok.special_tokens["<|im_start|>"]
    # Not allowed: plain text, as sentencepiece (which never reads control tokens in text) has it.
    assert tok.encode("<|im_start|>user") == reference.encode("<|im_start|>user")
    assert start not in tok.encode("<|im_start|>user")
    # Allowed: each stretch of text between special tokens is encoded alone, with its own "▁",
    # as llama.cpp does and as Llama 2's own code built chats.
    chat = "<s><|im_start|>user\nHi there<|im_end|> naïve</s>"
    ids = tok.encode(chat, allowed_special="all")
    assert ids == ([1, start] + reference.encode("user\nHi there") + [tok.special_tokens["<|im_end|>"]]
                   + reference.encode(" naïve") + [2])
    assert tok.decode(ids) == chat
    assert tok.encode(chat, allowed_special={"<s>"})[0] == 1
    # A user-defined piece is read whole everywhere, as part of the text.
    assert tok.encode("x<sep>y") == reference.encode("x<sep>y")
    assert tok.user_defined == {"<sep>": 5}
    with pytest.raises(ValueError, match="unknown special tokens"):
        tok.encode("x", allowed_special={"<nope>"})


def test_saved_tokenizer_round_trips(model_dir, tmp_path):
    tok = load_tokenizer_file(model_dir / "tokenizer.model")
    tok.save(tmp_path / "tokenizer.json")
    back = load_tokenizer_file(tmp_path / "tokenizer.json")
    assert isinstance(back, SentencePieceTokenizer) and back.to_dict() == tok.to_dict()
    assert back.encode(VARIED, "all") == tok.encode(VARIED, "all")
    assert build_tokenizer(str(model_dir / "tokenizer.model")).encode(VARIED) == tok.encode(VARIED)
    # A directory's tokenizer.json is preferred to its tokenizer.model.
    assert tokenizer_file_in(model_dir) == model_dir / "tokenizer.model"
    (tmp_path / "tokenizer.model").write_bytes(b"")
    assert tokenizer_file_in(tmp_path) == tmp_path / "tokenizer.json"
    assert tokenizer_file_in(tmp_path / "nothing") is None
    d = json.loads((tmp_path / "tokenizer.json").read_text())
    del d["scores"]
    one_line_error("missing field 'scores'", tokenizer_from_dict, d)
    one_line_error("type 9", tokenizer_from_dict, {**d, "scores": tok.scores, "types": [9] * tok.vocab_size})


def test_checkpoint_keeps_the_tokenizer(model_dir, tmp_path):
    from gptlab.model import GPT, ModelConfig
    from gptlab.weights.checkpoint import save_checkpoint
    from gptlab.weights.load import load_checkpoint

    tok = load_tokenizer_file(model_dir / "tokenizer.model")
    cfg = ModelConfig.for_family("llama", vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_embd=16, n_head=2,
                                 intermediate_size=32)
    save_checkpoint(tmp_path / "ckpt", GPT(cfg), tok)
    back = load_checkpoint(tmp_path / "ckpt").tokenizer
    assert isinstance(back, SentencePieceTokenizer)
    assert back.encode(VARIED, "all") == tok.encode(VARIED, "all") and back.decode(tok.encode(VARIED)) == VARIED


# --- Hugging Face export ---------------------------------------------------------------------------

#: Llama 2's settings (a "▁" in front of the text), and Gemma's (none; runs of spaces as user-defined pieces)
HF_EXPORT_CASES = {"llama-2": {}, "gemma": {"add_dummy_prefix": False, "user_defined_symbols": ("<sep>", "▁▁▁▁")}}


@pytest.mark.parametrize("case", sorted(HF_EXPORT_CASES))
def test_exported_tokenizer_json_gives_the_same_ids(tmp_path, case):
    """A SentencePiece vocabulary (Gemma's, read from a GGUF) exported as tokenizer.json: the
    tokenizers library and transformers give gptlab's ids, and decode them to the same text."""
    from tokenizers import Tokenizer as HF

    from gptlab.tokenizers import to_hf_json

    tok = SentencePieceTokenizer.from_model_file(write_model(tmp_path, trained_model(**HF_EXPORT_CASES[case])))
    hf = HF.from_str(json.dumps(to_hf_json(tok)))
    checked = 0
    for t in [VARIED, *random_texts(300, seed=5)]:
        if tok.add_space_prefix and t.startswith((" ", "<sep>")):
            continue  # transformers' own conversion puts no "▁" there either (see VARIED)
        ids = tok.encode(t)
        assert hf.encode(t, add_special_tokens=False).ids == ids, t
        assert hf.decode(ids, skip_special_tokens=False) == tok.decode(ids), t
        checked += 1
    assert checked > 200


def write_model(folder: Path, model: bytes) -> Path:
    (folder / "tokenizer.model").write_bytes(model)
    return folder / "tokenizer.model"


def test_a_sentencepiece_model_exports_to_transformers_and_back(tmp_path):
    transformers = pytest.importorskip("transformers")
    from gptlab.model import GPT, ModelConfig
    from gptlab.weights.checkpoint import save_checkpoint
    from gptlab.weights.hf import export_hf, import_hf
    from gptlab.weights.load import load_checkpoint

    tok = SentencePieceTokenizer.from_model_file(write_model(tmp_path, trained_model(**HF_EXPORT_CASES["gemma"])))
    cfg = ModelConfig.for_family("gemma3", vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_embd=32, n_head=2,
                                 n_kv_head=1, head_dim=16, intermediate_size=48, sliding_window=8, layer_pattern="LG")
    save_checkpoint(tmp_path / "ckpt", GPT(cfg), tok)
    export_hf(load_checkpoint(tmp_path / "ckpt"), tmp_path / "hf", family="gemma3_text")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    back = import_hf(tmp_path / "hf").tokenizer
    for t in [VARIED, *random_texts(50, seed=6)]:
        assert theirs.encode(t, add_special_tokens=False) == tok.encode(t) == back.encode(t), t


# --- GGUF -------------------------------------------------------------------------------------------

def write_gguf_vocab(path: Path, model: bytes, kind: str = "llama", scores: list | None = None) -> Path:
    """A GGUF file holding only a SentencePiece vocabulary, written as llama.cpp's converter
    does (read with protobuf's own parser; a user-defined piece's "▁" written as a space)."""
    gguf = pytest.importorskip("gguf")
    proto = model_proto(model)
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model(kind)
    w.add_token_list([p.piece.replace("▁", " ") if p.type == 4 else p.piece for p in proto.pieces])
    w.add_token_scores(scores if scores is not None else [p.score for p in proto.pieces])
    w.add_token_types([p.type for p in proto.pieces])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_tokenizer(path: Path):
    from gptlab.weights.gguf import read_gguf, tokenizer_from_metadata

    return tokenizer_from_metadata(read_gguf(path)[1], path)


@pytest.mark.parametrize("user_defined", [("<sep>",), ("<sep>", "▁▁▁▁")], ids=["plain", "user-defined-spaces"])
def test_gguf_vocabulary_gives_the_same_ids(tmp_path, user_defined):
    transformers = pytest.importorskip("transformers")
    model = trained_model(user_defined_symbols=user_defined)
    path = write_gguf_vocab(tmp_path / "vocab.gguf", model)
    tok, config = gguf_tokenizer(path)
    reference = sentencepiece().SentencePieceProcessor(model_proto=model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (config["bos_token"], config["eos_token"], config["unk_token"], config["add_bos_token"]) == (
        "<s>", "</s>", "<unk>", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for t in [VARIED, *random_texts(300, seed=3)]:
        assert tok.encode(t) == reference.encode(t), t
        if not t.startswith((" ", "<sep>")):  # where transformers adds no "▁" (see VARIED)
            assert tok.encode(t) == hf.encode(t, add_special_tokens=False), t
        assert tok.decode(tok.encode(t)) == t


def test_damaged_and_unsupported_files_are_user_errors(tmp_path):
    data = trained_model()
    for cut in (1, 7, 100, len(data) // 3, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.model").write_bytes(data[:cut])
        one_line_error("truncated, damaged or not a tokenizer.model", load_tokenizer_file, tmp_path / "cut.model")
    (tmp_path / "empty.model").write_bytes(b"")
    one_line_error("holds no pieces", load_tokenizer_file, tmp_path / "empty.model")
    (tmp_path / "json.model").write_text('{"model": {"type": "BPE"}}')
    one_line_error("wire type", load_tokenizer_file, tmp_path / "json.model")
    one_line_error("does not exist", load_tokenizer_file, tmp_path / "missing.model")
    (tmp_path / "unigram.model").write_bytes(trained_model(model_type="unigram", vocab_size=320))
    msg = one_line_error("a SentencePiece model of an unsupported kind", load_tokenizer_file,
                         tmp_path / "unigram.model")
    assert "unigram" in msg
    (tmp_path / "nfkc.model").write_bytes(trained_model(normalization_rule_name="nmt_nfkc"))
    one_line_error("unsupported kind .*normaliser 'nmt_nfkc'", load_tokenizer_file, tmp_path / "nfkc.model")

    from gptlab.weights.gguf import read_gguf, tokenizer_from_metadata

    one_line_error("tokenizer model 't5' is not supported", gguf_tokenizer,
                   write_gguf_vocab(tmp_path / "t5.gguf", data, kind="t5"))
    one_line_error("scores is not one number per token", gguf_tokenizer,
                   write_gguf_vocab(tmp_path / "short.gguf", data, scores=[0.0] * 3))
    meta = read_gguf(write_gguf_vocab(tmp_path / "ok.gguf", data))[1]
    types = list(meta["tokenizer.ggml.token_type"])
    types[types.index(6)] = 1  # one byte piece fewer
    one_line_error("255 of the 256 byte pieces", tokenizer_from_metadata,
                   {**meta, "tokenizer.ggml.token_type": types}, tmp_path / "ok.gguf")


# --- the real Gemma 3 vocabulary ----------------------------------------------------------------------

@pytest.mark.slow
def test_gemma3_vocabulary_matches_transformers():
    """Gemma 3's 262,144 pieces (6,249 control, 165 user-defined runs of newlines, tabs and
    spaces, no dummy prefix) against transformers' own reading of the same GGUF file.

    The random texts keep runs of spaces short: transformers respells Gemma's user-defined runs
    of spaces with "▁" and then merges a long run by BPE (37 spaces -> 16 + 21), where llama.cpp
    and gptlab read them whole, the longest first (31 + 6)."""
    transformers = pytest.importorskip("transformers")
    from gptlab.weights.named import resolve_named

    path = resolve_named("gemma3-270m")
    tok, config = gguf_tokenizer(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert (config["bos_token"], config["eos_token"]) == ("<bos>", "<eos>")
    rng = random.Random(4)
    alphabet = [*"the quick brown fox", " ", "  ", "\n", "\n\n", "\t", "\r", "é", "東", "京", "😀", "<", ">", "</",
                "9", "<start_of_turn>", "<end_of_turn>", "\u2028", "\x00", "ا", "ק"]
    texts = [VARIED, "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", "a> </b",
             *("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(1000))]
    for t in texts:
        ids = tok.encode(t, allowed_special="all")
        assert ids == hf.encode(t, add_special_tokens=False), t
        assert tok.decode(ids) == t
