"""The hand-written Transformer: its configuration, layers and the GPT language model."""

from gptlab.model.config import ModelConfig
from gptlab.model.transformer import GPT

__all__ = ["GPT", "ModelConfig"]
