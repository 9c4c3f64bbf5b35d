"""AWQ (Lin et al., 2023): scale salient input channels up before int4 rounding.

For a per-input-channel scale ``s = mean|x| ** alpha`` (normalised so its geometric mid-range is
1), the weight is quantized as ``Q(W * s)`` and the layer computes ``(x / s) @ Q(W * s)^T``;
alpha is chosen on a grid over [0, 1) to minimise ``||X W^T - X (Q(W*s)/s)^T||^2`` on a sample
of calibration rows X. alpha = 0 is plain RTN, so on the sample AWQ never does worse.

Folding 1/s (the caller's job, in edge_export, which owns the graph): the scale is returned as
``QuantizedTensor.input_scale`` [K]. For q/k/v (and gate/up), which read the same RMSNorm output,
:func:`awq_quantize_shared` finds one scale for the group, and the caller divides that RMSNorm's
weight by it; for down_proj it divides up_proj's output rows (act(gate) * up is linear in up),
after up_proj is quantized and without requantizing it, with ``up.scale_rows(1 / s)``; for
o_proj, whose input has no foldable producer under grouped-query attention, it leaves an
explicit Mul by 1/s before the MatMul. :meth:`QuantizedTensor.effective_weight` is the weight
for the unscaled input, which is what the reference runtime uses when nothing is folded.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .dispatch import check_weight, register_handler
from .errors import QuantizationError
from .int4 import fake_quantize, make_tensor, rtn
from .schemes import Int4Config
from .tensor import QuantizedTensor

ALPHA_GRID = np.arange(20) / 20.0  # 0, 0.05, ..., 0.95 as in the AWQ paper's search


def awq_scale(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """float32 [K]: ``mean_abs ** alpha`` floored at 1e-4 and divided by sqrt(max * min), so the
    scales straddle 1 and folding them keeps the previous op's range centred."""
    s = np.maximum(np.asarray(mean_abs, np.float64) ** alpha, 1e-4)
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


def awq_search_shared(weights: Sequence[np.ndarray], x: np.ndarray, config: Optional[Int4Config] = None,
                      mean_abs: Optional[np.ndarray] = None) -> np.ndarray:
    """One input scale s float32 [K] for weights [N_i, K] that read the same input.

    ``x`` [n, K] is a sample of that input (a few hundred rows suffice; cost grows with n);
    ``config`` gives group size and symmetry (default Int4Config()); ``mean_abs`` [K] defaults
    to mean |x| over the sample. The loss is summed over all weights.
    """
    config = config or Int4Config()
    w = np.concatenate([np.asarray(wi, np.float32) for wi in weights], axis=0)
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise QuantizationError(f"AWQ sample has shape {x.shape}; expected [rows, {w.shape[1]}]")
    mean_abs = np.abs(x).mean(0) if mean_abs is None else mean_abs
    search = Int4Config(config.group_size, config.symmetric)  # plain RTN while searching: faster
    best_loss, best_scale = np.inf, None
    for alpha in ALPHA_GRID:
        s = awq_scale(mean_abs, alpha)
        error = w - fake_quantize(w * s, search) / s  # [N, K]: what the quantized layer gets wrong
        loss = float(np.square(x @ error.T).sum())
        if loss < best_loss:
            best_loss, best_scale = loss, s
    return best_scale


def awq_quantize_shared(weights: Sequence[np.ndarray], config: Int4Config, stats,
                        names: Optional[Sequence[str]] = None) -> list[QuantizedTensor]:
    """Quantize weights that share an input (q/k/v, gate/up) with one AWQ scale; every returned
    tensor carries the same ``input_scale``, to fold once into their common RMSNorm."""
    names = list(names) if names is not None else [""] * len(weights)
    if len(names) != len(weights):
        raise QuantizationError(f"awq_quantize_shared got {len(weights)} weights but {len(names)} names")
    checked = [check_weight(w, n) for w, n in zip(weights, names)]
    _require_stats(stats, names[0])
    s = awq_search_shared(checked, stats.sample, config, stats.mean_abs)
    return [make_tensor(*rtn(w * s, config.group_size, config.symmetric, config.clip_search, n), config,
                        input_scale=s) for w, n in zip(checked, names)]


@register_handler("int4", "awq")
def quantize_awq(w: np.ndarray, config: Int4Config, name: str, stats=None) -> QuantizedTensor:
    """AWQ for one weight whose input it does not share (o_proj, down_proj)."""
    return awq_quantize_shared([w], config, stats, [name])[0]


def _require_stats(stats, name: str) -> None:
    if stats is None:
        raise QuantizationError(f"tensor {name or '<unnamed>'}: method 'awq' needs calibration stats "
                                "of the layer's input (quantize(..., stats=Stats)); or use method 'rtn'")
