"""Next-utterance selection on conversations (``gptlab eval --chat FILE``): hits@1, the ConvAI2
measure of whether a model tells the real reply from others.

Each line of the file is a conversation ``{"messages": [{"role", "content"}, ...]}`` (the chat
JSONL that ``gptlab finetune sft`` reads). Its last assistant message is the true reply and the
messages before it are the context. K - 1 distractors are the true replies of other
conversations, drawn from the whole file with a generator seeded by ``seed`` and the item's
index, so an item's candidates do not change with ``limit``; a distractor never has the true
reply's text (identical texts would tie). A file may hold several items cut from one
conversation (its replies at several depths); lines that say so with the same
``"conversation": ID`` are never each other's distractors, which would be on the item's own
topic.

Each candidate is scored by the model's log-likelihood of the reply's tokens after the context
rendered in the model's chat template: the reply is the text that rendering it adds after the
generation prompt (its end-of-turn marker included), tokenized as ``finetune sft`` tokenizes it.
An item is a hit when the true reply scores strictly higher than every distractor; guessing
scores 1/K.

A summed log-likelihood favours short replies ("yeah", "haha") whatever the context, so
``hits_at_1_norm`` also ranks the candidates by log-likelihood per character of the reply, as
``acc_norm`` does the endings of a multiple-choice item.

The true replies' log-likelihood also gives bits per byte of the replies: total bits over the
UTF-8 bytes of the replies' contents, the same denominator for every model and template.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gptlab.errors import UserError
from gptlab.inference.eval_scoring import Row, Scorer, continuation_row, encode_exactly, jsonl_file_records
from gptlab.tokenizers import Tokenizer
from gptlab.tokenizers.chat_template import render_chat

EXAMPLE = '{"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]}'


@dataclass(frozen=True)
class Dialogue:
    where: str
    """FILE:LINE of the conversation"""
    context: list[dict[str, str]]
    """the messages before the reply"""
    reply: str
    """the content of the last assistant message"""
    conversation: str | None = None
    """the record's ``conversation`` ID: items with the same one are cut from one conversation"""


def read_dialogues(path: str | Path) -> list[Dialogue]:
    """The conversations of a chat JSONL file, split at their last assistant message."""
    return [_split_record(value, where) for where, value in jsonl_file_records(path, EXAMPLE)]


def _split_record(value: Any, where: str) -> Dialogue:
    messages = value.get("messages") if isinstance(value, dict) else None
    if not isinstance(messages, list):
        raise UserError(f"{where}: expected an object with a 'messages' list, such as {EXAMPLE}")
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: message {i} must be an object with string 'role' and 'content'")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise UserError(f"{where}: the conversation has no assistant message, so there is no reply to select; "
                        "end it with the assistant's reply or drop it")
    if not messages[last]["content"].strip():
        raise UserError(f"{where}: the last assistant message (message {last + 1}) is empty; there is no reply to "
                        "select")
    conversation = value.get("conversation")
    if conversation is not None and (isinstance(conversation, bool) or not isinstance(conversation, (str, int))):
        raise UserError(f"{where}: 'conversation' must be a string or an integer ID (records with the same one are "
                        "items of one conversation)")
    context = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
    return Dialogue(where, context, messages[last]["content"], None if conversation is None else str(conversation))


def check_candidates(dialogues: list[Dialogue], k: int, path: str) -> None:
    """Refuse a file with fewer than ``k`` conversations, fewer than ``k`` different replies, or
    an item with fewer than ``k - 1`` replies of other conversations to draw from."""
    replies = [d.reply for d in dialogues]
    if len(replies) < k:
        raise UserError(f"{path} holds {len(replies)} conversation(s), fewer than the {k} candidates of --k {k}; "
                        "give more conversations or a smaller --k")
    if len(set(replies)) < k:
        raise UserError(f"{path} holds {len(set(replies))} different replies, fewer than the {k} candidates of "
                        f"--k {k}; give more conversations or a smaller --k")
    for d, available in zip(dialogues, _other_replies(dialogues)):
        if available < k - 1:
            raise UserError(f"{d.where}: conversation {d.conversation!r} leaves {available} different replies of other "
                            f"conversations, fewer than the {k - 1} distractors of --k {k}; give more conversations "
                            "or a smaller --k")


def _other_replies(dialogues: list[Dialogue]) -> list[int]:
    """For each dialogue, how many different reply texts other conversations have, its own
    reply's text left out: what its distractors can be drawn from."""
    owners: dict[str, set[str | None]] = {}  # reply text -> the conversations it is a reply of
    for d in dialogues:
        owners.setdefault(d.reply, set()).add(d.conversation)
    only_in: Counter[str] = Counter()  # conversation -> the texts no other conversation has
    for convs in owners.values():
        if len(convs) == 1 and None not in convs:
            only_in[next(iter(convs))] += 1
    # A dialogue without an ID is its own conversation: only its own text is left out.
    return [len(owners) - (0 if d.conversation is None else only_in[d.conversation])
            - (d.conversation is None or len(owners[d.reply]) > 1) for d in dialogues]


def draw_distractors(dialogues: list[Dialogue], k: int, seed: int, n_items: int, path: str) -> list[list[int]]:
    """For each of the first ``n_items`` dialogues, the indices of ``k - 1`` others of other
    conversations whose replies differ from its own and from each other (see the module
    docstring)."""
    check_candidates(dialogues, k, path)
    drawn = []
    for i in range(n_items):
        rng = random.Random(f"{seed}:{i}")  # a string seed is hashed the same way on every run and machine
        chosen, texts, own = [], {dialogues[i].reply}, dialogues[i].conversation
        while len(chosen) < k - 1:
            j = rng.randrange(len(dialogues))
            if dialogues[j].reply not in texts and (own is None or dialogues[j].conversation != own):
                chosen.append(j)
                texts.add(dialogues[j].reply)
        drawn.append(chosen)
    return drawn


@dataclass(frozen=True)
class ChatTemplate:
    """How the model is talked to: a Jinja template and its variables (``chat_format``)."""

    template: str
    variables: dict[str, str]

    def reply_row(self, tokenizer: Tokenizer, dialogue: Dialogue, candidate: Dialogue, block_size: int,
                  bos: int | None = None) -> Row:
        """The row that scores ``candidate``'s reply after ``dialogue``'s context, with one ``bos``
        in front (if not None; the template's own where it writes one)."""
        where = dialogue.where if candidate is dialogue else f"{dialogue.where} (the reply of {candidate.where})"
        prompt = render_chat(self.template, dialogue.context, add_generation_prompt=True, **self.variables)
        full = render_chat(self.template, [*dialogue.context, {"role": "assistant", "content": candidate.reply}],
                           **self.variables)
        if not full.startswith(prompt):
            raise UserError(f"{where}: the chat template does not render the reply after the generation prompt (it "
                            "rewrites the earlier text), so the reply cannot be scored alone; use a model with a "
                            "prefix-stable template")
        context = encode_exactly(tokenizer, prompt, dialogue.where, allowed_special="all")
        reply = encode_exactly(tokenizer, full[len(prompt):], where, allowed_special="all")
        return continuation_row(context, reply, block_size, where, bos)


@dataclass(frozen=True)
class ChatResult:
    items: int
    k: int
    hits_at_1: float
    hits_at_1_norm: float
    """candidates ranked by log-likelihood per character of the reply"""
    chance: float
    reply_bits_per_byte: float
    """bits of the true replies (their end-of-turn marker included) per UTF-8 byte of their contents"""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CandidateScores:
    """Each item's ``k`` candidates (its true reply first) and their log-likelihoods (nats)."""

    items: list[Dialogue]
    candidates: list[list[Dialogue]]
    """per item: the item itself (its true reply), then the conversations whose replies are its distractors"""
    logliks: list[list[float]]


def score_candidates(scorer: Scorer, tokenizer: Tokenizer, chat: ChatTemplate, dialogues: list[Dialogue],
                     k: int = 5, seed: int = 0, limit: int | None = None, path: str = "--chat") -> CandidateScores:
    """The log-likelihood of each candidate reply after each of the first ``limit`` dialogues."""
    items = dialogues[:limit]
    distractors = draw_distractors(dialogues, k, seed, len(items), path)
    candidates = [[d, *(dialogues[j] for j in distractors[i])] for i, d in enumerate(items)]
    rows = [chat.reply_row(tokenizer, d, c, scorer.block_size, scorer.bos_id)
            for d, group in zip(items, candidates) for c in group]
    flat = scorer.score(rows, desc="eval chat", unit="reply")
    return CandidateScores(items, candidates, [flat[n : n + k] for n in range(0, len(flat), k)])


def evaluate_chat(scorer: Scorer, tokenizer: Tokenizer, chat: ChatTemplate, dialogues: list[Dialogue], k: int = 5,
                  seed: int = 0, limit: int | None = None, path: str = "--chat") -> ChatResult:
    """hits@1 of ``k`` candidates over the first ``limit`` dialogues (all by default)."""
    scores = score_candidates(scorer, tokenizer, chat, dialogues, k, seed, limit, path)
    per_char = [[v / len(c.reply) for v, c in zip(values, group)]
                for values, group in zip(scores.logliks, scores.candidates)]
    true = [values[0] for values in scores.logliks]
    n_bytes = sum(len(d.reply.encode("utf-8")) for d in scores.items)
    return ChatResult(len(scores.items), k, hit_rate(scores.logliks), hit_rate(per_char), 1 / k,
                      -sum(true) / math.log(2) / n_bytes)


def is_hit(scores: list[float]) -> bool:
    """Whether the first score (the true reply's) is strictly the highest of an item's."""
    return scores[0] > max(scores[1:])


def hit_rate(groups: list[list[float]]) -> float:
    """The share of the items whose true reply scores strictly highest (``is_hit``)."""
    return sum(map(is_hit, groups)) / len(groups)
