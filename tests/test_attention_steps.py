"""Each step of gptlab.model.attention_steps equals the next where they should agree, and the
last steps equal the production CausalSelfAttention (both paths) given the same weights."""

import pytest
import torch

from gptlab.model import ModelConfig
from gptlab.model import attention_steps as steps
from gptlab.model.layers import CausalSelfAttention

T, C = 7, 12


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(T, C, generator=torch.Generator().manual_seed(0))


def weights(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) / shape[0] ** 0.5


def test_average_loop_is_the_running_mean(x):
    out = steps.average_loop(x)
    assert torch.allclose(out[0], x[0])
    assert torch.allclose(out[3], (x[0] + x[1] + x[2] + x[3]) / 4)
    assert torch.allclose(out[-1], x.mean(dim=0))


def test_average_weights_are_one_over_count_up_to_the_diagonal():
    expected = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]
    assert torch.allclose(steps.average_weights(T), expected)


def test_weighted_loop_with_average_weights_is_the_average(x):
    assert torch.allclose(steps.weighted_loop(x, steps.average_weights(T)), steps.average_loop(x))


def test_weighted_matrix_equals_weighted_loop(x):
    # Random weights everywhere, the future included: both must ignore the upper triangle.
    w = torch.rand(T, T, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(steps.weighted_matrix(x, w), steps.weighted_loop(x, w), atol=1e-6)
    changed_future = w + torch.ones(T, T).triu(diagonal=1)
    assert torch.allclose(steps.weighted_matrix(x, changed_future), steps.weighted_matrix(x, w))


def test_qkv_attention_with_zero_queries_averages_everything(x):
    # Zero queries give every score 0, so each token weighs all tokens equally.
    zero, eye = torch.zeros(C, C), torch.eye(C)
    out = steps.qkv_attention(x, zero, weights(C, C, seed=2), eye)
    assert torch.allclose(out, x.mean(dim=0).expand(T, C), atol=1e-6)


def test_causal_attention_with_zero_queries_is_the_running_average(x):
    zero, eye = torch.zeros(C, C), torch.eye(C)
    out = steps.causal_attention(x, zero, weights(C, C, seed=2), eye)
    assert torch.allclose(out, steps.average_loop(x), atol=1e-6)


def test_causal_attention_is_unmasked_attention_on_each_prefix(x):
    w_q, w_k, w_v = (weights(C, 4, seed=s) for s in (3, 4, 5))
    causal = steps.causal_attention(x, w_q, w_k, w_v)
    for t in range(T):
        prefix = steps.qkv_attention(x[: t + 1], w_q, w_k, w_v)
        assert torch.allclose(causal[t], prefix[-1], atol=1e-6)
    # and the mask matters: unmasked attention differs at every position but the last
    assert not torch.allclose(steps.qkv_attention(x, w_q, w_k, w_v)[0], causal[0])


def test_multi_head_attention_is_causal_attention_per_head():
    n_head, D = 3, C // 3
    xb = torch.randn(2, T, C, generator=torch.Generator().manual_seed(6))
    w_q, w_k, w_v, w_o = (weights(C, C, seed=s) for s in (7, 8, 9, 10))
    out = steps.multi_head_attention(xb, w_q, w_k, w_v, w_o, n_head)
    blocks = [slice(h * D, (h + 1) * D) for h in range(n_head)]
    per_head = [steps.causal_attention(xb, w_q[:, b], w_k[:, b], w_v[:, b]) for b in blocks]
    assert torch.allclose(out, torch.cat(per_head, dim=-1) @ w_o, atol=1e-5)
    # One head and no output mixing is plain causal attention.
    one = steps.multi_head_attention(xb, w_q, w_k, w_v, torch.eye(C), n_head=1)
    assert torch.allclose(one, steps.causal_attention(xb, w_q, w_k, w_v), atol=1e-5)


def test_grouped_query_attention_is_mha_with_shared_key_value_heads():
    n_head, n_kv_head, D = 6, 2, C // 6
    xb = torch.randn(2, T, C, generator=torch.Generator().manual_seed(11))
    w_q, w_o = weights(C, C, seed=12), weights(C, C, seed=13)
    w_k, w_v = weights(C, n_kv_head * D, seed=14), weights(C, n_kv_head * D, seed=15)

    def repeat_heads(w: torch.Tensor) -> torch.Tensor:
        # (C, K * D) -> (C, H * D): each kv head's column block once per query head of its group
        return w.view(C, n_kv_head, 1, D).expand(C, n_kv_head, n_head // n_kv_head, D).reshape(C, C)

    gqa = steps.grouped_query_attention(xb, w_q, w_k, w_v, w_o, n_head, n_kv_head)
    mha = steps.multi_head_attention(xb, w_q, repeat_heads(w_k), repeat_heads(w_v), w_o, n_head)
    assert torch.allclose(gqa, mha, atol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
@pytest.mark.parametrize("n_kv_head", [None, 2], ids=["mha", "gqa"])
def test_last_steps_equal_production_attention(impl, n_kv_head):
    config = ModelConfig(vocab_size=10, block_size=16, n_layer=1, n_head=4, n_kv_head=n_kv_head,
                         n_embd=16, bias=False, attn_impl=impl)
    torch.manual_seed(16)
    layer = CausalSelfAttention(config)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    layer.eval()
    xb = torch.randn(3, 9, 16)
    # nn.Linear computes x @ weight.T, so the steps take the transposed weights.
    w = [proj.weight.T for proj in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj)]
    with torch.no_grad():
        expected = layer(xb)
        if n_kv_head is None:
            ours = steps.multi_head_attention(xb, *w, n_head=4)
        else:
            ours = steps.grouped_query_attention(xb, *w, n_head=4, n_kv_head=n_kv_head)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
