"""What each target's artifact carries and what runs it on each kind of device, declared once.

Export, plan, the estimator and the CLI read these facts here (``devices/`` may import only
``runtimes``, so they cannot live in ``edge_export/targets``). Pure data: no imports of ours.

Names: a target as profiles and plans name it (``onnx/ort``, ``onnx/portable``, ``onnx/qnn``,
``coreml``, ``tensorrt``); KV dtypes as manifests write them (``float32``, ``float16``, ``int8``,
``uint16``); engine classes as devices/calibration.py fits them (``phone-npu``, ``apple-gpu``,
``jetson-gpu``, ``cpu``, ``jetson-cpu``); device kinds as device profiles declare them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Engine classes: what executes the model's steps, each calibrated on its own published points.
# The Jetson's Arm cores are their own class: the one published figure puts them several times
# below what phone CPUs fit at the SoC's bandwidth.
PHONE_NPU, APPLE_GPU, JETSON_GPU, CPU, JETSON_CPU = "phone-npu", "apple-gpu", "jetson-gpu", "cpu", "jetson-cpu"
ENGINE_CLASSES = (PHONE_NPU, APPLE_GPU, JETSON_GPU, CPU, JETSON_CPU)

# Device kinds: what a profile is, which decides the engines its targets get.
SNAPDRAGON, MEDIATEK, IPHONE, MAC, JETSON, ARM_BOARD, HOST = (
    "snapdragon", "mediatek", "iphone", "mac", "jetson", "arm-board", "host")

# Bytes per KV element, by the dtype a manifest's graph.kv_dtype names.
KV_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "uint16": 2, "int8": 1, "fp8": 1}
# What `export` writes when --kv-cache is not given (targets that force a dtype override it).
DEFAULT_KV_CACHE = "float32"
# The CLI's names for KV dtypes.
KV_CACHE_NAMES = {"fp32": "float32", "fp16": "float16", "int8": "int8"}


@dataclass(frozen=True)
class Engine:
    """What runs a target's artifact on one kind of device, and why that one."""

    engine: str
    why: str


@dataclass(frozen=True)
class TargetCapabilities:
    """One target's declaration.

    ``kv_caches``: KV dtypes its export can hold (first: what it holds when the asked one is not
    among them). ``static_kv``: static shapes, so every decode step reads the whole KV buffer.
    ``compute``: weight precision -> the precision its graph computes in, which prices prefill:
    int8 (dynamic int8 activations), int16 (w4a16 NPU graphs), fp16, fp8, float (fp32 / bf16 kernels).
    ``engines``: device kind -> the Engine that runs it there; a kind not listed cannot run it.
    """

    name: str
    kv_caches: tuple[str, ...]
    static_kv: bool
    compute: dict[str, str]
    engines: dict[str, Engine] = field(default_factory=dict)

    def kv_cache(self, asked: str) -> str:
        """The KV dtype an export of this target holds when ``asked`` is requested."""
        return asked if asked in self.kv_caches else self.kv_caches[0]

    def compute_precision(self, quant: str) -> str:
        return self.compute.get(quant, self.compute.get("*", "fp16"))


ORT_CPU = Engine(CPU, "onnxruntime's CPU provider (MLAS / KleidiAI kernels)")
ORT_ON_JETSON = Engine(JETSON_CPU, "the graph computes in fp32 and onnxruntime's CUDA GroupQueryAttention takes fp16/bf16 "
                            "only, so the decoder runs on the Arm CPU cores; TensorRT is the GPU path")
TRT_GPU = Engine(JETSON_GPU, "TensorRT engine on the GPU (built on the device)")

TARGETS: dict[str, TargetCapabilities] = {t.name: t for t in (
    TargetCapabilities(
        "onnx/ort", ("float32", "float16", "int8"), False,
        # MatMulNBits with accuracy_level 4 quantizes activations to int8 per block
        {"int4": "int8", "int8": "int8", "*": "float"},
        {SNAPDRAGON: ORT_CPU, MEDIATEK: ORT_CPU, MAC: ORT_CPU, ARM_BOARD: ORT_CPU, HOST: ORT_CPU,
         JETSON: ORT_ON_JETSON}),
    # no engine of its own: TensorRT (or onnxruntime's CPU provider) runs it, see RUNS_AS
    TargetCapabilities("onnx/portable", ("float32", "float16"), False, {"fp8": "fp8", "*": "fp16"}),
    TargetCapabilities(
        "onnx/qnn", ("uint16",), True, {"*": "int16"},
        {SNAPDRAGON: Engine(PHONE_NPU, "onnxruntime's QNN provider compiles the w4a16 / w8a16 graph for the "
                                       "Hexagon NPU")}),
    TargetCapabilities(
        "coreml", ("float16",), False, {"*": "fp16"},
        {IPHONE: Engine(APPLE_GPU, "Core ML runs stateful LLM graphs on the GPU"),
         MAC: Engine(APPLE_GPU, "Core ML runs stateful LLM graphs on the GPU")}),
    TargetCapabilities("tensorrt", ("float16",), False, {"fp8": "fp8", "*": "fp16"}, {JETSON: TRT_GPU}),
)}
# An artifact target a device kind has no engine for, and the declared target that runs it there.
RUNS_AS = {"onnx/portable": ("tensorrt", "onnx/ort")}


def get_capabilities(target: str) -> TargetCapabilities:
    """A target's declaration by name (KeyError names the known ones)."""
    if target not in TARGETS:
        raise KeyError(f"no capabilities declared for target '{target}' (known: {', '.join(TARGETS)})")
    return TARGETS[target]


def engines_for(kind: str) -> dict[str, Engine]:
    """Target -> Engine on a device kind, for every target that runs there."""
    return {name: t.engines[kind] for name, t in TARGETS.items() if kind in t.engines}
