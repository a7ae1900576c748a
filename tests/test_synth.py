"""Synthetic chat data (gptlab.data.synth_chat): correct answers, a fixed held-out split, the
file and text formats; and the exact-match evaluator (gptlab.inference.exact_match)."""

from __future__ import annotations

import calendar
import json
import operator
import random
import re
from collections import Counter
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gptlab.data import synth_chat as synth
from gptlab.errors import UserError
from gptlab.inference import exact_match
from gptlab.model.config import ModelConfig
from gptlab.model.transformer import GPT
from gptlab.tokenizers import CharTokenizer
from gptlab.weights.checkpoint import save_checkpoint

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
#: sizes in a base unit per dimension (months for year/month), so a conversion is checked by
#: comparing the two amounts in that base, not by the factor table the generator uses
UNIT_SIZE = {"kilometer": 1000, "meter": 1, "centimeter": 0.01, "millimeter": 0.001, "kilogram": 1000, "gram": 1,
             "liter": 1000, "milliliter": 1, "week": 7 * 86400,
             "day": 86400, "hour": 3600, "minute": 60, "second": 1, "year": 12, "month": 1}
WEEKDAYS, MONTHS = list(calendar.day_name), list(calendar.month_name)[1:]


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def _unit(name: str) -> str:
    return name[:-1] if name.endswith("s") else name


def core(question: str, kind: str) -> str:
    """The normalised question without the parts ``synth.dress`` may add (an opening, " please")."""
    q = synth.normalise(question)
    for opening in synth.GREETING_OPENINGS if kind == "greeting" else synth.OPENINGS:
        if q.startswith(synth.normalise(opening) + " "):
            q = q[len(synth.normalise(opening)) + 1:]
            break
    return q.removesuffix(" please")


def check_exchange(q: str, a: str) -> str:
    """Recompute the answer to ``q`` without the generator's code and return the kind.

    Each kind's answer has its own form, so the form names the kind; the numbers and words are
    read back out of the question and the answer and checked against each other."""
    if m := re.fullmatch(r"(\d+) ([-+*]) (\d+) = (\d+)\.", a):
        x, op, y, result = int(m[1]), m[2], int(m[3]), int(m[4])
        assert _ints(q) == ([y, x] if "subtract" in q.lower() else [x, y])
        assert result == OPS[op](x, y) >= 0
        return "arithmetic"
    if m := re.fullmatch(r"(\w+) has the letter (\w) (\d+) times?\.", a):
        word, letter, count = m[1], m[2], int(m[3])
        assert re.search(rf"\b{word}\b", q) and re.search(rf"\b{letter}\b", q)
        assert count == len(re.findall(letter, word)) and (count == 1) == a.endswith(" time.")
        return "letters"
    if m := re.fullmatch(r"(\w+) is spelled ([a-z](?:-[a-z])*)\.", a):
        assert m[2].replace("-", "") == m[1] and re.search(rf"\b{m[1]}\b", q)
        return "spelling"
    if m := re.fullmatch(r"(?:(Yes|No), )?(\d+) is (bigger|smaller) than (\d+)\.", a):
        x, y = int(m[2]), int(m[4])
        assert sorted(_ints(q)) == sorted([x, y]) and (x > y) == (m[3] == "bigger")
        if m[1]:  # "Is x bigger than y?" keeps the question's order
            assert _ints(q) == [x, y] and (m[1] == "Yes") == (x > y)
        return "compare"
    if m := re.fullmatch(r"(\d+) ([a-z]+) = (\d+) ([a-z]+)\.", a):
        x, u, y, v = int(m[1]), _unit(m[2]), int(m[3]), _unit(m[4])
        assert x * UNIT_SIZE[u] == y * UNIT_SIZE[v] and _ints(q) == [x] and ((x == 1) == (m[2] == u))
        return "units"
    if m := re.fullmatch(r"The (day|month) (after|before) (\w+) is (\w+)\.", a):
        names = WEEKDAYS if m[1] == "day" else MONTHS
        step = 1 if m[2] == "after" else -1
        assert names[(names.index(m[3]) + step) % len(names)] == m[4] and m[3] in q
        return "calendar"
    if m := re.fullmatch(r"(\w+) has (\d+) days(, or 29 in a leap year)?\.", a):
        month = MONTHS.index(m[1]) + 1
        common, leap = (calendar.monthrange(year, month)[1] for year in (2023, 2024))
        assert int(m[2]) == common and bool(m[3]) == (leap == 29 != common)
        return "calendar"
    if a.startswith(("A week has", "A year has", "A day has")):
        return "calendar"
    if re.fullmatch(r"The capital of .+ is .+\.|A \w+ says [\w-]+\.|.+ is \w+\.", a) and not a.startswith(
            ("I ", "No, ", "My ")):
        return "facts"
    for kind, table in (("greeting", synth.GREETINGS), ("identity", synth.IDENTITY)):
        for phrasings, answer in table:
            if a == answer:
                assert core(q, kind) in {synth.normalise(p) for p in phrasings}
                return kind
    raise AssertionError(f"unrecognised answer {a!r} to {q!r}")


def exchanges(conversations):
    for c in conversations:
        turns = [m for m in c["messages"] if m["role"] != "system"]
        yield from ((u["content"], a["content"]) for u, a in zip(turns[::2], turns[1::2]))


@pytest.fixture(scope="module")
def train_convs():
    return synth.synth_conversations("train", 1500, seed=0)


@pytest.fixture(scope="module")
def test_convs():
    return synth.synth_conversations("test", 600, seed=0)


def test_every_answer_is_correct_and_every_kind_appears(train_convs, test_convs):
    for convs in (train_convs, test_convs):
        kinds = Counter(check_exchange(q, a) for q, a in exchanges(convs))
        assert set(kinds) == set(synth.KINDS), kinds


def test_a_question_has_one_answer(train_convs, test_convs):
    answers: dict[str, set[str]] = {}
    for q, a in exchanges(train_convs + test_convs):
        answers.setdefault(synth.normalise(q), set()).add(a)
    assert all(len(a) == 1 for a in answers.values()), [q for q, a in answers.items() if len(a) > 1]


def test_same_seed_same_data_and_more_n_extends_it():
    a = synth.synth_conversations("train", 60, seed=3)
    assert a == synth.synth_conversations("train", 60, seed=3)
    assert a != synth.synth_conversations("train", 60, seed=4)
    assert synth.synth_conversations("train", 25, seed=3) == a[:25]
    assert synth.held_out_questions(30, seed=2) == synth.held_out_questions(30, seed=2)


def test_no_test_question_is_ever_trained_on_whatever_seed_and_size(test_convs):
    train = [c for seed, n in ((0, 1500), (1, 700), (7, 300)) for c in synth.synth_conversations("train", n, seed)]
    test = test_convs + synth.synth_conversations("test", 200, seed=5)
    train_q = {synth.normalise(q) for q, _ in exchanges(train)}
    test_q = {synth.normalise(q) for q, _ in exchanges(test)}
    assert train_q and test_q and not train_q & test_q


def draws(n: int = 6000) -> list[synth.QA]:
    """Questions of every kind as the generators and ``dress`` make them, before the split."""
    rng = random.Random(0)
    return [synth.dress(rng, synth.KINDS[kind][0](rng)) for _ in range(n // len(synth.KINDS)) for kind in synth.KINDS]


def test_a_worked_out_test_problem_is_not_trained_on_in_any_phrasing():
    # Such an answer names the problem itself ("23 + 45 = 68."), so no training answer may equal a test one.
    answers = {split: {qa.answer for qa in draws() if qa.held_out == "problem" and qa.split == split}
               for split in synth.SPLITS}
    assert answers["train"] and answers["test"] and not answers["train"] & answers["test"]
    kinds = {qa.kind for qa in draws() if qa.held_out == "problem"}
    assert kinds == {"arithmetic", "letters", "spelling", "compare", "units"}


def test_a_remembered_fact_is_taught_and_its_test_phrasing_is_new_parts_combined():
    # Remembered facts hold out phrasings, not facts: each test answer is also a training answer,
    # and each test question's core (without opening and " please") is asked in training too.
    qas = [qa for qa in draws(36_000) if qa.held_out == "phrasing"]
    assert {qa.kind for qa in qas} == {"arithmetic", "units", "calendar", "facts", "greeting", "identity"}
    train = [qa for qa in qas if qa.split == "train"]
    test = [qa for qa in synth.held_out_questions(300) if qa.held_out == "phrasing"]
    assert len(test) > 100 and {qa.kind for qa in test} == {qa.kind for qa in qas}
    assert {qa.answer for qa in test} <= {qa.answer for qa in train}
    for qa in test:  # the training split holds the same core under at least one other dressing
        c = core(qa.question, qa.kind)
        greeting = qa.kind == "greeting"  # greetings have their own openings and no " please"
        endings = ("",) if greeting else ("", " please")
        openings = ("", *(synth.normalise(o) + " " for o in (synth.GREETING_OPENINGS if greeting else synth.OPENINGS)))
        variants = {f"{o}{c}{e}" for o in openings for e in endings}
        assert any(replace(qa, key=v).split == "train" for v in variants - {qa.key}), qa
    # ... and the dressing is a real part of the question: many test questions carry one.
    assert sum(core(qa.question, qa.kind) != synth.normalise(qa.question) for qa in test) > len(test) / 4


def test_chat_shapes_vary(train_convs):
    has_system = sum(c["messages"][0]["role"] == "system" for c in train_convs)
    multi_turn = sum(len([m for m in c["messages"] if m["role"] == "user"]) > 1 for c in train_convs)
    phrasings = {re.sub(r"\d+", "N", q) for q, a in exchanges(train_convs) if check_exchange(q, a) == "arithmetic"}
    assert 0.1 < has_system / len(train_convs) < 0.5 and 0.1 < multi_turn / len(train_convs) < 0.5
    assert len(phrasings) >= 12


def test_jsonl_file(tmp_path):
    out = tmp_path / "chat.jsonl"
    assert synth.write_synth_chat(out, split="test", n=40, seed=1) == 40
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 40 and [p.name for p in tmp_path.iterdir()] == ["chat.jsonl"]
    for line in lines:
        messages = json.loads(line)["messages"]
        roles = [m["role"] for m in messages]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles and roles == ["user", "assistant"] * (len(roles) // 2)
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in messages)
    assert [json.loads(line) for line in lines] == synth.synth_conversations("test", 40, seed=1)


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="split 'dev'"):
        synth.write_synth_chat(tmp_path / "x.jsonl", split="dev")
    with pytest.raises(UserError, match="n=0"):
        synth.synth_conversations("train", 0)
    assert not (tmp_path / "x.jsonl").exists()


def test_synth_text_is_the_builtin_template():
    from gptlab.tokenizers.chat_template import BUILTIN_TEMPLATE, render_chat

    convs = synth.synth_conversations("train", 30, seed=2)
    by_hand = "\n".join("".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in c["messages"]) for c in convs)
    assert synth.synth_text(30, seed=2) == by_hand
    # What the engine sends for a question is a prefix of what pretraining saw for it.
    q, a = next(exchanges(convs))
    prompt = render_chat(BUILTIN_TEMPLATE, [{"role": "user", "content": q}], add_generation_prompt=True)
    assert prompt + f" {a}\n" in by_hand and prompt == f"User: {q}\nAssistant:"


# --- the evaluator ------------------------------------------------------------------------------

CHARS = CharTokenizer.train(synth.synth_text(300) + "\n".join(qa.question for qa in synth.held_out_questions(300)),
                            unk=True)


class OracleModel(nn.Module):
    """Reads the question in its prompt and spells out ``answer_for(question)`` one character
    at a time, then a newline and more text: a perfect (or deliberately wrong) model that goes
    through the real Engine, its template, stop strings and token limit."""

    def __init__(self, answer_for):
        super().__init__()
        self.answer_for = answer_for
        self.config = SimpleNamespace(block_size=512)

    def forward(self, idx, targets=None):
        text = CHARS.decode(idx[0].tolist())
        question, reply = re.fullmatch(r"User: (.*)\nAssistant:(.*)", text, re.S).groups()
        script = " " + self.answer_for(question) + "\nUser: more"
        logits = torch.zeros(idx.size(0), idx.size(1), CHARS.vocab_size)
        logits[:, -1, CHARS.encode(script[min(len(reply), len(script) - 1)])[0]] = 1.0
        return logits, None


def run_with_model(monkeypatch, model, n):
    ckpt = SimpleNamespace(model=model, tokenizer=CHARS, config=model.config, path=".", tokenizer_config=None)
    monkeypatch.setattr(exact_match, "load_checkpoint", lambda path, device: ckpt)
    return exact_match.evaluate_exact_match("oracle", n=n, seed=4)


def test_evaluator_scores_a_perfect_model_1_and_reports_wrong_answers(monkeypatch):
    expected = {qa.question: qa for qa in synth.held_out_questions(27, seed=4)}
    result = run_with_model(monkeypatch, OracleModel(lambda q: expected[q].answer), 27)
    assert result["accuracy"] == 1.0 and result["correct"] == 27 and not result["failures"]
    assert set(result["per_kind"]) == set(synth.KINDS) and all(t["total"] == 3 for t in result["per_kind"].values())

    def wrong_sums(q):  # right but for arithmetic, where the last digit is off by one
        a = expected[q].answer
        return re.sub(r"\d(?=\.$)", lambda m: str((int(m[0]) + 1) % 10), a) if expected[q].kind == "arithmetic" else a

    result = run_with_model(monkeypatch, OracleModel(wrong_sums), 27)
    assert result["correct"] == 24 and result["per_kind"]["arithmetic"]["accuracy"] == 0.0
    questions = synth.held_out_questions(27, seed=4)
    assert {k: t["total"] for k, t in result["per_held_out"].items()} == Counter(qa.held_out for qa in questions)
    wrong = {k: t["total"] - t["correct"] for k, t in result["per_held_out"].items()}
    arithmetic = [qa for qa in questions if qa.kind == "arithmetic"]
    assert wrong == {k: sum(qa.held_out == k for qa in arithmetic) for k in ("problem", "phrasing")}
    assert result["accuracy"] == pytest.approx(24 / 27)
    fail = result["failures"][0]
    assert fail["kind"] == "arithmetic" and fail["got"] != fail["expected"] == expected[fail["question"]].answer


def test_evaluator_on_a_tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=CHARS.vocab_size, block_size=128, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(tmp_path / "tiny", model, CHARS)
    result = exact_match.evaluate_exact_match(str(tmp_path / "tiny"), n=9)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["n"] == 9
    assert sum(t["total"] for t in result["per_kind"].values()) == 9 and result["model"] == str(tmp_path / "tiny")
