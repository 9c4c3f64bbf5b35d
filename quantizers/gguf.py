"""Carry GGUF's already-quantized blocks over as QuantizedTensors, exactly, never requantized.

The checkpoint reader unpacks a GGUF tensor's blocks into per-group scales ``d`` (and additive
minimums ``m``) [N, K/g] and unpacked codes [N, K], with g = 32 (16 for Q6_K / Q3_K / Q2_K); this
module maps them onto our int4/int8 layout. Every form computes each weight with the same float32
operations as llama.cpp's dequantization: an exact product d * code, then at most one rounded
addition of the minimum, so ``QuantizedTensor.dequantize()`` equals gguf-py's bit for bit.

- 4 bits (codes 0..15): Q4_0 as symmetric int4 (zero point 8); Q4_1 and Q4_K as asymmetric int4,
  an integer zero point z plus a float residual r per group (w = d*(q - z) + r).
- 8 bits (codes of 3 to 8 bits, held in int8): Q8_0, Q5_0, Q6_K, Q3_K, IQ4_NL, IQ4_XS as d * code;
  Q5_1, Q5_K, Q2_K as d * code + m, the minimum carried as the residual.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from .errors import QuantizationError
from .schemes import Int4Config, Int8Config
from .tensor import QuantizedTensor

GGUF_BLOCK = 32
GGUF_GROUPS = (16, 32)
GGUF_KINDS: dict[str, Callable[..., QuantizedTensor]] = {}


def _register(*kinds: str):
    def wrap(fn):
        for kind in kinds:
            GGUF_KINDS[kind] = fn
        return fn
    return wrap


def from_gguf_blocks(kind: str, d: np.ndarray, q: np.ndarray, m: Optional[np.ndarray] = None) -> QuantizedTensor:
    """GGUF groups of a weight [N, K] -> QuantizedTensor with the group size of the blocks.

    ``d``, ``m``: float32 [N, K/g] per-group scale and additive minimum (None for types without
    one); ``q``: codes [N, K], unpacked (uint8 0..15 for the 4-bit types, int8 otherwise).
    llama.cpp lets d be negative (Q4_0 maps the largest-magnitude weight to -8, Q6_K and Q3_K
    scales are signed); the scales keep that sign.
    """
    if kind not in GGUF_KINDS:
        raise QuantizationError(f"GGUF block type {kind!r} cannot be carried over; supported: "
                                f"{sorted(GGUF_KINDS)} (dequantize others to float and requantize)")
    q = np.asarray(q)
    d = np.asarray(d, np.float32)
    if q.ndim != 2 or d.ndim != 2 or d.shape[0] != q.shape[0] or not d.shape[1] \
            or q.shape[1] % d.shape[1] or q.shape[1] // d.shape[1] not in GGUF_GROUPS:
        raise QuantizationError(f"GGUF {kind}: codes {q.shape} and scales {d.shape} do not form "
                                f"[N, K] with one scale per {GGUF_GROUPS} inputs")
    if m is not None and np.shape(m) != d.shape:
        raise QuantizationError(f"GGUF {kind}: minimums {np.shape(m)} should have the shape of the scales {d.shape}")
    return GGUF_KINDS[kind](kind, d, q, None if m is None else np.asarray(m, np.float32))


def _check_nibbles(q: np.ndarray, kind: str) -> np.ndarray:
    if q.min() < 0 or q.max() > 15:
        raise QuantizationError(f"GGUF {kind}: codes must be unpacked 4-bit values 0..15")
    return q.astype(np.uint8)


def _needs_min(kind: str, m: Optional[np.ndarray]) -> np.ndarray:
    if m is None:
        raise QuantizationError(f"GGUF {kind} needs the per-group minimum m")
    return m


@_register("Q4_0")
def _symmetric_int4(kind: str, d: np.ndarray, q: np.ndarray, m: Optional[np.ndarray]) -> QuantizedTensor:
    group = q.shape[1] // d.shape[1]
    config = Int4Config(group, symmetric=True, method="keep")
    return QuantizedTensor(q=_check_nibbles(q, kind), scales=d, zero_points=None, bits=4,
                           group_size=group, shape=q.shape, scheme=config.to_dict())


@_register("Q4_1", "Q4_K")
def _int4_with_min(kind: str, d: np.ndarray, q: np.ndarray, m: Optional[np.ndarray]) -> QuantizedTensor:
    """w = d*q + m -> int4 with zero point z = clip(round(-m/d), 0, 15) and residual r = m + d*z,
    so w = d*(q - z) + r: z carries the bulk of m as an integer zero point that every int4 target
    understands, r what is left (0 where m/d is integral). r is computed in float64; a group where
    it is not exact in float32 gets z = 0 and r = m, so the form stays exact."""
    m = _needs_min(kind, m)
    group = q.shape[1] // d.shape[1]
    m64, d64 = m.astype(np.float64), d.astype(np.float64)
    ratio = np.divide(-m64, d64, out=np.zeros_like(m64), where=d64 != 0)
    z = np.clip(np.round(ratio), 0, 15)
    residual64 = m64 + d64 * z
    exact = residual64.astype(np.float32).astype(np.float64) == residual64
    z = np.where(exact, z, 0)
    residual = np.where(exact, residual64, m64).astype(np.float32)
    # A constant group has d = 0 and meaningless codes; zero them so that any packer may give
    # the group scale 1 and put the constant in its offset (see pack.pack_matmulnbits).
    q = np.where(np.repeat(d == 0, group, axis=1), 0, _check_nibbles(q, kind))
    config = Int4Config(group, symmetric=False, method="keep")
    return QuantizedTensor(q=q.astype(np.uint8), scales=d, zero_points=z.astype(np.uint8), bits=4,
                           group_size=group, shape=q.shape, scheme=config.to_dict(), residual=residual)


@_register("Q8_0", "Q5_0", "Q6_K", "Q3_K", "IQ4_NL", "IQ4_XS", "Q5_1", "Q5_K", "Q2_K")
def _int8(kind: str, d: np.ndarray, q: np.ndarray, m: Optional[np.ndarray]) -> QuantizedTensor:
    """w = d*q (+ m) with q of 3..8 bits -> int8 codes as they are, the minimum as the residual."""
    if q.dtype != np.int8:
        raise QuantizationError(f"GGUF {kind} codes must be int8, got {q.dtype}")
    if kind in ("Q5_1", "Q5_K", "Q2_K"):
        _needs_min(kind, m)
    group = q.shape[1] // d.shape[1]
    return QuantizedTensor(q=q, scales=d, zero_points=None, bits=8, group_size=group,
                           shape=q.shape, scheme=Int8Config(group).to_dict(), residual=m)
