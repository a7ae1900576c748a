"""Batched generation (left padding + attention mask) and the engine's exact completions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from gptlab import device

from gptlab.inference import generate
from gptlab.inference.compiled_decode import compile_decode
from gptlab.inference.engine import Completion, Engine, SamplingParams
from gptlab.model import GPT, ModelConfig
from gptlab.tokenizers import CharTokenizer

CHARS = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz .,\n", special_tokens=["<|endoftext|>"])
SHAPE = {"block_size": 32, "n_layer": 2, "n_embd": 64, "n_head": 4}
VARIANTS = {
    "gpt2": ("gpt2", {}),  # learned positions, LayerNorm, GELU
    "llama": ("llama", {"n_kv_head": 2}),  # RoPE, RMSNorm, SwiGLU, grouped-query attention
    "mistral": ("mistral", {"n_kv_head": 1, "sliding_window": 8}),
}
PROMPTS = [[3, 1, 4], [1, 5, 9, 2, 6, 5, 3, 5, 8], [9], [7, 9, 3, 2, 3, 8]]


def model_of(variant: str, **overrides) -> GPT:
    family, options = VARIANTS[variant]
    torch.manual_seed(0)
    model = GPT(ModelConfig.for_family(family, vocab_size=CHARS.vocab_size, **SHAPE, **options, **overrides))
    # Larger random weights than init, so every output depends on positions and on which keys
    # are seen: a padding key attended to, or a position off by one, changes the tokens.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def engine_of(variant: str) -> Engine:
    model = model_of(variant)
    return Engine(SimpleNamespace(model=model, tokenizer=CHARS, config=model.config, path=".", tokenizer_config=None))


def run_stream(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[list[str], Completion]:
    pieces, stream = [], engine.stream(prompt, params)
    while True:
        try:
            pieces.append(next(stream))
        except StopIteration as done:
            return pieces, done.value


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    idx = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    return idx, torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])


@pytest.mark.parametrize("attn_impl", ["sdpa", "reference"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_batch_logits_equal_each_prompt_alone(variant, attn_impl):
    model = model_of(variant, attn_impl=attn_impl)
    idx, mask = left_pad(PROMPTS)
    cache = model.new_kv_cache()
    padded, _ = model(idx, attention_mask=mask, kv_cache=cache)  # (B, T, V)
    step, _ = model(torch.tensor([[1]] * len(PROMPTS)), attention_mask=torch.cat([mask, mask[:, -1:]], 1),
                    kv_cache=cache)  # one decode step with the padded cache
    for i, p in enumerate(PROMPTS):
        alone, _ = model(torch.tensor([p + [1]]))
        torch.testing.assert_close(padded[i, -len(p):], alone[0, :-1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(step[i, 0], alone[0, -1], rtol=1e-4, atol=1e-4)
    assert not padded.isnan().any()  # padding queries see themselves, so no 0/0 rows


@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_generation_cached_uncached_and_alone_agree(variant):
    model = model_of(variant)
    idx, mask = left_pad(PROMPTS)

    def greedy(ids: torch.Tensor, mask: torch.Tensor | None, use_cache: bool) -> list[list[int]]:
        steps = generate(model, ids, 24, temperature=0, use_cache=use_cache, attention_mask=mask)
        return torch.stack(list(steps), dim=1).tolist()

    # 9 + 24 tokens pass block_size 32: the last steps rerun a cropped, still padded window.
    cached = greedy(idx, mask, use_cache=True)
    assert cached == greedy(idx, mask, use_cache=False)
    assert cached == [greedy(torch.tensor([p]), None, use_cache=True)[0] for p in PROMPTS]
    assert len({tuple(row) for row in cached}) == len(PROMPTS)


@pytest.mark.parametrize("variant", ["llama", "mistral"])
def test_padded_generation_with_a_static_cache_and_a_traced_step_agrees(variant):
    model = model_of(variant)
    idx, mask = left_pad(PROMPTS)

    def greedy() -> list[list[int]]:
        return torch.stack(list(generate(model, idx, 16, temperature=0, attention_mask=mask)), dim=1).tolist()

    growing = greedy()
    torch._dynamo.reset()
    # dynamo's "eager" backend: the step traced into one graph (fullgraph) and run by torch
    # ops, which checks the static path's padding masks without a C++ build.
    compile_decode(model, backend="eager")
    assert model.new_kv_cache().static
    assert greedy() == growing
    torch._dynamo.reset()


@pytest.mark.slow
def test_engine_compile_gives_the_eager_answers():
    eager = engine_of("llama")
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    expected = eager.generate_batch(PROMPTS, params)
    torch._dynamo.reset()
    compiled = Engine(SimpleNamespace(model=model_of("llama"), tokenizer=CHARS, config=eager.model.config, path=".",
                                      tokenizer_config=None), compile=True)
    assert compiled.model.new_kv_cache().static  # compiled: its caches are static
    assert compiled.generate_batch(PROMPTS, params) == expected
    assert [run_stream(compiled, p, params)[1] for p in PROMPTS[:2]] == expected[:2]
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_generate_batch_equals_each_prompt_alone_and_stops_each_on_its_own(variant):
    engine = engine_of(variant)
    free = SamplingParams(temperature=0.0, max_new_tokens=12, repetition_penalty=1.3)
    outputs = [run_stream(engine, p, free)[1] for p in PROMPTS]
    assert engine.generate_batch(PROMPTS, free) == outputs
    assert {c.finish_reason for c in outputs} == {"length"}
    # An EOS taken from prompt 1's output and a stop string from prompt 0's, neither found
    # in prompt 3's: prompts 0 and 1 end early, 3 runs to max_new_tokens, and batched still
    # equals alone.
    last = outputs[3]
    n_eos = next(n for n in range(2, 12) if outputs[1].token_ids[n] not in last.token_ids)
    engine.eos_ids = {outputs[1].token_ids[n_eos]}
    stop = next(stop for n in range(2, 9) if (stop := outputs[0].text[n : n + 3]) not in last.text)
    params = SamplingParams(temperature=0.0, max_new_tokens=12, repetition_penalty=1.3, stop=(stop,))
    alone = [run_stream(engine, p, params)[1] for p in PROMPTS]
    assert engine.generate_batch(PROMPTS, params) == alone
    assert alone[1].finish_reason == "stop" and len(alone[1].token_ids) <= n_eos + 1
    assert alone[0].finish_reason == "stop" and stop not in alone[0].text and len(alone[0].token_ids) < 12
    assert outputs[0].text.startswith(alone[0].text)
    assert alone[3] == last


def test_stream_returns_exact_completion():
    engine = engine_of("llama")
    pieces, done = run_stream(engine, [1, 2, 3], SamplingParams(temperature=0.0, max_new_tokens=10))
    assert done.finish_reason == "length" and len(done.token_ids) == 10
    assert "".join(pieces) == done.text == CHARS.decode(done.token_ids)
    # A stop string's tokens were generated, so they count, but they are never shown.
    stop = done.text[4:6]
    pieces, stopped = run_stream(engine, [1, 2, 3], SamplingParams(temperature=0.0, max_new_tokens=10, stop=(stop,)))
    assert stopped.finish_reason == "stop" and "".join(pieces) == stopped.text == done.text[: done.text.index(stop)]
    assert stopped.token_ids == done.token_ids[: done.text.index(stop) + len(stop)]
    # EOS ends the answer with "stop"; it is counted and not shown.
    engine.eos_ids = {done.token_ids[3]}
    _, eos = run_stream(engine, [1, 2, 3], SamplingParams(temperature=0.0, max_new_tokens=10))
    assert eos.finish_reason == "stop" and eos.token_ids == done.token_ids[: done.token_ids.index(done.token_ids[3]) + 1]
    assert eos.text == CHARS.decode(eos.token_ids[:-1])


def test_a_model_that_reads_a_bos_gets_exactly_one_and_stops_at_its_turn_end():
    """Gemma's settings: add_bos_token with <bos>, and <end_of_turn> ending a turn besides <eos>."""
    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz .,\n", special_tokens=["<eos>", "<bos>", "<end_of_turn>"])
    bos = tok.token_id("<bos>")
    model = GPT(ModelConfig.for_family("llama", vocab_size=tok.vocab_size, **SHAPE)).eval()

    def engine(template: str | None = None, add_bos: bool = True) -> Engine:
        config = {"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": add_bos, "chat_template": template}
        ckpt = SimpleNamespace(model=model, tokenizer=tok, config=model.config, path=".", tokenizer_config=config)
        return Engine(ckpt)

    hi = [{"role": "user", "content": "hi"}]
    assert engine().encode_prompt("the cat") == [bos, *tok.encode("the cat")]
    assert engine(add_bos=False).encode_prompt("the cat") == tok.encode("the cat")
    plain = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert engine(plain).chat_prompt(hi, 4).ids == [bos, *tok.encode("hi")]
    # A template that writes the bos_token itself gets no second one.
    assert engine("{{ bos_token }}" + plain).chat_prompt(hi, 4).ids == [bos, *tok.encode("hi")]
    assert engine().eos_ids == {tok.token_id("<eos>"), tok.token_id("<end_of_turn>")}


def test_sample_cli_decodes_the_same_compiled_and_runs_quantized(engine, tmp_path, monkeypatch, capsys):
    from gptlab.cli import main
    from gptlab.weights.checkpoint import save_checkpoint

    path = tmp_path / "tiny"
    save_checkpoint(path, engine.model, engine.tokenizer)
    compiled = []

    def quick_compile(model, **options):  # dynamo's graph capture without inductor's C++ build: seconds
        compiled.append(model)
        compile_decode(model, backend="eager")

    monkeypatch.setattr("gptlab.inference.engine.compile_decode", quick_compile)
    base = ["sample", str(path), "--prompt", "User: hello", "--greedy", "--max-new-tokens", "12", "--device", "cpu"]
    outputs = []
    for extra in ([], ["--compile"], ["--quantize", "int8"]):
        assert main(base + extra) == 0
        outputs.append(capsys.readouterr().out)
    assert len(compiled) == 1 and compiled[0].new_kv_cache().static
    assert outputs[1] == outputs[0] and outputs[0].startswith("User: hello")
    assert outputs[2].startswith("User: hello") and len(outputs[2]) > len("User: hello\n")


@pytest.mark.dtype_rule  # it checks what auto picks on a CPU too
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bf16_decoding_stores_weights_in_bf16_and_keeps_the_position_tables_fp32(variant):
    plain, fp32 = model_of(variant), model_of(variant)
    bf16 = Engine(SimpleNamespace(model=model_of(variant), tokenizer=CHARS, config=plain.config, path=".",
                                  tokenizer_config=None), dtype="bf16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert all(b.dtype == torch.float32 for b in bf16.model.buffers() if b.is_floating_point())
    # auto on a CPU without bf16 instructions: fp32, the weights untouched
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(device, "cpu_has_fast_bf16", lambda: False)
        auto = Engine(SimpleNamespace(model=fp32, tokenizer=CHARS, config=plain.config, path=".",
                                      tokenizer_config=None), dtype="auto")
    assert {p.dtype for p in auto.model.parameters()} == {torch.float32}
    x = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        expected, got = plain(x)[0], bf16.model(x)[0]
    assert got.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa (a relative step of 0.4%); through 2 layers of these large
    # random weights the rounding adds up to 2-4% of the logits' size (1.7% gpt2, 3.6% llama)
    error = torch.linalg.vector_norm(got.float() - expected) / torch.linalg.vector_norm(expected)
    assert error < 0.06, error
    completion = run_stream(bf16, PROMPTS[0], SamplingParams(temperature=0.0, max_new_tokens=8))[1]
    assert len(completion.token_ids) == 8


@pytest.mark.dtype_rule
def test_auto_decodes_in_bf16_on_a_cpu_with_bf16_instructions_but_not_beside_int8(monkeypatch):
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)  # as on AVX-512 BF16 or AMX
    checkpoint = SimpleNamespace(model=model_of("llama"), tokenizer=CHARS, config=model_of("llama").config, path=".",
                                 tokenizer_config=None)
    assert {p.dtype for p in Engine(checkpoint, dtype="auto").model.parameters()} == {torch.bfloat16}
    checkpoint.model = model_of("llama")
    int8 = Engine(checkpoint, dtype="auto", quantize="int8").model
    assert {p.dtype for p in int8.parameters()} == {torch.float32}  # the embedding and norms around int8 layers
