"""Classification fine-tuning: a language model becomes an N-class classifier.

The recipe of "Build a Large Language Model (From Scratch)", chapter 6 (the spam classifier):

- the output head (C -> vocabulary) is replaced by a small one (C -> N classes), untied from the
  token embedding;
- a text's class logits are the head's output at its **last real token**: in a causal model only
  that position has attended to the whole text. Batches are right-padded, and padding after the
  last token cannot change it, so no attention mask is needed;
- everything is trained, or (``train_last_blocks=K``) only the last K blocks, the final norm and
  the head; the rest keeps what pretraining learned and costs no gradients.

Data is a CSV file (a header naming ``text`` and ``label`` columns) or JSONL (one object with
``text`` and ``label`` per line). The classes are the training file's sorted distinct labels
unless given. Held-out data is a second file or a seeded, stratified fraction of the first.
Training is one more ``Job`` for the one loop (``gptlab.train.loop.run_job``); the checkpoint is a
normal checkpoint directory plus ``classes.json`` (the list of class names).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.config import TrainConfig
from gptlab.data.jsonl import jsonl_records
from gptlab.device import pick_device
from gptlab.errors import UserError
from gptlab.model.transformer import GPT
from gptlab.tokenizers import Tokenizer, load_tokenizer_file
from gptlab.tokenizers.chat_template import bos_of, chat_config, checkpoint_chat_config, with_bos
from gptlab.train.distributed import Dist, world_size
from gptlab.train.loop import Batch, Job, RunResult, run_job
from gptlab.weights import checkpoint as ckpt
from gptlab.weights.load import load_checkpoint

CLASSES = "classes.json"


class Example(NamedTuple):
    """One labelled text and where it came from (``file:line``, for error messages)."""

    text: str
    label: str
    where: str


# --- reading labelled data -------------------------------------------------------------------

def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"data file {path} does not exist; give a .csv or .jsonl file with text and label") from None
    except OSError as e:
        raise UserError(f"cannot read data file {path} ({e.strerror})") from None
    try:
        return data.decode("utf-8-sig")  # -sig: spreadsheets often start a CSV with a byte-order mark
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None


def _csv_rows(path: Path, text: str, delimiter: str) -> Iterator[tuple[str, Any, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = reader.fieldnames
        if header is None:
            raise UserError(f"{path} is empty; its first line must be a header such as text,label")
        missing = [c for c in ("text", "label") if c not in header]
        if missing:
            raise UserError(f"{path}:1: the header {delimiter.join(header)!r} has no {' or '.join(missing)} column; "
                            "the first line must name the columns, e.g. text,label")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            # DictReader puts surplus fields under the key None and fills missing ones with None.
            if None in row or row["text"] is None or row["label"] is None:
                n = sum(row[k] is not None for k in header) + len(row.get(None) or [])
                raise UserError(f"{where}: {n} fields but the header has {len(header)}; quote texts that contain "
                                f"{delimiter!r} or line breaks with double quotes")
            yield where, row["text"], row["label"]
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[str, Any, Any]]:
    for where, obj in jsonl_records(text, str(path), '{"text": "...", "label": "..."}'):
        if not isinstance(obj, dict) or "text" not in obj or "label" not in obj:
            got = f"keys {', '.join(obj)}" if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
            raise UserError(f'{where}: expected an object with "text" and "label", got {got}')
        yield where, obj["text"], obj["label"]


def read_labelled(path: str | Path, classes: Sequence[str] | None = None) -> list[Example]:
    """The labelled texts of a ``.csv``/``.tsv`` (header with ``text`` and ``label``) or
    ``.jsonl`` file. Labels are strings (JSON integers become their decimal text). With
    ``classes``, a label outside them is an error naming its ``file:line``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl", ".ndjson"):
        raise UserError(f"data file {path}: unknown format {suffix or '(no extension)'!r}; use .csv or .tsv (with a "
                        "text,label header) or .jsonl (one {\"text\", \"label\"} object per line)")
    text = _read_text(path)
    rows = _jsonl_rows(path, text) if suffix in (".jsonl", ".ndjson") else \
        _csv_rows(path, text, "\t" if suffix == ".tsv" else ",")
    examples = []
    for where, body, label in rows:
        if not isinstance(body, str) or not body.strip():
            raise UserError(f"{where}: the text is {'empty' if isinstance(body, str) else type(body).__name__}; "
                            "every example needs a non-empty text")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise UserError(f"{where}: the label {label!r} is not a string or whole number")
        label = str(label).strip()
        if not label:
            raise UserError(f"{where}: the label is empty")
        if classes is not None and label not in classes:
            raise UserError(f"{where}: label {label!r} is not one of the classes ({', '.join(classes)}); "
                            "fix the label or name the classes explicitly")
        examples.append(Example(body, label, where))
    if not examples:
        raise UserError(f"{path} holds no examples")
    return examples


def infer_classes(examples: Sequence[Example], source: str | Path) -> list[str]:
    """The distinct labels, sorted (numerically when they are all whole numbers)."""
    labels = set(e.label for e in examples)
    numeric = all(re.fullmatch(r"-?\d+", label) for label in labels)
    classes = sorted(labels, key=int if numeric else None)
    if len(classes) < 2:
        raise UserError(f"{source} has only the label {classes[0]!r}; a classifier needs at least two classes")
    return classes


def split_held_out(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """``(train, held_out)``: about ``fraction`` of each label's examples, chosen by ``seed``,
    are held out (stratified, so a rare class is represented in both parts)."""
    if not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {fraction!r}")
    gen = torch.Generator().manual_seed(seed)
    held = set()
    for label in sorted(set(e.label for e in examples)):
        idx = [i for i, e in enumerate(examples) if e.label == label]
        order = torch.randperm(len(idx), generator=gen).tolist()
        held.update(idx[j] for j in order[:round(len(idx) * fraction)])
    train = [e for i, e in enumerate(examples) if i not in held]
    val = [e for i, e in enumerate(examples) if i in held]
    if not val or not train:
        raise UserError(f"--val-fraction {fraction} of {len(examples)} examples leaves the "
                        f"{'held-out' if not val else 'training'} part empty; give more data, another "
                        "--val-fraction or a separate --val-data file")
    return train, val


# --- the model -------------------------------------------------------------------------------

def freeze_all_but_last(model: GPT, n_blocks: int | None) -> None:
    """Train only the last ``n_blocks`` blocks, the final norm and the head (None: everything)."""
    n_layer = model.config.n_layer
    if n_blocks is not None and not (isinstance(n_blocks, int) and 0 <= n_blocks <= n_layer):
        raise UserError(f"--train-last-blocks must be a whole number from 0 to {n_layer} (the model's layers), "
                        f"got {n_blocks!r}")
    for p in model.parameters():
        p.requires_grad_(n_blocks is None)
    if n_blocks is not None:
        trained = [*model.layers[n_layer - n_blocks:], model.norm, model.lm_head]
        for module in trained:
            module.requires_grad_(True)


def make_classifier(model: GPT, n_classes: int, train_last_blocks: int | None = None) -> GPT:
    """Turn ``model`` (in place) into an ``n_classes`` classifier: a new, untied head
    (C -> n_classes, with a bias as a per-class prior), then freeze as ``freeze_all_but_last``."""
    # The saved config must say "untied", or saving would drop the head as a copy of embed_tokens.
    model.config = dataclasses.replace(model.config, tie_embeddings=False)
    head = nn.Linear(model.config.n_embd, n_classes, bias=True, device=model.embed_tokens.weight.device)
    # Like GPT.init_weights' head: small weights, so the first logits are near 0 and the loss ln(N).
    nn.init.normal_(head.weight, mean=0.0, std=0.02)
    nn.init.zeros_(head.bias)
    model.lm_head = head
    freeze_all_but_last(model, train_last_blocks)
    return model


def class_logits(model: nn.Module, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """(B, N) class logits of right-padded ``ids`` (B, T), read at each row's ``last`` index (B,)."""
    logits, _ = model(ids)  # (B, T, N): the head is N wide, so every position costs little
    return logits[torch.arange(ids.size(0), device=ids.device), last]


def class_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross entropy of a batch ``(ids, last, labels)``, in float32 even under autocast."""
    ids, last, labels = batch
    return F.cross_entropy(class_logits(model, ids, last).float(), labels)


# --- batches ---------------------------------------------------------------------------------

def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], block_size: int,
                 sources: Sequence[str] | None = None, bos: int | None = None) -> tuple[list[list[int]], int]:
    """Token ids of each text, with ``bos`` in front where the model reads one (``bos_id``), cut
    to the first ``block_size`` tokens; and how many were cut."""
    seqs, truncated = [], 0
    for i, text in enumerate(texts):
        where = sources[i] if sources is not None else f"text {i + 1}"
        try:
            ids = tokenizer.encode(text)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        if not ids:
            raise UserError(f"{where}: the text encodes to no tokens; give a non-empty text")
        ids = with_bos(ids, bos)
        truncated += len(ids) > block_size
        seqs.append(ids[:block_size])
    return seqs, truncated


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: ids (B, T) and each row's last real index (B,)."""
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s)
    return ids, lengths - 1


class ClassBatches:
    """Endless shuffled batches ``(ids, last, labels)``: epoch after epoch, each a permutation
    drawn from a seeded generator. The generator, the epoch's order and the position in it are
    the state, so a resumed run sees exactly the batches it would have seen."""

    def __init__(self, seqs: list[list[int]], labels: list[int], batch_size: int, seed: int, pad_id: int):
        self.seqs, self.labels, self.batch_size, self.pad_id = seqs, labels, batch_size, pad_id
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(seqs), generator=self.generator)
        self.pos = 0

    def next(self) -> Batch:
        picked = []
        while len(picked) < self.batch_size:
            if self.pos == len(self.order):
                self.order, self.pos = torch.randperm(len(self.seqs), generator=self.generator), 0
            take = self.order[self.pos:self.pos + self.batch_size - len(picked)].tolist()
            picked += take
            self.pos += len(take)
        ids, last = pad_batch([self.seqs[i] for i in picked], self.pad_id)
        return ids, last, torch.tensor([self.labels[i] for i in picked])

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": self.order.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.pos = state["order"].clone(), int(state["pos"])


def fixed_batches(seqs: Sequence[list[int]], labels: Sequence[int], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """``(ids, last, labels)`` batches in the given order."""
    for i in range(0, len(seqs), batch_size):
        ids, last = pad_batch(seqs[i:i + batch_size], pad_id)
        yield ids, last, torch.tensor(labels[i:i + batch_size])


@torch.no_grad()
def class_probabilities(model: nn.Module, seqs: Sequence[list[int]], pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """(n, N) class probabilities of token sequences, in eval mode, on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # Batches of similar lengths waste little compute on padding (a 200-token text would pad a
    # batch of 10-token ones 20-fold); the rows go back to the given order at the end.
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    probs = [class_logits(model, ids.to(device), last.to(device)).float().softmax(-1).cpu()
             for ids, last, _ in fixed_batches([seqs[i] for i in order], [0] * len(seqs), batch_size, pad_id)]
    model.train(was_training)
    by_length = torch.cat(probs)
    out = torch.empty_like(by_length)
    out[order] = by_length
    return out


def _pad_id(tokenizer: Tokenizer) -> int:
    # Any id works: padding sits after the last real token, which a causal model never lets it reach.
    return tokenizer.eot_id if tokenizer.eot_id is not None else 0


# --- the job ---------------------------------------------------------------------------------

def save_classifier(path: Path, model: GPT, tokenizer: Tokenizer, classes: Sequence[str],
                    train_config: dict[str, Any] | None = None, train_state: dict[str, Any] | None = None,
                    chat: dict[str, Any] | None = None) -> None:
    """A normal checkpoint directory plus ``classes.json``, and the base model's chat settings
    (``chat``: its BOS among them) where it has any."""
    extra = {CLASSES: list(classes), **({ckpt.CHAT_CONFIG: chat} if chat else {})}
    ckpt.save_checkpoint(path, model, tokenizer, train_config, train_state, extra_json=extra)


def classify_job(model: GPT, tokenizer: Tokenizer, classes: Sequence[str], train: Sequence[Example],
                 val: Sequence[Example], cfg: TrainConfig, chat: dict[str, Any] | None = None) -> Job:
    """The loop's job for a model already given its class head (``make_classifier``); ``chat``:
    the base model's chat settings (``checkpoint_chat_config``), which say whether texts start
    with a BOS and are kept with the classifier.

    Evaluations use fixed, seeded samples of at most ``cfg.eval_batches`` batches of each part
    (the same examples every time, classes mixed even if a file is sorted by label); the held-out
    part also gives ``val_accuracy``.
    """
    index = {c: i for i, c in enumerate(classes)}
    block, pad_id, bos = model.config.block_size, _pad_id(tokenizer), bos_of(chat or {}, tokenizer)
    parts = {}
    truncated = 0
    for split, examples in (("train", train), ("val", val)):
        seqs, cut = encode_texts(tokenizer, [e.text for e in examples], block, [e.where for e in examples], bos)
        parts[split] = (seqs, [index[e.label] for e in examples])
        truncated += cut

    def eval_sample(split: str) -> tuple[list[list[int]], list[int]]:
        seqs, labels = parts[split]
        order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(cfg.seed + 1))
        order = order[:cfg.eval_batches * cfg.batch_size].tolist()
        return [seqs[i] for i in order], [labels[i] for i in order]

    samples = {split: eval_sample(split) for split in parts}

    def eval_batches(split: str) -> Iterator[Batch]:
        return fixed_batches(*samples[split], cfg.batch_size, pad_id)

    def eval_metrics(m: nn.Module) -> dict[str, float]:
        seqs, labels = samples["val"]
        predicted = class_probabilities(m, seqs, pad_id, cfg.batch_size).argmax(-1)
        return {"val_accuracy": (predicted == torch.tensor(labels)).float().mean().item()}

    if cfg.fsdp:
        raise UserError("--fsdp is for pretraining and full instruction fine-tuning; train a classifier with DDP "
                        "(drop --fsdp)")

    def save(path: Path, train_state: dict[str, Any] | None, weights=None, folders=None) -> None:
        save_classifier(path, model, tokenizer, classes, cfg.to_dict() if train_state else None, train_state, chat)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cut = f"; {truncated:,} texts cut to {block} tokens" if truncated else ""
    return Job(model, ClassBatches(*parts["train"], cfg.batch_size * world_size(), cfg.seed, pad_id), eval_batches,
               save,
               description=f"fine-tuning a {len(classes)}-class classifier ({trainable:,} of "
                           f"{model.num_parameters():,} parameters trained) on {len(train):,} examples, "
                           f"{len(val):,} held out{cut}",
               loss=class_loss, eval_metrics=eval_metrics)


# --- evaluation report -----------------------------------------------------------------------

def confusion_matrix(true: Sequence[int], predicted: Sequence[int], n_classes: int) -> list[list[int]]:
    """``matrix[t][p]``: how many examples of class t were predicted as class p."""
    matrix = [[0] * n_classes for _ in range(n_classes)]
    for t, p in zip(true, predicted, strict=True):
        matrix[t][p] += 1
    return matrix


def format_report(classes: Sequence[str], matrix: Sequence[Sequence[int]]) -> str:
    """Accuracy and the confusion matrix with class names (rows: true class, columns: predicted)."""
    total = sum(map(sum, matrix))
    correct = sum(matrix[i][i] for i in range(len(classes)))
    names, corner = [str(c) for c in classes], "true \\ predicted"
    first = max(len(corner), *map(len, names))
    width = max(*map(len, names), *(len(str(v)) for row in matrix for v in row))
    lines = [f"accuracy {correct / total:.2%} ({correct:,} of {total:,} held-out examples)",
             f"{corner:<{first}}  " + "  ".join(f"{n:>{width}}" for n in names)]
    lines += [f"{name:<{first}}  " + "  ".join(f"{v:>{width}}" for v in row) for name, row in zip(names, matrix)]
    return "\n".join(lines)


# --- loading and predicting ------------------------------------------------------------------

@dataclass
class Classifier:
    path: Path
    model: GPT
    tokenizer: Tokenizer
    classes: list[str]
    bos: int | None = None
    """the id in front of every text, where the base model reads one (``bos_id``)"""


def load_classifier(path: str | Path, device: str | torch.device = "cpu", prefer: str = "best") -> Classifier:
    """A classifier saved by ``run_classify``: a run directory (its ``best/`` by default) or a
    checkpoint directory with ``classes.json``."""
    ckpt_dir = ckpt.resolve_checkpoint(path, prefer)
    try:
        classes = json.loads((ckpt_dir / CLASSES).read_text())
    except FileNotFoundError:
        raise UserError(f"{ckpt_dir} has no {CLASSES}, so it is not a classifier; make one with gptlab finetune "
                        "classify MODEL --data FILE --out DIR") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{ckpt_dir / CLASSES} is corrupt ({e}); use another checkpoint") from None
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
        raise UserError(f"{ckpt_dir / CLASSES} must be a list of at least two class names")
    model = make_classifier(GPT(ckpt.load_model_config(ckpt_dir)), len(classes))
    ckpt.load_weights(model, ckpt_dir)
    tokenizer = load_tokenizer_file(ckpt_dir / ckpt.TOKENIZER)
    return Classifier(ckpt_dir, model.to(device).eval(), tokenizer, classes, bos_of(chat_config(ckpt_dir), tokenizer))


def confusion_of(classifier: Classifier, examples: Sequence[Example], batch_size: int = 32) -> list[list[int]]:
    """The confusion matrix (``confusion_matrix``) of ``classifier`` on labelled ``examples``,
    whose labels are among its classes (``read_labelled(path, classifier.classes)``)."""
    seqs, _ = encode_texts(classifier.tokenizer, [e.text for e in examples], classifier.model.config.block_size,
                           [e.where for e in examples], classifier.bos)
    predicted = class_probabilities(classifier.model, seqs, _pad_id(classifier.tokenizer), batch_size).argmax(-1)
    true = [classifier.classes.index(e.label) for e in examples]
    return confusion_matrix(true, predicted.tolist(), len(classifier.classes))


def predict(classifier: Classifier, texts: Sequence[str], batch_size: int = 32) -> list[tuple[str, float]]:
    """The most likely class of each text and its probability; texts longer than the model's
    context are cut to their first ``block_size`` tokens, as in training."""
    seqs, _ = encode_texts(classifier.tokenizer, texts, classifier.model.config.block_size, bos=classifier.bos)
    probs = class_probabilities(classifier.model, seqs, _pad_id(classifier.tokenizer), batch_size)
    best, idx = probs.max(-1)
    return [(classifier.classes[i], p) for i, p in zip(idx.tolist(), best.tolist())]


# --- the command -----------------------------------------------------------------------------

@dataclass
class ClassifyResult:
    run: RunResult
    #: the checkpoint the report is about (the run's best/, which `gptlab classify OUT` uses)
    checkpoint: Path
    classes: list[str]
    accuracy: float
    matrix: list[list[int]]
    report: str


def run_classify(model: str, data: str | Path, out: str | Path, cfg: TrainConfig, val_data: str | Path | None = None,
                 val_fraction: float = 0.1, classes: Sequence[str] | None = None,
                 train_last_blocks: int | None = None, show_progress: bool = True,
                 d: Dist | None = None) -> ClassifyResult:
    """``gptlab finetune classify``: fine-tune MODEL (any MODEL argument) into a classifier of
    ``data`` in run directory ``out``, then print the held-out accuracy and confusion matrix of
    its best checkpoint. The caller decides whether ``out`` may be written (see ``claim_out``)."""
    out = Path(out)
    if classes is not None:
        classes = [str(c) for c in classes]
        if len(set(classes)) != len(classes) or len(classes) < 2:
            raise UserError(f"--classes must name at least two distinct classes, got {', '.join(classes)}")
    examples = read_labelled(data, classes)
    classes = classes or infer_classes(examples, data)
    if val_data is not None:
        train, val = examples, read_labelled(val_data, classes)
    else:
        train, val = split_held_out(examples, val_fraction, cfg.seed)
    loaded = load_checkpoint(model)
    torch.manual_seed(cfg.seed)  # the head's initial weights
    make_classifier(loaded.model, len(classes), train_last_blocks)
    job = classify_job(loaded.model, loaded.tokenizer, classes, train, val, cfg, checkpoint_chat_config(loaded))
    run = run_job(job, cfg, out, None, show_progress, d)

    best = load_classifier(out, pick_device(cfg.device))
    matrix = confusion_of(best, val, cfg.batch_size)
    report = format_report(classes, matrix)
    if d is None or d.is_main:
        print(f"{best.path}:\n{report}")
    accuracy = sum(matrix[i][i] for i in range(len(classes))) / len(val)
    return ClassifyResult(run, best.path, classes, accuracy, matrix, report)
