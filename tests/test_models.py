"""Presets against the published R1 family figures, and the architecture registry."""
import pytest

from edge_export.presets import PRESETS, preset_spec
from runtimes import rope
from runtimes.models import get_architecture, supported_architectures

# parameters from ../shared/R1_FAMILY.md (published safetensors totals)
PUBLISHED = {"r1-distill-qwen-1.5b": 1.777e9, "r1-distill-qwen-7b": 7.616e9, "r1-distill-qwen-14b": 14.770e9,
             "r1-distill-qwen-32b": 32.764e9, "r1-distill-llama-8b": 8.030e9, "r1-distill-llama-70b": 70.554e9,
             "phi-4-mini-reasoning": 3.836e9}
KV_KIB = {"r1-distill-qwen-1.5b": 28, "r1-distill-qwen-7b": 56, "r1-distill-qwen-14b": 192,
          "r1-distill-qwen-32b": 256, "r1-distill-llama-8b": 128, "r1-distill-llama-70b": 320,
          "phi-4-mini-reasoning": 128}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_and_kv(name):
    spec = preset_spec(name)
    assert abs(spec.parameter_count - PUBLISHED[name]) / PUBLISHED[name] < 0.001
    assert spec.kv_bytes_per_token(2) == KV_KIB[name] * 1024


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_tiny_keeps_structure(name):
    full, tiny = preset_spec(name), preset_spec(name, "tiny")
    assert tiny.architecture == full.architecture
    assert tiny.num_heads // tiny.num_kv_heads == full.num_heads // full.num_kv_heads
    assert (tiny.attention_bias, tiny.qk_norm, tiny.tied_embeddings, tiny.partial_rotary_factor) == \
        (full.attention_bias, full.qk_norm, full.tied_embeddings, full.partial_rotary_factor)
    if (full.rope_scaling or {}).get("rope_type") == "longrope":  # resized to the tiny rotary width
        assert set(tiny.rope_scaling) == set(full.rope_scaling)
        assert len(tiny.rope_scaling["long_factor"]) == len(tiny.rope_scaling["short_factor"]) == tiny.rotary_dim // 2
        assert tiny.rope_scaling["factor"] == full.rope_scaling["factor"]
        assert tiny.rope_scaling["original_max_position_embeddings"] < 128  # a short prompt crosses it
    else:
        assert tiny.rope_scaling == full.rope_scaling
    assert tiny.head_dim % 16 == 0  # onnxruntime's GroupQueryAttention
    for shape in tiny.tensor_shapes().values():
        if len(shape) == 2 and shape[0] != tiny.vocab_size:
            assert shape[1] % 128 == 0, "linear inputs must be multiples of every group size"


def test_registry_names():
    assert supported_architectures() == ["LlamaForCausalLM", "Phi3ForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]
    assert get_architecture("qwen2").name == "Qwen2ForCausalLM"


def test_llama3_rope_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    spec = preset_spec("r1-distill-llama-8b")
    config = LlamaConfig(**get_architecture("llama").config_from_spec(spec))
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours, factor = rope.inv_freq(128, spec.rope_theta, spec.rope_scaling)
    assert factor == 1.0
    assert abs(ours - theirs.double().numpy()).max() < 1e-6 * abs(ours).max()


def test_yarn_attention_factor():
    _, factor = rope.inv_freq(128, 1e6, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    assert factor == pytest.approx(0.1 * __import__("math").log(4.0) + 1.0)
