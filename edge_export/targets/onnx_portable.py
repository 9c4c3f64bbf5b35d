"""The ``portable`` variant of the ONNX target: standard ONNX ops only (opset 21), no contrib ops.

This is the graph TensorRT's parser and the NPU compilers ingest. Per linear: the weight as an
initializer of its quantized type feeding ``DequantizeLinear`` -> ``MatMul`` (INT4 blocked along
K with ``axis=0, block_size=g``; INT8 and FLOAT8E4M3FN per output channel, ``axis=1``), and for
fp8 with activation scales a ``QuantizeLinear`` -> ``DequantizeLinear`` pair on the input (the
explicit-quantization form TensorRT runs as an FP8 GEMM). Attention is plain MatMul / Softmax
over ``past`` concatenated with the new keys (present = [past, new]: no shared buffer), grouped
query heads by broadcasting one KV head over its group, rotary embeddings from cos/sin tables
gathered by position, RMSNorm spelled out. The embedding is a Gather on the (dequantized)
table; a tied lm_head shares that one DequantizeLinear.

Inputs and outputs have the ``ort`` variant's names, so the ``onnxruntime`` backend runs both
(``graph.kv == "concat"`` tells it to feed each present back as the next past).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
from onnx import TensorProto

from quantizers import QuantizationError
from quantizers.pack import pack_dequantizelinear
from runtimes import rope
from runtimes.models import ModelSpec, describe, layer_keys

from ..errors import ExportError
from .onnx_graph import GraphWriter, decoder_io
from .onnx_linear import checked_tensor, is_quantized

logger = logging.getLogger(__name__)

OPSETS = {"": 21}
KV_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
INT64_MAX = np.iinfo(np.int64).max
MASKED = float(np.finfo(np.float32).min)  # HF's additive mask value


@dataclasses.dataclass(frozen=True)
class PortableRules:
    """What a consumer of the portable graph accepts. TensorRT's IDequantizeLayer takes no
    non-zero zero points, so for it asymmetric int4 and GGUF Q4_1 residuals are refused."""
    zero_points: bool = True
    residual: bool = True
    consumer: str = "the portable variant"


def build_portable_decoder(spec: ModelSpec, weights, out_dir: str | Path, *, max_context: int,
                           kv_dtype: str = "float32", model_name: str = "model.onnx",
                           rules: PortableRules = PortableRules(), dtype: str = "float32") -> tuple[list[str], dict]:
    """Write ``model.onnx`` + ``model.onnx.data``; return (files, the manifest's weights table).

    ``weights.get(name)`` gives float32 arrays or QuantizedTensors (int4, int8, fp8). Logits are
    the last position's only ([batch, 1, vocab], float32). ``dtype`` is the activations' type:
    float16 stores every float initializer (scales included) in float16, so a strongly typed
    TensorRT network runs fp16 GEMMs; RMSNorm and softmax still compute in float32."""
    if dtype not in ("float32", "float16"):
        raise ExportError(f"portable dtype {dtype!r} must be float32 or float16")
    if dtype == "float16":
        kv_dtype = "float16"
    if kv_dtype not in KV_TYPES:
        raise ExportError(f"--kv-cache {kv_dtype} is not supported by the portable variant (use float32 or float16)")
    if not 0 < max_context <= spec.max_position_embeddings:
        raise ExportError(f"max_context={max_context} must be in 1..{spec.max_position_embeddings} "
                          "(the model's max_position_embeddings)")
    graph = GraphWriter(out_dir, model_name, opsets=OPSETS)
    try:
        builder = _PortableGraph(spec, weights, graph, max_context, kv_dtype, rules, dtype)
        builder.build()
        files = graph.save()
    except BaseException:
        graph.abort()
        raise
    return files, builder.table()


class _PortableGraph:
    def __init__(self, spec: ModelSpec, weights, graph: GraphWriter, max_context: int, kv_dtype: str,
                 rules: PortableRules, dtype: str = "float32"):
        self.spec, self.weights, self.g, self.rules = spec, weights, graph, rules
        self.np_float = np.dtype(dtype).type
        self.half = dtype == "float16"
        self.max_context, self.kv_type = max_context, KV_TYPES[kv_dtype]
        self.shapes = spec.tensor_shapes()
        self.entries: dict[str, dict] = {}  # HF name -> weights-table entry (initializer names, resolved later)
        self.head_table: str | None = None   # a tied head's dequantized [H, V] table, shared with the embedding

    def build(self) -> None:
        self._io()
        self._positions_and_mask()
        hidden = self._embedding()
        for i in range(self.spec.num_layers):
            hidden = self._layer(i, hidden)
            logger.debug("layer %d of %d written", i + 1, self.spec.num_layers)
        self._head(hidden)

    # ---- weights table -----------------------------------------------------------------
    def table(self) -> dict:
        """The manifest's weights table: initializer names resolved to byte references."""
        def resolve(entry):
            out = {}
            for key, value in entry.items():
                out[key] = self.g.ref(value) if key in _REF_KEYS and value else value
            return out
        return {name: resolve(entry) for name, entry in self.entries.items()}

    # ---- inputs, positions, mask -------------------------------------------------------
    def _io(self) -> None:
        decoder_io(self.g, self.spec, self.kv_type, 1)

    def _positions_and_mask(self) -> None:
        """Positions of the new tokens (cumulative sum of the mask, so left padding is skipped),
        the cos/sin they rotate by, and the additive mask [batch, 1, 1, seq, total]: a query at
        cache index t sees keys 0..t whose mask is 1."""
        g, s, base = self.g, self.spec, "/model/positions"
        seq = g.node("Gather", [g.node("Shape", ["input_ids"], f"{base}/Shape"), g.const(1)], f"{base}/seq", axis=0)
        total = g.node("Gather", [g.node("Shape", ["attention_mask"], f"{base}/total/Shape"), g.const(1)],
                       f"{base}/total", axis=0)
        cumsum = g.node("CumSum", ["attention_mask", g.const(1)], f"{base}/CumSum")
        positions = g.node("Sub", [cumsum, g.const(1)], f"{base}/Sub")
        start = g.node("Neg", [g.node("Unsqueeze", [seq, g.const([0])], f"{base}/seq/Unsqueeze")], f"{base}/Neg")
        positions = g.node("Slice", [positions, start, g.const([INT64_MAX]), g.const([1])], f"{base}/Slice")
        positions = g.node("Max", [positions, g.const(0)], f"{base}/Max")  # padded queries: position 0

        # rotate_half(x) * sin == swapped(x) * Concat(-sin, sin): one table each, full head width
        # (channels past rotary_dim: cos 1, sin 0). LongRoPE: the long tables past the original context.
        r, hd = rope.Rope.for_spec(s), describe(s).attention.head_dim
        sets = [(False, "")] + ([(True, "_long")] if r.switch is not None else [])
        tables = {}
        for long, suffix in sets:
            full = rope.full_width(*r.table(np.arange(self.max_context), long=long), hd)
            for name, table in zip(("cos", "sin"), full):
                tables.setdefault(name, []).append(g.weight(f"{name}_cache{suffix}", table.astype(self.np_float)))
        if r.switch is not None:
            long = g.node("Greater", [total, g.const(r.switch)], f"{base}/long/Greater")
            tables = {name: [g.node("Where", [long, pair[1], pair[0]], f"{base}/{name}/Where")]
                      for name, pair in tables.items()}
        for name, (table,) in tables.items():
            rows = g.node("Gather", [table, positions], f"{base}/{name}/Gather")
            setattr(self, name, g.node("Unsqueeze", [rows, g.const([1])], f"{base}/{name}/Unsqueeze"))

        m = "/model/attn_mask"
        keys = g.node("Range", [g.const(0), total, g.const(1)], f"{m}/keys/Range")
        queries = g.node("Range", [g.node("Sub", [total, seq], f"{m}/past"), total, g.const(1)], f"{m}/queries/Range")
        causal = g.node("LessOrEqual", [g.node("Unsqueeze", [keys, g.const([0])], f"{m}/keys/Unsqueeze"),
                                        g.node("Unsqueeze", [queries, g.const([1])], f"{m}/queries/Unsqueeze")],
                        f"{m}/causal")
        present = g.node("Cast", ["attention_mask"], f"{m}/Cast", to=TensorProto.BOOL)
        present = g.node("Unsqueeze", [present, g.const([1])], f"{m}/present/Unsqueeze")
        allowed = g.node("And", [causal, present], f"{m}/And")
        bias = g.node("Where", [allowed, g.const(0.0, np.float32), g.const(MASKED, np.float32)], f"{m}/Where")
        self.mask = g.node("Unsqueeze", [bias, g.const([1, 2])], f"{m}/Unsqueeze")

    # ---- weights ---------------------------------------------------------------------
    def _get(self, key: str, layer: int | None = None):
        name = self.spec.tensor_name(key, layer)
        return name, checked_tensor(self.weights, name, self.shapes[name])

    def _float(self, name: str, array: np.ndarray, entry_name: str | None = None) -> str:
        init = self.g.weight(name, np.asarray(array, self.np_float))
        if entry_name:
            self.entries[entry_name] = {"format": "float", "data": init}
        return init

    def _dequantized(self, base: str, hf_name: str, value) -> tuple[str, dict]:
        """The weight [K, N] as a graph value: a float initializer, or a DequantizeLinear of its
        codes. Returns (value name, weights-table entry)."""
        g, stem = self.g, base.lstrip("/").replace("/", ".")
        if not is_quantized(value):
            init = g.weight(f"{stem}.weight", np.ascontiguousarray(np.asarray(value, self.np_float).T))
            return init, {"format": "float", "data": init, "transpose": True}
        if value.residual is not None and not self.rules.residual:
            raise ExportError(f"tensor {hf_name}: GGUF blocks with a float minimum per group (Q4_1, Q4_K, Q5_1, "
                              f"Q5_K, Q2_K) cannot be carried by {self.rules.consumer}; export with --method rtn, "
                              "awq or gptq")
        if value.zero_points is not None and not self.rules.zero_points:
            raise ExportError(f"tensor {hf_name}: asymmetric int4 (zero points) cannot be carried by "
                              f"{self.rules.consumer}, whose dequantization takes no zero point; "
                              "export with --symmetric")
        try:
            packed = pack_dequantizelinear(dataclasses.replace(value, residual=None))
        except QuantizationError as e:
            raise ExportError(f"tensor {hf_name}: {e}") from e
        data = g.weight(f"{stem}.qweight", packed["data"], data_type=packed["data_type"])
        scale = g.weight(f"{stem}.scales", packed["scale"].astype(self.np_float))
        inputs = [data, scale]
        zero = None
        if packed["zero_point"] is not None:
            zero = g.weight(f"{stem}.qzeros", packed["zero_point"], data_type=packed["data_type"])
            inputs.append(zero)
        attrs = {"axis": packed["axis"]}
        if packed["block_size"]:
            attrs["block_size"] = packed["block_size"]
        w = g.node("DequantizeLinear", inputs, f"{base}/DequantizeLinear", **attrs)
        entry = {"format": "dequantizelinear", "data": data, "data_type": packed["data_type"],
                 "shape": list(packed["data"].shape), "scale": scale, "zero_point": zero,
                 "axis": packed["axis"], "block_size": packed["block_size"]}
        return w, entry

    def _linear(self, base: str, x: str, hf_name: str, value, bias: str | None = None) -> str:
        """y = x @ W.T (+ bias) for x [batch, seq, K]; W's stored form goes into the table."""
        g, stem = self.g, base.lstrip("/").replace("/", ".")
        w, entry = self._dequantized(base, hf_name, value)
        if is_quantized(value) and value.input_scale is not None:  # AWQ: the codes quantize W * s
            inverse = g.weight(f"{stem}.input_scale_inverse", (1.0 / value.input_scale).astype(self.np_float))
            x = g.node("Mul", [x, inverse], f"{base}/input_scale/Mul")
            entry["input_scale_inverse"] = inverse
        if is_quantized(value) and value.activation_scale is not None:
            # FP8 activations: per-tensor scale from calibration; Q/DQ in front of the GEMM.
            a_scale = g.weight(f"{stem}.input_scale", np.array(value.activation_scale, self.np_float))
            zero = g.weight(f"{stem}.input_zero_point", np.zeros((), np.uint8), data_type="FLOAT8E4M3FN")
            xq = g.node("QuantizeLinear", [x, a_scale, zero], f"{base}/input/QuantizeLinear", saturate=1)
            x = g.node("DequantizeLinear", [xq, a_scale, zero], f"{base}/input/DequantizeLinear")
            entry["activation_scale"] = float(value.activation_scale)
        y = g.node("MatMul", [x, w], f"{base}/MatMul")
        if is_quantized(value) and value.residual is not None:
            y = g.node("Add", [y, self._residual(base, stem, x, value, entry)], f"{base}/residual/Add")
        if bias is not None:
            y = g.node("Add", [y, bias], f"{base}/Add")
        self.entries[hf_name] = entry
        return y

    def _residual(self, base: str, stem: str, x: str, value, entry: dict) -> str:
        """A GGUF minimum exactly (Q4_1, Q4_K, Q5_1, ...): (x summed over each group of K) @ residual.T
        beside the MatMul."""
        g = self.g
        n, k = value.shape
        blocks = k // value.group_size
        sums = g.node("ReduceSum", [g.node("Reshape", [x, g.const([0, 0, blocks, value.group_size])],
                                           f"{base}/residual/Reshape"), g.const([-1])],
                      f"{base}/residual/ReduceSum", keepdims=0)
        table = g.weight(f"{stem}.residual", np.ascontiguousarray(value.residual.T.astype(self.np_float)))
        entry["residual"] = table
        return g.node("MatMul", [sums, table], f"{base}/residual/MatMul")

    # ---- embedding and head ------------------------------------------------------------
    def _embedding(self) -> str:
        """Rows of the table: Gather on axis 1 of its [hidden, vocab] form (the lm_head's MatMul
        operand), so a tied head and the embedding share one initializer and one DequantizeLinear."""
        g, base = self.g, "/model/embed_tokens"
        name, table = self._get("embed")
        stored, entry = self._dequantized(base, name, table)
        if is_quantized(table) and table.residual is not None:  # Q4_1: + r per block of H, for every row
            h, blocks = self.spec.hidden_size, table.residual.shape[1]
            split = g.node("Reshape", [stored, g.const([blocks, h // blocks, -1])], f"{base}/residual/Reshape")
            r = g.weight("model.embed_tokens.residual", np.ascontiguousarray(table.residual.T.astype(self.np_float)))
            entry["residual"] = r
            r = g.node("Unsqueeze", [r, g.const([1])], f"{base}/residual/Unsqueeze")
            stored = g.node("Reshape", [g.node("Add", [split, r], f"{base}/residual/Add"), g.const([h, -1])],
                            f"{base}/residual/Reshape_1")
        if is_quantized(table) and table.input_scale is not None:  # AWQ: the codes hold W * s
            inverse = (1.0 / table.input_scale).astype(self.np_float)[:, None]
            entry["input_scale_inverse"] = g.weight("model.embed_tokens.input_scale_inverse", inverse)
            stored = g.node("Mul", [stored, entry["input_scale_inverse"]], f"{base}/input_scale/Mul")
        self.entries[name] = entry
        if self.spec.tied_embeddings:
            self.head_table = stored
        columns = g.node("Gather", [stored, "input_ids"], f"{base}/Gather", axis=1)
        return g.node("Transpose", [columns], f"{base}/Transpose", perm=[1, 2, 0])

    def _head(self, hidden: str) -> None:
        g = self.g
        last = g.node("Slice", [hidden, g.const([-1]), g.const([INT64_MAX]), g.const([1])], "/model/last_position/Slice")
        x = self._rms_norm("/model/norm", last, *self._get("final_norm"))
        if self.head_table is not None:
            y = g.node("MatMul", [x, self.head_table], "/lm_head/MatMul")
        else:
            y = self._linear("/lm_head", x, *self._get("lm_head"))
        if self.half:
            g.node("Cast", [y], "/lm_head/Cast", to=TensorProto.FLOAT, outputs=["logits"])
        else:
            g.node("Identity", [y], "/lm_head/Identity", outputs=["logits"])

    # ---- one decoder layer -------------------------------------------------------------
    def _layer(self, i: int, hidden: str) -> str:
        p, lw = f"/model/layers.{i}", {k: self._get(k, i) for k in layer_keys(self.spec)}
        steps = describe(self.spec)
        x = self._rms_norm(f"{p}/input_layernorm", hidden, *lw[steps.attn_norm.weight], steps.attn_norm.eps)
        attn = self._attention(i, p, lw, x)
        hidden = self.g.node("Add", [hidden, attn], f"{p}/attn/residual/Add")
        x = self._rms_norm(f"{p}/post_attention_layernorm", hidden, *lw[steps.mlp_norm.weight], steps.mlp_norm.eps)
        return self.g.node("Add", [hidden, self._mlp(p, lw, x)], f"{p}/mlp/residual/Add")

    def _rms_norm(self, base: str, x: str, hf_name: str, gamma: np.ndarray, eps: float | None = None) -> str:
        g, eps = self.g, self.spec.rms_norm_eps if eps is None else eps
        weight = self._float(base[1:].replace("/", ".") + ".weight", gamma, hf_name)
        if self.half:  # the mean of squares overflows fp16 easily: normalize in float32
            x = g.node("Cast", [x], f"{base}/Cast", to=TensorProto.FLOAT)
            weight = g.node("Cast", [weight], f"{base}/weight/Cast", to=TensorProto.FLOAT)
        square = g.node("Mul", [x, x], f"{base}/Mul")
        mean = g.node("ReduceMean", [square, g.const([-1])], f"{base}/ReduceMean", keepdims=1)
        root = g.node("Sqrt", [g.node("Add", [mean, g.const(eps, np.float32)], f"{base}/Add")],
                      f"{base}/Sqrt")
        normed = g.node("Mul", [g.node("Div", [x, root], f"{base}/Div"), weight], f"{base}/Mul_1")
        return g.node("Cast", [normed], f"{base}/Cast_1", to=TensorProto.FLOAT16) if self.half else normed

    def _heads(self, base: str, x: str, heads: int) -> str:
        """[batch, seq, heads * head_dim] -> [batch, heads, seq, head_dim]."""
        g = self.g
        split = g.node("Reshape", [x, g.const([0, 0, heads, self.spec.head_dim])], f"{base}/Reshape")
        return g.node("Transpose", [split], f"{base}/Transpose", perm=[0, 2, 1, 3])

    def _rotate(self, base: str, x: str) -> str:
        """x * cos + swapped(x) * sin, x [batch, heads, seq, head_dim]: the rotary step, whose
        first rotary_dim channels rotate (rotate_half) and the rest pass (cos 1, sin 0)."""
        g, a = self.g, describe(self.spec).attention
        half, rest = a.rotary_dim // 2, a.head_dim - a.rotary_dim
        sizes = [half, half] + ([rest] if rest else [])
        parts = g.node("Split", [x, g.const(sizes)], f"{base}/Split", outputs=len(sizes), axis=-1)
        swapped = g.node("Concat", [parts[1], parts[0], *parts[2:]], f"{base}/Concat", axis=-1)
        return g.node("Add", [g.node("Mul", [x, self.cos], f"{base}/cos/Mul"),
                              g.node("Mul", [swapped, self.sin], f"{base}/sin/Mul")], f"{base}/Add")

    def _attention(self, i: int, p: str, lw: dict, x: str) -> str:
        g, a = self.g, describe(self.spec).attention
        group = a.group
        proj = {}
        for kind, key in zip("qkv", (a.q, a.k, a.v)):
            bias = None
            if a.bias:
                bias_name, bias_value = lw[a.bias["qkv".index(kind)]]
                bias = self._float(f"{p[1:]}.attn.{kind}_proj.bias".replace("/", "."), bias_value, bias_name)
            proj[kind] = self._linear(f"{p}/attn/{kind}_proj", x, *lw[key], bias=bias)
        heads = {"q": a.heads, "k": a.kv_heads, "v": a.kv_heads}
        q, k, v = (self._heads(f"{p}/attn/{kind}", proj[kind], heads[kind]) for kind in "qkv")
        if a.head_norm:
            q_norm, k_norm = a.head_norm
            q = self._rms_norm(f"{p}/attn/q_norm", q, *lw[q_norm.weight], q_norm.eps)
            k = self._rms_norm(f"{p}/attn/k_norm", k, *lw[k_norm.weight], k_norm.eps)
        q = self._rotate(f"{p}/attn/q_rotary", q)
        k = self._rotate(f"{p}/attn/k_rotary", k)
        k_all = self._cache(p, i, "key", k)
        v_all = self._cache(p, i, "value", v)
        # Each KV head serves `group` query heads: q [b, H, s, d] -> [b, KV, group, s, d] against
        # k [b, KV, 1, T, d], broadcast; no repeated keys are materialised.
        n = f"{p}/attn"
        q5 = g.node("Reshape", [q, g.const([0, a.kv_heads, group, -1, a.head_dim])], f"{n}/q/Reshape_1")
        k5 = g.node("Unsqueeze", [k_all, g.const([2])], f"{n}/k/Unsqueeze")
        v5 = g.node("Unsqueeze", [v_all, g.const([2])], f"{n}/v/Unsqueeze")
        kt = g.node("Transpose", [k5], f"{n}/k/Transpose_1", perm=[0, 1, 2, 4, 3])
        scores = g.node("MatMul", [q5, kt], f"{n}/scores/MatMul")
        if self.half:
            scores = g.node("Cast", [scores], f"{n}/scores/Cast", to=TensorProto.FLOAT)
        scores = g.node("Mul", [scores, g.const(1.0 / math.sqrt(a.head_dim), np.float32)], f"{n}/scores/Mul")
        scores = g.node("Add", [scores, self.mask], f"{n}/scores/Add")
        probs = g.node("Softmax", [scores], f"{n}/Softmax", axis=-1)
        if self.half:
            probs = g.node("Cast", [probs], f"{n}/Softmax/Cast", to=TensorProto.FLOAT16)
        ctx = g.node("MatMul", [probs, v5], f"{n}/context/MatMul")
        ctx = g.node("Reshape", [ctx, g.const([0, a.heads, -1, a.head_dim])], f"{n}/context/Reshape")
        ctx = g.node("Transpose", [ctx], f"{n}/context/Transpose", perm=[0, 2, 1, 3])
        ctx = g.node("Reshape", [ctx, g.const([0, 0, a.heads * a.head_dim])], f"{n}/context/Reshape_1")
        return self._linear(f"{p}/attn/o_proj", ctx, *lw[a.o])

    def _cache(self, p: str, i: int, kind: str, new: str) -> str:
        """present = Concat(past, new) along the sequence; returns it in the compute type."""
        g, base = self.g, f"{p}/attn/{kind}_cache"
        compute = TensorProto.FLOAT16 if self.half else TensorProto.FLOAT
        if self.kv_type != compute:
            new = g.node("Cast", [new], f"{base}/Cast", to=self.kv_type)
        present = g.node("Concat", [f"past_key_values.{i}.{kind}", new], f"{base}/Concat", axis=2,
                         outputs=[f"present.{i}.{kind}"])
        if self.kv_type != compute:
            present = g.node("Cast", [present], f"{base}/Cast_1", to=compute)
        return present

    def _mlp(self, p: str, lw: dict, x: str) -> str:
        g, m = self.g, describe(self.spec).mlp
        gate = self._linear(f"{p}/mlp/gate_proj", x, *lw[m.gate])
        up = self._linear(f"{p}/mlp/up_proj", x, *lw[m.up])
        act = g.node("Mul", [gate, g.node("Sigmoid", [gate], f"{p}/mlp/act_fn/Sigmoid")], f"{p}/mlp/act_fn/Mul")
        return self._linear(f"{p}/mlp/down_proj", g.node("Mul", [act, up], f"{p}/mlp/Mul"), *lw[m.down])


_REF_KEYS = ("data", "scale", "zero_point", "residual", "input_scale_inverse")

