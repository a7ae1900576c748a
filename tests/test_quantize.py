"""Int8 weight-only quantisation: the grid, the layer, the model and generation with it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gptlab.errors import UserError
from gptlab.inference import generate
from gptlab.inference.compiled_decode import compile_decode
from gptlab.inference.engine import Engine, SamplingParams
from gptlab.inference.quantize import QuantLinear, quantize_int8, quantize_weight, weight_bytes
from gptlab.model import GPT, ModelConfig
from gptlab.model.lora import LoRAConfig, add_lora
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


def test_quant_linear_matches_its_dequantised_weight():
    linear = nn.Linear(40, 24)
    ql = QuantLinear.from_linear(linear)
    x = torch.randn(3, 5, 40)
    expected = x @ ql.dequantized_weight().T + linear.bias
    torch.testing.assert_close(ql(x), expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(ql.dequantized_weight(), linear.weight)  # it is quantised, not copied


@pytest.mark.parametrize(("family", "tied", "head", "head_quantized"), [
    ("llama", True, None, False),  # by default a tied head stays float...
    ("llama", False, None, True),  # ...and an untied one is quantised
    ("llama", True, True, True),
    ("gpt2", True, None, False),
    ("gpt2", False, False, False),
])  # fmt: skip
def test_quantized_logits_are_close_to_float(family, tied, head, head_quantized):
    model = model_of(family, tie_embeddings=tied)
    idx = torch.randint(0, CHARS.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference, _ = model(idx)
        quantize_int8(model, head=head)
        logits, _ = model(idx)
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert linears == ([] if head_quantized else [model.lm_head])
    assert len(quantized) == 2 * (7 if family == "llama" else 6) + head_quantized  # q k v o + MLP per block
    assert isinstance(model.embed_tokens, nn.Embedding)  # embeddings stay float
    # Each matrix is off by about 0.5% of its size (a step of max/127, uniform rounding error);
    # these random blocks amplify that to 2-5% of the logits. A wrong scale or a transposed
    # grid would be off by the logits' whole size.
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


def test_quantized_model_traces_into_a_compiled_decode_step():
    model = quantize_int8(model_of())
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    eager = list(generate(model, prompt, 8, temperature=0))
    torch._dynamo.reset()
    compile_decode(model, backend="eager")  # one graph (fullgraph) through the QuantLinear layers
    assert list(generate(model, prompt, 8, temperature=0)) == eager
    torch._dynamo.reset()


def test_engine_quantizes_and_refuses_unknown_schemes_and_lora():
    model = model_of()
    checkpoint = SimpleNamespace(model=model, tokenizer=CHARS, config=model.config, path=".", tokenizer_config=None)
    engine = Engine(checkpoint, quantize="int8")
    assert isinstance(engine.model.layers[0].mlp.up_proj, QuantLinear)
    done = engine.generate_batch([[3, 1, 4]], SamplingParams(temperature=0, max_new_tokens=5))
    assert len(done[0].token_ids) == 5
    with pytest.raises(UserError, match="quantize='int4'"):
        Engine(checkpoint, quantize="int4")
    adapted = model_of()
    add_lora(adapted, LoRAConfig(rank=2, alpha=4, dropout=0.0, targets="q_proj,v_proj"))
    with pytest.raises(UserError, match="merge the LoRA adapter first"):
        quantize_int8(adapted)
