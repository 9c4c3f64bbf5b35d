"""Rotary position embeddings: inverse frequencies for default, linear, llama3 and YaRN scaling.

Follows the HF convention (``rotate_half`` over the two halves of each head), which is how HF
checkpoints' q/k weights are laid out. GGUF llama weights are permuted back on read.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import ConfigError


def inv_freq(head_dim: int, theta: float, scaling: dict | None) -> tuple[np.ndarray, float]:
    """Return (inverse frequencies [head_dim/2] float64, attention factor applied to cos/sin)."""
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
    raise ConfigError(f"rope_scaling type '{kind}' is not supported (default, linear, llama3, yarn)")


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


def cos_sin(head_dim: int, theta: float, scaling: dict | None, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables [len(positions), head_dim/2] (float32) for the given positions."""
    freq, attention_factor = inv_freq(head_dim, theta, scaling)
    angles = np.outer(np.asarray(positions, dtype=np.float64), freq)
    return ((np.cos(angles) * attention_factor).astype(np.float32),
            (np.sin(angles) * attention_factor).astype(np.float32))


def apply(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate x [..., T, head_dim] by cos/sin [T, head_dim/2] (rotate_half convention)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
