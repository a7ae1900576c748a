"""Muon: the orthogonalised update, its AdamW half, and training with it."""

from __future__ import annotations

import pytest
import torch

from gptlab.config import TrainConfig, resolve_config
from gptlab.errors import UserError
from gptlab.model.transformer import GPT
from gptlab.train.optim import Muon, build_optimizer, orthogonalize, set_lr


@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (48, 48)])
def test_orthogonalize_gives_the_polar_direction(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    o = orthogonalize(g)
    s = torch.linalg.svdvals(o)
    assert o.shape == g.shape and s.min() > 0.5 and s.max() < 1.3  # every direction moves about equally
    u, _, vt = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vt  # the exact nearest semi-orthogonal matrix
    cos = (o * polar).sum() / (o.norm() * polar.norm())
    assert cos > 0.95


def plain_newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The textbook iteration on X itself, to check the faster one against."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.T if g.size(0) > g.size(1) else g
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if g.size(0) > g.size(1) else x


@pytest.mark.parametrize("shape", [(16, 64), (96, 24), (32, 48)])  # long sides 4x, 4x, 1.5x the short
def test_orthogonalize_matches_the_plain_iteration_alone_and_stacked(shape):
    gs = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    stacked = orthogonalize(gs)
    for g, o in zip(gs, stacked):
        expected = plain_newton_schulz(g)
        torch.testing.assert_close(orthogonalize(g), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(o, expected, atol=1e-5, rtol=1e-4)


def tiny_model(seed: int = 0) -> GPT:
    # No biases: a key bias has a true gradient of 0 (softmax ignores a shift of all scores), so its
    # float noise, scaled up by Adam, would differ between any two correct implementations.
    model_cfg, _ = resolve_config("tiny", model_overrides={"vocab_size": 50, "bias": False})
    torch.manual_seed(seed)
    return GPT(model_cfg)


def step_with(optimizer_name: str, model: GPT, steps: int = 3) -> None:
    cfg = TrainConfig(optimizer=optimizer_name, lr=1e-2, weight_decay=0.1)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    x = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        set_lr(opt, cfg.lr)
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad()


def hidden(name: str, p: torch.Tensor) -> bool:
    return name.startswith("layers.") and p.dim() == 2


def test_muon_trains_block_matrices_and_adamw_the_rest_exactly():
    # One step from the same start: the same gradients, so the AdamW half must match torch's AdamW.
    adamw, muon = tiny_model(), tiny_model()
    step_with("adamw", adamw, steps=1)
    step_with("muon", muon, steps=1)
    for (name, a), (_, m) in zip(adamw.named_parameters(), muon.named_parameters()):
        if hidden(name, a):
            assert not torch.allclose(a, m), name  # Muon's own update
        else:
            torch.testing.assert_close(a, m, rtol=1e-5, atol=1e-6, msg=name)
    # Several steps with the block matrices frozen: the AdamW half alone, bias corrections included.
    adamw, muon = tiny_model(), tiny_model()
    for model in (adamw, muon):
        for name, p in model.named_parameters():
            p.requires_grad_(not hidden(name, p))
    step_with("adamw", adamw, steps=4)
    step_with("muon", muon, steps=4)
    for (name, a), (_, m) in zip(adamw.named_parameters(), muon.named_parameters()):
        torch.testing.assert_close(a, m, rtol=1e-5, atol=1e-6, msg=name)


def test_muon_lowers_the_loss_and_its_rate_follows_the_schedule():
    model = tiny_model()
    cfg = TrainConfig(optimizer="muon", lr=3e-3, muon_lr=0.03)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    set_lr(opt, 1e-3)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([1e-3, 1e-2])  # 0.03 / 3e-3 = 10x
    x = torch.randint(0, 50, (8, 32), generator=torch.Generator().manual_seed(2))
    first = None
    for _ in range(30):
        set_lr(opt, cfg.lr)
        loss = model(x, x.roll(-1, 1))[1]
        first = first or loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.5 * first


def test_muon_settings_are_checked():
    with pytest.raises(UserError, match="--optimizer must be one of adamw, muon"):
        resolve_config("tiny", train_overrides={"optimizer": "sgd"})
    with pytest.raises(UserError, match="needs whole matrices"):
        build_optimizer(tiny_model(), TrainConfig(optimizer="muon", fsdp=True), torch.device("cpu"))
    assert isinstance(build_optimizer(tiny_model(), TrainConfig(optimizer="muon"), torch.device("cpu")), Muon)


# --- the speedrun's model options -------------------------------------------------------------

def speedrun_model(**options) -> GPT:
    model_cfg, _ = resolve_config("tiny", model_overrides={"vocab_size": 50, "pos_embedding": "rope", "norm": "rmsnorm",
                                                           "bias": False, "tie_embeddings": False, **options})
    torch.manual_seed(0)
    return GPT(model_cfg)


def test_zero_init_residual_starts_every_block_as_the_identity():
    model = speedrun_model(zero_init_residual=True)
    for layer in model.layers:
        assert not layer.self_attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()
    x = torch.randint(0, 50, (2, 12))
    # With every block adding zero, the logits depend on the current token only (a bigram model).
    logits = model(x)[0]
    direct = model.lm_head(model.norm(model.embed_tokens(x)))
    torch.testing.assert_close(logits, direct)


def test_relu2_mlp_and_qk_norm_compute_what_they_say():
    from gptlab.model.layers import MLP

    model = speedrun_model(mlp="relu2", qk_norm=True)
    mlp = model.layers[0].mlp
    x = torch.randn(2, 5, model.config.n_embd)
    torch.testing.assert_close(mlp(x), mlp.down_proj(torch.relu(mlp.up_proj(x)) ** 2))
    assert isinstance(mlp, MLP) and mlp.gate_proj is None
    # qk_norm: scaling the query and key projections changes nothing (each head is normalised).
    attn = model.layers[0].self_attn
    h = torch.randn(2, 5, model.config.n_embd)
    rope = (model.rope_cos[:5], model.rope_sin[:5])
    before = attn(h, rope)
    with torch.no_grad():
        attn.q_proj.weight.mul_(7.0)
        attn.k_proj.weight.mul_(0.2)
    torch.testing.assert_close(attn(h, rope), before, rtol=1e-4, atol=1e-5)
    # Cached and uncached generation agree with these options too.
    from gptlab.inference.sampling import generate

    model.eval()
    prompt = torch.randint(0, 50, (1, 6))
    cached = [int(t[0]) for t in generate(model, prompt, 10, temperature=0.0)]
    uncached = [int(t[0]) for t in generate(model, prompt, 10, temperature=0.0, use_cache=False)]
    assert cached == uncached


def test_models_with_speedrun_options_are_not_exported_as_something_else(tmp_path):
    from types import SimpleNamespace

    from gptlab.tokenizers import CharTokenizer
    from gptlab.weights.hf import export_hf

    model = speedrun_model(mlp="relu2", qk_norm=True)
    ckpt = SimpleNamespace(model=model, config=model.config, tokenizer=CharTokenizer.train("abc"), path=tmp_path)
    with pytest.raises(UserError, match="mlp='relu2' .*qk_norm"):
        export_hf(ckpt, tmp_path / "hf", family="llama")
