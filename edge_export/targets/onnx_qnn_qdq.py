"""Steps 2 and 3 of the qnn variant (see onnx_qnn.py): calibrate the float graph's activation
points on onnxruntime's CPU provider, layer by layer, turn each point's range into uint16 parameters, and insert the
QuantizeLinear/DequantizeLinear pairs; also the decode graph as the prefill graph at one token."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtimes.backends.qnn import prefill_chunks, step_inputs
from runtimes.models import ModelSpec

from ..errors import ExportError
from .onnx_layers import LayerGraph, padded_past

CALIBRATION_DECODE_STEPS = 8
MIN_RANGE = 1e-4
# Calibration keeps every layer's session (its weights folded to float32) between decode steps when
# the float copies take no more than this; a larger model loads each layer again at every step.
FOLD_WEIGHTS_BYTES = 2 << 30
ACT = ("act",)  # calibrated per-tensor range


def uint16_params(lo: float, hi: float) -> tuple[float, int]:
    """Scale and zero point of asymmetric uint16 over [lo, hi] widened to hold 0."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    hi = max(hi, lo + MIN_RANGE)
    scale = (hi - lo) / 65535.0
    return scale, int(np.clip(round(-lo / scale), 0, 65535))


def with_seq_len(model: onnx.ModelProto, spec: ModelSpec, max_context: int, seq: int) -> onnx.ModelProto:
    """The same graph for chunks of ``seq`` tokens: only its inputs' and outputs' shapes change
    (every Reshape inside is written with -1 / 0 where the sequence length goes)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    dims = {"input_ids": [1, seq], "attention_mask": [1, 1, seq, max_context + seq],
            "position_cos": [1, 1, seq, spec.head_dim], "position_sin": [1, 1, seq, spec.head_dim]}
    for value in list(out.graph.input) + list(out.graph.output):
        shape = dims.get(value.name)
        if value.name.startswith("present."):
            shape = [1, spec.num_kv_heads, seq, spec.head_dim]
        if shape:
            for dim, size in zip(value.type.tensor_type.shape.dim, shape):
                dim.dim_value = size
    return out


def resolve_params(points: dict[str, tuple], ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, int]]:
    """Every point's uint16 (scale, zero point): calibrated, fixed, or its source's."""
    params: dict[str, tuple[float, int]] = {}

    def get(t: str, depth: int = 0) -> tuple[float, int]:
        if t in params:
            return params[t]
        kind = points[t]
        if kind[0] == "same" and depth < 64:
            value = get(kind[1], depth + 1)
        elif kind[0] == "params":
            value = (float(kind[1]), int(kind[2]))
        elif kind[0] == "range":
            value = uint16_params(kind[1], kind[2])
        elif t in ranges:
            value = uint16_params(*ranges[t])
        else:
            raise ExportError(f"qnn calibration: activation {t} was never observed; nothing to set its scale from")
        params[t] = value
        return value

    for t in points:
        get(t)
    return params


def insert_qdq(model: onnx.ModelProto, params: dict[str, tuple[float, int]]) -> onnx.ModelProto:
    """A QuantizeLinear -> DequantizeLinear pair (uint16) at every tensor of ``params``; graph
    inputs and outputs among them become the uint16 codes themselves."""
    g = model.graph
    outputs = {v.name for v in g.output}
    dq_of: dict[str, str] = {}
    nodes, inits, written = [], [], set()

    def constants(t: str) -> tuple[str, str]:
        if f"{t}/scale" not in written:
            written.add(f"{t}/scale")
            inits.append(numpy_helper.from_array(np.array(params[t][0], np.float32), f"{t}/scale"))
            inits.append(numpy_helper.from_array(np.array(params[t][1], np.uint16), f"{t}/zero_point"))
        return f"{t}/scale", f"{t}/zero_point"

    def pair(t: str, source: str | None, codes: str) -> None:
        if source is not None:
            nodes.append(helper.make_node("QuantizeLinear", [source, *constants(t)], [codes],
                                          name=f"{t}/QuantizeLinear"))
        dq_of[t] = f"{t}/DequantizeLinear/output_0"
        nodes.append(helper.make_node("DequantizeLinear", [codes, *constants(t)], [dq_of[t]],
                                      name=f"{t}/DequantizeLinear"))

    for value in g.input:
        if value.name in params:
            value.type.tensor_type.elem_type = TensorProto.UINT16
            pair(value.name, None, value.name)
    for original in g.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)
        node.input[:] = [dq_of.get(x, x) for x in node.input]
        produced = [t for t in node.output if t in params]
        node.output[:] = [f"{t}/float" if t in outputs and t in params else t for t in node.output]
        nodes.append(node)
        for t in produced:
            if t in outputs:
                pair(t, f"{t}/float", t)
            else:
                pair(t, t, f"{t}/QuantizeLinear/output_0")
    for value in g.output:
        if value.name in params:
            value.type.tensor_type.elem_type = TensorProto.UINT16
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(inits)
    return model


def calibrate(model: onnx.ModelProto, folder: Path, points: dict, spec: ModelSpec, max_context: int, seq: int,
              prompts: list[list[int]], threads: int | None) -> dict[str, tuple[float, float]]:
    """Min/max of every calibrated point over ``prompts`` (prefilled as the runtime chunks them,
    then CALIBRATION_DECODE_STEPS greedy decode steps), on onnxruntime's CPU provider. The float
    graph runs layer-major (onnx_layers.LayerGraph): each layer's weights are loaded, folded to
    float once, and run over every prompt's chunks before the next layer, then once more per
    decode step; so memory holds about one layer in float, not the whole model."""
    observed = {t for t, kind in points.items() if kind == ACT}
    graph = LayerGraph(model, folder, keep=observed, session_config={"session.disable_quant_qdq": "1"},
                       threads=threads, hold=spec.parameter_count * 4 <= FOLD_WEIGHTS_BYTES)
    ranges: dict[str, list[float]] = {}
    prompts = [list(ids[-(max_context - CALIBRATION_DECODE_STEPS):]) for ids in prompts]
    caches: list[dict[str, np.ndarray]] = [{} for _ in prompts]  # per prompt: past.{i}.key -> filled rows
    lengths = [0] * len(prompts)
    shape = (1, spec.num_kv_heads, max_context, spec.head_dim)
    plan: list[list[tuple[int, int]]] = [[] for _ in prompts]  # per prompt, per run: (start, skip)

    def inputs(j: int, tokens: list[int], skip: int, sequence: int | None) -> dict:
        plan[j].append((lengths[j], skip))
        feeds = step_inputs(spec, max_context, tokens, skip, lengths[j], sequence, lambda _, x: x.astype(np.float32))
        lengths[j] += len(tokens) - skip
        return feeds

    def past(j: int, k: int, seg) -> dict:
        if seg.layer is None:
            return {}
        return {f"past.{seg.layer}.{kind}": padded_past(caches[j].get(f"{seg.layer}.{kind}"), shape)
                for kind in ("key", "value")}

    def absorb(j: int, k: int, seg, out: dict) -> None:
        skip = plan[j][k][1]
        for kind in ("key", "value") if seg.layer is not None else ():
            new = out[f"present.{seg.layer}.{kind}"][:, :, skip:]
            old = caches[j].get(f"{seg.layer}.{kind}")
            caches[j][f"{seg.layer}.{kind}"] = new if old is None else np.concatenate([old, new], axis=2)
        for t in observed.intersection(out):
            lo, hi = float(out[t].min()), float(out[t].max())
            r = ranges.setdefault(t, [lo, hi])
            r[0], r[1] = min(r[0], lo), max(r[1], hi)

    runs = [[inputs(j, tokens, skip, len(ids)) for tokens, skip in prefill_chunks(ids, seq)]
            for j, ids in enumerate(prompts)]
    for step in range(CALIBRATION_DECODE_STEPS + 1):
        done = graph.layer_major(runs, past, absorb)
        if step == CALIBRATION_DECODE_STEPS:
            break
        for j in range(len(prompts)):
            plan[j] = []
        # each prompt's next token: the greedy choice after its last run's (last row's) logits
        runs = [[inputs(j, [int(np.argmax(seq_values[-1]["logits"]))], 0, None)] for j, seq_values in enumerate(done)]
    return {t: (r[0], r[1]) for t, r in ranges.items()}


# ---- the lowering ----------------------------------------------------------------------------
