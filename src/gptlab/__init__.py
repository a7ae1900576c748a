"""gptlab: build a language model from scratch, every layer hand-written in PyTorch."""

__version__ = "0.1.0"
