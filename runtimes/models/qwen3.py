"""Qwen3 (DeepSeek-R1-0528-Qwen3-8B): per-head RMSNorm on q and k before rope, no q/k/v bias.

Its long-context YaRN rope scaling is implemented in runtimes/rope.py.
"""
from .base import Architecture, register
from .config_keys import SLIDING_CHECKS, value


@register
class Qwen3(Architecture):
    name = "Qwen3ForCausalLM"
    model_type = "qwen3"
    qk_norm = True
    checks = {**SLIDING_CHECKS,
              "attention_bias": (value(lambda v: not v), "q/k/v/o projections without bias")}
    harmless = frozenset({"sliding_window", "max_window_layers"})
