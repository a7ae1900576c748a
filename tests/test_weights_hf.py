"""Hugging Face import and export, checked against transformers' own models (offline, tiny)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from gptlab.cli import main  # noqa: E402
from gptlab.errors import UserError  # noqa: E402
from gptlab.tokenizers import BPETokenizer, to_hf_json  # noqa: E402
from gptlab.weights import hf  # noqa: E402
from gptlab.weights.load import load_checkpoint  # noqa: E402

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog; café {i * 7} 😀!\n" for i in range(2000))
VOCAB = 320


@pytest.fixture(scope="module")
def tokenizer() -> BPETokenizer:
    return BPETokenizer.train(TEXT[:20_000], vocab_size=VOCAB, special_tokens=["<|endoftext|>"])


def make_gpt2_dir(path: Path, tokenizer: BPETokenizer, tied: bool = True) -> "transformers.GPT2LMHeadModel":
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     tie_word_embeddings=tied, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    model = transformers.GPT2LMHeadModel(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
    (path / "tokenizer.json").write_text(json.dumps(to_hf_json(tokenizer)))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                           "eos_token": "<|endoftext|>"}))
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_import_matches_transformers_logits(tmp_path, tokenizer, tied):
    ref = make_gpt2_dir(tmp_path, tokenizer, tied)
    ckpt = hf.import_hf(tmp_path)
    assert ckpt.config.tie_embeddings == tied
    x = torch.randint(VOCAB, (2, 40))
    with torch.no_grad():
        diff = (ckpt.model.eval()(x)[0] - ref(x).logits).abs().max().item()
    assert diff <= 1e-5


def test_table_covers_every_key_both_ways(tmp_path, tokenizer):
    ref = make_gpt2_dir(tmp_path, tokenizer, tied=False)
    hf_state = {k: v for k, v in ref.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    ckpt = hf.import_hf(tmp_path)
    ours = ckpt.model.state_dict()
    back = hf.ours_to_hf(ours, "gpt2", ckpt.config)
    assert set(back) == set(hf_state)
    for k in hf_state:
        assert torch.equal(back[k], hf_state[k]), k


def test_export_loads_in_transformers_and_round_trips(tmp_path, tokenizer):
    make_gpt2_dir(tmp_path / "src", tokenizer)
    ckpt = hf.import_hf(tmp_path / "src")
    hf.export_hf(ckpt, tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        auto_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    x = torch.randint(VOCAB, (1, 50))
    with torch.no_grad():
        assert (loaded(x).logits - ckpt.model.eval()(x)[0]).abs().max().item() <= 1e-5
    assert len(TEXT.encode()) >= 100_000
    assert auto_tok.encode(TEXT) == tokenizer.encode(TEXT)
    again = hf.import_hf(tmp_path / "out")
    for k, v in ckpt.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == (tmp_path / "src" / "tokenizer_config.json").read_text()


def test_from_scratch_checkpoint_exports(tmp_path, monkeypatch):
    """A character-level model trained by gptlab loads in transformers with equal logits and text."""
    from gptlab.config import resolve_config
    from gptlab.train.loop import train

    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "c.txt").write_text(TEXT[:20_000])
    model_cfg, cfg = resolve_config("tiny", train_overrides={"corpus": str(tmp_path / "c.txt"), "max_steps": 3,
                                                             "warmup_steps": 1})
    train(model_cfg, cfg, tmp_path / "run", show_progress=False)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "exported")]) == 0
    ckpt = load_checkpoint(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
        auto_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    text = "Line 12: the lazy fox"
    ids = ckpt.tokenizer.encode(text)
    assert auto_tok.encode(text) == ids and auto_tok.decode(ids) == text
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (loaded(x).logits - ckpt.model.eval()(x)[0]).abs().max().item() <= 1e-5


def test_cli_import_and_models_accepted_directly(tmp_path, tokenizer, capsys):
    make_gpt2_dir(tmp_path / "src", tokenizer)
    assert main(["import", str(tmp_path / "src"), "--out", str(tmp_path / "ckpt")]) == 0
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    assert (tmp_path / "ckpt" / "tokenizer_config.json").is_file()
    assert main(["import", str(tmp_path / "src"), "--out", str(tmp_path / "ckpt")]) == 1
    assert "--force" in capsys.readouterr().err
    a = load_checkpoint(tmp_path / "ckpt").model.state_dict()
    b = load_checkpoint(tmp_path / "src").model.state_dict()  # the HF directory itself is a MODEL
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert main(["sample", str(tmp_path / "src"), "--prompt", "the", "--max-new-tokens", "5", "--greedy"]) == 0
    assert main(["import", str(tmp_path / "src"), "--out", str(tmp_path / "half"), "--dtype", "bf16"]) == 0
    assert load_file(str(tmp_path / "half" / "model.safetensors"))["embed_tokens.weight"].dtype == torch.bfloat16


def _expect_one_line(argv, capsys, *fragments):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for f in fragments:
        assert f in err, err


def test_bad_checkpoints_are_one_line(tmp_path, tokenizer, capsys):
    src = tmp_path / "src"
    make_gpt2_dir(src, tokenizer)
    capsys.readouterr()  # transformers' own save progress
    out = ["--out", str(tmp_path / "o"), "--force"]

    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    _expect_one_line(["import", str(src), *out], capsys, "'mamba' is not supported", "supported: gpt2")
    (src / "config.json").write_text(json.dumps(cfg))

    weights = load_file(str(src / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if k != "transformer.h.1.mlp.c_fc.weight"}, str(src / "model.safetensors"))
    _expect_one_line(["import", str(src), *out], capsys, "layers.1.mlp.up_proj.weight")

    save_file({**weights, "transformer.wpe.weight": torch.zeros(10, 32)}, str(src / "model.safetensors"))
    _expect_one_line(["import", str(src), *out], capsys, "embed_positions.weight", "(10, 32) but the model needs (64, 32)")

    save_file(weights, str(src / "model.safetensors"))
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    _expect_one_line(["import", str(src), *out], capsys, "truncated or corrupt")

    save_file(weights, str(src / "model.safetensors"))
    big = BPETokenizer.train(TEXT[:20_000], vocab_size=VOCAB + 40)
    (src / "tokenizer.json").write_text(json.dumps(to_hf_json(big)))
    _expect_one_line(["import", str(src), *out], capsys, "do not belong together")


# --- Llama, Qwen2, Mistral ---------------------------------------------------------------------

LLAMA_LIKE = {
    "llama-gqa-untied": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 2, "tie_word_embeddings": False}),
    "llama-mqa-tied": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    "llama-linear-rope": ("LlamaConfig", "LlamaForCausalLM",
                          {"num_key_value_heads": 2, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", {
        "num_key_value_heads": 2, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16}}),
    "yarn-rope": ("LlamaConfig", "LlamaForCausalLM", {
        "num_key_value_heads": 2,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}}),
    "qwen2-biases": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 2, "sliding_window": 8}),
}


def make_llama_like_dir(path: Path, tokenizer, kind: str):
    config_cls, model_cls, extra = LLAMA_LIKE[kind]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, **extra)
    config._attn_implementation = "eager"
    model = getattr(transformers, model_cls)(config).eval()
    if kind == "qwen2-biases":  # random biases, so a mapping mistake cannot hide behind zeros
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
    (path / "tokenizer.json").write_text(json.dumps(to_hf_json(tokenizer)))
    return model


@pytest.mark.parametrize("kind", list(LLAMA_LIKE))
def test_llama_family_import_export_parity(tmp_path, tokenizer, kind):
    ref = make_llama_like_dir(tmp_path / "src", tokenizer, kind)
    ckpt = hf.import_hf(tmp_path / "src")
    x = torch.randint(VOCAB, (2, 40))  # longer than the Mistral window and the RoPE original context
    with torch.no_grad():
        ours = ckpt.model.eval()(x)[0]
        assert (ours - ref(x).logits).abs().max().item() <= 1e-5
    hf.export_hf(ckpt, tmp_path / "out", family=ckpt.config.arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    with torch.no_grad():
        assert (back(x).logits - ours).abs().max().item() <= 1e-5
    ref_state = {k: v for k, v in ref.state_dict().items() if not k.endswith("inv_freq")}
    if ckpt.config.tie_embeddings:
        ref_state.pop("lm_head.weight", None)
    exported = hf.ours_to_hf(ckpt.model.state_dict(), ckpt.config.arch, ckpt.config)
    assert set(exported) == set(ref_state)
    assert all(torch.equal(exported[k], ref_state[k]) for k in ref_state)


def test_hf_hub_spec_downloads_then_imports(tmp_path, tokenizer, monkeypatch):
    import huggingface_hub

    make_gpt2_dir(tmp_path / "snap", tokenizer)
    calls = []

    def fake_snapshot_download(repo, revision=None, allow_patterns=None):
        calls.append((repo, revision))
        assert "*.safetensors" in allow_patterns and "tokenizer.json" in allow_patterns
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    ckpt = load_checkpoint("hf:openai-community/gpt2@main")
    assert calls == [("openai-community/gpt2", "main")] and ckpt.config.n_layer == 2
    with pytest.raises(UserError, match="expected hf:ORG/NAME"):
        load_checkpoint("hf:gpt2")


def test_sharded_checkpoint_imports(tmp_path, tokenizer):
    ref = make_gpt2_dir(tmp_path / "one", tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    (tmp_path / "sharded" / "tokenizer.json").write_text((tmp_path / "one" / "tokenizer.json").read_text())
    shards = list((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a, b = hf.import_hf(tmp_path / "one").model.state_dict(), hf.import_hf(tmp_path / "sharded").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_onto_an_existing_file_is_refused(tmp_path, tokenizer, capsys):
    make_gpt2_dir(tmp_path / "src", tokenizer)
    capsys.readouterr()
    precious = tmp_path / "notes.txt"
    precious.write_text("mine")
    for argv in (["export", str(tmp_path / "src"), "--out", str(precious)],
                 ["import", str(tmp_path / "src"), "--out", str(precious)]):
        _expect_one_line(argv, capsys, "already exists", "--force")
    assert precious.read_text() == "mine"
