"""The bigram baseline: a lookup table trained, saved, loaded and sampled like the Transformer."""

from __future__ import annotations

import math

import pytest
import torch

from gptlab.config import resolve_config
from gptlab.inference.sampling import generate
from gptlab.model import ModelConfig, build_model
from gptlab.model.bigram import Bigram
from gptlab.train import loop
from gptlab.weights.load import load_checkpoint


def test_build_model_picks_the_bigram_and_it_starts_at_ln_vocab():
    model = build_model(ModelConfig(arch="bigram", vocab_size=50, block_size=8, tie_embeddings=False))
    assert isinstance(model, Bigram) and model.num_parameters() == 50 * 50
    idx = torch.randint(0, 50, (2, 8))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 8, 50)
    assert loss.item() == pytest.approx(math.log(50))


def test_logits_depend_only_on_the_current_token():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="bigram", vocab_size=10, block_size=8, tie_embeddings=False))
    torch.nn.init.normal_(model.embed_tokens.weight)
    a, _ = model(torch.tensor([[1, 2, 3]]))
    b, _ = model(torch.tensor([[7, 2, 3]]))
    torch.testing.assert_close(a[:, 1:], b[:, 1:])
    torch.testing.assert_close(a[0, 2], model.embed_tokens.weight[3])
    last, _ = model(torch.tensor([[1, 2, 3]]), last_only=True)
    torch.testing.assert_close(last, a[:, -1:])


def test_preset_trains_saves_loads_and_samples(tmp_path, monkeypatch, tiny_corpus_text):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(tiny_corpus_text[:200_000])
    model_cfg, cfg = resolve_config("bigram", train_overrides={"corpus": str(corpus), "max_steps": 150,
                                                               "eval_interval": 150, "sample_tokens": 40})
    result = loop.train(model_cfg, cfg, tmp_path / "run", show_progress=False)
    vocab = model_cfg.vocab_size
    # Uniform guessing costs ln(V) nats (about 4.3 for Shakespeare's characters); which letter
    # follows which is worth more than 1.3 of them.
    assert result.last_eval["val_loss"] < math.log(vocab) - 1.3
    assert len(result.sample) > 40

    loaded = load_checkpoint(tmp_path / "run", prefer="last")
    assert isinstance(loaded.model, Bigram) and loaded.config.arch == "bigram"
    ids = torch.tensor([loaded.tokenizer.encode(tiny_corpus_text[-2000:])])
    with torch.no_grad():
        _, loss = loaded.model(ids[:, :-1], ids[:, 1:])
    assert loss.item() < math.log(vocab) - 1.0  # the loaded table is the trained one, not a fresh one
    loaded.model.eval()
    gen = torch.Generator().manual_seed(0)
    out = [int(t[0]) for t in generate(loaded.model, ids[:, :10], 30, temperature=1.0, generator=gen)]
    assert len(out) == 30 and all(0 <= t < vocab for t in out)
    # The most likely character after a space is a letter, not another space or a newline.
    greedy = next(generate(loaded.model, torch.tensor([loaded.tokenizer.encode(" ")]), 1, temperature=0))
    assert loaded.tokenizer.decode([int(greedy[0])]).isalpha()
