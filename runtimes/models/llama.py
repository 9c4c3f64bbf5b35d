"""Llama (R1-Distill-Llama-8B/70B, SmolLM2): no biases, optional llama3 rope scaling."""
from .base import Architecture, register
from .config_keys import value


@register
class Llama(Architecture):
    name = "LlamaForCausalLM"
    model_type = "llama"
    # transformers' attention_bias puts a bias on q, k, v *and* o_proj; none is implemented
    checks = {"attention_bias": (value(lambda v: not v), "q/k/v/o projections without bias")}
