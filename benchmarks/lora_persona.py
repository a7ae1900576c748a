"""LoRA demo: give SmolLM2-135M-Instruct a persona on this CPU, and show the change.

The persona data is generated here: questions about who the assistant is (name, maker, what it
likes, ...) in many phrasings, each answered as "Quill", a librarian-owl assistant. Some
phrasings are held out for validation and for the transcripts, so the "after" answers are to
questions the adapter never saw.

    python benchmarks/lora_persona.py [--max-steps 30] [--out runs/lora-persona]

It prints the held-out questions answered before and after (greedy), the validation loss
before and after, and the wall time of the fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import torch

from gptlab.config import finetune_config
from gptlab.finetune.sft import SFTOptions, answer_loss, read_conversations, run_sft
from gptlab.inference.engine import Engine, SamplingParams
from gptlab.model.lora import LoRAConfig
from gptlab.weights.load import load_checkpoint

BASE = "smollm2-135m-instruct"
FACTS = {
    "name": ("I'm Quill, a librarian owl who lives in the gptlab library.",
             ["What is your name?", "Who are you?", "What should I call you?", "Do you have a name?",
              "Tell me your name.", "Introduce yourself.", "What's your name, assistant?", "Who am I talking to?"]),
    "maker": ("The gptlab team built me from scratch, one layer at a time.",
              ["Who made you?", "Who created you?", "Who built you?", "Where do you come from?",
               "Which company trained you?", "Who is your creator?", "Who designed you?", "Who programmed you?"]),
    "likes": ("I love quiet shelves, old atlases and a good question at midnight.",
              ["What do you like?", "What are your hobbies?", "What do you enjoy?", "What makes you happy?",
               "Do you have any favourite things?", "What do you do for fun?", "What is your favourite thing?",
               "Tell me something you like."]),
    "kind": ("I'm an owl, so I sleep all day and answer questions all night.",
             ["Are you a human?", "What kind of creature are you?", "Are you a robot?", "What are you?",
              "Are you an animal?", "Are you a person?", "Are you an AI?", "What species are you?"]),
    "help": ("I can find facts, explain ideas and recommend a book for any mood.",
             ["What can you do?", "How can you help me?", "What are you good at?", "What are your skills?",
              "What can I ask you?", "What is your job?", "How do you help people?", "What do you do?"]),
}


def persona_split(seed: int = 0) -> tuple[list[dict], list[tuple[str, str]]]:
    """Training conversations, and held-out (question, answer) pairs: two phrasings per fact."""
    rng = random.Random(seed)
    train, held_out = [], []
    for answer, questions in FACTS.values():
        qs = list(questions)
        rng.shuffle(qs)
        held_out += [(q, answer) for q in qs[:2]]
        for q in qs[2:]:
            for variant in (q, q.lower(), q.rstrip("?.") + ", please?" if q.endswith("?") else q + " Please."):
                train.append({"messages": [{"role": "user", "content": variant},
                                           {"role": "assistant", "content": answer}]})
    rng.shuffle(train)
    return train, held_out


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def answers(model: str, questions: list[str]) -> list[str]:
    engine = Engine(load_checkpoint(model))
    params = SamplingParams(temperature=0.0, max_new_tokens=40)
    out = []
    for q in questions:
        ids = engine.chat_prompt([{"role": "user", "content": q}], params.max_new_tokens).ids
        out.append("".join(engine.stream(ids, params)).strip())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--out", default="runs/lora-persona")
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    train, held_out = persona_split()
    write_jsonl(out / "persona-train.jsonl", train)
    write_jsonl(out / "persona-val.jsonl", [{"messages": [{"role": "user", "content": q},
                                                          {"role": "assistant", "content": a}]} for q, a in held_out])
    questions = [q for q, _ in held_out]
    val = read_conversations(out / "persona-val.jsonl")
    before = answers(BASE, questions)
    loss_before = answer_loss(load_checkpoint(BASE), val)

    cfg = finetune_config("lora", {"max_steps": args.max_steps, "eval_interval": max(1, args.max_steps // 4),
                                   "batch_size": 8, "lr": 2e-3, "device": "cpu", "dtype": "fp32"})
    options = SFTOptions(val_data=str(out / "persona-val.jsonl"),
                         lora=LoRAConfig(rank=8, alpha=16, dropout=0.05, targets="all-linear"))
    start = time.perf_counter()
    result = run_sft(BASE, str(out / "persona-train.jsonl"), out / "run", cfg, options, show_progress=False)
    took = time.perf_counter() - start
    after = answers(str(out / "run"), questions)
    loss_after = answer_loss(load_checkpoint(out / "run"), val)

    print(f"\nLoRA fine-tuning of {BASE}: {len(train)} training conversations, {result.step} steps in {took:.0f} s")
    print(f"validation loss per answer token (held-out phrasings): before {loss_before:.3f}, after {loss_after:.3f}")
    hits = sum(a == expected for a, (_, expected) in zip(after, held_out))
    print(f"held-out questions answered exactly in persona: before {sum(b == e for b, (_, e) in zip(before, held_out))}"
          f"/{len(held_out)}, after {hits}/{len(held_out)}\n")
    for q, b, a in zip(questions, before, after):
        print(f"Q: {q}\n  before: {b}\n  after:  {a}")


if __name__ == "__main__":
    main()
