"""The DeepSeek-R1 distill family's published configs (../shared/R1_FAMILY.md), keyed by preset name.

``preset_spec(name, scale)`` gives the full model's ModelSpec or a ``tiny`` one that keeps the
architecture's structure (GQA grouping, biases, q/k norms, rope scaling, the real vocabulary
for Qwen) at sizes a unit test can run, with every linear dimension a multiple of 128 so INT4
tests at any group size really quantize.
"""
from __future__ import annotations

import dataclasses

from runtimes.models import ModelSpec

from .errors import ConfigError

R1_GENERATION = {"temperature": 0.6, "top_p": 0.95, "do_sample": True}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
QWEN3_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


def _qwen2(hidden, layers, heads, kv, inter, vocab, theta, eps) -> ModelSpec:
    return ModelSpec("Qwen2ForCausalLM", hidden, layers, heads, kv, 128, inter, vocab, rope_theta=theta,
                     rms_norm_eps=eps, attention_bias=True, max_position_embeddings=131072,
                     bos_token_id=151646, eos_token_ids=(151643,), torch_dtype="bfloat16", generation=R1_GENERATION)


def _llama(hidden, layers, heads, inter, eos) -> ModelSpec:
    return ModelSpec("LlamaForCausalLM", hidden, layers, heads, 8, 128, inter, 128256, rope_theta=500000.0,
                     rope_scaling=LLAMA3_ROPE, rms_norm_eps=1e-5, max_position_embeddings=131072,
                     bos_token_id=128000, eos_token_ids=eos, torch_dtype="bfloat16", generation=R1_GENERATION)


PRESETS: dict[str, ModelSpec] = {
    "r1-distill-qwen-1.5b": _qwen2(1536, 28, 12, 2, 8960, 151936, 10000.0, 1e-6),
    "r1-distill-qwen-7b": _qwen2(3584, 28, 28, 4, 18944, 152064, 10000.0, 1e-6),
    "r1-distill-qwen-14b": _qwen2(5120, 48, 40, 8, 13824, 152064, 1e6, 1e-5),
    "r1-distill-qwen-32b": _qwen2(5120, 64, 40, 8, 27648, 152064, 1e6, 1e-5),
    "r1-distill-llama-8b": _llama(4096, 32, 32, 14336, (128001,)),
    "r1-distill-llama-70b": _llama(8192, 80, 64, 28672, (128001, 128008, 128009)),
    "r1-0528-qwen3-8b": ModelSpec("Qwen3ForCausalLM", 4096, 36, 32, 8, 128, 12288, 151936, rope_theta=1e6,
                                  rope_scaling=QWEN3_YARN, rms_norm_eps=1e-6, qk_norm=True,
                                  max_position_embeddings=131072, bos_token_id=151646, eos_token_ids=(151643,),
                                  torch_dtype="bfloat16", generation=R1_GENERATION),
}

TINY_HIDDEN, TINY_KV_HEADS, TINY_LAYERS, TINY_LLAMA_VOCAB = 128, 2, 2, 512


def preset_spec(name: str, scale: str = "full") -> ModelSpec:
    """The preset's ModelSpec at ``full`` (published) or ``tiny`` (test) scale."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})")
    if scale not in ("full", "tiny"):
        raise ConfigError(f"--scale must be tiny or full, got '{scale}'")
    spec = PRESETS[name]
    if scale == "full":
        return spec
    group = spec.num_heads // spec.num_kv_heads
    heads = group * TINY_KV_HEADS
    head_dim = 32 if (heads * 32) % 128 == 0 else 64  # keep q's width a multiple of 128
    llama = spec.architecture == "LlamaForCausalLM"
    vocab = TINY_LLAMA_VOCAB if llama else spec.vocab_size  # Qwen keeps the real R1 tokenizer's vocab
    return dataclasses.replace(
        spec, hidden_size=TINY_HIDDEN, num_layers=TINY_LAYERS, num_heads=heads, num_kv_heads=TINY_KV_HEADS,
        head_dim=head_dim, intermediate_size=2 * TINY_HIDDEN, vocab_size=vocab, max_position_embeddings=4096,
        bos_token_id=vocab - 6 if llama else spec.bos_token_id,
        eos_token_ids=(vocab - 5,) if llama else spec.eos_token_ids)
