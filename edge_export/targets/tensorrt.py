"""The `tensorrt` target: the portable ONNX graph in TensorRT's explicit-quantization form.

TensorRT takes Q/DQ graphs under strong typing (the ONNX types decide each layer's precision, no
builder precision flags), with symmetric quantization only (its IDequantizeLayer has no non-zero
zero point), INT4 as weight-only (blocked DequantizeLinear -> MatMul) and FP8 as weights *and*
activations (QuantizeLinear -> DequantizeLinear on each GEMM's input, scales from calibration).
So this target is the portable variant built in float16 (fp16 activations and KV cache; RMSNorm
and softmax in float32), with those rules enforced at export.

An engine is specific to its GPU and TensorRT version, so it is built where it runs:
``edge-export build-engine ARTIFACT`` (see edge_export/engine.py) with TensorRT's Python API,
or the ``trtexec`` command line recorded in the manifest. Until then the artifact runs (and is
verified at export) on onnxruntime, which computes the same graph.
"""
from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

from . import Target, register_target
from .onnx import MODEL_FILE, PORTABLE_SESSION_CONFIG
from .onnx_portable import PortableRules, build_portable_decoder

ENGINE_FILE = "model.engine"
TENSORRT_RULES = PortableRules(zero_points=False, residual=False, consumer="TensorRT")
# Decode runs one token; prefill up to the optimization profile's "opt" length at its best.
OPT_PROMPT = 128


def prepare(options):
    """TensorRT's defaults: round-to-nearest unless a method is named (a GGUF's Q4_1 blocks have
    float minimums TensorRT cannot dequantize), and FP8 activations with FP8 weights. What it
    refuses (--asymmetric, a KV cache other than fp16, a device without TensorRT) is declared in
    runtimes.capabilities and checked by export."""
    changes = {}
    if options.method is None and options.quant == "int4":
        changes["method"] = "rtn"
    if options.quant == "fp8" and options.fp8_activations is None:
        changes["fp8_activations"] = True
    return dataclasses.replace(options, **changes) if changes else options


def lower(spec, weights, folder: Path, variant: str, options, calibration=None) -> dict:
    _, table = build_portable_decoder(spec, weights, folder, max_context=options.max_context, kv_dtype="float16",
                                      model_name=MODEL_FILE, rules=TENSORRT_RULES, dtype="float16")
    graph = {"file": MODEL_FILE, "data": MODEL_FILE + ".data", "kv_dtype": "float16", "kv": "concat",
             "dtype": "float16", "logits": "last", "opset": 21, "session_config": dict(PORTABLE_SESSION_CONFIG),
             "inputs": ["input_ids", "attention_mask", "past_key_values.{i}.key", "past_key_values.{i}.value"],
             "outputs": ["logits", "present.{i}.key", "present.{i}.value"]}
    engine = {"file": ENGINE_FILE, "built": False, "strongly_typed": True,
              "profiles": shape_profiles(spec, options.max_context, options.tensorrt.opt_tokens),
              "trtexec": trtexec_command(spec, options.max_context, options.tensorrt.opt_tokens),
              "device": options.device}
    # onnxruntime runs (and verifies) the graph until an engine is built on the device.
    return {"graph": graph, "weights": table, "backend": "onnxruntime", "engine": engine}


def shape_profiles(spec, max_context: int, opt_tokens: int = OPT_PROMPT) -> dict:
    """min / opt / max shapes of each dynamic input for one optimization profile (batch 1):
    a prompt of 1..max_context tokens after 0..max_context-1 cached ones, tuned for ``opt_tokens``."""
    opt = min(opt_tokens, max_context)
    kv = lambda length: [1, spec.num_kv_heads, length, spec.head_dim]  # noqa: E731
    shapes = {"input_ids": ([1, 1], [1, 1], [1, max_context]),
              "attention_mask": ([1, 1], [1, opt], [1, max_context])}
    for i in range(spec.num_layers):
        for kind in ("key", "value"):
            shapes[f"past_key_values.{i}.{kind}"] = (kv(0), kv(opt - 1), kv(max_context - 1))
    return {name: {"min": lo, "opt": mid, "max": hi} for name, (lo, mid, hi) in shapes.items()}


def trtexec_command(spec, max_context: int, opt_tokens: int = OPT_PROMPT) -> str:
    """The same build as `edge-export build-engine`, as a trtexec command line run in the artifact."""
    profiles = shape_profiles(spec, max_context, opt_tokens)

    def shapes(which):
        return ",".join(f"{name}:{'x'.join(str(d) for d in dims[which])}" for name, dims in profiles.items())

    args = ["trtexec", f"--onnx={MODEL_FILE}", f"--saveEngine={ENGINE_FILE}", "--stronglyTyped",
            f"--minShapes={shapes('min')}", f"--optShapes={shapes('opt')}", f"--maxShapes={shapes('max')}",
            "--profilingVerbosity=detailed", "--exportLayerInfo=layers.json"]
    return " ".join(shlex.quote(a) for a in args)


def _available() -> tuple[bool, str]:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, ("exports here; the engine builds and runs where TensorRT is (JetPack on Jetson, or "
                       "pip install tensorrt on an NVIDIA GPU host); onnxruntime runs the graph here")
    return True, ""


register_target(Target(
    name="tensorrt",
    needs="onnx to export; TensorRT (JetPack, or pip install tensorrt with an NVIDIA GPU) to build and run the engine",
    lower=lower, available=_available, backend="tensorrt", prepare=prepare))
