"""Qwen2 (R1-Distill-Qwen-1.5B/7B/14B/32B): q/k/v projections carry a bias, o_proj does not."""
from .base import Architecture, register
from .config_keys import SLIDING_CHECKS


@register
class Qwen2(Architecture):
    name = "Qwen2ForCausalLM"
    model_type = "qwen2"
    attention_bias = True
    checks = SLIDING_CHECKS
    # transformers' Qwen2 always has q/k/v bias and reads no attention_bias key; the window keys are
    # harmless while the window is off (SLIDING_CHECKS refuses it on)
    harmless = frozenset({"attention_bias", "sliding_window", "max_window_layers"})
