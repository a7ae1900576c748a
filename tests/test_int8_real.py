"""``--quantize int8`` on the real SmolLM2-135M-Instruct (slow: fetches the model): greedy tokens
leave fp32's only at near-ties, and the bits per byte of a held-out text rise by at most 1%."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from gptlab.data.prepare import split_point
from gptlab.data.sources import load_corpus
from gptlab.inference.engine import Engine, SamplingParams
from gptlab.inference.eval_scoring import Scorer
from gptlab.inference.eval_text import evaluate_text
from gptlab.inference.quantize import checkpoint_calibration, quantize_int8
from gptlab.weights.load import load_checkpoint

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.",
           "Explain why the sky is blue in two sentences."]


@pytest.fixture(scope="module")
def smollm2():
    return load_checkpoint("smollm2-135m-instruct")


#: how far apart fp32's two best logits may be where int8's greedy path leaves fp32's: int8 moves
#: SmolLM2's logits (~20-30) by up to about 0.8 (measured), so it may pick the other of two near
#: equals; it must not overturn a clear choice.
NEAR_TIE = 0.5


@pytest.mark.parametrize("question", PROMPTS)
def test_greedy_tokens_follow_fp32_until_a_near_tie(smollm2, question):
    """16 greedy tokens: int8 gives fp32's tokens, or leaves them only where fp32 itself was
    nearly undecided (its two best logits within NEAR_TIE)."""
    fp32 = Engine(smollm2, dtype="fp32")
    int8 = Engine(dataclasses.replace(smollm2, model=copy.deepcopy(smollm2.model)), dtype="fp32", quantize="int8")
    prompt = fp32.chat_prompt([{"role": "user", "content": question}], 16).ids
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    ours, theirs = (e.generate_batch([prompt], params)[0].token_ids for e in (int8, fp32))
    parted = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if parted is not None:
        with torch.no_grad():
            best = smollm2.model(torch.tensor([prompt + theirs[:parted]]))[0][0, -1].topk(2).values
        assert best[0] - best[1] < NEAR_TIE, (parted, best)


def test_bits_per_byte_rise_by_at_most_one_percent(smollm2):
    text = load_corpus("shakespeare-tiny").text
    held_out = text[split_point(text, 0.1):][:20_000]
    scores = {}
    # as --quantize int8 builds it: smoothed by the calibration text (unsmoothed, +1.03% on an AVX2 EPYC)
    int8 = quantize_int8(copy.deepcopy(smollm2.model), checkpoint_calibration(smollm2))
    for name, model in (("fp32", smollm2.model), ("int8", int8)):
        scorer = Scorer(model, torch.device("cpu"), torch.float32, batch_size=4, progress=False)
        scores[name] = evaluate_text(scorer, smollm2.tokenizer, held_out, "shakespeare-tiny", window=512).bits_per_byte
    assert scores["int8"] != scores["fp32"]
    assert scores["int8"] <= scores["fp32"] * 1.01, scores
