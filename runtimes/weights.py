"""An artifact's weights back in float32 HF layout, with numpy only (for the reference backend).

The manifest's ``weights`` section maps every HF tensor name to where its stored form lives
(file, byte offset, length, dtype, shape) and how it was packed, so no ONNX or Core ML library
is needed to read it back.
"""
from __future__ import annotations

import numpy as np

from .errors import ArtifactError

DTYPES = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8, "int8": np.int8}


class ArtifactWeights:
    """``weights(name) -> float32 array`` over an artifact's stored tensors (memory-mapped)."""

    def __init__(self, artifact):
        self.artifact = artifact
        self.table = artifact.manifest.get("weights")
        if not isinstance(self.table, dict) or not self.table:
            raise ArtifactError(f"{artifact.path}: the manifest has no 'weights' table, so the reference "
                                "backend cannot read this artifact; re-export it with this version")
        self._maps: dict[str, np.memmap] = {}

    def __call__(self, name: str) -> np.ndarray:
        entry = self.table.get(name)
        if entry is None:
            raise ArtifactError(f"{self.artifact.path}: the manifest's weights table has no '{name}'")
        unpack = UNPACKERS.get(entry.get("format"))
        if unpack is None:
            raise ArtifactError(f"{self.artifact.path}: weight '{name}' has unknown format {entry.get('format')!r}")
        w = unpack(self, entry)
        if "rows" in entry:
            w = w[entry["rows"][0]:entry["rows"][1]]
        return np.ascontiguousarray(w, dtype=np.float32)

    def raw(self, ref: dict) -> np.ndarray:
        """The bytes a {file, offset, length, dtype, shape} reference points at, as an array."""
        file = ref["file"]
        if file not in self._maps:
            self._maps[file] = np.memmap(self.artifact.file(file), dtype=np.uint8, mode="r")
        data = self._maps[file]
        offset, length = int(ref["offset"]), int(ref["length"])
        if offset < 0 or offset + length > data.size:
            raise ArtifactError(f"{self.artifact.path}/{file}: weight bytes [{offset}, {offset + length}) "
                                "fall outside the file")
        return data[offset:offset + length].view(DTYPES[ref["dtype"]]).reshape(ref["shape"])


def _float(weights: ArtifactWeights, e: dict) -> np.ndarray:
    w = weights.raw(e["data"]).astype(np.float32)
    return w.T if e.get("transpose") else w


def _matmulnbits(weights: ArtifactWeights, e: dict) -> np.ndarray:
    """onnxruntime MatMulNBits: B [N, blocks, block*bits/8], scales [N*blocks], zero points packed
    along blocks (two 4-bit points a byte) or one a byte (GatherBlockQuantized's form)."""
    n, k, bits, block = e["N"], e["K"], e["bits"], e["block_size"]
    blocks = -(-k // block)
    packed = weights.raw(e["B"]).reshape(n, blocks, -1)
    if bits == 4:
        q = np.empty((n, blocks, block), np.uint8)
        q[..., 0::2], q[..., 1::2] = packed & 0x0F, packed >> 4
    else:
        q = packed
    scales = weights.raw(e["scales"]).astype(np.float32).reshape(n, blocks)
    if e.get("zero_points"):
        zp = weights.raw(e["zero_points"]).reshape(n, -1)
        if bits == 4 and e.get("zero_points_packed", True):
            zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)[:, :blocks]
        zp = zp.astype(np.float32)
    else:
        zp = np.full((n, blocks), 2 ** (bits - 1), np.float32)
    w = (q.astype(np.float32) - zp[..., None]) * scales[..., None]
    if e.get("residual"):
        r = weights.raw(e["residual"]).astype(np.float32)
        r = r.T if e.get("residual_transposed") else r
        w = w + r.reshape(n, blocks)[..., None]
    w = w.reshape(n, blocks * block)[:, :k]
    if e.get("input_scale_inverse"):  # AWQ's 1/s applied to the input by an explicit Mul
        w = w * weights.raw(e["input_scale_inverse"]).astype(np.float32)
    return w


def _fp8(weights: ArtifactWeights, e: dict) -> np.ndarray:
    codes = weights.raw(e["data"])
    w = fp8_e4m3fn_to_float(codes) * weights.raw(e["scale"]).astype(np.float32)
    return w.T if e.get("transpose") else w


def fp8_e4m3fn_to_float(codes: np.ndarray) -> np.ndarray:
    """Decode float8 E4M3FN bit patterns (uint8) to float32."""
    c = codes.astype(np.int32)
    sign = np.where(c & 0x80, -1.0, 1.0).astype(np.float32)
    exp, man = (c >> 3) & 0x0F, c & 0x07
    normal = (1.0 + man / 8.0) * np.exp2(exp - 7.0)
    sub = (man / 8.0) * np.exp2(-6.0)
    value = np.where(exp == 0, sub, normal).astype(np.float32)
    value = np.where((exp == 0x0F) & (man == 0x07), np.nan, value)
    return sign * value


def _dequantizelinear(weights: ArtifactWeights, e: dict) -> np.ndarray:
    """ONNX DequantizeLinear feeding MatMul: codes [K, N] of ``data_type`` (INT4/UINT4 two a
    byte, low nibble first; INT8; UINT8; FLOAT8E4M3FN), scales blocked along K (``axis`` 0 with
    ``block_size``) or per output column (``axis`` 1) or one scalar. Returns W [N, K]."""
    k, n = e["shape"]
    kind = e["data_type"]
    codes = _codes(weights.raw(e["data"]), kind, k * n).reshape(k, n)
    scale = weights.raw(e["scale"]).astype(np.float32)
    zero = _codes(weights.raw(e["zero_point"]), kind, scale.size).reshape(scale.shape) if e.get("zero_point") else 0.0
    block = e.get("block_size")
    if block:  # scale [K/g, N]: each row repeats over its block of K
        scale, zero = (np.repeat(np.asarray(a), block, axis=0)[:k] if np.ndim(a) else a for a in (scale, zero))
    w = (codes - zero) * scale
    if e.get("residual"):  # [K/g, N]: GGUF Q4_1's per-block offsets
        w = w + np.repeat(weights.raw(e["residual"]).astype(np.float32), block, axis=0)[:k]
    w = w.T
    if e.get("input_scale_inverse"):
        w = w * weights.raw(e["input_scale_inverse"]).astype(np.float32)
    return w


def _codes(raw: np.ndarray, kind: str, count: int) -> np.ndarray:
    """Stored codes -> float32 values (before scale and zero point)."""
    raw = raw.reshape(-1)
    if kind in ("INT4", "UINT4"):
        nibbles = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(-1)[:count].astype(np.int8)
        return (np.where(nibbles > 7, nibbles - 16, nibbles) if kind == "INT4" else nibbles).astype(np.float32)
    if kind == "FLOAT8E4M3FN":
        return fp8_e4m3fn_to_float(raw[:count])
    if kind == "INT8":
        return raw[:count].view(np.int8).astype(np.float32)
    if kind == "UINT8":
        return raw[:count].astype(np.float32)
    raise ArtifactError(f"DequantizeLinear weights of type {kind} are not supported")


UNPACKERS = {"float": _float, "matmulnbits": _matmulnbits, "fp8": _fp8, "dequantizelinear": _dequantizelinear}
