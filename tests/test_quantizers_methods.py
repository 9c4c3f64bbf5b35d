"""AWQ and GPTQ against RTN on synthetic layers whose inputs have outlier channels and
correlated features — the two properties of real LLM activations those methods exploit.

Errors are measured on held-out activations (not the calibration rows) as ||X W^T - X W_q^T||.
Measured ratios to RTN over seeds 0..2: AWQ 0.63-0.69, GPTQ 0.13-0.21, GPTQ act_order 0.11-0.12.
"""
import numpy as np
import pytest

import quantizers as Q
from quantizers.gptq import gptq, inverse_hessian_factor


def synthetic_layer(seed, n=192, k=256, tokens=3072):
    rng = np.random.default_rng(seed)
    mix = np.eye(k) + rng.standard_normal((k, 16)) @ rng.standard_normal((16, k)) * 0.15  # correlated
    x = (rng.standard_normal((tokens, k)) @ mix).astype(np.float32)
    x[:, rng.choice(k, 8, replace=False)] *= 25.0  # outlier input channels
    w = rng.standard_normal((n, k)).astype(np.float32)
    return w, x[:2048], x[2048:]


def output_error(w, x, weight):
    return float(np.linalg.norm(x @ weight.T - x @ w.T))


@pytest.fixture(scope="module", params=[0, 1])
def layer(request):
    w, calib, held_out = synthetic_layer(request.param)
    return w, Q.Stats.from_activations(calib), held_out


@pytest.mark.parametrize("group_size", [32, 64])
def test_awq_beats_rtn(layer, group_size):
    w, stats, x = layer
    rtn = Q.quantize(w, Q.Int4Config(group_size=group_size), "w")
    awq = Q.quantize(w, Q.Int4Config(group_size=group_size, method="awq"), "w", stats)
    assert awq.input_scale is not None and awq.input_scale.shape == (w.shape[1],)
    assert output_error(w, x, awq.effective_weight()) < 0.8 * output_error(w, x, rtn.dequantize())


@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn(layer, group_size, act_order):
    w, stats, x = layer
    rtn = Q.quantize(w, Q.Int4Config(group_size=group_size), "w")
    config = Q.Int4Config(group_size=group_size, method="gptq", act_order=act_order)
    ours = Q.quantize(w, config, "w", stats)
    assert ours.input_scale is None and ours.scheme == config.to_dict()
    assert output_error(w, x, ours.dequantize()) < 0.5 * output_error(w, x, rtn.dequantize())


def test_gptq_act_order_keeps_the_rtn_group_layout(layer):
    """Static groups: scales come from the original weight, group j covers inputs j*g..(j+1)*g-1."""
    w, stats, _ = layer
    rtn = Q.quantize(w, Q.Int4Config(), "w")
    ours = Q.quantize(w, Q.Int4Config(method="gptq", act_order=True), "w", stats)
    np.testing.assert_array_equal(ours.scales, rtn.scales)


def test_awq_shared_scale_for_weights_reading_one_input(layer):
    w, stats, x = layer
    q, k, v = w[:128], w[128:160], w[160:]
    tensors = Q.awq_quantize_shared([q, k, v], Q.Int4Config(), stats, names=["q", "k", "v"])
    assert all(np.array_equal(t.input_scale, tensors[0].input_scale) for t in tensors)
    s = tensors[0].input_scale
    np.testing.assert_array_equal(s, Q.awq_search_shared([q, k, v], stats.sample, Q.Int4Config(), stats.mean_abs))
    # folding 1/s into the producer (RMSNorm weight) gives the same outputs as effective_weight
    for t, wi in zip(tensors, (q, k, v)):
        np.testing.assert_allclose((x / s) @ t.dequantize().T, x @ t.effective_weight().T, rtol=1e-3, atol=1e-3)
        rtn = Q.quantize(wi, Q.Int4Config()).dequantize()
        assert output_error(wi, x, t.effective_weight()) < output_error(wi, x, rtn)


def test_awq_alpha_zero_is_rtn_so_uniform_inputs_stay_close_to_rtn():
    rng = np.random.default_rng(5)
    w, x = rng.standard_normal((64, 128)).astype(np.float32), rng.standard_normal((512, 128)).astype(np.float32)
    ours = Q.quantize(w, Q.Int4Config(method="awq"), "w", Q.Stats.from_activations(x))
    rtn = Q.quantize(w, Q.Int4Config(), "w")
    assert output_error(w, x, ours.effective_weight()) <= output_error(w, x, rtn.dequantize()) * (1 + 1e-6)


def test_gptq_survives_dead_input_channels():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((512, 64)).astype(np.float32)
    x[:, 3] = 0.0  # never active during calibration
    w = rng.standard_normal((16, 64)).astype(np.float32)
    qt = Q.quantize(w, Q.Int4Config(method="gptq"), "w", Q.Stats.from_activations(x))
    assert np.isfinite(qt.dequantize()).all()


def test_inverse_hessian_factor_is_upper_cholesky_of_the_inverse():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1500, 600))
    h = x.T @ x + np.eye(600)  # > 512: exercises the blocked triangular inverse
    u = inverse_hessian_factor(h)
    assert np.allclose(u, np.triu(u))
    np.testing.assert_allclose(u.T @ u, np.linalg.inv(h), atol=1e-12)


def test_gptq_explains_a_hessian_that_is_not_positive_definite():
    h = -np.eye(32)
    with pytest.raises(Q.QuantizationError, match="tensor w: the GPTQ Hessian is not positive definite; raise damp"):
        gptq(np.ones((4, 32), np.float32), h, Q.Int4Config(method="gptq"), "w")


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_a_diagonal_hessian_is_rtn(act_order):
    """Uncorrelated inputs leave nothing to compensate: GPTQ must reduce to round-to-nearest."""
    w = np.random.default_rng(4).standard_normal((24, 256)).astype(np.float32)
    h = np.diag(np.random.default_rng(5).uniform(0.5, 4.0, 256))
    codes, scales, zeros = gptq(w, h, Q.Int4Config(method="gptq", act_order=act_order), "w")
    rtn = Q.quantize(w, Q.Int4Config(), "w")
    np.testing.assert_array_equal(codes, rtn.q)
    np.testing.assert_array_equal(scales, rtn.scales)


def test_int4_head_by_gptq_sees_the_final_norm_output(tiny_llama):
    """--method gptq --head int4: the head is GPTQ'd against its real input (the final norm of the
    calibration states), so its output error there is below round-to-nearest's."""
    import quantizers as Q
    from edge_export.checkpoint import open_checkpoint
    from edge_export.calibration import calibration_ids
    from edge_export.export import ExportOptions, quant_rules
    from edge_export.quantize import QuantizedWeights
    ckpt = open_checkpoint(tiny_llama)
    weights = QuantizedWeights(ckpt, quant_rules(ExportOptions(method="gptq", head="int4")),
                               calibration_ids(ckpt.tokenizer, None)[:16])
    name = ckpt.spec.tensor_name("embed" if ckpt.spec.tied_embeddings else "lm_head")
    x = weights._head_input_stats().sample
    head = weights.get(name)
    assert head.scheme["method"] == "gptq" and weights.records[name].source == "quantized"
    w = ckpt.tensor(name)
    rtn = Q.quantize(w, Q.Int4Config(group_size=32), name)
    error = lambda qt: np.linalg.norm(x @ (w - qt.effective_weight()).T)  # noqa: E731
    assert error(head) < 0.9 * error(rtn)
