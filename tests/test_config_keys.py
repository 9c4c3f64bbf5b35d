"""config.json keys: understood, refused by name, or reported; never silently ignored."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import pytest
import transformers
from click.testing import CliRunner

from edge_export.cli import main
from edge_export.errors import ExportError
from runtimes.errors import ConfigError
from runtimes.models import spec_from_config, strict_config


def llama_config(**extra) -> dict:
    """A tiny Llama config.json exactly as transformers 5 writes it, plus ``extra``."""
    config = json.loads(transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}).to_json_string())
    config["architectures"] = ["LlamaForCausalLM"]
    config.update(extra)
    return config


def qwen2_config(**extra) -> dict:
    config = json.loads(transformers.Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096).to_json_string())
    config["architectures"] = ["Qwen2ForCausalLM"]
    config.update(extra)
    return config


def test_transformers_5_rope_parameters_are_read():
    spec = spec_from_config(llama_config())
    assert spec.rope_theta == 500000.0
    assert spec.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def test_4x_spelling_reads_the_same():
    config = llama_config()
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    config["torch_dtype"] = config.pop("dtype", "float32")
    assert spec_from_config(config) == spec_from_config(llama_config())


@pytest.mark.parametrize("key, value", [
    ("partial_rotary_factor", 0.5), ("mlp_bias", True), ("attention_bias", True), ("hidden_act", "gelu"),
    ("final_logit_softcapping", 30.0), ("attn_logit_softcapping", 50.0), ("embedding_multiplier", 12.0),
    ("residual_multiplier", 0.22), ("logits_scaling", 8.0), ("quantization_config", {"quant_method": "awq"}),
])
def test_arithmetic_key_not_implemented_is_refused_by_name(key, value):
    with pytest.raises(ConfigError, match=rf"'{key}' = {value!r}".replace("{", r"\{").replace("}", r"\}")
                       .replace("(", r"\(").replace(")", r"\)")):
        spec_from_config(llama_config(**{key: value}))


@pytest.mark.parametrize("rope", [
    {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
    {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0], "rope_theta": 1e4},
])
def test_rope_type_not_implemented_is_refused_by_name(rope):
    with pytest.raises(ConfigError, match=f"rope type '{rope['rope_type']}' is not implemented"):
        spec_from_config(llama_config(rope_parameters=rope))


def test_partial_rotary_inside_rope_parameters_is_refused():
    with pytest.raises(ConfigError, match="partial_rotary_factor"):
        spec_from_config(llama_config(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                       "partial_rotary_factor": 0.75}))


def test_spellings_that_disagree_are_refused():
    with pytest.raises(ConfigError, match="both 'rope_parameters' and 'rope_scaling'"):
        spec_from_config(llama_config(rope_scaling={"rope_type": "linear", "factor": 2.0}))


def test_unknown_rope_parameter_is_refused():
    with pytest.raises(ConfigError, match="rope parameter\\(s\\) mystery"):
        spec_from_config(llama_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "mystery": 1,
                                                       "rope_theta": 1e4}))


def test_yarn_defaults_follow_transformers():
    spec = spec_from_config(llama_config(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": None,
                                                          "original_max_position_embeddings": 64}))
    assert spec.rope_scaling["factor"] == 256 / 64  # max_position_embeddings / original
    spec = spec_from_config(llama_config(rope_parameters={"rope_type": "llama3", "rope_theta": 1e6, "factor": 8.0,
                                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0}))
    assert spec.rope_scaling["original_max_position_embeddings"] == 256


def test_sliding_window_refused_only_when_on():
    assert spec_from_config(qwen2_config())  # transformers writes use_sliding_window false + layer_types
    assert spec_from_config(qwen2_config(use_sliding_window=True, sliding_window=4096))  # window >= context
    with pytest.raises(ConfigError, match="'use_sliding_window' = True"):
        spec_from_config(qwen2_config(use_sliding_window=True, sliding_window=512, max_window_layers=2,
                                      layer_types=None))
    with pytest.raises(ConfigError, match="'layer_types'"):
        spec_from_config(qwen2_config(layer_types=["full_attention", "linear_attention"] * 2))


def test_unknown_key_is_reported_once_and_refused_when_strict(caplog):
    config = llama_config(mystery_knob=3)
    with caplog.at_level(logging.WARNING):
        spec_from_config(config, "a/config.json")
        spec_from_config(config, "a/config.json")
    warnings = [r.getMessage() for r in caplog.records if "mystery_knob" in r.getMessage()]
    assert len(warnings) == 1 and "a/config.json" in warnings[0]
    with strict_config(), pytest.raises(ConfigError, match="unknown config key\\(s\\) mystery_knob"):
        spec_from_config(config)


def test_cli_warns_on_unknown_key_and_strict_config_refuses(tmp_path, tiny_llama):
    folder = shutil.copytree(tiny_llama, tmp_path / "ckpt")
    config = json.loads((tiny_llama / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, odd_setting=1)))
    # a real process, so the CLI's own logging setup (not pytest's capture) prints the warning
    warned = subprocess.run([sys.executable, "-c", "from edge_export.cli import main; main()", "inspect", str(folder)],
                            capture_output=True, text=True, timeout=120)
    assert warned.returncode == 0
    assert [line for line in warned.stderr.splitlines() if "odd_setting" in line][0].startswith("WARNING")
    refused = CliRunner().invoke(main, ["--strict-config", "inspect", str(folder)])
    assert refused.exit_code == 2
    assert refused.stderr.strip().count("\n") == 0 and "odd_setting" in refused.stderr


def test_ort_refuses_a_head_dim_its_attention_kernel_cannot_run(tmp_path):
    from runtimes.models import ModelSpec
    from edge_export.targets.onnx_ort import build_ort_decoder
    spec = ModelSpec("LlamaForCausalLM", 96, 1, 4, 2, 24, 128, 512)
    with pytest.raises(ExportError, match="head_dim=24 is not a multiple of 16.*--variant portable"):
        build_ort_decoder(spec, None, tmp_path, max_context=64)
