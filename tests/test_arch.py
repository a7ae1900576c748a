"""The architecture options (RoPE, RMSNorm, SwiGLU, grouped-query attention, q/k/v biases,
sliding window) and the four families built from them, on tiny models."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from gptlab.config import PRESETS, resolve_config
from gptlab.errors import UserError
from gptlab.model import FAMILY_DEFAULTS, GPT, ModelConfig
from gptlab.model.layers import (
    RMSNorm,
    apply_rope,
    attention_mask,
    rope_inv_freq,
    rope_tables,
    rotate_half,
)
from gptlab.train import loop
from gptlab.weights.load import load_checkpoint

FAMILIES = ["gpt2", "llama", "qwen2", "mistral", "gemma3"]
V = 256


def tiny_config(family: str, **overrides) -> ModelConfig:
    """2 layers, 64 wide, 4 heads; 2 k/v heads where the family has grouped-query attention."""
    shape = {"vocab_size": V, "block_size": 32, "n_layer": 2, "n_embd": 64, "n_head": 4}
    if family != "gpt2":
        shape["n_kv_head"] = 2
    if family in ("mistral", "gemma3"):
        shape["sliding_window"] = 8
    return ModelConfig.for_family(family, **{**shape, **overrides})


def tiny(family: str, **overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config(family, **overrides)).eval()


# --- configuration ---------------------------------------------------------------------------


def test_defaults_are_the_gpt2_family():
    default = ModelConfig()
    assert all(getattr(default, k) == v for k, v in FAMILY_DEFAULTS["gpt2"].items())
    assert ModelConfig.for_family("gpt2") == default
    assert set(FAMILY_DEFAULTS) == set(FAMILIES)


def test_family_options():
    llama, qwen2, mistral = (ModelConfig.for_family(f) for f in ("llama", "qwen2", "mistral"))
    options = (llama.pos_embedding, llama.norm, llama.mlp, llama.bias)
    assert options == ("rope", "rmsnorm", "swiglu", False)
    assert not llama.qkv_has_bias and qwen2.qkv_has_bias and not qwen2.bias
    assert mistral.sliding_window == 4096 and llama.sliding_window is None
    assert ModelConfig.for_family("llama", n_kv_head=4).kv_heads == 4
    assert ModelConfig().kv_heads == 12 and ModelConfig().mlp_hidden == 4 * 768
    with pytest.raises(UserError, match="unknown model family 'bert'"):
        ModelConfig.for_family("bert")


@pytest.mark.parametrize("family", FAMILIES)
def test_config_json_round_trip(family):
    scaling = {"rope_type": "linear", "factor": 2.0} if family != "gpt2" else None
    config = tiny_config(family, rope_scaling=scaling, intermediate_size=96)
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_validate_reports_every_bad_option():
    bad = ModelConfig(
        n_head=12, n_kv_head=5, pos_embedding="absolute", norm="batchnorm", mlp="relu", norm_eps=0,
        rope_theta=-1.0, intermediate_size=0, qkv_bias="yes", sliding_window=0,
    )  # fmt: skip
    with pytest.raises(UserError) as err:
        bad.validate()
    message = str(err.value)
    assert "\n" not in message
    for field in ("n_kv_head=5", "pos_embedding", "norm must", "mlp must", "norm_eps", "rope_theta",
                  "intermediate_size", "qkv_bias", "sliding_window"):
        assert field in message
    with pytest.raises(UserError, match="divisible by n_kv_head"):
        ModelConfig.for_family("llama", n_kv_head=5)
    with pytest.raises(UserError, match="even head_dim"):
        ModelConfig.for_family("llama", n_embd=60, n_head=4)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"rope_scaling": {"rope_type": "ntk", "factor": 2.0}}, "rope_type is one of"),
        ({"rope_scaling": {"rope_type": "linear"}}, "lacks"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "beta": 1}}, "unknown keys"),
        ({"rope_scaling": {"rope_type": "linear", "factor": -2.0}}, "'factor'"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "pos_embedding": "learned"},
         "needs pos_embedding='rope'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                           "high_freq_factor": 1.0, "original_max_position_embeddings": 64}},
         "must exceed low_freq_factor"),
    ],
)  # fmt: skip
def test_validate_rope_scaling(overrides, match):
    with pytest.raises(UserError, match=match):
        ModelConfig.for_family("llama", **overrides)


@pytest.mark.parametrize("family", FAMILIES)
def test_presets(family):
    model_cfg, _ = resolve_config(family)
    assert model_cfg.arch == family
    assert all(getattr(model_cfg, k) == v for k, v in PRESETS[family]["model"].items())
    with torch.device("meta"):  # shapes only, no memory
        model = GPT(model_cfg)
    expected = {"gpt2": 124_439_808, "llama": 134_515_008, "qwen2": 494_032_768, "gemma3": 268_098_176}
    if family in expected:  # the released models' sizes (GPT-2 small, SmolLM2-135M, Qwen2.5-0.5B)
        assert model.num_parameters() == expected[family]


# --- structure -------------------------------------------------------------------------------


ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
EXPECTED_BLOCK = {
    "gpt2": ["input_layernorm.weight", "input_layernorm.bias"]
    + [f"{p}.{w}" for p in ATTN for w in ("weight", "bias")]
    + ["post_attention_layernorm.weight", "post_attention_layernorm.bias"]
    + [f"mlp.{p}.{w}" for p in ("up_proj", "down_proj") for w in ("weight", "bias")],
    "llama": ["input_layernorm.weight"]
    + [f"{p}.weight" for p in ATTN]
    + ["post_attention_layernorm.weight"]
    + [f"mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")],
    "qwen2": ["input_layernorm.weight"]
    + [f"{p}.{w}" for p in ATTN[:3] for w in ("weight", "bias")]
    + ["self_attn.o_proj.weight", "post_attention_layernorm.weight"]
    + [f"mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")],
}
EXPECTED_BLOCK["mistral"] = EXPECTED_BLOCK["llama"]
EXPECTED_BLOCK["gemma3"] = (
    ["input_layernorm.weight"] + [f"{p}.weight" for p in ATTN] + ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    + ["post_attention_layernorm.weight", "pre_feedforward_layernorm.weight"]
    + [f"mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")] + ["post_feedforward_layernorm.weight"]
)


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_names(family):
    model = tiny(family, n_layer=1)
    head = ["embed_tokens.weight"] + (["embed_positions.weight"] if family == "gpt2" else [])
    tail = ["norm.weight", "norm.bias"] if family == "gpt2" else ["norm.weight"]
    expected = head + [f"layers.0.{name}" for name in EXPECTED_BLOCK[family]] + tail
    tied = model.config.tie_embeddings
    assert tied == (family in ("gpt2", "gemma3"))
    # named_parameters lists a tied head once, under the embedding; the state dict has both.
    own_head = [] if tied else ["lm_head.weight"]
    assert [name for name, _ in model.named_parameters()] == expected + own_head
    assert list(model.state_dict()) == expected + ["lm_head.weight"]
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied
    # RoPE tables are buffers computed from the config, never saved.
    assert not any("rope" in name for name in model.state_dict())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_shapes_of_grouped_query_and_swiglu(family):
    model = tiny(family, intermediate_size=96)
    layer = model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (64, 64)
    assert layer.self_attn.k_proj.weight.shape == (2 * 16, 64)  # 2 k/v heads of 16
    assert layer.self_attn.v_proj.weight.shape == (2 * 16, 64)
    assert layer.mlp.gate_proj.weight.shape == layer.mlp.up_proj.weight.shape == (96, 64)
    assert layer.mlp.down_proj.weight.shape == (64, 96)


@pytest.mark.parametrize("family", FAMILIES)
def test_init_and_loss_near_ln_vocab(family):
    model = tiny(family)
    for name, p in model.named_parameters():
        if "norm" in name:
            zero_centred = name.endswith(".bias") or model.config.norm == "rmsnorm_offset"
            assert torch.all(p == (0 if zero_centred else 1)), name
        elif name.endswith(".bias"):
            assert torch.all(p == 0), name
    gate = model.layers[0].mlp.gate_proj
    if gate is not None:  # initialised like up_proj
        assert gate.weight.std().item() == pytest.approx(0.02, rel=0.1)
    idx, targets = torch.randint(0, V, (2, 4, 32), generator=torch.Generator().manual_seed(0))
    logits, loss = model(idx, targets)
    assert logits.shape == (4, 32, V)
    assert loss.item() == pytest.approx(math.log(V), abs=0.1)


# --- attention -------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_impl", ["sdpa", "reference"])
@pytest.mark.parametrize("family", FAMILIES)
def test_causality(family, attn_impl):
    model = tiny(family, attn_impl=attn_impl)
    idx = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[:, 10] = (idx[:, 10] + 1) % V
    before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


@pytest.mark.parametrize("attn_impl", ["sdpa", "reference"])
def test_sliding_window_limits_how_far_back_a_token_reaches(attn_impl):
    # Window 8, 2 layers: a token reaches 7 positions further per layer, so a change at
    # position 2 shows at positions 2..16 and nowhere after.
    model = tiny("mistral", attn_impl=attn_impl)
    idx = torch.randint(0, V, (1, 32), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[:, 2] = (idx[:, 2] + 1) % V
    before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(before[:, 17:], after[:, 17:])
    assert not torch.allclose(before[:, 16], after[:, 16])
    without_window = GPT(dataclasses.replace(model.config, sliding_window=None)).eval()
    without_window.load_state_dict(model.state_dict())
    assert not torch.allclose(without_window(idx)[0][:, 17:], without_window(changed)[0][:, 17:])


def test_attention_mask_by_hand():
    # 2 new queries (positions 3, 4) against 5 keys, window 3.
    expected = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(attention_mask(2, 5, 3, torch.device("cpu")), expected)
    causal = torch.ones(3, 3).tril().bool()
    assert torch.equal(attention_mask(3, 3, None, torch.device("cpu")), causal)


@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_matches_reference(family):
    sdpa = tiny(family, dropout=0.1)
    reference = GPT(dataclasses.replace(sdpa.config, attn_impl="reference")).eval()
    reference.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, V, (3, 32), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sdpa(idx)[0], reference(idx)[0])


def test_grouped_query_attention_equals_multi_head_with_shared_heads():
    """n_kv_head=2 of 4 heads is 4-head attention whose k/v heads 0, 1 and 2, 3 are copies."""
    gqa = tiny("llama")
    mha = GPT(dataclasses.replace(gqa.config, n_kv_head=None)).eval()
    state = gqa.state_dict()
    for name, tensor in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            # (K * D, C) -> (H * D, C): query head h uses k/v head h // (H // K).
            state[name] = tensor.view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
    mha.load_state_dict(state)
    idx = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gqa(idx)[0], mha(idx)[0])


# --- RoPE ------------------------------------------------------------------------------------


def test_rotate_half_and_rope_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert rotate_half(x).tolist() == [-3.0, -4.0, 1.0, 2.0]
    # head_dim 4, theta 100: pairs (x0, x2) and (x1, x3) turn at 1 and 100^(-1/2) = 0.1 rad
    # per position; at position 3, by 3 and 0.3 rad.
    config = ModelConfig.for_family("llama", n_embd=8, n_head=2, rope_theta=100.0, block_size=8)
    cos, sin = rope_tables(config, 8)
    out = apply_rope(x.view(1, 1, 1, 4), cos[3:4], sin[3:4]).flatten()
    a, b = 3.0, 0.3
    expected = torch.tensor([
        1 * math.cos(a) - 3 * math.sin(a), 2 * math.cos(b) - 4 * math.sin(b),
        3 * math.cos(a) + 1 * math.sin(a), 4 * math.cos(b) + 2 * math.sin(b),
    ])  # fmt: skip
    torch.testing.assert_close(out, expected)


def test_rope_scores_depend_only_on_distance():
    config = ModelConfig.for_family("llama", n_embd=64, n_head=4, block_size=32)
    cos, sin = rope_tables(config, 32)
    q, k = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))

    def score(m: int, n: int) -> torch.Tensor:
        qm = apply_rope(q.view(1, 1, 1, 16), cos[m : m + 1], sin[m : m + 1])
        kn = apply_rope(k.view(1, 1, 1, 16), cos[n : n + 1], sin[n : n + 1])
        return (qm * kn).sum()

    torch.testing.assert_close(score(7, 3), score(20, 16))
    torch.testing.assert_close(score(5, 5), (q * k).sum())


ROPE_SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 4.0},
    # theta 5e5, head_dim 16, original 64: the pairs fall in all three llama3 bands.
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16,
     "beta_slow": 2, "mscale": 0.8, "mscale_all_dim": 0.5, "truncate": False},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128,
     "attention_factor": 1.3},
]  # fmt: skip


@pytest.mark.parametrize("scaling", ROPE_SCALINGS, ids=lambda s: s and s["rope_type"])
def test_rope_inverse_frequencies_match_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, rope_theta=500000.0, max_position_embeddings=256,
        rope_scaling=dict(scaling) if scaling else None,
    )  # fmt: skip
    kind = scaling["rope_type"] if scaling else "default"
    if kind == "default":
        hf_inv_freq, hf_factor = 1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16)), 1.0
    else:
        hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS[kind](hf_config, "cpu")
    config = ModelConfig.for_family(
        "llama", n_embd=64, n_head=4, block_size=256, rope_theta=500000.0, rope_scaling=scaling
    )
    inv_freq, factor = rope_inv_freq(config)
    torch.testing.assert_close(inv_freq, hf_inv_freq, rtol=0, atol=0)
    assert factor == pytest.approx(hf_factor)
    if kind == "llama3":  # kept, blended and slowed pairs all occur
        ratio = hf_inv_freq / (1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16)))
        assert (ratio == 1).any() and (ratio == 1 / 8).any()
        assert ((ratio > 1 / 8) & (ratio < 1)).any()
    cos, _ = rope_tables(config, 4)
    assert cos[0].tolist() == [pytest.approx(factor)] * 16  # yarn scales cos and sin


# --- RMSNorm ---------------------------------------------------------------------------------


def test_rmsnorm_matches_the_formula():
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(8.0))
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * torch.arange(8.0)
    torch.testing.assert_close(norm(x), expected)
    torch.testing.assert_close(norm(3 * x), expected, rtol=1e-4, atol=1e-5)  # scale-free


# --- training --------------------------------------------------------------------------------

TEXT = "".join(f"{who}: {line}\n" for who, line in [
    ("ROMEO", "But soft, what light through yonder window breaks?"),
    ("JULIET", "O Romeo, Romeo, wherefore art thou Romeo?"),
]) * 40  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_trains_from_scratch_and_reloads(family, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    model_overrides = {**FAMILY_DEFAULTS[family], "n_embd": 64, "n_head": 4}
    if family != "gpt2":
        model_overrides["n_kv_head"] = 2
    if family == "mistral":
        model_overrides["sliding_window"] = 8
    model_cfg, cfg = resolve_config(
        "tiny", model_overrides=model_overrides,
        train_overrides={"corpus": str(corpus), "max_steps": 4, "eval_interval": 4,
                         "sample_tokens": 8},
    )  # fmt: skip
    result = loop.train(model_cfg, cfg, tmp_path / "run", show_progress=False)
    assert result.step == 4 and math.isfinite(result.last_eval["val_loss"])
    loaded = load_checkpoint(tmp_path / "run", prefer="last")
    assert loaded.config.arch == family and loaded.config == model_cfg


# --- torch.compile ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_traces_as_one_graph(family):
    """Dynamo captures the whole forward, RoPE tables and window mask included, unbroken."""
    torch._dynamo.reset()
    model = tiny(family)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    idx, targets = torch.randint(0, V, (2, 2, 32), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(compiled(idx, targets), model(idx, targets))
