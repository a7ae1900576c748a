"""Turning a trained model into text: sampling functions and the generation loop."""

from gptlab.inference.sampling import (
    apply_temperature,
    check_sampling_args,
    generate,
    min_p_filter,
    sample_next,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "apply_temperature",
    "check_sampling_args",
    "generate",
    "min_p_filter",
    "sample_next",
    "top_k_filter",
    "top_p_filter",
]
