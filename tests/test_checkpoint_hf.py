"""HF folders: what is read, and the one-line error each broken input gets."""
import json
import shutil
import struct

import numpy as np
import pytest

from edge_export.checkpoint import open_checkpoint
from edge_export.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from edge_export.errors import CheckpointError, ConfigError, UnsupportedArchitectureError


def copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_reads_spec_tokenizer_and_generation(tiny_llama):
    ckpt = open_checkpoint(tiny_llama)
    assert ckpt.spec.architecture == "LlamaForCausalLM"
    assert ckpt.spec.rope_scaling["rope_type"] == "llama3"
    assert ckpt.spec.generation["temperature"] == 0.6
    assert ckpt.dtype == "BF16"
    assert ckpt.tokenizer.chat_template
    w = ckpt.tensor("model.layers.0.self_attn.q_proj.weight")
    assert w.dtype == np.float32 and w.shape == (ckpt.spec.num_heads * ckpt.spec.head_dim, ckpt.spec.hidden_size)


def test_no_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        open_checkpoint(tmp_path)


def test_unknown_architecture(tiny_llama, tmp_path):
    d = copy(tiny_llama, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError,
                       match="'MambaForCausalLM' is not supported .*LlamaForCausalLM, Phi3ForCausalLM, "
                             "Qwen2ForCausalLM, Qwen3ForCausalLM"):
        open_checkpoint(d)


@pytest.mark.parametrize("field,value,message", [
    ("hidden_size", -1, "'hidden_size'=-1 is out of range"),
    ("num_attention_heads", 0, "'num_attention_heads'=0 is out of range"),
    ("num_key_value_heads", 3, "does not divide num_attention_heads"),
    ("vocab_size", 10**9, "'vocab_size'=1000000000 is out of range"),
    ("num_hidden_layers", "two", "'num_hidden_layers' must be an integer"),
])
def test_bad_config_values(tiny_llama, tmp_path, field, value, message):
    d = copy(tiny_llama, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message):
        open_checkpoint(d)


def test_truncated_safetensors(tiny_llama, tmp_path):
    d = copy(tiny_llama, tmp_path)
    path = d / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor '.*': data_offsets .* fall outside"):
        open_checkpoint(d)


def test_missing_and_misshapen_tensor(tiny_llama, tmp_path):
    d = copy(tiny_llama, tmp_path)
    f = SafetensorsFile(d / "model.safetensors")
    names = f.keys()
    keep = [n for n in names if n != "model.layers.1.mlp.down_proj.weight"]
    tensors = [(n, f.info(n)[1], f.info(n)[0], np.array(f.raw(n))) for n in keep]
    f.close()
    write_safetensors(d / "model.safetensors", tensors)
    with pytest.raises(CheckpointError, match="tensor 'model.layers.1.mlp.down_proj.weight' is missing"):
        open_checkpoint(d)
    tensors.append(("model.layers.1.mlp.down_proj.weight", (3, 4), "F32", np.zeros((3, 4), np.float32)))
    write_safetensors(d / "model.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.down_proj.weight' has shape \[3, 4\]"):
        open_checkpoint(d)


def test_index_naming_missing_shard(tiny_llama, tmp_path):
    d = copy(tiny_llama, tmp_path)
    f = SafetensorsFile(d / "model.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in f.keys()}
    weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
    f.close()
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="names shard 'model-00002-of-00002.safetensors', which is missing"):
        open_checkpoint(d)


def test_index_pointing_outside(tiny_llama, tmp_path):
    d = copy(tiny_llama, tmp_path)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../../etc/passwd"}}))
    with pytest.raises(CheckpointError, match="points outside the checkpoint folder"):
        open_checkpoint(d)


def test_pickles_are_refused(tiny_llama, tmp_path):
    d = copy(tiny_llama, tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="never unpickled"):
        open_checkpoint(d)


@pytest.mark.parametrize("make,message", [
    (lambda: struct.pack("<Q", 10**12) + b"{}", "header length"),
    (lambda: struct.pack("<Q", 5) + b"nope!", "not valid JSON"),
    (lambda: b"\x01\x02", "truncated"),
])
def test_hostile_headers(tmp_path, make, message):
    p = tmp_path / "x.safetensors"
    p.write_bytes(make())
    with pytest.raises(CheckpointError, match=message):
        SafetensorsFile(p)


def test_overlapping_and_disagreeing_entries(tmp_path):
    def write(header, data):
        blob = json.dumps(header).encode()
        p = tmp_path / "x.safetensors"
        p.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
        return p
    overlap = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
               "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    with pytest.raises(CheckpointError, match="overlap"):
        SafetensorsFile(write(overlap, bytes(12)))
    wrong = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    with pytest.raises(CheckpointError, match=r"needs 12 bytes but data_offsets give 8"):
        SafetensorsFile(write(wrong, bytes(8)))


def test_bf16_roundtrip():
    from edge_export.checkpoint.safetensors_io import bf16_to_f32, f32_to_bf16
    x = np.array([1.0, -2.5, 3.140625, 0.0], np.float32)
    assert np.array_equal(bf16_to_f32(f32_to_bf16(x)), x)
