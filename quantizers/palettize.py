"""4-bit palettization: one 16-entry float16 lookup table per group of output rows, by k-means.

A weight W float [N out, K in] is cut into ``N / rows_per_lut`` groups of consecutive rows; each
group's ``rows_per_lut * K`` values are clustered into 16 centroids by one-dimensional k-means
(Lloyd's algorithm, deterministic: a fixed number of iterations from each of three fixed starts,
the group's quantiles, evenly spaced values and their mean, keeping the start that ends lowest), the centroids rounded to float16 (what the table stores), and every weight
replaced by the index 0..15 of its nearest float16 centroid. Tables are sorted ascending, so an
index orders like the value it stands for.

This is what Core ML's iOS 18 ``constexpr_lut_to_dense`` stores for per-grouped-channel scalar
palettization along axis 0 (coremltools 9, ops/defs/iOS18/compression.py):

    indices  uint4 [N, K]           (stored two a byte, first in the low nibble)
    lut      fp16  [N / rows, 1, 16, 1]   (K+2 = 4 dims: one table per block of ``rows`` rows
                                           over all K columns, 16 palettes, VECTOR_SIZE 1)
    output   fp16  [N, K],  output[n, k] = lut[n // rows, 0, indices[n, k], 0]

1-D k-means works on the sorted values: a cluster is then a contiguous run, its boundaries are
the midpoints between neighbouring centroids, and its mean comes from prefix sums; one iteration
is a ``searchsorted`` of 15 boundaries per group, so every group of a tensor iterates at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .dispatch import register_handler
from .errors import QuantizationError
from .schemes import Int4LutConfig

PALETTE = 16  # 2**4 entries: indices are uint4
GROUP_ELEMENTS = 1 << 22  # values sorted at once (a few groups of a 7B MLP matrix): bounds the memory


@dataclass(frozen=True, eq=False)
class PalettizedTensor:
    """A linear weight W [N, K] as 4-bit indices into per-row-group tables.

    - ``indices``: uint8 [N, K], values 0..15.
    - ``tables``: float16 [N // rows_per_lut, 16], each sorted ascending.
    - ``rows_per_lut``: consecutive output rows sharing a table.
    - ``scheme``: the config's ``to_dict()``, recorded in the manifest.

    Dequantized, ``W[n, k] = tables[n // rows_per_lut, indices[n, k]]``.
    """
    indices: np.ndarray
    tables: np.ndarray
    rows_per_lut: int
    shape: tuple[int, int]
    scheme: dict[str, Any]

    bits = 4
    input_scale = None  # nothing to fold: the codes are of W itself

    def __post_init__(self) -> None:
        n, k = self.shape
        if self.indices.shape != (n, k) or n % self.rows_per_lut:
            raise QuantizationError(f"indices {self.indices.shape} do not fit shape {self.shape} / "
                                    f"{self.rows_per_lut} rows per table")
        if self.tables.shape != (n // self.rows_per_lut, PALETTE) or self.tables.dtype != np.float16:
            raise QuantizationError(f"tables {self.tables.shape} {self.tables.dtype} should be float16 "
                                    f"{(n // self.rows_per_lut, PALETTE)}")

    def dequantize(self) -> np.ndarray:
        """float32 [N, K]: each index looked up in its row group's table."""
        n, k = self.shape
        groups = self.indices.reshape(n // self.rows_per_lut, self.rows_per_lut * k)
        values = np.take_along_axis(self.tables.astype(np.float32), groups.astype(np.intp), axis=1)
        return values.reshape(n, k)

    def effective_weight(self) -> np.ndarray:
        return self.dequantize()

    def coreml_lut(self) -> tuple[np.ndarray, np.ndarray]:
        """(indices uint8 [N, K] 0..15, lut float16 [N / rows_per_lut, 1, 16, 1]): the two inputs
        of Core ML's iOS 18 constexpr_lut_to_dense for these weights (indices to be stored as uint4)."""
        return self.indices, self.tables.reshape(-1, 1, PALETTE, 1)

    def rows(self, rows: slice) -> "PalettizedTensor":
        """Rows ``rows`` (start and stop multiples of rows_per_lut) with their tables."""
        start, stop, _ = rows.indices(self.shape[0])
        if start % self.rows_per_lut or stop % self.rows_per_lut:
            raise QuantizationError(f"rows {start}:{stop} cut a group of {self.rows_per_lut} rows sharing a table")
        r = self.rows_per_lut
        return PalettizedTensor(self.indices[start:stop], self.tables[start // r:stop // r], r,
                                (stop - start, self.shape[1]), self.scheme)

    @staticmethod
    def concat(parts: list["PalettizedTensor"]) -> "PalettizedTensor":
        """Row blocks of one tensor, in order, as one tensor."""
        first = parts[0]
        return PalettizedTensor(np.concatenate([p.indices for p in parts]), np.concatenate([p.tables for p in parts]),
                                first.rows_per_lut, (sum(p.shape[0] for p in parts), first.shape[1]), first.scheme)


def palettize(weight: np.ndarray, rows_per_lut: int = 16, iterations: int = 100,
              scheme: dict[str, Any] | None = None, name: str = "") -> PalettizedTensor:
    """Palettize float W [N, K] (N a multiple of ``rows_per_lut``) to 4-bit indices and one float16
    table of 16 per ``rows_per_lut`` rows; ``iterations`` Lloyd steps of 1-D k-means per table."""
    w = np.asarray(weight, np.float32)
    n, k = w.shape
    if n % rows_per_lut:
        raise QuantizationError(f"tensor {name or '<unnamed>'}: {n} output rows are not a multiple of "
                                f"rows_per_lut={rows_per_lut}; keep it wider with a rule, or use --method rtn")
    step = rows_per_lut * max(1, GROUP_ELEMENTS // (rows_per_lut * k))
    indices, tables = [], []
    for start in range(0, n, step):
        block = w[start:start + step].reshape(-1, rows_per_lut * k)
        i, t = _palettize_groups(block, iterations)
        indices.append(i.reshape(-1, k))
        tables.append(t)
    if scheme is None:
        scheme = Int4LutConfig(rows_per_lut=rows_per_lut, iterations=iterations).to_dict()
    return PalettizedTensor(np.concatenate(indices), np.concatenate(tables), rows_per_lut, (n, k), scheme)


def _palettize_groups(values: np.ndarray, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """k-means of each row of ``values`` [G, M] into 16: (indices uint8 [G, M], tables float16 [G, 16])."""
    g, m = values.shape
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=1).astype(np.float64)
    prefix = np.concatenate([np.zeros((g, 1)), np.cumsum(ordered, axis=1)], axis=1)  # [G, M+1]
    squares = np.concatenate([np.zeros((g, 1)), np.cumsum(ordered * ordered, axis=1)], axis=1)
    keys = _row_keys(ordered)
    best, best_error = None, None
    for start in _starts(ordered):
        centroids, error = _lloyd(keys, ordered, prefix, squares, start, iterations)
        if best is None:
            best, best_error = centroids, error
        else:
            better = error < best_error
            best = np.where(better[:, None], centroids, best)
            best_error = np.minimum(error, best_error)
    centroids = best
    tables = np.sort(centroids.astype(np.float16), axis=1)
    # indices against the float16 table the package stores: nearest stored value, not the float64 mean
    edges = _edges(keys, ordered, tables.astype(np.float64))
    labels_sorted = np.zeros((g, m + 1), np.int32)
    np.add.at(labels_sorted, (np.repeat(np.arange(g), PALETTE - 1), edges[:, 1:-1].reshape(-1)), 1)
    labels_sorted = np.cumsum(labels_sorted, axis=1)[:, :m].astype(np.uint8)
    indices = np.empty((g, m), np.uint8)
    np.put_along_axis(indices, order, labels_sorted, axis=1)
    return indices, tables


def _starts(ordered: np.ndarray) -> list[np.ndarray]:
    """Deterministic starting centroids [G, 16], each run and the best kept per group: the quantiles
    (centres of 16 equal-count runs; they crowd the dense middle), evenly spaced between min and max
    (they reach the outliers that real weights have and Lloyd cannot move a quantile start out to),
    and their mean."""
    g, m = ordered.shape
    quantiles = ordered[:, ((np.arange(PALETTE) + 0.5) * m / PALETTE).astype(np.intp)]
    low, high = ordered[:, :1], ordered[:, -1:]
    even = low + (high - low) * (np.arange(PALETTE) + 0.5) / PALETTE
    return [quantiles, even, (quantiles + even) / 2]


def _lloyd(keys, ordered, prefix, squares, centroids, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """``iterations`` Lloyd steps from ``centroids`` [G, 16]: (centroids, each group's squared error)."""
    rows = np.arange(len(ordered))[:, None]
    for _ in range(iterations):
        edges = _edges(keys, ordered, centroids)  # [G, 17]: cluster c holds sorted positions edges[c]:edges[c+1]
        counts = np.diff(edges, axis=1)
        sums = prefix[rows, edges[:, 1:]] - prefix[rows, edges[:, :-1]]
        centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)  # an empty one stays put
    edges = _edges(keys, ordered, centroids)
    counts = np.diff(edges, axis=1)
    sums = prefix[rows, edges[:, 1:]] - prefix[rows, edges[:, :-1]]
    sq = squares[rows, edges[:, 1:]] - squares[rows, edges[:, :-1]]
    c = np.sort(centroids, axis=1)  # _edges' clusters are of the sorted centroids
    error = (sq - 2 * c * sums + counts * c * c).sum(axis=1)
    return c, error


def _row_keys(ordered: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Each row's sorted values mapped into [2r, 2r + 1] (r: the row): one ascending array, so one
    ``searchsorted`` places every row's boundaries at once; with each row's (low, span) mapping."""
    low, high = ordered[:, :1], ordered[:, -1:]
    span = np.where(high > low, high - low, 1.0)
    return ((ordered - low) / span + 2 * np.arange(len(ordered))[:, None]).reshape(-1), (low, span)


def _edges(keys, ordered: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Sorted positions where each row's 16 clusters begin and end, [G, 17]: the midpoints between
    neighbouring centroids (sorted first), located among the row's sorted values."""
    flat, (low, span) = keys
    g, m = ordered.shape
    c = np.sort(centroids, axis=1)
    bounds = (c[:, 1:] + c[:, :-1]) / 2  # a value equal to a boundary goes to the upper cluster
    mapped = np.clip((bounds - low) / span, -0.5, 1.5) + 2 * np.arange(g)[:, None]
    inner = np.searchsorted(flat, mapped.reshape(-1), side="left").reshape(g, PALETTE - 1) - np.arange(g)[:, None] * m
    inner = np.clip(inner, 0, m)
    return np.concatenate([np.zeros((g, 1), np.intp), inner, np.full((g, 1), m, np.intp)], axis=1)


@register_handler("int4_lut", "palettize")
def quantize_palettize(w: np.ndarray, config: Int4LutConfig, name: str, stats=None) -> PalettizedTensor:
    return palettize(w, config.rows_per_lut, config.iterations, scheme=config.to_dict(), name=name)
