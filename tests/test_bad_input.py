"""Bad input, tried systematically over every command: each ends with exit code 1 (an error gptlab
explains in one line) or 2 (argparse's usage error), never a traceback, and changes nothing the
user made."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from gptlab.cli import main
from gptlab.errors import UserError
from gptlab.model.config import ModelConfig
from gptlab.model.transformer import GPT
from gptlab.tokenizers import CharTokenizer
from gptlab.weights import checkpoint as ckpt

# (name, argv with {placeholders} for files the fixture makes, exit code, text the message must contain)
CASES = [
    # train
    ("train: negative steps", "train --preset tiny --max-steps -5", 1, "--max-steps must be a positive"),
    ("train: unknown preset", "train --preset nope", 2, "invalid choice"),
    ("train: lr not a number", "train --preset tiny --lr fast", 2, "invalid float value"),
    ("train: warmup beyond steps", "train --preset tiny --max-steps 5 --warmup-steps 9", 1, "cannot exceed"),
    ("train: bad device", "train --preset tiny --device tpu", 1, "--device must be one of"),
    ("train: bad optimizer", "train --preset tiny --optimizer sgd", 1, "--optimizer must be one of"),
    ("train: heads do not divide width", "train --preset tiny --n-head 5", 1,
     "--n-embd=32 must be divisible by --n-head=5"),
    ("train: missing corpus file", "train --preset tiny --corpus {missing}", 1, "missing.txt"),
    ("train: empty corpus", "train --preset tiny --corpus {empty}", 1, "empty"),
    ("train: corpus too short", "train --preset tiny --corpus {short}", 1, "too short"),
    ("train: out is a user folder", "train --preset tiny --corpus {text} --out {userdir} --force", 1,
     "not a gptlab run"),
    ("train: out is a file", "train --preset tiny --corpus {text} --out {text}", 1, "is a file"),
    ("train: resume a missing run", "train --resume {missing}", 1, "does not exist"),
    ("train: resume a model with other shape", "train --resume {run} --n-layer 7", 1, "cannot resume"),
    ("train: config file not JSON", "train --config {binary}", 1, "not valid JSON"),
    ("train: config file unknown key", "train --config {badconfig}", 1, "unknown key"),
    ("train: bad json flag", "train --preset tiny --rope-scaling notjson", 2, "expected a JSON object"),
    # prepare and tokenizers
    ("prepare: unknown tokenizer", "prepare --corpus {text} --tokenizer wordpiece --out {new}", 1, "tokenizer"),
    ("prepare: bpe size too small", "prepare --corpus {text} --tokenizer bpe:10 --out {new}", 1, "256"),
    ("prepare: val fraction 2", "prepare --corpus {text} --val-fraction 2", 2, "between 0 and 1"),
    ("prepare: binary corpus", "prepare --corpus {binary} --out {new}", 1, "binary file"),
    ("prepare: out is a user folder", "prepare --corpus {text} --out {userdir}", 1, "--force"),
    ("tokenizer: zero vocab", "tokenizer train --corpus {text} --vocab-size 0 --out {new}", 2, "must be positive"),
    ("tokenizer: out exists", "tokenizer train --corpus {text} --out {text}", 1, "already exists"),
    # sample
    ("sample: missing model", "sample {missing}", 1, "does not exist"),
    ("sample: folder without a checkpoint", "sample {userdir}", 1, "holds no checkpoint"),
    ("sample: negative temperature", "sample {run} --temperature -1", 1, "temperature"),
    ("sample: top-p above 1", "sample {run} --top-p 1.5", 1, "top_p"),
    ("sample: prompt outside the vocabulary", "sample {run} --prompt ZZZ", 1, "not in the"),
    ("sample: corrupt weights", "sample {corrupt}", 1, "corrupt"),
    # import / export
    ("import: missing source", "import {missing} --out {new}", 1, "missing.txt"),
    ("import: out is a user folder", "import {run} --out {userdir}", 1, "already exists"),
    ("import: not a gguf", "import {fakegguf} --out {new}", 1, "fake.gguf"),
    ("export: missing model", "export {missing} --out {new}", 1, "does not exist"),
    ("export: out is a user folder", "export {run} --out {userdir}", 1, "already exists"),
    ("export: unknown format", "export {run} --format onnx --out {new}", 2, "invalid choice"),
    # chat / serve / embed
    ("chat: missing model", "chat {missing}", 1, "does not exist"),
    ("serve: bad port", "serve {run} --port 0", 2, "must be positive"),
    ("embed: not a BERT", "embed {run} --text hi", 1, ""),
    # fine-tuning
    ("finetune sft: missing data", "finetune sft {run} --data {missing} --out {new}", 1, "does not exist"),
    ("finetune sft: malformed line", "finetune sft {run} --data {badjsonl} --out {new}", 1, "bad.jsonl:2"),
    ("finetune sft: out is a user folder", "finetune sft {run} --data {chats} --out {userdir} --force", 1,
     "not a gptlab run"),
    ("finetune lora: bad target", "finetune lora {run} --data {chats} --out {new} --lora-targets qkv", 1, "qkv"),
    ("finetune lora: zero rank", "finetune lora {run} --data {chats} --lora-rank 0", 2, "must be positive"),
    ("finetune classify: label outside classes",
     "finetune classify {run} --data {labels} --classes neg,pos --out {new}", 1, "labels.csv:3"),
    ("classify: not a classifier", "classify {run} --text hi", 1, "classes.json"),
    ("merge: not an adapter", "merge {run} --out {new}", 1, "holds no LoRA adapter"),
    ("merge: out exists", "merge {run} --out {userdir}", 1, ""),
    # data, viz
    ("data fetch: unknown corpus", "data fetch nope", 1, "nope"),
    ("data synth-chat: out exists", "data synth-chat --out {text}", 1, "already exists"),
    ("data synth-chat: bad split", "data synth-chat --out {new} --split dev", 2, "invalid choice"),
    ("viz curves: missing run", "viz curves {missing}", 1, "missing"),
    ("viz attention: empty text", "viz attention {run} --text ''", 1, "empty"),
    ("viz tokens: out exists", "viz tokens char --text hi --out {png}", 1, "--force"),
    ("no command", "", 2, "required"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad-input")
    text = "To be, or not to be, that is the question.\n" * 40
    (root / "corpus.txt").write_text(text)
    (root / "empty.txt").write_text("")
    (root / "short.txt").write_text("tiny")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (root / "bad-config.json").write_text(json.dumps({"train": {"speed": 11}}))
    (root / "fake.gguf").write_bytes(b"GGUF" + b"\x00" * 20)
    (root / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                                    '"content": "yo"}]}\n{"messages": [\n')
    chats = "".join(json.dumps({"messages": [{"role": "user", "content": "to be"},
                                             {"role": "assistant", "content": "or not"}]}) + "\n" for _ in range(4))
    (root / "chats.jsonl").write_text(chats)
    (root / "labels.csv").write_text("text,label\nto be,pos\nnot to be,maybe\n")
    (root / "picture.png").write_bytes(b"\x89PNG user picture")
    user = root / "user-folder"
    user.mkdir()
    (user / "notes.txt").write_text("my notes")
    # A small trained run (a checkpoint with best/ and last/).
    tok = CharTokenizer.train(text + "ZQ".lower(), special_tokens=["<|endoftext|>"])
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))
    for sub in ("best", "last"):
        ckpt.save_checkpoint(root / "run" / sub, model, tok, {"seed": 1}, {"step": 1} if sub == "last" else None)
    (root / "run" / "metrics.csv").write_text("step\n")
    ckpt.save_checkpoint(root / "corrupt", model, tok)
    weights = root / "corrupt" / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    return {"text": str(root / "corpus.txt"), "empty": str(root / "empty.txt"), "short": str(root / "short.txt"),
            "binary": str(root / "binary.bin"), "badconfig": str(root / "bad-config.json"),
            "fakegguf": str(root / "fake.gguf"), "badjsonl": str(root / "bad.jsonl"),
            "chats": str(root / "chats.jsonl"), "labels": str(root / "labels.csv"), "png": str(root / "picture.png"),
            "userdir": str(user), "run": str(root / "run"), "corrupt": str(root / "corrupt"),
            "missing": str(root / "missing.txt"), "new": str(root / "new-output"), "root": str(root)}


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with its content hash (what the user has)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "cache" not in p.parts}


def test_the_table_is_big_enough():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, argv, code, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, argv, code, message, files, capsys, monkeypatch, tmp_path):
    import shlex

    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    root = Path(files["root"])
    before = snapshot(root)
    args = [a.format(**files) for a in shlex.split(argv)]
    if code == 2:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
    else:
        assert main(args) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    if code == 1:  # progress lines ("loading ...") may come first; the error is one line, the last
        assert [line for line in lines if "error" in line.lower()] == lines[-1:], err
        assert lines[-1].startswith("error: "), err
    else:
        assert lines and "error:" in lines[-1], err
    assert message in err, err
    assert snapshot(root) == before, "a bad command changed the user's files"
    assert not Path(files["new"]).exists(), "a failed command left an output behind"


def test_a_user_error_stays_on_one_line_whatever_it_quotes():
    # Libraries quote bytes of a damaged file in their messages (found by benchmarks/fuzz_readers.py:
    # a safetensors tensor name holding a line break).
    e = UserError("model.safetensors cannot be read (invalid offset for tensor `a\nb\r\nc`)")
    assert str(e) == "model.safetensors cannot be read (invalid offset for tensor `a b c`)"
