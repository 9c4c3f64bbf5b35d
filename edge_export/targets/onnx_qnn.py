"""The ``qnn`` variant of the ONNX target: the QDQ graphs onnxruntime's QNN execution provider
compiles for the Hexagon NPU (HTP), w8a16 or w4a16, for a named Snapdragon.

Built in three steps, each on the previous one's output:

1. a float decoder of standard ONNX ops (opset 23: RMSNormalization, MatMul, Softmax, Gather,
   Reshape, Transpose, Concat, Slice, Sigmoid, Mul, Add) whose weights already are
   DequantizeLinear of int8 per-channel codes (w8) or of int4 codes with low-power block scales
   (w4, QNN's LPBQ: a float scale per output channel times a 4-bit integer per block), streamed to
   one external data file; every activation the NPU will hold as uint16 is marked as a point;
2. calibration: that graph runs on onnxruntime's CPU provider over the built-in calibration
   prompts, chunked exactly as the runtime chunks them, and each point's min/max is recorded;
3. a QuantizeLinear/DequantizeLinear pair (uint16, per tensor) is inserted at every point, the
   graph inputs and outputs become uint16 codes, and the decode graph is the prefill graph with a
   sequence length of 1 (both read the same weights file).

Static shapes throughout (QNN needs them): a prefill chunk of --prefill-chunk tokens and a decode
step, each taking the whole fixed-size KV cache and returning only the new keys and values
(runtimes/backends/qnn.py owns the cache). Data-movement ops (Reshape, Transpose, Slice, Gather,
Concat) keep their input's scale, which QNN requires. 1/sqrt(head_dim) is folded into the q
projection's per-channel scales (into q_norm's weight for Qwen3), recorded as ``multiplier``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from quantizers.int8 import quantize_int8
from runtimes.backends.qnn import MASK_HIDDEN
from runtimes.capabilities import QNN_SOCS
from runtimes.models import ModelSpec, describe

from ..errors import ExportError
from .onnx_graph import GraphWriter
from .onnx_qnn_qdq import ACT, CALIBRATION_DECODE_STEPS, calibrate, insert_qdq, resolve_params, uint16_params, with_seq_len

logger = logging.getLogger(__name__)

PREFILL, DECODE, DATA = "prefill.onnx", "decode.onnx", "prefill.onnx.data"
OPSET = 23  # RMSNormalization
CALIBRATION_PROMPTS = 16
ROW_BLOCK_ELEMENTS = 1 << 24  # weights re-quantized at a time (64 MiB in float32)
SIMULATED_WEIGHTS_PER_S = 30e6  # onnxruntime-qnn 2.7's HTP simulator, one x86_64 core (SmolLM2: 4.2 s a token)
INT64_MAX = np.iinfo(np.int64).max


def same(tensor: str) -> tuple:
    return ("same", tensor)


@dataclasses.dataclass
class QLinear:
    """One linear as QNN's FullyConnected takes it: codes [K, N] (int8, or int4 values held in
    int8) and per-output-channel scales [N]; with ``block_scales`` uint8 [K/B, N] (1..15) the
    weight is LPBQ, w = codes * scales * block_scales over blocks of ``block_size`` inputs."""
    codes: np.ndarray
    scales: np.ndarray
    bits: int = 8
    block_scales: np.ndarray | None = None
    block_size: int = 0
    requantized: bool = False

    @staticmethod
    def joined(parts: list["QLinear"]) -> "QLinear":
        """Blocks of output channels, in order, as one linear."""
        first = parts[0]
        block_scales = None if first.block_scales is None else np.concatenate([p.block_scales for p in parts], 1)
        return QLinear(np.concatenate([p.codes for p in parts], 1), np.concatenate([p.scales for p in parts]),
                       first.bits, block_scales, first.block_size, first.requantized)


def to_qlinear(value, name: str) -> QLinear:
    """A float32 [N, K] array or a QuantizedTensor -> QLinear. int8 per-row codes are carried as
    they are; anything else (grouped int8, int4 groups, AWQ scales, GGUF blocks) is re-quantized
    from the weight it stands for: int4 to LPBQ with the tensor's group as the block. Every output
    row is quantized on its own, so this runs ROW_BLOCK_ELEMENTS weights at a time: a 152k x 3.5k
    head is never whole in float32 (2 GiB, and several temporaries of that size in lpbq)."""
    if not isinstance(value, np.ndarray):
        if getattr(value, "is_float8", False) or value.bits not in (4, 8):
            raise ExportError(f"tensor {name}: {value.code_type} weights have no QNN HTP form; the qnn variant "
                              "takes --quant int8 (w8a16) or int4 (w4a16)")
        k = value.shape[1]
        exact = value.group_size == k and value.zero_points is None and value.residual is None and \
            value.input_scale is None
        if value.bits == 8 and exact:
            return QLinear(value.q.T.copy(), value.scales[:, 0].astype(np.float32))
    n, k = value.shape
    step = max(1, ROW_BLOCK_ELEMENTS // k)
    parts = []
    for start in range(0, n, step):
        rows = slice(start, start + step)
        w, bits = float_rows(value, rows), 8 if isinstance(value, np.ndarray) else value.bits
        if bits == 8:
            codes, scales = quantize_int8(w, k, name)
            parts.append(QLinear(codes.T, scales[:, 0], requantized=True))
        else:
            parts.append(lpbq(w, value.group_size if value.group_size < k else 0))
    return QLinear.joined(parts)


def float_rows(value, rows: slice) -> np.ndarray:
    """Output rows ``rows`` of a float array or a stored tensor (QuantizedTensor), as float32."""
    if isinstance(value, np.ndarray):
        return np.asarray(value[rows], np.float32)
    return value.rows(rows).effective_weight()


def lpbq(w: np.ndarray, block: int) -> QLinear:
    """Symmetric int4 of w [N, K]: per output channel (block 0), or QNN's low-power block
    quantization: each block's scale is the row's float scale (its largest block's max/7, over 15)
    times the integer 1..15 that minimizes the block's squared error (on SmolLM2 this beats
    max/7 float scales per block by ~20% in weight MSE; rounding the ideal integer up loses ~12%)."""
    n, k = w.shape
    if not block:
        scales = np.abs(w).max(1) / 7
        scales = np.where(scales > 0, scales, 1).astype(np.float32)
        codes = np.clip(np.round(w / scales[:, None]), -7, 7).astype(np.int8)
        return QLinear(codes.T.copy(), scales, bits=4, requantized=True)
    wb = w.reshape(n, k // block, block)
    channel = np.abs(wb).max(axis=(1, 2)) / 7 / 15
    channel = np.where(channel > 0, channel, 1).astype(np.float32)
    best_err, integer = None, None
    for u in range(1, 16):
        step = (u * channel)[:, None, None]
        err = np.square(np.clip(np.round(wb / step), -8, 7) * step - wb).sum(-1)
        if best_err is None:
            best_err, integer = err, np.ones(err.shape, np.uint8)
        else:
            better = err < best_err
            best_err, integer = np.where(better, err, best_err), np.where(better, np.uint8(u), integer)
    step = (integer * channel[:, None])[..., None]
    codes = np.clip(np.round(wb / step), -8, 7).astype(np.int8)
    return QLinear(codes.reshape(n, k).T.copy(), channel, 4, integer.T.copy(), block, True)


def _ref(tensor: TensorProto) -> dict:
    """Where an external initializer's bytes are ({file, offset, length, dtype uint8, shape [bytes]}),
    as runtimes/weights.py reads them; the entry's ``codes`` says what they hold."""
    ext = {e.key: e.value for e in tensor.external_data}
    return {"file": ext["location"], "offset": int(ext["offset"]), "length": int(ext["length"]),
            "dtype": "uint8", "shape": [int(ext["length"])]}


def _float_ref(tensor: TensorProto) -> dict:
    return dict(_ref(tensor), dtype="float32", shape=list(tensor.dims))


class _Builder:
    """Emits the float decoder with DQ weights into a GraphWriter; records activation ``points``
    (tensor -> ACT, ("same", tensor), ("range", lo, hi) or ("params", scale, zero_point)) and
    the manifest's weights table."""

    def __init__(self, spec: ModelSpec, weights, graph: GraphWriter, max_context: int, seq_len: int):
        self.spec, self.weights, self.g = spec, weights, graph
        self.ctx, self.seq = max_context, seq_len
        self.points: dict[str, tuple] = {}
        self.table: dict[str, dict] = {}
        self.requantized: list[str] = []
        self.q_scale = 1.0 / math.sqrt(spec.head_dim)

    # ---- plumbing ----------------------------------------------------------------------
    def op(self, op: str, inputs, name: str, point: tuple | None = ACT, **attrs) -> str:
        out = self.g.node(op, inputs, name, **attrs)
        if point is not None:
            self.points[out] = point
        return out

    def move(self, op: str, x: str, name: str, *args, **attrs) -> str:
        """A data-movement op: its output keeps x's quantization."""
        return self.op(op, [x, *args], name, same(x), **attrs)

    def reshape(self, x: str, shape: list, name: str) -> str:
        return self.move("Reshape", x, name, self.g.const(shape))

    def _ref(self, name: str, floats: bool = False) -> dict:
        tensor = next(t for t in reversed(self.g.initializers) if t.name == name)
        return _float_ref(tensor) if floats else _ref(tensor)

    def uint16_const(self, base: str, part: str, values) -> tuple[str, dict]:
        """values (a float array of 1-D or more, or a stored tensor: a QuantizedTensor) as a
        per-tensor uint16 DQ named ``{base}/{part}``; returns (dequantized tensor, weights-table
        entry). Read ROW_BLOCK_ELEMENTS at a time, twice (range, then codes): a 152k-row embedding
        is never whole in float32."""
        name = f"{base.lstrip('/').replace('/', '.')}.{part}"
        shape = tuple(values.shape)
        step = max(1, ROW_BLOCK_ELEMENTS // max(1, math.prod(shape[1:])))
        blocks = [slice(start, start + step) for start in range(0, shape[0], step)]
        lo = hi = None
        for rows in blocks:
            block = float_rows(values, rows)
            lo = block.min() if lo is None else min(lo, block.min())
            hi = block.max() if hi is None else max(hi, block.max())
        scale, zp = uint16_params(lo, hi)
        codes = np.empty(shape, np.uint16)
        for rows in blocks:
            codes[rows] = np.clip(np.round(float_rows(values, rows) / scale) + zp, 0, 65535)
        self.g.weight(name, codes)
        out = self.g.node("DequantizeLinear", [name, self.g.const(scale, np.float32), self.g.const(zp, np.uint16)],
                          f"{base}/{part}/DequantizeLinear")
        return out, {"format": "qdq", "q": self._ref(name), "codes": "uint16", "shape": list(codes.shape),
                     "scale": scale, "zero_point": zp}

    def int4_weight(self, name: str, codes: np.ndarray) -> str:
        """codes (int8 values -8..7) stored as ONNX INT4, two a byte, first in the low nibble."""
        flat = np.ascontiguousarray(codes, np.int8).reshape(-1).view(np.uint8)  # the low nibble is the code
        if flat.size % 2:
            flat = np.append(flat, np.uint8(0))
        packed = flat[0::2] & np.uint8(0x0F)
        packed |= flat[1::2] << np.uint8(4)  # uint8: the high nibble's bits fall off
        self.g.weight(name, packed)
        tensor = next(t for t in reversed(self.g.initializers) if t.name == name)
        tensor.data_type = TensorProto.INT4
        del tensor.dims[:]
        tensor.dims.extend(codes.shape)
        return name

    def linear(self, base: str, x: str, lin: QLinear) -> tuple[str, dict]:
        """x @ W as DQ(weight) -> MatMul, which QNN turns into FullyConnected; returns (output, entry)."""
        g, stem = self.g, base.lstrip("/").replace("/", ".")
        k, n = lin.codes.shape
        entry = {"format": "qdq", "codes": "int8" if lin.bits == 8 else "int4", "shape": [k, n], "transpose": True,
                 "axis": 1}
        if lin.bits == 8:
            g.weight(f"{stem}.qweight", lin.codes)
        else:
            self.int4_weight(f"{stem}.qweight", lin.codes)
        g.weight(f"{stem}.scales", lin.scales.astype(np.float32))
        entry.update(q=self._ref(f"{stem}.qweight"), scale=self._ref(f"{stem}.scales", floats=True))
        inputs = [f"{stem}.qweight", f"{stem}.scales"]
        attrs = {"axis": 1}
        if lin.bits == 4:
            zero_shape = [n] if lin.block_scales is None else list(lin.block_scales.shape)
            zero = helper.make_tensor(f"{stem}.qzeros", TensorProto.INT4, zero_shape, [0] * int(np.prod(zero_shape)))
            g.initializers.append(zero)
            inputs.append(zero.name)
        if lin.block_scales is not None:  # LPBQ: the block scales are themselves a per-channel DQ
            g.weight(f"{stem}.block_scales", lin.block_scales)
            inputs[1] = g.node("DequantizeLinear", [f"{stem}.block_scales", f"{stem}.scales",
                                                    g.const(np.zeros(n, np.uint8), np.uint8)],
                               f"{base}/block_scales/DequantizeLinear", axis=1)
            attrs = {"axis": 0, "block_size": lin.block_size}
            entry.update(block_scale=dict(self._ref(f"{stem}.block_scales"), shape=list(lin.block_scales.shape)),
                         block_size=lin.block_size)
        w = g.node("DequantizeLinear", inputs, f"{base}/weight/DequantizeLinear", **attrs)
        return self.op("MatMul", [x, w], f"{base}/MatMul"), entry

    def _get(self, key: str, layer: int | None = None):
        name = self.spec.tensor_name(key, layer)
        return self.weights.get(name)

    def _qlinear(self, key: str, layer: int | None = None) -> QLinear:
        name = self.spec.tensor_name(key, layer)
        lin = to_qlinear(self._get(key, layer), name)
        if lin.requantized:
            self.requantized.append(name)
        return lin

    # ---- the decoder ---------------------------------------------------------------------
    def build(self) -> None:
        s, g = self.spec, self.g
        g.input("input_ids", TensorProto.INT32, [1, self.seq])
        g.input("attention_mask", TensorProto.FLOAT, [1, 1, self.seq, self.ctx + self.seq])
        self.points["attention_mask"] = ("range", MASK_HIDDEN, 0.0)
        for i in range(s.num_layers):
            for kind in ("key", "value"):
                g.input(f"past.{i}.{kind}", TensorProto.FLOAT, [1, s.num_kv_heads, self.ctx, s.head_dim])
                self.points[f"past.{i}.{kind}"] = same(f"present.{i}.{kind}")
        g.output("logits", TensorProto.FLOAT, [1, 1, s.vocab_size])
        for i in range(s.num_layers):
            for kind in ("key", "value"):
                g.output(f"present.{i}.{kind}", TensorProto.FLOAT, [1, s.num_kv_heads, self.seq, s.head_dim])
        # a tied head's int8 codes are the embedding table's source; an untied one is quantized at
        # the end, so its codes are not held while the layers are written
        head = self._qlinear("embed") if s.tied_embeddings else None
        hidden = self._embedding(head)
        self._rope_inputs()
        for i in range(s.num_layers):
            hidden = self._layer(i, hidden)
            logger.debug("layer %d of %d written", i + 1, s.num_layers)
        self._head(hidden, head or self._qlinear("lm_head"))

    def _embedding(self, head: QLinear | None) -> str:
        """Gather from a per-tensor uint16 table (QNN's Gather keeps one scale); the tied lm_head's
        int8 codes are the table's source and what the weights table points at."""
        s = self.spec
        if s.tied_embeddings:
            rows = (head.codes.astype(np.float32) * head.scales[None, :]).T if head.bits == 8 else None
            if rows is None:
                raise ExportError("a tied embedding needs an int8 head for the qnn variant (keep --head int8)")
        else:
            rows = self._get("embed")  # float32, or int8 codes dequantized a block at a time
        table, entry = self.uint16_const("/model/embed_tokens", "table", rows)
        if not s.tied_embeddings:
            self.table[s.tensor_name("embed")] = entry
        params = (entry["scale"], entry["zero_point"])
        return self.op("Gather", [table, "input_ids"], "/model/embed_tokens/Gather", ("params", *params), axis=0)

    def _rope_inputs(self) -> None:
        """cos and sign-folded sin of each row's position, [1, 1, S, head_dim], from the runtime:
        rope(x) = x * cos + swap_halves(x) * [-sin, sin]. (Gathering them from a table in the graph
        computes wrong rows past the 32nd on the HTP simulator of onnxruntime-qnn 2.7.)"""
        from runtimes import rope
        s = self.spec
        r = rope.Rope.for_spec(s)
        # cos/sin times the attention factor; channels past rotary_dim carry cos 1, sin 0
        factor = max(1.0, rope.inv_freq(r.dim, r.theta, r.scaling)[1])
        for name in ("position_cos", "position_sin"):
            self.g.input(name, TensorProto.FLOAT, [1, 1, self.seq, s.head_dim])
            self.points[name] = ("range", -factor, factor)
        self.cos, self.sin = "position_cos", "position_sin"

    def _norm(self, base: str, x: str, gamma: np.ndarray, hf_name: str, multiplier: float = 1.0,
              eps: float | None = None) -> str:
        weight, entry = self.uint16_const(base, "weight", np.asarray(gamma, np.float32) / multiplier)
        self.table[hf_name] = dict(entry, multiplier=multiplier) if multiplier != 1.0 else entry
        return self.op("RMSNormalization", [x, weight], f"{base}/RMSNormalization", axis=-1,
                       epsilon=self.spec.rms_norm_eps if eps is None else eps)

    def _layer(self, i: int, hidden: str) -> str:
        s, p, steps = self.spec, f"/model/layers.{i}", describe(self.spec)
        name = lambda key: s.tensor_name(key, i)  # noqa: E731
        x = self._norm(f"{p}/input_layernorm", hidden, self._get(steps.attn_norm.weight, i),
                       name(steps.attn_norm.weight), eps=steps.attn_norm.eps)
        attn = self._attention(i, p, x)
        hidden = self.op("Add", [hidden, attn], f"{p}/attn/residual/Add")
        x = self._norm(f"{p}/post_attention_layernorm", hidden, self._get(steps.mlp_norm.weight, i),
                       name(steps.mlp_norm.weight), eps=steps.mlp_norm.eps)
        return self.op("Add", [hidden, self._mlp(i, p, x)], f"{p}/mlp/residual/Add")

    def _attention(self, i: int, p: str, x: str) -> str:
        """q, k and v are separate FullyConnected ops, each with its own uint16 range: the HTP's
        uint16 x uint16 MatMul holds its second operand to about 8 bits, so v must span its own
        range (a range shared with k left it a few levels)."""
        s, a = self.spec, describe(self.spec).attention
        proj = {}
        for key, tensor in zip("qkv", (a.q, a.k, a.v)):
            lin = self._qlinear(tensor, i)
            multiplier = 1.0 if a.head_norm or key != "q" else 1.0 / self.q_scale
            lin.scales = (lin.scales / multiplier).astype(np.float32)  # q: 1/sqrt(head_dim) folded in
            proj[key], entry = self.linear(f"{p}/attn/{key}_proj", x, lin)
            if multiplier != 1:
                entry["multiplier"] = multiplier
            self.table[s.tensor_name(tensor, i)] = entry
            if a.bias:
                proj[key] = self._bias(i, p, key, a.bias["qkv".index(key)], proj[key], multiplier)
        q = self._heads(f"{p}/attn/q", proj["q"], a.heads)
        k = self._heads(f"{p}/attn/k", proj["k"], a.kv_heads)
        v = self._heads(f"{p}/attn/v", proj["v"], a.kv_heads, out=f"present.{i}.value")
        if a.head_norm:
            q_norm, k_norm = a.head_norm
            q = self._norm(f"{p}/attn/q_norm", q, self._get(q_norm.weight, i), s.tensor_name(q_norm.weight, i),
                           1 / self.q_scale, eps=q_norm.eps)
            k = self._norm(f"{p}/attn/k_norm", k, self._get(k_norm.weight, i), s.tensor_name(k_norm.weight, i),
                           eps=k_norm.eps)
        q = self._rope(f"{p}/attn/q_rope", q)
        k = self._rope(f"{p}/attn/k_rope", k, out=f"present.{i}.key")
        return self._attend(i, p, q, k, v)

    def _bias(self, i: int, p: str, key: str, tensor: str, y: str, multiplier: float) -> str:
        hf_name = self.spec.tensor_name(tensor, i)
        bias = np.asarray(self._get(tensor, i), np.float32) / multiplier
        weight, entry = self.uint16_const(f"{p}/attn/{key}_proj", "bias", bias)
        self.table[hf_name] = dict(entry, multiplier=multiplier) if multiplier != 1 else entry
        return self.op("Add", [y, weight], f"{p}/attn/{key}_proj/Add")

    def _heads(self, base: str, x: str, heads: int, out: str | None = None) -> str:
        """[1, S, heads * hd] -> [1, heads, S, hd]."""
        x = self.reshape(x, [1, -1, heads, self.spec.head_dim], f"{base}/Reshape")
        if out is None:
            return self.move("Transpose", x, f"{base}/Transpose", perm=[0, 2, 1, 3])
        y = self.g.node("Transpose", [x], f"{base}/Transpose", outputs=[out], perm=[0, 2, 1, 3])
        self.points[y] = same(x)
        return y

    def _rope(self, base: str, x: str, out: str | None = None) -> str:
        """The rotary step: x * cos + swapped(x) * sin, swapping the halves of the first rotary_dim
        channels (the rest pass: the runtime's cos is 1 and sin 0 there)."""
        g, steps = self.g, describe(self.spec).attention
        half, end = steps.rotary_dim // 2, steps.rotary_dim if steps.partial else INT64_MAX
        lo = self.move("Slice", x, f"{base}/Slice", g.const([0]), g.const([half]), g.const([3]))
        hi = self.move("Slice", x, f"{base}/Slice_1", g.const([half]), g.const([end]), g.const([3]))
        rest = [self.move("Slice", x, f"{base}/Slice_2", g.const([end]), g.const([INT64_MAX]), g.const([3]))] \
            if steps.partial else []
        swapped = self.op("Concat", [hi, lo, *rest], f"{base}/Concat", same(x), axis=3)
        a = self.op("Mul", [x, self.cos], f"{base}/Mul")
        b = self.op("Mul", [swapped, self.sin], f"{base}/Mul_1")
        if out is None:
            return self.op("Add", [a, b], f"{base}/Add")
        y = g.node("Add", [a, b], f"{base}/Add", outputs=[out])
        self.points[y] = ACT
        return y

    def _attend(self, i: int, p: str, q: str, k: str, v: str) -> str:
        """Softmax(q k^T + mask) v over [cache | new rows], grouped heads sharing their kv head.
        Between the dequantized q, keys, mask and values and the quantized context, the scores and
        probabilities stay float (fp16 on the HTP): in uint16 the context MatMul held the
        probabilities to about 8 bits and lost the small ones."""
        s, hd = self.spec, self.spec.head_dim
        keys = self.op("Concat", [f"past.{i}.key", k], f"{p}/attn/k_all/Concat", same(k), axis=2)
        values = self.op("Concat", [f"past.{i}.value", v], f"{p}/attn/v_all/Concat", same(v), axis=2)
        keys_t = self.move("Transpose", keys, f"{p}/attn/k_all/Transpose", perm=[0, 1, 3, 2])
        grouped = self.reshape(q, [1, s.num_kv_heads, -1, hd], f"{p}/attn/q_grouped/Reshape")
        scores = self.op("MatMul", [grouped, keys_t], f"{p}/attn/scores/MatMul", None)
        scores = self.op("Reshape", [scores, self.g.const([1, s.num_heads, -1, 0])], f"{p}/attn/scores/Reshape", None)
        scores = self.op("Add", [scores, "attention_mask"], f"{p}/attn/mask/Add", None)
        probs = self.op("Softmax", [scores], f"{p}/attn/Softmax", None, axis=-1)
        probs = self.op("Reshape", [probs, self.g.const([1, s.num_kv_heads, -1, 0])], f"{p}/attn/probs/Reshape", None)
        out = self.op("MatMul", [probs, values], f"{p}/attn/context/MatMul")
        out = self.reshape(out, [1, s.num_heads, -1, hd], f"{p}/attn/context/Reshape")
        out = self.move("Transpose", out, f"{p}/attn/context/Transpose", perm=[0, 2, 1, 3])
        out = self.reshape(out, [1, -1, s.num_heads * hd], f"{p}/attn/context/Reshape_1")
        o_key = describe(s).attention.o
        o, entry = self.linear(f"{p}/attn/o_proj", out, self._qlinear(o_key, i))
        self.table[s.tensor_name(o_key, i)] = entry
        return o

    def _mlp(self, i: int, p: str, x: str) -> str:
        s, m = self.spec, describe(self.spec).mlp
        gate, up = (self.linear(f"{p}/mlp/{key}", x, self._qlinear(key, i)) for key in (m.gate, m.up))
        self.table[s.tensor_name(m.gate, i)], self.table[s.tensor_name(m.up, i)] = gate[1], up[1]
        gate, up = gate[0], up[0]
        # sigmoid's uint16 output scale is fixed at 1/65536 (what QNN's HTP requires)
        sig = self.op("Sigmoid", [gate], f"{p}/mlp/act_fn/Sigmoid", ("params", 1.0 / 65536, 0))
        act = self.op("Mul", [gate, sig], f"{p}/mlp/act_fn/Mul")
        hidden = self.op("Mul", [act, up], f"{p}/mlp/Mul")
        down, entry = self.linear(f"{p}/mlp/down_proj", hidden, self._qlinear(m.down, i))
        self.table[s.tensor_name(m.down, i)] = entry
        return down

    def _head(self, hidden: str, head: QLinear) -> None:
        s, g = self.spec, self.g
        last = self.move("Slice", hidden, "/model/last_position/Slice", g.const([-1]), g.const([INT64_MAX]),
                         g.const([1]))
        x = self._norm("/model/norm", last, self._get("final_norm"), s.tensor_name("final_norm"))
        logits, entry = self.linear("/lm_head", x, head)
        g.nodes[-1].output[0] = "logits"
        self.points["logits"] = self.points.pop(logits)
        self.table[s.tensor_name("embed" if s.tied_embeddings else "lm_head")] = entry


# ---- calibration and QDQ ---------------------------------------------------------------------
def lower_qnn(spec: ModelSpec, weights, folder: Path, variant: str, options, calibration=None) -> dict:
    """Write prefill.onnx, decode.onnx and their shared weights into ``folder``; return the
    manifest's graph section, weights table and backend. ``calibration``: the chat prompts' token
    ids whose activation ranges set the uint16 scales (the first CALIBRATION_PROMPTS are used);
    ``options.qnn``: the SoC (resolved by export) and the prefill chunk (tokens)."""
    if options.quant not in ("int8", "int4"):
        raise ExportError(f"--quant {options.quant}: the qnn variant runs integer weights on the NPU; "
                          "use --quant int8 (w8a16) or --quant int4 (w4a16)")
    if not calibration:
        raise ExportError("the qnn variant calibrates its uint16 activation ranges on chat prompts; none were given")
    soc_name = options.qnn.soc
    soc_model, htp_arch, marketing = QNN_SOCS[soc_name]
    seq = min(options.qnn.prefill_chunk, options.max_context)
    prompts = calibration[:CALIBRATION_PROMPTS]
    folder = Path(folder)
    graph = GraphWriter(folder, PREFILL)
    try:
        builder = _Builder(spec, weights, graph, options.max_context, seq)
        builder.build()
        graph.save()
    except BaseException:
        graph.abort()
        raise
    model = onnx.load(str(folder / PREFILL), load_external_data=False)
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", OPSET)])
    logger.info("calibrating %d activation ranges on %d prompts", len(builder.points), len(prompts))
    ranges = calibrate(model, folder, builder.points, spec, options.max_context, seq, prompts, options.threads)
    params = resolve_params(builder.points, ranges)
    quantized = insert_qdq(model, params)
    (folder / PREFILL).write_bytes(quantized.SerializeToString())
    (folder / DECODE).write_bytes(with_seq_len(quantized, spec, options.max_context, 1).SerializeToString())
    io = {v.name: {"scale": params[v.name][0], "zero_point": params[v.name][1]}
          for v in list(quantized.graph.input) + list(quantized.graph.output) if v.name in params}
    scheme = "w8a16: int8 per-channel weights" if options.quant == "int8" else "w4a16: int4 LPBQ weights"
    graph_section = {
        "prefill": {"file": PREFILL, "seq_len": seq}, "decode": {"file": DECODE, "seq_len": 1}, "data": DATA,
        "soc": {"name": soc_name, "soc_model": soc_model, "htp_arch": htp_arch, "marketing_name": marketing},
        "io": io, "kv_dtype": "uint16", "logits": "last",
        "quantization": {"scheme": scheme + ", uint16 per-tensor activations",
                         "calibration": {"prompts": len(prompts), "decode_steps": CALIBRATION_DECODE_STEPS,
                                         "method": "min/max"},
                         "activation_points": len(params), "requantized_weights": builder.requantized},
        "inputs": ["input_ids", "position_cos", "position_sin", "attention_mask", "past.{i}.key", "past.{i}.value"],
        "outputs": ["logits", "present.{i}.key", "present.{i}.value"],
    }
    return {"graph": graph_section, "weights": builder.table, "backend": "qnn"}


def verify_scorer(artifact, options):
    """What verifies a qnn artifact at export. Off a Snapdragon, onnxruntime-qnn's HTP is a simulator
    of about SIMULATED_WEIGHTS_PER_S (hours for SmolLM2's 24 prompts), so the same static QDQ graphs
    run on onnxruntime's CPU provider instead; the tests run them on the simulated HTP too."""
    import platform

    from runtimes.backends.qnn import QnnBackend

    from ..verify import RuntimeScorer
    on_snapdragon = platform.machine().lower() in ("aarch64", "arm64")
    scorer = RuntimeScorer(QnnBackend(artifact, provider=None if on_snapdragon else "cpu", threads=options.threads))
    scorer.verified_with = ("the QDQ graphs on the HTP" if on_snapdragon else
                            "the same static QDQ graphs on onnxruntime's CPU provider (the HTP is simulated here)")
    return scorer


# ---- precompiled context binaries ------------------------------------------------------------
def compile_context(folder: str | Path, progress=lambda s: None) -> dict:
    """Compile a qnn artifact's two graphs for its SoC into QNN context binaries (EPContext models
    ``prefill_ctx.onnx`` / ``decode_ctx.onnx`` beside ``*_ctx_qnn.bin``), which the qnn backend then
    loads without compiling. Needs onnxruntime-qnn (its HTP compiler runs on x86_64 too). The
    artifact is updated atomically, as build-engine does; returns the manifest's ``graph.context``,
    which records how many of each graph's nodes the QNN provider took (all of them, or it fails).

    Each graph gets its own binary: a weight-shared one (``ep.share_ep_contexts``) is written but
    does not load on onnxruntime-qnn 2.7's simulator (NOT_SUPPORTED, or a crash)."""
    import os
    import time

    import onnxruntime_qnn

    from runtimes.artifact import load_artifact
    from runtimes.backends.qnn import ep_assignment, qnn_session

    from ..artifact import publish, staging_folder, write_manifest
    folder = Path(folder).absolute()
    artifact = load_artifact(folder)
    manifest, graph = artifact.manifest, artifact.manifest.get("graph", {})
    if artifact.variant != "qnn":
        raise ExportError(f"{folder}: context binaries are compiled for --variant qnn artifacts; this one is "
                          f"{artifact.target}/{artifact.variant}")
    t0 = time.perf_counter()
    with staging_folder(folder, overwrite=True) as staging:
        old = set((graph.get("context") or {}).get("files", []))
        for name in manifest["files"]:
            if name not in old:
                os.link(folder / name, staging / name)
        context = {"soc": graph["soc"], "onnxruntime_qnn": onnxruntime_qnn.__version__,
                   "qnn_sdk": getattr(onnxruntime_qnn.build_and_package_info, "qnn_version", "")}
        for name in ("prefill", "decode"):
            progress(f"compiling {name} for {graph['soc']['name']} (HTP v{graph['soc']['htp_arch']})")
            context[name] = f"{name}_ctx.onnx"
            session = qnn_session(staging / graph[name]["file"], graph["soc"], session_config={
                "ep.context_enable": "1", "ep.context_embed_mode": "0",
                "ep.context_file_path": str(staging / context[name])})
            context.setdefault("nodes_by_provider", {})[name] = ep_assignment(session)  # CPU fallback is off
            del session
        context["files"] = sorted(p.name for p in staging.iterdir() if p.name.endswith(("_ctx.onnx", "_qnn.bin")))
        context["compile_seconds"] = round(time.perf_counter() - t0, 1)
        new = {k: v for k, v in manifest.items() if k != "files"}
        new["graph"] = dict(graph, context=context)
        write_manifest(staging, new)
        publish(staging, folder, overwrite=True)
    return context
