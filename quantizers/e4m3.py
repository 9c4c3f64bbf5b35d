"""float8 E4M3FN encode/decode in numpy, bit-exact with ONNX float8e4m3fn and ml_dtypes.

E4M3FN: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits; no infinities; 0x7F/0xFF are
NaN; largest finite 448 (0x7E); smallest normal 2**-6; subnormals m * 2**-9 for m in 1..7.
Encoding rounds to nearest, ties to even, and saturates to +-448 (ONNX QuantizeLinear's
``saturate=1``), so it never produces NaN.
"""
from __future__ import annotations

import numpy as np

from .errors import QuantizationError

E4M3_MAX = 448.0


def _positive_table() -> np.ndarray:
    """float64 value of codes 0..126 (all finite non-negative E4M3FN values, ascending)."""
    codes = np.arange(127)
    exponent, mantissa = codes >> 3, codes & 7
    normal = (1.0 + mantissa / 8.0) * np.exp2(exponent - 7.0)
    subnormal = mantissa * 2.0 ** -9
    return np.where(exponent == 0, subnormal, normal)


_POSITIVE = _positive_table()
# Decode table for all 256 bit patterns; NaN patterns decode to NaN like every float8 reader.
DECODE_TABLE = np.concatenate([_POSITIVE, [np.nan], -_POSITIVE, [np.nan]]).astype(np.float32)


def encode_e4m3fn(x: np.ndarray) -> np.ndarray:
    """float array -> uint8 E4M3FN bit patterns, same shape (round-nearest-even, saturating).

    Raises QuantizationError on NaN (an Inf saturates like any value past 448)."""
    x = np.asarray(x, dtype=np.float32)
    if np.isnan(x).any():
        raise QuantizationError("cannot encode NaN as float8 e4m3fn")
    magnitude = np.minimum(np.abs(x).astype(np.float64), E4M3_MAX)
    # The spacing of the E4M3 grid around |x| is 2**(e-3) with e = floor(log2|x|), floored at
    # the subnormal exponent -6; dividing by a power of two is exact, so np.round (half-even)
    # lands exactly on a grid value (possibly the next binade, which is also on the grid).
    _, exp = np.frexp(magnitude)
    quantum = np.exp2(np.maximum(exp - 1, -6) - 3.0)
    rounded = np.minimum(np.round(magnitude / quantum) * quantum, E4M3_MAX)
    codes = np.searchsorted(_POSITIVE, rounded).astype(np.uint8)
    return codes | (np.signbit(x).astype(np.uint8) << 7)


def decode_e4m3fn(codes: np.ndarray) -> np.ndarray:
    """uint8 E4M3FN bit patterns -> float32 values, same shape."""
    return DECODE_TABLE[np.asarray(codes, dtype=np.uint8)]
