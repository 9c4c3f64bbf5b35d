"""GPTQ (Frantar et al., 2022): quantize one input column at a time and push its rounding error
onto the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

H = 2 X^T X / n + damp * mean(diag H) * I. Columns go in blocks of 128: inside a block each
column's error updates the rest of the block (rank-1, on a [rows, N] slab), and the block's
errors update every later column in one matmul ("lazy batch" updates).

Groups: without act_order a group's scale/zero point is computed when quantization enters the
group, from the already error-compensated weights (the reference implementation). With
act_order (columns in order of decreasing diag H) the groups are static: computed from the
original weight before reordering, so group j still covers inputs j*g..(j+1)*g-1 and the packed
layout is the same as RTN's (no g_idx tensor for a runtime to honour).
"""
from __future__ import annotations

import numpy as np

from .dispatch import register_handler
from .errors import QuantizationError
from .int4 import decode, make_tensor, quantize_to_codes, search_params
from .schemes import Int4Config, check_divides
from .tensor import QuantizedTensor

BLOCK = 128  # columns per lazy-batch block; a multiple of every supported group size


def inverse_hessian_factor(h: np.ndarray, name: str = "") -> np.ndarray:
    """Upper-triangular U float64 [K, K] with H^-1 = U^T U.

    With the index-reversal permutation P and P H P = L L^T (Cholesky), U = P L^-1 P: one
    Cholesky and one triangular inverse instead of inverting H and factoring the inverse.
    """
    reverse = slice(None, None, -1)
    try:
        lower = np.linalg.cholesky(h[reverse, reverse])
    except np.linalg.LinAlgError as exc:
        raise QuantizationError(f"tensor {name or '<unnamed>'}: the GPTQ Hessian is not positive definite; "
                                "raise damp (e.g. 0.1) or calibrate on more tokens") from exc
    return _invert_lower(lower)[reverse, reverse]


def _invert_lower(lower: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular matrix by 2x2 blocks, [[A, 0], [C, D]]^-1 =
    [[A^-1, 0], [-D^-1 C A^-1, D^-1]]: matmuls only, about 3x faster than np.linalg.inv's LU
    (numpy has no trtri) — 10 s instead of 28 s for down_proj's K = 8960 on 2 cores."""
    k = len(lower)
    if k <= 512:
        return np.linalg.inv(lower)
    h = k // 2
    result = np.zeros_like(lower)
    result[:h, :h] = _invert_lower(lower[:h, :h])
    result[h:, h:] = _invert_lower(lower[h:, h:])
    result[h:, :h] = -result[h:, h:] @ (lower[h:, :h] @ result[:h, :h])
    return result


def gptq(w: np.ndarray, hessian: np.ndarray, config: Int4Config, name: str = "", overwrite_hessian: bool = False
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W float32 [N, K], H float [K, K] -> (codes uint8 [N, K], scales float32 [N, K/g], zeros uint8 [N, K/g]).

    ``overwrite_hessian`` lets a float64 H be modified in place: for K = 8960 every copy is 642 MB."""
    n, k = w.shape
    g = config.group_size
    check_divides(k, g, name)
    if hessian.shape != (k, k):
        raise QuantizationError(f"tensor {name or '<unnamed>'}: Hessian {hessian.shape} does not match K={k}")
    writable = overwrite_hessian and hessian.dtype == np.float64 and hessian.flags.writeable
    h = hessian if writable else np.array(hessian, np.float64)
    del hessian
    wt = np.array(w.T, np.float32, order="C")  # [K, N]: input column k of W is row k here, contiguous
    dead = np.diag(h) == 0  # inputs never active in calibration: weight irrelevant, zero it
    h[dead, dead] = 1.0
    wt[dead] = 0.0
    static = None
    perm = np.arange(k)
    if config.act_order:
        static = search_params(wt.T.reshape(n, k // g, g), config.symmetric, config.clip_search)
        perm = np.argsort(-np.diag(h), kind="stable")
        wt, h = wt[perm], h[np.ix_(perm, perm)]
    h[np.diag_indices(k)] += config.damp * np.mean(np.diag(h))
    u = inverse_hessian_factor(h, name).astype(np.float32)
    del h
    codes = np.empty((k, n), np.uint8)
    scales = np.empty((k // g, n), np.float32)
    zeros = np.empty((k // g, n), np.uint8)
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        errors = _quantize_block(wt, u, i1, i2, g, config, static, perm, codes, scales, zeros)
        wt[i2:] -= u[i1:i2, i2:].T @ errors  # lazy batch: this block's errors on all later columns
    codes = codes[np.argsort(perm)].T  # back to the original input order, [N, K]
    if static is not None:
        return np.ascontiguousarray(codes), static[0], static[1]
    return np.ascontiguousarray(codes), np.ascontiguousarray(scales.T), np.ascontiguousarray(zeros.T)


def _quantize_block(wt, u, i1, i2, g, config, static, perm, codes, scales, zeros) -> np.ndarray:
    """Quantize input columns i1..i2-1 (rows of ``wt``, updated in place); returns the scaled
    errors [i2 - i1, N] that the caller propagates to later columns."""
    block, u_block = wt[i1:i2], u[i1:i2, i1:i2]
    errors = np.empty_like(block)
    for i in range(i2 - i1):
        col = i1 + i
        if static is not None:
            group = perm[col] // g
            scale, zero = static[0][:, group], static[1][:, group]
        else:
            if col % g == 0:  # entering a group: its parameters from the compensated weights
                scales[col // g], zeros[col // g] = search_params(block[i:i + g].T, config.symmetric,
                                                                 config.clip_search)
            scale, zero = scales[col // g], zeros[col // g]
        column = block[i]
        q = quantize_to_codes(column[:, None], scale, zero)[:, 0]
        codes[col] = q
        errors[i] = (column - decode(q[:, None], scale, zero)[:, 0]) / u_block[i, i]
        block[i + 1:] -= np.outer(u_block[i, i + 1:], errors[i])
    return errors


@register_handler("int4", "gptq")
def quantize_gptq(w: np.ndarray, config: Int4Config, name: str, stats=None) -> QuantizedTensor:
    if stats is None:
        raise QuantizationError(f"tensor {name or '<unnamed>'}: method 'gptq' needs calibration stats "
                                "of the layer's input (quantize(..., stats=Stats)); or use method 'rtn'")
    return make_tensor(*gptq(w, stats.hessian(), config, name, overwrite_hessian=True), config)
