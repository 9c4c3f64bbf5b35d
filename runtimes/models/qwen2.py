"""Qwen2 (R1-Distill-Qwen-1.5B/7B/14B/32B): q/k/v projections carry a bias, o_proj does not."""
from .base import Architecture, register


@register
class Qwen2(Architecture):
    name = "Qwen2ForCausalLM"
    model_type = "qwen2"
    attention_bias = True
