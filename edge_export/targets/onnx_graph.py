"""An ONNX graph written node by node, its weights streamed to one external data file.

:class:`GraphWriter` never holds a model's weights: ``weight(name, array)`` appends the array's
bytes to ``<model>.data`` at once and keeps only a TensorProto that points at them (location,
offset, length), so peak memory is whatever the caller holds at a time (one layer's tensors).
Small constants (shapes, axes) are inlined and shared by value. Node outputs are named
``{node name}/output_{i}``, so a graph diffs cleanly between exports.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSETS = {"": 21, "com.microsoft": 1}
IR_VERSION = 10
# Large tensors start on a 64 KiB boundary so onnxruntime can memory-map them; small ones on 64 B.
BIG_TENSOR_BYTES, BIG_ALIGN, SMALL_ALIGN = 1 << 20, 1 << 16, 64


def _packed_bytes(values: np.ndarray, data_type: str) -> bytes:
    if data_type in ("INT4", "UINT4"):
        flat = values.astype(np.uint8).reshape(-1) & 0x0F  # int8 -> two's complement nibble
        flat = np.pad(flat, (0, flat.size % 2))
        return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
    if data_type in ("FLOAT8E4M3FN", "UINT8"):
        return values.astype(np.uint8).tobytes()
    if data_type == "INT8":
        return values.astype(np.int8).tobytes()
    raise ValueError(f"GraphWriter: no packing for ONNX type {data_type}")


class GraphWriter:
    """Collects nodes, graph inputs/outputs and initializers; ``save()`` writes the .onnx file."""

    def __init__(self, out_dir: str | Path, model_name: str = "model.onnx", graph_name: str = "model",
                 opsets: dict[str, int] | None = None):
        self.opsets = dict(OPSETS if opsets is None else opsets)
        self.out_dir = Path(out_dir)
        self.model_name = model_name
        self.data_name = model_name + ".data"
        self.graph_name = graph_name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._constants: dict[tuple, str] = {}
        self._names: set[str] = set()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._data = open(self.out_dir / self.data_name, "wb")
        self._offset = 0
        self._refs: dict[str, TensorProto] = {}

    # ---- values ----------------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: Sequence) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, name: str, elem_type: int, shape: Sequence) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def weight(self, name: str, array: np.ndarray, data_type: str | None = None) -> str:
        """Append ``array`` to the external data file; returns the initializer's name.

        ``data_type`` stores it as an ONNX type numpy has no dtype for: "INT4"/"UINT4" (int8 or
        uint8 values, packed two a byte, first element in the low nibble) or "FLOAT8E4M3FN"
        (uint8 bit patterns)."""
        self._claim(name)
        array = np.ascontiguousarray(array)
        # the array's own buffer, as bytes (no copy: a 1 GiB table is not doubled to be written)
        raw = array.reshape(-1).view(np.uint8) if data_type is None else _packed_bytes(array, data_type)
        elem_type = helper.np_dtype_to_tensor_dtype(array.dtype) if data_type is None else getattr(TensorProto, data_type)
        align = BIG_ALIGN if len(raw) >= BIG_TENSOR_BYTES else SMALL_ALIGN
        pad = -self._offset % align
        if pad:
            self._data.write(b"\0" * pad)
            self._offset += pad
        self._data.write(raw)
        tensor = TensorProto(name=name, data_type=elem_type, dims=array.shape, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.data_name), ("offset", str(self._offset)), ("length", str(len(raw)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self._offset += len(raw)
        self.initializers.append(tensor)
        self._refs[name] = tensor
        return name

    def ref(self, name: str) -> dict:
        """Where an external initializer's bytes are: {file, offset, length, dtype, shape}, the
        reference runtimes/weights.py reads (packed types as their raw bytes, dtype uint8)."""
        tensor = self._refs[name]
        ext = {e.key: e.value for e in tensor.external_data}
        plain = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.INT8: "int8",
                 TensorProto.UINT8: "uint8"}
        dtype = plain.get(tensor.data_type, "uint8")
        shape = list(tensor.dims) if tensor.data_type in plain else [int(ext["length"])]
        return {"file": ext["location"], "offset": int(ext["offset"]), "length": int(ext["length"]),
                "dtype": dtype, "shape": shape}

    def const(self, value, dtype=np.int64) -> str:
        """A small inline constant, shared by value: ``/model/constants/INT64/[1]``."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            type_name = TensorProto.DataType.Name(helper.np_dtype_to_tensor_dtype(array.dtype))
            text = str(array.tolist()).replace(" ", "")
            name = f"/model/constants/{type_name}/{text}"
            self._claim(name)
            self.initializers.append(numpy_helper.from_array(array, name))
            self._constants[key] = name
        return self._constants[key]

    # ---- nodes -----------------------------------------------------------------------
    def node(self, op: str, inputs: Sequence[str], name: str, outputs: int | Sequence[str] = 1,
             domain: str = "", **attrs):
        """Add a node; returns its output name (one output) or the list of names."""
        self._claim(name)
        names = [f"{name}/output_{i}" for i in range(outputs)] if isinstance(outputs, int) else list(outputs)
        self.nodes.append(helper.make_node(op, list(inputs), names, name=name, domain=domain or None, **attrs))
        return names[0] if len(names) == 1 else names

    def _claim(self, name: str) -> None:
        if name in self._names:
            raise ValueError(f"ONNX graph: the name {name!r} is used twice")
        self._names.add(name)

    # ---- output ----------------------------------------------------------------------
    def save(self, producer: str = "edge-export") -> list[str]:
        """Close the data file, write the .onnx file; returns both names (relative)."""
        self._data.close()
        graph = helper.make_graph(self.nodes, self.graph_name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in self.opsets.items()],
                                  producer_name=producer, ir_version=IR_VERSION)
        (self.out_dir / self.model_name).write_bytes(model.SerializeToString())
        return [self.model_name, self.data_name]

    def abort(self) -> None:
        """After a failure: close and delete the partial data file."""
        try:
            self._data.close()  # flushes what is buffered: fails again when the failure was a full disk
        finally:
            (self.out_dir / self.data_name).unlink(missing_ok=True)


def decoder_io(g: GraphWriter, spec, kv_type: int, logits_length) -> None:
    """The decoder's inputs and outputs, by onnxruntime-genai's names: input_ids, attention_mask,
    past_key_values.{i}.key/value -> logits, present.{i}.key/value ([batch, kv_heads, length, head_dim])."""
    g.input("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    g.input("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])
    g.output("logits", TensorProto.FLOAT, ["batch_size", logits_length, spec.vocab_size])
    for i in range(spec.num_layers):
        for kind in ("key", "value"):
            g.input(f"past_key_values.{i}.{kind}", kv_type,
                    ["batch_size", spec.num_kv_heads, "past_sequence_length", spec.head_dim])
            g.output(f"present.{i}.{kind}", kv_type,
                     ["batch_size", spec.num_kv_heads, "total_sequence_length", spec.head_dim])
