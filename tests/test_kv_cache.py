"""--kv-cache int8: calibrated per-channel scales, onnxruntime's quantized GroupQueryAttention cache."""
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import runtimes
from edge_export.cli import main
from edge_export.errors import ExportError
from edge_export.export import ExportOptions, export
from edge_export.plan import plan
from quantizers import KVRange, QuantizationError, quantize_kv
from runtimes import rope

LOOSE = dict(max_kl=100.0, min_top1=0.0)


def test_key_scales_hold_every_rotary_position():
    """Keys are cached after rotary; scales from the pre-rotary radii cover any position, and are tight."""
    rng = np.random.default_rng(0)
    k = rng.standard_normal((2, 40, 16)) * np.linspace(0.1, 5.0, 16)  # channels of very different ranges
    v = rng.standard_normal((2, 40, 16))
    kv = KVRange(kv_heads=2, head_dim=16)
    kv.update(k, v)
    k_scale, v_scale = kv.scales()
    assert k_scale.shape == v_scale.shape == (2, 16) and k_scale.dtype == np.float32
    cos, sin = rope.Rope(16, 10000.0).table(rng.integers(0, 100_000, 40))
    rotated = rope.apply(k, cos, sin)
    assert np.abs(rotated / k_scale[:, None, :]).max() <= 127.0 + 1e-3
    # the largest rotated pair reaches the top of the range at some angle: the scale is not loose
    radius = np.sqrt(k[..., :8] ** 2 + k[..., 8:] ** 2).max(axis=1)
    assert np.allclose(np.concatenate([radius, radius], -1) / k_scale, 127.0, rtol=1e-5)
    codes = quantize_kv(v, v_scale)
    assert codes.dtype == np.int8 and np.abs(codes).max() == 127
    assert np.abs(codes * v_scale[:, None, :] - v).max() <= v_scale.max() / 2 + 1e-6


def test_key_scales_with_partial_rotary_and_attention_factor():
    """Phi-3: 12 of 16 channels rotate (pairs j, j + 6), cos/sin carry LongRoPE's attention factor; the
    4 channels after them pass through. Scales hold every position and stay tight."""
    rng = np.random.default_rng(1)
    k = rng.standard_normal((2, 40, 16)) * np.linspace(0.1, 5.0, 16)
    scaling = {"rope_type": "longrope", "short_factor": [1.0] * 6, "long_factor": [2.0] * 6, "factor": 32.0,
               "attention_factor": 1.35, "original_max_position_embeddings": 64}
    kv = KVRange(kv_heads=2, head_dim=16, rotary_dim=12, rotary_gain=1.35)
    kv.update(k, k)
    k_scale, _ = kv.scales()
    table = rope.Rope(12, 10000.0, scaling)
    for long in (False, True):
        rotated = rope.apply(k, *table.table(rng.integers(0, 100_000, 40), long=long))
        assert np.abs(rotated / k_scale[:, None, :]).max() <= 127.0 + 1e-3
    radius = np.sqrt(k[..., :6] ** 2 + k[..., 6:12] ** 2).max(axis=1) * 1.35
    tight = np.concatenate([radius, radius, np.abs(k[..., 12:]).max(axis=1)], -1)
    assert np.allclose(tight / k_scale, 127.0, rtol=1e-5)


def test_kv_range_bad_input():
    kv = KVRange(kv_heads=2, head_dim=8)
    with pytest.raises(QuantizationError, match="no calibration tokens"):
        kv.scales()
    with pytest.raises(QuantizationError, match=r"do not match \[kv_heads=2, T, head_dim=8\]"):
        kv.update(np.zeros((3, 4, 8)), np.zeros((3, 4, 8)))
    bad = np.zeros((2, 4, 8))
    bad[0, 1, 2] = np.nan
    with pytest.raises(QuantizationError, match="keys hold NaN or Inf"):
        kv.update(bad, np.zeros((2, 4, 8)))
    with pytest.raises(QuantizationError, match="odd"):
        KVRange(kv_heads=1, head_dim=7)


@pytest.fixture(scope="module")
def kv_pair(tiny_llama, tmp_path_factory):
    """The same fp32 weights exported with a float32 and an int8 KV cache."""
    root = tmp_path_factory.mktemp("kv")
    export(tiny_llama, root / "f32", ExportOptions(quant="fp32", **LOOSE))
    manifest = export(tiny_llama, root / "i8", ExportOptions(quant="fp32", kv_cache="int8", **LOOSE))
    return root / "f32", root / "i8", manifest


def test_int8_cache_graph_and_manifest(kv_pair):
    _, folder, manifest = kv_pair
    graph = manifest["graph"]
    assert graph["kv_dtype"] == "int8" and graph["kv_scales"]["granularity"] == "per-channel"
    assert graph["kv_scales"]["calibration_prompts"] >= 64  # the built-in set
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    past = {i.name: i.type.tensor_type.elem_type for i in model.graph.input if i.name.startswith("past_key_values")}
    assert set(past.values()) == {onnx.TensorProto.INT8}
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert gqa and all(n.input[12].endswith("k_scale") and n.input[13].endswith("v_scale") for n in gqa)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa[0].attribute}
    assert attrs["k_quant_type"] == b"PER_CHANNEL" and attrs["kv_cache_bit_width"] == 8


def test_int8_cache_runs_close_to_float(kv_pair):
    """The int8 cache changes the logits a little (it does quantize) and keeps the next tokens."""
    f32, i8, manifest = kv_pair
    a, b = runtimes.load(f32), runtimes.load(i8)
    assert b.backend.kv[0][0].numpy().dtype == np.int8
    ids = list(range(5, 45))
    diffs, same = [], 0
    la, lb = a.backend.prefill(ids), b.backend.prefill(ids)
    for t in range(20):
        diffs.append(np.abs(la - lb).max() / np.abs(la).max())
        same += int(np.argmax(la) == np.argmax(lb))
        token = int(np.argmax(la))
        la, lb = a.backend.decode(token), b.backend.decode(token)
    assert 0 < max(diffs) < 0.05
    assert same >= 18
    assert manifest["verification"]["kl_mean"] < 0.01


def test_int8_cache_refused_where_not_carried(tiny_llama, tmp_path):
    with pytest.raises(ExportError, match=r"target onnx/portable holds its KV cache in float32, float16 only, not "
                                          r"--kv-cache int8 \(kv_cache='int8'\), which onnx/ort carry"):
        export(tiny_llama, tmp_path / "p", ExportOptions(quant="int4", variant="portable", kv_cache="int8"))
    result = CliRunner().invoke(main, ["export", str(tiny_llama), "-o", str(tmp_path / "t"), "--target", "tensorrt",
                                       "--kv-cache", "int8"])
    assert result.exit_code == 2 and "target tensorrt holds its KV cache in float16 only, not --kv-cache int8" \
        in result.output
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == []


def test_int8_cache_needs_readable_calibration(tiny_llama, tmp_path):
    with pytest.raises(ExportError, match="missing.jsonl: cannot read prompts"):
        export(tiny_llama, tmp_path / "a", ExportOptions(quant="int4", kv_cache="int8",
                                                         calibration=str(tmp_path / "missing.jsonl")))
    assert not (tmp_path / "a").exists()


def test_plan_counts_an_int8_cache_where_it_is_carried():
    fp16 = plan("preset:r1-distill-llama-8b", "snapdragon-8-gen3", context=32768, trace_tokens=4000, kv_cache="fp16")
    int8 = plan("preset:r1-distill-llama-8b", "snapdragon-8-gen3", context=32768, trace_tokens=4000, kv_cache="int8")
    rows = {(o["quant"], o["target"]): o for o in fp16["options"]}
    for o in int8["options"]:
        before = rows[(o["quant"], o["target"])]
        if o["target"] == "onnx/ort":
            assert o["kv_cache"] == "int8" and o["kv_bytes"] * 2 == before["kv_bytes"]
        else:  # onnx/qnn keeps its own 16-bit cache
            assert o["kv_cache"] == before["kv_cache"] == "uint16" and o["kv_bytes"] == before["kv_bytes"]
    # R1-Distill-Llama-8B at 32k tokens: 4 GiB of fp16 cache, 2 GiB in int8
    assert rows[("int4", "onnx/ort")]["kv_bytes"] == 4 * 2**30
    assert json.loads(json.dumps(int8))["kv_cache"] == "int8"


def test_long_prompts_prefill_in_chunks_with_the_same_logits(kv_pair):
    """A prompt longer than PREFILL_CHUNK runs in chunks on the shared buffer; the logits and the
    cache it leaves equal one whole-prompt call's, with either cache precision."""
    from runtimes.backends.onnxruntime import PREFILL_CHUNK
    f32, i8, _ = kv_pair
    ids = [int(t) for t in np.random.default_rng(3).integers(5, 200, PREFILL_CHUNK * 2 + 37)]
    for folder in (f32, i8):
        rt = runtimes.load(folder)
        chunked = rt.backend.prefill(ids)
        after_chunks = rt.backend.decode(7)
        rt.backend.position = 0
        whole = rt.backend._run(np.asarray(ids, np.int64).reshape(1, -1))
        assert np.allclose(chunked, whole, atol=1e-4)
        assert np.allclose(after_chunks, rt.backend.decode(7), atol=1e-4)
        assert rt.backend.position == len(ids) + 1


def test_kv_buffer_is_sized_to_the_generation(kv_pair):
    """The shared buffer holds what a generation reserves (prompt + new tokens, rounded up), not
    max_context; a generation that runs past it grows it, keeping the cache: same logits either way."""
    from runtimes import Sampling
    from runtimes.backends.onnxruntime import KV_ROUND
    f32, i8, _ = kv_pair
    ids = [int(t) for t in np.random.default_rng(4).integers(5, 200, 40)]
    for folder in (f32, i8):
        rt = runtimes.load(folder)
        backend = rt.backend
        backend.reserve(backend.max_context)
        assert backend.capacity == backend.max_context
        full = [backend.prefill(ids)] + [backend.decode(t) for t in range(9, 9 + KV_ROUND)]
        backend.reserve(len(ids))  # too small for what follows: decode grows it
        assert backend.capacity == KV_ROUND
        sized = [backend.prefill(ids)] + [backend.decode(t) for t in range(9, 9 + KV_ROUND)]
        assert backend.capacity >= len(ids) + KV_ROUND
        assert all(np.array_equal(a, b) for a, b in zip(full, sized))
        backend.reserve(backend.max_context)
        result = rt.generator.generate(ids, Sampling(max_new_tokens=5, ignore_eos=True))
        assert backend.max_context > 2 * KV_ROUND
        assert backend.capacity == KV_ROUND and len(result.tokens) == 5  # the generator reserved 45


def test_int8_cache_on_every_architecture(tiny_checkpoint, tmp_path):
    """Qwen2's k/v biases and Qwen3's k-norm come before the cache: the calibrated scales see them."""
    manifest = export(tiny_checkpoint, tmp_path / "i8", ExportOptions(quant="fp32", kv_cache="int8", **LOOSE))
    assert manifest["graph"]["kv_dtype"] == "int8"
    assert manifest["verification"]["kl_mean"] < 0.01 and manifest["verification"]["top1_agreement"] > 0.9
