"""The optimum-onnx decoder graph: Gemm -> MatMul + Add, int4 by onnxruntime's MatMulNBitsQuantizer,
what was quantized, and the graph's inputs and outputs as the manifest describes them."""
from __future__ import annotations

import logging
from pathlib import Path

from runtimes.models import ModelSpec

MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"


def gemm_to_matmul(graph) -> int:
    """Gemm(A, B, C) with a constant B (GPT-2's Conv1D, some exporters' Linear) -> MatMul + Add, so
    MatMulNBits can take its weight. Returns how many were rewritten."""
    from onnx import helper, numpy_helper
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    nodes, count = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        weight = inits.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        if weight is None or not plain or (attrs.get("transB", 0) and uses[weight.name] > 1):
            nodes.append(node)
            continue
        if attrs.get("transB", 0):
            weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight).T.copy(), weight.name))
        base = node.name[:-len("/Gemm")] if node.name.endswith("/Gemm") else node.name
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        product = f"{base}/MatMul_output_0" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight.name], [product], name=f"{base}/MatMul"))
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [node.output[0]], name=f"{base}/Add"))
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def _constant_matmuls(graph) -> list:
    inits = {t.name: t for t in graph.initializer}
    return [(n, inits[n.input[1]]) for n in graph.node
            if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits]


def quantize(model, spec: ModelSpec, options):
    """int4 MatMulNBits for every constant-weight MatMul; the head (N == vocab) as --head says:
    int8 MatMulNBits (the default, as our own exporter), int4 with the rest, or kept float."""
    MatMulNBitsQuantizer = _quantizer_class()
    heads = [n.name for n, w in _constant_matmuls(model.graph) if n.op_type == "MatMul" and w.dims[-1] == spec.vocab_size]
    common = dict(block_size=options.group_size, is_symmetric=options.symmetric,
                  accuracy_level=options.ort.accuracy_level or None)
    body = MatMulNBitsQuantizer(model, bits=4, nodes_to_exclude=heads if options.head != "int4" else [], **common)
    body.process()
    model = body.model.model
    if options.head == "int8" and heads:
        head = MatMulNBitsQuantizer(model, bits=8, nodes_to_include=heads, **common)
        head.process()
        model = head.model.model
    return model


def _quantizer_class():
    """onnxruntime's MatMulNBitsQuantizer, imported without its module's logging.basicConfig(INFO)
    taking over the root logger, and with its per-node INFO lines off."""
    root = logging.getLogger()
    guard = None if root.handlers else logging.NullHandler()
    if guard:
        root.addHandler(guard)  # makes basicConfig a no-op
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer
    finally:
        if guard:
            root.removeHandler(guard)
    logging.getLogger(matmul_nbits_quantizer.__name__).setLevel(logging.WARNING)
    return matmul_nbits_quantizer.MatMulNBitsQuantizer


def quantized_weights(graph) -> dict:
    """What MatMulNBits now carries (by node, with bits and block) and which weights stayed float."""
    from onnx import helper
    tensors = {}
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            tensors[node.name] = {"bits": attrs["bits"], "block_size": attrs["block_size"], "K": attrs["K"],
                                  "N": attrs["N"], "zero_points": len(node.input) > 3 and bool(node.input[3])}
    return {"tensors": tensors, "kept_float": float_weights(graph)}


def float_weights(graph) -> list[str]:
    """Constant weights still float: MatMul/Gemm weights not quantized and embedding tables (Gather)."""
    inits = {t.name: t for t in graph.initializer}
    kept = [w.name for _, w in _constant_matmuls(graph)]
    kept += [n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
             and len(inits[n.input[0]].dims) == 2]
    return sorted(set(kept))


def graph_section(model_path: Path) -> dict:
    """Inputs and outputs as the backend must feed and read them (layer index as ``{i}``)."""
    import onnx
    model = onnx.load(str(model_path), load_external_data=False)
    templated = lambda names: list(dict.fromkeys(_template(n) for n in names))  # noqa: E731
    inputs = templated(i.name for i in model.graph.input)
    outputs = templated(o.name for o in model.graph.output)
    past = next(i for i in model.graph.input if i.name == "past_key_values.0.key")
    kv_dtype = onnx.helper.tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type).name
    data = DATA_FILE if (model_path.parent / DATA_FILE).is_file() else None
    return {"file": MODEL_FILE, "data": data, "kv": "concat", "kv_dtype": kv_dtype, "logits": "all",
            "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
            "inputs": inputs, "outputs": outputs,
            "extra_inputs": [n for n in inputs if n not in ("input_ids", "attention_mask")
                             and "{i}" not in n]}


def _template(name: str) -> str:
    parts = name.split(".")
    return ".".join("{i}" if p.isdigit() and parts[0] in ("past_key_values", "present") else p for p in parts)
