"""Chat templates render as transformers renders them, inside a sandbox."""

from __future__ import annotations

import warnings

import pytest

from gptlab.errors import UserError
from gptlab.tokenizers.chat_template import chat_config, render_chat

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


def test_chatml_by_hand():
    text = render_chat(CHATML, CONVERSATION[:2], add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert not render_chat(CHATML, CONVERSATION[:1]).endswith("assistant\n")


def test_matches_transformers_apply_chat_template():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=hf, chat_template=CHATML, eos_token="<|im_end|>")
    for gen in (False, True):
        expected = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=gen)
        assert render_chat(CHATML, CONVERSATION, add_generation_prompt=gen) == expected


@pytest.mark.parametrize("template, message", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "sandbox forbids"),
    ("{% set _ = messages.append({'role': 'x'}) %}", "sandbox forbids"),
    ("{{ raise_exception('only user and assistant roles') }}", "only user and assistant roles"),
    ("{% for m in messages %}", "not valid Jinja"),
])
def test_unsafe_or_broken_templates_fail_cleanly(template, message):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(UserError, match=message):
        render_chat(template, messages)
    assert messages == [{"role": "user", "content": "hi"}]


def test_turn_end_tokens_put_the_eos_token_first():
    from types import SimpleNamespace

    from gptlab.tokenizers import CharTokenizer
    from gptlab.tokenizers.chat_template import turn_end_tokens

    tok = CharTokenizer.train("ab", special_tokens=["<|im_end|>", "<end_of_turn>", "<eos>", "<|endoftext|>"])
    checkpoint = SimpleNamespace(tokenizer=tok, path=".", tokenizer_config={"eos_token": "<eos>"})
    assert turn_end_tokens(checkpoint) == ["<eos>", "<|endoftext|>", "<|im_end|>", "<end_of_turn>"]
    checkpoint.tokenizer_config = {"eos_token": "<|im_end|>"}  # named once, though also a common turn end
    assert turn_end_tokens(checkpoint) == ["<|im_end|>", "<|endoftext|>", "<end_of_turn>"]


def test_chat_config_reads_token_objects(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "x", "eos_token": {"content": "</s>"}}')
    assert chat_config(tmp_path) == {"chat_template": "x", "eos_token": "</s>"}
    assert chat_config(tmp_path / "nowhere") == {}


@pytest.mark.slow
def test_smollm2_template_and_ids_match_transformers():
    """The real SmolLM2-135M-Instruct template from its GGUF file, rendered and tokenized."""
    transformers = pytest.importorskip("transformers")
    from gptlab.weights.gguf import import_gguf
    from gptlab.weights.named import resolve_named

    path = resolve_named("smollm2-135m-instruct")
    ckpt = import_gguf(path)
    cfg = chat_config(ckpt.tokenizer_config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for gen in (False, True):
        ours = render_chat(cfg["chat_template"], CONVERSATION, add_generation_prompt=gen,
                           bos_token=cfg.get("bos_token", ""), eos_token=cfg.get("eos_token", ""))
        assert ours == ref.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=gen)
        ids = ref.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=gen)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert ckpt.tokenizer.encode(ours, allowed_special="all") == list(ids)
