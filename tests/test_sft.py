"""Instruction fine-tuning: reading chat data, the assistant mask, batches, and `gptlab finetune sft`."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gptlab.cli import main
from gptlab.config import finetune_config
from gptlab.errors import UserError
from gptlab.finetune import sft
from gptlab.inference.engine import Engine, SamplingParams
from gptlab.model.config import ModelConfig
from gptlab.model.lora import LoRAConfig
from gptlab.model.transformer import GPT
from gptlab.tokenizers import BPETokenizer, CharTokenizer
from gptlab.tokenizers.chat_template import BUILTIN_TEMPLATE, chat_format
from gptlab.weights import checkpoint as ckpt
from gptlab.weights.load import load_checkpoint

CHATML = (  # SmolLM2's template: a default system prompt when none is given
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "4 + 4 = 8."},
]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    text = "What is 2 + 3? And 4 + 4? Be brief. system user assistant helpful AI " * 20
    return BPETokenizer.train(text, vocab_size=300, special_tokens=SPECIALS)


def masked_text(tokenizer, example: sft.Example, bit: int) -> list[str]:
    """The runs of tokens whose mask is ``bit``, decoded."""
    runs, current = [], []
    for i, m in zip(example.ids, example.mask):
        if m == bit:
            current.append(i)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


@pytest.mark.parametrize("template, answers", [
    (CHATML, ["2 + 3 = 5.<|im_end|>\n", "4 + 4 = 8.<|im_end|>\n"]),
    (LLAMA3, ["2 + 3 = 5.<|eot_id|>", "4 + 4 = 8.<|eot_id|>"]),
    (BUILTIN_TEMPLATE, [" 2 + 3 = 5.\n", " 4 + 4 = 8.\n"]),
])
def test_mask_is_exactly_the_assistant_answers(bpe, template, answers):
    variables = {"bos_token": "<|begin_of_text|>", "eos_token": "<|endoftext|>"}
    ex = sft.render_example(CONVERSATION, bpe, template, variables)
    assert len(ex.ids) == len(ex.mask)
    assert masked_text(bpe, ex, 1) == answers
    # Everything else is the prompt, exactly as the template renders it for generation.
    from gptlab.tokenizers.chat_template import render_chat

    whole = render_chat(template, CONVERSATION, **variables)
    assert bpe.decode(ex.ids) == whole
    prompt = render_chat(template, CONVERSATION[:3], add_generation_prompt=True, **variables)
    first_prompt_ids = bpe.encode(render_chat(template, CONVERSATION[:1 + 1], add_generation_prompt=True,
                                              **variables), allowed_special="all")
    assert ex.ids[:len(first_prompt_ids)] == first_prompt_ids and not any(ex.mask[:len(first_prompt_ids)])
    assert bpe.decode([i for i, m in zip(ex.ids, ex.mask) if m == 0]).startswith(prompt[:20])


def test_template_that_rewrites_earlier_turns_is_refused(bpe):
    # Shows only the latest assistant turn, as some reasoning templates do with their thoughts.
    rewriting = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['role'] }}: "
                 "{{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    with pytest.raises(UserError, match="rewrites earlier turns"):
        sft.render_example(CONVERSATION, bpe, rewriting)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.mark.parametrize("add_bos, template", [
    (True, None), (True, "{{ bos_token }}" + BUILTIN_TEMPLATE), (False, None)])
def test_sft_trains_on_the_prompt_the_engine_sends_bos_included(add_bos, template):
    """A model that reads a BOS (Gemma's add_bos_token) gets exactly one in front of what it is
    fine-tuned on, as the engine puts one in front of its chat prompts: the first answer is
    trained after the very ids ``gptlab chat`` would prompt it with."""
    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.:?!\n", special_tokens=["<bos>"])
    model = GPT(ModelConfig.for_family("llama", vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1,
                                       n_embd=16, block_size=128))
    config = {"bos_token": "<bos>", "eos_token": "", "add_bos_token": add_bos, "chat_template": template}
    checkpoint = SimpleNamespace(model=model, tokenizer=tok, config=model.config, path=".", tokenizer_config=config)
    convo = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "how are you?"}, {"role": "assistant", "content": "Fine."}]
    example = sft.render_for(checkpoint, [convo], 128).examples[0]
    prompt = Engine(checkpoint).chat_prompt(convo[:1], 8).ids
    assert example.ids[:len(prompt)] == prompt and not any(example.mask[:len(prompt)])
    assert example.ids.count(tok.token_id("<bos>")) == (1 if add_bos or template else 0)
    assert masked_text(tok, example, 1) == [" Hello.\n", " Fine.\n"]


def test_reads_chat_jsonl_and_alpaca(tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    assert sft.read_conversations(chat) == [CONVERSATION]
    alpaca = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
              {"instruction": "Say hi.", "output": "Hi!"}]
    expected = [[{"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"}],
                [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]]
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca))
    assert sft.read_conversations(tmp_path / "alpaca.json") == expected
    assert sft.read_conversations(write_jsonl(tmp_path / "alpaca.jsonl", alpaca)) == expected


@pytest.mark.parametrize("bad, message", [
    ('{"messages": [{"role": "user", "content": "hi"}', r"bad\.jsonl:2: not valid JSON"),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     r"bad\.jsonl:2: message 1 has unknown role 'robot'"),
    ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "hi"}]},
     r"bad\.jsonl:2: message 1 is 'assistant' but 'user' was expected"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
     r"bad\.jsonl:2: message 2 is an empty assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"bad\.jsonl:2: the conversation must end with an assistant"),
    ({"messages": []}, r"bad\.jsonl:2: 'messages' must be a non-empty list"),
    ({"text": "hi"}, r"bad\.jsonl:2: expected a chat record"),
    ([1, 2], r"bad\.jsonl:2: expected a JSON object"),
])
def test_bad_records_name_file_and_line(tmp_path, bad, message):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CONVERSATION}, bad])
    with pytest.raises(UserError, match=message):
        sft.read_conversations(f)


def test_long_conversations_are_cut_or_dropped_and_counted():
    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz :?.\nUSA")
    convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}],
             [{"role": "user", "content": "a" * 30}, {"role": "assistant", "content": "ok"}],  # prompt fills it
             [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b" * 40}]]  # answer cut
    report = sft.render_all(convs, tok, BUILTIN_TEMPLATE, {}, max_length=24)
    assert (report.truncated, report.dropped, len(report.examples)) == (2, 1, 2)
    assert all(len(e.ids) <= 24 for e in report.examples)


def test_collate_targets_only_answers_and_never_padding():
    a = sft.Example([1, 2, 3, 4, 5], [0, 0, 1, 1, 0])
    b = sft.Example([6, 7, 8], [0, 1, 1])
    x, y = sft.collate([a, b], pad_id=0)
    assert x.tolist() == [[1, 2, 3, 4], [6, 7, 0, 0]]
    assert y.tolist() == [[-100, 3, 4, -100], [7, 8, -100, -100]]


def test_length_grouped_batches_pad_little_and_resume_exactly():
    examples = [sft.Example(list(range(n)), [1] * n) for n in torch.randint(3, 60, (200,)).tolist()]
    batches = sft.LengthGroupedBatches(examples, batch_size=8, seed=0)
    padded = sum((x == 0).sum().item() - 1 * x.size(0) for x, _ in (batches.next() for _ in range(25)))
    random_order = sum(max(len(e.ids) for e in examples[i:i + 8]) * 8 - sum(len(e.ids) for e in examples[i:i + 8])
                       for i in range(0, 200, 8))
    assert padded < random_order / 4  # grouping by length removes most of the padding
    for _ in range(7):  # into the second epoch
        batches.next()
    state = batches.state_dict()
    expected = [batches.next() for _ in range(30)]
    again = sft.LengthGroupedBatches(examples, batch_size=8, seed=0)
    again.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, (again.next() for _ in range(30))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


# --- end to end -------------------------------------------------------------------------------

QA = [(f"What is {a} + {b}?", f"{a} + {b} = {a + b}.") for a in range(1, 6) for b in range(1, 5)]


@pytest.fixture
def base_model(tmp_path) -> Path:
    """A small untrained char-level GPT saved as a checkpoint."""
    tok = CharTokenizer.train("".join(q + a for q, a in QA) + "UserAssistantSystem:\n ", special_tokens=["<|endoftext|>"])
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    ckpt.save_checkpoint(tmp_path / "base", model, tok)
    return tmp_path / "base"


@pytest.fixture
def qa_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "qa.jsonl", [{"messages": [{"role": "user", "content": q},
                                                               {"role": "assistant", "content": a}]} for q, a in QA])


def answer_loss(model_path, qa_file) -> float:
    return sft.answer_loss(load_checkpoint(model_path), sft.read_conversations(qa_file))


def test_sft_drives_the_answer_loss_down_and_leaves_a_normal_checkpoint(base_model, qa_file, tmp_path):
    before = answer_loss(base_model, qa_file)
    cfg = finetune_config("sft", {"max_steps": 60, "lr": 3e-3, "eval_interval": 30, "batch_size": 8, "device": "cpu"})
    result = sft.run_sft(str(base_model), str(qa_file), tmp_path / "run", cfg, sft.SFTOptions(val_fraction=0.2),
                         show_progress=False)
    after = answer_loss(tmp_path / "run", qa_file)
    assert after < before * 0.5, (before, after)
    assert result.best_val_loss is not None and result.step == 60
    assert "->" in result.sample  # the held-out question and the model's answer
    # A normal checkpoint: the engine and `gptlab sample` take it.
    engine = Engine(load_checkpoint(tmp_path / "run"))
    text = "".join(engine.stream(engine.chat_prompt([{"role": "user", "content": "What is 1 + 1?"}], 16).ids,
                                 SamplingParams(temperature=0.0, max_new_tokens=16)))
    assert isinstance(text, str)
    assert main(["sample", str(tmp_path / "run"), "--prompt", "User:", "--max-new-tokens", "5"]) == 0


def test_sft_keeps_the_chat_template_of_the_base(base_model, qa_file, tmp_path):
    (base_model / "tokenizer_config.json").write_text(json.dumps({"chat_template": BUILTIN_TEMPLATE.replace(
        "Assistant:", "Assistant: "), "eos_token": "<|endoftext|>"}))
    cfg = finetune_config("sft", {"max_steps": 2, "eval_interval": 2, "device": "cpu"})
    sft.run_sft(str(base_model), str(qa_file), tmp_path / "run", cfg, show_progress=False)
    saved = json.loads((tmp_path / "run" / "best" / "tokenizer_config.json").read_text())
    assert saved["chat_template"].endswith("Assistant: {% endif %}")


def test_cli_finetune_sft_and_its_errors(base_model, qa_file, tmp_path, capsys):
    out = tmp_path / "cli-run"
    args = ["finetune", "sft", str(base_model), "--data", str(qa_file), "--out", str(out), "--max-steps", "4",
            "--eval-interval", "2", "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    assert "try: gptlab chat" in capsys.readouterr().out
    assert main(args) == 1  # the run exists: not replaced without --force
    assert "already holds a run" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    assert main(["finetune", "sft", str(base_model), "--data", str(bad), "--out", str(tmp_path / "o2")]) == 1
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_lora_run_saves_adapters_that_load_merge_and_export(base_model, qa_file, tmp_path, capsys):
    from gptlab.weights.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, apply_adapter

    run = tmp_path / "lora-run"
    assert main(["finetune", "lora", str(base_model), "--data", str(qa_file), "--out", str(run), "--max-steps", "30",
                 "--eval-interval", "15", "--lora-targets", "all-linear", "--lora-rank", "4", "--no-progress",
                 "--device", "cpu", "--lr", "1e-2"]) == 0
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS} <= {p.name for p in (run / "best").iterdir()}
    assert not (run / "best" / ckpt.WEIGHTS).exists()  # only the adapters, not a copy of the base
    assert answer_loss(run, qa_file) < answer_loss(base_model, qa_file)
    # Loading the run gives the base with the adapter merged in: the same logits as applying it.
    merged = load_checkpoint(run)
    base = load_checkpoint(base_model)
    apply_adapter(base.model, run / "best")
    x = torch.randint(0, base.config.vocab_size, (2, 20))
    torch.testing.assert_close(merged.model.eval()(x)[0], base.model.eval()(x)[0])
    # `gptlab merge` writes an ordinary checkpoint, which exports to Hugging Face format.
    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    torch.testing.assert_close(load_checkpoint(tmp_path / "merged").model.eval()(x)[0], merged.model(x)[0])
    assert main(["export", str(tmp_path / "merged"), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert main(["merge", str(base_model), "--out", str(tmp_path / "m2")]) == 1
    assert "holds no LoRA adapter" in capsys.readouterr().err


def test_adapter_refuses_a_changed_base(base_model, qa_file, tmp_path, capsys):
    run = tmp_path / "lora-run"
    assert main(["finetune", "lora", str(base_model), "--data", str(qa_file), "--out", str(run), "--max-steps", "2",
                 "--eval-interval", "2", "--no-progress", "--device", "cpu"]) == 0
    changed = load_checkpoint(base_model)
    with torch.no_grad():
        changed.model.layers[0].mlp.up_proj.weight.add_(0.1)
    ckpt.save_checkpoint(base_model, changed.model, changed.tokenizer)
    assert main(["sample", str(run), "--prompt", "User:"]) == 1
    assert "whose weights differ" in capsys.readouterr().err


@pytest.mark.slow
def test_lora_on_smollm2_learns_a_persona_answer(tmp_path):
    """The imported chat model, its own ChatML template and special tokens, LoRA and the engine."""
    smol = load_checkpoint("smollm2-135m-instruct")
    template, variables = chat_format(smol)
    convo = [{"role": "user", "content": "What is your name?"}, {"role": "assistant", "content": "I am Quill."}]
    ex = sft.render_example(convo, smol.tokenizer, template, variables)
    assert masked_text(smol.tokenizer, ex, 1) == ["I am Quill.<|im_end|>\n"]
    data = write_jsonl(tmp_path / "persona.jsonl", [{"messages": convo}] * 8)
    before = sft.answer_loss(smol, [convo])
    cfg = finetune_config("lora", {"max_steps": 8, "eval_interval": 8, "batch_size": 4, "lr": 3e-3, "device": "cpu"})
    options = sft.SFTOptions(val_data=str(data), lora=LoRAConfig(targets="all-linear"))
    sft.run_sft("smollm2-135m-instruct", str(data), tmp_path / "run", cfg, options, show_progress=False)
    tuned = load_checkpoint(tmp_path / "run")
    assert sft.answer_loss(tuned, [convo]) < before / 2
    engine = Engine(tuned)
    ids = engine.chat_prompt(convo[:1], 16).ids
    assert "Quill" in "".join(engine.stream(ids, SamplingParams(temperature=0.0, max_new_tokens=16)))


def test_a_line_separator_inside_a_message_does_not_split_the_record(tmp_path):
    convo = [{"role": "user", "content": "one\u2028two"}, {"role": "assistant", "content": "three\u2029four"}]
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": convo}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert sft.read_conversations(f) == [convo]
