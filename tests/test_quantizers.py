"""quantizers: schemes, rules, errors, RTN int4/int8/fp8 numerics, Stats and GGUF carry-over.

AWQ/GPTQ accuracy lives in test_quantizers_methods.py, target layouts in test_quantizers_pack.py.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import quantizers as Q
from quantizers import int4
from quantizers.e4m3 import DECODE_TABLE

SAMPLE_CONFIGS = {  # one instance of every registered scheme, non-default where possible
    "int4": Q.Int4Config(group_size=64, symmetric=False, method="gptq", act_order=True, damp=0.05),
    "int8": Q.Int8Config(group_size=32),
    "fp8": Q.Fp8Config(per_channel=True, activation_scales=True),
    "int4_lut": Q.Int4LutConfig(rows_per_lut=4, iterations=10),  # palettize: test_quantizers_palettize.py
}


def sqnr_db(w, approx):
    return 10 * np.log10(np.square(w).sum() / np.square(w - approx).sum())


def gaussian(n, k, seed=0):
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)


# ---- schemes and rules ---------------------------------------------------------------------

def test_every_registered_scheme_and_handler_is_tested():
    assert set(SAMPLE_CONFIGS) == set(Q.SCHEMES)
    tested_handlers = {("int4", m) for m in ("rtn", "awq", "gptq", "keep")} | {("int8", "rtn"), ("fp8", "rtn"),
                                                                              ("int4_lut", "palettize")}
    assert set(Q.HANDLERS) == tested_handlers


@pytest.mark.parametrize("name", sorted(SAMPLE_CONFIGS))
def test_config_round_trips_through_dict(name):
    config = SAMPLE_CONFIGS[name]
    d = config.to_dict()
    assert d["scheme"] == name
    assert Q.scheme_from_dict(d) == config
    assert Q.scheme_from_dict({"scheme": name}) == type(config)()


def test_int4_default_group_size_is_32():
    assert Q.Int4Config().group_size == 32


@pytest.mark.parametrize("kwargs, message", [
    ({"group_size": 48}, r"group_size=48 is not supported; use one of \(32, 64, 128\)"),
    ({"method": "hqq"}, r"int4 method='hqq' is unknown"),
    ({"act_order": True}, r"act_order=True only applies to method='gptq'"),
    ({"damp": 0.0}, r"damp=0.0 must be in \(0, 1\]"),
])
def test_bad_int4_options_are_named(kwargs, message):
    with pytest.raises(Q.QuantizationError, match=message):
        Q.Int4Config(**kwargs)


def test_scheme_from_dict_names_unknown_scheme_and_option():
    with pytest.raises(Q.QuantizationError,
                       match=r"scheme 'int3' is unknown; known schemes: \['fp8', 'int4', 'int4_lut', 'int8'\]"):
        Q.scheme_from_dict({"scheme": "int3"})
    with pytest.raises(Q.QuantizationError, match=r"scheme 'int8' has no option\(s\) \['bits'\]"):
        Q.scheme_from_dict({"scheme": "int8", "bits": 8})


def test_rules_first_match_wins_none_keeps_float_and_round_trip():
    int4 = Q.Int4Config()
    rules = Q.Rules([("re:model\\.layers\\.0\\..*", None), ("*down_proj.weight", Q.Int8Config()),
                     ("*proj.weight", int4)])
    assert rules.resolve("model.layers.0.mlp.down_proj.weight") is None
    assert rules.resolve("model.layers.10.mlp.down_proj.weight") == Q.Int8Config()
    assert rules.resolve("model.layers.10.self_attn.q_proj.weight") == int4
    assert rules.resolve("model.norm.weight") is None  # no rule matches: stays float
    assert Q.Rules.from_list(rules.to_list()) == rules
    assert rules.to_list()[0] == {"pattern": "re:model\\.layers\\.0\\..*", "config": None}


def test_rules_reject_a_bad_regex():
    with pytest.raises(Q.QuantizationError, match=r"rule pattern 're:\(' is not a valid regex"):
        Q.Rules([("re:(", None)])


def test_default_rules_for_int4():
    config = Q.Int4Config(method="awq")
    rules = Q.default_rules(config)
    for name in ("model.layers.3.input_layernorm.weight", "model.layers.3.post_attention_layernorm.weight",
                 "model.norm.weight", "model.layers.3.self_attn.q_norm.weight",
                 "model.layers.3.self_attn.k_norm.weight",
                 "model.layers.3.self_attn.q_proj.bias"):
        assert rules.resolve(name) is None, name
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert rules.resolve(f"model.layers.3.self_attn.{name}.weight") == config
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert rules.resolve(f"model.layers.3.mlp.{name}.weight") == config
    assert rules.resolve("lm_head.weight") == Q.Int8Config()
    assert rules.resolve("model.embed_tokens.weight") == Q.Int8Config()


def test_default_rules_for_fp8_quantize_lm_head_in_fp8():
    config = Q.Fp8Config()
    assert Q.default_rules(config).resolve("lm_head.weight") == config
    assert Q.default_rules(config).resolve("model.embed_tokens.weight") == Q.Int8Config()


# ---- errors --------------------------------------------------------------------------------

def test_group_size_not_dividing_k_says_what_would_work():
    with pytest.raises(Q.QuantizationError,
                       match=r"tensor model.layers.0.mlp.up_proj.weight: group_size=128 does not divide "
                             r"in_features K=576; group sizes that divide it: \[32, 64\]"):
        Q.quantize(gaussian(4, 576), Q.Int4Config(group_size=128), "model.layers.0.mlp.up_proj.weight")


@pytest.mark.parametrize("k, preferred, expected", [(576, 128, 64), (576, 32, 32), (1536, 128, 128), (8960, 128, 128),
                                                    (96, 128, 32), (100, 32, None)])
def test_fallback_group_size(k, preferred, expected):
    assert Q.fallback_group_size(k, preferred) == expected


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weight_names_the_tensor(bad):
    w = gaussian(4, 64)
    w[2, 5] = bad
    with pytest.raises(Q.QuantizationError, match=r"tensor lm_head.weight: 1 NaN/Inf value\(s\), first at \[2, 5\]"):
        Q.quantize(w, Q.Int8Config(), "lm_head.weight")


def test_weight_of_wrong_rank_is_refused():
    with pytest.raises(Q.QuantizationError, match=r"tensor x: expected a non-empty 2-D"):
        Q.quantize(np.ones(64, np.float32), Q.Int4Config(), "x")


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_calibrated_methods_need_stats(method):
    with pytest.raises(Q.QuantizationError, match=f"tensor w: method '{method}' needs calibration stats"):
        Q.quantize(gaussian(4, 64), Q.Int4Config(method=method), "w")


def test_keep_cannot_quantize_a_float_weight():
    with pytest.raises(Q.QuantizationError, match=r"tensor w: method='keep' .* from_gguf_blocks"):
        Q.quantize(gaussian(4, 64), Q.Int4Config(method="keep"), "w")


# ---- RTN int4 ------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(data=st.data(), group_size=st.sampled_from(Q.SUPPORTED_GROUP_SIZES), symmetric=st.booleans())
def test_rtn_error_is_at_most_half_a_step(data, group_size, symmetric):
    n, k = data.draw(st.integers(1, 16)), group_size * data.draw(st.integers(1, 4))
    w = data.draw(hnp.arrays(np.float32, (n, k), elements=st.floats(-100, 100, width=32)))
    qt = Q.quantize(w, Q.Int4Config(group_size=group_size, symmetric=symmetric))
    assert qt.q.dtype == np.uint8 and qt.q.max() <= 15
    assert (qt.scales > 0).all()
    assert (qt.zero_points is None) == symmetric
    step = np.repeat(qt.scales, group_size, axis=1)
    assert (np.abs(qt.dequantize() - w) <= step / 2 + 1e-6 * np.abs(w) + 1e-30).all()


def test_all_zero_group_decodes_to_exact_zero():
    w = gaussian(2, 64)
    w[1, :32] = 0.0
    for symmetric in (True, False):
        assert (Q.quantize(w, Q.Int4Config(symmetric=symmetric)).dequantize()[1, :32] == 0).all()


@pytest.mark.parametrize("group_size", Q.SUPPORTED_GROUP_SIZES)
def test_full_16_level_symmetric_grid_beats_max_over_7(group_size):
    w = gaussian(512, 1024)
    ours = Q.quantize(w, Q.Int4Config(group_size=group_size)).dequantize()
    wg = w.reshape(512, -1, group_size)
    s7 = np.abs(wg).max(-1, keepdims=True) / 7
    textbook = (np.clip(np.round(wg / s7), -7, 7) * s7).reshape(w.shape)
    assert sqnr_db(w, ours) > sqnr_db(w, textbook) + 0.4  # measured +0.6 dB (g32) .. +0.8 dB (g128)


def test_sqnr_thresholds_on_gaussian_weights():
    w = gaussian(256, 1024)
    assert sqnr_db(w, Q.quantize(w, Q.Int4Config()).dequantize()) > 15  # measured 20.9 dB
    assert sqnr_db(w, Q.quantize(w, Q.Int4Config(symmetric=False)).dequantize()) > 15  # 21.4 dB
    assert sqnr_db(w, Q.quantize(w, Q.Int8Config()).dequantize()) > 35  # 41.9 dB
    assert sqnr_db(w, Q.quantize(w, Q.Fp8Config()).dequantize()) > 25  # 31.6 dB


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_never_increases_a_groups_error(symmetric):
    w = np.random.default_rng(1).standard_t(3, size=(64, 256)).astype(np.float32)  # heavy tails
    def group_err(config):
        return np.square(Q.quantize(w, config).dequantize() - w).reshape(64, -1, 32).sum(-1)
    plain = group_err(Q.Int4Config(symmetric=symmetric))
    clipped = group_err(Q.Int4Config(symmetric=symmetric, clip_search=True))
    assert (clipped <= plain * (1 + 1e-5)).all()
    assert clipped.sum() < 0.99 * plain.sum()  # measured 0.97 (t3) .. 0.95 (Gaussian)


def test_int8_is_per_row_symmetric():
    w = gaussian(8, 96)
    qt = Q.quantize(w, Q.Int8Config())
    assert qt.q.dtype == np.int8 and qt.scales.shape == (8, 1) and qt.group_size == 96
    np.testing.assert_allclose(qt.scales[:, 0], np.abs(w).max(1) / 127, rtol=1e-6)
    assert np.abs(qt.q).max() == 127


def test_scale_rows_folds_a_per_row_factor_exactly():
    qt = Q.quantize(gaussian(6, 64), Q.Int4Config(symmetric=False))
    factor = np.linspace(0.5, 2.0, 6, dtype=np.float32)
    np.testing.assert_allclose(qt.scale_rows(factor).dequantize(), qt.dequantize() * factor[:, None], rtol=1e-6)


@pytest.mark.parametrize("config", [Q.Int4Config(symmetric=False), Q.Int8Config(group_size=32), Q.Fp8Config()],
                         ids=["int4-zero-points", "int8-groups", "fp8-tensor-scale"])
def test_rows_are_the_rows_of_the_dequantized_tensor(config):
    """A block of output rows (what a consumer dequantizes at a time) means exactly those rows."""
    qt = Q.quantize(gaussian(10, 64), config)
    whole = qt.dequantize()
    for rows in (slice(0, 3), slice(3, 9), slice(9, 10), slice(8, 20)):
        part = qt.rows(rows)
        assert part.shape == whole[rows].shape and part.scheme == qt.scheme
        np.testing.assert_array_equal(part.dequantize(), whole[rows])


# ---- fp8 -----------------------------------------------------------------------------------

def test_e4m3fn_decode_table_matches_the_format():
    assert DECODE_TABLE[0x7E] == 448 and DECODE_TABLE[0x01] == 2.0 ** -9 and DECODE_TABLE[0x08] == 2.0 ** -6
    assert np.isnan(DECODE_TABLE[[0x7F, 0xFF]]).all() and np.isfinite(np.delete(DECODE_TABLE, [0x7F, 0xFF])).all()
    finite = np.delete(np.arange(256), [0x7F, 0xFF]).astype(np.uint8)
    np.testing.assert_array_equal(Q.encode_e4m3fn(DECODE_TABLE[finite]), finite)  # every value round-trips


def _fp8_probe_values():
    """Random values across the range, the grid itself, and every midpoint between neighbours."""
    rng = np.random.default_rng(0)
    grid = np.sort(DECODE_TABLE[:127].astype(np.float64))
    mids = (grid[1:] + grid[:-1]) / 2
    wide = rng.standard_normal(20000) * 2.0 ** rng.integers(-12, 8, 20000)  # subnormals to 448
    random = np.concatenate([rng.uniform(-448, 448, 20000), wide])
    near_ties = [np.nextafter(mids, 0), np.nextafter(mids, 1000)]
    x = np.concatenate([grid, mids, -mids, random, *near_ties]).astype(np.float32)
    return x[np.abs(x) <= 448]  # past 448 ml_dtypes gives NaN, we saturate (tested below)


def test_e4m3fn_encode_matches_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = _fp8_probe_values()
    np.testing.assert_array_equal(Q.encode_e4m3fn(x), x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8))


def test_e4m3fn_ties_go_to_even_and_saturate():
    # 17 lies between 16 (0x58, even mantissa) and 18 (0x59): ties to the even code
    assert Q.encode_e4m3fn(np.float32([17.0, 19.0]) ).tolist() == [0x58, 0x5A]
    assert Q.encode_e4m3fn(np.float32([460.0, 1e6, np.inf, -1e6, -0.0])).tolist() == [0x7E, 0x7E, 0x7E, 0xFE, 0x80]
    with pytest.raises(Q.QuantizationError, match="NaN"):
        Q.encode_e4m3fn(np.float32([np.nan]))


@pytest.mark.parametrize("per_channel, scale_shape", [(False, (1, 1)), (True, (5, 1))])
def test_fp8_scales_and_no_nan_codes(per_channel, scale_shape):
    w = gaussian(5, 64) * np.float32(1000)
    qt = Q.quantize(w, Q.Fp8Config(per_channel=per_channel))
    assert qt.scales.shape == scale_shape and qt.code_type == "float8e4m3fn"
    assert not np.isin(qt.q, [0x7F, 0xFF]).any()
    assert np.isfinite(qt.dequantize()).all() and sqnr_db(w, qt.dequantize()) > 25


def test_fp8_activation_scale_comes_from_stats():
    x = gaussian(100, 64) * np.float32(3)
    qt = Q.quantize(gaussian(4, 64), Q.Fp8Config(activation_scales=True), "w", Q.Stats.from_activations(x))
    assert qt.activation_scale == pytest.approx(np.abs(x).max() / 448, rel=1e-6)
    with pytest.raises(Q.QuantizationError, match="tensor w: fp8 activation_scales=True needs calibration stats"):
        Q.quantize(gaussian(4, 64), Q.Fp8Config(activation_scales=True), "w")


# ---- Stats ---------------------------------------------------------------------------------

def test_stats_accumulate_over_batches():
    x = gaussian(2000, 48, seed=3)
    stats = Q.Stats(48, sample_rows=512)
    for batch in np.array_split(x, 7):
        stats.update(batch[None])  # a leading batch dim is flattened
    np.testing.assert_allclose(stats.mean_abs, np.abs(x.astype(np.float64)).mean(0), rtol=1e-9)
    np.testing.assert_allclose(stats.hessian(), 2 * x.astype(np.float64).T @ x / 2000, rtol=1e-5, atol=1e-6)
    assert stats.sample.shape == (512, 48)
    rows = {r.tobytes() for r in x}
    assert all(r.tobytes() in rows for r in stats.sample) and len({r.tobytes() for r in stats.sample}) == 512
    # a uniform sample draws about a quarter of its rows from each quarter of the stream
    position = {r.tobytes(): i for i, r in enumerate(x)}
    quarters = np.bincount([position[r.tobytes()] * 4 // 2000 for r in stats.sample], minlength=4)
    assert (np.abs(quarters - 128) < 40).all()


def test_empty_stats_and_stats_without_xtx_are_explained():
    with pytest.raises(Q.QuantizationError, match=r"activations of shape \(4, 16\) do not end in K=8"):
        Q.Stats(8).update(np.zeros((4, 16), np.float32))
    with pytest.raises(Q.QuantizationError, match="Stats are empty"):
        Q.Stats(8).mean_abs
    stats = Q.Stats.from_activations(gaussian(10, 8), keep_xtx=False)
    with pytest.raises(Q.QuantizationError, match="keep_xtx=False; GPTQ needs"):
        stats.hessian()


# ---- GGUF carry-over -----------------------------------------------------------------------

def _gguf_blocks(n=4, k=128, seed=0):
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.001, 0.05, (n, k // 32)).astype(np.float16).astype(np.float32)
    m = (-d * rng.uniform(0, 15, d.shape)).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (n, k)).astype(np.uint8)
    return d, q, m


def test_q4_0_is_int4_symmetric_group_32():
    d, q, _ = _gguf_blocks()
    d[0, 0] = -d[0, 0]  # llama.cpp writes negative d too
    qt = Q.from_gguf_blocks("Q4_0", d, q)
    assert qt.group_size == 32 and qt.zero_points is None and qt.scheme["method"] == "keep"
    np.testing.assert_array_equal(qt.dequantize(), np.repeat(d, 32, 1) * (q.astype(np.float32) - 8))


def test_q4_1_decomposes_exactly_into_zero_point_and_residual():
    d, q, m = _gguf_blocks()
    qt = Q.from_gguf_blocks("Q4_1", d, q, m)
    expected = np.repeat(d, 32, 1) * q.astype(np.float32) + np.repeat(m, 32, 1)
    np.testing.assert_array_equal(qt.dequantize(), expected)  # exact: d, m are float16 as in GGUF
    assert qt.zero_points.max() <= 15 and (np.abs(qt.residual) <= d / 2 + 1e-9).all()
    d32 = np.random.default_rng(1).uniform(0.001, 0.05, d.shape).astype(np.float32)  # arbitrary float32
    qt = Q.from_gguf_blocks("Q4_1", d32, q, m)
    np.testing.assert_allclose(qt.dequantize(), np.repeat(d32, 32, 1) * q + np.repeat(m, 32, 1), rtol=1e-6, atol=1e-7)


def test_q4_1_constant_block_and_q8_0():
    d, q, m = _gguf_blocks()
    d[1, 2] = 0.0
    qt = Q.from_gguf_blocks("Q4_1", d, q, m)
    assert (qt.dequantize()[1, 64:96] == m[1, 2]).all()
    q8 = np.random.default_rng(2).integers(-127, 128, (4, 128)).astype(np.int8)
    qt = Q.from_gguf_blocks("Q8_0", d, q8)
    assert qt.scheme == {"scheme": "int8", "group_size": 32}
    np.testing.assert_array_equal(qt.dequantize(), np.repeat(d, 32, 1) * q8)


def test_unknown_gguf_kind_and_bad_blocks_are_refused():
    d, q, m = _gguf_blocks()
    with pytest.raises(Q.QuantizationError,
                       match=r"GGUF block type 'TQ2_0' cannot be carried over; supported: \['IQ4_NL', 'IQ4_XS', 'Q2_K'"):
        Q.from_gguf_blocks("TQ2_0", d, q)
    with pytest.raises(Q.QuantizationError, match="needs the per-group minimum m"):
        Q.from_gguf_blocks("Q4_1", d, q)
    with pytest.raises(Q.QuantizationError, match="do not form"):
        Q.from_gguf_blocks("Q4_0", d[:, :2], q)


def test_quantize_refuses_something_that_is_not_a_config():
    with pytest.raises(Q.QuantizationError, match=r"\{'scheme': 'int4'\} is not a quantization config"):
        Q.quantize(gaussian(2, 32), {"scheme": "int4"}, "w")
