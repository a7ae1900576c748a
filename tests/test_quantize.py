"""Int8 quantisation: the weight grid, the layer and its per-token activations, the model and\ngeneration with it."""

from __future__ import annotations

import copy
import gc
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gptlab.errors import UserError
from gptlab.inference import generate
from gptlab.inference.engine import Engine, SamplingParams, prepare_for_decoding
from gptlab.inference.quantize import (
    Int8Linear,
    Int8Slice,
    calibrate,
    calibration_ids,
    quantize_int8,
    quantize_weight,
    smoothing_factors,
    weight_bytes,
)
from gptlab.model import GPT, ModelConfig
from gptlab.model.lora import LoRAConfig, add_lora, merge_lora
from gptlab.tokenizers import CharTokenizer
from test_kv_cache import assert_inductor_decode_matches_eager, compile_counting_graphs, greedy, record_calls

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
    # Each input row is rounded to steps of 1/127 of its own largest value: an error of up to
    # half a step per element, which sums over 40 inputs to well under 1% here.
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
    # Per block: q, k and v joined, o, the MLP's up (joined with its gate in llama) and down; the head.
    assert len([m for m in model.modules() if isinstance(m, Int8Linear)]) == 2 * 4 + 1
    assert len([m for m in model.modules() if isinstance(m, Int8Slice)]) == 2 * (5 if family == "llama" else 3)
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
    assert isinstance(model.layers[0].self_attn.q_proj, Int8Slice)
    assert (logits - reference).norm() / reference.norm() < 0.1


def test_int8_decoding_compiles_into_one_graph_with_the_same_tokens():
    """--compile beside --quantize int8: fbgemm's product is one operator of the graph
    (gptlab::int8_product, which finds its layer by key), everything around it is traced, and
    every decode step runs the one graph, giving eager int8's tokens. A copy of the model
    computes with its own layers after the original is gone."""
    model = quantize_int8(model_of())
    prompt = torch.randint(0, CHARS.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    eager = greedy(model, prompt, 12, use_cache=True)
    copy_of = copy.deepcopy(model)
    del model
    gc.collect()
    graphs = compile_counting_graphs(copy_of)
    calls = record_calls(copy_of)
    assert greedy(copy_of, prompt, 12, use_cache=True) == eager
    assert calls == [(5, True)] + [(1, True)] * 11
    assert len(graphs) == 1
    products = [n for n in graphs[0].graph.nodes if n.target is torch.ops.gptlab.int8_product]
    assert len(products) == 2 * 4 + 1  # per block q/k/v joined, o, gate/up joined, down; the head
    torch._dynamo.reset()


def test_the_engine_compiles_an_int8_model():
    model = model_of()
    checkpoint = SimpleNamespace(model=model, tokenizer=CHARS, config=model.config, path=".", tokenizer_config=None)
    engine = Engine(checkpoint, quantize="int8", compile=True)
    assert isinstance(engine.model.lm_head, Int8Linear) and engine.model.new_kv_cache().static
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_compiled_int8_decoding_matches_eager_int8():
    """Inductor fuses the float steps around the products: eager int8's tokens, logits to 1e-4."""
    prompt = torch.randint(0, CHARS.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    assert_inductor_decode_matches_eager(quantize_int8(model_of()), prompt)


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
    assert isinstance(engine.model.layers[0].mlp.up_proj, Int8Slice)
    assert isinstance(engine.model.layers[0].mlp.down_proj, Int8Linear)
    done = engine.generate_batch([[3, 1, 4]], SamplingParams(temperature=0, max_new_tokens=5))
    assert len(done[0].token_ids) == 5
    with pytest.raises(UserError, match="quantize='int4'"):
        Engine(checkpoint, quantize="int4")
    adapted = model_of()
    add_lora(adapted, LoRAConfig(rank=2, alpha=4, dropout=0.0, targets="q_proj,v_proj"))
    with pytest.raises(UserError, match="merge the LoRA adapter first"):
        quantize_int8(adapted)


@pytest.mark.parametrize("split_sign", [False, True])
def test_the_kernel_computes_the_rows_rounded_to_steps_of_1_127(split_sign):
    """Both ways of feeding fbgemm (zero point 127 with VNNI; positive and negative parts without)
    compute the same thing: each value rounded to a multiple of 1/127, times the int8 weight."""
    from gptlab.inference.quantize import _int8_matmul, reduce_range

    if not split_sign and reduce_range():
        pytest.skip("8-bit activations with zero point 127 can overflow fbgemm's 16-bit sums without VNNI")
    ql = Int8Linear.from_linear(nn.Linear(96, 40, bias=False))
    ql._split_sign = split_sign
    rows = torch.rand(7, 96) * 2 - 1
    rows[:, 0] = 1.0  # every row spans [-1, 1], as the layer scales it
    expected = torch.round(rows * 127) / 127 @ ql.dequantized_weight().T
    got = _int8_matmul(rows, ql)
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * expected.abs().max())


def test_joined_layers_give_what_each_gives_alone():
    """q, k and v (and gate and up) share one int8 matrix: each row keeps its own scale and each
    token its own grid, so the joined outputs are the separate layers' outputs."""
    torch.manual_seed(0)
    linears = [nn.Linear(64, n, bias=True) for n in (64, 16, 16)]
    joined = Int8Linear.from_linears(linears)
    shared: dict = {}
    parts = [Int8Slice(joined, shared, i, [64, 16, 16]) for i in range(3)]
    x = torch.randn(2, 5, 64)
    for part, linear in zip(parts, linears):
        alone, got = Int8Linear.from_linear(linear)(x), part(x)
        assert got.shape == (2, 5, linear.out_features)
        assert torch.allclose(got, alone, rtol=0, atol=1e-6 * alone.abs().max())
    assert shared == {}  # all three taken: nothing is kept alive
    # Called with another input, a part computes afresh rather than hand out the old outputs.
    y = torch.randn(2, 5, 64)
    assert torch.allclose(parts[1](x), Int8Linear.from_linear(linears[1])(x), atol=1e-5)
    assert torch.allclose(parts[1](y), Int8Linear.from_linear(linears[1])(y), atol=1e-5)


def test_smoothing_factors_follow_the_formula():
    input_peak = torch.tensor([4.0, 1.0, 0.0, 9.0])
    weight = torch.tensor([[1.0, -0.25, 3.0, 0.0], [-0.5, 0.5, 1.0, 0.0]])
    s = smoothing_factors(input_peak, weight, alpha=0.5)
    # sqrt(max|x_j|) / sqrt(max|W_j|); a channel never active or a zero column is left alone
    assert torch.allclose(s, torch.tensor([4.0**0.5 / 1.0**0.5, 1.0 / 0.5**0.5, 1.0, 1.0]))


def test_smoothing_rescues_the_small_channels_of_a_layer_with_loud_ones():
    """A few input channels large in every token (as after a norm) coarsen each token's grid for
    the rest; moving their size into the weights restores it, and the layer still computes W x."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 64, bias=False)
    gain = torch.ones(128)
    gain[:4] = 60.0  # four loud channels
    x = torch.randn(32, 128) * gain
    reference = linear(x)
    plain = Int8Linear.from_linear(linear)
    smoothed = Int8Linear.from_linears([linear], input_peak=x.abs().amax(dim=0))
    error = {name: ((layer(x) - reference).norm() / reference.norm()).item()
             for name, layer in (("plain", plain), ("smoothed", smoothed))}
    assert error["smoothed"] < error["plain"] / 2, error  # measured: 0.53% against 1.9%
    # dequantized_weight undoes the smoothing: the float weight the layer stands for
    weight_error = (x @ smoothed.dequantized_weight().T - reference).norm() / reference.norm()
    assert weight_error < error["smoothed"]


def test_calibration_records_each_linear_input_peak_but_the_first_token():
    embed, linear = nn.Embedding(10, 8), nn.Linear(8, 3)
    model = nn.Sequential(embed, linear)
    ids = torch.tensor([[7, 1, 2, 3]])
    with torch.no_grad():
        embed.weight[7] = 1000.0  # the first token's huge activations are left out
        peaks = calibrate(model, ids)
        assert torch.equal(peaks[linear], embed(ids[:, 1:])[0].abs().amax(dim=0))


def test_calibration_text_is_encoded_as_far_as_the_vocabulary_allows():
    ids = calibration_ids(CHARS, block_size=1000)  # lowercase letters and a few marks only
    assert ids is not None and 100 < ids.shape[1] <= 1000
    assert set(CHARS.decode(ids[0].tolist())) <= set("abcdefghijklmnopqrstuvwxyz .,\n")
    assert calibration_ids(CHARS, block_size=50).shape == (1, 50)
    nothing = CharTokenizer.train("XYZ")
    assert calibration_ids(nothing, block_size=50) is None


def test_the_engine_smooths_the_layers_that_read_a_norm():
    model = model_of()
    checkpoint = SimpleNamespace(model=model, tokenizer=CHARS, config=model.config, path=".", tokenizer_config=None)
    block = Engine(checkpoint, quantize="int8").model.layers[0]
    assert block.self_attn.q_proj.joined.smooth is not None and block.mlp.gate_proj.joined.smooth is not None
    assert block.self_attn.o_proj.smooth is None and block.mlp.down_proj.smooth is None
    assert model.lm_head.smooth is not None


def test_calibration_measures_only_the_layers_asked_for():
    embed, first, second = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 3)
    with torch.no_grad():
        peaks = calibrate(nn.Sequential(embed, first, second), torch.tensor([[1, 2, 3]]), [second])
    assert list(peaks) == [second]
