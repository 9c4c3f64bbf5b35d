"""Linear layers and quantized embeddings as onnxruntime ops: MatMul for float weights,
com.microsoft MatMulNBits for int4/int8 ones, GatherBlockQuantized for a quantized table.

A weight arrives as a float32 array or a :class:`quantizers.QuantizedTensor`; :func:`to_linear`
turns it into a :class:`Linear` (MatMulNBits' packed layout from ``quantizers.pack``), which
:func:`concat_linears` can fuse row-wise (q/k/v, gate/up) and :class:`LinearEmitter` writes.
Two extras of a QuantizedTensor are carried exactly:

- a GGUF minimum's ``residual`` r [N, K/g] (Q4_1 / Q4_K: w = s*(q - z) + r; Q5_1 / Q5_K / Q2_K:
  int8 codes, w = s*q + r): integer zero points (if any) plus
  y += (x summed per block) @ r.T, a [.., K/g] x [K/g, N] MatMul beside the MatMulNBits
  (``RESIDUAL_AS``; float zero points z - r/s are exact too but slow on CPU);
- AWQ's ``input_scale`` s [K] (codes quantize W * s): x / s, folded into the RMSNorm weight
  in front when every consumer of that norm shares s, else an explicit Mul.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from quantizers import QuantizationError
from quantizers.pack import pack_matmulnbits

from ..errors import ExportError
from .onnx_graph import GraphWriter

SUPPORTED_BITS = (4, 8)
# How GGUF Q4_1's residual reaches MatMulNBits, both exact. "block_sums": integer zero points and
# y += (block sums of x) @ r.T beside; SmolLM2 shapes, 2 threads: 4.1 ms/token against 3.15 for
# plain asymmetric int4. "float_zero_points" (quantizers.pack's z - r/d): onnxruntime 1.32's CPU
# MatMulNBits takes a slow path for float zero points, about 100 ms/token.
RESIDUAL_AS = "block_sums"


def is_quantized(value) -> bool:
    return not isinstance(value, np.ndarray) and hasattr(value, "q") and hasattr(value, "scales")


def checked_tensor(weights, name: str, expected: tuple):
    """``weights.get(name)`` as float32 or a QuantizedTensor, refused when its shape is not the model's."""
    value = weights.get(name)
    shape = tuple(value.shape) if is_quantized(value) else np.shape(value)
    if shape != expected:
        raise ExportError(f"tensor {name}: shape {shape} does not match the model's {expected}")
    return value if is_quantized(value) else np.asarray(value, np.float32)


@dataclass
class Linear:
    """One linear weight [N out, K in] as the graph stores it.

    Float: ``weight`` float32 [N, K]. Quantized (MatMulNBits' layout): ``B`` uint8 [N, n_blocks,
    blob], ``scales`` float32 [N, n_blocks], ``zero_points`` None, packed uint8 [N, ceil(n_blocks
    * bits / 8)] or float32 [N, n_blocks] (Q4_1 folded), ``residual`` float32 [N, n_blocks] for
    the block-sums form, ``input_scale`` float32 [K] (AWQ). For GatherBlockQuantized (uint8
    zero points only): ``zero_codes`` uint8 [N, n_blocks], and for a Q4_1 table ``code_scales``
    and ``block_residual`` [N, n_blocks]. ``written`` maps a part to the initializer holding
    it, so a tied table is stored once.
    """
    N: int
    K: int
    bits: int = 32
    block_size: int = 0
    weight: np.ndarray | None = None
    B: np.ndarray | None = None
    scales: np.ndarray | None = None
    zero_points: np.ndarray | None = None
    zero_codes: np.ndarray | None = None
    code_scales: np.ndarray | None = None
    block_residual: np.ndarray | None = None
    residual: np.ndarray | None = None
    input_scale: np.ndarray | None = None
    name: str = ""
    written: dict = field(default_factory=dict)

    @classmethod
    def float(cls, weight: np.ndarray, name: str = "") -> "Linear":
        n, k = weight.shape
        return cls(N=n, K=k, weight=np.asarray(weight, np.float32), name=name)

    @property
    def quantized(self) -> bool:
        return self.bits in SUPPORTED_BITS

    @property
    def n_blocks(self) -> int:
        return -(-self.K // self.block_size)

    def scheme_key(self) -> tuple:
        """What must agree for row-wise fusion."""
        zp_type = None if self.zero_points is None else self.zero_points.dtype.str
        return (self.K, self.bits, self.block_size, zp_type, self.residual is None,
                None if self.input_scale is None else self.input_scale.tobytes())


def to_linear(value, name: str) -> Linear:
    """A float32 array or a QuantizedTensor (int4/int8) -> Linear; ``name`` is for errors."""
    if not is_quantized(value):
        return Linear.float(np.asarray(value, np.float32))
    if getattr(value, "is_float8", False) or value.bits not in SUPPORTED_BITS:
        scheme = value.scheme.get("scheme", f"{value.bits}-bit") if isinstance(value.scheme, dict) else value.bits
        raise ExportError(f"tensor {name}: {scheme} weights have no MatMulNBits form; the ort variant takes "
                          "int4 or int8 (use the portable or tensorrt target for fp8)")
    residual = value.residual
    if residual is not None and RESIDUAL_AS == "block_sums":
        value = dataclasses.replace(value, residual=None)  # integer zero points; the residual goes beside
    try:
        packed = pack_matmulnbits(value)
    except QuantizationError as e:
        raise ExportError(f"tensor {name}: {e}") from e
    n, k, nb, block = packed["N"], packed["K"], packed["B"].shape[1], packed["block_size"]
    repeat = value.group_size // block  # a group may span several MatMulNBits blocks

    def per_block(a):
        return None if a is None else np.repeat(np.asarray(a), repeat, axis=1)

    zp = packed["zero_points"]
    return Linear(N=n, K=k, bits=packed["bits"], block_size=block, B=packed["B"],
                  scales=packed["scales"].reshape(n, nb),
                  zero_points=None if zp is None else zp.reshape(n, -1),
                  zero_codes=per_block(value.zero_points),
                  code_scales=per_block(value.scales) if residual is not None else None,
                  block_residual=per_block(residual),
                  residual=per_block(residual) if RESIDUAL_AS == "block_sums" else None,
                  input_scale=None if value.input_scale is None else np.asarray(value.input_scale, np.float32))


def concat_linears(parts: list[Linear]) -> Linear | None:
    """Stack linears sharing their input row-wise (q/k/v, gate/up) into one; None when their
    storage differs (float beside quantized, other bits, group size, zero points, residual)."""
    if all(not p.quantized for p in parts):
        return Linear.float(np.concatenate([p.weight for p in parts]))
    if not all(p.quantized for p in parts) or len({p.scheme_key() for p in parts}) != 1:
        return None

    def stack(attr: str):
        values = [getattr(p, attr) for p in parts]
        return None if values[0] is None else np.concatenate(values)

    first = parts[0]
    return dataclasses.replace(first, N=sum(p.N for p in parts), B=stack("B"), scales=stack("scales"),
                               zero_points=stack("zero_points"), zero_codes=stack("zero_codes"),
                               residual=stack("residual"), code_scales=None, block_residual=None, name="",
                               written={})


class LinearEmitter:
    """Writes Linears into a GraphWriter as MatMul / MatMulNBits / GatherBlockQuantized nodes."""

    def __init__(self, graph: GraphWriter, accuracy_level: int):
        if accuracy_level not in range(5):
            raise ExportError(f"accuracy_level={accuracy_level} must be 0..4 (MatMulNBits: 0 unset, 1 fp32, "
                              "2 fp16, 3 bf16, 4 int8)")
        self.g, self.accuracy_level = graph, accuracy_level

    def _init(self, lin: Linear, part: str, name: str, array_fn) -> str:
        if part not in lin.written:
            lin.written[part] = self.g.weight(name, array_fn())
        return lin.written[part]

    @staticmethod
    def fold_input_scale(gamma: np.ndarray, consumers: list[Linear]) -> np.ndarray:
        """RMSNorm weight to use in front of ``consumers``: gamma / s when all share AWQ's s
        (their input_scale is then cleared), else gamma unchanged (each then gets a Mul)."""
        scales = [c.input_scale for c in consumers]
        if any(s is None for s in scales) or any(not np.array_equal(scales[0], s) for s in scales[1:]):
            return gamma
        for c in consumers:
            c.input_scale = None
        return (gamma / scales[0]).astype(np.float32)

    def float_weight(self, lin: Linear) -> str:
        """The [K, N] initializer of a float linear (MatMul's right-hand side)."""
        return self._init(lin, "weight", lin.name or "weight", lambda: np.ascontiguousarray(lin.weight.T))

    def linear(self, base: str, x: str, lin: Linear, bias: np.ndarray | None = None, out: str | None = None) -> str:
        """y = x @ W.T (+ bias) for x [batch, seq, K]; nodes named ``{base}/MatMul(NBits)``."""
        stem = base.lstrip("/").replace("/", ".")
        if not lin.quantized:
            if not lin.name:
                lin.name = f"{stem}.weight"
            name = f"{base}/MatMul"
            y = self.g.node("MatMul", [x, self.float_weight(lin)], name,
                            outputs=[out if out and bias is None else f"{name}/output_0"])
            if bias is not None:
                y = self.g.node("Add", [y, self.g.weight(f"{stem}.bias", bias)], f"{base}/Add",
                                outputs=[out or f"{base}/Add/output_0"])
            return y
        return self._matmul_nbits(base, stem, x, lin, bias, out)

    def _matmul_nbits(self, base: str, stem: str, x: str, lin: Linear, bias, out: str | None) -> str:
        g = self.g
        if lin.input_scale is not None:
            inverse = g.weight(f"{stem}.input_scale_inverse", (1.0 / lin.input_scale).astype(np.float32))
            x = g.node("Mul", [x, inverse], f"{base}/input_scale/Mul")
        inputs = [x, self._init(lin, "B", f"{stem}.qweight", lambda: lin.B),
                  self._init(lin, "scales", f"{stem}.scales", lambda: lin.scales)]
        inputs.append("" if lin.zero_points is None and "zero_points" not in lin.written
                      else self._init(lin, "zero_points", f"{stem}.qzeros", lambda: lin.zero_points))
        if bias is not None:
            inputs += ["", g.weight(f"{stem}.bias", np.asarray(bias, np.float32))]
        has_residual = lin.residual is not None or "residual_t" in lin.written
        name = f"{base}/MatMulNBits"
        y = g.node("MatMulNBits", inputs, name, domain="com.microsoft",
                   outputs=[out if out and not has_residual else f"{name}/output_0"],
                   K=lin.K, N=lin.N, bits=lin.bits, block_size=lin.block_size, accuracy_level=self.accuracy_level)
        if not has_residual:
            return y
        correction = self._residual(base, stem, x, lin)
        return g.node("Add", [y, correction], f"{base}/residual/Add", outputs=[out or f"{base}/residual/Add/output_0"])

    def _residual(self, base: str, stem: str, x: str, lin: Linear) -> str:
        """(x summed over each block of K) @ residual.T: a GGUF minimum's per-block offsets, exactly."""
        g = self.g
        if lin.K % lin.block_size:
            raise ExportError(f"{stem}: a residual needs K={lin.K} to be a multiple of the block {lin.block_size}")
        blocks = g.node("Reshape", [x, g.const([0, 0, lin.n_blocks, lin.block_size])], f"{base}/residual/Reshape")
        sums = g.node("ReduceSum", [blocks, g.const([-1])], f"{base}/residual/ReduceSum", keepdims=0)
        table = self._init(lin, "residual_t", f"{stem}.residual", lambda: np.ascontiguousarray(lin.residual.T))
        return g.node("MatMul", [sums, table], f"{base}/residual/MatMul")

    def embedding(self, base: str, lin: Linear, ids: str, share_with_head: bool) -> str:
        """Rows ``ids`` of a quantized table [V, H] -> [batch, seq, H] via GatherBlockQuantized
        on MatMulNBits' own B (3-D, quantized along its last axis), so a tied lm_head reuses it.
        A Q4_1 residual (GatherBlockQuantized has integer zero points only) is gathered per block
        and added."""
        g, stem = self.g, base.lstrip("/").replace("/", ".")
        data = self._init(lin, "B", f"{stem}.qweight", lambda: lin.B)
        if lin.block_residual is not None:
            scales = g.weight(f"{stem}.gather_scales", lin.code_scales[:, :, None])
        elif share_with_head:
            scales2d = self._init(lin, "scales", f"{stem}.scales", lambda: lin.scales)
            scales = g.node("Unsqueeze", [scales2d, g.const([2])], f"{base}/scales/Unsqueeze")
        else:
            scales = g.weight(f"{stem}.gather_scales", lin.scales[:, :, None])
        inputs = [data, ids, scales]
        if lin.zero_codes is not None:
            inputs.append(g.weight(f"{stem}.gather_zero_points", lin.zero_codes[:, :, None]))
        blocks = g.node("GatherBlockQuantized", inputs, f"{base}/GatherBlockQuantized", domain="com.microsoft",
                        bits=lin.bits, block_size=lin.block_size, gather_axis=0, quantize_axis=2)
        if lin.block_residual is not None:
            table = g.weight(f"{stem}.gather_residual", lin.block_residual)
            offsets = g.node("Gather", [table, ids], f"{base}/residual/Gather")
            offsets = g.node("Unsqueeze", [offsets, g.const([-1])], f"{base}/residual/Unsqueeze")
            blocks = g.node("Add", [blocks, offsets], f"{base}/residual/Add")
        rows = g.node("Reshape", [blocks, g.const([0, 0, lin.K])], f"{base}/Reshape")
        if lin.input_scale is not None:
            inverse = g.weight(f"{stem}.input_scale_inverse", (1.0 / lin.input_scale).astype(np.float32))
            rows = g.node("Mul", [rows, inverse], f"{base}/input_scale/Mul")
        if share_with_head:
            self._store_head_parts(lin, stem)
        return rows

    def _store_head_parts(self, lin: Linear, stem: str) -> None:
        """Write what the tied lm_head needs besides B now, then drop the arrays."""
        self._init(lin, "scales", f"{stem}.scales", lambda: lin.scales)
        if lin.zero_points is not None:
            self._init(lin, "zero_points", f"{stem}.qzeros", lambda: lin.zero_points)
        if lin.residual is not None:
            self._init(lin, "residual_t", f"{stem}.residual", lambda: np.ascontiguousarray(lin.residual.T))
        lin.B = lin.scales = lin.zero_points = lin.zero_codes = lin.residual = None
        lin.code_scales = lin.block_residual = None
