"""`build-engine`: a `--target tensorrt` artifact's ONNX graph -> a TensorRT engine, on the device.

An engine is specific to the GPU and the TensorRT version that built it, so it is built where it
will run (JetPack's TensorRT on a Jetson, `pip install tensorrt` on a GPU host) and the manifest
records both; the `tensorrt` runtime backend refuses an engine built for something else.

After the build the engine inspector tells which precision each layer really runs in. An FP8
artifact that TensorRT silently runs in FP16/FP32 (TensorRT issue 4590) shows in the manifest's
``engine.layers`` summary and in bench reports, instead of passing for FP8.

The artifact is updated atomically: its files are hard-linked into a staging folder beside it,
the engine and the new manifest are written there, and the folder is swapped in (artifact.py).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Callable

from runtimes.artifact import load_artifact
from runtimes.backends.tensorrt import current_gpu
from runtimes.errors import BackendUnavailableError

from .artifact import publish, staging_folder, write_manifest
from .errors import EdgeError


class EngineError(EdgeError):
    """An engine cannot be built here (no TensorRT, no GPU, a parser or builder failure)."""


# Precision names as the inspector's "Format/Datatype" strings spell them, lowest first.
_PRECISIONS = (("FP4", "fp4"), ("Int4", "int4"), ("INT4", "int4"), ("FP8", "fp8"), ("Int8", "int8"),
               ("INT8", "int8"), ("BF16", "bf16"), ("FP16", "fp16"), ("Half", "fp16"), ("FP32", "fp32"),
               ("Float", "fp32"))
_ORDER = ("fp4", "int4", "fp8", "int8", "bf16", "fp16", "fp32")
GEMM_TYPES = re.compile(r"gemm|matrixmultiply|matmul|convolution|myelin|foreign", re.IGNORECASE)


def build_engine(folder: str | Path, *, device: str | None = None, workspace_gb: float | None = None,
                 progress: Callable[[str], None] = lambda s: None, builder=None) -> dict:
    """Build ``folder``'s engine in place; returns the manifest's new ``engine`` section.

    ``builder``: what turns the ONNX graph into engine bytes (``version``, ``gpu()``, ``build()``,
    ``inspect()``); by default TensorRTBuilder, the installed TensorRT on CUDA device 0."""
    folder = Path(folder).absolute()
    artifact = load_artifact(folder)
    manifest = artifact.manifest
    if manifest.get("target") != "tensorrt":
        raise EngineError(f"{folder}: build-engine takes a --target tensorrt artifact; this one is "
                          f"{manifest.get('target')}/{manifest.get('variant')}")
    plan = manifest.get("engine") or {}
    quant = (manifest.get("quantization") or {}).get("quant")
    if device:
        from runtimes.capabilities import capabilities_of

        from .options import check_device
        check_device(device, capabilities_of("tensorrt"), quant)
    builder = builder or TensorRTBuilder(plan)
    gpu = builder.gpu()
    progress(f"building a TensorRT {builder.version} engine for {gpu['name']} (sm_{gpu['compute_capability']})")
    t0 = time.perf_counter()
    serialized = builder.build(artifact.file(manifest["graph"]["file"]), plan, workspace_gb)
    layers = summarize_layers(builder.inspect(serialized), quant)
    engine = {**plan, "built": True, "file": plan.get("file", "model.engine"), "tensorrt": builder.version,
              "gpu": gpu, "build_seconds": round(time.perf_counter() - t0, 1), "layers": layers}
    _publish_engine(folder, manifest, engine, serialized)
    return engine


def _publish_engine(folder: Path, manifest: dict, engine: dict, serialized: bytes) -> None:
    """Swap in a copy of the artifact with the engine and the new manifest: its other files are
    hard links to the current ones (no copy of the weights), a previous engine is replaced."""
    with staging_folder(folder, overwrite=True) as staging:
        for name in manifest["files"]:
            if name == engine["file"]:
                continue
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            os.link(folder / name, staging / name)
        (staging / engine["file"]).write_bytes(serialized)
        new = {k: v for k, v in manifest.items() if k != "files"}
        new.update(engine=engine, backend="tensorrt")
        write_manifest(staging, new)
        publish(staging, folder, overwrite=True)


class TensorRTBuilder:
    """The engine builder: the installed TensorRT's Python API on CUDA device 0."""

    def __init__(self, plan: dict):
        self.trt = _import_tensorrt(plan)
        self.version = self.trt.__version__

    def gpu(self) -> dict:
        """{name, compute_capability} of the GPU the engine is built for."""
        try:
            return current_gpu()
        except BackendUnavailableError as e:
            raise EngineError(str(e)) from None

    def build(self, onnx_path: Path, plan: dict, workspace_gb: float | None) -> bytes:
        return _build(self.trt, onnx_path, plan, workspace_gb)

    def inspect(self, serialized: bytes) -> dict:
        """The engine inspector's JSON (ProfilingVerbosity.DETAILED)."""
        return _inspect(self.trt, serialized)


def _import_tensorrt(plan: dict):
    try:
        import tensorrt as trt
    except ImportError:
        cmd = plan.get("trtexec", "trtexec --onnx=model.onnx --saveEngine=model.engine --stronglyTyped")
        raise EngineError("TensorRT is not installed here: run build-engine on the device that will run the "
                          "engine (JetPack includes TensorRT; on a GPU host pip install tensorrt), or run, in the "
                          f"artifact folder there: {cmd}") from None
    return trt


def _build(trt, onnx_path: Path, plan: dict, workspace_gb: float | None) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.get("strongly_typed", True) else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{onnx_path}: TensorRT's ONNX parser refused the graph: {errors}")
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    profile = builder.create_optimization_profile()
    for name, shapes in plan["profiles"].items():
        profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    return bytes(serialized)


def _inspect(trt, serialized: bytes) -> dict:
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(serialized)
    inspector = engine.create_engine_inspector()
    return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def layer_precision(layer: dict) -> str | None:
    """The lowest precision among a layer's input tensors, from the inspector's JSON."""
    found = []
    for tensor in layer.get("Inputs", []):
        text = tensor.get("Format/Datatype", "") if isinstance(tensor, dict) else ""
        for token, name in _PRECISIONS:
            if token in text:
                found.append(name)
                break
    return min(found, key=_ORDER.index) if found else None


def summarize_layers(info: dict, quant: str | None) -> dict:
    """Per-precision layer counts, and what a precision check needs: for an fp8 artifact, the
    GEMM-like layers (and fused Myelin nodes) whose inputs are not FP8."""
    layers = [layer for layer in info.get("Layers", []) if isinstance(layer, dict)]
    counts: dict[str, int] = {}
    gemms = []
    for layer in layers:
        precision = layer_precision(layer) or "unknown"
        counts[precision] = counts.get(precision, 0) + 1
        if GEMM_TYPES.search(str(layer.get("LayerType", ""))):
            gemms.append({"name": layer.get("Name", ""), "type": layer.get("LayerType", ""), "precision": precision})
    summary = {"count": len(layers), "by_precision": counts, "gemm_precisions": {}}
    for g in gemms:
        summary["gemm_precisions"][g["precision"]] = summary["gemm_precisions"].get(g["precision"], 0) + 1
    if quant == "fp8":
        not_fp8 = [g for g in gemms if g["precision"] != "fp8"]
        summary["fp8_gemms"] = len(gemms) - len(not_fp8)
        summary["not_fp8"] = not_fp8[:64]
        if gemms and not summary["fp8_gemms"]:
            summary["warning"] = ("FP8 was asked for, but TensorRT runs no GEMM in FP8 on this GPU/version "
                                  "(cf. TensorRT issue 4590): the engine computes in higher precision")
    return summary
