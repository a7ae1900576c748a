"""Classification fine-tuning: data files, the class head, freezing, resume, save/load/predict."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptlab.config import resolve_config
from gptlab.errors import UserError
from gptlab.finetune import classify as cls
from gptlab.model.transformer import GPT
from gptlab.tokenizers import CharTokenizer
from gptlab.train.loop import run_job
from gptlab.train.metrics import read_metrics
from gptlab.weights import checkpoint as ckpt

SUBJECTS = ["the film", "this meal", "our trip", "the book", "that song", "my day", "the hotel"]
WORDS = {"neg": ["bad", "awful", "poor"], "pos": ["good", "great", "lovely"]}


def toy_examples(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Texts that are positive or negative by one word, placed at the start, middle or end."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(sorted(WORDS))
        w, s = rng.choice(WORDS[label]), rng.choice(SUBJECTS)
        out.append((rng.choice([f"{s} was {w}", f"{w}, {s}", f"a {w} one: {s}"]), label))
    return out


CHARS = "".join(t for t, _ in toy_examples(500)) + "x"  # every character of the toy texts
TOKENIZER = CharTokenizer.train(CHARS, special_tokens=["<|endoftext|>"])


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second thread only adds synchronisation, which costs several
    times the work itself when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_gpt(dropout: float = 0.0, seed: int = 0, vocab_size: int = TOKENIZER.vocab_size) -> GPT:
    model_cfg, _ = resolve_config("tiny", model_overrides={"vocab_size": vocab_size, "block_size": 48,
                                                           "dropout": dropout})
    torch.manual_seed(seed)
    return GPT(model_cfg)


def train_cfg(**overrides):
    _, cfg = resolve_config("tiny", train_overrides={"batch_size": 16, "lr": 6e-3, "warmup_steps": 5,
                                                     "log_interval": 1, "eval_batches": 10, **overrides})
    return cfg


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"])
        w.writerows((i, t, label) for i, (t, label) in enumerate(rows))
    return path


def write_jsonl(path: Path, rows: list[tuple[str, str | int]]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in rows))
    return path


def examples(rows: list[tuple[str, str]]) -> list[cls.Example]:
    return [cls.Example(t, label, f"mem:{i}") for i, (t, label) in enumerate(rows)]


# --- the whole command -------------------------------------------------------------------------

def test_separable_toy_set_reaches_95_percent(tmp_path, capsys):
    base = tmp_path / "base"
    ckpt.save_checkpoint(base, tiny_gpt(), TOKENIZER)
    data = write_csv(tmp_path / "reviews.csv", toy_examples(500))
    result = cls.run_classify(str(base), data, tmp_path / "run", train_cfg(max_steps=120, eval_interval=60),
                              val_fraction=0.2, show_progress=False)

    assert result.classes == ["neg", "pos"]
    assert result.accuracy > 0.95
    assert sum(map(sum, result.matrix)) == 100  # the stratified 20% held out
    printed = capsys.readouterr().out
    assert result.report in printed and "neg" in printed and "pos" in printed
    assert read_metrics(tmp_path / "run" / "metrics.csv")[-1]["val_accuracy"] > 0.95

    # `gptlab classify OUT` reloads the same best checkpoint and agrees with the report.
    loaded = cls.load_classifier(tmp_path / "run")
    assert loaded.path == result.checkpoint and json.loads((loaded.path / "classes.json").read_text()) == ["neg", "pos"]
    predictions = cls.predict(loaded, ["the film was lovely", "awful, my day"])
    assert [label for label, _ in predictions] == ["pos", "neg"]
    assert all(0.5 < p <= 1.0 for _, p in predictions)


def test_save_load_predict_round_trip(tmp_path):
    model = cls.make_classifier(tiny_gpt(seed=3), 3)
    assert not model.config.tie_embeddings and model.lm_head.weight.shape == (3, model.config.n_embd)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)  # a head that tells texts apart, so predictions differ
        model.lm_head.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    cls.save_classifier(tmp_path / "c", model, TOKENIZER, ["a", "b", "c"])
    texts = [t for t, _ in toy_examples(20, seed=5)] + ["x" * 100]  # the last is cut to block_size
    in_memory = cls.predict(cls.Classifier(tmp_path, model, TOKENIZER, ["a", "b", "c"]), texts)
    loaded = cls.load_classifier(tmp_path / "c")
    assert cls.predict(loaded, texts) == in_memory
    assert len({label for label, _ in in_memory}) > 1
    # The embedding was not saved as the head: the checkpoint keeps both, untied.
    weights = load_file(str(tmp_path / "c" / ckpt.WEIGHTS))
    assert weights["lm_head.weight"].shape == (3, model.config.n_embd) and "lm_head.bias" in weights


def test_a_base_that_reads_a_bos_puts_one_before_every_text_in_training_and_prediction(tmp_path):
    """Gemma's settings (add_bos_token): the classifier keeps them and reads "<bos> text" as its
    base was pretrained to, in training, evaluation and `gptlab classify` alike."""
    tok = CharTokenizer.train(CHARS, special_tokens=["<|endoftext|>", "<bos>"])
    bos = tok.token_id("<bos>")
    seqs, cut = cls.encode_texts(tok, ["good", "x" * 60], block_size=48, bos=bos)
    assert seqs == [[bos, *tok.encode("good")], [bos, *tok.encode("x" * 47)]] and cut == 1
    base = tmp_path / "base"
    ckpt.save_checkpoint(base, tiny_gpt(vocab_size=tok.vocab_size), tok,
                         extra_json={ckpt.CHAT_CONFIG: {"bos_token": "<bos>", "add_bos_token": True}})
    data = write_csv(tmp_path / "reviews.csv", toy_examples(40))
    cls.run_classify(str(base), data, tmp_path / "run", train_cfg(max_steps=2, eval_interval=2, warmup_steps=1),
                     val_fraction=0.2, show_progress=False)
    loaded = cls.load_classifier(tmp_path / "run")
    assert loaded.bos == bos
    texts = ["the film was lovely", "awful, my day"]
    probs = cls.class_probabilities(loaded.model, [[bos, *tok.encode(t)] for t in texts], 0)
    best, idx = probs.max(-1)
    assert cls.predict(loaded, texts) == [(loaded.classes[i], p) for i, p in zip(idx.tolist(), best.tolist())]
    # A base without those settings reads no BOS.
    plain = tmp_path / "plain"
    cls.save_classifier(plain, cls.make_classifier(tiny_gpt(), 2), TOKENIZER, ["neg", "pos"])
    assert cls.load_classifier(plain).bos is None


def test_a_checkpoint_without_classes_is_refused(tmp_path):
    ckpt.save_checkpoint(tmp_path / "lm", tiny_gpt(), TOKENIZER)
    with pytest.raises(UserError, match="classes.json.*not a classifier"):
        cls.load_classifier(tmp_path / "lm")


# --- freezing and resume -------------------------------------------------------------------------

def test_train_last_blocks_trains_only_those(tmp_path):
    model = cls.make_classifier(tiny_gpt(), 2, train_last_blocks=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = toy_examples(64)
    cfg = train_cfg(max_steps=3, eval_interval=3, warmup_steps=1)
    run_job(cls.classify_job(model, TOKENIZER, ["neg", "pos"], examples(rows[:48]), examples(rows[48:]), cfg), cfg,
            tmp_path / "run", show_progress=False)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    n_layer = model.config.n_layer
    should = {k for k in before if k.startswith((f"layers.{n_layer - 1}.", "norm.", "lm_head."))}
    assert changed == should and any(k.startswith("layers.") for k in should)

    with pytest.raises(UserError, match="--train-last-blocks"):
        cls.make_classifier(tiny_gpt(), 2, train_last_blocks=n_layer + 1)


def test_resume_is_exact(tmp_path):
    rows = toy_examples(80)
    train, val = examples(rows[:64]), examples(rows[64:])

    def job(model):
        return cls.classify_job(model, TOKENIZER, ["neg", "pos"], train, val, cfg)

    cfg = train_cfg(max_steps=8, eval_interval=4)
    run_job(job(cls.make_classifier(tiny_gpt(dropout=0.1), 2)), cfg, tmp_path / "straight", show_progress=False)
    # Batches are padded to their longest text, so tokens per step vary: stop where step 4 ended.
    tokens_at_4 = next(int(r["tokens"]) for r in read_metrics(tmp_path / "straight" / "metrics.csv") if r["step"] == 4)
    cfg = train_cfg(max_steps=8, eval_interval=4, max_tokens=tokens_at_4)
    first = run_job(job(cls.make_classifier(tiny_gpt(dropout=0.1), 2)), cfg, tmp_path / "split", show_progress=False)
    assert first.step == 4 and first.stopped == "max_tokens"

    cfg = train_cfg(max_steps=8, eval_interval=4)
    resumed = cls.load_classifier(tmp_path / "split", prefer="last")
    _, state = ckpt.load_train_state(resumed.path)
    assert run_job(job(resumed.model), cfg, tmp_path / "split", state, show_progress=False).step == 8

    a, b = (load_file(str(tmp_path / d / "last" / ckpt.WEIGHTS)) for d in ("straight", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batches_cover_each_epoch_and_resume_mid_epoch():
    seqs = [[i + 1] * (i % 5 + 1) for i in range(10)]
    batches = cls.ClassBatches(seqs, [i % 2 for i in range(10)], batch_size=4, seed=1, pad_id=0)
    ids, last, labels = batches.next()
    assert ids.shape == (4, int(last.max()) + 1)
    firsts = [int(ids[r, 0]) - 1 for r in range(4)]  # each row's example index
    assert last.tolist() == [len(seqs[i]) - 1 for i in firsts] and labels.tolist() == [i % 2 for i in firsts]
    assert (ids[torch.arange(4), last] == ids[:, 0]).all()  # the last real token, not padding

    seen = firsts + [int(x) - 1 for x in batches.next()[0][:, 0]]
    saved = batches.state_dict()
    third = batches.next()  # crosses into the second epoch: 2 from the first, 2 from the next
    assert sorted(seen + [int(x) - 1 for x in third[0][:2, 0]]) == list(range(10))
    batches.next()
    batches.load_state_dict(saved)
    assert all(torch.equal(x, y) for x, y in zip(batches.next(), third))


# --- data files ----------------------------------------------------------------------------------

def test_csv_and_jsonl_read_the_same(tmp_path):
    rows = [("hello, world", "1"), ('she said "hi"\non two lines', "0"), ("plain", "10"), ("more", "2")]
    from_csv = cls.read_labelled(write_csv(tmp_path / "d.csv", rows))
    from_jsonl = cls.read_labelled(write_jsonl(tmp_path / "d.jsonl", [(t, int(label)) for t, label in rows]))
    assert [(e.text, e.label) for e in from_csv] == [(e.text, e.label) for e in from_jsonl] == rows
    assert from_jsonl[1].where == f"{tmp_path / 'd.jsonl'}:2"
    assert cls.infer_classes(from_csv, "d.csv") == ["0", "1", "2", "10"]  # whole numbers sort as numbers
    assert cls.infer_classes(examples([("a", "spam"), ("b", "ham")]), "x") == ["ham", "spam"]


@pytest.mark.parametrize("name, content, where, what", [
    ("d.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"\n', 3, "not valid JSON"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n', 2, 'expected an object with "text" and "label"'),
    ("d.jsonl", '{"text": "", "label": "x"}\n', 1, "the text is empty"),
    ("d.csv", "text,label\na,x\nb,y,extra\n", 3, "3 fields but the header has 2"),
    ("d.csv", 'text,label\n"a\nb",x\nc\n', 4, "1 fields but the header has 2"),
    ("d.csv", "words,label\na,x\n", 1, "the header .words,label. has no text column"),
])
def test_bad_lines_name_file_and_line(tmp_path, name, content, where, what):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=f"^{path}:{where}: {what}"):
        cls.read_labelled(path)


def test_a_label_outside_the_classes_names_file_line_and_classes(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [("a", "ham"), ("b", "spam")])
    val = write_jsonl(tmp_path / "val.jsonl", [("c", "ham"), ("d", "eggs")])
    # Checked before the model is loaded, so no model is needed to see it.
    with pytest.raises(UserError, match=rf"^{val}:2: label 'eggs' is not one of the classes \(ham, spam\)"):
        cls.run_classify("no-such-model", train, tmp_path / "run", train_cfg(), val_data=val)
    with pytest.raises(UserError, match=rf"^{train}:2: label 'spam' is not one of the classes \(ham, eggs\)"):
        cls.run_classify("no-such-model", train, tmp_path / "run", train_cfg(), classes=["ham", "eggs"])


def test_other_file_problems(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        cls.read_labelled(tmp_path / "missing.csv")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(UserError, match="unknown format"):
        cls.read_labelled(tmp_path / "d.txt")
    (tmp_path / "d.csv").write_bytes(b"text,label\na,x\n\xff,y\n")
    with pytest.raises(UserError, match=r"d.csv:3: not UTF-8"):
        cls.read_labelled(tmp_path / "d.csv")
    one = cls.read_labelled(write_jsonl(tmp_path / "one.jsonl", [("a", "x"), ("b", "x")]))
    with pytest.raises(UserError, match="at least two classes"):
        cls.infer_classes(one, "one.jsonl")


def test_held_out_split_is_stratified_and_seeded():
    data = examples([(f"t{i}", "rare" if i % 10 == 0 else "common") for i in range(100)])
    train, val = cls.split_held_out(data, 0.2, seed=1)
    assert sorted(train + val) == sorted(data)
    assert sum(e.label == "rare" for e in val) == 2 and len(val) == 20
    assert cls.split_held_out(data, 0.2, seed=1) == (train, val) != cls.split_held_out(data, 0.2, seed=2)
    with pytest.raises(UserError, match="--val-fraction"):
        cls.split_held_out(data, 1.5, seed=1)


def test_texts_longer_than_the_context_are_cut_and_counted():
    seqs, cut = cls.encode_texts(TOKENIZER, ["good", "x" * 60, "bad"], block_size=48)
    assert cut == 1 and [len(s) for s in seqs] == [4, 48, 3]
    ids, last = cls.pad_batch(seqs, pad_id=0)
    assert ids.shape == (3, 48) and last.tolist() == [3, 47, 2]
    with pytest.raises(UserError, match="text 2: character"):
        cls.encode_texts(TOKENIZER, ["good", "é"], block_size=48)


# --- report --------------------------------------------------------------------------------------

def test_confusion_matrix_and_report_by_hand():
    true = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    pred = [0, 1, 0, 1, 1, 2, 0, 2, 1]
    matrix = cls.confusion_matrix(true, pred, 3)
    assert matrix == [[2, 1, 0], [0, 2, 0], [1, 1, 2]]
    report = cls.format_report(["ham", "spam", "eggs"], matrix).splitlines()
    assert report[0].startswith("accuracy 66.67% (6 of 9")
    assert report[1].split()[-3:] == ["ham", "spam", "eggs"]
    assert [line.split() for line in report[2:]] == [["ham", "2", "1", "0"], ["spam", "0", "2", "0"],
                                                     ["eggs", "1", "1", "2"]]


def test_probabilities_keep_the_order_of_texts_of_mixed_lengths_and_confusion_of_counts_them():
    model = cls.make_classifier(tiny_gpt(seed=4), 2)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)  # a head that tells texts apart
    rows = [("good", "pos"), ("the film was awful, my day was poor", "neg"), ("bad", "neg"),
            ("a lovely one: the hotel", "pos"), ("our trip was great", "pos")]
    seqs, _ = cls.encode_texts(TOKENIZER, [t for t, _ in rows], 48)
    one_by_one = torch.cat([cls.class_probabilities(model, [s], 0) for s in seqs])
    # Batches of 2 sorted by length mix the rows; each must still come back in its own place.
    batched = cls.class_probabilities(model, seqs, 0, batch_size=2)
    torch.testing.assert_close(batched, one_by_one)
    classifier = cls.Classifier(Path("mem"), model, TOKENIZER, ["neg", "pos"])
    predicted = one_by_one.argmax(-1).tolist()
    expected = cls.confusion_matrix([["neg", "pos"].index(label) for _, label in rows], predicted, 2)
    assert cls.confusion_of(classifier, examples(rows), batch_size=2) == expected


def test_cli_finetune_classify_then_classify(tmp_path, capsys):
    from gptlab.cli import main

    base = tmp_path / "base"
    ckpt.save_checkpoint(base, tiny_gpt(), TOKENIZER)
    data = write_jsonl(tmp_path / "reviews.jsonl", toy_examples(300))
    run = tmp_path / "run"
    assert main(["finetune", "classify", str(base), "--data", str(data), "--out", str(run), "--max-steps", "100",
                 "--eval-interval", "50", "--lr", "6e-3", "--batch-size", "16", "--no-progress", "--device",
                 "cpu"]) == 0
    assert "try: gptlab classify" in capsys.readouterr().out
    assert main(["classify", str(run), "--text", "the film was lovely", "--text", "awful, my day"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["pos", "neg"]
    assert main(["classify", str(base), "--text", "x"]) == 1  # a plain LM checkpoint has no classes
    assert "classes.json" in capsys.readouterr().err
