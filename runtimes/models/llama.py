"""Llama (R1-Distill-Llama-8B/70B, SmolLM2): no biases, optional llama3 rope scaling."""
from .base import Architecture, register


@register
class Llama(Architecture):
    name = "LlamaForCausalLM"
    model_type = "llama"
