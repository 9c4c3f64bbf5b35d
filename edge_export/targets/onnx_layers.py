"""An ONNX decoder graph run one layer at a time, layer-major over many sequences.

The graph's nodes are cut into segments by their names (GraphWriter names every node of layer i
``/model/layers.{i}/...``): what comes before the first layer (the embedding), each layer, and
what comes after the last (the head). Each segment becomes a small model of those nodes and the
initializers they read, loaded from the graph's external data, so an onnxruntime session holds one
segment's weights at a time (with ``session.disable_quant_qdq`` its DequantizeLinear weights
folded to float: one layer in float, not the whole model). :meth:`LayerGraph.layer_major` runs
every segment over every run of every sequence before the next segment, as
edge_export/verify.py's LayerMajorScorer runs the reference decoder: the same ops, the same stored
weights, the same arithmetic as the whole graph, in about one layer's memory.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import helper

from ..errors import ExportError

logger = logging.getLogger(__name__)
LAYER_NODE = re.compile(r"^/model/layers\.(\d+)/")


@dataclasses.dataclass
class Segment:
    """Nodes of one part of the graph; ``inputs`` come from the caller's feeds or earlier
    segments, ``outputs`` are what later segments, the caller or ``keep`` need."""
    name: str
    layer: int | None
    nodes: list
    inputs: list[str]
    outputs: list[str]
    carry: list[str]  # outputs held for later segments (or returned)
    drop: list[str]  # values no later segment reads


class LayerGraph:
    """``model``: the graph without its external data (onnx.load(..., load_external_data=False)),
    whose weights are in ``folder``. ``keep``: intermediate tensors every run also returns (e.g.
    calibration points); ``returns``: graph outputs carried to the end of :meth:`layer_major`
    (the others are only handed to its ``absorb``). ``hold``: keep every segment's session after
    its first use (a model whose float weights fit in memory), else build each when it runs."""

    def __init__(self, model: onnx.ModelProto, folder: str | Path, keep: Iterable[str] = (),
                 returns: Iterable[str] = ("logits",), session_config: dict | None = None,
                 threads: int | None = None, hold: bool = False):
        self.model, self.folder = model, Path(folder)
        self.session_config, self.threads, self.hold = dict(session_config or {}), threads, hold
        self.types = _elem_types(model)
        self.segments = _split(model, set(keep), set(returns))
        self._sessions: dict[str, object] = {}

    def session(self, seg: Segment):
        if seg.name in self._sessions:
            return self._sessions[seg.name]
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = False  # sessions held side by side would each keep an arena at its peak
        # the segment's initializers stay references into the graph's external data, read by
        # onnxruntime itself: not a protobuf copy plus its serialized bytes before the session's own
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.folder))
        for key, value in self.session_config.items():
            options.add_session_config_entry(key, str(value))
        if self.threads:
            options.intra_op_num_threads = int(self.threads)
        session = ort.InferenceSession(self._segment_model(seg), options, providers=["CPUExecutionProvider"])
        if self.hold:
            self._sessions[seg.name] = session
        return session

    def _segment_model(self, seg: Segment) -> bytes:
        """The segment as a model of its own, reading its initializers from the graph's external data."""
        used = {x for node in seg.nodes for x in node.input}
        inits = [t for t in self.model.graph.initializer if t.name in used]
        def value(name: str):
            return helper.make_tensor_value_info(name, self.types.get(name, onnx.TensorProto.FLOAT), None)
        graph = helper.make_graph(_gather_before_dequantize(seg.nodes, inits), seg.name,
                                  [value(n) for n in seg.inputs], [value(n) for n in seg.outputs], inits)
        model = helper.make_model(graph, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
        return model.SerializeToString()

    def layer_major(self, runs: list[list[dict]], extra_feeds: Callable[[int, int, Segment], dict],
                    absorb: Callable[[int, int, Segment, dict], None]) -> list[list[dict]]:
        """``runs[j]``: sequence j's runs in order, each the graph-input feeds it takes (besides
        those ``extra_feeds(j, k, segment)`` adds, e.g. that layer's KV cache). Every segment runs
        over every run before the next segment; ``absorb(j, k, segment, outputs)`` sees each run's
        outputs. Returns, per run, what is left of its values: the ``returns`` outputs."""
        values = [[dict(feeds) for feeds in seq] for seq in runs]
        for seg in self.segments:
            logger.debug("%s over %d runs", seg.name, sum(len(seq) for seq in values))
            session = self.session(seg)
            for j, seq in enumerate(values):
                for k, held in enumerate(seq):
                    feeds = {n: held[n] for n in seg.inputs if n in held}
                    feeds.update(extra_feeds(j, k, seg))
                    out = dict(zip(seg.outputs, session.run(seg.outputs, feeds)))
                    absorb(j, k, seg, out)
                    for n in seg.drop:
                        held.pop(n, None)
                    held.update((n, out[n]) for n in seg.carry)
            del session
        return values


def _split(model: onnx.ModelProto, keep: set[str], returns: set[str]) -> list[Segment]:
    """The graph's nodes (in their stored, topological order) as embed, layers.{i} and head. A
    node computed from initializers alone (a weight's DequantizeLinear, a tied embedding shared
    with the lm_head) goes into every segment that reads it, so no weight crosses segments."""
    initializers = {t.name for t in model.graph.initializer}
    constant, producer = set(initializers), {}
    for index, node in enumerate(model.graph.node):
        for out in node.output:
            producer[out] = index
        if all(not x or x in constant for x in node.input):
            constant.update(node.output)
    groups: dict[str, list[int]] = {}
    layers: dict[str, int | None] = {}
    current = None
    for index, node in enumerate(model.graph.node):
        if all(out in constant for out in node.output):
            continue  # placed below, where read
        match = LAYER_NODE.match(node.name)
        name = f"layers.{int(match.group(1))}" if match else ("embed" if not groups or current == "embed" else "head")
        if name != current and name in groups:  # each part's nodes must be contiguous
            raise ExportError(f"{node.name}: the graph's layers are not contiguous; it cannot run layer by layer")
        if name not in groups:
            groups[name], layers[name] = [], int(match.group(1)) if match else None
        groups[name].append(index)
        current = name
    nodes = model.graph.node
    for name, indices in groups.items():
        needed, stack = set(), [x for i in indices for x in nodes[i].input]
        while stack:
            x = stack.pop()
            if x in constant and x in producer and producer[x] not in needed:
                needed.add(producer[x])
                stack.extend(nodes[producer[x]].input)
        groups[name] = sorted(set(indices) | needed)
    outputs = {v.name for v in model.graph.output}
    order = list(groups)
    reads = {name: {x for i in groups[name] for x in nodes[i].input} - constant for name in order}
    segments = []
    for index, name in enumerate(order):
        produced = [out for i in groups[name] for out in nodes[i].output if out not in constant]
        own = set(produced)
        inputs = list(dict.fromkeys(x for i in groups[name] for x in nodes[i].input
                                    if x and x not in constant and x not in own))
        later = set().union(*(reads[other] for other in order[index + 1:]))
        carry = [t for t in produced if t in later or t in returns]
        segment_outputs = [t for t in produced if t in later or t in outputs or t in keep]
        drop = [x for x in inputs if x not in later and x not in returns]
        segments.append(Segment(name, layers[name], [nodes[i] for i in groups[name]], inputs, segment_outputs,
                                carry, drop))
    return segments


def _gather_before_dequantize(nodes: list, initializers: list) -> list:
    """``Gather(DequantizeLinear(table), ids)`` with a per-tensor scale, as ``DequantizeLinear(
    Gather(table, ids))``: the same numbers (the dequantization is elementwise), but only the
    gathered rows are made float, not the whole table (152k x 3.5k: 2 GiB, every run)."""
    stored = {t.name for t in initializers}
    readers: dict[str, int] = {}
    for node in nodes:
        for x in node.input:
            readers[x] = readers.get(x, 0) + 1
    producer = {out: node for node in nodes for out in node.output}
    scalar = {t.name for t in initializers if not t.dims} | {
        n.output[0] for n in nodes if n.op_type == "Constant" and not any(
            a.name == "value" and a.t.dims for a in n.attribute)}
    swapped, out = set(), []
    for node in nodes:
        dq = producer.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0) if dq is not None else None
        if (dq is not None and dq.op_type == "DequantizeLinear" and axis == 0 and readers[dq.output[0]] == 1
                and dq.input[0] in stored and all(x in scalar for x in dq.input[1:] if x)):
            rows = f"{node.output[0]}/codes"
            out.append(helper.make_node("Gather", [dq.input[0], node.input[1]], [rows], f"{node.name}/codes", axis=0))
            out.append(helper.make_node("DequantizeLinear", [rows, *dq.input[1:]], list(node.output),
                                        f"{node.name}/DequantizeLinear"))
            swapped.add(id(dq))
        else:
            out.append(node)
    return [n for n in out if id(n) not in swapped]


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value the graph names (ONNX shape inference over the structure alone)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    return types


def padded_past(cache: np.ndarray | None, shape: tuple, dtype=np.float32) -> np.ndarray:
    """A fixed-size cache buffer of ``shape`` [1, kv_heads, slots, head_dim], zeros past the
    ``cache`` rows [1, kv_heads, length, head_dim] written at its start."""
    buffer = np.zeros(shape, dtype)
    if cache is not None:
        buffer[:, :, :cache.shape[2]] = cache
    return buffer
