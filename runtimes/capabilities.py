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
# KV dtypes whose scales an export calibrates on prompts (onnxruntime's per-channel int8 cache).
CALIBRATED_KV_CACHES = ("int8",)
# The short names for KV dtypes (the CLI's; the Python API takes either form).
KV_CACHE_NAMES = {"fp32": "float32", "fp16": "float16", "int8": "int8"}


def kv_dtype(name: str | None) -> str | None:
    """``fp32`` / ``float32`` / ... -> the manifest's name (float32); None stays None (the target's own)."""
    return KV_CACHE_NAMES.get(name, name)


@dataclass(frozen=True)
class Engine:
    """What runs a target's artifact on one kind of device, and why that one."""

    engine: str
    why: str


# Options only some targets honour (ExportOptions' names; per-target ones live in their typed group:
# ort.accuracy_level, qnn.soc, qnn.prefill_chunk, tensorrt.opt_tokens). Every other option applies to
# every target (--kv-cache too: each target declares the KV dtypes it holds). An option set away from its default on a target that does not honour it is refused.
TARGET_OPTIONS = ("symmetric", "fp8_activations", "via", "accuracy_level", "soc", "prefill_chunk",
                  "opt_tokens")
# The int4 methods every target carries; a target that also stores another kind of int4 weight
# (Core ML's palettized lookup tables) declares it in ``methods``.
INT4_METHODS = ("rtn", "awq", "gptq", "keep")
PALETTIZE = "palettize"  # 16-entry lookup tables per group of output rows: constexpr_lut_to_dense
# Verification scorers a target names (edge_export/verify_scorers.py implements them).
SCORERS = ("backend", "folded-dq", "qnn-static", "coreml-module", "coreml-program")


@dataclass(frozen=True)
class TargetCapabilities:
    """One target's (and variant's) declaration: what its export carries and what runs it.

    ``name``: as profiles and plans name it. ``target`` / ``variant``: as `--target` / `--variant`
    take them; ``default_variant``: the variant `--target` alone gives. ``quants``: the weight
    precisions it carries. ``kv_caches``: KV dtypes its export can hold, the first being what it holds
    when none is asked for. ``static_kv``: static shapes, so every decode step reads the whole KV
    buffer. ``max_context``: (least, most) positions its KV cache may hold; most None: the model's
    max_position_embeddings. ``honours``: which of TARGET_OPTIONS it reads. ``methods``: the int4
    `--method`s its artifact stores. ``scorer``: what verifies
    its export (SCORERS). ``calibrates``: its export needs calibration prompts of its own (qnn's
    activation ranges). ``compute``: weight precision -> the precision its graph computes in, which
    prices prefill: int8 (dynamic int8 activations), int16 (w4a16 NPU graphs), fp16, fp8, float (fp32 /
    bf16 kernels). ``engines``: device kind -> the Engine that runs it there; a kind not listed
    cannot run it. ``about``: one line for help texts.
    """

    name: str
    target: str
    variant: str
    about: str
    quants: tuple[str, ...]
    kv_caches: tuple[str, ...]
    static_kv: bool
    compute: dict[str, str]
    honours: frozenset[str]
    scorer: str
    engines: dict[str, Engine] = field(default_factory=dict)
    max_context: tuple[int, int | None] = (1, None)
    default_variant: bool = True
    calibrates: bool = False
    methods: tuple[str, ...] = INT4_METHODS

    def kv_cache(self, asked: str | None) -> str:
        """The KV dtype an export of this target holds when ``asked`` is requested (None: its own)."""
        return asked if asked in self.kv_caches else self.kv_caches[0]

    def compute_precision(self, quant: str) -> str:
        return self.compute.get(quant, self.compute.get("*", "fp16"))

    def context_range(self, max_positions: int) -> range:
        """The max_context values it takes for a model of ``max_positions`` positions."""
        least, most = self.max_context
        return range(least, min(most or max_positions, max_positions) + 1)


ORT_CPU = Engine(CPU, "onnxruntime's CPU provider (MLAS / KleidiAI kernels)")
ORT_ON_JETSON = Engine(JETSON_CPU, "the graph computes in fp32 and onnxruntime's CUDA GroupQueryAttention takes fp16/bf16 "
                            "only, so the decoder runs on the Arm CPU cores; TensorRT is the GPU path")
TRT_GPU = Engine(JETSON_GPU, "TensorRT engine on the GPU (built on the device)")
CORE_ML_GPU = Engine(APPLE_GPU, "Core ML runs stateful LLM graphs on the GPU")

TARGETS: dict[str, TargetCapabilities] = {t.name: t for t in (
    TargetCapabilities(
        "onnx/ort", "onnx", "ort",
        "onnxruntime's fused contrib ops (MatMulNBits, GroupQueryAttention with one shared KV buffer, "
        "SkipSimplifiedLayerNormalization) plus genai_config.json: CPU, CUDA, mobile onnxruntime, onnxruntime-genai",
        ("fp32", "int8", "int4"), ("float32", "float16", "int8"), False,
        # MatMulNBits with accuracy_level 4 quantizes activations to int8 per block
        {"int4": "int8", "int8": "int8", "*": "float"},
        frozenset({"symmetric", "via", "accuracy_level"}), "backend",
        {SNAPDRAGON: ORT_CPU, MEDIATEK: ORT_CPU, MAC: ORT_CPU, ARM_BOARD: ORT_CPU, HOST: ORT_CPU,
         JETSON: ORT_ON_JETSON}),
    # no engine of its own: TensorRT (or onnxruntime's CPU provider) runs it, see RUNS_AS
    TargetCapabilities(
        "onnx/portable", "onnx", "portable",
        "standard ONNX ops only (opset 21): blocked DequantizeLinear int4, per-channel int8, float8 Q/DQ, "
        "plain attention; what TensorRT and NPU compilers ingest",
        ("fp32", "int8", "int4", "fp8"), ("float32", "float16"), False, {"fp8": "fp8", "*": "fp16"},
        frozenset({"symmetric", "fp8_activations"}), "folded-dq", default_variant=False),
    TargetCapabilities(
        "onnx/qnn", "onnx", "qnn",
        "static-shape QDQ graphs for onnxruntime's QNN provider on the Hexagon NPU: w8a16 (int8) or w4a16 "
        "(int4), uint16 activations and KV cache calibrated on prompts",
        ("int8", "int4"), ("uint16",), True, {"*": "int16"},
        frozenset({"soc", "prefill_chunk"}), "qnn-static",
        {SNAPDRAGON: Engine(PHONE_NPU, "onnxruntime's QNN provider compiles the w4a16 / w8a16 graph for the "
                                       "Hexagon NPU")},
        default_variant=False, calibrates=True),
    TargetCapabilities(
        "coreml", "coreml", "mlprogram",
        "an ML Program (iOS 18 / macOS 15): KV cache as Core ML state (fp16), flexible query length, "
        "block-wise int4/int8 weights; predicts on macOS only",
        ("fp16", "int8", "int4"), ("float16",), False, {"*": "fp16"},
        frozenset({"symmetric"}), "coreml-program", {IPHONE: CORE_ML_GPU, MAC: CORE_ML_GPU},
        methods=INT4_METHODS + (PALETTIZE,)),
    # the same program, traced from a torch module and converted by coremltools: a cross-check of the
    # builder on small models (it holds the whole model in float32), not a deployment choice of its own
    TargetCapabilities(
        "coreml/traced", "coreml", "traced",
        "the `mlprogram` program traced from a float32 torch module and converted by coremltools (whose "
        "numerics cross-check the MIL builder's); needs the whole model in float32 memory",
        ("fp16", "int8", "int4"), ("float16",), False, {"*": "fp16"},
        frozenset({"symmetric"}), "coreml-module", default_variant=False, methods=INT4_METHODS + (PALETTIZE,)),
    TargetCapabilities(
        "tensorrt", "tensorrt", "explicit",
        "the portable graph in fp16 (activations and KV cache) with TensorRT's explicit quantization: "
        "symmetric INT4 weight-only, FP8 weights and activations; `build-engine` builds it on the device",
        ("fp16", "int4", "fp8"), ("float16",), False, {"fp8": "fp8", "*": "fp16"},
        frozenset({"fp8_activations", "opt_tokens"}), "folded-dq", {JETSON: TRT_GPU}),
)}
# An artifact target a device kind has no engine for, and the declared target that runs it there.
RUNS_AS = {"onnx/portable": ("tensorrt", "onnx/ort")}
# Named Snapdragon SoCs the qnn variant compiles for: QNN's soc_model number, HTP architecture and
# marketing name (QNN SDK's supported-device table); device profiles name theirs.
QNN_SOCS = {"SM8550": (43, 73, "Snapdragon 8 Gen 2"), "SM8650": (57, 75, "Snapdragon 8 Gen 3"),
            "SM8750": (69, 79, "Snapdragon 8 Elite"), "SC8380XP": (60, 73, "Snapdragon X Elite")}
DEFAULT_QNN_SOC = "SM8650"


def target_names() -> list[str]:
    """The `--target` names, in declaration order."""
    return list(dict.fromkeys(t.target for t in TARGETS.values()))


def variants_of(target: str) -> list[TargetCapabilities]:
    """A `--target`'s declarations, its default variant first."""
    return sorted((t for t in TARGETS.values() if t.target == target), key=lambda t: not t.default_variant)


def capabilities_of(target: str, variant: str | None = None) -> TargetCapabilities:
    """The declaration of `--target` ``target`` `--variant` ``variant`` (None: its default);
    KeyError naming what is declared."""
    found = [t for t in variants_of(target) if variant in (None, t.variant)]
    if not found:
        raise KeyError(f"no capabilities declared for target '{target}'" + (f" variant '{variant}'" if variant else "")
                       + f" (declared: {', '.join(f'{t.target}/{t.variant}' for t in TARGETS.values())})")
    return found[0]


def all_quants() -> list[str]:
    """Every precision some target carries, widest last (the `--quant` choices)."""
    order = ("int4", "int8", "fp8", "fp16", "fp32")
    carried = {q for t in TARGETS.values() for q in t.quants}
    return [q for q in order if q in carried]


def get_capabilities(target: str) -> TargetCapabilities:
    """A target's declaration by name (KeyError names the known ones)."""
    if target not in TARGETS:
        raise KeyError(f"no capabilities declared for target '{target}' (known: {', '.join(TARGETS)})")
    return TARGETS[target]


def engines_for(kind: str) -> dict[str, Engine]:
    """Target -> Engine on a device kind, for every target that runs there."""
    return {name: t.engines[kind] for name, t in TARGETS.items() if kind in t.engines}
