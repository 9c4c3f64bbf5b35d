"""Stand-ins for the platform calls that cannot run here, each named STAND-IN. Everything around
them is the real code: the stand-in replaces only the call into the missing platform.

- StandinMLModel: coremltools.models.MLModel's predict / make_state (Core ML predicts only on
  macOS 15+), computing with the module the Core ML export is verified with off macOS
  (coreml_torch.verification_module), over the package's own weights and declared interface.
- StandinEngineBuilder: TensorRT's engine builder and inspector (NVIDIA GPU only), for
  build-engine's staging, hard links and atomic publish.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np


class StandinMLState:
    """STAND-IN for a Core ML state (MLState): the package's state tensors, zeroed, in their dtype."""

    def __init__(self, tensors: dict):
        self.tensors = tensors


class StandinMLModel:
    """STAND-IN for ``coremltools.models.MLModel(path, compute_units=...)``.

    ``predict`` checks its inputs against the package's own description (names, dtypes, shape
    ranges), as Core ML does, then runs the verification module with the state's tensors as its
    KV cache, so the caller's state and mask bookkeeping decide what it computes."""

    def __init__(self, path: str, compute_units=None):
        import coremltools as ct

        from edge_export.targets.coreml_torch import verification_module
        from runtimes.artifact import load_artifact
        self.ct, self.compute_units = ct, compute_units
        self.description = ct.utils.load_spec(str(path)).description
        self.module = verification_module(load_artifact(Path(path).parent))
        self.predictions = 0

    def make_state(self) -> StandinMLState:
        import torch
        dtypes = {self.ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16: torch.float16,
                  self.ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32: torch.float32}
        return StandinMLState({s.name: torch.zeros(list(s.type.stateType.arrayType.shape),
                                                   dtype=dtypes[s.type.stateType.arrayType.dataType])
                               for s in self.description.state})

    def predict(self, inputs: dict, state: StandinMLState | None = None) -> dict:
        import torch
        self._check(inputs)
        if state is None:
            raise ValueError("this model is stateful: predict needs state=model.make_state()")
        for name, tensor in state.tensors.items():
            setattr(self.module, name, tensor)  # the state is the cache the module updates in place
        with torch.no_grad():
            logits = self.module(torch.from_numpy(inputs["input_ids"]), torch.from_numpy(inputs["causal_mask"]))
        self.predictions += 1
        return {"logits": logits.numpy().astype(np.float16)}  # the package's output is float16

    def _check(self, inputs: dict) -> None:
        kinds = self.ct.proto.FeatureTypes_pb2.ArrayFeatureType
        numpy_of = {kinds.INT32: np.int32, kinds.FLOAT16: np.float16, kinds.FLOAT32: np.float32}
        declared = {i.name: i.type.multiArrayType for i in self.description.input}
        if set(inputs) != set(declared):
            raise ValueError(f"inputs {sorted(inputs)}; the model takes {sorted(declared)}")
        for name, array_type in declared.items():
            value = inputs[name]
            if value.dtype != numpy_of[array_type.dataType]:
                raise ValueError(f"{name}: {value.dtype}, the model takes {np.dtype(numpy_of[array_type.dataType])}")
            ranges = [(r.lowerBound, r.upperBound) for r in array_type.shapeRange.sizeRanges]
            if len(ranges) != value.ndim or any(not lo <= n <= (hi if hi >= 0 else n)
                                                for n, (lo, hi) in zip(value.shape, ranges)):
                raise ValueError(f"{name}: shape {list(value.shape)} is outside the model's ranges {ranges}")


class StandinEngineBuilder:
    """STAND-IN for TensorRT's builder (engine.TensorRTBuilder): the "engine" is a small JSON
    document naming the graph it was built from (its sha256) and the shape profiles, and the
    inspector reports one FP16 GEMM layer. ``fail`` makes the build raise, as a parser or builder
    failure does."""

    version = "stand-in"

    def __init__(self, fail: Exception | None = None):
        self.fail, self.builds = fail, 0

    def gpu(self) -> dict:
        return {"name": "STAND-IN GPU", "compute_capability": "00"}

    def build(self, onnx_path: Path, plan: dict, workspace_gb: float | None) -> bytes:
        if self.fail is not None:
            raise self.fail
        self.builds += 1
        graph = hashlib.sha256(Path(onnx_path).read_bytes()).hexdigest()
        return json.dumps({"stand_in_engine": True, "graph_sha256": graph, "profiles": plan["profiles"],
                           "build": self.builds}).encode()

    def inspect(self, serialized: bytes) -> dict:
        json.loads(serialized)  # what a real inspector would deserialize
        return {"Layers": [{"Name": "q_proj", "LayerType": "CaskGemmMatrixMultiply",
                            "Inputs": [{"Name": "x", "Format/Datatype": "Row major linear FP16 format"}]}]}
