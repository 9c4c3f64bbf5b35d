"""Published model configs (../shared/R1_FAMILY.md; Phi-4-mini-reasoning below), keyed by preset name.

``preset_spec(name, scale)`` gives the full model's ModelSpec or a ``tiny`` one that keeps the
architecture's structure (GQA grouping, biases, q/k norms, partial rotary, rope type, the real
vocabulary where the fixture's tokenizer carries it) at sizes a unit test can run, with every
linear dimension a multiple of 128 so INT4 tests at any group size really quantize.

What differs between presets at tiny scale is declared on each :class:`Preset`, never decided
from the architecture's name.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from runtimes.models import ModelSpec, get_architecture, spec_from_config

from .errors import ConfigError

R1_GENERATION = {"temperature": 0.6, "top_p": 0.95, "do_sample": True}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
QWEN3_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}

TINY_HIDDEN, TINY_KV_HEADS, TINY_LAYERS, TINY_LLAMA_VOCAB = 128, 2, 2, 512
TINY_CONTEXT = 4096
R1_SOURCE = "the published config.json of each DeepSeek-R1 distill (R1_FAMILY.md in the project's notes)"
PHI4_SOURCE = ("Phi-4-mini's published config.json (rope factors, dims and keys as vendored from "
               "microsoft/Phi-4-mini-instruct, e.g. by FastFlowLM and keras-hub's phi4_mini presets; "
               "Phi-4-mini-reasoning is Phi-4-mini fine-tuned, same architecture), bos/eos/pad from "
               "Phi-4-mini-reasoning's tokenizer_config.json (microsoft/onnxruntime-extensions "
               "test/data/phi-4-mini-reasoning/), sampling from its model card (temperature 0.8, top_p 0.95)")


@dataclass(frozen=True)
class Preset:
    """A published model and what its test-scale twin and fixture carry.

    ``tokenizer``: the fixture's tokenizer (a key of ``edge_export.fixture_tokenizers.TOKENIZERS``).
    ``tiny_vocab``: the tiny scale's vocabulary, its specials at the top ids (None: the real
    vocabulary, whose tokenizer puts the specials at their real ids).
    ``tiny_hidden``: the tiny hidden size (None: heads x head_dim, for families whose config
    derives the head width from hidden_size // num_attention_heads).
    ``tiny_original_context``: LongRoPE's original context at tiny scale (tokens), small so a
    short prompt crosses it; the full model's extension factor is kept.
    ``source``: where the full-scale figures come from (the fixture's README repeats it).
    """

    spec: ModelSpec
    tokenizer: str
    tiny_vocab: int | None = None
    tiny_hidden: int | None = TINY_HIDDEN
    tiny_original_context: int | None = None
    source: str = R1_SOURCE


def _qwen2(hidden, layers, heads, kv, inter, vocab, theta, eps) -> Preset:
    return Preset(ModelSpec("Qwen2ForCausalLM", hidden, layers, heads, kv, 128, inter, vocab, rope_theta=theta,
                            rms_norm_eps=eps, attention_bias=True, max_position_embeddings=131072,
                            bos_token_id=151646, eos_token_ids=(151643,), torch_dtype="bfloat16",
                            generation=R1_GENERATION), tokenizer="r1-distill-qwen")


def _llama(hidden, layers, heads, inter, eos) -> Preset:
    return Preset(ModelSpec("LlamaForCausalLM", hidden, layers, heads, 8, 128, inter, 128256, rope_theta=500000.0,
                            rope_scaling=LLAMA3_ROPE, rms_norm_eps=1e-5, max_position_embeddings=131072,
                            bos_token_id=128000, eos_token_ids=eos, torch_dtype="bfloat16", generation=R1_GENERATION),
                  tokenizer="byte-level-r1", tiny_vocab=TINY_LLAMA_VOCAB)


# Phi-4-mini's config.json. Phi-4-mini-reasoning is Phi-4-mini fine-tuned for math reasoning (same
# architecture and shapes; its model card). Its own config.json was not found in a public copy; these
# are Phi-4-mini's published values: the rope factors, dims, ids and keys as vendored from
# microsoft/Phi-4-mini-instruct's config.json (e.g. FastFlowLM's Phi4-mini config, keras-hub's
# phi4_mini presets: "Long-context RoPE scaling factors extracted from microsoft/phi-4-mini-instruct
# config.json"); bos/eos/pad 199999 = <|endoftext|>, which Phi-4-mini-reasoning's own
# tokenizer_config.json names bos, eos and pad (microsoft/onnxruntime-extensions
# test/data/phi-4-mini-reasoning/tokenizer_config.json). Its 3,836,021,760 parameters check out.
PHI4_MINI_LONG_FACTOR = [
    1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649, 2.446418898,
    2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845, 5.351743533, 5.984965424,
    6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158, 11.70738129, 13.09260651, 14.64173252,
    16.37415215, 18.31155283, 20.47818807, 22.90118105, 25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23,
    32.6, 32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77]
PHI4_MINI_CONFIG = {
    "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 199999, "eos_token_id": 199999, "pad_token_id": 199999, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
    "full_attn_mod": 1, "interpolate_factor": 1, "hidden_act": "silu", "hidden_size": 3072,
    "initializer_range": 0.02, "intermediate_size": 8192, "lm_head_bias": False, "mlp_bias": False,
    "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "num_attention_heads": 24,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "partial_rotary_factor": 0.75, "rms_norm_eps": 1e-05,
    "rope_scaling": {"long_factor": PHI4_MINI_LONG_FACTOR, "short_factor": [1.0] * 48, "type": "longrope"},
    "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 200064,
}
# The model card's sampling (temperature 0.8, top_p 0.95, do_sample); a turn ends with <|end|>
# (200020) as the chat template writes it, and Phi-4-mini's generation_config.json stops on
# [200020, 199999] (quoted in pytorch/executorch PR #22042).
PHI4_GENERATION = {"temperature": 0.8, "top_p": 0.95, "do_sample": True, "eos_token_ids": [200020, 199999]}


def _phi4_mini_reasoning() -> Preset:
    spec = spec_from_config(PHI4_MINI_CONFIG, "Phi-4-mini-reasoning config.json (edge_export/presets.py)")
    return Preset(dataclasses.replace(spec, generation=PHI4_GENERATION), tokenizer="byte-level-phi4",
                  tiny_hidden=None, tiny_original_context=64, source=PHI4_SOURCE)


PRESETS: dict[str, Preset] = {
    "r1-distill-qwen-1.5b": _qwen2(1536, 28, 12, 2, 8960, 151936, 10000.0, 1e-6),
    "r1-distill-qwen-7b": _qwen2(3584, 28, 28, 4, 18944, 152064, 10000.0, 1e-6),
    "r1-distill-qwen-14b": _qwen2(5120, 48, 40, 8, 13824, 152064, 1e6, 1e-5),
    "r1-distill-qwen-32b": _qwen2(5120, 64, 40, 8, 27648, 152064, 1e6, 1e-5),
    "r1-distill-llama-8b": _llama(4096, 32, 32, 14336, (128001,)),
    "r1-distill-llama-70b": _llama(8192, 80, 64, 28672, (128001, 128008, 128009)),
    "r1-0528-qwen3-8b": Preset(ModelSpec("Qwen3ForCausalLM", 4096, 36, 32, 8, 128, 12288, 151936, rope_theta=1e6,
                                         rope_scaling=QWEN3_YARN, rms_norm_eps=1e-6, qk_norm=True,
                                         max_position_embeddings=131072, bos_token_id=151646,
                                         eos_token_ids=(151643,), torch_dtype="bfloat16", generation=R1_GENERATION),
                               tokenizer="r1-distill-qwen-as-closest"),
    "phi-4-mini-reasoning": _phi4_mini_reasoning(),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})")
    return PRESETS[name]


def preset_spec(name: str, scale: str = "full") -> ModelSpec:
    """The preset's ModelSpec at ``full`` (published) or ``tiny`` (test) scale."""
    preset = get_preset(name)
    if scale not in ("full", "tiny"):
        raise ConfigError(f"--scale must be tiny or full, got '{scale}'")
    return preset.spec if scale == "full" else _tiny(preset)


def _tiny(preset: Preset) -> ModelSpec:
    spec = preset.spec
    heads = spec.num_heads // spec.num_kv_heads * TINY_KV_HEADS
    head_dim = 32 if (heads * 32) % 128 == 0 else 64  # keep q's width a multiple of 128 (and of 16 for GQA)
    vocab = preset.tiny_vocab or spec.vocab_size
    tiny = dataclasses.replace(
        spec, hidden_size=preset.tiny_hidden or heads * head_dim, num_layers=TINY_LAYERS, num_heads=heads,
        num_kv_heads=TINY_KV_HEADS, head_dim=head_dim, intermediate_size=2 * (preset.tiny_hidden or heads * head_dim),
        vocab_size=vocab, max_position_embeddings=TINY_CONTEXT,
        bos_token_id=vocab - 6 if preset.tiny_vocab else spec.bos_token_id,
        eos_token_ids=(vocab - 5,) if preset.tiny_vocab else spec.eos_token_ids)
    if preset.tiny_original_context:
        tiny = _tiny_long_rope(tiny, spec, preset.tiny_original_context)
    return tiny


def _tiny_long_rope(tiny: ModelSpec, full: ModelSpec, original: int) -> ModelSpec:
    """LongRoPE at tiny scale: the real per-pair factors resampled to the tiny rotary width (every
    k-th where k divides, else linearly interpolated), a small original context, the full model's
    extension factor (max / original context) kept; the derived factor and attention factor are
    then filled in by reading the config back as the architecture does."""
    scaling = dict(full.rope_scaling)
    pairs = tiny.rotary_dim // 2
    for key in ("long_factor", "short_factor"):
        scaling[key] = _resample(scaling[key], pairs)
    extension = full.max_position_embeddings // scaling["original_max_position_embeddings"]
    scaling = {k: v for k, v in scaling.items() if k not in ("factor", "attention_factor")}
    scaling["original_max_position_embeddings"] = original
    tiny = dataclasses.replace(tiny, rope_scaling=scaling, max_position_embeddings=original * extension)
    arch = get_architecture(tiny.architecture)
    read = arch.spec_from_config(arch.config_from_spec(tiny), f"tiny {tiny.architecture} config")
    return dataclasses.replace(tiny, rope_scaling=read.rope_scaling)


def _resample(factors: list, n: int) -> list[float]:
    if len(factors) % n == 0:
        return [float(f) for f in factors[::len(factors) // n]]
    return [float(f) for f in np.interp(np.linspace(0, len(factors) - 1, n), np.arange(len(factors)), factors)]
