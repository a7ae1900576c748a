"""LoRA adapters on tiny GPT-2-style (biases, tied head) and Llama-style (GQA, SwiGLU) models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from gptlab.errors import UserError
from gptlab.model import GPT, ModelConfig
from gptlab.model.lora import LoRAConfig, LoRALinear, add_lora, lora_flag, lora_state_dict, merge_lora, train_stats
from gptlab.tokenizers import CharTokenizer
from gptlab.weights.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, apply_adapter, load_adapter, save_adapter
from gptlab.weights.checkpoint import save_checkpoint
from gptlab.weights.load import load_checkpoint

FAMILIES = ["gpt2", "llama"]
V = 64


def tiny(family: str, seed: int = 0, **overrides) -> GPT:
    """2 layers, 32 wide, 4 heads (2 k/v heads for llama); eval mode."""
    shape = {"vocab_size": V, "block_size": 16, "n_layer": 2, "n_embd": 32, "n_head": 4}
    if family == "llama":
        shape["n_kv_head"] = 2
    torch.manual_seed(seed)
    return GPT(ModelConfig.for_family(family, **{**shape, **overrides})).eval()


def tokens(seed: int = 1, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomise_adapters(model: GPT) -> None:
    """Make every B non-zero, as training would, so that the adapters change the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.05)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_b_leaves_the_model_unchanged(family):
    model = tiny(family)
    x = tokens()
    before, _ = model(x)
    base_names = set(model.state_dict())
    adapted = add_lora(model, LoRAConfig(targets="all-linear"))
    after, _ = model(x)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert len(adapted) == 2 * (7 if family == "llama" else 6)
    # Base names are untouched (so a base checkpoint still loads); only adapter tensors are new.
    lora_names = set(lora_state_dict(model))
    assert set(model.state_dict()) == base_names | lora_names
    assert lora_names == {f"{n}.{p}" for n in adapted for p in ("lora_A", "lora_B")}
    A = model.get_parameter("layers.0.self_attn.q_proj.lora_A")
    assert A.shape == (8, 32) and A.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_only_adapters_get_gradients_and_change(family):
    model = tiny(family).train()
    add_lora(model, LoRAConfig(rank=4, targets="q_proj,v_proj,down_proj"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.configure_optimizer_groups(0.1), lr=1e-2)
    for step in range(3):
        x = tokens(seed=step, length=13)
        _, loss = model(x[:, :-1], x[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == (name in trainable), name
        optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == trainable


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_model_equals_the_adapted_one_and_saves_as_a_plain_gpt(family, tmp_path):
    model = tiny(family)
    base_names = set(model.state_dict())
    x = tokens()
    base_logits, _ = model(x)
    add_lora(model, LoRAConfig(rank=4, alpha=8, targets="all-linear"))
    randomise_adapters(model)
    adapted, _ = model(x)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)  # the adapters do something
    merged_names = merge_lora(model)
    assert len(merged_names) == 2 * (7 if family == "llama" else 6)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == base_names
    assert all(p.requires_grad for p in model.parameters())
    merged, _ = model(x)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)
    # A merged model is an ordinary checkpoint.
    save_checkpoint(tmp_path / "ckpt", model, CharTokenizer([chr(ord("0") + i) for i in range(V)]))
    reloaded, _ = load_checkpoint(tmp_path / "ckpt").model.eval()(x)
    torch.testing.assert_close(reloaded, adapted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_adapter_reproduces_the_logits_on_a_fresh_base(family, tmp_path):
    model = tiny(family)
    cfg = LoRAConfig(rank=4, alpha=16, dropout=0.1, targets="q_proj,v_proj")
    adapted = add_lora(model, cfg)
    randomise_adapters(model)
    x = tokens()
    expected, _ = model(x)
    save_adapter(tmp_path / "adapter", model, cfg, base_model=f"tiny-{family}")
    saved = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    assert set(saved) == {f"{n}.{p}" for n in adapted for p in ("lora_A", "lora_B")}
    meta = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert meta["rank"] == 4 and meta["targets"] == ["q_proj", "v_proj"] and meta["base_model"] == f"tiny-{family}"

    fresh = tiny(family)
    adapter = apply_adapter(fresh, tmp_path / "adapter")
    assert adapter.config == cfg and adapter.base_model == f"tiny-{family}"
    got, _ = fresh(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_an_adapter_refuses_another_base(tmp_path):
    model = tiny("llama")
    cfg = LoRAConfig(rank=2)
    add_lora(model, cfg)
    save_adapter(tmp_path / "adapter", model, cfg, base_model="tiny-llama")
    # Same shapes, other weights (another seed); then other shapes; then another family.
    with pytest.raises(UserError, match=r"trained on 'tiny-llama', whose weights differ"):
        apply_adapter(tiny("llama", seed=1), tmp_path / "adapter")
    with pytest.raises(UserError, match=r"trained on 'tiny-llama', whose shape differs.*n_layer 2 vs 3"):
        apply_adapter(tiny("llama", n_layer=3), tmp_path / "adapter")
    with pytest.raises(UserError, match=r"arch llama vs gpt2"):
        apply_adapter(tiny("gpt2"), tmp_path / "adapter")
    # The same weights in bfloat16 are the same base.
    apply_adapter(tiny("llama").to(torch.bfloat16), tmp_path / "adapter")


def test_target_parsing_and_validation():
    assert LoRAConfig(targets="q_proj,v_proj").targets == ("q_proj", "v_proj")
    assert LoRAConfig(targets=" q_proj , o_proj, ").targets == ("q_proj", "o_proj")
    assert LoRAConfig(targets=["up_proj"]).targets == ("up_proj",)
    with pytest.raises(UserError, match=r"'q_prj', 'lm_head' not valid; choose from q_proj, k_proj"):
        LoRAConfig(targets="q_prj,lm_head").validate()
    with pytest.raises(UserError, match="targets: none not valid"):
        LoRAConfig(targets="").validate()
    with pytest.raises(UserError) as err:
        LoRAConfig(rank=0, alpha=-1.0, dropout=1.0).validate()
    assert all(f in str(err.value) for f in ("rank must be a positive whole number, got 0",
                                             "alpha must be a positive number, got -1.0",
                                             "dropout must be in [0, 1), got 1.0"))
    # Given as flags, they are named as flags; and add_lora refuses a bad config too.
    with pytest.raises(UserError, match="--lora-rank must be a positive whole number, got 0"):
        LoRAConfig(rank=0).validate(lora_flag)
    with pytest.raises(UserError, match="rank must be"):
        add_lora(tiny("llama"), LoRAConfig(rank=-1))
    # gate_proj is a valid name but GPT-2's GELU MLP has no such layer.
    gpt2 = tiny("gpt2")
    with pytest.raises(UserError, match="gate_proj match no layer of this gpt2 model; its layers are q_proj, "
                                        "k_proj, v_proj, o_proj, up_proj, down_proj"):
        add_lora(gpt2, LoRAConfig(targets="gate_proj"))
    assert all(p.requires_grad for p in gpt2.parameters())  # a refused add_lora changes nothing
    adapted = add_lora(gpt2, LoRAConfig(targets="all-linear"))
    assert "lm_head" not in adapted and "layers.1.mlp.down_proj" in adapted
    with pytest.raises(UserError, match="already has LoRA adapters"):
        add_lora(gpt2, LoRAConfig())


def test_dropout_acts_only_in_training_mode():
    model = tiny("llama")  # the model's own dropout is 0: only the adapters' can vary the output
    add_lora(model, LoRAConfig(dropout=0.5, targets="all-linear"))
    randomise_adapters(model)
    x = tokens()
    # The adapters follow the mode the model was in (eval) when they were added.
    torch.testing.assert_close(model(x)[0], model(x)[0], rtol=0, atol=0)
    model.train()
    assert not torch.equal(model(x)[0], model(x)[0])
    model.eval()
    torch.testing.assert_close(model(x)[0], model(x)[0], rtol=0, atol=0)


def test_train_stats_counts_adapters():
    model = tiny("gpt2")
    total = model.num_parameters()
    assert train_stats(model) == (total, total)
    add_lora(model, LoRAConfig(rank=4, targets="q_proj,up_proj"))
    # per layer: q_proj (32 -> 32) and up_proj (32 -> 128), r * (in + out) each
    adapters = 2 * 4 * ((32 + 32) + (32 + 128))
    stats = train_stats(model)
    assert stats == (adapters, total + adapters)
    share = 100 * adapters / (total + adapters)
    assert str(stats) == f"{adapters:,} trainable of {total + adapters:,} parameters ({share:.2f}%)"


def refused(path, pattern: str) -> None:
    with pytest.raises(UserError, match=pattern) as err:
        load_adapter(path)
    assert "\n" not in str(err.value)


def test_damaged_adapters_are_one_line_errors(tmp_path):
    model = tiny("gpt2")
    cfg = LoRAConfig(rank=2)
    add_lora(model, cfg)
    path = tmp_path / "adapter"
    refused(path, "does not exist")
    save_adapter(path, model, cfg, base_model="tiny-gpt2")
    weights, config = path / ADAPTER_WEIGHTS, path / ADAPTER_CONFIG
    good_weights, good_config = weights.read_bytes(), config.read_text()

    weights.write_bytes(good_weights[: len(good_weights) // 2])
    refused(path, "cannot be read.*the adapter is corrupt")
    weights.write_bytes(good_weights)
    config.write_text(good_config[:-20])
    refused(path, f"{ADAPTER_CONFIG} is corrupt")
    config.write_text(good_config.replace('"rank": 2', '"rank": -2'))
    refused(path, "rank must be a positive whole number, got -2")
    config.write_text(good_config.replace('"base_model"', '"base"'))
    refused(path, f"{ADAPTER_CONFIG} is corrupt")
    config.unlink()
    refused(path, f"{ADAPTER_CONFIG} is missing")


@pytest.mark.slow
def test_smollm2_adapter_round_trip_and_merge(tmp_path):
    """The real 135M Llama-style model: adapters start as a no-op, save and load onto a fresh
    copy of the base, and merge to the same logits."""
    base = load_checkpoint("smollm2-135m-instruct").model.eval()
    other = copy.deepcopy(base)
    x = torch.tensor([[504, 3575, 282, 4649, 314]])  # five ordinary token ids
    base_logits, _ = base(x)
    cfg = LoRAConfig(rank=8, targets="all-linear")
    add_lora(base, cfg)
    torch.testing.assert_close(base(x)[0], base_logits, rtol=0, atol=0)
    randomise_adapters(base)
    adapted, _ = base(x)
    save_adapter(tmp_path / "adapter", base, cfg, base_model="smollm2-135m-instruct")

    apply_adapter(other, load_adapter(tmp_path / "adapter"))
    torch.testing.assert_close(other(x)[0], adapted, rtol=0, atol=0)
    merge_lora(other)
    torch.testing.assert_close(other(x)[0], adapted, rtol=1e-4, atol=1e-4)
