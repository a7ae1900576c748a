"""Tests of the sampling functions and the generation loop."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptlab.errors import UserError
from gptlab.inference import (
    apply_temperature,
    check_sampling_args,
    generate,
    min_p_filter,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from gptlab.model import GPT, ModelConfig

INF = float("inf")


def kept(logits: torch.Tensor) -> list[int]:
    """Token ids that a filter left selectable."""
    return torch.nonzero(logits[0] > -INF).flatten().tolist()


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()  # (1, V)


# --- filters ---------------------------------------------------------------------------------


def test_top_k_keeps_exactly_k_best_and_breaks_ties_by_lower_id():
    logits = torch.tensor([[1.0, 5.0, 3.0, 3.0, 3.0, -2.0]])
    assert kept(top_k_filter(logits, 1)) == [1]
    assert kept(top_k_filter(logits, 3)) == [1, 2, 3]  # 2, 3, 4 tie: the lower ids win
    assert kept(top_k_filter(logits, 10)) == list(range(6))
    filtered = top_k_filter(logits, 3)
    torch.testing.assert_close(filtered[0, [1, 2, 3]], logits[0, [1, 2, 3]])  # values untouched
    assert logits[0, 4] == 3.0  # the input is not modified


def test_top_p_keeps_smallest_set_reaching_p():
    # Probabilities listed out of order so position is not rank: ranked 0.5, 0.3, 0.15, 0.05.
    logits = logits_of([0.15, 0.5, 0.05, 0.3])
    assert kept(top_p_filter(logits, 0.4)) == [1]  # 0.5 alone reaches 0.4
    assert kept(top_p_filter(logits, 0.75)) == [1, 3]  # 0.5 + 0.3 = 0.8 >= 0.75
    assert kept(top_p_filter(logits, 0.85)) == [0, 1, 3]  # 0.8 < 0.85 <= 0.95
    assert kept(top_p_filter(logits, 0.97)) == [0, 1, 2, 3]
    assert kept(top_p_filter(logits, 1.0)) == [0, 1, 2, 3]
    assert kept(top_p_filter(logits, 1e-9)) == [1]  # never empty


def test_min_p_keeps_tokens_relative_to_the_best():
    logits = logits_of([0.15, 0.5, 0.05, 0.3])
    assert kept(min_p_filter(logits, 0.2)) == [0, 1, 3]  # threshold 0.2 * 0.5 = 0.1
    assert kept(min_p_filter(logits, 0.5)) == [1, 3]  # threshold 0.25
    assert kept(min_p_filter(logits, 1.0)) == [1]
    assert kept(min_p_filter(logits, 0.0)) == [0, 1, 2, 3]


def test_apply_temperature_scales_logits():
    logits = torch.tensor([[2.0, -4.0]])
    torch.testing.assert_close(apply_temperature(logits, 2.0), torch.tensor([[1.0, -2.0]]))
    with pytest.raises(ValueError, match="greedy"):
        apply_temperature(logits, 0)


@settings(max_examples=50, deadline=None)
@given(
    probs=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=20),
    k=st.integers(1, 25),
    p=st.floats(0.01, 1.0),
)
def test_filter_properties(probs, k, p):
    logits = torch.tensor([probs]).log()
    assert len(kept(top_k_filter(logits, k))) == min(k, len(probs))
    survivors = kept(top_p_filter(logits, p))
    mass = torch.softmax(logits[0], -1)
    assert torch.argmax(logits[0]).item() in survivors
    assert mass[survivors].sum() >= p - 1e-6
    # Minimal: without its least likely survivor the set would fall short of p.
    assert mass[survivors].sum() - mass[survivors].min() < p + 1e-6


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"temperature": -1.0, "top_k": 0}, ["temperature", "top_k"]),
        ({"top_p": 0.0, "min_p": 1.5}, ["top_p", "min_p"]),
        ({"temperature": math.nan, "top_p": 1.5}, ["temperature", "top_p"]),
    ],
)
def test_bad_settings_are_all_reported(kwargs, bad):
    with pytest.raises(UserError) as err:
        check_sampling_args(**kwargs)
    assert all(name in str(err.value) for name in bad)
    # generate checks them once, before the first step
    with pytest.raises(UserError) as err:
        next(generate(CountingModel(), torch.tensor([[0]]), 3, **kwargs))
    assert all(name in str(err.value) for name in bad)


# --- sample_next -----------------------------------------------------------------------------


def test_temperature_zero_is_greedy():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    torch.testing.assert_close(sample_next(logits, temperature=0, generator=g), logits.argmax(-1))
    ties = torch.tensor([[0.0, 3.0, 3.0]])
    assert sample_next(ties, temperature=0).tolist() == [1]


def test_top_k_one_always_picks_the_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        tokens = sample_next(logits, temperature=5.0, top_k=1, generator=g)
        assert torch.equal(tokens, logits.argmax(-1))


def test_seeded_sampling_is_deterministic():
    logits = torch.zeros(1, 1000)  # uniform: every draw is up to the generator

    def draw(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return [sample_next(logits, generator=g).item() for _ in range(20)]

    assert draw(0) == draw(0)
    assert draw(0) != draw(1)


def test_sampled_frequencies_follow_the_distribution():
    logits = logits_of([0.7, 0.2, 0.1]).expand(4000, 3)
    tokens = sample_next(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=3) / 4000
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03, rtol=0)


def test_sampling_only_picks_surviving_tokens():
    logits = logits_of([0.15, 0.5, 0.05, 0.3]).expand(500, 4)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_p=0.75, generator=g).tolist()) == {1, 3}
    assert set(sample_next(logits, min_p=0.2, generator=g).tolist()) == {0, 1, 3}


# --- generate --------------------------------------------------------------------------------


class CountingModel(torch.nn.Module):
    """Mock LM that always predicts (last token + 1) mod V and records its input lengths."""

    def __init__(self, vocab_size: int = 10, block_size: int = 4) -> None:
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, block_size=block_size)
        self.seen_lengths: list[int] = []

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, None]:
        assert not torch.is_grad_enabled()  # generate runs without building a graph
        self.seen_lengths.append(idx.size(1))
        logits = torch.full((*idx.shape, self.config.vocab_size), -10.0)
        logits.scatter_(-1, ((idx + 1) % self.config.vocab_size)[..., None], 10.0)
        return logits, None


def test_generate_yields_each_token_and_crops_context():
    model = CountingModel()
    prompt = torch.tensor([[7], [2]])
    steps = list(generate(model, prompt, 6, temperature=0))
    assert all(step.shape == (2,) for step in steps)
    assert torch.stack(steps, dim=1).tolist() == [[8, 9, 0, 1, 2, 3], [3, 4, 5, 6, 7, 8]]
    assert model.seen_lengths == [1, 2, 3, 4, 4, 4]  # never more than block_size


def test_generate_can_stop_early_and_rejects_bad_input():
    model = CountingModel()
    stream = generate(model, torch.tensor([[0]]), 100, temperature=0)
    assert [int(next(stream)) for _ in range(3)] == [1, 2, 3]
    assert len(model.seen_lengths) == 3  # lazily: only the steps asked for ran
    assert list(generate(model, torch.tensor([[0]]), 0)) == []
    with pytest.raises(UserError, match="at least one token"):
        next(generate(model, torch.zeros(1, 0, dtype=torch.long), 3))


def test_generate_with_tiny_gpt_is_seeded_and_crops_a_long_prompt():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    prompt = torch.randint(0, 32, (1, 20))  # longer than block_size

    def run(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return [int(t) for t in generate(model, prompt, 12, temperature=2.0, top_k=20, generator=g)]

    tokens = run(0)
    assert len(tokens) == 12 and all(0 <= t < 32 for t in tokens)
    assert run(0) == tokens
    assert run(1) != tokens


# --- repetition penalty ------------------------------------------------------------------------

def test_repetition_penalty_by_hand_and_against_transformers():
    from gptlab.inference.sampling import apply_repetition_penalty

    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    previous = torch.tensor([[0, 1, 1]])  # token 0 and token 1 (twice: penalised once)
    out = apply_repetition_penalty(logits, previous, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    assert logits.tolist() == [[2.0, -1.0, 0.5, 3.0]]  # pure: the input is unchanged
    transformers = pytest.importorskip("transformers")
    proc = transformers.RepetitionPenaltyLogitsProcessor(1.3)
    g = torch.Generator().manual_seed(0)
    big, prev = torch.randn(3, 50, generator=g), torch.randint(50, (3, 12), generator=g)
    torch.testing.assert_close(apply_repetition_penalty(big, prev, 1.3), proc(prev, big.clone()))
    with pytest.raises(UserError, match="repetition_penalty"):
        check_sampling_args(repetition_penalty=0.0)


def test_repetition_penalty_changes_greedy_generation():
    from types import SimpleNamespace

    class Repeater(torch.nn.Module):
        """Prefers token 1 slightly over token 2 every step."""

        config = SimpleNamespace(block_size=16)

        def forward(self, idx, targets=None):
            logits = torch.zeros(idx.size(0), idx.size(1), 4)
            logits[..., 1], logits[..., 2] = 1.0, 0.9
            return logits, None

    prompt = torch.tensor([[0]])
    plain = [int(t) for t in generate(Repeater(), prompt, 3, temperature=0.0)]
    penalised = [int(t) for t in generate(Repeater(), prompt, 3, temperature=0.0, repetition_penalty=2.0)]
    assert plain == [1, 1, 1] and penalised[:2] == [1, 2]
