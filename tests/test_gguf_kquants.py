"""GGUF as people download it: files made by llama.cpp's own quantizer, every common block type read
and carried exactly with --method keep (issue 13, section 3).

The files are made once per session from float GGUFs (so nothing is quantized twice): SmolLM2
written back to F32 and quantized to Q4_K_M (width 576: mostly Q5_0 / Q8_0 fallbacks), and a tiny
R1-shaped qwen2 (widths multiples of 256, the real R1 tokenizer) quantized to several presets, so
Q4_K / Q6_K / Q5_K / Q3_K / Q2_K / Q5_1 / IQ4_NL / IQ4_XS each cover whole tensors. Every carried
form is held to gguf-py's dequantization of the raw tensor, bit for bit, never to our own reader.
"""
from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

from edge_export.checkpoint.gguf_reader import (GGUF_GLOBAL_TENSORS, GGUF_LAYER_TENSORS, GGUFCheckpoint,
                                                r1_qwen_gguf_path, read_gguf_metadata, smollm2_gguf_path,
                                                unpermute_qk)
from edge_export.checkpoint.gguf_requant import llama_cpp_quantize, write_float_copy
from edge_export.checkpoint.gguf_tensors import BLOCK_TYPES, split_blocks
from edge_export.errors import CheckpointError
from edge_export.export import ExportOptions, export, quant_rules
from edge_export.quantize import QuantizedWeights
from quantizers import from_gguf_blocks
from runtimes.models import ModelSpec
from runtimes.weights import ArtifactWeights

ROOT = Path(__file__).resolve().parents[1]
# The tiny R1-shaped model: every linear's input width a multiple of 256 (K-quant super-blocks).
# Widths multiples of 256 (K-quant super-blocks), a vocabulary of 1024 (the R1 tokenizer's first 1024
# tokens and the merges among them, where the export tests need a tokenizer).
R1_TINY = dict(hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=512,
               vocab_size=1024, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096,
               attention_bias=True)
# llama.cpp preset -> the GGML types it must write on the tiny model's linears (besides F32 norms/biases)
PRESETS = {"Q4_K_M": {"Q4_K", "Q6_K"}, "Q5_K_M": {"Q5_K", "Q6_K"}, "Q3_K_M": {"Q3_K", "Q4_K", "Q5_K", "Q6_K"},
           "Q2_K": {"Q2_K", "Q3_K", "Q6_K"}, "Q5_1": {"Q5_1", "Q6_K"}, "Q5_0": {"Q5_0", "Q6_K"},
           "Q4_1": {"Q4_1", "Q6_K"}, "Q4_0": {"Q4_0", "Q6_K"}, "Q8_0": {"Q8_0"}, "IQ4_NL": {"IQ4_NL", "Q6_K"},
           "IQ4_XS": {"IQ4_XS", "Q6_K"}}


# ---- the files, made once ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def smollm2_q4km(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("smollm2-q4km")
    f32 = write_float_copy(smollm2_gguf_path(), work / "smollm2-f32.gguf")
    out = llama_cpp_quantize(f32, work / "smollm2-q4_k_m.gguf", "Q4_K_M")
    f32.unlink()
    return out


def write_r1_tiny_float(path: Path, tokenizer: bool, seed: int = 0) -> ModelSpec:
    """A qwen2 GGUF of R1_TINY's shape in F16 (norms and biases F32), written with gguf-py; with
    ``tokenizer`` the R1-Distill tokenizer cut to the vocabulary and its chat template, copied from
    the packaged header."""
    spec = ModelSpec("Qwen2ForCausalLM", tied_embeddings=False, **R1_TINY)
    rng = np.random.default_rng(seed)
    u32, f32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    writer = gguf.GGUFWriter(str(path), "qwen2")
    for key, value in {"block_count": spec.num_layers, "context_length": spec.max_position_embeddings,
                       "embedding_length": spec.hidden_size, "feed_forward_length": spec.intermediate_size,
                       "attention.head_count": spec.num_heads, "attention.head_count_kv": spec.num_kv_heads}.items():
        writer.add_key_value(f"qwen2.{key}", value, u32)
    writer.add_key_value("qwen2.rope.freq_base", spec.rope_theta, f32)
    writer.add_key_value("qwen2.attention.layer_norm_rms_epsilon", spec.rms_norm_eps, f32)
    if tokenizer:
        _copy_tokenizer(writer, read_gguf_metadata(r1_qwen_gguf_path()), spec.vocab_size)
    else:
        writer.add_key_value("qwen2.vocab_size", spec.vocab_size, u32)
    names = {spec.tensor_name(k, i): v.format(bid=i) for k, v in GGUF_LAYER_TENSORS.items()
             for i in range(spec.num_layers)}
    names.update({spec.tensor_name(k): v for k, v in GGUF_GLOBAL_TENSORS.items()})
    for name, shape in spec.tensor_shapes().items():
        w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        writer.add_tensor(names[name], w if len(shape) == 1 else w.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return spec


def _copy_tokenizer(writer, metadata: dict, vocab: int) -> None:
    """The tokenizer.* keys, cut to the first ``vocab`` tokens (the byte tokens come first) and the
    merges whose pieces and result all lie among them; bos/eos ids moved into range."""
    t = gguf.GGUFValueType
    tokens = metadata["tokenizer.ggml.tokens"][:vocab]
    known = set(tokens)
    merges = [m for m in metadata["tokenizer.ggml.merges"]
              if all(p in known for p in m.split(" ")) and m.replace(" ", "") in known]
    writer.add_key_value("tokenizer.ggml.model", "gpt2", t.STRING)
    writer.add_key_value("tokenizer.ggml.pre", metadata["tokenizer.ggml.pre"], t.STRING)
    writer.add_key_value("tokenizer.ggml.tokens", tokens, t.ARRAY, t.STRING)
    writer.add_key_value("tokenizer.ggml.merges", merges, t.ARRAY, t.STRING)
    writer.add_key_value("tokenizer.ggml.token_type", [1] * vocab, t.ARRAY, t.INT32)
    writer.add_key_value("tokenizer.ggml.bos_token_id", vocab - 2, t.UINT32)
    writer.add_key_value("tokenizer.ggml.eos_token_id", vocab - 1, t.UINT32)
    writer.add_key_value("tokenizer.chat_template", metadata["tokenizer.chat_template"], t.STRING)


@pytest.fixture(scope="session")
def r1_tiny(tmp_path_factory) -> dict[str, Path]:
    """llama.cpp preset -> the tiny R1-shaped model quantized to it by llama.cpp."""
    work = tmp_path_factory.mktemp("r1-tiny")
    source = work / "r1-tiny-f16.gguf"
    write_r1_tiny_float(source, tokenizer=False)
    return {preset: llama_cpp_quantize(source, work / f"r1-tiny-{preset}.gguf", preset) for preset in PRESETS}


@pytest.fixture(scope="session")
def r1_tiny_tokenized(tmp_path_factory) -> dict[str, Path]:
    """The tiny R1-shaped model with a tokenizer (an artifact needs one), as llama.cpp's Q4_K_M (Q4_K
    with minimums as int4 + residual, Q6_K as int8) and Q5_K_M (Q5_K: int8 codes + residual)."""
    work = tmp_path_factory.mktemp("r1-tiny-tok")
    source = work / "r1-tiny-f16.gguf"
    write_r1_tiny_float(source, tokenizer=True)
    made = {preset: llama_cpp_quantize(source, work / f"r1-tiny-{preset}.gguf", preset)
            for preset in ("Q4_K_M", "Q5_K_M")}
    source.unlink()
    return made


@pytest.fixture(scope="session")
def r1_tiny_q4km(r1_tiny_tokenized) -> Path:
    return r1_tiny_tokenized["Q4_K_M"]


def gguf_py_tensor(path: Path, name: str, ckpt: GGUFCheckpoint) -> np.ndarray:
    """gguf-py's own dequantization of a tensor, rows put in HF order: what a carried form must equal."""
    tensor = next(t for t in gguf.GGUFReader(str(path), "r").tensors if t.name == ckpt.gguf_names[name])
    values = dequantize(np.asarray(tensor.data), tensor.tensor_type)
    values = values.reshape(tuple(int(n) for n in reversed(tensor.shape))).astype(np.float32)
    return unpermute_qk(values, ckpt.qk_heads[name]) if name in ckpt.qk_heads else values


# ---- block unpacking --------------------------------------------------------------------------------
FP16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q8_0": [0], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2],
               "Q6_K": [208], "Q2_K": [80, 82], "Q3_K": [108], "IQ4_NL": [0], "IQ4_XS": [0]}


@pytest.mark.parametrize("kind", sorted(BLOCK_TYPES))
def test_every_block_type_unpacks_and_carries_bit_exactly(kind):
    """Random block bytes (with finite fp16 scales of both signs): the split codes and scales, and the
    QuantizedTensor made of them, expand to exactly gguf-py's dequantization of the same bytes."""
    qtype = gguf.GGMLQuantizationType[kind]
    elements, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(list(BLOCK_TYPES).index(kind))
    rows, cols = 8, 512
    raw = rng.integers(0, 256, (rows, cols // elements, size), dtype=np.uint8)
    for at in FP16_FIELDS[kind]:
        raw[..., at:at + 2] = rng.uniform(-0.05, 0.05, raw.shape[:2] + (1,)).astype(np.float16).view(np.uint8)
    raw = raw.reshape(rows, -1)
    expected = dequantize(raw, qtype).reshape(rows, cols)
    blocks = split_blocks(raw, kind, (rows, cols))
    assert blocks.block_size == BLOCK_TYPES[kind][1] and blocks.shape == (rows, cols)
    assert np.array_equal(blocks.dequantize(), expected)
    qt = from_gguf_blocks(kind, blocks.d, blocks.codes, blocks.m)
    assert qt.bits == (4 if kind in ("Q4_0", "Q4_1", "Q4_K") else 8) and qt.group_size == blocks.block_size
    assert np.array_equal(qt.dequantize(), expected)


# ---- llama.cpp's files, carried -------------------------------------------------------------------
def test_smollm2_q4km_types_are_all_read_and_carried(smollm2_q4km):
    """The Q4_K_M made by llama.cpp from SmolLM2 holds Q5_0 / Q8_0 fallbacks beside Q4_K / Q6_K; every
    quantized tensor is carried (none re-quantized), the manifest's records say from which type."""
    ckpt = GGUFCheckpoint(smollm2_q4km)
    types = Counter(info.type_name for info in ckpt.header.tensors.values())
    assert {"Q5_0", "Q8_0", "Q4_K", "Q6_K"} <= set(types) and types["Q5_0"] > types["Q4_K"]
    weights = QuantizedWeights(ckpt, quant_rules(ExportOptions(method="keep")))
    for name in ckpt.spec.tensor_shapes():
        value = weights.get(name)
        record = weights.records[name]
        assert record.source_type == ckpt.stored_dtype(name), name
        if record.source_type == "F32":
            assert record.source == "float"
            continue
        assert record.source == ("decomposed" if record.source_type == "Q4_K" else "carried"), name
        if ".layers.0." in name or "embed" in name:
            assert np.array_equal(value.dequantize(), gguf_py_tensor(smollm2_q4km, name, ckpt)), name


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_r1_tiny_presets_carry_every_tensor_bit_exactly(r1_tiny, preset):
    path = r1_tiny[preset]
    ckpt = GGUFCheckpoint(path)
    weights = QuantizedWeights(ckpt, quant_rules(ExportOptions(method="keep")))
    seen = set()
    for name, shape in ckpt.spec.tensor_shapes().items():
        value = weights.get(name)
        if len(shape) == 1:
            continue
        seen.add(weights.records[name].source_type)
        assert weights.records[name].source in ("carried", "decomposed"), name
        assert np.array_equal(value.dequantize(), gguf_py_tensor(path, name, ckpt)), name
    assert seen == PRESETS[preset]


def _export(path: Path, out: Path, **options) -> dict:
    export(str(path), str(out), ExportOptions(verify=False, max_context=64, **options))
    return json.loads((out / "edge_manifest.json").read_text())


class _Artifact:
    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = path, manifest

    def file(self, name: str) -> Path:
        return self.path / name


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q5_K_M"])
@pytest.mark.parametrize("variant", ["ort", "portable"])
def test_r1_tiny_artifact_stores_exactly_gguf_pys_values(r1_tiny_tokenized, tmp_path, variant, preset):
    """The codes, scales and residuals an onnx artifact stores, expanded from its files through the
    manifest's weights table, equal gguf-py's dequantization of each tensor of llama.cpp's file."""
    path = r1_tiny_tokenized[preset]
    ckpt = GGUFCheckpoint(path)
    manifest = _export(path, tmp_path / variant, target="onnx", variant=variant, method="keep")
    records = manifest["quantization"]["tensors"]
    stored = ArtifactWeights(_Artifact(tmp_path / variant, manifest))
    for name, shape in ckpt.spec.tensor_shapes().items():
        if len(shape) == 1:
            continue
        assert records[name]["source_type"] in PRESETS[preset] and records[name]["source"] != "requantized"
        assert records[name]["exact"] is True and "loss" not in records[name], name
        assert np.array_equal(stored(name), gguf_py_tensor(path, name, ckpt)), name
    assert "tensor_loss" not in manifest["quantization"]


def test_coreml_carries_the_codes_and_rounds_only_scales_to_fp16(r1_tiny_q4km, tmp_path):
    """coreml carries each GGUF code (Q4_K as uint4 with a float16 offset, Q6_K as int8 groups of 16);
    the fp16 program's float16 scales round a K-quant group's scale (fp16 d times a 6-bit integer),
    so the package's weights agree with gguf-py's to fp16 precision, not bit for bit."""
    path = r1_tiny_q4km
    ckpt = GGUFCheckpoint(path)
    manifest = _export(path, tmp_path / "coreml", target="coreml")
    records = manifest["quantization"]["tensors"]
    stored = ArtifactWeights(_Artifact(tmp_path / "coreml", manifest))
    for name, shape in ckpt.spec.tensor_shapes().items():
        if len(shape) == 1:
            continue
        assert records[name]["source"] in ("carried", "decomposed"), name
        assert (manifest["weights"][name]["offset"] is not None) == (records[name]["source_type"] == "Q4_K"), name
        expected = gguf_py_tensor(path, name, ckpt)
        assert np.allclose(stored(name), expected, rtol=0, atol=np.abs(expected).max() * 2e-3), name
        # not bit for bit, so the record says so and names the loss of that tensor alone
        # a rounding this small on a tiny model can measure as 0 to float rounding (-5e-17 seen)
        assert records[name]["exact"] is False and -1e-12 < records[name]["loss"]["kl"] < 1e-6, name
        assert 0 < records[name]["loss"]["relative_weight_error"] < 1e-3, name
    assert manifest["quantization"]["tensor_loss"]["measure"] == "kl"


def test_tensorrt_and_qnn_requantize_and_say_so(r1_tiny_q4km, tmp_path):
    """TensorRT's dequantization takes no minimums and QNN has its own int4 form (LPBQ): both
    re-quantize a K-quant GGUF's tensors, and the manifest names each one re-quantized, with its
    source type."""
    path = r1_tiny_q4km
    q = "model.layers.0.self_attn.q_proj.weight"
    records = _export(path, tmp_path / "trt", target="tensorrt")["quantization"]["tensors"]
    assert records[q] == {**records[q], "source": "requantized", "source_type": "Q4_K", "exact": False}
    assert records[q]["scheme"]["method"] == "rtn"
    records = _export(path, tmp_path / "qnn", target="onnx", variant="qnn")["quantization"]["tensors"]
    assert records[q] == {**records[q], "source": "requantized", "source_type": "Q4_K", "requantized_by": "onnx/qnn",
                          "exact": False}
    # a 4-bit code re-rounded: a weight error of several percent, and its own KL
    assert records[q]["loss"]["kl"] > 0 and records[q]["loss"]["relative_weight_error"] > 0.01


def test_unsupported_type_names_the_tensor_and_honest_advice(tmp_path):
    """A type that is neither read nor carried (ternary TQ2_0) is refused per tensor, and the advice
    no longer sends a Q4_K_M's owner to make a Q4_K_M."""
    from tests.test_gguf import TYPES, write_tiny_gguf
    spec = write_tiny_gguf(tmp_path / "tq.gguf", types=dict(TYPES, gate_proj="TQ2_0"), hidden_size=256,
                           intermediate_size=256, head_dim=64).spec
    ckpt = GGUFCheckpoint(tmp_path / "tq.gguf")
    with pytest.raises(CheckpointError, match=r"tq\.gguf: tensor 'blk\.0\.ffn_gate\.weight' is stored as TQ2_0.*"
                                              r"any llama\.cpp preset from Q2_K to Q8_0") as e:
        ckpt.tensor(spec.tensor_name("gate_proj", 0))
    assert "re-quantize with llama.cpp to Q4_K_M" not in str(e.value)
    assert ckpt.quantized_blocks(spec.tensor_name("gate_proj", 0)) is None


# ---- answers like llama.cpp -------------------------------------------------------------------------
def _benchmark():
    spec = importlib.util.spec_from_file_location("gguf_kquants", ROOT / "benchmarks" / "gguf_kquants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SUBSET = 12  # of the 40 questions; benchmarks/gguf_kquants.py runs all 40


def test_smollm2_q4km_answers_like_llama_cpp(smollm2_q4km, tmp_path):
    """Greedy answers of the keep export (onnx/ort, default accuracy level) against llama.cpp on the same
    Q4_K_M, on the first questions of the built-in set; the floor is issue 13's (10 of 40 identical,
    no more than 2 fewer correct) scaled to the subset."""
    from edge_export.evaluate import chat_questions
    bench = _benchmark()
    manifest = bench.export_keep(smollm2_q4km, tmp_path / "art")
    assert {r["source"] for r in manifest["quantization"]["tensors"].values()} <= {"float", "carried", "decomposed"}
    result = bench.compare(smollm2_q4km, tmp_path / "art", chat_questions()[:SUBSET])
    assert result["identical"] >= round(SUBSET * 10 / 40), result
    assert result["correct"] >= result["llama_cpp_correct"] - 1, result
