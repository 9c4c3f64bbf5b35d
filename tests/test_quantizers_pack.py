"""Target layouts: every packer round-trips exactly, and onnxruntime reads what we pack.

The onnxruntime tests build one-node graphs (MatMulNBits, DequantizeLinear) and compare their
output with numpy's dequantization; they guard the byte layouts that a wrong nibble order or a
transposed scale would silently break.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import quantizers as Q

CONFIGS = [Q.Int4Config(group_size=g, symmetric=s) for g in Q.SUPPORTED_GROUP_SIZES for s in (True, False)] + [
    Q.Int8Config(), Q.Int8Config(group_size=32), Q.Fp8Config(), Q.Fp8Config(per_channel=True)]


def weight(n, k, seed=0):
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)


def gguf_q4_1(n=3, k=96, seed=0):
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.001, 0.05, (n, k // 32)).astype(np.float16).astype(np.float32)
    m = (-d * rng.uniform(0, 15, d.shape)).astype(np.float16).astype(np.float32)
    return Q.from_gguf_blocks("Q4_1", d, rng.integers(0, 16, (n, k)), m)


def round_trips(qt):
    """(packer name, unpacked tensor) for every layout that can hold ``qt``."""
    out = []
    if qt.code_type != "float8e4m3fn":
        out.append(("matmulnbits", Q.unpack_matmulnbits(**Q.pack_matmulnbits(qt))))
        packed = Q.pack_coreml_blockwise(qt)
        unpacked = Q.unpack_coreml_blockwise(packed["data"], packed["dtype"], packed["scale"], packed["offset"])
        out.append(("coreml", unpacked))
    out.append(("dequantizelinear", Q.unpack_dequantizelinear(**Q.pack_dequantizelinear(qt))))
    return out


@settings(max_examples=60, deadline=None)
@given(data=st.data(), config=st.sampled_from(CONFIGS))
def test_pack_unpack_dequantize_is_exact(data, config):
    group = getattr(config, "group_size", None) or 32
    n, k = data.draw(st.integers(1, 16)), group * data.draw(st.integers(1, 4))
    w = weight(n, k, seed=data.draw(st.integers(0, 2**16))) * np.float32(data.draw(st.sampled_from([1e-3, 1.0, 50.0])))
    qt = Q.quantize(w, config)
    for packer, unpacked in round_trips(qt):
        np.testing.assert_array_equal(unpacked.dequantize(), qt.dequantize(), err_msg=packer)


def test_q4_1_residual_round_trips_through_matmulnbits_float_zero_points():
    qt = gguf_q4_1()
    unpacked = Q.unpack_matmulnbits(**Q.pack_matmulnbits(qt))
    np.testing.assert_allclose(unpacked.dequantize(), qt.dequantize(), rtol=1e-6, atol=1e-7)


def test_matmulnbits_golden_nibble_order():
    codes = np.array([[1, 2, 3, 4] * 8 + [5] * 32 + [6] * 32], np.uint8)  # 1 row, 3 blocks of 32
    zeros = np.array([[7, 9, 11]], np.uint8)
    qt = Q.QuantizedTensor(q=codes, scales=np.ones((1, 3), np.float32), zero_points=zeros, bits=4,
                           group_size=32, shape=(1, 96), scheme={"scheme": "int4"})
    packed = Q.pack_matmulnbits(qt)
    assert packed["B"].shape == (1, 3, 16) and packed["B"][0, 0, :2].tolist() == [0x21, 0x43]
    assert packed["zero_points"].tolist() == [0x97, 0x0B]  # blocks 0,1 in one byte, low nibble first
    assert (packed["K"], packed["N"], packed["bits"], packed["block_size"]) == (96, 1, 4, 32)


def test_int8_per_row_splits_into_matmulnbits_blocks():
    packed = Q.pack_matmulnbits(Q.quantize(weight(4, 576), Q.Int8Config()))
    assert packed["block_size"] == 64 and packed["B"].shape == (4, 9, 64) and packed["scales"].shape == (36,)
    assert packed["zero_points"] is None  # int8 codes shifted by 128, MatMulNBits' default zero point


def test_dequantizelinear_layout_is_k_by_n_blocked_on_axis_0():
    packed = Q.pack_dequantizelinear(Q.quantize(weight(8, 128), Q.Int4Config(group_size=64, symmetric=False)))
    assert packed["data"].shape == (128, 8) and packed["scale"].shape == (2, 8) and packed["zero_point"].shape == (2, 8)
    assert (packed["axis"], packed["block_size"], packed["data_type"]) == (0, 64, "UINT4")
    sym = Q.pack_dequantizelinear(Q.quantize(weight(8, 128), Q.Int4Config()))
    assert sym["data_type"] == "INT4" and sym["zero_point"] is None and sym["data"].min() >= -8
    fp8 = Q.pack_dequantizelinear(Q.quantize(weight(8, 128), Q.Fp8Config()))
    assert fp8["scale"].shape == () and fp8["data_type"] == "FLOAT8E4M3FN"


def test_layouts_refuse_what_they_cannot_hold():
    with pytest.raises(Q.QuantizationError, match="MatMulNBits holds int4/int8 weights, not float8e4m3fn"):
        Q.pack_matmulnbits(Q.quantize(weight(2, 64), Q.Fp8Config()))
    with pytest.raises(Q.QuantizationError, match="DequantizeLinear packing takes integer zero points, and a GGUF Q4_1 residual"):
        Q.pack_dequantizelinear(gguf_q4_1())
    with pytest.raises(Q.QuantizationError, match="Core ML has no float8 weights"):
        Q.pack_coreml_blockwise(Q.quantize(weight(2, 64), Q.Fp8Config()))


def test_coreml_blockwise_shapes_and_float16_scales():
    qt = Q.quantize(weight(8, 128), Q.Int4Config())
    packed = Q.pack_coreml_blockwise(qt, scale_dtype=np.float16)
    assert packed["dtype"] == "int4" and packed["data"].shape == (8, 128) and packed["offset"] is None
    assert packed["scale"].dtype == np.float16 and packed["scale"].shape == (8, 4)
    unpacked = Q.unpack_coreml_blockwise(packed["data"], packed["dtype"], packed["scale"], packed["offset"])
    np.testing.assert_allclose(unpacked.dequantize(), qt.dequantize(), rtol=1e-3, atol=1e-6)


# ---- onnxruntime reads the layouts ---------------------------------------------------------

def _run_one_node(node, initializers, inputs, outputs, feeds):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    graph = onnx.helper.make_graph([node], "g", inputs, outputs, initializer=initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21),
                                                         onnx.helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _matmulnbits(qt, x):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    p = Q.pack_matmulnbits(qt)
    inits = [numpy_helper.from_array(p["B"], "B"), numpy_helper.from_array(p["scales"], "scales")]
    names = ["x", "B", "scales"]
    if p["zero_points"] is not None:
        inits.append(numpy_helper.from_array(p["zero_points"], "zero_points"))
        names.append("zero_points")
    node = helper.make_node("MatMulNBits", names, ["y"], domain="com.microsoft", K=p["K"], N=p["N"],
                            bits=p["bits"], block_size=p["block_size"], accuracy_level=0)
    return _run_one_node(node, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], {"x": x})


@pytest.mark.parametrize("make", [
    lambda: Q.quantize(weight(24, 96), Q.Int4Config()),  # 3 blocks: odd count pads the zero-point bytes
    lambda: Q.quantize(weight(24, 96), Q.Int4Config(symmetric=False)),
    lambda: Q.quantize(weight(24, 256), Q.Int4Config(group_size=128, symmetric=False)),
    lambda: Q.quantize(weight(24, 576), Q.Int8Config()),
    lambda: Q.from_gguf_blocks("Q4_0", *(lambda r: (r.uniform(-0.05, 0.05, (24, 3)).astype(np.float32),
                                                    r.integers(0, 16, (24, 96))))(np.random.default_rng(3))),
    gguf_q4_1,
], ids=["int4-sym", "int4-asym-odd-blocks", "int4-asym-g128", "int8-per-row", "gguf-q4_0", "gguf-q4_1"])
def test_onnxruntime_matmulnbits_matches_numpy(make):
    qt = make()
    x = np.random.default_rng(1).standard_normal((5, qt.shape[1])).astype(np.float32)
    y, ref = _matmulnbits(qt, x), x @ qt.dequantize().T
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("config", [Q.Int4Config(), Q.Int4Config(group_size=64, symmetric=False), Q.Int8Config(),
                                    Q.Int8Config(group_size=32), Q.Fp8Config(), Q.Fp8Config(per_channel=True)],
                         ids=lambda c: str(c.to_dict()))
def test_onnxruntime_dequantizelinear_matches_numpy(config):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    qt = Q.quantize(weight(16, 128) * np.float32(0.05), config)
    p = Q.pack_dequantizelinear(qt)
    inits = [Q.make_tensor_proto("w", p["data"], p["data_type"]), numpy_helper.from_array(p["scale"], "scale")]
    names = ["w", "scale"]
    if p["zero_point"] is not None:
        inits.append(Q.make_tensor_proto("zero_point", p["zero_point"], p["data_type"]))
        names.append("zero_point")
    attrs = {"axis": p["axis"]} | ({"block_size": p["block_size"]} if p["block_size"] else {})
    node = helper.make_node("DequantizeLinear", names, ["y"], **attrs)
    y = _run_one_node(node, inits, [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], {})
    np.testing.assert_allclose(y, qt.dequantize().T, rtol=1e-6, atol=0)
