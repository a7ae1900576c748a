"""The BERT encoder, its Hugging Face import and sentence embeddings, checked against transformers."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from gptlab.errors import UserError  # noqa: E402
from gptlab.inference.embed import embed, encode_batch, mean_pool, run_embed  # noqa: E402
from gptlab.model.bert import Bert, BertConfig  # noqa: E402
from gptlab.weights import bert as wb  # noqa: E402
from gptlab.weights.hf import _expand  # noqa: E402

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "A dog sleeps.",
         "Foxes and dogs are not friends, said the quick brown fox to the very lazy dog today."]


def wordpiece_json() -> dict:
    """A small BERT-style WordPiece tokenizer.json, trained here (nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    text = [t.lower() for t in TEXTS] * 20 + ["hello world, the cat sat on the mat and slept."] * 20
    tok.train_from_iterator(text, trainers.WordPieceTrainer(vocab_size=120, special_tokens=SPECIALS))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    # As all-MiniLM-L6-v2's file does: padding to a fixed length that gptlab must not apply.
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=48)
    tok.enable_truncation(max_length=48)
    return json.loads(tok.to_str())


def make_bert_dir(path: Path, mlm: bool = True) -> torch.nn.Module:
    """A tiny random transformers BERT saved with save_pretrained, plus a WordPiece tokenizer."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=64, type_vocab_size=2)
    cls = transformers.BertForMaskedLM if mlm else transformers.BertModel
    model = cls(config).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so a mix-up shows
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
    (path / "tokenizer.json").write_text(json.dumps(wordpiece_json()))
    return model


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("bert")
    return path, make_bert_dir(path)


def batch_with_padding(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = encode_batch(tokenizer, TEXTS, max_length=64, pad_id=0)
    assert (mask == 0).any() and (mask.sum(1) > 2).all()  # lengths differ: the batch is padded
    return ids, mask


def test_hidden_states_and_mlm_logits_match_transformers(bert_dir):
    path, ref = bert_dir
    loaded = wb.import_bert(path)
    ids, mask = batch_with_padding(loaded.tokenizer)
    types = (torch.arange(ids.shape[1]) > 3).long().expand_as(ids)  # exercise the token-type table
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        hidden = loaded.model(ids, attention_mask=mask, token_type_ids=types)
        logits = loaded.model.mlm_logits(ids, attention_mask=mask, token_type_ids=types)
    assert (hidden - out.hidden_states[-1]).abs().max().item() <= 1e-5
    assert (logits - out.logits).abs().max().item() <= 1e-5


def test_padding_does_not_change_a_text(bert_dir):
    loaded = wb.import_bert(bert_dir[0])
    ids, mask = batch_with_padding(loaded.tokenizer)
    n = int(mask[1].sum())
    with torch.no_grad():
        alone = loaded.model(ids[1:2, :n])
        padded = loaded.model(ids, attention_mask=mask)[1:2, :n]
    assert (alone - padded).abs().max().item() <= 1e-5


def test_tokenizer_adds_cls_and_sep_as_transformers(bert_dir):
    loaded = wb.import_bert(bert_dir[0])
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(bert_dir[0] / "tokenizer.json"),
                                                  pad_token="[PAD]")
    ids, mask = encode_batch(loaded.tokenizer, TEXTS, max_length=64, pad_id=0)
    ref = hf_tok(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    short, _ = encode_batch(loaded.tokenizer, TEXTS[2:], max_length=6, pad_id=0)
    assert short.shape == (1, 6) and short[0, -1] == loaded.tokenizer.special_tokens["[SEP]"]


def test_embed_matches_transformers_mean_pooling(bert_dir):
    path, _ = bert_dir
    ref = transformers.BertModel.from_pretrained(path).eval()
    loaded = wb.import_bert(path)
    ids, mask = batch_with_padding(loaded.tokenizer)
    with torch.no_grad():
        expected = F.normalize(mean_pool(ref(input_ids=ids, attention_mask=mask).last_hidden_state, mask), dim=1)
    got = embed(loaded.model, loaded.tokenizer, TEXTS, batch_size=2)
    assert got.shape == (3, 32)
    assert (got - expected).abs().max().item() <= 1e-5
    assert torch.allclose(got.norm(dim=1), torch.ones(3))


def test_key_table_covers_every_key(bert_dir, tmp_path):
    path, ref = bert_dir
    loaded = wb.import_bert(path)
    ours = set(loaded.model.state_dict())
    expanded = _expand(wb.BERT_RULES + wb.MLM_RULES, loaded.model.config.num_hidden_layers)
    assert {r.ours[0] for r in expanded} == ours  # every parameter of ours has exactly one rule
    hf_keys = set(ref.state_dict()) | set(load_file(path / "model.safetensors"))
    assert {k.removeprefix("bert.") for k in hf_keys} <= {r.hf for r in expanded} | set(wb.TIED)
    # A BertModel with its pooler and position_ids buffer, keys without "bert.": no MLM head.
    make_bert_dir(tmp_path, mlm=False)
    state = load_file(tmp_path / "model.safetensors")
    assert any(k.startswith("pooler.") for k in state)
    save_file({**state, "embeddings.position_ids": torch.arange(64)[None]}, tmp_path / "model.safetensors")
    plain = wb.import_bert(tmp_path)
    assert plain.model.mlm_head is None
    with pytest.raises(UserError, match="no masked-LM head"):
        plain.model.mlm_logits(torch.zeros(1, 3, dtype=torch.long))


def one_line_error(fn, match: str) -> str:
    with pytest.raises(UserError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def edit_weights(path: Path, change) -> None:
    state = load_file(path / "model.safetensors")
    change(state)
    save_file(state, path / "model.safetensors")


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    make_bert_dir(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "roberta"}))
    one_line_error(lambda: wb.import_bert(tmp_path), "model_type 'roberta' is not supported")
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    one_line_error(lambda: wb.import_bert(tmp_path), "hidden_act 'relu'")
    (tmp_path / "config.json").write_text(json.dumps(config))
    original = load_file(tmp_path / "model.safetensors")

    edit_weights(tmp_path, lambda s: s.pop("bert.encoder.layer.1.output.dense.bias"))
    one_line_error(lambda: wb.import_bert(tmp_path), r"lacks tensor\(s\) layers.1.mlp.down_proj.bias")

    save_file(original, tmp_path / "model.safetensors")
    edit_weights(tmp_path, lambda s: s.update({"bert.encoder.layer.0.intermediate.dense.weight": torch.zeros(36, 32)}))
    msg = one_line_error(lambda: wb.import_bert(tmp_path), "layers.0.mlp.up_proj.weight has shape")
    assert "(36, 32)" in msg and "(37, 32)" in msg

    save_file(original, tmp_path / "model.safetensors")
    edit_weights(tmp_path, lambda s: s.update({"cls.seq_relationship.weight": torch.zeros(2, 32)}))
    one_line_error(lambda: wb.import_bert(tmp_path), "does not use: cls.seq_relationship.weight")

    save_file(original, tmp_path / "model.safetensors")
    edit_weights(tmp_path, lambda s: s.update({"cls.predictions.decoder.weight": torch.zeros(128, 32)}))
    one_line_error(lambda: wb.import_bert(tmp_path), "cls.predictions.decoder.weight differs")

    one_line_error(lambda: wb.load_bert(str(tmp_path / "nowhere")), "neither a named model")


def test_config_validation_and_round_trip():
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    assert BertConfig.from_dict(cfg.to_dict()) == cfg
    msg = one_line_error(lambda: BertConfig(hidden_size=30, num_attention_heads=4, hidden_dropout_prob=1.5).validate(),
                         "invalid BERT config")
    assert "hidden_size=30" in msg and "hidden_dropout_prob must be in [0, 1), got 1.5" in msg
    one_line_error(lambda: BertConfig.from_dict({"hidden_sise": 32}), "BERT config: unknown key")
    model = Bert(cfg)
    one_line_error(lambda: model(torch.zeros(1, 513, dtype=torch.long)), "exceed BERT's 512 positions")


def test_run_embed_prints_similarities(bert_dir, capsys):
    vectors = run_embed(str(bert_dir[0]), TEXTS[:2], device="cpu")
    out = capsys.readouterr().out
    assert vectors.shape == (2, 32)
    assert "dim 32" in out and "norm 1.0000" in out and "cosine similarity" in out


@pytest.mark.slow
def test_minilm_l6_matches_transformers():
    path = wb.named_bert_dir("minilm-l6")
    assert wb.named_bert_dir("minilm-l6") == path  # extracted once, then reused
    loaded = wb.load_bert("minilm-l6")
    sentences = ["A man is playing a guitar.", "Someone plays the guitar on stage.",
                 "The stock market fell sharply on Monday.", "Cats like to sleep in the sun."]
    ref = transformers.AutoModel.from_pretrained(path).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = hf_tok(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = ref(**batch).last_hidden_state
    expected = F.normalize(mean_pool(hidden, batch["attention_mask"]), dim=1)
    got = embed(loaded.model, loaded.tokenizer, sentences)
    assert got.shape == (4, 384)
    assert (got - expected).abs().max().item() <= 1e-5
    sims = got @ got.t()
    assert sims[0, 1] > 0.5 > max(sims[0, 2], sims[0, 3], sims[1, 2])
