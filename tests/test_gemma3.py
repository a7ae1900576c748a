"""Gemma 3 as options of the one Transformer, checked against transformers' own Gemma3ForCausalLM
(tiny random models built offline): logits, cached decoding, the HF table both ways, validation."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gptlab.config import PRESETS, resolve_config  # noqa: E402
from gptlab.errors import UserError  # noqa: E402
from gptlab.model import GPT, ModelConfig  # noqa: E402
from gptlab.tokenizers import BPETokenizer, to_hf_json  # noqa: E402
from gptlab.train import loop  # noqa: E402
from gptlab.weights import hf  # noqa: E402
from gptlab.weights.load import load_checkpoint  # noqa: E402

V = 320
# 6 layers, 64 wide, 4 query heads of 32 (not 64 // 4) sharing one k/v head, a window of 8, and a
# score scale of 1/sqrt(24) (neither 1/sqrt(32) nor 1/sqrt(16)).
SHAPE = {"vocab_size": V, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 6,
         "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32, "max_position_embeddings": 64,
         "sliding_window": 8, "query_pre_attn_scalar": 24, "bos_token_id": V - 2, "eos_token_id": V - 1,
         "pad_token_id": 0}
LOCAL, GLOBAL = "sliding_attention", "full_attention"
CASES = {
    "mixed-5-1": {},  # transformers' default pattern: five local layers, then a global one
    "all-global": {"layer_types": [GLOBAL] * 6},
    "all-local": {"layer_types": [LOCAL] * 6},
    "alternating-gqa": {"layer_types": [LOCAL, GLOBAL] * 3, "num_key_value_heads": 2, "head_dim": 16},
    "final-softcap": {"final_logit_softcapping": 0.5},
    "scaled-global-rope": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}, "tie_word_embeddings": False},
}
T = 40  # longer than the window, so local and global layers see different keys


def hf_gemma3(**overrides) -> transformers.Gemma3ForCausalLM:
    """A random Gemma3ForCausalLM whose norm weights are random too (transformers starts them at 0,
    the identity, behind which a mapping mistake could hide)."""
    config = transformers.Gemma3TextConfig(**{**SHAPE, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model


def ours_from(ref: transformers.PreTrainedModel, family: str = "gemma3_text", **overrides) -> GPT:
    """gptlab's model from a transformers model, through the family's config_in and name table."""
    config = ModelConfig(**{**hf.FAMILIES[family].config_in(ref.config.to_dict()), **overrides})
    model = GPT(config).eval()
    expected = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(hf.hf_to_ours(dict(ref.state_dict()), family, config, expected))
    return model


def tokens(n: int = T, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(V, (batch, n), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- logits ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_impl", ["sdpa", "reference"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, attn_impl):
    ref = hf_gemma3(**CASES[case])
    ours = ours_from(ref, attn_impl=attn_impl)
    x = tokens()
    with torch.no_grad():
        expected = ref(x).logits
        assert max_diff(ours(x)[0], expected) <= 1e-5
    if case == "final-softcap":  # the cap is doing something here
        assert expected.abs().max() < 0.5 and not torch.allclose(ours_from(ref, final_logit_softcapping=None)(x)[0],
                                                                 expected, atol=1e-3)


def test_config_in_reads_the_layer_pattern_and_both_rope_bases():
    config = ours_from(hf_gemma3(rope_scaling={"rope_type": "linear", "factor": 4.0})).config
    assert config.layer_pattern == "LLLLLG" and [config.layer_kind(i) for i in range(6)] == ["local"] * 5 + ["global"]
    assert (config.rope_theta, config.rope_local_theta) == (1_000_000.0, 10_000.0)
    assert config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert (config.head_dim, config.kv_heads, config.n_embd) == (32, 1, 64)
    alternating = ours_from(hf_gemma3(layer_types=[LOCAL, GLOBAL] * 3)).config
    assert alternating.layer_pattern == "LG"


def test_older_flat_config_keys_are_read():
    flat = {**SHAPE, "model_type": "gemma3_text", "rope_theta": 500_000.0, "rope_local_base_freq": 20_000.0,
            "rope_scaling": {"type": "linear", "factor": 8.0}, "sliding_window_pattern": 3,
            "hidden_activation": "gelu_pytorch_tanh"}
    config = ModelConfig(**hf.FAMILIES["gemma3_text"].config_in(flat))
    assert config.layer_pattern == "LLG" and config.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert (config.rope_theta, config.rope_local_theta) == (500_000.0, 20_000.0)


def test_attention_softcap_matches_gemma2():
    """Gemma 2 applies the attention soft-cap that Gemma 3's code leaves out; its blocks are Gemma 3's
    without the QK-norms, with one RoPE base and the score cap."""
    config = transformers.Gemma2Config(**{**SHAPE, "layer_types": [LOCAL, GLOBAL] * 3}, attn_logit_softcapping=1.0,
                                       final_logit_softcapping=None)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = transformers.Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(20.0)  # scores of a few units, where a cap of 1 bites
    ours_config = ModelConfig.for_family(
        "gemma3", vocab_size=V, block_size=64, n_layer=6, n_head=4, n_kv_head=1, n_embd=64, head_dim=32,
        intermediate_size=96, sliding_window=8, layer_pattern="LG", rope_theta=10_000.0, rope_local_theta=None,
        learned_qk_norm=False, query_pre_attn_scalar=24, attn_logit_softcapping=1.0)
    state = {name.removeprefix("model."): t for name, t in ref.state_dict().items() if not name.endswith("inv_freq")}
    x = tokens()
    with torch.no_grad():
        expected = ref(x).logits
        for attn_impl in ("sdpa", "reference"):  # sdpa falls back to the explicit path for the cap
            ours = GPT(dataclasses.replace(ours_config, attn_impl=attn_impl)).eval()
            ours.load_state_dict({**state, "lm_head.weight": state["embed_tokens.weight"]})
            assert max_diff(ours(x)[0], expected) <= 1e-5
        uncapped = GPT(dataclasses.replace(ours_config, attn_logit_softcapping=None)).eval()
        uncapped.load_state_dict(ours.state_dict())
        assert max_diff(uncapped(x)[0], expected) > 1e-3


# --- the KV cache ---------------------------------------------------------------------------------


@pytest.mark.parametrize("static", [False, True])
def test_cached_decoding_equals_uncached_beyond_the_window(static):
    model = ours_from(hf_gemma3())
    x = tokens(T, batch=2, seed=1)
    with torch.no_grad():
        full = model(x)[0]
        cache = model.new_kv_cache(static=static)
        steps = [model(x[:, :5], kv_cache=cache)[0], model(x[:, 5:12], kv_cache=cache)[0]]  # prefill, then a chunk
        steps += [model(x[:, t : t + 1], kv_cache=cache)[0] for t in range(12, T)]  # one token at a time
    assert cache.length == T
    assert max_diff(torch.cat(steps, dim=1), full) <= 1e-5


def test_padded_prompts_and_a_traced_decode_step_agree_with_each_prompt_alone():
    """Left-padded prompts of 13 and 4 tokens: each one's logits and greedy tokens are its own,
    with a growing cache, and with a static cache whose decode step is traced into one graph
    (dynamo's "eager" backend: no C++ build), local and global masks included."""
    from gptlab.inference import generate
    from gptlab.inference.compiled_decode import compile_decode

    model = ours_from(hf_gemma3())
    long, short = tokens(13, batch=1, seed=2)[0].tolist(), tokens(4, batch=1, seed=3)[0].tolist()
    idx = torch.tensor([long, [0] * 9 + short])
    mask = torch.tensor([[1] * 13, [0] * 9 + [1] * 4])
    with torch.no_grad():
        padded = model(idx, attention_mask=mask)[0]
        alone = model(torch.tensor([short]))[0]
    assert max_diff(padded[1:, 9:], alone) <= 1e-5

    def greedy() -> list[list[int]]:
        return torch.stack(list(generate(model, idx, 16, temperature=0, attention_mask=mask)), dim=1).tolist()

    growing = greedy()
    assert growing[1] == torch.stack(list(generate(model, torch.tensor([short]), 16, temperature=0)), dim=1)[0].tolist()
    torch._dynamo.reset()
    compile_decode(model, backend="eager")
    try:
        assert model.new_kv_cache().static and greedy() == growing
    finally:
        torch._dynamo.reset()


def test_cache_holds_head_dim_wide_keys():
    model = ours_from(hf_gemma3(num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=24))
    cache = model.new_kv_cache(max_len=16)
    with torch.no_grad():
        model(tokens(10, batch=1), kv_cache=cache)
    assert cache.keys.shape == (6, 1, 2, 16, 24)  # (n_layer, B, K, max_len, D), D = 24 != 64 // 4


# --- Hugging Face files, both ways ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> BPETokenizer:
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(300))
    return BPETokenizer.train(text, vocab_size=V - 2, special_tokens=["<bos>", "<eos>"])


def save_hf(model: transformers.PreTrainedModel, path: Path, tokenizer: BPETokenizer) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
    (path / "tokenizer.json").write_text(json.dumps(to_hf_json(tokenizer)))


def load_hf(path: Path) -> transformers.PreTrainedModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


@pytest.mark.parametrize("case", ["mixed-5-1", "scaled-global-rope"])
def test_import_export_round_trip(tmp_path, tokenizer, case):
    ref = hf_gemma3(**CASES[case])
    save_hf(ref, tmp_path / "src", tokenizer)
    ckpt = hf.import_hf(tmp_path / "src")
    assert ckpt.config.arch == "gemma3"
    x = tokens()
    with torch.no_grad():
        ours = ckpt.model.eval()(x)[0]
        assert max_diff(ours, ref(x).logits) <= 1e-5
    hf.export_hf(ckpt, tmp_path / "out", family=ckpt.config.arch)  # "gemma3" is written as gemma3_text
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "gemma3_text"
    with torch.no_grad():
        assert max_diff(load_hf(tmp_path / "out")(x).logits, ours) <= 1e-5
    tied_head = ["lm_head.weight"] if ckpt.config.tie_embeddings else []  # transformers saves a tied head once
    ref_state = {k: v for k, v in ref.state_dict().items() if k not in tied_head}
    exported = hf.ours_to_hf(ckpt.model.state_dict(), "gemma3_text", ckpt.config)
    assert set(exported) == set(ref_state) and all(torch.equal(exported[k], ref_state[k]) for k in ref_state)
    assert hf.import_hf(tmp_path / "out").config == ckpt.config


def test_a_gptlab_gemma_exports_to_transformers(tmp_path, tokenizer):
    """A model born in gptlab (no query_pre_attn_scalar, an "LLG" pattern, a final cap) loads in
    transformers as the same model."""
    torch.manual_seed(0)
    config = ModelConfig.for_family("gemma3", vocab_size=V, block_size=64, n_layer=4, n_head=2, n_kv_head=1,
                                    n_embd=48, head_dim=32, intermediate_size=80, sliding_window=6,
                                    layer_pattern="LLG", final_logit_softcapping=5.0)
    model = GPT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    ckpt = load_checkpoint_like(model, tokenizer, tmp_path)
    hf.export_hf(ckpt, tmp_path / "out", family="gemma3_text")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["layer_types"] == [LOCAL, LOCAL, GLOBAL, LOCAL] and written["query_pre_attn_scalar"] == 32
    x = tokens(30)
    with torch.no_grad():
        assert max_diff(load_hf(tmp_path / "out")(x).logits, model(x)[0]) <= 1e-5


def load_checkpoint_like(model: GPT, tokenizer: BPETokenizer, path: Path):
    from gptlab.weights.checkpoint import Checkpoint

    return Checkpoint(path, model, model.config, tokenizer)


def test_export_refuses_what_the_format_does_not_compute(tmp_path, tokenizer):
    gemma = GPT(ModelConfig.for_family("gemma3", vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=32,
                                       sliding_window=4))
    with pytest.raises(UserError, match=r"mlp='geglu' \(llama computes 'swiglu'\).*sandwich_norm") as err:
        hf.export_hf(load_checkpoint_like(gemma, tokenizer, tmp_path), tmp_path / "llama", family="llama")
    assert "\n" not in str(err.value)
    llama = GPT(ModelConfig.for_family("llama", vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=32))
    with pytest.raises(UserError, match="norm='rmsnorm' .*learned_qk_norm=False"):
        hf.export_hf(load_checkpoint_like(llama, tokenizer, tmp_path), tmp_path / "gemma", family="gemma3")
    capped = GPT(dataclasses.replace(gemma.config, attn_logit_softcapping=30.0))
    with pytest.raises(UserError, match="attn_logit_softcapping=30.0"):
        hf.export_hf(load_checkpoint_like(capped, tokenizer, tmp_path), tmp_path / "capped", family="gemma3")
    assert not any((tmp_path / name).exists() for name in ("llama", "gemma", "capped"))


def test_llama_with_its_own_head_dim_imports():
    """head_dim is a field now, so a Llama whose heads are not hidden_size // heads wide imports too."""
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                      max_position_embeddings=64)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(config).eval()
    ours = ours_from(ref, family="llama")
    assert ours.config.head_dim == 24
    assert hf.FAMILIES["llama"].config_in({**config.to_dict(), "head_dim": 16})["head_dim"] is None  # 64 // 4
    x = tokens()
    with torch.no_grad():
        assert max_diff(ours(x)[0], ref(x).logits) <= 1e-5


def test_import_refuses_what_gptlab_does_not_compute():
    family = hf.FAMILIES["gemma3_text"]
    with pytest.raises(UserError, match="hidden_activation 'gelu'.*use_bidirectional_attention"):
        family.config_in({**SHAPE, "hidden_activation": "gelu", "use_bidirectional_attention": True})
    with pytest.raises(UserError, match="chunked_attention"):
        family.config_in({**SHAPE, "layer_types": ["chunked_attention"] * 6})
    local_scaled = {"sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                    "full_attention": {"rope_type": "default", "rope_theta": 1e6}}
    with pytest.raises(UserError, match="local layers"):
        family.config_in({**SHAPE, "rope_parameters": local_scaled})


# --- configuration --------------------------------------------------------------------------------


def test_head_dim_is_optional_and_reads_as_the_width_in_use():
    plain = ModelConfig.for_family("llama", n_embd=64, n_head=4)
    assert plain.head_dim == 16 and plain.to_dict()["head_dim"] is None
    wide = ModelConfig.for_family("gemma3", n_embd=60, n_head=7, head_dim=8)  # 60 is no multiple of 7
    assert wide.head_dim == 8 and ModelConfig.from_dict(json.loads(json.dumps(wide.to_dict()))) == wide
    layer = GPT(dataclasses.replace(wide, n_layer=1, block_size=8)).layers[0].self_attn
    assert layer.q_proj.weight.shape == (7 * 8, 60) and layer.o_proj.weight.shape == (60, 7 * 8)
    assert layer.q_norm.weight.shape == (8,)


def test_new_norms_start_as_the_identity():
    model = GPT(ModelConfig.for_family("gemma3", vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=32,
                                       sliding_window=4))
    norms = {name: p for name, p in model.named_parameters() if "norm" in name}
    assert len(norms) == 2 * 6 + 1  # four block norms and two QK-norms per layer, and the final norm
    assert all(torch.all(p == 0) for p in norms.values())  # scale 1 + 0
    x = torch.randn(3, 32)
    torch.testing.assert_close(model.norm(x), x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())
    idx = tokens(16)
    _, loss = model(idx, idx)
    assert loss.item() == pytest.approx(math.log(V), abs=0.1)


BAD = [
    ({"head_dim": 0}, "head_dim must be a positive whole number"),
    ({"head_dim": 7}, "even head_dim, got head_dim=7"),
    ({"layer_pattern": "LXG"}, "layer_pattern must be null or a string of L"),
    ({"layer_pattern": ""}, "layer_pattern must be"),
    ({"layer_pattern": "LG", "sliding_window": None}, "has local layers (L) but sliding_window is not set"),
    ({"qk_norm": True}, "qk_norm and learned_qk_norm exclude each other"),
    ({"norm": "layernorm"}, "learned_qk_norm needs an RMS norm"),
    ({"norm": "gemma"}, "norm must be one of layernorm, rmsnorm, rmsnorm_offset"),
    ({"mlp": "gegelu"}, "mlp must be one of gelu, swiglu, geglu, relu2"),
    ({"rope_local_theta": -1.0}, "rope_local_theta must be a positive number"),
    ({"pos_embedding": "learned"}, "rope_local_theta needs pos_embedding='rope'"),
    ({"query_pre_attn_scalar": 0}, "query_pre_attn_scalar must be a positive number"),
    ({"attn_logit_softcapping": -50.0}, "attn_logit_softcapping must be a positive number"),
    ({"final_logit_softcapping": "30"}, "final_logit_softcapping must be a positive number"),
    ({"embed_scale": "yes"}, "embed_scale must be true or false"),
    ({"sandwich_norm": 1}, "sandwich_norm must be true or false"),
    ({"pos_embedding": "sinusoidal", "rope_local_theta": None}, "would scale twice"),
    ({"n_embd": 60, "n_head": 7}, "n_embd=60 must be divisible by n_head=7 (or set head_dim)"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[m for _, m in BAD])
def test_bad_values_are_one_clear_line(overrides, message):
    with pytest.raises(UserError) as err:
        ModelConfig.for_family("gemma3", **overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_values_name_the_flag_in_resolve_config():
    with pytest.raises(UserError, match="--layer-pattern='LG' has local layers .*--sliding-window"):
        resolve_config("gemma3-tiny", model_overrides={"layer_pattern": "LG", "sliding_window": None})


# --- presets --------------------------------------------------------------------------------------


def test_gemma3_preset_is_gemma_3_270m():
    config, _ = resolve_config("gemma3")
    with torch.device("meta"):
        model = GPT(config)
    assert model.num_parameters() == 268_098_176  # google/gemma-3-270m
    assert config.layer_pattern == "LLLLLG" and (config.head_dim, config.n_embd, config.n_head) == (256, 640, 4)


def test_gemma3_tiny_preset_trains_and_reloads(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("ROMEO: But soft, what light through yonder window breaks?\n" * 60)
    model_cfg, cfg = resolve_config(
        "gemma3-tiny", model_overrides={"block_size": 64},
        train_overrides={"corpus": str(corpus), "max_steps": 3, "batch_size": 2, "warmup_steps": 1, "eval_interval": 3,
                         "eval_batches": 1, "sample_interval": 0, "sample_tokens": 8})
    assert PRESETS["gemma3-tiny"]["model"]["arch"] == "gemma3"
    result = loop.train(model_cfg, cfg, tmp_path / "run", show_progress=False)
    assert result.step == 3 and math.isfinite(result.last_eval["val_loss"])
    loaded = load_checkpoint(tmp_path / "run", prefer="last")
    assert loaded.config == model_cfg and loaded.config.head_dim == 64
