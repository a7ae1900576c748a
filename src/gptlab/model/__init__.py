"""The hand-written Transformer: its configuration, layers, KV cache and the GPT language model
(``build_model`` also makes the bigram baseline)."""

from gptlab.model.config import FAMILY_DEFAULTS, ModelConfig
from gptlab.model.kv_cache import KVCache
from gptlab.model.transformer import GPT, build_model

__all__ = ["FAMILY_DEFAULTS", "GPT", "KVCache", "ModelConfig", "build_model"]
