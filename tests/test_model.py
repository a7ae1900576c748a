"""Tests of the model: configuration, shapes and names, initialisation, attention, training."""

import dataclasses
import json
import math

import pytest
import torch

from gptlab.errors import UserError
from gptlab.model import GPT, ModelConfig
from gptlab.model.layers import CausalSelfAttention

TINY = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(dataclasses.replace(TINY, **overrides))


# --- configuration ---------------------------------------------------------------------------


def test_config_validate_lists_every_bad_field():
    bad = ModelConfig(
        vocab_size=0, block_size=-1, n_head=5, n_embd=768, dropout=1.0, bias="yes", arch="bert"
    )
    with pytest.raises(UserError) as err:
        bad.validate()
    message = str(err.value)
    assert "\n" not in message
    for field in ("vocab_size", "block_size", "n_embd=768 must be divisible by n_head=5",
                  "dropout", "bias", "arch"):
        assert field in message
    for fine in ("n_layer", "tie_embeddings", "attn_impl"):
        assert fine not in message


def test_config_defaults_are_valid_and_model_rejects_bad_config():
    ModelConfig().validate()
    with pytest.raises(UserError, match="n_layer"):
        GPT(dataclasses.replace(TINY, n_layer=0))


def test_config_json_round_trip():
    config = dataclasses.replace(TINY, dropout=0.1, bias=False, tie_embeddings=False)
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert ModelConfig.from_dict({}) == ModelConfig()


def test_config_from_dict_rejects_unknown_keys_and_lists_valid_ones():
    with pytest.raises(UserError) as err:
        ModelConfig.from_dict({"n_layers": 4, "n_embd": 64})
    message = str(err.value)
    assert "n_layers" in message
    assert all(f.name in message for f in dataclasses.fields(ModelConfig))


def test_config_from_dict_validates():
    with pytest.raises(UserError, match="dropout"):
        ModelConfig.from_dict({"dropout": 2.0})


# --- structure -------------------------------------------------------------------------------


def test_parameter_names_follow_the_llama_tree():
    model = GPT(dataclasses.replace(TINY, n_layer=1))
    block = [
        "input_layernorm.weight", "input_layernorm.bias",
        "self_attn.q_proj.weight", "self_attn.q_proj.bias",
        "self_attn.k_proj.weight", "self_attn.k_proj.bias",
        "self_attn.v_proj.weight", "self_attn.v_proj.bias",
        "self_attn.o_proj.weight", "self_attn.o_proj.bias",
        "post_attention_layernorm.weight", "post_attention_layernorm.bias",
        "mlp.up_proj.weight", "mlp.up_proj.bias",
        "mlp.down_proj.weight", "mlp.down_proj.bias",
    ]  # fmt: skip
    expected = (
        ["embed_tokens.weight", "embed_positions.weight"]
        + [f"layers.0.{name}" for name in block]
        + ["norm.weight", "norm.bias"]
    )
    # named_parameters lists the tied head once, under the embedding; the state dict has both.
    assert [name for name, _ in model.named_parameters()] == expected
    assert list(model.state_dict()) == expected + ["lm_head.weight"]


def test_no_bias_parameters_without_bias():
    model = tiny(bias=False)
    assert not [name for name in model.state_dict() if name.endswith(".bias")]


def test_tied_head_shares_storage_and_untied_does_not():
    tied = tiny()
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert tied.lm_head.weight.data_ptr() == tied.embed_tokens.weight.data_ptr()
    untied = tiny(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.embed_tokens.weight.data_ptr()
    assert untied.num_parameters() == tied.num_parameters() + 64 * 32


def test_parameter_counts_and_flops():
    model = tiny()
    V, T, C, L, H = 64, 16, 32, 2, 4
    per_layer = 2 * 2 * C + 4 * (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    non_embedding = L * per_layer + 2 * C
    assert model.num_parameters(exclude_embeddings=True) == non_embedding
    assert model.num_parameters() == non_embedding + V * C + T * C
    # The tied head still costs a (V, C) matmul per token.
    assert model.flops_per_token() == 6 * (non_embedding + V * C) + 12 * L * H * (C // H) * T


def test_forward_shapes_and_too_long_sequence():
    model = tiny()
    logits, loss = model(torch.randint(0, 64, (3, 16)))
    assert logits.shape == (3, 16, 64) and loss is None
    with pytest.raises(UserError, match="block_size 16"):
        model(torch.randint(0, 64, (1, 17)))


# --- initialisation --------------------------------------------------------------------------


def test_init_statistics():
    torch.manual_seed(0)
    L = 4
    model = GPT(ModelConfig(vocab_size=512, block_size=64, n_layer=L, n_head=4, n_embd=256))
    residual_std = 0.02 / math.sqrt(2 * L)
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "norm.weight":
            assert torch.all(p == 1), name
        elif name.endswith(".bias"):
            assert torch.all(p == 0), name
        else:
            residual = name.endswith(("o_proj.weight", "down_proj.weight"))
            std = residual_std if residual else 0.02
            assert p.std().item() == pytest.approx(std, rel=0.05), name
            assert abs(p.mean().item()) < 0.05 * std, name


def test_loss_at_init_is_about_ln_vocab_size():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=64))
    idx, targets = torch.randint(0, 256, (2, 8, 32))
    _, loss = model(idx, targets)
    assert loss.item() == pytest.approx(math.log(256), abs=0.1)


def test_loss_skips_ignored_targets():
    model = tiny()
    idx, targets = torch.randint(0, 64, (2, 2, 16))
    targets[:, :5] = -100
    logits, loss = model(idx, targets)
    kept_logits, kept_targets = logits[:, 5:].reshape(-1, 64), targets[:, 5:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(kept_logits, kept_targets)
    torch.testing.assert_close(loss, expected)


# --- attention -------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_impl", ["sdpa", "reference"])
def test_causality(attn_impl):
    model = tiny(attn_impl=attn_impl).eval()
    idx = torch.randint(0, 64, (2, 16))
    changed = idx.clone()
    changed[:, 10] = (idx[:, 10] + 1) % 64
    before, _ = model(idx)
    after, _ = model(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_sdpa_matches_reference():
    sdpa = tiny(dropout=0.1).eval()
    reference = GPT(dataclasses.replace(sdpa.config, attn_impl="reference")).eval()
    reference.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 64, (3, 16))
    torch.testing.assert_close(sdpa(idx)[0], reference(idx)[0])


def test_reference_path_records_attention_weights():
    model = tiny().eval()  # attn_impl "sdpa": asking for the weights switches to the reference
    attn = model.layers[0].self_attn
    assert isinstance(attn, CausalSelfAttention)
    plain, _ = model(torch.arange(12)[None])
    attn.save_weights = True
    logits, _ = model(torch.arange(12)[None])
    torch.testing.assert_close(logits, plain)
    weights = attn.attn_weights
    assert weights.shape == (1, 4, 12, 12)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 4, 12))
    assert torch.all(weights.triu(diagonal=1) == 0)


def test_bf16_autocast_loss_is_float32():
    model = tiny()
    idx, targets = torch.randint(0, 64, (2, 2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, targets)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(model(idx, targets)[1].item(), abs=0.05)
    loss.backward()
    assert model.embed_tokens.weight.grad is not None


# --- optimisation ----------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_optimizer_groups(tie, decay_embeddings):
    model = tiny(tie_embeddings=tie)
    decay, no_decay = model.configure_optimizer_groups(0.1, decay_embeddings=decay_embeddings)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    grouped = [id(p) for p in decay["params"] + no_decay["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each exactly once
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    for name in names.values():
        if name.endswith(".bias") or "norm" in name:
            assert name not in decayed
        elif name.startswith("embed_"):
            assert (name in decayed) == decay_embeddings
        else:
            assert name in decayed  # Linear weights, and an untied lm_head
    torch.optim.AdamW([decay, no_decay], lr=1e-3)


def test_overfits_one_batch():
    model = tiny()
    idx, targets = torch.randint(0, 64, (2, 4, 16))
    optimizer = torch.optim.AdamW(model.configure_optimizer_groups(0.0), lr=1e-2)
    for _ in range(200):
        _, loss = model(idx, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


# --- torch.compile ---------------------------------------------------------------------------


def test_traces_as_one_graph():
    """Dynamo captures the whole forward with no graph break (fast: no code generation)."""
    torch._dynamo.reset()
    model = tiny().eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    idx, targets = torch.randint(0, 64, (2, 2, 16))
    torch.testing.assert_close(compiled(idx, targets), model(idx, targets))


@pytest.mark.slow
def test_compiled_matches_eager():
    torch._dynamo.reset()
    model = tiny().eval()
    compiled = torch.compile(model)
    idx, targets = torch.randint(0, 64, (2, 2, 16))
    torch.testing.assert_close(compiled(idx, targets), model(idx, targets), rtol=1e-4, atol=1e-4)
