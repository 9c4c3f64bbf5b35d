"""Phi-3 / Phi-4-mini (Phi-4-mini-reasoning, a distilled reasoning model): Llama's layer with q/k/v
stored as one fused qkv_proj and gate/up as one gate_up_proj (split on read), a partial rotary
(Phi-4-mini rotates 96 of 128 channels) and LongRoPE's short/long factors."""
from .base import Architecture, register
from .config_keys import value


def _window_off(window, config: dict) -> bool:
    """transformers' Phi3 masks with a window on every layer when one is set; a window at least the
    whole context (Phi-4-mini: 262144 over 131072) changes nothing."""
    return window is None or window >= config.get("max_position_embeddings", 0)


@register
class Phi3(Architecture):
    name = "Phi3ForCausalLM"
    model_type = "phi3"
    partial_rotary = True
    rope_types = ("default", "longrope")
    rope_aliases = {"su": "longrope", "yarn": "longrope"}  # transformers' Phi3Config maps both to longrope
    fused = {"model.layers.{bid}.self_attn.qkv_proj.weight": ("q_proj", "k_proj", "v_proj"),
             "model.layers.{bid}.mlp.gate_up_proj.weight": ("gate_proj", "up_proj")}
    checks = {"attention_bias": (value(lambda v: not v), "q/k/v/o projections without bias"),
              "sliding_window": (_window_off, "full causal attention (a window shorter than the context is not "
                                              "implemented)"),
              "lm_head_bias": (value(lambda v: not v), "an lm_head without bias")}
    harmless = frozenset({"full_attn_mod", "interpolate_factor"})
    # transformers' Phi3Config: a top-level original context of 4096 unless stated, and it wins over
    # the rope dict's own original_max_position_embeddings
    config_defaults = {"original_max_position_embeddings": 4096}

    def extra_config(self, spec) -> dict:
        """What Phi-3's config.json states and transformers' Phi3Config would otherwise default from
        Phi-3-mini: the original context at the top level (default 4096, and it overrides the rope
        dict's), and pad_token_id (default 32000, outside a smaller vocabulary; Phi-4-mini pads with
        its eos, <|endoftext|>)."""
        extra = {}
        original = (spec.rope_scaling or {}).get("original_max_position_embeddings")
        if original:
            extra["original_max_position_embeddings"] = original
        if spec.eos_token_ids:
            extra["pad_token_id"] = spec.eos_token_ids[0]
        return extra
