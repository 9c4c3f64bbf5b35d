"""QuantizedTensor: the one object every method returns and every packer consumes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .e4m3 import decode_e4m3fn
from .errors import QuantizationError


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A linear weight W [N out_features, K in_features] as codes, scales and zero points.

    Groups run along K: group ``j`` of row ``n`` is ``W[n, j*g:(j+1)*g]`` with ``g = group_size``
    (``group_size == K`` for one scale per row). Dequantized,
    ``W[n, k] = (code - zero_point) * scale (+ residual)`` over the code's group, where

    - ``q``: codes [N, K] unpacked. int4: uint8 0..15; int8: int8 -127..127 (-128 in a GGUF
      Q8_0 block); fp8: uint8 E4M3FN bit patterns (``scheme["scheme"] == "fp8"``).
    - ``scales``: float32 [N, K // g] (or [1, 1]: one scale for the whole tensor, fp8 only).
      Always > 0 for what this package quantizes; GGUF Q4_0 / Q6_K / Q3_K / IQ4 blocks may carry negative scales.
    - ``zero_points``: uint8 [N, K // g], or None for the implied one (8 for int4, 0 otherwise).
    - ``residual``: float32 [N, K // g] added after scaling, or None. Only GGUF blocks with a
      minimum need it (Q4_1 / Q4_K: w = d*q + m = d*(q - z) + r with integer z; Q5_1 / Q5_K /
      Q2_K: r = m beside int8 codes), so their blocks are carried exactly.
    - ``input_scale``: float32 [K] from AWQ, or None. The codes quantize ``W * input_scale``:
      the layer's input must be divided by it (fold 1/s into the preceding RMSNorm weight or
      up_proj rows, or an explicit Mul); :meth:`effective_weight` is the weight to use on the
      *original* input.
    - ``activation_scale``: float32 per-tensor activation scale (fp8 ``activation_scales``), or None.
    - ``scheme``: the config's ``to_dict()``, recorded in the artifact's manifest.
    """
    q: np.ndarray
    scales: np.ndarray
    zero_points: Optional[np.ndarray]
    bits: int
    group_size: int
    shape: tuple[int, int]
    scheme: dict[str, Any]
    residual: Optional[np.ndarray] = None
    input_scale: Optional[np.ndarray] = None
    activation_scale: Optional[float] = None

    def __post_init__(self) -> None:
        n, k = self.shape
        if self.q.shape != (n, k) or k % self.group_size:
            raise QuantizationError(f"codes {self.q.shape} do not fit shape {self.shape} / group {self.group_size}")
        grouped = (n, k // self.group_size)
        if self.scales.shape not in (grouped, (1, 1)):
            raise QuantizationError(f"scales {self.scales.shape} should be {grouped}")
        for field in ("zero_points", "residual"):
            value = getattr(self, field)
            if value is not None and value.shape != grouped:
                raise QuantizationError(f"{field} {value.shape} should be {grouped}")
        if self.input_scale is not None and self.input_scale.shape != (k,):
            raise QuantizationError(f"input_scale {self.input_scale.shape} should be ({k},)")

    @property
    def is_float8(self) -> bool:
        return self.scheme.get("scheme") == "fp8"

    @property
    def code_type(self) -> str:
        """What ``q`` holds: ``"uint4"``, ``"int8"``, ``"uint8"`` or ``"float8e4m3fn"``."""
        if self.is_float8:
            return "float8e4m3fn"
        return "uint4" if self.bits == 4 else str(self.q.dtype)

    @property
    def implied_zero_point(self) -> int:
        """Zero point when ``zero_points`` is None: 8 for uint4 codes, 0 for int8 and fp8."""
        return 8 if self.bits == 4 else 0

    def dequantize(self) -> np.ndarray:
        """float32 [N, K]: what the stored codes mean, i.e. what every packer's layout decodes to."""
        n, k = self.shape
        groups = k // self.group_size
        codes = decode_e4m3fn(self.q) if self.is_float8 else self.q.astype(np.float32)
        codes = codes.reshape(n, groups, self.group_size)
        if self.zero_points is None:
            centered = codes - np.float32(self.implied_zero_point)
        else:
            centered = codes - self.zero_points.astype(np.float32)[:, :, None]
        w = centered * self.scales[:, :, None]
        if self.residual is not None:
            w = w + self.residual[:, :, None]
        return w.reshape(n, k).astype(np.float32, copy=False)

    def rows(self, rows: slice) -> "QuantizedTensor":
        """Output rows ``rows`` with their scales (a whole-tensor fp8 scale is shared): lets a
        consumer dequantize a 150k-row head a block at a time instead of whole in float32."""
        start, stop, _ = rows.indices(self.shape[0])
        def cut(a):
            return None if a is None else a[start:stop]
        scales = self.scales if self.scales.shape == (1, 1) else self.scales[start:stop]
        return dataclasses.replace(self, q=self.q[start:stop], scales=scales, zero_points=cut(self.zero_points),
                                   residual=cut(self.residual), shape=(stop - start, self.shape[1]))

    def effective_weight(self) -> np.ndarray:
        """float32 [N, K] to multiply the layer's original input with: ``dequantize() / input_scale``."""
        w = self.dequantize()
        return w if self.input_scale is None else w / self.input_scale[None, :]

    def scale_rows(self, factor: np.ndarray) -> "QuantizedTensor":
        """The same codes with output row n multiplied by ``factor[n]`` (float [N]): folds a
        following per-channel scale (e.g. AWQ's 1/s of the next layer) into this tensor without
        requantizing it (one float32 rounding per scale)."""
        factor = np.asarray(factor, np.float32).reshape(-1, 1)
        if factor.shape[0] != self.shape[0] or self.scales.shape[0] != self.shape[0]:
            raise QuantizationError(f"cannot scale the {self.shape[0]} rows of a tensor with scales "
                                    f"{self.scales.shape} by {factor.shape[0]} factors")
        residual = None if self.residual is None else self.residual * factor
        return dataclasses.replace(self, scales=self.scales * factor, residual=residual)
