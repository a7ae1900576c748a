"""The real Gemma 3 270M (the named model ``gemma3-270m``, a Q4_K_M GGUF of 253 MB) against
transformers' own reading of the same file, and the commands a user runs with it. Slow: the
model has 268M parameters, 170M of them its 262,144-token embedding. Its tokenizer is checked
against transformers in tests/test_sentencepiece.py."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from gptlab.cli import main  # noqa: E402
from gptlab.tokenizers.chat_template import bos_id  # noqa: E402
from gptlab.weights.gguf import import_gguf  # noqa: E402
from gptlab.weights.named import resolve_named  # noqa: E402

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def moby_dick() -> str:
    from gptlab.data.sources import load_corpus

    return load_corpus("moby-dick").text


@pytest.fixture(scope="module")
def gemma():
    """Ours, and transformers' Gemma3ForCausalLM filled by its GGUF reader (dequantised to
    float32; ``load_gguf_checkpoint`` needs no accelerate, unlike ``from_pretrained``)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = resolve_named("gemma3-270m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        config._attn_implementation = "eager"
        ref = transformers.Gemma3ForCausalLM(config).float().eval()
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=ref)["tensors"]
        assert ref.load_state_dict(tensors, strict=False).missing_keys == ["lm_head.weight"]  # tied
    return import_gguf(path), ref


def greedy(step, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, step(x)[:, -1:].argmax(-1)], dim=1)
    return x[0, len(ids):].tolist()


def test_the_file_reads_as_the_model_llamacpp_runs(gemma):
    ours, ref = gemma
    cfg = ours.config
    assert (cfg.arch, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.vocab_size) == (
        "gemma3", 18, 640, 4, 1, 256, 262_144)
    assert (cfg.sliding_window, cfg.layer_pattern, cfg.rope_theta, cfg.rope_local_theta) == (512, "LLLLLG", 1e6, 1e4)
    assert cfg.query_pre_attn_scalar == ref.config.query_pre_attn_scalar == 256 and cfg.tie_embeddings
    assert [{"L": "sliding_attention", "G": "full_attention"}[cfg.layer_pattern[i % 6]] for i in range(18)] == (
        ref.config.layer_types)
    assert ours.model.num_parameters() == 268_098_176
    assert ours.tokenizer.decode([bos_id(ours)]) == "<bos>"  # add_bos_token: read before every text


def test_logits_and_greedy_tokens_equal_transformers(gemma, moby_dick):
    """On 600 tokens of prose, more than the 512-token window, so local and global layers see
    different keys. (On text that repeats one sentence twenty times, transformers' own eager and
    SDPA attention differ by 0.03 at a position where the model is near a tie: there no two
    float32 computations agree to 1e-4. On prose they agree to 6e-5, as do we.)"""
    ours, ref = gemma
    bos = bos_id(ours)
    x = torch.tensor([[bos, *ours.tokenizer.encode(moby_dick[5000:12000])][:600]])
    assert x.shape[1] == 600
    with torch.no_grad():
        diff = (ours.model(x)[0] - ref(x).logits).abs().max().item()
    print(f"max |logit diff| vs transformers on 600 tokens: {diff:.2e}")
    assert diff <= 1e-4
    prompt = [bos, *ours.tokenizer.encode(PROMPT)]
    ours_ids = greedy(lambda t: ours.model(t)[0], prompt, 32)
    assert ours_ids == greedy(lambda t: ref(t).logits, prompt, 32)
    print(f"{PROMPT}{ours.tokenizer.decode(ours_ids)!r}")


def test_sample_continues_the_prompt_as_the_model_does(gemma, capsys):
    """The command reads the prompt after <bos>, as the model was trained (without it, the model
    continues PROMPT with " France. The The The ..."), and writes its greedy continuation,
    which names Paris when asked."""
    ours, _ = gemma
    assert main(["sample", "gemma3-270m", "--prompt", PROMPT, "--greedy", "--max-new-tokens", "32"]) == 0
    out = capsys.readouterr().out
    expected = greedy(lambda t: ours.model(t)[0], [bos_id(ours), *ours.tokenizer.encode(PROMPT)], 32)
    assert out == PROMPT + ours.tokenizer.decode(expected) + "\n"
    question = "Question: What is the capital of France?\nAnswer:"
    assert main(["sample", "gemma3-270m", "--prompt", question, "--greedy", "--max-new-tokens", "8"]) == 0
    answer = capsys.readouterr().out
    assert answer.startswith(question + " Paris")
    print(out, answer, sep="\n")


def test_eval_reads_every_window_after_a_bos(gemma, moby_dick, capsys):
    """``gptlab eval gemma3-270m --corpus moby-dick``, its first window (2,048 tokens: the default
    for a vocabulary this large); the same window without <bos> costs about 15% more bits."""
    from gptlab.inference.eval_scoring import Scorer
    from gptlab.inference.eval_text import evaluate_text

    assert main(["eval", "gemma3-270m", "--corpus", "moby-dick", "--limit", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    print(report)
    assert (report["window"], report["stride"], report["windows"], report["predicted"]) == (2048, 2047, 1, 2048)
    assert 1.0 < report["bits_per_byte"] < 1.6
    ours = gemma[0]
    without = evaluate_text(Scorer(ours.model, torch.device("cpu"), progress=False), ours.tokenizer, moby_dick,
                            "moby-dick", window=2048, limit=1)
    print(f"bits per byte of the first window: {report['bits_per_byte']:.4f} after <bos>, "
          f"{without.bits_per_byte:.4f} without")
    assert without.bits_per_byte > 1.1 * report["bits_per_byte"]


def test_exports_as_a_directory_transformers_loads(gemma, moby_dick, tmp_path):
    """``gptlab export gemma3-270m --format hf``: its tokenizer.json (converted from the GGUF's
    SentencePiece vocabulary) gives our ids in transformers, and its weights our logits."""
    ours, _ = gemma
    assert main(["export", "gemma3-270m", "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    text = moby_dick[20000:26000] + "\n\n  naïve café — 東京 😀 3.14159\t\ttabs    spaces\n"
    ids = ours.tokenizer.encode(text)
    assert tok.encode(text, add_special_tokens=False) == ids
    assert tok.decode(ids) == text
    x = torch.tensor([[bos_id(ours), *ids[:200]]])
    with torch.no_grad():
        diff = (ours.model(x)[0] - model(x).logits).abs().max().item()
    assert diff <= 1e-4, diff
