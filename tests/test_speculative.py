"""Prompt-lookup speculative decoding (inference/speculative.py): the drafts, and greedy output
identical to plain greedy decoding, token for token."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from gptlab.errors import UserError
from gptlab.inference.engine import Engine, SamplingParams
from gptlab.inference.sampling import generate
from gptlab.inference.speculative import SpeculationStats, draft_from_context, generate_speculative
from gptlab.model import GPT, ModelConfig
from gptlab.tokenizers import CharTokenizer

CHARS = CharTokenizer("abcdefghijklmnopqrstuvwxyz .,\n")
FAMILIES = {
    "gpt2": ("gpt2", {}),
    "llama": ("llama", {"n_kv_head": 2}),
    "mistral": ("mistral", {"n_kv_head": 1, "sliding_window": 8}),  # drafts cross the window's edge
    "gemma3": ("gemma3", {"n_kv_head": 1, "head_dim": 16, "sliding_window": 8, "layer_pattern": "LG"}),
}
QUOTING = "the cat sat on the mat. the dog sat on the log. the cat sat on the "


def model_of(variant: str, block_size: int = 128) -> GPT:
    family, options = FAMILIES[variant]
    torch.manual_seed(0)
    model = GPT(ModelConfig.for_family(family, vocab_size=CHARS.vocab_size, block_size=block_size, n_layer=2,
                                       n_head=4, n_embd=64, **options))
    with torch.no_grad():  # larger weights than init, so the output depends on the context
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def plain(model, prompt: list[int], n: int) -> list[int]:
    return [int(t) for t in generate(model, torch.tensor([prompt]), n, temperature=0.0)]


def speculative(model, prompt: list[int], n: int, draft: int = 6) -> tuple[list[int], SpeculationStats]:
    stats = SpeculationStats()
    return [int(t) for t in generate_speculative(model, torch.tensor([prompt]), n, draft, stats)], stats


def test_the_draft_follows_the_latest_and_longest_match():
    ids = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert draft_from_context(ids, 3) == [7, 8, 5]  # "2 3" last seen before 7 8 5 (and before 9 9)
    assert draft_from_context(ids + [7], 2) == [8, 5]  # "2 3 7": the three-token match wins
    assert draft_from_context([4, 5, 6], 4) == []  # the tail occurs nowhere else
    assert draft_from_context([5, 5], 4) == [5]  # overlapping the tail is allowed, the tail itself is not
    assert draft_from_context(ids, 0) == [] and draft_from_context([1], 3) == []


def test_a_rewound_cache_continues_as_if_the_dropped_tokens_never_came():
    model = model_of("llama")
    x = torch.tensor([CHARS.encode("the cat sat")])
    cache = model.new_kv_cache(32)
    model(x, kv_cache=cache)
    model(torch.tensor([CHARS.encode("xyz")]), kv_cache=cache)  # three drafts, all rejected
    cache.rewind(x.size(1))
    with torch.no_grad():
        after = model(torch.tensor([CHARS.encode(" o")]), kv_cache=cache)[0]
        fresh = model(torch.tensor([CHARS.encode("the cat sat o")]))[0][:, -2:]
    assert torch.allclose(after, fresh, atol=1e-5)
    with pytest.raises(ValueError):
        cache.rewind(cache.length + 1)


@pytest.mark.parametrize("variant", sorted(FAMILIES))
@pytest.mark.parametrize("prompt", [QUOTING, "abc", "hello world, hello there, hello "])
def test_speculative_greedy_equals_plain_greedy(variant, prompt):
    model = model_of(variant)
    ids = CHARS.encode(prompt)
    expected = plain(model, ids, 40)
    got, stats = speculative(model, ids, 40)
    assert got == expected
    assert stats.tokens == 40 and stats.passes <= 40 and stats.accepted <= stats.drafted


def test_drafts_are_accepted_when_the_output_repeats_the_context():
    """A random model's greedy output soon loops; the loop is in the context, so drafts hit."""
    model = model_of("llama")
    ids = CHARS.encode(QUOTING)
    got, stats = speculative(model, ids, 60)
    assert got == plain(model, ids, 60)
    assert stats.accepted > 0 and stats.passes < 60, stats


def test_int8_speculative_greedy_equals_int8_plain_greedy():
    """Int8 rounds each row on a grid of its own, so drafts verified together score as one by one."""
    from gptlab.inference.quantize import quantize_int8

    model = quantize_int8(model_of("llama"))
    ids = CHARS.encode(QUOTING)
    got, stats = speculative(model, ids, 60)
    assert got == plain(model, ids, 60) and stats.accepted > 0


def test_past_the_context_it_goes_on_as_plain_decoding():
    model = model_of("gpt2", block_size=48)
    ids = CHARS.encode(QUOTING)[:40]
    got, _ = speculative(model, ids, 30)  # 70 tokens: the last 22 without cache, windowed
    assert got == plain(model, ids, 30)


def test_the_engine_speculates_only_where_it_is_exact():
    model = model_of("mistral")
    checkpoint = SimpleNamespace(model=model, tokenizer=CHARS, config=model.config, path=".", tokenizer_config=None)
    ours, reference = Engine(checkpoint, speculate=5), Engine(checkpoint)
    prompt = CHARS.encode(QUOTING)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True)
    assert ours.generate_batch([prompt], greedy)[0].token_ids == reference.generate_batch([prompt], greedy)[0].token_ids
    assert ours.speculation.passes > 0
    passes = ours.speculation.passes
    sampled = SamplingParams(temperature=0.8, max_new_tokens=20, seed=3, ignore_eos=True)
    batch = [prompt, prompt[:9]]
    assert ([c.token_ids for c in ours.generate_batch(batch, greedy)]
            == [c.token_ids for c in reference.generate_batch(batch, greedy)])
    assert ours.generate_batch([prompt], sampled)[0].token_ids == reference.generate_batch([prompt], sampled)[0].token_ids
    assert ours.speculation.passes == passes  # neither a batch nor sampling drafted
    with pytest.raises(UserError, match="speculate"):
        Engine(checkpoint, speculate=-1)


def test_sample_command_with_speculate_prints_the_same_text(tmp_path, capsys):
    from gptlab.cli import main
    from gptlab.weights.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "ckpt", model_of("llama"), CHARS)
    outputs = []
    for extra in ([], ["--speculate", "4"]):
        assert main(["sample", str(tmp_path / "ckpt"), "--prompt", QUOTING, "--greedy", "--max-new-tokens", "30",
                     "--device", "cpu", *extra]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith(QUOTING)
    assert main(["sample", str(tmp_path / "ckpt"), "--speculate", "-2", "--device", "cpu"]) != 0
    assert "speculate" in capsys.readouterr().err
