"""``gptlab eval``: bits per byte by hand, window plans, harness-style multiple choice, hits@1 on
conversations, and every bad input as one line."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gptlab.cli import main
from gptlab.errors import UserError
from gptlab.inference.eval_chat import (ChatTemplate, Dialogue, draw_distractors, evaluate_chat, is_hit,
                                        read_dialogues, score_candidates)
from gptlab.inference.eval_choices import evaluate_choices, harness_row, read_choices
from gptlab.inference.eval_scoring import Row, Scorer
from gptlab.inference.eval_text import check_window, evaluate_text, plan_windows
from gptlab.model import GPT, ModelConfig
from gptlab.tokenizers import CharTokenizer
from gptlab.tokenizers.chat_template import BUILTIN_TEMPLATE, render_chat

CHARS = CharTokenizer.train("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZé .,:!?'\n")
TEXT = "the café is open. the cook is out.\nwhat a day it was, said the owl. " * 3
CPU = torch.device("cpu")


def tiny_gpt(block_size: int = 16, family: str = "gpt2", **options) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig.for_family(family, vocab_size=CHARS.vocab_size, block_size=block_size, n_layer=2,
                                       n_embd=32, n_head=4, **options))
    with torch.no_grad():  # larger than init, so that every score depends on the context
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def scorer(model: nn.Module, batch_size: int = 4) -> Scorer:
    return Scorer(model, CPU, torch.float32, batch_size, progress=False)


def hand_nats(model: GPT, ids: list[int], start: int, stop: int, first_target: int) -> float:
    """Negative log-likelihood of ids[first_target:stop], reading ids[start:stop-1] in one forward pass."""
    logits, _ = model(torch.tensor([ids[start : stop - 1]]))
    logp = F.log_softmax(logits[0].double(), -1)
    return -sum(logp[p - 1 - start, ids[p]].item() for p in range(first_target, stop))


# --- text ------------------------------------------------------------------------------------------

def test_bits_per_byte_equal_a_hand_computation():
    model = tiny_gpt(block_size=16).eval()
    ids = CHARS.encode(TEXT)
    # Non-overlapping windows of 16 inputs: window k reads [16k, 16k + 16) and predicts [16k + 1, 16k + 16].
    nats = sum(hand_nats(model, ids, s, min(s + 17, len(ids)), s + 1) for s in range(0, len(ids) - 1, 16))
    result = evaluate_text(scorer(model), CHARS, TEXT, "text")
    assert result.bytes == len(TEXT.encode("utf-8")) > len(TEXT)  # é is two bytes: bits are per byte, not character
    assert result.predicted == len(ids) - 1 and result.windows == math.ceil((len(ids) - 1) / 16)
    assert result.nats == pytest.approx(nats, rel=1e-5)
    assert result.bits_per_byte == pytest.approx(nats / math.log(2) / len(TEXT.encode("utf-8")), rel=1e-5)
    assert result.loss == pytest.approx(nats / (len(ids) - 1), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))


@pytest.mark.parametrize("n,window,stride", [(2, 4, 4), (17, 16, 16), (18, 16, 16), (100, 16, 16), (100, 16, 5),
                                             (100, 16, 1), (7, 16, 3), (33, 8, 8), (50, 10, 9)])
def test_windows_predict_every_token_after_the_first_exactly_once(n, window, stride):
    plan = plan_windows(n, window, stride)
    predicted = [p for w in plan for p in range(w.stop - w.n_scored, w.stop)]
    assert predicted == list(range(1, n))
    for w in plan:
        assert w.n_scored >= 1 and w.stop - w.start <= window + 1
        if w.start > 0:  # after the first window, every target keeps window - stride + 1 tokens of context
            assert w.stop - w.n_scored - w.start >= window - stride + 1
    if stride == window:
        assert [w.start for w in plan] == list(range(0, n - 1, window))


@pytest.mark.parametrize("stride", [None, 1, 7, 32])
def test_stride_windows_equal_one_long_window_when_the_context_holds_the_text(stride):
    model = tiny_gpt(block_size=64).eval()
    text = TEXT[:50]
    ids = CHARS.encode(text)
    one_pass = hand_nats(model, ids, 0, len(ids), 1)
    assert evaluate_text(scorer(model), CHARS, text, "text", stride=stride).nats == pytest.approx(one_pass, rel=1e-5)


def test_sliding_windows_equal_one_long_window_when_they_hold_all_a_token_sees():
    # Sliding-window attention (3 keys) in 2 layers: a token depends on its 5 last tokens only, and RoPE
    # sees relative positions only, so windows of 16 every 4 tokens (13 or more of context) give the
    # same scores as the whole text in one pass.
    model = tiny_gpt(block_size=128, family="mistral", n_kv_head=2, sliding_window=3).eval()
    ids = CHARS.encode(TEXT[:120])
    whole = evaluate_text(scorer(model), CHARS, TEXT[:120], "text")
    assert whole.windows == 1 and whole.nats == pytest.approx(hand_nats(model, ids, 0, len(ids), 1), rel=1e-5)
    sliding = evaluate_text(scorer(model), CHARS, TEXT[:120], "text", window=16, stride=4)
    assert sliding.windows > 20 and sliding.nats == pytest.approx(whole.nats, rel=1e-5)
    assert evaluate_text(scorer(model), CHARS, TEXT[:120], "text", window=16).nats != pytest.approx(whole.nats)


def test_a_large_vocabulary_gets_shorter_default_windows():
    """Gemma 3's 262,144 logits a token would make its 32,768-token default window 34 GB of logits."""
    assert check_window(32_768, None, None, vocab_size=262_144) == (2048, 2048)
    assert check_window(32_768, None, None, bos=True, vocab_size=262_144) == (2048, 2047)
    assert check_window(8192, None, None, vocab_size=49_152) == (8192, 8192)  # SmolLM2: its whole context
    assert check_window(32_768, 4096, None, vocab_size=262_144) == (4096, 4096)  # --window decides


def test_limit_scores_the_first_windows_and_their_bytes():
    model = tiny_gpt(block_size=16).eval()
    ids = CHARS.encode(TEXT)
    result = evaluate_text(scorer(model), CHARS, TEXT, "text", limit=2)
    assert (result.windows, result.predicted) == (2, 32)
    assert result.nats == pytest.approx(hand_nats(model, ids, 0, 17, 1) + hand_nats(model, ids, 16, 33, 17), rel=1e-5)
    assert result.bytes == len(CHARS.decode(ids[:33]).encode("utf-8"))


def test_a_model_that_reads_a_bos_gets_one_before_every_window():
    """With a BOS (Gemma's <bos>; any id does here) the first token is predicted too, each window
    is the BOS and 15 tokens, and windows start every 15 tokens: a window's first token is the
    previous window's last target."""
    model = tiny_gpt(block_size=16).eval()
    bos = CHARS.encode("\n")[0]
    ids = CHARS.encode(TEXT)
    rows = [[bos, *ids[s : s + 16]] for s in range(0, len(ids) - 1, 15)]
    nats = sum(hand_nats(model, row, 0, len(row), 2 if i else 1) for i, row in enumerate(rows))
    result = evaluate_text(Scorer(model, CPU, torch.float32, 4, progress=False, bos_id=bos), CHARS, TEXT, "text")
    assert (result.predicted, result.windows, result.stride) == (len(ids), math.ceil(len(ids) / 15), 15)
    assert result.bytes == len(TEXT.encode("utf-8"))
    assert result.nats == pytest.approx(nats, rel=1e-5)


@pytest.mark.parametrize("n,window,stride", [(1, 4, 3), (16, 16, 15), (17, 16, 15), (100, 16, 15), (100, 16, 5),
                                             (100, 16, 16), (100, 1, 1)])
def test_windows_after_a_bos_predict_every_token_exactly_once(n, window, stride):
    plan = plan_windows(n, window, stride, bos=True)
    assert [p for w in plan for p in range(w.stop - w.n_scored, w.stop)] == list(range(n))
    assert all(w.n_scored >= 1 and w.stop - w.start <= window for w in plan)  # the BOS is the window's other input


def test_bits_per_byte_count_the_texts_bytes_not_a_leading_space():
    """A SentencePiece vocabulary that puts "▁" before a text (Llama 2's) decodes its first token
    with a space the text does not have: bits per byte count the text's own bytes."""
    from gptlab.tokenizers import SentencePieceTokenizer

    pieces = ["<unk>", "▁", *sorted(set(TEXT) - {" "})]
    tok = SentencePieceTokenizer(pieces, types=[2] + [1] * (len(pieces) - 1), add_space_prefix=True)
    assert tok.decode_bytes(tok.encode(TEXT)) == b" " + TEXT.encode("utf-8")
    model = AvoidsModel("")
    model.config.block_size = 16
    result = evaluate_text(scorer(model), tok, TEXT, "text")
    assert result.bytes == len(TEXT.encode("utf-8"))
    limited = evaluate_text(scorer(model), tok, TEXT, "text", limit=1)
    first = tok.encode(TEXT)[:17]  # the tokens the window reads
    assert limited.bytes == len(tok.decode(first).encode("utf-8")) == len(tok.decode_bytes(first)) - 1


def test_batch_size_does_not_change_the_scores():
    model = tiny_gpt(block_size=16).eval()
    scorers = [scorer(model, b) for b in (1, 3, 64, 64)]
    scorers[-1].max_tokens = 40  # two windows of 17 tokens a pass
    scores = [evaluate_text(s, CHARS, TEXT, "text", stride=5).nats for s in scorers]
    assert scores == pytest.approx([scores[0]] * 4, rel=1e-6)


# --- models whose answers are forced ----------------------------------------------------------------

class AvoidsModel(nn.Module):
    """Every token equally likely, except ``avoid``, which is (almost) never predicted: a text
    costs log(V - 1) nats a token, plus 30 for each avoided one."""

    def __init__(self, avoid: str, block_size: int = 64):
        super().__init__()
        self.avoid = CHARS.encode(avoid)
        self.config = SimpleNamespace(block_size=block_size, vocab_size=CHARS.vocab_size)

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, CHARS.vocab_size)
        logits[..., self.avoid] = -30.0
        return logits, None


class KnowsModel(nn.Module):
    """Predicts the next token of whichever ``script`` its input is the beginning of (20 nats
    surer than of any other token); no preference elsewhere."""

    def __init__(self, scripts: list[str], block_size: int = 256):
        super().__init__()
        self.scripts = [CHARS.encode(s) for s in scripts]
        self.config = SimpleNamespace(block_size=block_size, vocab_size=CHARS.vocab_size)

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, CHARS.vocab_size)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                nxt = next((s[t + 1] for s in self.scripts if len(s) > t + 1 and s[: t + 1] == row[: t + 1]), None)
                if nxt is not None:
                    logits[b, t, nxt] = 20.0
        return logits, None


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_acc_and_acc_norm_as_the_harness_defines_them(tmp_path):
    # Each ending costs (tokens of " " + ending) * log(V-1), 30 more per "z". acc takes the cheapest in
    # total, so the shortest ending without z; acc_norm divides by the ending's characters, which
    # favours the longer ones, and counts characters, not bytes ("éé" is 2 characters, 4 bytes).
    records = [
        {"context": "the cat", "endings": ["ab", "abcdef", "zz"], "label": 0},  # acc yes, acc_norm no
        {"context": "the cat", "endings": ["ab", "abcdef", "zz"], "label": 1},  # acc no, acc_norm yes
        {"context": "a dog", "endings": ["zzz", "hello"], "label": 1},  # both
        {"context": "a dog", "endings": ["éé", "abc"], "label": 0},  # acc yes; acc_norm no (by bytes: yes)
    ]
    items = read_choices(write_jsonl(tmp_path / "mc.jsonl", records))
    result = evaluate_choices(scorer(AvoidsModel("z")), CHARS, items)
    assert (result.items, result.acc, result.acc_norm) == (4, 0.75, 0.5)
    assert result.chance == pytest.approx((1 / 3 + 1 / 3 + 1 / 2 + 1 / 2) / 4)


def test_a_model_that_knows_the_right_endings_scores_one(tmp_path):
    records = [{"context": "the sky is", "endings": ["green.", "blue.", "loud."], "label": 1},
               {"context": "fish can", "endings": ["swim.", "sing."], "label": 0}]
    items = read_choices(write_jsonl(tmp_path / "mc.jsonl", records))
    model = KnowsModel([f"{r['context']} {r['endings'][r['label']]}" for r in records])
    result = evaluate_choices(scorer(model), CHARS, items)
    assert (result.acc, result.acc_norm) == (1.0, 1.0)


def test_endings_are_tokenized_as_the_harness_does():
    row = harness_row(CHARS, "the cat", "sat", 64, "x")
    assert (row.tokens, row.n_scored) == (CHARS.encode("the cat sat"), 4)  # " sat"
    row = harness_row(CHARS, "the cat\n", "sat", 64, "x")  # the context's trailing space moves to the ending
    assert (row.tokens, row.n_scored) == (CHARS.encode("the cat\n sat"), 5)
    row = harness_row(CHARS, "a long context", "end", 6, "x")  # cut from the left to fit the context
    assert (row.tokens, row.n_scored) == (CHARS.encode("ext end"), 4)
    bos = CHARS.encode("\n")[0]  # a model that reads a BOS keeps it in front, the context cut after it
    row = harness_row(CHARS, "a long context", "end", 6, "x", bos)
    assert (row.tokens, row.n_scored) == ([bos, *CHARS.encode("xt end")], 4)
    row = harness_row(CHARS, "\nthe cat", "sat", 64, "x", bos)  # one that is there already is not doubled
    assert (row.tokens, row.n_scored) == (CHARS.encode("\nthe cat sat"), 4)


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello, friend."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "Is it raining?"}, {"role": "assistant", "content": "Not yet."},
     {"role": "user", "content": "Will it?"}, {"role": "assistant", "content": "Maybe later."}],
    [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two, three."}],
    [{"role": "user", "content": "What do owls eat?"}, {"role": "assistant", "content": "Mice, mostly."},
     {"role": "user", "content": "Thanks."}],  # the reply to select is before a last user message
    [{"role": "user", "content": "Good night."}, {"role": "assistant", "content": "Sleep well!"}],
]
CHAT = ChatTemplate(BUILTIN_TEMPLATE, {"bos_token": "", "eos_token": ""})


def chat_file(tmp_path, conversations=CONVERSATIONS) -> str:
    return write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in conversations])


def test_dialogues_split_at_the_last_assistant_message(tmp_path):
    dialogues = read_dialogues(chat_file(tmp_path))
    assert [d.reply for d in dialogues] == ["Hello, friend.", "Blue.", "Maybe later.", "One, two, three.",
                                            "Mice, mostly.", "Sleep well!"]
    assert dialogues[2].context == CONVERSATIONS[2][:3] and dialogues[4].context == CONVERSATIONS[4][:1]
    assert dialogues[0].where.endswith("chat.jsonl:1")


def test_hits_at_1_of_a_model_that_knows_the_conversations_is_one(tmp_path):
    dialogues = read_dialogues(chat_file(tmp_path))
    scripts = [render_chat(BUILTIN_TEMPLATE, [*d.context, {"role": "assistant", "content": d.reply}])
               for d in dialogues]
    result = evaluate_chat(scorer(KnowsModel(scripts)), CHARS, CHAT, dialogues, k=4, seed=3)
    assert (result.items, result.k, result.hits_at_1, result.chance) == (6, 4, 1.0, 0.25)
    assert result.reply_bits_per_byte < 0.01  # every true reply token predicted almost surely


def test_hits_at_1_of_a_model_that_prefers_one_reply(tmp_path):
    # With k = 5 of 5 conversations every item's candidates are all the replies; the model likes
    # "ok" best (shortest, no z), so only its own conversation is a hit.
    replies = ["ok", "zap", "a zed", "zoo.", "fizz"]
    conversations = [[{"role": "user", "content": f"say {chr(97 + i)}"}, {"role": "assistant", "content": r}]
                     for i, r in enumerate(replies)]
    dialogues = read_dialogues(chat_file(tmp_path, conversations))
    result = evaluate_chat(scorer(AvoidsModel("z")), CHARS, CHAT, dialogues, k=5)
    assert result.hits_at_1 == pytest.approx(0.2)
    first = evaluate_chat(scorer(AvoidsModel("z")), CHARS, CHAT, dialogues, k=5, limit=1)
    assert (first.items, first.hits_at_1) == (1, 1.0)


def test_candidate_scores_put_the_true_reply_first_and_say_who_won(tmp_path):
    replies = ["ok", "zap", "a zed", "zoo.", "fizz"]
    conversations = [[{"role": "user", "content": f"say {chr(97 + i)}"}, {"role": "assistant", "content": r}]
                     for i, r in enumerate(replies)]
    dialogues = read_dialogues(chat_file(tmp_path, conversations))
    scores = score_candidates(scorer(AvoidsModel("z")), CHARS, CHAT, dialogues, k=5, limit=2)
    assert [group[0] for group in scores.candidates] == dialogues[:2]
    assert all(sorted(c.reply for c in group) == sorted(replies) for group in scores.candidates)
    winners = [group[max(range(5), key=values.__getitem__)].reply
               for group, values in zip(scores.candidates, scores.logliks)]
    assert winners == ["ok", "ok"]  # the only reply without a z and the shortest
    assert [is_hit(values) for values in scores.logliks] == [True, False]


def test_hits_at_1_norm_ranks_replies_by_score_per_character(tmp_path):
    # Every token but z costs the same, and a reply's score includes its end-of-turn marker: the
    # sum favours the shortest reply ("ok"), the score per character the longest ("abcdefghijkl").
    replies = ["abcdefghijkl", "ok", "zz", "abc", "abcdefgh"]
    conversations = [[{"role": "user", "content": f"say {chr(97 + i)}"}, {"role": "assistant", "content": r}]
                     for i, r in enumerate(replies)]
    dialogues = read_dialogues(chat_file(tmp_path, conversations))
    longest = evaluate_chat(scorer(AvoidsModel("z")), CHARS, CHAT, dialogues, k=5, limit=1)
    assert (longest.hits_at_1, longest.hits_at_1_norm) == (0.0, 1.0)
    every = evaluate_chat(scorer(AvoidsModel("z")), CHARS, CHAT, dialogues, k=5)
    assert (every.hits_at_1, every.hits_at_1_norm) == (0.2, 0.2)  # "ok" wins the one, "abcdefghijkl" the other


class CountsTokens(nn.Module):
    """A model that counts the input tokens of its forward passes."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model, self.config, self.tokens = model, model.config, 0

    def new_kv_cache(self, max_len: int | None = None):
        return self.model.new_kv_cache(max_len)

    def forward(self, idx, **kwargs):
        self.tokens += idx.numel()
        return self.model(idx, **kwargs)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_rows_that_share_a_context_score_as_alone_and_run_it_once(family):
    model = tiny_gpt(block_size=64, family=family).eval()
    context, other = CHARS.encode("the owl said hello to the"), CHARS.encode("a cook")
    endings = [CHARS.encode(e) for e in (" cat.", " dog", " old cook, twice.", " x", " café!")]
    rows = [Row(context + e, len(e)) for e in endings] + [Row(other + endings[0], len(endings[0])),
                                                          Row(context[:1] + endings[1], len(endings[1]))]
    plain = CountsTokens(model)
    expected = Scorer(plain, CPU, torch.float32, 2, progress=False, share_prefixes=False).score(rows, "x", "row")
    shared = CountsTokens(model)
    scores = Scorer(shared, CPU, torch.float32, 2, progress=False).score(rows, "x", "row")
    assert scores == pytest.approx(expected, rel=1e-5, abs=1e-5)
    tight = Scorer(model, CPU, torch.float32, 4, progress=False, max_tokens=10).score(rows, "x", "row")
    assert tight == pytest.approx(expected, rel=1e-5, abs=1e-5)  # one ending per batch: the logits bound
    for row, value in zip(rows, scores):
        n = len(row.tokens)
        assert value == pytest.approx(-hand_nats(model, row.tokens, 0, n, n - row.n_scored), rel=1e-5)
    # the context runs once (all but its last token), then each of its endings after one token of it
    assert shared.tokens < plain.tokens / 2


def test_a_reply_longer_than_the_context_names_its_conversation(tmp_path):
    conversations = [[{"role": "user", "content": f"say {c}"}, {"role": "assistant", "content": c * n}]
                     for c, n in zip("abc", (3, 4, 40))]
    dialogues = read_dialogues(chat_file(tmp_path, conversations))
    with pytest.raises(UserError, match=r"chat.jsonl:\d \(the reply of .*chat.jsonl:3\): the text to score is 42 "
                                        "tokens, more than the model's context of 32"):
        evaluate_chat(scorer(AvoidsModel("z", block_size=32)), CHARS, CHAT, dialogues, k=3, limit=1)


def test_distractors_are_seeded_distinct_and_independent_of_limit():
    replies = [f"reply {chr(97 + i % 26)}{i}" for i in range(40)] + ["reply a0"]  # one duplicate text
    dialogues = [Dialogue(f"f:{i + 1}", [], r) for i, r in enumerate(replies)]
    drawn = draw_distractors(dialogues, 5, seed=1, n_items=41, path="f")
    assert drawn == draw_distractors(dialogues, 5, seed=1, n_items=41, path="f")
    assert drawn != draw_distractors(dialogues, 5, seed=2, n_items=41, path="f")
    assert draw_distractors(dialogues, 5, seed=1, n_items=7, path="f") == drawn[:7]
    for i, chosen in enumerate(drawn):
        texts = [replies[j] for j in chosen]
        assert len(chosen) == 4 and len(set(texts)) == 4 and replies[i] not in texts


def test_items_of_one_conversation_are_never_each_others_distractors(tmp_path):
    """Items cut from one conversation at several depths share a "conversation" ID; each draws
    its distractors from the other conversations only, and a file without IDs draws as before."""
    lines = [{"conversation": f"c{i // 4}", "messages": [{"role": "user", "content": f"q{i}"},
                                                         {"role": "assistant", "content": f"reply {i}"}]}
             for i in range(12)]  # three conversations of four items
    dialogues = read_dialogues(write_jsonl(tmp_path / "items.jsonl", lines))
    assert [d.conversation for d in dialogues] == [f"c{i // 4}" for i in range(12)]
    drawn = draw_distractors(dialogues, 5, seed=0, n_items=12, path="f")
    assert all(dialogues[j].conversation != dialogues[i].conversation for i, js in enumerate(drawn) for j in js)
    anonymous = [Dialogue(d.where, d.context, d.reply) for d in dialogues]
    assert any(j // 4 == i // 4 for i, js in enumerate(draw_distractors(anonymous, 5, 0, 12, "f")) for j in js)
    # Two conversations of four items leave each item four replies of the other: enough for k = 5, not 6.
    draw_distractors(dialogues[:8], 5, seed=0, n_items=8, path="f")
    with pytest.raises(UserError, match=r"items.jsonl:1: conversation 'c0' leaves 4 different replies of other "
                                        "conversations, fewer than the 5 distractors of --k 6"):
        draw_distractors(dialogues[:8], 6, seed=0, n_items=8, path="f")


# --- the command ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    from gptlab.weights.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("eval") / "ckpt"
    save_checkpoint(path, tiny_gpt(block_size=32), CHARS)
    return str(path)


def test_eval_corpus_prints_a_table_and_json(checkpoint, tmp_path, capsys):
    corpus = tmp_path / "text.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    assert main(["eval", checkpoint, "--corpus", str(corpus), "--dtype", "fp32"]) == 0
    table = capsys.readouterr().out
    assert "bits per byte" in table and "perplexity" in table
    assert main(["eval", checkpoint, "--corpus", str(corpus), "--dtype", "fp32", "--stride", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = evaluate_text(scorer(tiny_gpt(block_size=32).eval()), CHARS, TEXT, "text", stride=8)
    assert report["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-5)
    assert (report["task"], report["stride"], report["window"], report["bytes"]) == ("corpus", 8, 32, expected.bytes)


def test_eval_quantized_scores_close_to_float(checkpoint, tmp_path, capsys):
    """--quantize int8 scores the model as int8 decoding runs it (smoothed by the calibration
    text): close to, not equal to, fp32."""
    from gptlab.inference.quantize import calibration_ids, quantize_int8

    corpus = tmp_path / "text.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    assert main(["eval", checkpoint, "--corpus", str(corpus), "--dtype", "fp32", "--quantize", "int8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    float_bpb = evaluate_text(scorer(tiny_gpt(block_size=32).eval()), CHARS, TEXT, "text").bits_per_byte
    int8 = quantize_int8(tiny_gpt(block_size=32).eval(), calibration_ids(CHARS, 32))
    int8_bpb = evaluate_text(scorer(int8), CHARS, TEXT, "text").bits_per_byte
    assert report["quantize"] == "int8" and report["bits_per_byte"] == pytest.approx(int8_bpb, rel=1e-5)
    assert int8_bpb != float_bpb and int8_bpb == pytest.approx(float_bpb, rel=0.02)


def test_eval_choices_and_chat_commands(checkpoint, tmp_path, capsys):
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"context": "the cat", "endings": ["sat.", "ran."], "label": 0}] * 3)
    assert main(["eval", checkpoint, "--choices", mc, "--json", "--dtype", "fp32", "--limit", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["items"] == 2 and report["acc"] in (0.0, 1.0) and report["chance"] == 0.5
    assert main(["eval", checkpoint, "--chat", chat_file(tmp_path), "--k", "3", "--seed", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["items"], report["k"]) == (6, 3) and 0 <= report["hits_at_1"] <= 1
    assert report["reply_bits_per_byte"] > 0


BAD_MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("flags,content,message", [
    (["--choices"], '{"context": "a", "endings": ["b", "c"], "label": 0}\n{oops\n', "mc.jsonl:2: not valid JSON"),
    (["--choices"], '[1, 2]\n', "mc.jsonl:1: expected an object with 'context', 'endings' and 'label'"),
    (["--choices"], '{"context": "a", "endings": ["b"], "label": 0}\n', "mc.jsonl:1: 1 ending(s); a choice needs"),
    (["--choices"], '{"context": "a", "endings": ["b", 3], "label": 0}\n', "mc.jsonl:1: 'endings' must be a list"),
    (["--choices"], '{"context": "a", "endings": ["b", "c"], "label": 2}\n', "mc.jsonl:1: 'label' must be the index"),
    (["--choices"], '{"context": "a", "endings": ["b", "c"], "label": true}\n', "mc.jsonl:1: 'label' must be"),
    (["--choices"], '{"context": "a #", "endings": ["b", "c"], "label": 0}\n', "mc.jsonl:1: the model's tokenizer "
                                                                                  "cannot encode this text"),
    (["--choices"], "\n", "mc.jsonl holds no records"),
    (["--chat"], '{"messages": "hi"}\n', "mc.jsonl:1: expected an object with a 'messages' list"),
    (["--chat"], '{"messages": [{"role": "user"}]}\n', "mc.jsonl:1: message 1 must be an object with string"),
    (["--chat"], json.dumps({"messages": BAD_MESSAGES}) + "\n", "mc.jsonl:1: the conversation has no assistant"),
    (["--chat"], json.dumps({"messages": CONVERSATIONS[0], "conversation": [1]}) + "\n",
     "mc.jsonl:1: 'conversation' must be a string or an integer ID"),
    (["--chat"], "".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS[:3]),
     "holds 3 conversation(s), fewer than the 5 candidates of --k 5"),
    (["--chat", "--k", "3"], "".join(json.dumps({"messages": m}) + "\n" for m in [CONVERSATIONS[0]] * 4),
     "holds 1 different replies, fewer than the 3 candidates"),
    (["--corpus"], "a", "text.txt is 1 token(s) long as the model's tokenizer splits it, too short for one window"),
    (["--corpus"], "the price is $3", "the model's tokenizer cannot encode this text (character '$'"),
    (["--corpus", "--window", "64"], TEXT, "--window 64 is more than the model's context of 32 tokens"),
    (["--corpus", "--window", "8", "--stride", "9"], TEXT, "--stride 9 is more than the window of 8 tokens"),
    (["--choices", "--stride", "4", "--k", "3"], "", "--stride applies to --corpus only; --k applies to --chat only"),
    (["--chat", "--k", "1"], "", "--k must be at least 2"),
])
def test_bad_input_is_one_line(checkpoint, tmp_path, capsys, flags, content, message):
    path = tmp_path / ("text.txt" if flags[0] == "--corpus" else "mc.jsonl")
    path.write_text(content, encoding="utf-8")
    assert main(["eval", checkpoint, flags[0], str(path), *flags[1:]]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_a_tokenizer_that_maps_unknown_characters_to_unk_is_refused():
    tok = CharTokenizer.train("abc ", unk=True)
    model = AvoidsModel("")
    model.config.block_size = 16
    with pytest.raises(UserError, match=r"cannot encode this text exactly \(it reads 'd"):
        evaluate_text(scorer(model), tok, "abc dab", "text")
