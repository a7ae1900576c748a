"""Supervised fine-tuning (SFT): teach a language model to answer in a conversation.

Data is chat JSONL (``{"messages": [{"role": ..., "content": ...}, ...]}``) or Alpaca records
(``instruction``, optional ``input``, ``output``) in a JSON list or JSONL. Each conversation is
rendered with the model's own chat template into token ids and a mask that is 1 exactly on the
assistant's answers (including the marker that ends an answer, so the model learns to stop).
The loss counts only those tokens: the model is taught to answer, not to predict the user's
questions or the template's fixed markers.

How the mask is found: the template renders the conversation up to each answer with the
generation prompt (``<|im_start|>assistant\\n``), then up to and including the answer; the
difference between the two texts is the answer as the template writes it. The prompt pieces and
the answer pieces are tokenized separately, as they are at inference time (the prompt is encoded
whole, the answer is generated token by token).

Batches are length-grouped: examples of similar length share a batch, so little compute goes to
padding, and the order of batches is still random.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gptlab.data.jsonl import jsonl_records
from gptlab.errors import Problems, Settings, UserError, is_number
from gptlab.tokenizers import Tokenizer
from gptlab.tokenizers.chat_template import bos_id, chat_format, render_chat, with_bos

if TYPE_CHECKING:
    from gptlab.train.distributed import Dist

ROLES = ("system", "user", "assistant")
IGNORE = -100  # targets the loss skips (cross_entropy's ignore_index)


@dataclass
class Example:
    """One rendered conversation: token ids and a 0/1 mask marking the assistant's tokens."""

    ids: list[int]
    mask: list[int]


# --- reading ----------------------------------------------------------------------------------

def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: message {i + 1} must be an object with string 'role' and 'content'")
        role = m["role"]
        if role not in ROLES:
            raise UserError(f"{where}: message {i + 1} has unknown role {role!r}; use one of {', '.join(ROLES)}")
        out.append({"role": role, "content": m["content"]})
    turns = out[1:] if out[0]["role"] == "system" else out
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            n = i + 1 + (len(out) - len(turns))
            raise UserError(f"{where}: message {n} is {m['role']!r} but {expected!r} was expected; after an optional "
                            "system message, user and assistant turns alternate, starting with user")
        if expected == "assistant" and not m["content"].strip():
            raise UserError(f"{where}: message {i + 1 + len(out) - len(turns)} is an empty assistant turn; give the "
                            "answer or drop the conversation")
    if not turns or turns[-1]["role"] != "assistant":
        raise UserError(f"{where}: the conversation must end with an assistant answer (that is what SFT learns)")
    return out


def _record_to_messages(record: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return _check_messages(record["messages"], where)
    if "instruction" in record and "output" in record:
        fields = {k: record.get(k, "") for k in ("instruction", "input", "output")}
        bad = [k for k, v in fields.items() if not isinstance(v, str)]
        if bad:
            raise UserError(f"{where}: Alpaca field {bad[0]!r} must be a string")
        prompt = fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"].strip() else "")
        return _check_messages([{"role": "user", "content": prompt},
                                {"role": "assistant", "content": fields["output"]}], where)
    raise UserError(f"{where}: expected a chat record with 'messages' or an Alpaca record with 'instruction' and "
                    f"'output'; got keys {sorted(record)[:6]}")


def read_conversations(path: str | Path) -> list[list[dict[str, str]]]:
    """Conversations from chat JSONL or Alpaca JSON/JSONL; a bad record is reported by file and
    line (JSONL) or record number (a JSON list)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; give a chat JSONL or Alpaca JSON file") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory; give a chat JSONL or Alpaca JSON file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); give a chat JSONL or Alpaca JSON file") from None
    stripped = text.lstrip()
    if stripped.startswith("["):  # one JSON list of records
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        return [_record_to_messages(r, f"{path} record {i + 1}") for i, r in enumerate(records)]
    out = [_record_to_messages(record, where)
           for where, record in jsonl_records(text, str(path), '{"messages": [...]}')]
    if not out:
        raise UserError(f"{path} holds no conversations")
    return out


# --- rendering --------------------------------------------------------------------------------

def render_example(messages: list[dict[str, str]], tokenizer: Tokenizer, template: str,
                   variables: dict[str, Any] | None = None, bos: int | None = None) -> Example:
    """Token ids and the assistant mask of one conversation (see the module docstring), with one
    ``bos`` in front where the model reads one (``with_bos``: the template's own or this one), so
    the text trained on starts as the engine's prompt does."""
    variables = variables or {}
    ids: list[int] = []
    mask: list[int] = []
    done = ""  # the text already turned into ids

    def add(text: str, bit: int) -> None:
        piece = tokenizer.encode(text, allowed_special="all") if text else []
        ids.extend(piece)
        mask.extend([bit] * len(piece))

    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render_chat(template, messages[:i], add_generation_prompt=True, **variables)
        full = render_chat(template, messages[:i + 1], **variables)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise UserError("the chat template does not render a conversation as an extension of its first turns "
                            "(it rewrites earlier turns), so the answers cannot be masked exactly; use a model with a "
                            "prefix-stable template")
        add(prompt[len(done):], 0)
        add(full[len(prompt):], 1)
        done = full
    front = with_bos(ids, bos)
    return Example(front, [0] * (len(front) - len(ids)) + mask)


@dataclass
class RenderReport:
    examples: list[Example]
    truncated: int  # conversations cut to the context window
    dropped: int  # conversations with no answer token left after cutting


def render_all(conversations: list[list[dict[str, str]]], tokenizer: Tokenizer, template: str,
               variables: dict[str, Any], max_length: int, bos: int | None = None) -> RenderReport:
    """Render every conversation, cutting each to ``max_length`` tokens (the model sees
    ``max_length - 1`` inputs); one left with no answer token to learn from is dropped."""
    examples, truncated, dropped = [], 0, 0
    for messages in conversations:
        ex = render_example(messages, tokenizer, template, variables, bos)
        if len(ex.ids) > max_length:
            truncated += 1
            ex = Example(ex.ids[:max_length], ex.mask[:max_length])
        if not any(ex.mask[1:]):  # the first token is never a target
            dropped += 1
            continue
        examples.append(ex)
    return RenderReport(examples, truncated, dropped)


def render_for(checkpoint, conversations: list[list[dict[str, str]]], max_length: int) -> RenderReport:
    """``render_all`` as a loaded checkpoint is talked to: its chat template (``chat_format``)
    and its BOS (``bos_id``), exactly what ``gptlab chat`` prompts it with."""
    template, variables = chat_format(checkpoint)
    return render_all(conversations, checkpoint.tokenizer, template, variables, max_length, bos_id(checkpoint))


# --- batches ----------------------------------------------------------------------------------

def collate(examples: list[Example], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (B, T) and targets (B, T): target t is token t+1 where it is an assistant token,
    else ignored. Padding (on the right, so it never sits between real tokens) is ignored too."""
    T = max(len(e.ids) for e in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.ids) - 1
        ids = torch.tensor(e.ids)
        x[row, :n] = ids[:-1]
        y[row, :n] = torch.where(torch.tensor(e.mask[1:], dtype=torch.bool), ids[1:], IGNORE)
    return x, y


class LengthGroupedBatches:
    """Endless batches of examples of similar length, in random order, resumable exactly.

    Each epoch shuffles the examples, sorts each stretch of ``group`` batches' worth by length,
    cuts it into batches, and shuffles the batches. The state is the generator as it was at the
    start of the epoch plus the position in it, so loading it rebuilds the same epoch."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int = 0, group: int = 32):
        if not examples:
            raise UserError("no training examples are left; give more conversations")
        self.examples, self.batch_size, self.pad_id, self.group = examples, batch_size, pad_id, group
        self.generator = torch.Generator().manual_seed(seed)
        self._start_epoch()

    def _start_epoch(self) -> None:
        self.epoch_start = self.generator.get_state()
        perm = torch.randperm(len(self.examples), generator=self.generator).tolist()
        stretch = self.batch_size * self.group
        batches = []
        for s in range(0, len(perm), stretch):
            part = sorted(perm[s:s + stretch], key=lambda i: len(self.examples[i].ids))
            batches += [part[b:b + self.batch_size] for b in range(0, len(part), self.batch_size)]
        order = torch.randperm(len(batches), generator=self.generator).tolist()
        self.epoch = [batches[k] for k in order]
        self.position = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position == len(self.epoch):
            self._start_epoch()
        batch = self.epoch[self.position]
        self.position += 1
        return collate([self.examples[i] for i in batch], self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_start": self.epoch_start, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["epoch_start"])
        self._start_epoch()
        self.position = state["position"]


def fixed_batches(examples: list[Example], batch_size: int, max_batches: int, pad_id: int = 0
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``max_batches`` batches in a fixed order (evaluation), sorted by length to pad little."""
    ordered = sorted(examples, key=lambda e: len(e.ids))
    for b in range(0, min(len(ordered), batch_size * max_batches), batch_size):
        yield collate(ordered[b:b + batch_size], pad_id)


def split_holdout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded (train, held-out) split with at least one held-out item."""
    if len(items) < 2:
        raise UserError(f"{len(items)} conversation(s) cannot be split into training and validation; give more "
                        "or a separate --val-data file")
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(len(items) - 1, max(1, round(len(items) * fraction)))
    return [items[i] for i in perm[n_val:]], [items[i] for i in perm[:n_val]]


# --- the fine-tuning job ----------------------------------------------------------------------

@dataclass
class SFTOptions(Settings):
    """What ``gptlab finetune sft`` needs beyond the optimisation settings of ``TrainConfig``."""

    WHAT = "fine-tuning options"

    val_data: str | None = None
    """A separate chat/Alpaca file for validation (default: hold out --val-fraction of --data)."""
    val_fraction: float = 0.1
    """Share of the conversations held out for validation when --val-data is not given."""
    max_length: int | None = None
    """Longest conversation in tokens; longer ones are cut (default: the model's context, at most 2048)."""
    lora: Any = None
    """A gptlab.model.lora.LoRAConfig to train adapters only, or None to train every weight."""

    def _check(self, p: Problems) -> None:
        p.must(is_number(self.val_fraction) and 0 < self.val_fraction < 1, "val_fraction", "between 0 and 1")
        p.whole("max_length", minimum=2, optional=True)  # a conversation needs an input and a target


@torch.no_grad()
def answer_loss(checkpoint, conversations: list[list[dict[str, str]]], batch_size: int = 8) -> float:
    """Mean loss per answer token of a loaded checkpoint on ``conversations`` (what SFT lowers)."""
    model = checkpoint.model.eval()
    examples = render_for(checkpoint, conversations, model.config.block_size + 1).examples
    total, count = 0.0, 0
    for b in range(0, len(examples), batch_size):
        x, y = collate(examples[b:b + batch_size])
        logits, _ = model(x, y)
        total += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                                                   reduction="sum").item()
        count += (y != IGNORE).sum().item()
    return total / count


def run_sft(model: str, data: str, out: str | Path, cfg, options: SFTOptions | None = None,
            show_progress: bool = True, d: Dist | None = None):
    """Fine-tune ``model`` (any MODEL argument) on the conversations in ``data`` with the one
    training loop; the result in ``out`` is a checkpoint (or, with LoRA, an adapter) that
    ``chat``, ``serve``, ``sample`` and ``export`` accept. Returns the loop's ``RunResult``.
    ``d``: the process group the caller joined under torchrun (see ``run_job``)."""
    from gptlab.inference.engine import Engine, SamplingParams
    from gptlab.model import lora as lora_lib
    from gptlab.tokenizers.chat_template import checkpoint_chat_config
    from gptlab.train.distributed import world_size
    from gptlab.train.loop import Job, run_job
    from gptlab.weights import checkpoint as ckpt
    from gptlab.weights.adapter import save_adapter
    from gptlab.weights.load import load_checkpoint

    options = options or SFTOptions()
    out = Path(out)
    torch.manual_seed(cfg.seed)  # LoRA's initial A matrices
    base = load_checkpoint(model)
    net, tokenizer = base.model.float(), base.tokenizer
    chat = checkpoint_chat_config(base)
    max_length = options.max_length or min(net.config.block_size, 2048)
    if max_length > net.config.block_size:
        raise UserError(f"--max-length {max_length} exceeds the model's context of {net.config.block_size} tokens")

    conversations = read_conversations(data)
    if options.val_data is not None:
        train_convs, val_convs = conversations, read_conversations(options.val_data)
    else:
        train_convs, val_convs = split_holdout(conversations, options.val_fraction, cfg.seed)
    rendered = {}
    for split, convs in (("train", train_convs), ("val", val_convs)):
        report = render_for(base, convs, max_length + 1)
        if report.truncated or report.dropped:
            print(f"{split}: {report.truncated} of {len(convs)} conversations were longer than {max_length} tokens "
                  f"and were cut; {report.dropped} had no answer left and were dropped")
        rendered[split] = report.examples
    train_ex, val_ex = rendered["train"], rendered["val"]
    if not val_ex:
        raise UserError("no validation conversation is left after cutting to --max-length; raise it")

    source = str(Path(model).resolve()) if Path(model).exists() else model
    if options.lora is not None and cfg.fsdp:
        raise UserError("--fsdp shards a full fine-tuning; LoRA adapters are small enough to train with DDP (drop "
                        "--fsdp)")
    if options.lora is not None:
        adapted = lora_lib.add_lora(net, options.lora)
        what = f"LoRA (rank {options.lora.rank}) on {len(adapted)} layers, {lora_lib.train_stats(net)}"

        def save(path: Path, train_state: dict[str, Any] | None, weights=None, folders=None) -> None:
            save_adapter(path, net, options.lora, source, train_state=train_state,
                                  train_config=cfg.to_dict() if train_state else None)
    else:
        what = f"all {net.num_parameters():,} parameters"

        def save(path: Path, train_state: dict[str, Any] | None, weights=None, folders=None) -> None:
            ckpt.save_checkpoint(path, net, tokenizer, cfg.to_dict() if train_state else None, train_state,
                                 extra_json={ckpt.CHAT_CONFIG: chat} if chat else None, state_dict=weights,
                                 folders=folders)

    probe = val_convs[0]
    probe = probe[:max(i for i, m in enumerate(probe) if m["role"] == "assistant")]

    def sample(m) -> str:
        was_training = net.training
        engine = Engine(base, device=net.embed_tokens.weight.device)  # puts the model in eval mode
        room = min(64, net.config.block_size // 4)
        try:
            ids = engine.chat_prompt(probe, room).ids
            answer = "".join(engine.stream(ids, SamplingParams(temperature=0.0, max_new_tokens=room)))
        except UserError:  # a long held-out conversation in a small context: nothing to show
            return ""
        finally:
            net.train(was_training)
        return f"{probe[-1]['content']}\n-> {answer}"

    pad = tokenizer.eot_id if tokenizer.eot_id is not None else 0
    n_answer = sum(sum(e.mask[1:]) for e in train_ex)
    n_tokens = sum(len(e.ids) for e in train_ex)
    job = Job(net, LengthGroupedBatches(train_ex, cfg.batch_size * world_size(), cfg.seed, pad),
              lambda split: fixed_batches(val_ex if split == "val" else train_ex, cfg.batch_size, cfg.eval_batches,
                                          pad),
              save, description=f"fine-tuning {what} of {model} on {len(train_ex):,} conversations ({n_tokens:,} "
                                f"tokens, {n_answer:,} of them answers)", sample=sample)
    return run_job(job, cfg, out, None, show_progress, d)
