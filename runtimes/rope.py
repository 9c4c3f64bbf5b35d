"""Rotary position embeddings: inverse frequencies for default, linear, llama3, YaRN and LongRoPE.

Follows the HF convention (``rotate_half`` over the two halves of the rotated part of each head),
which is how HF checkpoints' q/k weights are laid out. GGUF llama weights are permuted back on read.
With a partial rotary factor only the first ``dim`` channels of a head rotate; the rest pass through.

LongRoPE (Phi-3/Phi-4) has two sets of per-frequency factors: a forward whose sequence (tokens
already cached + new ones) is longer than ``original_max_position_embeddings`` uses the long set,
any other the short one, as transformers chooses per forward; keys already cached are not re-rotated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError


@dataclass(frozen=True)
class Rope:
    """A model's rotary embedding: ``dim`` rotated channels per head, base ``theta``, HF scaling dict."""

    dim: int
    theta: float
    scaling: dict | None = None

    @classmethod
    def for_spec(cls, spec) -> "Rope":
        return cls(spec.rotary_dim, spec.rope_theta, spec.rope_scaling)

    @property
    def switch(self) -> int | None:
        """LongRoPE's original context: a forward whose sequence is longer uses the long factors."""
        if (self.scaling or {}).get("rope_type") != "longrope":
            return None
        return int(self.scaling["original_max_position_embeddings"])

    def tables(self, positions, total: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin [len(positions), dim/2] (float32) for one forward over ``positions``, whose
        sequence is ``total`` long (default: the last position + 1)."""
        positions = np.asarray(positions)
        if total is None:
            total = int(positions.max()) + 1 if positions.size else 0
        return self.table(positions, long=self.switch is not None and total > self.switch)

    def table(self, positions, long: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin for ``positions`` with LongRoPE's short (or ``long``) factors; other types
        have one set."""
        freq, attention_factor = inv_freq(self.dim, self.theta, self.scaling, long=long)
        angles = np.outer(np.asarray(positions, dtype=np.float64), freq)
        return ((np.cos(angles) * attention_factor).astype(np.float32),
                (np.sin(angles) * attention_factor).astype(np.float32))


def inv_freq(head_dim: int, theta: float, scaling: dict | None, long: bool = False) -> tuple[np.ndarray, float]:
    """Return (inverse frequencies [head_dim/2] float64, attention factor applied to cos/sin).
    ``head_dim`` is the rotated width; ``long`` picks LongRoPE's long factors."""
    base = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return base, 1.0
    if kind == "linear":
        return base / float(scaling["factor"]), 1.0
    if kind == "llama3":
        return _llama3(base, scaling), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling)
    if kind == "longrope":
        factors = np.asarray(scaling["long_factor" if long else "short_factor"], dtype=np.float64)
        return base / factors, float(scaling["attention_factor"])
    raise ConfigError(f"rope_scaling type '{kind}' is not supported (default, linear, llama3, yarn, longrope)")


def _llama3(freq: np.ndarray, s: dict) -> np.ndarray:
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / freq
    scaled = np.where(wavelen > low_wavelen, freq / factor, freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def _yarn(dim: int, theta: float, s: dict) -> tuple[np.ndarray, float]:
    """transformers' YaRN: frequencies ramped between interpolation and extrapolation, and an
    attention factor on cos/sin (from ``attention_factor``, or ``mscale``/``mscale_all_dim``)."""
    factor = float(s["factor"])
    old_ctx = float(s.get("original_max_position_embeddings", 4096))
    beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else _yarn_mscale(factor))

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp
    pos_freqs = theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return freq, float(attention_factor)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction, 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def full_width(cos: np.ndarray, sin: np.ndarray, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """[T, head_dim] tables for graphs that rotate with elementwise ops: rope(x) = x * cos_full +
    swapped(x) * sin_signed, where swapped exchanges the two halves of the rotated channels and
    keeps the rest; cos_full = [cos, cos, 1...], sin_signed = [-sin, sin, 0...]."""
    rest = head_dim - 2 * cos.shape[-1]
    ones, zeros = np.ones((cos.shape[0], rest), cos.dtype), np.zeros((cos.shape[0], rest), sin.dtype)
    return np.concatenate([cos, cos, ones], axis=-1), np.concatenate([-sin, sin, zeros], axis=-1)


def apply(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate the first 2 * cos.shape[-1] channels of x [..., T, head_dim] by cos/sin [T, dim/2]
    (rotate_half convention); the channels after them pass through."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
