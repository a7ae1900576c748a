"""The engine (stops, EOS, UTF-8-safe streaming, context trimming) and `gptlab chat`."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gptlab.errors import UserError
from gptlab.inference.chat import ChatSession, run_chat
from gptlab.inference.engine import Engine, SamplingParams
from gptlab.tokenizers import BPETokenizer, CharTokenizer
from gptlab.tokenizers.chat_template import BUILTIN_TEMPLATE


class ScriptedModel(nn.Module):
    """Always predicts the next token of ``script``: it finds how much of the script already
    ends its input and continues from there (so it works after any prompt)."""

    def __init__(self, script: list[int], vocab_size: int, block_size: int = 256):
        super().__init__()
        self.script, self.vocab_size = script, vocab_size
        self.config = SimpleNamespace(block_size=block_size)

    def forward(self, idx, targets=None):
        tail = idx[0].tolist()
        done = max(n for n in range(min(len(tail), len(self.script)) + 1) if n == 0 or tail[-n:] == self.script[:n])
        logits = torch.zeros(idx.size(0), idx.size(1), self.vocab_size)
        logits[:, -1, self.script[min(done, len(self.script) - 1)]] = 10.0
        return logits, None


def engine_for(tokenizer, script_text_or_ids, tmp_path=None, block_size=256):
    script = (tokenizer.encode(script_text_or_ids, allowed_special="all")
              if isinstance(script_text_or_ids, str) else script_text_or_ids)
    model = ScriptedModel(script, tokenizer.vocab_size, block_size)
    ckpt = SimpleNamespace(model=model, tokenizer=tokenizer, config=model.config, path=tmp_path or ".",
                           tokenizer_config=None)
    return Engine(ckpt)


CHARS = CharTokenizer.train("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ :.,!?\n",
                            special_tokens=["<|endoftext|>"])


def stream(engine, **kw):
    return list(engine.stream([0], SamplingParams(temperature=0.0, **kw)))


def test_stop_string_is_never_shown_even_in_part():
    e = engine_for(CHARS, "hello ENDworld" + "x" * 20)
    pieces = stream(e, stop=("END",), max_new_tokens=30)
    assert "".join(pieces) == "hello " and not any("E" in p for p in pieces)


def test_text_held_back_for_a_possible_stop_is_released():
    e = engine_for(CHARS, "an ENigma")
    assert "".join(stream(e, stop=("END",), max_new_tokens=8)) == "an ENigma"[:8]


def test_eos_and_max_new_tokens():
    e = engine_for(CHARS, "Hi there<|endoftext|>never")
    assert "".join(stream(e, max_new_tokens=50)) == "Hi there"
    assert "".join(stream(e, max_new_tokens=3)) == "Hi "


def test_streaming_never_splits_a_character():
    tok = BPETokenizer.train("plain ascii text only", vocab_size=256)
    emoji = list("😀é".encode())  # single-byte tokens: ids 0..255 are the bytes themselves
    e = engine_for(tok, emoji)
    pieces = stream(e, max_new_tokens=len(emoji))
    assert "".join(pieces) == "😀é" and all("\ufffd" not in p for p in pieces)


def test_seed_makes_sampling_reproducible(tmp_path, monkeypatch):
    from gptlab.config import resolve_config
    from gptlab.train.loop import train
    from gptlab.weights.load import load_checkpoint

    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "c.txt").write_text("User: hello\nAssistant: hi there\n" * 300)
    model_cfg, cfg = resolve_config("tiny", train_overrides={"corpus": str(tmp_path / "c.txt"), "max_steps": 3,
                                                             "warmup_steps": 1})
    train(model_cfg, cfg, tmp_path / "run", show_progress=False)
    e = Engine(load_checkpoint(tmp_path / "run"))
    assert e.template == BUILTIN_TEMPLATE and "\nUser:" in e.default_stops
    runs = ["".join(e.stream([1, 2, 3], SamplingParams(temperature=1.0, seed=s, max_new_tokens=20))) for s in (5, 5, 6)]
    assert runs[0] == runs[1] != runs[2]

    # The whole REPL on the from-scratch model, fed from a pipe.
    out = io.StringIO()
    run_chat(str(tmp_path / "run"), params=SamplingParams(max_new_tokens=10, seed=1),
             stdin=io.StringIO("hello\n/temp 0\nhi again\n/quit\nnot read\n"), out=out)
    text = out.getvalue()
    assert text.count("assistant> ") == 2 and "[temperature 0]" in text


class UniformModel(nn.Module):
    """Every letter equally likely after any input (no EOS, no newline): each reply is the draws."""

    def __init__(self, tokenizer):
        super().__init__()
        self.config = SimpleNamespace(block_size=256)
        self.bias = torch.zeros(tokenizer.vocab_size)
        self.bias[[tokenizer.special_tokens["<|endoftext|>"], *tokenizer.encode("\n")]] = float("-inf")

    def forward(self, idx, targets=None):
        return self.bias.expand(idx.size(0), idx.size(1), -1), None


def test_a_seeded_conversation_draws_on_across_turns_and_replays_exactly():
    def conversation():
        model = UniformModel(CHARS)
        engine = Engine(SimpleNamespace(model=model, tokenizer=CHARS, config=model.config, path=".",
                                        tokenizer_config=None))
        session = ChatSession(engine, SamplingParams(temperature=1.0, max_new_tokens=12, seed=3))
        first = session.answer("hello", io.StringIO())
        session.command("/reset", io.StringIO())
        return first, session.answer("hello", io.StringIO())

    replies = conversation()
    assert conversation() == replies  # the seed replays the whole session
    # The same question again: new draws, not the first turn's once more (each answer seeded
    # afresh made a small model give one reply turn after turn).
    assert replies[0] != replies[1]


def test_oldest_turns_are_dropped_to_fit_and_the_user_is_told():
    e = engine_for(CHARS, "ok!<|endoftext|>", block_size=120)
    session = ChatSession(e, SamplingParams(temperature=0.0, max_new_tokens=10), system="Be brief.")
    out = io.StringIO()
    for question in ("first question here", "second question here", "third question here"):
        session.answer(question, out)
    assert "left out" in out.getvalue()
    assert session.messages()[0] == {"role": "system", "content": "Be brief."}
    assert session.history[-1] == {"role": "assistant", "content": "ok!"}
    assert len(e.chat_prompt(session.messages(), 10).ids) <= 110
    with pytest.raises(UserError, match="shorten it"):
        e.chat_prompt([{"role": "user", "content": "x" * 500}], 10)


def test_the_fewest_turns_are_dropped_with_few_renders(monkeypatch):
    from gptlab.inference import engine as engine_module

    e = engine_for(CHARS, "ok!<|endoftext|>", block_size=120)
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(40):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": "turn " + "abcdefghij"[i % 10] + "ab" * (i % 5)})
    renders = []
    real_render = engine_module.render_chat
    monkeypatch.setattr(engine_module, "render_chat", lambda *a, **k: renders.append(1) or real_render(*a, **k))
    prompt = e.chat_prompt(messages, 10)
    assert len(renders) <= 2 + 6  # all, the last alone, then bisection over 39 (not 40 renders)

    def length(dropped: int) -> int:
        text = real_render(e.template, messages[:1] + messages[1 + dropped:], add_generation_prompt=True,
                           **e.template_vars)
        return len(e.tokenizer.encode(text, allowed_special="all"))

    budget = 120 - 10
    fewest = next(d for d in range(40) if length(d) <= budget)  # the one-by-one rule
    assert prompt.dropped_turns == fewest > 0 and len(prompt.ids) == length(fewest) <= budget


def test_commands():
    session = ChatSession(engine_for(CHARS, "fine<|endoftext|>"), SamplingParams())
    out = io.StringIO()
    session.answer("hello", out)
    assert session.command("/temp 0.2", out) and session.params.temperature == 0.2
    assert session.command("/temp hot", out) and "needs a number" in out.getvalue()
    assert session.command("/system You are terse.", out) and session.history == []
    assert session.messages() == [{"role": "system", "content": "You are terse."}]
    session.answer("hi", out)
    assert session.command("/reset", out) and session.history == [] and session.system == "You are terse."
    assert session.command("/nope", out) and "unknown command" in out.getvalue()
    assert session.command("/help", out) and "/system TEXT" in out.getvalue()
    assert session.command("/quit", out) is False


def test_ctrl_c_stops_the_answer_not_the_session(monkeypatch):
    session = ChatSession(engine_for(CHARS, "long answer"), SamplingParams())

    def interrupted(prompt_ids, params, generator=None):
        yield "partial"
        raise KeyboardInterrupt

    monkeypatch.setattr(session.engine, "stream", interrupted)
    out = io.StringIO()
    assert session.answer("go", out) == "partial"
    assert "[stopped]" in out.getvalue() and session.history[-1]["content"] == "partial"


@pytest.mark.slow
def test_smollm2_chat_answers_from_history():
    out = io.StringIO()
    run_chat(None, params=SamplingParams(temperature=0.0, max_new_tokens=30),
             stdin=io.StringIO("What is the capital of France?\nAnd of Italy?\n"), out=out)
    first, second = out.getvalue().split("assistant> ")[1:3]
    assert "Paris" in first and "Rome" in second
