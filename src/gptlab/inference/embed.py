"""Sentence embeddings from a BERT encoder, and ``gptlab embed``.

A text becomes ``[CLS] tokens [SEP]`` (as Hugging Face's BERT tokenizers make it), runs through
the encoder, and its hidden states are averaged over its real tokens, padding left out: mean
pooling, as sentence-transformers does for all-MiniLM-L6-v2. Normalised to length 1, the dot
product of two embeddings is their cosine similarity, high for texts that mean alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptlab.errors import UserError
from gptlab.model.bert import Bert
from gptlab.tokenizers.hf import HFTokenizer

#: the BERT special tokens a text is wrapped in and padded with
CLS, SEP, PAD = "[CLS]", "[SEP]", "[PAD]"


def encode_batch(tokenizer: HFTokenizer, texts: list[str], max_length: int, pad_id: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) of ``[CLS] text [SEP]`` padded on the right to the longest, and the
    attention mask (B, T), 1 on real tokens. Texts longer than ``max_length`` tokens in all
    lose their end (the [SEP] is kept), as Hugging Face truncates."""
    missing = [t for t in (CLS, SEP) if t not in tokenizer.special_tokens]
    if missing:
        raise UserError(f"the tokenizer has no {' or '.join(missing)} special token; embeddings need a BERT "
                        "(WordPiece) tokenizer.json")
    cls, sep = tokenizer.special_tokens[CLS], tokenizer.special_tokens[SEP]
    rows = [[cls, *tokenizer.encode(text)[: max_length - 2], sep] for text in texts]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of ``hidden`` (B, T, C) over the positions where ``mask`` (B, T) is 1: (B, C)."""
    m = mask[..., None].to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


@torch.no_grad()
def embed(model: Bert, tokenizer: HFTokenizer, texts: list[str], batch_size: int = 32, normalize: bool = True,
          max_length: int | None = None) -> torch.Tensor:
    """One float32 vector per text, (N, C) on the CPU: mean-pooled last hidden states,
    L2-normalised unless ``normalize`` is False. ``max_length`` (default: the model's
    max_position_embeddings) caps the tokens read per text, [CLS] and [SEP] included."""
    if not texts:
        raise UserError("no texts to embed; give at least one")
    if batch_size <= 0:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    limit = model.config.max_position_embeddings
    max_length = limit if max_length is None else max_length
    if not 2 < max_length <= limit:
        raise UserError(f"max_length {max_length} must be between 3 and the model's {limit} positions")
    pad_id = tokenizer.special_tokens.get(PAD, model.config.pad_token_id)
    device = model.embed_tokens.weight.device
    was_training = model.training
    model.eval()  # dropout off: the same text always gets the same vector
    out = []
    try:
        for start in range(0, len(texts), batch_size):
            ids, mask = encode_batch(tokenizer, texts[start : start + batch_size], max_length, pad_id)
            ids, mask = ids.to(device), mask.to(device)
            out.append(mean_pool(model(ids, attention_mask=mask), mask).float().cpu())  # (b, C)
    finally:
        model.train(was_training)
    vectors = torch.cat(out)
    return F.normalize(vectors, p=2, dim=1) if normalize else vectors


def run_embed(model_name_or_path: str, texts: list[str], batch_size: int = 32, normalize: bool = True,
              device: str = "auto", show: int = 6) -> torch.Tensor:
    """``gptlab embed``: print each text's embedding (size, first ``show`` values, norm) and,
    for several texts, their cosine similarities; return the (N, C) embeddings."""
    from gptlab.device import pick_device
    from gptlab.weights.bert import load_bert

    loaded = load_bert(model_name_or_path)
    vectors = embed(loaded.model.to(pick_device(device)), loaded.tokenizer, texts, batch_size, normalize)
    kind = "mean-pooled, L2-normalised" if normalize else "mean-pooled"
    print(f"{model_name_or_path}: {len(texts)} embedding(s) of {vectors.shape[1]} dimensions ({kind})")
    for i, (text, v) in enumerate(zip(texts, vectors), 1):
        head = ", ".join(f"{x:+.4f}" for x in v[:show].tolist())
        print(f"[{i}] dim {v.numel()}  norm {v.norm().item():.4f}  [{head}, ...]  {text!r}")
    if len(texts) > 1:
        unit = F.normalize(vectors, p=2, dim=1)
        sims = unit @ unit.t()  # (N, N) cosine similarities
        print("cosine similarity:")
        print("     " + "".join(f"{f'[{j}]':>8}" for j in range(1, len(texts) + 1)))
        for i, row in enumerate(sims.tolist(), 1):
            print(f"{f'[{i}]':>5}" + "".join(f"{s:8.4f}" for s in row))
    return vectors
