"""Weights without a tokenizer: a Hugging Face directory that has no tokenizer.json imports with a
one-line warning, runs, exports and evaluates on ids; commands that need text say in one line what
to pass; ``--tokenizer`` gives it one (at import, or later to the imported checkpoint)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gptlab.cli import main  # noqa: E402
from gptlab.tokenizers import BPETokenizer, to_hf_json  # noqa: E402
from gptlab.weights.checkpoint import MissingTokenizer  # noqa: E402
from gptlab.weights.load import load_checkpoint  # noqa: E402

TEXT = "".join(f"User: what is {i} + 1?\nAssistant: {i + 1}, café 😀!\n" for i in range(300))
VOCAB = 320


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(TEXT, vocab_size=VOCAB, special_tokens=["<|endoftext|>"])


def weights_only_dir(path: Path) -> transformers.LlamaForCausalLM:
    """A tiny Llama saved by transformers: config.json and model.safetensors, no tokenizer."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
    assert not (path / "tokenizer.json").exists()
    return model


def max_logit_diff(ours, ref) -> float:
    x = torch.randint(VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (ours.eval()(x)[0] - ref(x).logits).abs().max().item()


def one_line(capsys, prefix: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(prefix) and err.count("\n") == 1, err
    return err


def test_weights_only_import_runs_exports_and_matches_transformers(tmp_path, capsys):
    ref = weights_only_dir(tmp_path / "src")
    capsys.readouterr()
    assert main(["import", str(tmp_path / "src"), "--out", str(tmp_path / "ckpt")]) == 0
    warning = one_line(capsys, "warning: ")
    assert "no tokenizer.json" in warning and "--tokenizer" in warning
    assert not (tmp_path / "ckpt" / "tokenizer.json").exists()
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert isinstance(ckpt.tokenizer, MissingTokenizer) and ckpt.tokenizer.vocab_size == VOCAB
    assert max_logit_diff(ckpt.model, ref) <= 1e-5  # evaluated on ids

    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().err == ""
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert max_logit_diff(ckpt.model, back) <= 1e-5
    capsys.readouterr()  # transformers' loading progress
    # the directory itself is a MODEL too, quietly: the warning belongs to gptlab import
    assert max_logit_diff(load_checkpoint(tmp_path / "src").model, ref) <= 1e-5
    assert capsys.readouterr().err == ""


def test_commands_that_need_text_say_what_to_pass(tmp_path, capsys):
    weights_only_dir(tmp_path / "src")
    assert main(["import", str(tmp_path / "src"), "--out", str(tmp_path / "ckpt")]) == 0
    (tmp_path / "corpus.txt").write_text(TEXT)
    capsys.readouterr()
    for model in (tmp_path / "ckpt", tmp_path / "src"):
        for argv in (["sample", str(model), "--prompt", "User:", "--max-new-tokens", "3"],
                     ["eval", str(model), "--corpus", str(tmp_path / "corpus.txt")],
                     ["export", str(model), "--format", "gguf", "--out", str(tmp_path / "m.gguf"), "--force"]):
            assert main(argv) == 1
            err = one_line(capsys, "error: ")
            assert f"{model} has no tokenizer" in err and f"gptlab import {model} --tokenizer" in err, err


def test_a_tokenizer_given_at_import_or_afterwards(tmp_path, bpe, capsys):
    ref = weights_only_dir(tmp_path / "src")
    (tmp_path / "tokenizer.json").write_text(json.dumps(to_hf_json(bpe)))
    donor = tmp_path / "donor"  # another model directory, whose tokenizer is taken
    weights_only_dir(donor)
    (donor / "tokenizer.json").write_text(json.dumps(to_hf_json(bpe)))
    capsys.readouterr()

    assert main(["import", str(tmp_path / "src"), "--tokenizer", str(tmp_path / "tokenizer.json"),
                 "--out", str(tmp_path / "a")]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["import", str(tmp_path / "src"), "--out", str(tmp_path / "bare")]) == 0
    assert main(["import", str(tmp_path / "bare"), "--tokenizer", str(donor), "--out", str(tmp_path / "b")]) == 0
    text = TEXT[:2000]
    for name in ("a", "b"):
        ckpt = load_checkpoint(tmp_path / name)
        assert ckpt.tokenizer.encode(text) == bpe.encode(text), name
        assert max_logit_diff(ckpt.model, ref) <= 1e-5, name

    # now the text commands work: sample, fine-tune, GGUF export
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "b"), "--prompt", "User:", "--max-new-tokens", "3", "--greedy"]) == 0
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i} + 1?"},
                                                     {"role": "assistant", "content": f"{i + 1}"}]}) + "\n"
                            for i in range(20)))
    assert main(["finetune", "sft", str(tmp_path / "b"), "--data", str(data), "--out", str(tmp_path / "sft"),
                 "--max-steps", "2", "--eval-interval", "2", "--no-progress", "--device", "cpu"]) == 0
    assert (tmp_path / "sft" / "best" / "tokenizer.json").is_file()
    assert main(["export", str(tmp_path / "b"), "--format", "gguf", "--out", str(tmp_path / "b.gguf")]) == 0

    # a tokenizer that does not fit, a GGUF source, a spec that names nothing: one line each
    big = BPETokenizer.train(TEXT, vocab_size=VOCAB + 40)
    (tmp_path / "big.json").write_text(json.dumps(to_hf_json(big)))
    capsys.readouterr()
    for argv, fragment in (
            (["import", str(tmp_path / "src"), "--tokenizer", str(tmp_path / "big.json")], "do not belong together"),
            (["import", str(tmp_path / "b.gguf"), "--tokenizer", str(tmp_path / "tokenizer.json")],
             "carries its own tokenizer"),
            (["import", str(tmp_path / "src"), "--tokenizer", str(tmp_path / "nothing")], "does not exist"),
            (["import", str(tmp_path / "src"), "--tokenizer", str(tmp_path / "bare")], "has no tokenizer either")):
        assert main([*argv, "--out", str(tmp_path / "x"), "--force"]) == 1
        assert fragment in one_line(capsys, "error: ")
