"""On a CUDA GPU: the model, the loop and the engine compute what they compute on the CPU.

Skipped where there is no GPU (CI, laptops); ``benchmarks/gpu_check.sh`` runs them whenever a
GPU is at hand. ``GPTLAB_TEST_DEVICE=cpu`` runs them on the CPU, to check the tests themselves.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from gptlab.cli import main
from gptlab.inference.engine import Engine, SamplingParams
from gptlab.model import GPT, ModelConfig
from gptlab.tokenizers import CharTokenizer

DEVICE = os.environ.get("GPTLAB_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")

CHARS = CharTokenizer("abcdefghijklmnopqrstuvwxyz .,\n")
FAMILIES = {"gpt2": {}, "llama": {"n_kv_head": 2}, "gemma3": {"n_kv_head": 1, "head_dim": 16, "sliding_window": 8,
                                                               "layer_pattern": "LG"}}


def model_of(family: str) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig.for_family(family, vocab_size=CHARS.vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=64,
                                 **FAMILIES[family])
    return GPT(cfg).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_equal_the_cpu_in_fp32_and_close_in_bf16(family):
    model = model_of(family)
    x = torch.randint(CHARS.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cpu = model(x)[0]
        gpu = model.to(DEVICE)(x.to(DEVICE))[0].float().cpu()
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
            bf16 = model(x.to(DEVICE))[0].float().cpu()
    assert (gpu - cpu).abs().max().item() <= 1e-4  # TF32 stays off unless the loop turns it on
    assert (bf16 - cpu).abs().max().item() <= 0.1 * cpu.abs().max().item()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cached_greedy_decoding_equals_the_cpu(family):
    def greedy(device: str) -> list[int]:
        model = model_of(family)
        engine = Engine(SimpleNamespace(model=model, tokenizer=CHARS, config=model.config, path=".",
                                        tokenizer_config=None), device=device, dtype="fp32")
        params = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)
        return engine.generate_batch([CHARS.encode("the cat sat on")], params)[0].token_ids

    assert greedy(DEVICE) == greedy("cpu")


def test_train_command_runs_compiled_in_bf16_and_reloads_on_the_cpu(tmp_path):
    """``gptlab train --device cuda --dtype bf16 --compile`` on a small corpus: the loss falls,
    and the checkpoint samples on the CPU."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 400)
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--corpus", str(corpus), "--out", str(out), "--device", DEVICE,
                 "--dtype", "bf16", "--compile", "--max-steps", "60", "--eval-interval", "30", "--no-progress",
                 "--sample-interval", "0"]) == 0
    rows = [line.split(",") for line in (out / "metrics.csv").read_text().splitlines()]
    header, first, last = rows[0], rows[1], rows[-1]
    loss = header.index("train_loss")
    assert float(last[loss]) < float(first[loss]) - 0.5
    assert main(["sample", str(out), "--prompt", "the ", "--max-new-tokens", "8", "--device", "cpu"]) == 0
    assert json.loads((out / "best" / "config.json").read_text())["block_size"] > 0
