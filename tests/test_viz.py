"""gptlab viz: the pictures are written at the size their layout asks for, and show real data.

The attention maps are checked against the model itself: weights @ v, with v taken from
v_proj, must give the input of o_proj of an ordinary (fused SDPA) forward pass.
"""

from __future__ import annotations

import argparse
import html
import math
import re

import matplotlib.image
import pytest
import torch

from gptlab.cli.viz import add_viz
from gptlab.errors import UserError
from gptlab.model.config import ModelConfig
from gptlab.model.layers import repeat_kv, rope_tables, sinusoidal_positions
from gptlab.model.transformer import GPT
from gptlab.tokenizers import BPETokenizer, CharTokenizer
from gptlab.train.metrics import MetricsLogger
from gptlab.viz.attention import attention_figsize, attention_weights, parse_layers
from gptlab.viz.common import pixel_size
from gptlab.viz.curves import FIGSIZE as CURVES_FIGSIZE
from gptlab.viz.curves import plot_curves
from gptlab.viz.embeddings import embeddings_figsize, nearest
from gptlab.viz.positions import FIGSIZE as POSITIONS_FIGSIZE
from gptlab.viz.positions import rotary
from gptlab.viz.tokens import layout, to_ansi, to_html, token_pieces, tokens_figsize
from gptlab.weights.checkpoint import save_checkpoint

TEXT = "The cat sat on the mat. <b>Ünïcode & $5</b> 世界🙂\n" * 3
FAMILIES = {
    "gpt2": {},
    "llama": {"n_kv_head": 2},  # grouped-query attention: 2 k/v heads for 4 query heads
    "mistral": {"n_kv_head": 1, "sliding_window": 5},
}


def tiny_model(family: str, n_head: int = 4, seed: int = 0) -> GPT:
    """A 2-layer model whose weights are large enough that attention is far from uniform
    (norm weights 1, everything else normal(0, 0.3))."""
    torch.manual_seed(seed)
    config = ModelConfig.for_family(family, vocab_size=CharTokenizer.train(TEXT).vocab_size, block_size=64, n_layer=2,
                                    n_head=n_head, n_embd=32, **FAMILIES[family])
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name and name.endswith("weight") else p.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Save a tiny model of ``family`` with a character tokenizer; returns its directory."""
    root = tmp_path_factory.mktemp("viz-models")

    def make(family: str, n_head: int = 4) -> str:
        path = root / f"{family}-{n_head}"
        if not path.exists():
            save_checkpoint(path, tiny_model(family, n_head), CharTokenizer.train(TEXT))
        return str(path)

    return make


def viz(*argv: str) -> None:
    """Run ``gptlab viz ARGV`` through add_viz, as the gptlab command will."""
    parser = argparse.ArgumentParser()
    add_viz(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["viz", *argv])
    args.func(args)


def png_size(path) -> tuple[int, int]:
    """(width, height) in pixels of a PNG that is not blank."""
    image = matplotlib.image.imread(str(path))
    assert image.std() > 0.01  # something was drawn
    return image.shape[1], image.shape[0]


# --- attention -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_attention_weights_times_v_give_the_models_attention_output(family):
    model = tiny_model(family)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (20,))
    values, outputs = [], []
    hooks = []
    for layer in model.layers:
        attn = layer.self_attn
        hooks.append(attn.v_proj.register_forward_hook(lambda m, i, o: values.append(o)))
        hooks.append(attn.o_proj.register_forward_pre_hook(lambda m, i: outputs.append(i[0])))
    with torch.no_grad():
        model(ids[None])  # the ordinary path: fused SDPA, which never forms the weights
    for hook in hooks:
        hook.remove()
    weights = attention_weights(model, ids)  # (L, H, T, T)
    T, D = len(ids), cfg.head_dim
    assert weights.shape == (cfg.n_layer, cfg.n_head, T, T)
    for layer, (v, y) in enumerate(zip(values, outputs)):
        v = repeat_kv(v.view(1, T, cfg.kv_heads, D).transpose(1, 2), cfg.n_head // cfg.kv_heads)[0]  # (H, T, D)
        mixed = (weights[layer] @ v).transpose(0, 1).reshape(T, cfg.n_embd)  # (T, C)
        torch.testing.assert_close(mixed, y[0], atol=1e-5, rtol=0)
    # Queries far from the start do not spread evenly (max weight 1/(i+1)) but focus, so the
    # check above tells the real map from a wrong one.
    assert weights[:, :, 10:].amax(-1).mean() > 0.4
    assert not any(layer.self_attn.save_weights for layer in model.layers)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_attention_rows_sum_to_one_and_are_causal(family):
    model = tiny_model(family)
    weights = attention_weights(model, torch.arange(12))
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    visible = torch.ones(12, 12).tril().bool()
    window = model.config.sliding_window
    if window is not None:
        visible &= ~torch.ones(12, 12).tril(-window).bool()
    assert torch.all(weights[..., ~visible] == 0)
    assert torch.all(weights[..., visible] > 0)


@pytest.mark.parametrize("n_head", [2, 4])
def test_attention_png_has_one_panel_per_layer_and_head(checkpoint, tmp_path, capsys, n_head):
    out = tmp_path / "a.png"
    viz("attention", checkpoint("gpt2", n_head), "--text", "The cat sat", "--out", str(out))
    assert png_size(out) == pixel_size(attention_figsize(2, n_head, len("The cat sat")))
    assert str(out) in capsys.readouterr().out


def test_attention_figure_widens_with_heads_and_caps_tokens(checkpoint, tmp_path, capsys):
    assert attention_figsize(2, 8, 10)[0] > attention_figsize(2, 4, 10)[0]
    assert attention_figsize(4, 4, 10)[1] > attention_figsize(2, 4, 10)[1]
    out = tmp_path / "a.png"
    viz("attention", checkpoint("llama"), "--text", TEXT, "--max-tokens", "16", "--out", str(out))
    assert f"showing the first 16 of {len(TEXT)} tokens" in capsys.readouterr().out
    assert png_size(out) == pixel_size(attention_figsize(2, 4, 16))


def test_attention_layers_flag():
    assert parse_layers(None, 4) == [0, 1, 2, 3]
    assert parse_layers(None, 30)[0] == 0 and parse_layers(None, 30)[-1] == 29 and len(parse_layers(None, 30)) == 12
    assert parse_layers("0,-1", 30) == [0, 29]
    for bad in ("2", "x"):
        with pytest.raises(UserError, match="--layers"):
            parse_layers(bad, 2)


# --- embeddings ------------------------------------------------------------------------------


def test_nearest_neighbours_by_cosine():
    table = torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0], [0.0, 2.0]])
    near = nearest(table, 0, 2)
    assert [i for i, _ in near] == [1, 3]
    assert near[0][1] == pytest.approx(0.9 / math.hypot(0.9, 0.1))


def test_embeddings_png_and_neighbours(checkpoint, tmp_path, capsys):
    out = tmp_path / "e.png"
    viz("embeddings", checkpoint("gpt2"), "--count", "20", "--neighbours", "a", "--neighbours", "id:3",
        "--k", "3", "--out", str(out))
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("  ")]
    assert len(lines) == 2 and lines[0].startswith("  a (") and lines[1].count("(") == 4  # itself + 3 neighbours
    assert png_size(out) == pixel_size(embeddings_figsize(20))
    with pytest.raises(UserError, match="not one"):
        viz("embeddings", checkpoint("gpt2"), "--neighbours", "ab", "--out", str(tmp_path / "f.png"))


# --- tokens ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe():
    # Byte-level with few merges: 世, 界 and 🙂 are split over several tokens each.
    return BPETokenizer.train(TEXT * 5, vocab_size=280)


def test_token_pieces_cover_the_text_exactly_once(bpe):
    for tok in (bpe, CharTokenizer.train(TEXT)):
        ids = tok.encode(TEXT)
        pieces = token_pieces(tok, ids)
        assert "".join(p.text for p in pieces) == TEXT
        assert [i for p in pieces for i in p.ids] == ids
        assert all(p.text for p in pieces)
    assert any(len(p.ids) > 1 for p in token_pieces(bpe, bpe.encode("🙂")))  # one character, several tokens
    ansi = to_ansi(token_pieces(bpe, bpe.encode(TEXT)))
    plain = re.sub(r"\x1b\[[0-9;]*m", "", ansi)
    assert plain.split("\n\nids: ")[0].replace("↵", "") == TEXT
    assert plain.split("\n\nids: ")[1].split() == [str(i) for i in bpe.encode(TEXT)]


def test_token_html_is_escaped(bpe):
    page = to_html(token_pieces(bpe, bpe.encode(TEXT)), bpe, "t <i>")
    assert "<b>" not in page and "<i>" not in page
    text = re.search(r'<div class="text">(.*?)</div>', page, re.S).group(1)
    assert html.unescape(re.sub(r"<span[^>]*>|</span>", "", text)).replace("↵", "") == TEXT
    assert page.count("<tr><td>") == len(bpe.encode(TEXT))


def test_tokens_command_writes_png_and_html(tmp_path, capsys, bpe):
    path = tmp_path / "bpe.json"
    bpe.save(path)
    out = tmp_path / "t.png"
    viz("tokens", str(path), "--text", TEXT, "--width", "40", "--out", str(out))
    printed = capsys.readouterr().out
    assert f"{len(bpe.encode(TEXT))} tokens" in printed and str(out) in printed
    n_rows = layout(token_pieces(bpe, bpe.encode(TEXT)), 40)[-1][0] + 1
    assert png_size(out) == pixel_size(tokens_figsize(n_rows, 40))
    assert "&lt;" in out.with_suffix(".html").read_text()


def test_tokens_of_a_checkpoint_and_of_char(checkpoint, tmp_path, capsys):
    viz("tokens", checkpoint("llama"), "--text", "the mat", "--out", str(tmp_path / "m.png"))
    viz("tokens", "char", "--text", "hello", "--out", str(tmp_path / "c.png"))
    assert capsys.readouterr().out.count("tokens,") == 2
    with pytest.raises(UserError, match="neither"):
        viz("tokens", str(tmp_path / "nothing"), "--text", "x", "--out", str(tmp_path / "n.png"))


# --- curves ----------------------------------------------------------------------------------


def write_run(path, scale: float) -> None:
    path.mkdir()
    logger = MetricsLogger(path, tensorboard=False)
    for step in range(0, 50, 5):
        row = {"step": step, "tokens": step * 1000, "lr": 1e-3 * scale, "train_loss": scale * 4 / (1 + step)}
        if step % 10 == 0:
            row["val_loss"] = scale * 4.5 / (1 + step)
        logger.log(row)
    logger.close()


def test_curves_of_two_runs(tmp_path, capsys):
    write_run(tmp_path / "a", 1.0)
    write_run(tmp_path / "b", 2.0)
    out = tmp_path / "c.png"
    viz("curves", str(tmp_path / "a"), str(tmp_path / "b"), "--x", "tokens", "--out", str(out))
    assert png_size(out) == pixel_size(CURVES_FIGSIZE)
    from gptlab.viz.curves import load_run

    fig = plot_curves({"a": load_run(tmp_path / "a"), "b": load_run(tmp_path / "b")})
    loss_ax, lr_ax = fig.axes
    assert len(loss_ax.get_lines()) == 4 and len(lr_ax.get_lines()) == 2  # train + val per run; lr per run
    val_b = loss_ax.get_lines()[3]
    assert list(val_b.get_xdata()) == [0, 10, 20, 30, 40]
    assert val_b.get_ydata()[0] == pytest.approx(9.0)


# --- positions -------------------------------------------------------------------------------


def test_sinusoidal_and_rotary_tables():
    table = sinusoidal_positions(50, 16)
    p, i = 7, 3
    assert table[p, 2 * i].item() == pytest.approx(math.sin(p / 10000 ** (2 * i / 16)), abs=1e-6)
    assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(p / 10000 ** (2 * i / 16)), abs=1e-6)
    config = ModelConfig.for_family("llama", n_embd=32, n_head=2)
    cos, sin = rope_tables(config, 10)
    torch.testing.assert_close(rotary(config, 10), torch.cat([cos[:, :8], sin[:, :8]], dim=-1))


def test_positions_png_with_and_without_a_model(checkpoint, tmp_path):
    viz("positions", "--out", str(tmp_path / "p.png"))
    viz("positions", checkpoint("gpt2"), "--out", str(tmp_path / "q.png"))
    for name in ("p.png", "q.png"):
        assert png_size(tmp_path / name) == pixel_size(POSITIONS_FIGSIZE)


# --- mistakes a user can make ----------------------------------------------------------------


def test_bad_inputs_are_user_errors(checkpoint, tmp_path):
    model = checkpoint("gpt2")
    with pytest.raises(UserError, match="--text is empty"):
        viz("attention", model, "--text", "", "--out", str(tmp_path / "a.png"))
    with pytest.raises(UserError, match="--text is empty"):
        viz("tokens", "gpt2", "--text", "", "--out", str(tmp_path / "t.png"))
    with pytest.raises(UserError, match="does not exist"):
        viz("curves", str(tmp_path / "no-run"), "--out", str(tmp_path / "c.png"))
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(UserError, match="no metrics.csv"):
        viz("curves", str(tmp_path / "empty-run"), "--out", str(tmp_path / "c.png"))
    with pytest.raises(UserError, match=r"\.png"):
        viz("positions", "--out", str(tmp_path / "p.jpg"))
    existing = tmp_path / "old.png"
    existing.write_bytes(b"mine")
    with pytest.raises(UserError, match="already exists.*--force"):
        viz("positions", "--out", str(existing))
    assert existing.read_bytes() == b"mine"
    viz("positions", "--out", str(existing), "--force")
    assert existing.read_bytes() != b"mine"


def test_every_viz_flag_has_help():
    parser = argparse.ArgumentParser()
    add_viz(parser.add_subparsers(dest="command"))
    viz_parser = parser._subparsers._group_actions[0].choices["viz"]
    commands = viz_parser._subparsers._group_actions[0].choices
    assert set(commands) == {"attention", "embeddings", "tokens", "curves", "positions"}
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"viz {name} {action.dest} has no help"
