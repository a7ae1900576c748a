"""Exact match: how many held-out synthetic questions (``gptlab.data.synth_chat``) a chat model
answers exactly right, asked one at a time through the ``Engine`` (greedy, the built-in template)."""

from __future__ import annotations

from typing import Any

from gptlab.data.synth_chat import QA, held_out_questions
from gptlab.inference.engine import Engine, SamplingParams
from gptlab.weights.load import load_checkpoint


def exact_match(engine: Engine, questions: list[QA], max_failures: int = 10) -> dict[str, Any]:
    """Ask ``engine`` each question alone (greedy) and compare the stripped reply with the answer;
    tallied per kind and per what the split holds out ("problem": worked out; "phrasing": a
    remembered fact asked in a new way)."""
    per_kind: dict[str, dict[str, float]] = {}
    per_held_out: dict[str, dict[str, float]] = {}
    failures = []
    for qa in questions:
        # The answers are one line, so a newline ends the reply; a little more room than the
        # expected answer needs is enough to tell right from wrong, and keeps the test quick.
        room = len(engine.tokenizer.encode(" " + qa.answer)) + 4
        params = SamplingParams(temperature=0.0, max_new_tokens=room, stop=("\n",))
        prompt = engine.chat_prompt([{"role": "user", "content": qa.question}], room)
        reply = "".join(engine.stream(prompt.ids, params)).strip()
        for tally in (per_kind.setdefault(qa.kind, {"correct": 0, "total": 0}),
                      per_held_out.setdefault(qa.held_out, {"correct": 0, "total": 0})):
            tally["total"] += 1
            tally["correct"] += reply == qa.answer
        if reply != qa.answer and len(failures) < max_failures:
            failures.append({"kind": qa.kind, "question": qa.question, "expected": qa.answer, "got": reply})
    for tally in (*per_kind.values(), *per_held_out.values()):
        tally["accuracy"] = tally["correct"] / tally["total"]
    correct = sum(t["correct"] for t in per_kind.values())
    return {"n": len(questions), "correct": correct, "accuracy": correct / len(questions),
            "per_kind": per_kind, "per_held_out": per_held_out, "failures": failures}


def evaluate_exact_match(model: str, n: int = 200, seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Load ``model`` (any MODEL argument) and score it on ``n`` held-out single-turn questions:
    ``{"n", "correct", "accuracy", "per_kind": {kind: {"correct", "total", "accuracy"}}, "per_held_out":
    {"problem" | "phrasing": {...}}, "failures"}``."""
    engine = Engine(load_checkpoint(model, device), device)
    return {"model": str(model), **exact_match(engine, held_out_questions(n, seed))}
