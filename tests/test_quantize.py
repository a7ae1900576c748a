"""Int8 quantisation: the weight grid, the layer and its per-token activations, the model and\ngeneration with it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gptlab.errors import UserError
from gptlab.inference import generate
from gptlab.inference.engine import Engine, SamplingParams, prepare_for_decoding
from gptlab.inference.quantize import Int8Linear, quantize_int8, quantize_weight, weight_bytes
from gptlab.model import GPT, ModelConfig
from gptlab.model.lora import LoRAConfig, add_lora, merge_lora
from gptlab.tokenizers import CharTokenizer

CHARS = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz .,\n", special_tokens=["<|endoftext|>"])
SHAPE = {"vocab_size": CHARS.vocab_size, "block_size": 32, "n_layer": 2, "n_embd": 64, "n_head": 4}


def model_of(family: str = "llama", **overrides) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig.for_family(family, **SHAPE, **overrides))
    with torch.no_grad():  # larger than init, so that outputs depend on every weight
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def test_weights_round_trip_within_half_a_step_of_their_row():
    w = torch.randn(48, 40) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different sizes
    w[5] = 0.0
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    error = (q.float() * scale[:, None] - w).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()
    # Per-channel: the smallest row keeps relative precision a single scale would destroy.
    assert error[0].max() / w[0].abs().max() < 0.01
    assert (q[5] == 0).all()


def test_int8_linear_is_close_to_its_dequantised_weight():
    linear = nn.Linear(40, 24)
    ql = Int8Linear.from_linear(linear)
    q, scale = ql.int8_weight()
    expected_q, expected_scale = quantize_weight(linear.weight)  # fbgemm's packing keeps both as they were
    assert torch.equal(q, expected_q) and torch.allclose(scale, expected_scale, rtol=1e-7, atol=0)
    x = torch.randn(3, 5, 40)
    expected = x @ ql.dequantized_weight().T + linear.bias
    # Each input row is rounded to 8 bits of its own largest value (7 without VNNI): an error
    # of about 1/250 of that per element, which sums over 40 inputs to well under 1% here.
    error = (ql(x) - expected).abs().max() / expected.abs().max()
    assert 0 < error < 0.01, error
    assert ql(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_each_token_is_rounded_on_its_own_grid():
    """A token with huge activations (a first token often has them) leaves the other tokens'
    outputs as they were: one grid for the whole input, as fbgemm draws it, would not."""
    ql = Int8Linear.from_linear(nn.Linear(64, 32))
    x = torch.randn(6, 64)
    loud = x.clone()
    loud[0] *= 1000
    quiet_rows = ql(x)[1:]
    assert torch.allclose(ql(loud)[1:], quiet_rows, rtol=0, atol=1e-3 * quiet_rows.abs().max())
    bias = ql.bias.detach()
    assert torch.allclose(ql(loud)[0] - bias, (ql(x)[0] - bias) * 1000, rtol=0, atol=1e-3 * 1000)  # scaled back
    assert ql(torch.zeros(2, 64)).abs().max() == ql.bias.abs().max()  # an all-zero row is no 0 / 0


@pytest.mark.parametrize(("family", "tied"), [("llama", True), ("llama", False), ("gpt2", True), ("gpt2", False)])
def test_quantized_logits_are_close_to_float(family, tied):
    model = model_of(family, tie_embeddings=tied)
    idx = torch.randint(0, CHARS.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference, _ = model(idx)
        quantize_int8(model)
        logits, _ = model(idx)
    assert [m for m in model.modules() if type(m) is nn.Linear] == []
    quantized = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(quantized) == 2 * (7 if family == "llama" else 6) + 1  # q k v o + MLP per block, and the head
    assert isinstance(model.embed_tokens, nn.Embedding)  # embeddings stay float
    # Each matrix is off by about 0.5% of its size (a step of max/127, uniform rounding error),
    # and so is each activation; these random blocks amplify that to 2-5% of the logits. A
    # wrong scale or a transposed grid would be off by the logits' whole size.
    relative = (logits - reference).norm() / reference.norm()
    assert 1e-4 < relative < 0.1, relative


def test_quantized_model_is_smaller_and_generates_greedily():
    model = model_of()
    before = weight_bytes(model)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    quantize_int8(model)
    assert weight_bytes(model) < 0.6 * before  # the embedding stays float32
    cached = list(generate(model, prompt, 12, temperature=0))
    assert cached == list(generate(model, prompt, 12, temperature=0, use_cache=False))
    assert len({int(t) for t in cached}) > 1


def test_a_merged_lora_model_quantizes_close_to_its_float_self():
    model = model_of()
    add_lora(model, LoRAConfig(rank=2, alpha=4, dropout=0.0, targets="q_proj,v_proj"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)  # B starts at zero: make the adapter change the outputs
    merge_lora(model)
    idx = torch.randint(0, CHARS.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference, _ = model(idx)
        logits, _ = quantize_int8(model)(idx)
    assert isinstance(model.layers[0].self_attn.q_proj, Int8Linear)
    assert (logits - reference).norm() / reference.norm() < 0.1


def test_quantized_decoding_is_not_compiled():
    """torch.compile cannot trace fbgemm's packed weights: the pair is refused in one line."""
    with pytest.raises(UserError, match="--compile and --quantize int8 do not combine"):
        prepare_for_decoding(model_of(), compile=True, quantize="int8")


def test_batches_decode_as_their_prompts_one_at_a_time():
    """Each row is rounded on a fixed grid of its own, so a left-padded batch gives each prompt
    the tokens it gets alone."""
    model = model_of()
    checkpoint = SimpleNamespace(model=model, tokenizer=CHARS, config=model.config, path=".", tokenizer_config=None)
    engine = Engine(checkpoint, quantize="int8")
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7], [1, 8, 2, 8, 1]]
    params = SamplingParams(temperature=0, max_new_tokens=10)
    together = [c.token_ids for c in engine.generate_batch(prompts, params)]
    assert together == [engine.generate_batch([p], params)[0].token_ids for p in prompts]


def test_engine_quantizes_and_refuses_unknown_schemes_and_lora():
    model = model_of()
    checkpoint = SimpleNamespace(model=model, tokenizer=CHARS, config=model.config, path=".", tokenizer_config=None)
    engine = Engine(checkpoint, quantize="int8")
    assert isinstance(engine.model.layers[0].mlp.up_proj, Int8Linear)
    done = engine.generate_batch([[3, 1, 4]], SamplingParams(temperature=0, max_new_tokens=5))
    assert len(done[0].token_ids) == 5
    with pytest.raises(UserError, match="quantize='int4'"):
        Engine(checkpoint, quantize="int4")
    adapted = model_of()
    add_lora(adapted, LoRAConfig(rank=2, alpha=4, dropout=0.0, targets="q_proj,v_proj"))
    with pytest.raises(UserError, match="merge the LoRA adapter first"):
        quantize_int8(adapted)
