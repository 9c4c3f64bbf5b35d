"""Packers: a QuantizedTensor in the exact layout each target's kernel reads, and back.

- onnxruntime ``com.microsoft.MatMulNBits`` (4 and 8 bits): :func:`pack_matmulnbits`.
- ONNX ``DequantizeLinear`` (opset 21 blocked INT4/UINT4, per-axis INT8, float8e4m3fn from
  opset 19): :func:`pack_dequantizelinear`, :func:`make_tensor_proto`.
- Core ML iOS 18 ``constexpr_blockwise_shift_scale``: :func:`pack_coreml_blockwise`.

Each ``unpack_*`` inverts its packer exactly (``unpack(pack(qt)).dequantize() == qt.dequantize()``
bit for bit), which is what the tests hold the layouts to. Nothing here imports onnx or
coremltools except :func:`make_tensor_proto`, lazily.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .errors import QuantizationError
from .tensor import QuantizedTensor

MATMULNBITS_BLOCKS = (16, 32, 64, 128)  # powers of two >= 16, as MatMulNBits requires


def _nibbles_to_bytes(values: np.ndarray) -> np.ndarray:
    """uint8 [..., 2m] of 4-bit values -> [..., m] bytes, element 2j in the low nibble."""
    return (values[..., 0::2] & 0x0F) | (values[..., 1::2] << 4)


def _bytes_to_nibbles(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_nibbles_to_bytes`: uint8 [..., m] -> [..., 2m]."""
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def _default_scheme(bits: int, group_size: int, symmetric: bool) -> dict[str, Any]:
    if bits == 4:
        return {"scheme": "int4", "group_size": group_size, "symmetric": symmetric, "method": "keep"}
    return {"scheme": "int8", "group_size": group_size}


# ---- onnxruntime MatMulNBits -------------------------------------------------------------

def matmulnbits_block_size(qt: QuantizedTensor) -> int:
    """The group size if MatMulNBits accepts it, else the largest accepted block that splits a
    group (per-row int8 over K = 1536 -> block 128, its scale repeated over 12 blocks)."""
    fits = [b for b in MATMULNBITS_BLOCKS if qt.group_size % b == 0]
    if not fits:
        raise QuantizationError(f"group size {qt.group_size} cannot be split into MatMulNBits blocks "
                                f"{MATMULNBITS_BLOCKS}; K must be a multiple of 16")
    return max(fits)


def pack_matmulnbits(qt: QuantizedTensor) -> dict[str, Any]:
    """QuantizedTensor (int4 or int8) -> MatMulNBits inputs and attributes.

    Returns ``B`` uint8 [N, n_blocks, block_size * bits / 8] (4 bits: input k = 2j in the low
    nibble of byte j), ``scales`` float32 [N * n_blocks] (row-major over N), ``zero_points``
    (None means MatMulNBits' default 2**(bits-1); 4 bits: uint8 [N * ceil(n_blocks / 2)], two
    blocks per byte, low nibble first; 8 bits: uint8 [N * n_blocks]; 4-bit GGUF residuals (Q4_1, Q4_K):
    float32 [N * n_blocks] zero points z - r/d — exact, but onnxruntime's CPU kernel runs float
    zero points on a slow path, so a caller may drop the residual and add it beside), and
    ``K``, ``N``, ``bits``, ``block_size``.
    """
    if qt.code_type not in ("uint4", "int8", "uint8"):
        raise QuantizationError(f"MatMulNBits holds int4/int8 weights, not {qt.code_type}")
    n, k = qt.shape
    block = matmulnbits_block_size(qt)
    repeat, blocks = qt.group_size // block, k // block
    scales = np.repeat(qt.scales, repeat, axis=1)
    zeros = None if qt.zero_points is None else np.repeat(qt.zero_points, repeat, axis=1)
    codes = qt.q.reshape(n, blocks, block)
    if qt.bits == 4:
        packed = _nibbles_to_bytes(codes)
        if qt.residual is not None:
            scales, zeros = _float_zero_points(scales, zeros, np.repeat(qt.residual, repeat, axis=1))
        elif zeros is not None:
            zeros = _nibbles_to_bytes(np.pad(zeros, ((0, 0), (0, blocks % 2))))
    elif qt.residual is not None:
        raise QuantizationError("8-bit MatMulNBits has no float zero points for a GGUF minimum (Q5_1, Q5_K, Q2_K): "
                                "pack the codes without the residual and add it beside (block sums of x @ r.T)")
    else:  # int8 codes -128..127 become 0..255 around MatMulNBits' default zero point 128
        packed = (codes.astype(np.int16) + 128).astype(np.uint8) if qt.code_type == "int8" else codes
    return {"B": np.ascontiguousarray(packed), "scales": scales.astype(np.float32).reshape(-1),
            "zero_points": None if zeros is None else zeros.reshape(-1), "K": k, "N": n,
            "bits": qt.bits, "block_size": block}


def _float_zero_points(scales: np.ndarray, zeros: np.ndarray, residual: np.ndarray):
    """d*(q - z) + r == (q - (z - r/d)) * d: Q4_1's residual as a float zero point. A constant
    block (d = 0, codes 0) becomes scale 1 with zero point -r."""
    constant = scales == 0
    safe = np.where(constant, 1.0, scales).astype(np.float32)
    zero_f = np.where(constant, -residual, zeros - residual / safe).astype(np.float32)
    return safe, zero_f


def unpack_matmulnbits(B: np.ndarray, scales: np.ndarray, zero_points: Optional[np.ndarray], K: int, N: int,
                       bits: int, block_size: int, scheme: Optional[dict] = None) -> QuantizedTensor:
    """Inverse of :func:`pack_matmulnbits` (group size = block size)."""
    blocks = K // block_size
    scales = np.asarray(scales, np.float32).reshape(N, blocks)
    zeros, residual = None, None
    if bits == 4:
        codes = _bytes_to_nibbles(np.asarray(B, np.uint8)).reshape(N, K)
        if zero_points is not None and np.asarray(zero_points).dtype.kind == "f":
            zero_f = np.asarray(zero_points, np.float32).reshape(N, blocks)
            zeros = np.clip(np.round(zero_f), 0, 15).astype(np.uint8)
            residual = (zeros - zero_f) * scales
        elif zero_points is not None:
            zeros = _bytes_to_nibbles(np.asarray(zero_points, np.uint8).reshape(N, -1))[:, :blocks]
    else:
        codes = np.asarray(B, np.uint8).reshape(N, K)
        if zero_points is None:
            codes = (codes.astype(np.int16) - 128).astype(np.int8)
        else:
            zeros = np.asarray(zero_points, np.uint8).reshape(N, blocks)
    return QuantizedTensor(q=codes, scales=scales, zero_points=zeros, bits=bits, group_size=block_size,
                           shape=(N, K), residual=residual,
                           scheme=scheme or _default_scheme(bits, block_size, zero_points is None))


# ---- codes as a standard (data, scale, zero point) triple: ONNX DQ and Core ML ------------

_PORTABLE_TYPES = {"uint4": ("INT4", "UINT4"), "int8": ("INT8", None), "uint8": ("UINT8", "UINT8"),
                   "float8e4m3fn": ("FLOAT8E4M3FN", None)}


def _portable(qt: QuantizedTensor, target: str) -> tuple[np.ndarray, str, Optional[np.ndarray]]:
    """(data [N, K], type name, zero point [N, G] or None): symmetric int4 becomes signed INT4
    (code - 8) with no zero point, the form TensorRT and Core ML take without an offset."""
    if qt.residual is not None:
        raise QuantizationError(f"{target} packing takes integer zero points, and a GGUF Q4_1 residual needs a "
                                "float offset: use the MatMulNBits layout (block sums beside it), the coreml "
                                "target's fp16 offsets, or dequantize and requantize the tensor")
    if qt.code_type not in _PORTABLE_TYPES:
        raise QuantizationError(f"{target} cannot hold {qt.code_type} codes")
    signed_type, offset_type = _PORTABLE_TYPES[qt.code_type]
    if qt.zero_points is None:
        data = (qt.q.astype(np.int8) - 8) if qt.code_type == "uint4" else qt.q
        return data, signed_type, None
    return qt.q, offset_type, qt.zero_points


def _from_portable(data: np.ndarray, data_type: str, scales: np.ndarray, zeros: Optional[np.ndarray],
                   group_size: int, scheme: Optional[dict]) -> QuantizedTensor:
    bits = 4 if data_type in ("INT4", "UINT4") else 8
    codes = (data.astype(np.int16) + 8).astype(np.uint8) if data_type == "INT4" else data
    if scheme is None and data_type == "FLOAT8E4M3FN":
        scheme = {"scheme": "fp8"}
    return QuantizedTensor(q=np.ascontiguousarray(codes), scales=scales.astype(np.float32), zero_points=zeros,
                           bits=bits, group_size=group_size, shape=data.shape,
                           scheme=scheme or _default_scheme(bits, group_size, zeros is None))


def pack_dequantizelinear(qt: QuantizedTensor) -> dict[str, Any]:
    """QuantizedTensor -> inputs and attributes of one ONNX DequantizeLinear whose output feeds
    ``MatMul(x, W)`` directly.

    The weight is stored transposed, [K, N], because that is what MatMul multiplies by without a
    Transpose node, and the DQ -> MatMul pattern onnxruntime fuses back into MatMulNBits (and
    TensorRT's weight-only INT4 GEMM reads) has the blocks along K, i.e. ``axis=0``.
    Returns ``data`` [K, N] (INT4 as int8 -8..7, UINT4 as uint8 0..15, INT8, or FLOAT8E4M3FN as
    uint8 bit patterns), ``data_type`` (the onnx.TensorProto type name), ``scale`` float32
    ([K/g, N] blocked with ``axis=0, block_size=g``; [N] per-channel with ``axis=1``, block_size
    None; or a scalar), ``zero_point`` (shaped like ``scale``, data's type) or None.
    """
    data, data_type, zeros = _portable(qt, "DequantizeLinear")
    n, k = qt.shape
    if qt.scales.shape == (1, 1):
        scale, axis, block = qt.scales.reshape(()), 1, None
    elif qt.group_size == k:
        scale, axis, block = qt.scales.reshape(n), 1, None
    else:
        scale, axis, block = qt.scales.T, 0, qt.group_size
    zero_point = None if zeros is None else zeros.reshape(scale.shape) if block is None else zeros.T
    return {"data": np.ascontiguousarray(data.T), "data_type": data_type,
            "scale": np.array(scale, np.float32, order="C"),
            "zero_point": None if zero_point is None else np.ascontiguousarray(zero_point),
            "axis": axis, "block_size": block}


def unpack_dequantizelinear(data: np.ndarray, data_type: str, scale: np.ndarray, zero_point: Optional[np.ndarray],
                            axis: int, block_size: Optional[int], scheme: Optional[dict] = None) -> QuantizedTensor:
    """Inverse of :func:`pack_dequantizelinear`."""
    k, n = data.shape
    scale = np.asarray(scale, np.float32)
    if block_size is not None:
        scales, zeros, group = scale.T, None if zero_point is None else zero_point.T, block_size
    else:
        rows = 1 if scale.ndim == 0 else n
        scales = scale.reshape(rows, 1)
        zeros, group = None if zero_point is None else zero_point.reshape(rows, 1), k
    return _from_portable(data.T, data_type, scales, zeros, group, scheme)


def make_tensor_proto(name: str, values: np.ndarray, data_type: str):
    """An onnx.TensorProto of ``values`` stored as ``data_type`` (``pack_dequantizelinear``'s
    names). INT4/UINT4 are packed two per byte, first element in the low nibble, as ONNX
    specifies; raw bytes throughout so that multi-GB weights never become Python lists."""
    from onnx import TensorProto, helper  # lazily: only the ONNX targets need onnx

    values = np.asarray(values)
    if data_type in ("INT4", "UINT4"):
        flat = values.astype(np.uint8).reshape(-1)  # int8 -> two's complement, low nibble kept
        raw = _nibbles_to_bytes(np.pad(flat, (0, flat.size % 2))).tobytes()
    else:
        raw = values.astype(np.uint8 if data_type in ("UINT8", "FLOAT8E4M3FN") else values.dtype).tobytes()
    return helper.make_tensor(name, getattr(TensorProto, data_type), values.shape, raw, raw=True)


# ---- Core ML constexpr_blockwise_shift_scale ---------------------------------------------

def pack_coreml_blockwise(qt: QuantizedTensor, scale_dtype=np.float32) -> dict[str, Any]:
    """QuantizedTensor -> inputs of Core ML's (iOS 18) ``constexpr_blockwise_shift_scale``,
    ``w = scale * (data - offset)`` with data [N, K] in Core ML's [out, in] weight layout.

    Returns ``data`` (int4 as int8 -8..7, uint4 as uint8 0..15, or int8), ``dtype`` ("int4",
    "uint4", "int8" or "uint8": what the coremltools caller declares), ``scale`` [N, K/g] in
    ``scale_dtype`` (float16 halves its size but rounds it: the round trip is exact in float32),
    and ``offset`` [N, K/g] of data's kind or None.
    """
    data, data_type, zeros = _portable(qt, "Core ML blockwise int")
    if data_type == "FLOAT8E4M3FN":
        raise QuantizationError("Core ML has no float8 weights; use int4 or int8 for the coreml target")
    return {"data": np.ascontiguousarray(data), "dtype": data_type.lower(),
            "scale": qt.scales.astype(scale_dtype), "offset": zeros}


def unpack_coreml_blockwise(data: np.ndarray, dtype: str, scale: np.ndarray, offset: Optional[np.ndarray],
                            scheme: Optional[dict] = None) -> QuantizedTensor:
    """Inverse of :func:`pack_coreml_blockwise`."""
    group = data.shape[1] // scale.shape[1]
    return _from_portable(data, dtype.upper(), np.asarray(scale, np.float32), offset, group, scheme)
