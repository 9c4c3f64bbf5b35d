"""Symmetric int8: codes -127..127 (not -128, so the grid is symmetric and negation exact)."""
from __future__ import annotations

import numpy as np

from .dispatch import register_handler
from .schemes import Int8Config, check_divides
from .tensor import QuantizedTensor


def quantize_int8(w: np.ndarray, group_size: int, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """W float32 [N, K] -> (codes int8 [N, K], scales float32 [N, K/g]), scale = max|w| / 127
    per group (scale 1 for an all-zero group, which any positive scale decodes exactly)."""
    n, k = w.shape
    check_divides(k, group_size, name)
    wg = w.reshape(n, k // group_size, group_size)
    scales = np.abs(wg).max(-1) / np.float32(127.0)
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    codes = np.clip(np.round(wg / scales[..., None]), -127, 127).astype(np.int8)
    return codes.reshape(n, k), scales


@register_handler("int8", "rtn")
def quantize_int8_rtn(w: np.ndarray, config: Int8Config, name: str, stats=None) -> QuantizedTensor:
    group_size = config.group_size or w.shape[1]
    codes, scales = quantize_int8(w, group_size, name)
    return QuantizedTensor(q=codes, scales=scales, zero_points=None, bits=8, group_size=group_size,
                           shape=w.shape, scheme=config.to_dict())
