"""The manifest's ``weights`` table for an ONNX artifact: where each HF tensor's stored form lives.

Read from the written graph itself (node names are deterministic, see onnx_ort.py), so the table
describes exactly what the graph computes with, AWQ folding and fused q/k/v included. The
`reference` runtime backend reads it with numpy alone (runtimes/weights.py).
"""
from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from runtimes.models import describe

from ..errors import ExportError

DTYPE_NAMES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.UINT8: "uint8",
               TensorProto.INT8: "int8"}


class _Graph:
    def __init__(self, model_path: Path):
        model = onnx.load(str(model_path), load_external_data=False)
        self.nodes = {n.name: n for n in model.graph.node}
        self.inits = {t.name: t for t in model.graph.initializer}

    def ref(self, name: str) -> dict:
        t = self.inits.get(name)
        if t is None or t.data_location != TensorProto.EXTERNAL:
            raise ExportError(f"weights table: initializer '{name}' is not stored in external data")
        ext = {e.key: e.value for e in t.external_data}
        return {"file": ext["location"], "offset": int(ext.get("offset", 0)), "length": int(ext["length"]),
                "dtype": DTYPE_NAMES[t.data_type], "shape": list(t.dims)}

    def node(self, name: str):
        return self.nodes.get(name)


def weights_table(model_path: str | Path, spec) -> dict:
    """HF tensor name -> stored-form entry (runtimes/weights.py's formats) for an ort graph."""
    g, table = _Graph(Path(model_path)), {}
    steps = describe(spec)
    a, m = steps.attention, steps.mlp
    for i in range(spec.num_layers):
        p = f"/model/layers.{i}"
        name = lambda key: spec.tensor_name(key, i) if key else None  # noqa: E731
        table[name(steps.attn_norm.weight)] = _norm(g, f"{p}/input_layernorm")
        table[name(steps.mlp_norm.weight)] = _norm(g, f"{p}/post_attention_layernorm")
        biases = a.bias or (None, None, None)
        rows = (0, a.q_dim, a.q_dim + a.kv_dim, a.q_dim + 2 * a.kv_dim)
        splits = [(kind, key, bias, rows[j], rows[j + 1])
                  for j, (kind, key, bias) in enumerate(zip("qkv", (a.q, a.k, a.v), biases))]
        _linears(g, table, f"{p}/attn/qkv_proj", [(name(key), name(bias), lo, hi) for _, key, bias, lo, hi in splits],
                 [(name(key), name(bias), f"{p}/attn/{kind}_proj") for kind, key, bias, _, _ in splits])
        _linears(g, table, None, [], [(name(a.o), None, f"{p}/attn/o_proj")])
        f = m.intermediate
        _linears(g, table, f"{p}/mlp/gate_up_proj",
                 [(name(m.gate), None, 0, f), (name(m.up), None, f, 2 * f)],
                 [(name(m.gate), None, f"{p}/mlp/gate_proj"), (name(m.up), None, f"{p}/mlp/up_proj")])
        _linears(g, table, None, [], [(name(m.down), None, f"{p}/mlp/down_proj")])
        for norm, kind in zip(a.head_norm or (), ("q_norm", "k_norm")):
            node = g.node(f"{p}/attn/{kind}/SimplifiedLayerNorm")
            table[name(norm.weight)] = {"format": "float", "data": g.ref(node.input[1])}
    table[spec.tensor_name("final_norm")] = _norm(g, "/model/norm")
    head = _linear_entry(g, "/lm_head")
    table[spec.tensor_name("embed")] = _embedding(g, spec, head)
    if not spec.tied_embeddings:
        table[spec.tensor_name("lm_head")] = head
    missing = set(spec.tensor_shapes()) - set(table)
    if missing:
        raise ExportError(f"weights table: no stored form found for {sorted(missing)[:3]}")
    return table


def _norm(g: _Graph, base: str) -> dict:
    node = g.node(f"{base}/SimplifiedLayerNorm")
    if node is not None:
        return {"format": "float", "data": g.ref(node.input[1])}
    node = g.node(f"{base}/SkipSimplifiedLayerNorm")
    if node is None:
        raise ExportError(f"weights table: no norm node under {base}")
    return {"format": "float", "data": g.ref(node.input[2])}


def _linears(g: _Graph, table: dict, fused: str | None, fused_rows: list, separate: list) -> None:
    """Fill table entries for linears that are either fused row-wise at ``fused`` or separate."""
    if fused and (g.node(f"{fused}/MatMulNBits") or g.node(f"{fused}/MatMul")):
        entry, bias = _linear_entry(g, fused), _bias(g, fused)
        for weight_name, bias_name, start, stop in fused_rows:
            table[weight_name] = dict(entry, rows=[start, stop])
            if bias is not None and bias_name:
                table[bias_name] = dict(bias, rows=[start, stop])
        return
    for weight_name, bias_name, base in separate:
        table[weight_name] = _linear_entry(g, base)
        bias = _bias(g, base)
        if bias is not None and bias_name:
            table[bias_name] = bias


def _linear_entry(g: _Graph, base: str) -> dict:
    node = g.node(f"{base}/MatMulNBits")
    if node is None:
        node = g.node(f"{base}/MatMul")
        if node is None:
            raise ExportError(f"weights table: no MatMul or MatMulNBits at {base}")
        entry = {"format": "float", "data": g.ref(node.input[1]), "transpose": True}
    else:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        entry = {"format": "matmulnbits", "B": g.ref(node.input[1]), "scales": g.ref(node.input[2]),
                 "zero_points": g.ref(node.input[3]) if len(node.input) > 3 and node.input[3] else None,
                 "zero_points_packed": True, "N": attrs["N"], "K": attrs["K"], "bits": attrs["bits"],
                 "block_size": attrs["block_size"]}
        residual = g.node(f"{base}/residual/MatMul")
        if residual is not None:
            entry["residual"] = g.ref(residual.input[1])
            entry["residual_transposed"] = True
    scale = g.node(f"{base}/input_scale/Mul")
    if scale is not None:
        entry["input_scale_inverse"] = g.ref(scale.input[1])
    return entry


def _bias(g: _Graph, base: str) -> dict | None:
    node = g.node(f"{base}/MatMulNBits")
    if node is not None and len(node.input) > 5 and node.input[5]:
        return {"format": "float", "data": g.ref(node.input[5])}
    add = g.node(f"{base}/Add")
    return {"format": "float", "data": g.ref(add.input[1])} if add is not None else None


def _embedding(g: _Graph, spec, head: dict) -> dict:
    base = "/model/embed_tokens"
    gather = g.node(f"{base}/Gather")
    if gather is not None:
        axis = next((helper.get_attribute_value(a) for a in gather.attribute if a.name == "axis"), 0)
        return {"format": "float", "data": g.ref(gather.input[0]), "transpose": axis == 1}
    node = g.node(f"{base}/GatherBlockQuantized")
    if node is None:
        raise ExportError("weights table: no embedding node")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    data = g.ref(node.input[0])
    rows, blocks = data["shape"][0], data["shape"][1]
    scales_name = node.input[2]
    scales = g.ref(scales_name) if scales_name in g.inits else head["scales"]
    entry = {"format": "matmulnbits", "B": data, "scales": scales,
             "zero_points": g.ref(node.input[3]) if len(node.input) > 3 and node.input[3] else None,
             "zero_points_packed": False, "N": rows, "K": spec.hidden_size, "bits": attrs["bits"],
             "block_size": attrs["block_size"]}
    residual = g.node(f"{base}/residual/Gather")
    if residual is not None:
        entry["residual"] = g.ref(residual.input[0])
    scale = g.node(f"{base}/input_scale/Mul")
    if scale is not None:
        entry["input_scale_inverse"] = g.ref(scale.input[1])
    del blocks
    return entry
