"""Calibration statistics of one linear layer's input, accumulated batch by batch."""
from __future__ import annotations

import numpy as np

from .errors import QuantizationError


class Stats:
    """Running statistics of the activations X [T tokens, K] that feed a linear layer.

    - ``mean_abs`` [K] float64: mean |x| per input channel (AWQ's salience).
    - ``abs_max`` [K] float64: max |x| per input channel (fp8 activation scales).
    - ``xtx`` [K, K] float64: sum of x^T x (GPTQ's Hessian is ``hessian() = 2 xtx / n``); its
      memory is 8*K*K bytes (640 MB for K = 8960), so pass ``keep_xtx=False`` when only AWQ runs.
    - ``sample`` [<= sample_rows, K] float32: a uniform reservoir sample of rows (AWQ's loss).
    """

    def __init__(self, k: int, sample_rows: int = 512, keep_xtx: bool = True, seed: int = 0):
        self.k = k
        self.n = 0
        self.sum_abs = np.zeros(k, np.float64)
        self.abs_max = np.zeros(k, np.float64)
        self.xtx = np.zeros((k, k), np.float64) if keep_xtx else None
        self.sample_rows = sample_rows
        self._sample = np.empty((sample_rows, k), np.float32)
        self._rng = np.random.default_rng(seed)

    def update(self, x: np.ndarray) -> None:
        """Add a batch of rows x [..., K] (leading dims are flattened into tokens)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 0 or x.shape[-1] != self.k:
            raise QuantizationError(f"calibration activations of shape {x.shape} do not end in K={self.k}")
        x = x.reshape(-1, self.k)
        if not np.isfinite(x).all():
            raise QuantizationError("calibration activations contain NaN/Inf")
        a = np.abs(x)
        self.sum_abs += a.sum(0, dtype=np.float64)
        self.abs_max = np.maximum(self.abs_max, a.max(0, initial=0.0))
        if self.xtx is not None:  # float32 product per batch (2-3x faster), float64 running sum
            self.xtx += (x.T @ x).astype(np.float64)
        self._reservoir(x)
        self.n += len(x)

    def _reservoir(self, x: np.ndarray) -> None:
        # Algorithm R: row number t (0-based, over all rows seen) lands in slot t while the
        # reservoir fills, later in a random slot j <= t when j < capacity; later rows win.
        t = self.n + np.arange(len(x))
        slot = np.where(t < self.sample_rows, t, self._rng.integers(0, t + 1))
        keep = slot < self.sample_rows
        rows, slots = np.nonzero(keep)[0], slot[keep]
        _, last = np.unique(slots[::-1], return_index=True)  # the last write to each slot wins
        chosen = rows[::-1][last]
        self._sample[slots[::-1][last]] = x[chosen]

    @property
    def mean_abs(self) -> np.ndarray:
        self._require_data()
        return self.sum_abs / self.n

    @property
    def sample(self) -> np.ndarray:
        self._require_data()
        return self._sample[: min(self.n, self.sample_rows)]

    def hessian(self) -> np.ndarray:
        """GPTQ's H = 2 X^T X / n, float64 [K, K]."""
        self._require_data()
        if self.xtx is None:
            raise QuantizationError("these Stats were built with keep_xtx=False; GPTQ needs X^T X")
        return self.xtx * (2.0 / self.n)  # a new array: the caller may overwrite it

    def _require_data(self) -> None:
        if self.n == 0:
            raise QuantizationError("calibration Stats are empty: call update() with activations first")

    @classmethod
    def from_activations(cls, x: np.ndarray, sample_rows: int = 512, keep_xtx: bool = True,
                         seed: int = 0) -> "Stats":
        """Stats over one array of activations [..., K] (convenience for tests and small runs)."""
        x = np.asarray(x, dtype=np.float32)
        stats = cls(x.shape[-1], sample_rows, keep_xtx, seed)
        stats.update(x)
        return stats
