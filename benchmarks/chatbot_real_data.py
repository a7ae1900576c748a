"""A chatbot from scratch that talks, on real data: pretrain on ``english``, SFT on ``chitchat``,
and compare with SmolLM2-135M-Instruct on held-out conversations (issue 16, recipe 1).

    python benchmarks/chatbot_real_data.py --smoke         # every stage in minutes: runs/chatbot-real-smoke
    python benchmarks/chatbot_real_data.py                 # the full recipe: runs/chatbot-real
    python benchmarks/chatbot_real_data.py --stage eval    # one stage: pretrain|sft|lora|eval|transcripts

Stages (``--stage all`` runs them in this order; each is skipped when its result is in ``--out``,
so an interrupted run goes on where it stopped; ``--force`` runs the chosen stages again):

1. pretrain: a byte-level BPE tokenizer trained on the pretraining text (4,096 tokens: at this model
   size the embedding and the untied head are half the parameters; 8,192 tokens made a training
   step 1.26x as long for 8% more bytes per token on chitchat (3.40 against 3.15) and 11% on
   English prose, so 4,096 reads ~13% more text a second, and each token is seen more often),
   the text prepared into token shards, and a 4-layer, 192-wide model trained with the speedrun recipe
   (``--preset shakespeare-char``: RoPE, QK-norm, ReLU^2, Muon) at block 256. Its chat template
   (``tokenizer_config.json``, beside its weights) ends each assistant turn with
   ``<|endoftext|>``, so SFT teaches it to stop and ``gptlab chat`` knows where a reply ends.
   The pretraining text is ``english:train`` and, unless ``--no-pretrain-chitchat``, ``chitchat``'s
   train conversations written as the template writes them ("User: ..." / "Assistant: ..." lines),
   documents shuffled together (``pretrain-mix.jsonl``): conversational text is what the held-out
   test is about, and pretraining reads both speakers of every conversation.
2. sft: ``gptlab finetune sft`` on ``chitchat`` train (``--chatterbot`` adds ChatterBot's). A
   chitchat conversation is ~30 turns, longer than the model's context, and SFT would cut it to
   its first 256 tokens; so each is split into runs of consecutive turns that fit (``chunks``).
   The speakers of a chitchat conversation are two people alike, and SFT learns only the
   assistant's turns; so each conversation is also taken with the roles swapped from its second
   message on (``swap_speakers``; ``--one-speaker`` leaves it out), and every turn is trained.
3. lora: SmolLM2-135M-Instruct with a LoRA on the same chitchat chunks, for ``--lora-minutes``
   (the ceiling), then merged into its weights (``lora-merged``) for eval and transcripts.
4. eval: ``gptlab eval MODEL --chat FILE --k 5`` on ``--eval-items`` held-out contexts of the
   ``chitchat`` test split (``chitchat-eval.jsonl``): bits per byte of the true replies and hits@1
   of 5, for each model on the same items; one table.
5. transcripts: ten held-out contexts continued by each model, in ``transcripts.md``.

``--budget-minutes`` is the from-scratch recipe's (tokenizer, data, pretraining and SFT: the
issue's <= 60 minutes on a 2-core CPU); pretraining gets ``--pretrain-share`` of it, SFT
``--sft-share``. Each training run first takes a few steps to measure its step time (``calibrate``)
and then gets the schedule that fits its time (``--max-steps``; kept in ``OUT/NAME.plan.json``),
so the learning rate decays fully. The planned steps are the budget: on a machine slowed by other
work a run takes longer than planned but trains the same steps (``--max-time`` cuts only a run 3x
slower than planned), and the table reports planned and actual times. The chitchat validation replies' bits per byte are
measured after pretraining and after SFT (``chitchat-val.jsonl``). Commands run as subprocesses,
exactly as a person would type them; their output is the log. ``--smoke`` shrinks every stage
(its figures check the plumbing and mean nothing).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chatbot_recipe import gptlab, pick_threads, run  # noqa: E402

from gptlab.cache import atomic_write_text  # noqa: E402
from gptlab.data.datasets import write_jsonl  # noqa: E402
from gptlab.data.sources import fetch_source, open_corpus  # noqa: E402

SMOL = "smollm2-135m-instruct"
STAGES = ("pretrain", "sft", "lora", "eval", "transcripts")
#: the speedrun recipe (the default preset) at block 256 and 192 wide: 3.3M parameters, ~5,600
#: tokens/s on the 2 cores with 2 threads (3,400 with 1), so ~40 minutes see ~8-13M tokens,
#: 1.5-2.5 passes over english:train. 256 wider ran at 2/3 of the speed.
MODEL_FLAGS = ["--preset", "shakespeare-char", "--block-size", "256", "--n-layer", "4", "--n-head", "4",
               "--n-embd", "192"]
BLOCK = 256
#: characters of an SFT chunk at most: chitchat is ~3.15 bytes per token with the 4,096 vocabulary,
#: so 6% of the chunks exceed the 256-token context and are cut (34% at 768 characters)
CHUNK_CHARS = 640
#: the from-scratch model's chat template: the built-in one's plain "User: ..." lines, with the
#: tokenizer's end-of-text token closing each assistant turn (SFT learns it as part of the reply)
SCRATCH_CHAT = {
    "chat_template": "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}"
                     "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
                     "{% if add_generation_prompt %}Assistant:{% endif %}",
    "eos_token": "<|endoftext|>",
}
Chat = dict[str, Any]
#: a held-out context's characters at most: about the from-scratch model's 256 tokens, so every
#: model reads the same context (and SmolLM2's scoring stays cheap)
MAX_CONTEXT_CHARS = 1000


@dataclass(frozen=True)
class Plan:
    """Every size of a run; kept in OUT/settings.json so that a resumed run is the same run."""

    smoke: bool
    budget_minutes: float
    pretrain_share: float
    sft_share: float
    lora_minutes: float
    vocab_size: int
    english_chars: int | None
    """None: all of english:train; else its first N characters (smoke)"""
    eval_items: int
    val_items: int
    context_messages: int
    max_reply_chars: int
    chunk_chars: int
    sft_chunks: int | None
    val_chunks: int
    lora_chunks: int
    chatterbot: bool
    pretrain_chitchat: bool
    """chitchat's train conversations in the pretraining text beside english:train"""
    both_speakers: bool
    """SFT also on each chitchat conversation with the roles swapped"""
    lora_batch: int
    calibrate_steps: tuple[int, int, int]
    """pretrain, sft, lora"""
    transcripts: int
    smol_dtype: str


def make_plan(args: argparse.Namespace) -> Plan:
    smoke = args.smoke
    return Plan(smoke=smoke, budget_minutes=args.budget_minutes or (1.6 if smoke else 60.0),
                pretrain_share=args.pretrain_share, sft_share=args.sft_share,
                lora_minutes=args.lora_minutes or (0.6 if smoke else 15.0), vocab_size=1024 if smoke else 4096,
                english_chars=2_000_000 if smoke else None, eval_items=args.eval_items or (20 if smoke else 500),
                val_items=20 if smoke else 200, context_messages=5, max_reply_chars=400,
                chunk_chars=CHUNK_CHARS, sft_chunks=800 if smoke else None, val_chunks=60 if smoke else 400,
                lora_chunks=200 if smoke else 4000, chatterbot=args.chatterbot,
                pretrain_chitchat=not args.no_pretrain_chitchat, both_speakers=not args.one_speaker,
                lora_batch=2 if smoke else 8, calibrate_steps=(3, 3, 2) if smoke else (20, 16, 4),
                transcripts=3 if smoke else 10,
                smol_dtype=args.smol_dtype)


# --- data ---------------------------------------------------------------------------------------

def read_chats(name: str, split: str) -> list[Chat]:
    return [json.loads(line) for line in fetch_source(name)[f"{split}.jsonl"].read_text("utf-8").splitlines()]


def chunks(messages: list[dict[str, str]], max_chars: int) -> list[list[dict[str, str]]]:
    """The conversation cut into runs of consecutive (user, assistant) pairs of at most
    ``max_chars`` characters each (a longer pair alone), so that SFT sees every turn."""
    pairs = [messages[i:i + 2] for i in range(0, len(messages) - 1, 2)]
    out: list[list[dict[str, str]]] = []
    size = max_chars + 1
    for pair in pairs:
        n = sum(len(m["content"]) for m in pair)
        if size + n > max_chars:
            out.append([])
            size = 0
        out[-1] += pair
        size += n
    return out


def swap_speakers(chat: Chat) -> Chat:
    """The conversation from its second message on with user and assistant swapped: the other
    person's turns become the replies to learn."""
    flip = {"user": "assistant", "assistant": "user"}
    return {"id": f"{chat['id']}~", "messages": [{"role": flip[m["role"]], "content": m["content"]}
                                                 for m in chat["messages"][1:]]}


def chunk_records(chats: list[Chat], max_chars: int, limit: int | None, seed: int) -> list[Chat]:
    records = [{"id": f"{c['id']}#{k}", "messages": m}
               for c in chats for k, m in enumerate(chunks(c["messages"], max_chars))]
    random.Random(seed).shuffle(records)  # a limit then takes chunks of many conversations
    return records[:limit]


def reply_items(chats: list[Chat], n: int, context_messages: int, max_reply_chars: int, seed: int) -> list[Chat]:
    """``n`` held-out items: an assistant turn of at most ``max_reply_chars`` characters (the
    reply to select) after at most ``context_messages`` messages of its conversation, starting
    with the user's, and of at most ``MAX_CONTEXT_CHARS`` (earlier pairs dropped to fit). One item
    per conversation first, then a second, ... until there are ``n``; the items of one
    conversation share its ``conversation`` ID, so none is another's distractor."""
    rng = random.Random(seed)
    order = list(chats)
    rng.shuffle(order)
    cuts = []
    for chat in order:
        ms = chat["messages"]
        ok = [i for i, m in enumerate(ms) if m["role"] == "assistant" and len(m["content"]) <= max_reply_chars
              and len(ms[i - 1]["content"]) <= MAX_CONTEXT_CHARS]
        rng.shuffle(ok)
        cuts.append(ok)
    items: list[Chat] = []
    for rank in range(max(map(len, cuts), default=0)):
        for chat, ok in zip(order, cuts):
            if rank < len(ok) and len(items) < n:
                i = ok[rank]
                start = max(0, i - context_messages)
                start += start % 2  # user turns are the even ones
                while sum(len(m["content"]) for m in chat["messages"][start:i]) > MAX_CONTEXT_CHARS:
                    start += 2
                items.append({"id": f"{chat['id']}@{i}", "conversation": chat["id"],
                              "messages": chat["messages"][start:i + 1]})
    if len(items) < n:
        raise SystemExit(f"only {len(items)} held-out items with a reply of <= {max_reply_chars} characters; "
                         f"ask for fewer (--eval-items)")
    return items


def write_data(out: Path, plan: Plan) -> None:
    """The JSONL files every stage reads (written once; the same for a resumed run)."""
    if (out / "chitchat-eval.jsonl").exists():
        return
    train = read_chats("chitchat", "train")
    sft = chunk_records(train + ([swap_speakers(c) for c in train] if plan.both_speakers else []),
                        plan.chunk_chars, plan.sft_chunks, seed=0)
    if plan.chatterbot:
        sft += chunk_records(read_chats("chatterbot", "train"), plan.chunk_chars, None, seed=0)
        random.Random(1).shuffle(sft)
    val = read_chats("chitchat", "validation")
    files = {"sft-train.jsonl": sft,
             "sft-val.jsonl": chunk_records(val, plan.chunk_chars, plan.val_chunks, seed=0),
             "lora-train.jsonl": chunk_records(train, plan.chunk_chars, plan.lora_chunks, seed=0),
             "chitchat-val.jsonl": reply_items(val, plan.val_items, plan.context_messages, plan.max_reply_chars, 0),
             "chitchat-eval.jsonl": reply_items(read_chats("chitchat", "test"), plan.eval_items,
                                                plan.context_messages, plan.max_reply_chars, 0)}
    for name, records in sorted(files.items()):  # chitchat-eval.jsonl last: it marks the data as written
        write_jsonl(out / f".{name}", records)
        os.replace(out / f".{name}", out / name)
        print(f"{out / name}: {len(records):,} conversations", flush=True)


# --- training to a time budget ------------------------------------------------------------------

def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def calibrate(cmd: list[str], run_dir: Path, steps: int) -> tuple[float, float]:
    """Seconds per step and seconds outside the steps (start, data, final save) of ``cmd``,
    measured by running it for ``steps`` steps into ``run_dir``."""
    start = time.perf_counter()
    run([*cmd, "--out", str(run_dir), "--force", "--max-steps", str(steps), "--eval-interval", str(steps),
         "--eval-batches", "1", "--log-interval", "1", "--warmup-steps", "1"])
    wall = time.perf_counter() - start
    rows = [r for r in read_metrics(run_dir) if r["train_loss"]]
    first = min(1, len(rows) - 2)  # the first step pays for warming up
    per_step = (float(rows[-1]["elapsed_s"]) - float(rows[first]["elapsed_s"])) / max(1, len(rows) - 1 - first)
    return per_step, max(0.0, wall - float(rows[-1]["elapsed_s"]))


#: the guard on a run's wall time, as a multiple of its planned time: the planned steps are the
#: budget (what the calibrated step time buys), so a machine slowed by other work takes longer
#: but trains the same steps; only a run this much slower than planned is cut
GUARD_FACTOR = 3.0


def plan_steps(cmd: list[str], out: Path, name: str, deadline: float, calibrate_steps: int) -> dict[str, Any]:
    """The steps that fit before ``deadline`` at the step time measured by ``calibrate``; kept in
    OUT/NAME.plan.json, so a stage run again (after an interruption) keeps the same schedule."""
    plan_file = out / f"{name}.plan.json"
    plan = load_json(plan_file)
    if plan is not None:
        return plan
    per_step, overhead = calibrate(cmd, out / "calibrate" / name, calibrate_steps)
    # A few percent for the evaluations inside the run and the final one after it; the steps
    # a little fewer than fit, so the schedule ends (the learning rate decayed) in the budget.
    seconds = max(10.0, (deadline - time.perf_counter() - 1.2 * overhead) * 0.95)
    plan = {"seconds_per_step": per_step, "overhead_seconds": overhead, "planned_seconds": round(seconds),
            "planned_steps": max(2, int(seconds / (1.08 * per_step)))}
    atomic_write_text(plan_file, json.dumps(plan, indent=1))
    return plan


def train_until(cmd: list[str], out: Path, name: str, deadline: float, calibrate_steps: int,
                evals: int, warmup: int) -> dict[str, Any]:
    """Run ``cmd`` into OUT/name with the schedule that ends by ``deadline`` (perf_counter) at the
    calibrated speed. A ``gptlab train`` run interrupted earlier (its last/ saved) is resumed."""
    plan = plan_steps(cmd, out, name, deadline, calibrate_steps)
    steps, seconds = plan["planned_steps"], plan["planned_seconds"]
    print(f"{name}: {plan['seconds_per_step']:.3f} s/step and {plan['overhead_seconds']:.0f} s outside the steps "
          f"measured -> {steps:,} steps, planned {seconds:.0f} s", flush=True)
    start = time.perf_counter()
    guard = ["--max-time", f"{GUARD_FACTOR * seconds:.0f}"]
    if cmd[1] == "train" and (out / name / "last" / "train_state.pt").exists():
        run([*cmd[:2], "--resume", str(out / name), *guard, "--no-progress"])
    else:
        run([*cmd, "--out", str(out / name), "--force", "--max-steps", str(steps), *guard,
             "--eval-interval", str(max(1, steps // evals)), "--warmup-steps", str(min(warmup, steps // 10 + 1))])
    last = read_metrics(out / name)[-1]
    return {**plan, "steps": int(last["step"]), "tokens": int(last["tokens"]),
            "train_seconds": float(last["elapsed_s"]), "stage_seconds": round(time.perf_counter() - start),
            "val_loss": float(last["val_loss"] or "nan"),
            "val_bits_per_byte": float(last.get("val_bits_per_byte") or "nan")}


def chat_eval(exe: str, model: str | Path, chat_file: Path, k: int, dtype: str) -> dict[str, Any]:
    """``gptlab eval MODEL --chat FILE --k K --json``'s report, with its wall time."""
    cmd = [exe, "eval", str(model), "--chat", str(chat_file), "--k", str(k), "--batch-size", "16", "--dtype", dtype,
           "--json"]
    print("$ " + shlex.join(["gptlab", *cmd[1:]]), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(f"  reply bits/byte {report['reply_bits_per_byte']:.4f}, hits@1 of {k} {report['hits_at_1']:.3f}, per "
          f"character {report['hits_at_1_norm']:.3f} ({report['items']} items, {report['seconds']:.0f} s)", flush=True)
    return report


def save_result(path: Path, figures: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(figures, indent=1) + "\n")


# --- stages -------------------------------------------------------------------------------------

def conversation_text(chat: Chat) -> str:
    """A conversation as the from-scratch chat template writes it, without end-of-turn markers
    (the document separator ends it): "User: ..." and "Assistant: ..." lines."""
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in chat["messages"])


def pretrain_corpus(out: Path, plan: Plan) -> str:
    """OUT/pretrain-mix.jsonl: ``english:train``'s documents (for a smoke run its first
    ``english_chars`` characters) and, with ``pretrain_chitchat``, chitchat's train conversations,
    shuffled together (seed 0), one ``{"text"}`` record each; written once."""
    path = out / "pretrain-mix.jsonl"
    if path.exists():
        return str(path)
    docs, left = [], plan.english_chars
    for doc in open_corpus("english:train").documents():
        text = "".join(doc)
        if left is not None:
            text, left = text[:left], left - min(left, len(text))
        if text:
            docs.append(text)
    if plan.pretrain_chitchat:
        chats = read_chats("chitchat", "train")
        docs += [conversation_text(c) for c in (chats[:400] if plan.smoke else chats)]
    random.Random(0).shuffle(docs)
    write_jsonl(out / ".pretrain-mix.jsonl", [{"text": d} for d in docs])
    os.replace(out / ".pretrain-mix.jsonl", path)
    print(f"{path}: {len(docs):,} documents, {sum(map(len, docs)):,} characters", flush=True)
    return str(path)


def stage_pretrain(out: Path, plan: Plan, exe: str) -> dict[str, Any]:
    start = time.perf_counter()
    deadline = start + plan.pretrain_share * plan.budget_minutes * 60
    corpus, tokenizer = pretrain_corpus(out, plan), out / "tokenizer.json"
    run([exe, "tokenizer", "train", "--corpus", corpus, "--vocab-size", str(plan.vocab_size), "--out", str(tokenizer),
         "--force"])
    run([exe, "prepare", "--corpus", corpus, "--tokenizer", str(tokenizer), "--out", str(out / "data"),
         "--val-fraction", "0.02", "--force"])
    cmd = [exe, "train", *MODEL_FLAGS, "--data", str(out / "data"), "--batch-size", "8", "--eval-batches", "20",
           "--sample-interval", "0", "--log-interval", "50", "--dtype", "fp32", "--no-progress"]
    figures = train_until(cmd, out, "pretrain", deadline, plan.calibrate_steps[0], evals=4, warmup=50)
    for checkpoint in ("best", "last"):  # the chat template SFT, eval and chat will read
        atomic_write_text(out / "pretrain" / checkpoint / "tokenizer_config.json", json.dumps(SCRATCH_CHAT, indent=1))
    figures["chitchat_val"] = chat_eval(exe, out / "pretrain", out / "chitchat-val.jsonl", 2, "fp32")
    figures["wall_seconds"] = round(time.perf_counter() - start)
    return figures


def stage_sft(out: Path, plan: Plan, exe: str) -> dict[str, Any]:
    start = time.perf_counter()
    deadline = start + plan.sft_share * plan.budget_minutes * 60
    cmd = [exe, "finetune", "sft", str(out / "pretrain"), "--data", str(out / "sft-train.jsonl"),
           "--val-data", str(out / "sft-val.jsonl"), "--batch-size", "16", "--lr", "1e-3", "--min-lr-ratio", "0.1",
           "--eval-batches", "10", "--log-interval", "25", "--dtype", "fp32", "--force", "--no-progress"]
    figures = train_until(cmd, out, "sft", deadline, plan.calibrate_steps[1], evals=3, warmup=30)
    figures["chitchat_val"] = chat_eval(exe, out / "sft", out / "chitchat-val.jsonl", 2, "fp32")
    figures["wall_seconds"] = round(time.perf_counter() - start)
    return figures


def stage_lora(out: Path, plan: Plan, exe: str) -> dict[str, Any]:
    start = time.perf_counter()
    # Rank 16 on every linear layer: a CPU step costs the forward and backward of the whole model
    # anyway, and the few hundred steps that fit need the capacity more than the regularisation.
    cmd = [exe, "finetune", "lora", SMOL, "--data", str(out / "lora-train.jsonl"), "--val-data",
           str(out / "sft-val.jsonl"), "--max-length", "320", "--batch-size", str(plan.lora_batch), "--lr", "1e-3",
           "--lora-rank", "16", "--lora-alpha", "32", "--lora-targets", "all-linear", "--eval-batches", "4",
           "--log-interval", "5", "--dtype", plan.smol_dtype, "--force", "--no-progress"]
    figures = train_until(cmd, out, "lora", start + plan.lora_minutes * 60, plan.calibrate_steps[2], evals=1,
                          warmup=10)
    figures["wall_seconds"] = round(time.perf_counter() - start)
    # Scored merged: the same function at the base model's speed (the unmerged adapter's extra
    # matmuls made scoring 3x slower)
    run([exe, "merge", str(out / "lora"), "--out", str(out / "lora-merged"), "--force"])
    return figures


def eval_models(out: Path, plan: Plan) -> list[tuple[str, str, str | Path, str]]:
    """(key, label, MODEL, dtype) of every model the table compares."""
    return [("scratch-pretrain", "from scratch, pretrained only", out / "pretrain", "fp32"),
            ("scratch-sft", "from scratch + SFT", out / "sft", "fp32"),
            ("smollm2", "SmolLM2-135M-Instruct zero-shot", SMOL, plan.smol_dtype),
            ("smollm2-lora", "SmolLM2-135M-Instruct + LoRA", out / "lora-merged", plan.smol_dtype)]


def stage_eval(out: Path, plan: Plan, exe: str, force: bool) -> dict[str, Any]:
    """Each model's report in OUT/eval/KEY.json (made once); the models not trained yet are left out."""
    (out / "eval").mkdir(exist_ok=True)
    reports = {}
    for key, _, model, dtype in eval_models(out, plan):
        path = out / "eval" / f"{key}.json"
        if path.exists() and not force:
            reports[key] = json.loads(path.read_text())
        elif isinstance(model, Path) and not model.exists():
            print(f"eval: {key} is not trained yet ({model}); left out", flush=True)
        else:
            reports[key] = chat_eval(exe, model, out / "chitchat-eval.jsonl", 5, dtype)
            save_result(path, reports[key])
    return reports


def continue_chats(model: str | Path, items: list[Chat]) -> list[str]:
    """Each item's context continued by ``model``: one sampled reply (seeded) of at most 60 tokens."""
    from gptlab.inference.engine import Engine, SamplingParams
    from gptlab.weights.load import load_checkpoint

    engine = Engine(load_checkpoint(str(model)))
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=60, seed=0)
    prompts = [engine.chat_prompt(item["messages"][:-1], params.max_new_tokens).ids for item in items]
    return [c.text.strip() for c in engine.generate_batch(prompts, params)]


def stage_transcripts(out: Path, plan: Plan) -> str:
    """OUT/transcripts.md: the first held-out items, their true reply and each model's."""
    items = [json.loads(line) for line in (out / "chitchat-eval.jsonl").read_text("utf-8").splitlines()]
    items = items[:plan.transcripts]
    replies = {}
    for key, label, model, _ in eval_models(out, plan):
        if key != "scratch-pretrain" and not (isinstance(model, Path) and not model.exists()):
            start = time.perf_counter()
            replies[label] = continue_chats(model, items)
            print(f"transcripts: {label} in {time.perf_counter() - start:.0f} s", flush=True)
    lines = ["# Held-out chitchat conversations continued by each model",
             "", "Sampled, temperature 0.7, top-p 0.9, seed 0, at most 60 tokens; the context is what every "
             "model saw (the test split of `chitchat`).", ""]
    for n, item in enumerate(items, 1):
        lines += [f"## {n}. `{item['id']}`", ""]
        lines += [f"> **{m['role']}:** " + m["content"].replace("\n", " / ") for m in item["messages"][:-1]]
        lines += ["", f"- **true reply:** {item['messages'][-1]['content']}".replace("\n", " / ")]
        lines += [f"- **{label}:** {texts[n - 1]}".replace("\n", " / ") for label, texts in replies.items()]
        lines.append("")
    text = "\n".join(lines)
    atomic_write_text(out / "transcripts.md", text)
    return text


# --- report -------------------------------------------------------------------------------------

def load_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def print_table(out: Path, plan: Plan) -> None:
    stages = {s: load_json(out / f"{s}.json") for s in ("pretrain", "sft", "lora")}
    trained = {"scratch-pretrain": ["pretrain"], "scratch-sft": ["pretrain", "sft"], "smollm2": [],
               "smollm2-lora": ["lora"]}
    if plan.smoke:
        print("\n*** SMOKE RUN: every stage shrunk to check the plumbing; these are not figures ***")
    n = sum(1 for _ in open(out / "chitchat-eval.jsonl"))
    print(f"\n{n} held-out chitchat contexts (test split, <= {plan.context_messages} messages of context), "
          f"true reply against 4 others: hits@1 of 5 (chance 0.200)")
    print(f"{'model':<34} {'params':>8} {'planned':>9} {'reply bits/byte':>15} {'hits@1':>7} {'per char':>8} "
          f"{'eval':>7}")
    for key, label, _, _ in eval_models(out, plan):
        report = load_json(out / "eval" / f"{key}.json")
        done = [stages[s] for s in trained[key]]
        minutes = "-" if not done else "?" if None in done else f"{sum(s['planned_seconds'] for s in done) / 60:.1f} min"
        if report is None:
            print(f"{label:<34} {'(not evaluated)':>8}")
            continue
        print(f"{label:<34} {report['parameters'] / 1e6:>7.1f}M {minutes:>9} {report['reply_bits_per_byte']:>15.4f} "
              f"{report['hits_at_1']:>7.3f} {report.get('hits_at_1_norm', float('nan')):>8.3f} "
              f"{report['seconds']:>6.0f}s")
    for name in ("pretrain", "sft"):
        s = stages[name]
        if s is not None:
            print(f"after {name}: chitchat validation reply bits/byte {s['chitchat_val']['reply_bits_per_byte']:.4f}; "
                  f"{s['steps']:,} of {s['planned_steps']:,} planned steps ({s['planned_seconds'] / 60:.1f} min at "
                  f"{s['seconds_per_step']:.3f} s/step), {s['tokens']:,} tokens in {s['train_seconds'] / 60:.1f} min "
                  f"here ({s['tokens'] / s['train_seconds']:,.0f} tok/s); stage {s['wall_seconds'] / 60:.1f} min"
                  + (f"; pretraining validation {s['val_bits_per_byte']:.4f} bits/byte" if name == "pretrain" else ""))
    if stages["lora"] is not None:
        s = stages["lora"]
        print(f"lora: {s['steps']:,} of {s['planned_steps']:,} planned steps ({s['planned_seconds'] / 60:.1f} min), "
              f"{s['tokens']:,} tokens in {s['train_seconds'] / 60:.1f} min here; "
              f"stage {s['wall_seconds'] / 60:.1f} min")


# --- main ---------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=("all", *STAGES), default="all", help="the stage to run (default: all)")
    ap.add_argument("--out", help="folder for everything (default: runs/chatbot-real, runs/chatbot-real-smoke "
                                  "with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="every stage shrunk to a few minutes in all")
    ap.add_argument("--force", action="store_true", help="run the chosen stages again even if their result exists")
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help="the from-scratch recipe's minutes: tokenizer, data, pretraining and SFT (default: 60)")
    ap.add_argument("--pretrain-share", type=float, default=0.68, help="share of the budget for pretraining, "
                    "tokenizer and data included (default: 0.68)")
    ap.add_argument("--sft-share", type=float, default=0.25, help="share of the budget for SFT (default: 0.25)")
    ap.add_argument("--lora-minutes", type=float, default=None, help="minutes of SmolLM2's LoRA (default: 15)")
    ap.add_argument("--eval-items", type=int, default=None, help="held-out contexts (default: 500)")
    ap.add_argument("--chatterbot", action="store_true", help="add ChatterBot's train split to the SFT data")
    ap.add_argument("--no-pretrain-chitchat", action="store_true",
                    help="pretrain on english:train alone (default: chitchat's train conversations too)")
    ap.add_argument("--one-speaker", action="store_true",
                    help="SFT on the assistant's turns only (default: each conversation also with the roles swapped)")
    ap.add_argument("--smol-dtype", choices=("fp32", "bf16"), default="fp32",
                    help="SmolLM2's precision in LoRA and eval (default: fp32, as the from-scratch model; bf16 is "
                         "~2.2x faster on a CPU with AMX and changes the figures a little)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: as chatbot_recipe.py picks)")
    return ap.parse_args()


def check_settings(out: Path, plan: Plan) -> None:
    """Results in OUT come from one plan: a resumed run with other settings would mix two runs."""
    path, settings = out / "settings.json", json.loads(json.dumps(asdict(plan)))
    saved = load_json(path)
    if saved is not None and saved != settings:
        changed = ", ".join(k for k in settings if saved.get(k) != settings[k])
        raise SystemExit(f"{out} holds a run with other settings ({changed}); give another --out")
    out.mkdir(parents=True, exist_ok=True)
    save_result(path, settings)


def main() -> None:
    args = parse_args()
    plan = make_plan(args)
    out = Path(args.out or ("runs/chatbot-real-smoke" if args.smoke else "runs/chatbot-real"))
    threads = args.threads or pick_threads()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    print(f"torch threads: {threads} (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)", flush=True)
    check_settings(out, plan)
    exe, overall, times = gptlab(), time.perf_counter(), {}
    write_data(out, plan)
    trainers = {"pretrain": stage_pretrain, "sft": stage_sft, "lora": stage_lora}
    for stage in STAGES if args.stage == "all" else (args.stage,):
        start = time.perf_counter()
        if stage in trainers:
            if (out / f"{stage}.json").exists() and not args.force:
                print(f"{stage}: done before ({out / stage}.json)", flush=True)
                continue
            if stage == "sft" and not (out / "pretrain.json").exists():
                raise SystemExit(f"sft starts from the pretrained model; run --stage pretrain into {out} first")
            save_result(out / f"{stage}.json", trainers[stage](out, plan, exe))
        elif stage == "eval":
            stage_eval(out, plan, exe, args.force)
        elif (out / "transcripts.md").exists() and not args.force:
            print(f"transcripts: done before ({out / 'transcripts.md'})", flush=True)
            continue
        else:
            print(stage_transcripts(out, plan))
        times[stage] = time.perf_counter() - start
    print_table(out, plan)
    print("\nwall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items())
          + f", total {(time.perf_counter() - overall) / 60:.1f} min (load average now {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
