"""The encoder-decoder Transformer and the toy tasks it learns with the one training loop."""

import pytest
import torch

from gptlab.config import TrainConfig
from gptlab.data import toy
from gptlab.errors import UserError
from gptlab.model.seq2seq import Seq2SeqConfig, Seq2SeqTransformer, load_seq2seq
from gptlab.train import toy_seq2seq


def tiny_model(seed: int = 0) -> Seq2SeqTransformer:
    torch.manual_seed(seed)
    return Seq2SeqTransformer(Seq2SeqConfig(block_size=9, n_layer=2, n_embd=32, n_head=4)).eval()


def test_tasks_split_and_batch():
    task = toy.ToyTask("sort", 1, 6)
    gen = torch.Generator().manual_seed(0)
    train, held_out = task.draw(300, "train", gen), task.draw(100, "val", gen)
    assert not {tuple(s) for s in train} & {tuple(s) for s in held_out}
    assert all(toy.is_held_out(s) for s in held_out) and not any(toy.is_held_out(s) for s in train)
    src, tgt_in, tgt_out = task.batch([toy.encode("31"), toy.encode("9070")])
    assert toy.decode(src[1].tolist()) == "9070" and src[0, 2:].eq(toy.PAD).all()
    assert tgt_in[1, :5].tolist() == [toy.BOS, *toy.encode("0079")]
    assert tgt_out[1, :5].tolist() == [*toy.encode("0079"), toy.EOS]
    assert tgt_out[0, 3:].eq(toy.IGNORE).all()  # nothing to learn after the first EOS
    assert toy.ToyTask("reverse").answer(toy.encode("123")) == toy.encode("321")
    with pytest.raises(UserError, match="invalid toy task: name must be one of reverse, sort"):
        toy.ToyTask("add")


def test_batches_resume_exactly():
    a = toy.ToyBatches(toy.ToyTask(), batch_size=4, seed=3)
    a.next()
    b = toy.ToyBatches(toy.ToyTask(), batch_size=4, seed=99)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(a.next(), b.next()))


def test_source_padding_changes_nothing():
    # A padded source must give the logits of the unpadded one: the mask hides PAD keys.
    model = tiny_model()
    src = torch.tensor([toy.encode("4821")])
    padded = torch.cat([src, torch.full((1, 3), toy.PAD)], dim=1)
    tgt = torch.tensor([[toy.BOS, *toy.encode("12")]])
    torch.testing.assert_close(model(padded, tgt)[0], model(src, tgt)[0])
    # while the source itself does matter
    assert not torch.allclose(model(torch.tensor([toy.encode("4822")]), tgt)[0], model(src, tgt)[0])


def test_decoder_is_causal():
    model = tiny_model()
    src = torch.tensor([toy.encode("555")])
    a = model(src, torch.tensor([[toy.BOS, 4, 5, 6]]))[0]
    b = model(src, torch.tensor([[toy.BOS, 4, 9, 9]]))[0]
    torch.testing.assert_close(a[:, :2], b[:, :2])  # positions before the change are unaffected
    assert not torch.allclose(a[:, 2:], b[:, 2:])


def test_trains_to_high_exact_match_with_the_training_loop(tmp_path, one_thread):
    # A small task so that it runs in seconds; benchmarks/seq2seq_toy.py runs the full one.
    task = toy.ToyTask("sort", 1, 4)
    cfg = TrainConfig(batch_size=64, max_steps=250, lr=2e-3, warmup_steps=25, weight_decay=0.0, beta2=0.98,
                      eval_interval=250, eval_batches=2, log_interval=50, device="cpu", dtype="fp32")
    model, result = toy_seq2seq.train_seq2seq(task, Seq2SeqConfig(block_size=task.max_target_len), cfg, tmp_path,
                                      show_progress=False)
    assert result.last_eval["val_accuracy"] >= 0.9
    assert result.last_eval["val_loss"] < 0.2
    loaded, meta = load_seq2seq(tmp_path / "last")
    assert meta["task"] == {"name": "sort", "min_len": 1, "max_len": 4}
    held_out = task.draw(50, "val", torch.Generator().manual_seed(7))
    assert toy_seq2seq.exact_match(loaded.eval(), task, held_out) == toy_seq2seq.exact_match(model.eval(), task, held_out)
