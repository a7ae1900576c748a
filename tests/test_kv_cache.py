"""The KV cache: cached generation must give exactly what uncached generation gives, with a
growing cache, a static one, and a compiled decode step over a static one."""

from __future__ import annotations

import pytest
import torch

from gptlab.errors import UserError
from gptlab.inference import generate
from gptlab.inference.compiled_decode import compile_decode
from gptlab.model import GPT, KVCache, ModelConfig

V = 128
SHAPE = {"vocab_size": V, "block_size": 32, "n_layer": 2, "n_embd": 64, "n_head": 4}
# Every family, and learned positions (GPT-2) next to RoPE ones on an otherwise Llama model.
VARIANTS = {
    "gpt2": ("gpt2", {}),
    "llama": ("llama", {"n_kv_head": 2}),
    "llama-learned-positions": ("llama", {"n_kv_head": 2, "pos_embedding": "learned"}),
    "qwen2": ("qwen2", {"n_kv_head": 2}),
    "mistral": ("mistral", {"n_kv_head": 1, "sliding_window": 8}),
    "llama-alibi": ("llama", {"n_kv_head": 2, "pos_embedding": "alibi"}),
}


def model_of(variant: str, **overrides) -> GPT:
    family, options = VARIANTS[variant]
    torch.manual_seed(0)
    model = GPT(ModelConfig.for_family(family, **SHAPE, **options, **overrides)).eval()
    # At init attention is nearly uniform and a tied model repeats its last token; larger
    # random weights make every output depend on where each key sits, so errors show.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def tokens(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def greedy(model: GPT, prompt: torch.Tensor, n: int, use_cache: bool) -> list[list[int]]:
    steps = list(generate(model, prompt, n, temperature=0, use_cache=use_cache))
    return torch.stack(steps, dim=1).tolist()


def record_calls(model: GPT) -> list[tuple[int, bool]]:
    """(tokens fed, whether with a cache) for every forward pass of ``model``."""
    calls: list[tuple[int, bool]] = []

    def hook(module, args, kwargs) -> None:
        calls.append((args[0].size(1), kwargs.get("kv_cache") is not None))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_and_uncached_greedy_generation_agree(variant):
    model = model_of(variant)
    calls = record_calls(model)
    prompt = tokens(1, 5)
    cached = greedy(model, prompt, 20, use_cache=True)
    assert calls == [(5, True)] + [(1, True)] * 19  # prefill, then one token per step
    assert cached == greedy(model, prompt, 20, use_cache=False)
    assert len(set(cached[0])) > 1  # not a degenerate repetition that would hide errors


@pytest.mark.parametrize("static", [False, True], ids=["growing", "static"])
@pytest.mark.parametrize("attn_impl", ["sdpa", "reference"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_and_decode_logits_equal_full_forward(variant, attn_impl, static):
    model = model_of(variant, attn_impl=attn_impl)
    idx = tokens(2, 32)
    full, _ = model(idx)
    cache = model.new_kv_cache(static=static)
    # A prefill of 10, a chunk of 3 new queries against cached keys, then single tokens.
    pieces = [idx[:, :10], idx[:, 10:13]] + [idx[:, t : t + 1] for t in range(13, 32)]
    logits = [model(piece, kv_cache=cache)[0] for piece in pieces]
    assert cache.length == 32
    torch.testing.assert_close(torch.cat(logits, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["gpt2", "mistral"])
def test_batched_prompts_match_one_at_a_time(variant):
    model = model_of(variant)
    prompts = tokens(3, 6)
    together = greedy(model, prompts, 12, use_cache=True)
    alone = [greedy(model, prompts[i : i + 1], 12, use_cache=True)[0] for i in range(3)]
    assert together == alone


def test_reset_empties_the_cache_and_reuses_its_memory():
    model = model_of("llama")
    cache = model.new_kv_cache()
    idx = tokens(1, 12)
    first, _ = model(idx, kv_cache=cache)
    keys = cache.keys
    assert cache.length == 12 and keys.shape == (2, 1, 2, 32, 16)  # (L, B, K, max_len, D)
    cache.reset()
    assert cache.length == 0
    again, _ = model(idx, kv_cache=cache)
    assert cache.keys is keys
    torch.testing.assert_close(again, first)


@pytest.mark.parametrize("variant", ["gpt2", "llama", "mistral"])
def test_past_block_size_generation_continues_uncached_with_the_same_tokens(variant):
    model = model_of(variant)
    calls = record_calls(model)
    prompt = tokens(1, 20)
    cached = greedy(model, prompt, 30, use_cache=True)  # 50 tokens in all, block_size 32
    # Cached while prompt + output fit in 32 tokens; after that the last 32 are rerun.
    assert calls == [(20, True)] + [(1, True)] * 12 + [(32, False)] * 17
    assert cached == greedy(model, prompt, 30, use_cache=False)


def test_prompt_longer_than_block_size_runs_uncached():
    model = model_of("llama")
    calls = record_calls(model)
    prompt = tokens(1, 40)
    assert greedy(model, prompt, 3, use_cache=True) == greedy(model, prompt, 3, use_cache=False)
    assert calls[:3] == [(32, False)] * 3


def test_cache_limits_are_user_errors():
    model = model_of("gpt2")
    cache = model.new_kv_cache(max_len=16)
    model(tokens(2, 10), kv_cache=cache)
    with pytest.raises(UserError, match="after the 10 cached ones"):
        model(tokens(2, 7), kv_cache=cache)
    with pytest.raises(UserError, match="holds 2 sequences, not 1"):
        model(tokens(1, 1), kv_cache=cache)
    with pytest.raises(UserError, match="block_size=32"):
        KVCache(model.config, max_len=33)


def test_static_cache_attends_over_every_slot_with_fixed_shapes():
    model = model_of("llama")
    cache = model.new_kv_cache(max_len=20, static=True)
    seen = []
    attn = model.layers[0].self_attn
    update = cache.update

    def spy(layer, k, v):
        keys, values = update(layer, k, v)
        if layer == attn.layer_idx:
            seen.append(tuple(keys.shape))
        return keys, values

    cache.update = spy
    idx = tokens(1, 12)
    model(idx[:, :9], kv_cache=cache)
    for t in range(9, 12):
        model(idx[:, t : t + 1], kv_cache=cache)
    assert seen == [(1, 2, 20, 16)] * 4  # every call sees all 20 slots, written or not
    assert cache.length == 12 and int(cache.position) == 12
    cache.reset()
    assert int(cache.position) == 0


def compile_counting_graphs(model: GPT) -> list:
    """Compile the decode step with a backend that records each graph dynamo makes and runs it
    eagerly: tracing without inductor's C++ build, so it is fast."""
    torch._dynamo.reset()
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compile_decode(model, backend=backend)
    return graphs


@pytest.mark.parametrize("variant", ["llama", "mistral"])
def test_compiled_decode_is_one_graph_for_every_step_and_gives_the_same_tokens(variant):
    model = model_of(variant)
    prompt = tokens(2, 5)
    eager = greedy(model, prompt, 20, use_cache=True)
    graphs = compile_counting_graphs(model)
    calls = record_calls(model)
    assert greedy(model, prompt, 20, use_cache=True) == eager
    assert calls == [(5, True)] + [(1, True)] * 19
    assert len(graphs) == 1  # 19 decode steps, one graph: no step recompiled
    # The next turns of a chat: longer prompts, so longer caches. The same graph serves them
    # (with the first length fixed, the second compiled again).
    for n in (9, 30):
        longer = tokens(2, n)
        assert greedy(model, longer, 12, use_cache=True) == greedy(model_of(variant), longer, 12, True)
    assert len(graphs) == 1
    # A batch of another size compiles once more, then serves every length too.
    for n in (5, 9):
        batch = tokens(3, n)
        assert greedy(model, batch, 12, use_cache=True) == greedy(model_of(variant), batch, 12, True)
    assert len(graphs) == 2
    torch._dynamo.reset()


def assert_inductor_decode_matches_eager(model: GPT, prompt: torch.Tensor) -> None:
    """Compiled with inductor, ``model`` gives its eager greedy tokens, and logits within 1e-4
    (fused float steps round in their own order) on a prompt and 8 decode steps after it."""
    eager = greedy(model, prompt, 16, use_cache=True)
    eager_cache = model.new_kv_cache()
    with torch.no_grad():
        eager_logits = [model(prompt, kv_cache=eager_cache)[0]]
    torch._dynamo.reset()
    compile_decode(model)
    assert greedy(model, prompt, 16, use_cache=True) == eager
    cache = model.new_kv_cache()
    assert cache.static
    with torch.no_grad():  # the compiled step serves inference only
        logits = [model(prompt, kv_cache=cache)[0]]
        for t in eager[0][:8]:
            step = torch.tensor([[t]])
            eager_logits.append(model(step, kv_cache=eager_cache)[0])
            logits.append(model(step, kv_cache=cache)[0])
    torch.testing.assert_close(torch.cat(logits, 1), torch.cat(eager_logits, 1), rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_inductor_compiled_decode_matches_eager(variant):
    assert_inductor_decode_matches_eager(model_of(variant), tokens(1, 6))
