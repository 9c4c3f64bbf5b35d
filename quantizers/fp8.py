"""float8 E4M3FN weights with float32 scales (per tensor or per output row)."""
from __future__ import annotations

import numpy as np

from .dispatch import register_handler
from .e4m3 import E4M3_MAX, encode_e4m3fn
from .errors import QuantizationError
from .schemes import Fp8Config
from .tensor import QuantizedTensor


def fp8_scales(w: np.ndarray, per_channel: bool) -> np.ndarray:
    """float32 [N, 1] (per row) or [1, 1] (per tensor): max|w| / 448, so the largest weight
    lands on E4M3FN's largest finite value (1 for all-zero rows)."""
    amax = np.abs(w).max(axis=1, keepdims=True) if per_channel else np.abs(w).max(keepdims=True)
    scales = amax / np.float32(E4M3_MAX)
    return np.where(scales > 0, scales, 1.0).astype(np.float32)


@register_handler("fp8", "rtn")
def quantize_fp8(w: np.ndarray, config: Fp8Config, name: str, stats=None) -> QuantizedTensor:
    """W float32 [N, K] -> E4M3FN codes [N, K] (uint8 bit patterns) with one scale per row/tensor.

    With ``activation_scales`` the per-tensor input scale max|x| / 448 comes from ``stats``."""
    scales = fp8_scales(w, config.per_channel)
    codes = encode_e4m3fn(w / scales)
    activation_scale = None
    if config.activation_scales:
        if stats is None:
            raise QuantizationError(f"tensor {name or '<unnamed>'}: fp8 activation_scales=True needs "
                                    "calibration stats of the layer's input")
        activation_scale = float(max(stats.abs_max.max(), 1e-12) / E4M3_MAX)
    return QuantizedTensor(q=codes, scales=scales, zero_points=None, bits=8, group_size=w.shape[1],
                           shape=w.shape, scheme=config.to_dict(), activation_scale=activation_scale)
