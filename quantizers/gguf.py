"""Carry GGUF's already-quantized blocks over as QuantizedTensors, exactly, never requantized.

The checkpoint reader unpacks a GGUF tensor's blocks into per-block ``d`` (and ``m``) float
arrays [N, K/32] and unpacked codes [N, K]; this module maps them onto our int4/int8 layout.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from .errors import QuantizationError
from .schemes import Int4Config, Int8Config
from .tensor import QuantizedTensor

GGUF_BLOCK = 32
GGUF_KINDS: dict[str, Callable[..., QuantizedTensor]] = {}


def _register(kind: str):
    def wrap(fn):
        GGUF_KINDS[kind] = fn
        return fn
    return wrap


def from_gguf_blocks(kind: str, d: np.ndarray, q: np.ndarray, m: Optional[np.ndarray] = None) -> QuantizedTensor:
    """GGUF blocks of a weight [N, K] -> QuantizedTensor with group size 32.

    - ``Q4_0``: w = d * (q - 8), q uint 0..15 -> int4 symmetric, zero point 8 implied. llama.cpp
      lets d be negative (it maps the largest-magnitude weight to -8); the scales keep that sign.
    - ``Q4_1``: w = d * q + m -> int4 with zero point z = clip(round(-m/d), 0, 15) and residual
      r = m + d*z, so w = d * (q - z) + r exactly; z carries the bulk of m as an integer zero
      point that every int4 target understands, r is what is left (0 where m/d is integral).
    - ``Q8_0``: w = d * q, q int8 -> int8 with group size 32.

    ``d``, ``m``: float [N, K/32] per-block scale and min; ``q``: codes [N, K], unpacked.
    """
    if kind not in GGUF_KINDS:
        raise QuantizationError(f"GGUF block type {kind!r} cannot be carried over; supported: "
                                f"{sorted(GGUF_KINDS)} (dequantize others to float and requantize)")
    q = np.asarray(q)
    d = np.asarray(d, np.float32)
    if q.ndim != 2 or q.shape[1] % GGUF_BLOCK or d.shape != (q.shape[0], q.shape[1] // GGUF_BLOCK):
        raise QuantizationError(f"GGUF {kind}: codes {q.shape} and scales {d.shape} do not form "
                                f"[N, K] with one scale per {GGUF_BLOCK} inputs")
    return GGUF_KINDS[kind](d, q, m)


def _check_nibbles(q: np.ndarray, kind: str) -> np.ndarray:
    if q.min() < 0 or q.max() > 15:
        raise QuantizationError(f"GGUF {kind}: codes must be unpacked 4-bit values 0..15")
    return q.astype(np.uint8)


@_register("Q4_0")
def _q4_0(d: np.ndarray, q: np.ndarray, m: Optional[np.ndarray]) -> QuantizedTensor:
    config = Int4Config(GGUF_BLOCK, symmetric=True, method="keep")
    return QuantizedTensor(q=_check_nibbles(q, "Q4_0"), scales=d, zero_points=None, bits=4,
                           group_size=GGUF_BLOCK, shape=q.shape, scheme=config.to_dict())


@_register("Q4_1")
def _q4_1(d: np.ndarray, q: np.ndarray, m: Optional[np.ndarray]) -> QuantizedTensor:
    if m is None or np.shape(m) != d.shape:
        raise QuantizationError(f"GGUF Q4_1 needs the per-block minimum m with the shape of d {d.shape}")
    m64, d64 = np.asarray(m, np.float64), d.astype(np.float64)
    ratio = np.divide(-m64, d64, out=np.zeros_like(m64), where=d64 != 0)
    z = np.clip(np.round(ratio), 0, 15)
    residual = (m64 + d64 * z).astype(np.float32)  # exact for fp16 d and m, as GGUF stores them
    # A constant block has d = 0 and meaningless codes; zero them so that any packer may give
    # the block scale 1 and put the constant in its offset (see pack.pack_matmulnbits).
    q = np.where(np.repeat(d == 0, GGUF_BLOCK, axis=1), 0, _check_nibbles(q, "Q4_1"))
    config = Int4Config(GGUF_BLOCK, symmetric=False, method="keep")
    return QuantizedTensor(q=q.astype(np.uint8), scales=d, zero_points=z.astype(np.uint8), bits=4,
                           group_size=GGUF_BLOCK, shape=q.shape, scheme=config.to_dict(), residual=residual)


@_register("Q8_0")
def _q8_0(d: np.ndarray, q: np.ndarray, m: Optional[np.ndarray]) -> QuantizedTensor:
    if q.dtype != np.int8:
        raise QuantizationError(f"GGUF Q8_0 codes must be int8, got {q.dtype}")
    return QuantizedTensor(q=q, scales=d, zero_points=None, bits=8, group_size=GGUF_BLOCK,
                           shape=q.shape, scheme=Int8Config(GGUF_BLOCK).to_dict())
