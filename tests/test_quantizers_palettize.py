"""4-bit palettization (quantizers/palettize.py, Int4LutConfig): the k-means tables against
coremltools' own k-means palettizer, the stored layout against Core ML's constexpr_lut_to_dense
definition, and what it refuses."""
import numpy as np
import pytest

import quantizers
from quantizers import Int4LutConfig, PalettizedTensor, QuantizationError, scheme_from_dict
from quantizers.palettize import palettize
from runtimes.backends.coreml import decode_lut


def weights(kind: str, shape, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gauss":
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)
    if kind == "heavy":  # Student-t, 3 degrees of freedom: the outliers real LLM weights have
        return (rng.standard_t(3, size=shape) * 0.02).astype(np.float32)
    return (rng.uniform(-0.05, 0.05, size=shape)).astype(np.float32)


def coremltools_kmeans_sse(w: np.ndarray, rows: int) -> float:
    """Squared error of coremltools.optimize.torch's k-means (k-means++ init, 3 trials, up to 100
    Lloyd steps: what its palettizer clusters each group with) on the same groups, its centroids
    rounded to float16 as a package would store them."""
    torch = pytest.importorskip("torch")
    kmeans = pytest.importorskip("coremltools.optimize.torch.palettization._efficient_kmeans")
    torch.manual_seed(0)
    np.random.seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # its small cdists are several times slower contending for a busy machine's cores
    total = 0.0
    try:
        for start in range(0, w.shape[0], rows):
            x = torch.from_numpy(w[start:start + rows].reshape(-1, 1).copy())
            fit = kmeans._EfficientKMeans(16, init="kmeans++", n_init=3, max_iter=100).fit(x)
            centroids = fit.cluster_centers_.to(torch.float16).float()
            total += float(((x - centroids[fit.labels_.long()]) ** 2).sum())
    finally:
        torch.set_num_threads(threads)
    return total


def smollm2_tensor(name: str) -> np.ndarray:
    from edge_export.checkpoint import open_checkpoint
    return np.asarray(open_checkpoint("smollm2-135m").tensor(name), np.float32)


@pytest.mark.parametrize("kind,shape", [("gauss", (64, 576)), ("heavy", (32, 1536)), ("uniform", (48, 192))])
def test_kmeans_is_at_least_as_good_as_coremltools(kind, shape):
    """Our deterministic 1-D Lloyd (quantile start, 100 steps) reaches a squared error no worse
    than coremltools' k-means++ with three trials, on every group."""
    w = weights(kind, shape)
    ours = float(((palettize(w, 16).dequantize() - w) ** 2).sum())
    theirs = coremltools_kmeans_sse(w, 16)
    assert ours <= theirs * 1.0001, (ours, theirs)


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.k_proj.weight", "model.layers.7.mlp.down_proj.weight"])
def test_kmeans_on_smollm2_weights(name):
    """The same on real weights (SmolLM2-135M's GGUF, dequantized): the first 64 rows (4 tables)
    of layer 0's k_proj [192, 576] and layer 7's down_proj [576, 1536]."""
    w = smollm2_tensor(name)[:64]
    ours = float(((palettize(w, 16).dequantize() - w) ** 2).sum())
    theirs = coremltools_kmeans_sse(w, 16)
    assert ours <= theirs * 1.0001, (name, ours, theirs)


def test_kmeans_a_table_per_row_on_smollm2_outliers():
    """A table per row (--lut-rows 1) on q_proj's first 16 rows, whose outliers left a quantile start
    alone stuck at 1.5x coremltools' error: the three starts reach below it."""
    w = smollm2_tensor("model.layers.0.self_attn.q_proj.weight")[:16]
    ours = float(((palettize(w, 1).dequantize() - w) ** 2).sum())
    assert ours <= coremltools_kmeans_sse(w, 1) * 1.0001


def test_layout_is_constexpr_lut_to_dense():
    """coreml_lut() is what coremltools 9's iOS 18 constexpr_lut_to_dense takes (indices shape =
    weight shape, lut [N/16, 1, 16, 1]), and its own decompression gives dequantize() exactly, as
    does runtimes' reader."""
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import constexpr_lut_to_dense
    w = weights("heavy", (48, 96), seed=3)
    pt = palettize(w, 16)
    indices, lut = pt.coreml_lut()
    assert indices.shape == (48, 96) and indices.dtype == np.uint8 and indices.max() <= 15
    assert lut.shape == (3, 1, 16, 1) and lut.dtype == np.float16
    theirs = constexpr_lut_to_dense.decompress(indices, lut, None)
    np.testing.assert_array_equal(theirs.astype(np.float32), pt.dequantize())
    np.testing.assert_array_equal(decode_lut(indices, lut), pt.dequantize())


def test_each_weight_takes_its_nearest_stored_entry():
    w = weights("gauss", (32, 64), seed=1)
    pt = palettize(w, 16)
    tables = pt.tables.astype(np.float32)
    assert (np.diff(tables, axis=1) >= 0).all()  # sorted: an index orders like its value
    group = np.repeat(np.arange(2), 16)
    distance = np.abs(w[:, :, None] - tables[group][:, None, :])  # [N, K, 16]
    chosen = np.take_along_axis(distance, pt.indices[:, :, None].astype(np.intp), axis=2)[..., 0]
    np.testing.assert_allclose(chosen, distance.min(axis=2), rtol=0, atol=1e-9)


def test_deterministic_and_chunked_alike(monkeypatch):
    """The same weight gives the same bytes twice, and in small chunks of row groups as in one."""
    import quantizers.palettize as module
    w = weights("heavy", (64, 128), seed=2)
    a, b = palettize(w, 16), palettize(w, 16)
    monkeypatch.setattr(module, "GROUP_ELEMENTS", 16 * 128)  # one group at a time
    c = palettize(w, 16)
    for other in (b, c):
        np.testing.assert_array_equal(a.indices, other.indices)
        np.testing.assert_array_equal(a.tables, other.tables)


def test_rows_and_concat_round_trip():
    pt = palettize(weights("gauss", (64, 32)), 16)
    again = PalettizedTensor.concat([pt.rows(slice(0, 32)), pt.rows(slice(32, 64))])
    np.testing.assert_array_equal(again.dequantize(), pt.dequantize())
    with pytest.raises(QuantizationError, match="cut a group of 16 rows"):
        pt.rows(slice(0, 8))


def test_dispatch_config_and_manifest_round_trip():
    config = Int4LutConfig()
    pt = quantizers.quantize(weights("gauss", (32, 64)), config, "w")
    assert isinstance(pt, PalettizedTensor) and pt.scheme == config.to_dict()
    assert config.to_dict() == {"scheme": "int4_lut", "rows_per_lut": 16, "iterations": 100, "method": "palettize"}
    assert scheme_from_dict(config.to_dict()) == config


def test_refusals():
    with pytest.raises(QuantizationError, match=r"tensor blk.w: 40 output rows are not a multiple of rows_per_lut=16"):
        quantizers.quantize(weights("gauss", (40, 64)), Int4LutConfig(), "blk.w")
    with pytest.raises(QuantizationError, match="rows_per_lut=0 must be a positive number of rows"):
        Int4LutConfig(rows_per_lut=0)
    with pytest.raises(QuantizationError, match="int4_lut method='rtn' is unknown"):
        Int4LutConfig(method="rtn")
    nan = weights("gauss", (16, 8))
    nan[3, 2] = np.nan
    with pytest.raises(QuantizationError, match=r"tensor w: 1 NaN/Inf value\(s\), first at \[3, 2\]"):
        quantizers.quantize(nan, Int4LutConfig(), "w")
