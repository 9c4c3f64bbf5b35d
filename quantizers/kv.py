"""Static int8 scales for a KV cache, from the keys and values calibration prompts produce.

A cache stores keys after rotary: position p turns each pair of channels (j, j + head_dim/2)
(the rotate_half convention) by an angle that depends on p. So the largest value channel j can
hold at any position is the pair's radius sqrt(k_j^2 + k_{j+hd/2}^2), not the largest k_j seen at
the positions the prompts happened to reach: the key scales are taken from the pre-rotary keys'
radii, and hold for every position. Values are not rotated: their scale is the per-channel max |v|.

With a partial rotary (Phi-3: the first ``rotary_dim`` channels rotate, pairs (j, j + rotary_dim/2))
the channels after the rotated ones pass through and keep their own max |k|. A rope whose cos/sin
carry an attention factor (YaRN, LongRoPE) scales the rotated channels by it (``rotary_gain``).

    kv = KVRange(kv_heads=3, head_dim=64)
    kv.update(k, v)            # [kv_heads, T, head_dim] each, per calibration prompt
    k_scale, v_scale = kv.scales()   # [kv_heads, head_dim] float32: x ~ round(x / scale), |q| <= 127
"""
from __future__ import annotations

import numpy as np

from .errors import QuantizationError

INT8_MAX = 127.0
# A channel the prompts never excited still needs a nonzero scale (a zero would divide by zero).
MIN_RANGE = 1e-6


class KVRange:
    """Running per-channel ranges of one layer's keys (rotary-pair radii) and values."""

    def __init__(self, kv_heads: int, head_dim: int, rotary_dim: int | None = None, rotary_gain: float = 1.0):
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise QuantizationError(f"rotary width {rotary_dim} of head_dim {head_dim} is odd or out of range: "
                                    "rotary pairs need an even width within the head")
        self.kv_heads, self.head_dim, self.rotary_dim, self.tokens = kv_heads, head_dim, rotary_dim, 0
        self.rotary_gain = float(rotary_gain)
        self.k_radius = np.zeros((kv_heads, rotary_dim // 2), np.float64)
        self.k_pass = np.zeros((kv_heads, head_dim - rotary_dim), np.float64)
        self.v_max = np.zeros((kv_heads, head_dim), np.float64)

    def update(self, k: np.ndarray, v: np.ndarray) -> None:
        """Keys before rotary and values of one sequence, [kv_heads, T, head_dim] each."""
        expected = (self.kv_heads, self.head_dim)
        for name, x in (("keys", k), ("values", v)):
            if x.ndim != 3 or (x.shape[0], x.shape[2]) != expected:
                raise QuantizationError(f"{name} of shape {x.shape} do not match [kv_heads={self.kv_heads}, T, "
                                        f"head_dim={self.head_dim}]")
            if not np.isfinite(x).all():
                raise QuantizationError(f"calibration {name} hold NaN or Inf: the model's weights or the "
                                        "prompts overflow float32")
        half = self.rotary_dim // 2
        k = k.astype(np.float64)
        radius = np.sqrt(k[..., :half] ** 2 + k[..., half:self.rotary_dim] ** 2).max(axis=1)
        np.maximum(self.k_radius, radius, out=self.k_radius)
        np.maximum(self.k_pass, np.abs(k[..., self.rotary_dim:]).max(axis=1), out=self.k_pass)
        np.maximum(self.v_max, np.abs(v).max(axis=1), out=self.v_max)
        self.tokens += k.shape[1]

    def scales(self) -> tuple[np.ndarray, np.ndarray]:
        """(k_scale, v_scale), [kv_heads, head_dim] float32 each, for symmetric int8."""
        if not self.tokens:
            raise QuantizationError("no calibration tokens reached this layer's KV cache")
        radius = self.k_radius * self.rotary_gain
        k_range = np.concatenate([radius, radius, self.k_pass], axis=-1)
        return ((np.maximum(k_range, MIN_RANGE) / INT8_MAX).astype(np.float32),
                (np.maximum(self.v_max, MIN_RANGE) / INT8_MAX).astype(np.float32))


def quantize_kv(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 codes of x [..., kv_heads, T, head_dim] under per-channel ``scale`` [kv_heads, head_dim]
    (round half to even, saturating): what the runtime's cache holds, for checking."""
    return np.clip(np.rint(x / scale[:, None, :]), -INT8_MAX - 1, INT8_MAX).astype(np.int8)
