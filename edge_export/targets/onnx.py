"""The `onnx` target. Variant `ort`: onnxruntime's fused contrib ops, built from the weights.
Variant `portable`: standard ONNX ops only (Q/DQ weights), what TensorRT and NPU compilers take."""
from __future__ import annotations

import json
from pathlib import Path

from . import Target, register_scorer, register_target
from .onnx_ort import build_ort_decoder, genai_config
from .onnx_portable import PortableRules, build_portable_decoder
from .onnx_qnn import lower_qnn, verify_scorer as qnn_verify_scorer
from .onnx_weights import weights_table

MODEL_FILE = "model.onnx"


def lower_ort(spec, weights, folder: Path, variant: str, options, calibration=None) -> dict:
    """Write model.onnx (+ .data) and genai_config.json; return the manifest's graph and weights."""
    build_ort_decoder(spec, weights, folder, max_context=options.max_context, kv_dtype=options.kv_cache,
                      model_name=MODEL_FILE, accuracy_level=options.ort.accuracy_level)
    eos = sorted(set(spec.eos_token_ids) | set(spec.generation.get("eos_token_ids", [])))
    config = genai_config(spec, max_context=options.max_context, eos_ids=eos, bos_id=spec.bos_token_id,
                          pad_id=eos[0] if eos else 0, model_name=MODEL_FILE)
    (folder / "genai_config.json").write_text(json.dumps(config, indent=2))
    graph = {"file": MODEL_FILE, "data": MODEL_FILE + ".data", "kv_dtype": options.kv_cache,
             "accuracy_level": options.ort.accuracy_level, "logits": "last", "inputs": ["input_ids", "attention_mask", "past_key_values.{i}.key",
                                                              "past_key_values.{i}.value"],
             "outputs": ["logits", "present.{i}.key", "present.{i}.value"]}
    if options.kv_cache == "int8":
        graph["kv_scales"] = {"granularity": "per-channel", "initializers": "model.layers.{i}.attn.k_scale/v_scale",
                              "keys": "max rotary-pair radius / 127 (holds at every position)",
                              "values": "max |v| / 127", "calibration_prompts": weights.calibration_prompts}
    return {"graph": graph, "weights": weights_table(folder / MODEL_FILE, spec), "backend": "onnxruntime"}


# onnxruntime fuses DequantizeLinear -> MatMul into MatMulNBits with int8 activations by default
# (accuracy level 4, ~1% off); level 0 keeps the float arithmetic the graph spells out.
PORTABLE_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}


def lower_portable(spec, weights, folder: Path, variant: str, options, calibration=None,
                   rules: PortableRules = PortableRules()) -> dict:
    """Write the standard-ops model.onnx (+ .data); return the manifest's graph and weights."""
    _, table = build_portable_decoder(spec, weights, folder, max_context=options.max_context,
                                      kv_dtype=options.kv_cache, model_name=MODEL_FILE, rules=rules)
    graph = {"file": MODEL_FILE, "data": MODEL_FILE + ".data", "kv_dtype": options.kv_cache, "kv": "concat",
             "logits": "last", "opset": 21, "session_config": dict(PORTABLE_SESSION_CONFIG),
             "inputs": ["input_ids", "attention_mask", "past_key_values.{i}.key", "past_key_values.{i}.value"],
             "outputs": ["logits", "present.{i}.key", "present.{i}.value"]}
    return {"graph": graph, "weights": table, "backend": "onnxruntime"}


def lower(spec, weights, folder: Path, variant: str, options, calibration=None) -> dict:
    lowerings = {"ort": lower_ort, "portable": lower_portable, "qnn": lower_qnn}
    return lowerings[variant](spec, weights, folder, variant, options, calibration=calibration)


# A portable graph's weights, dequantized once into float32 for verification, may take this much;
# a larger graph is verified layer by layer (onnx_streamed).
FOLD_WEIGHTS_BYTES = 2 << 30


def folded_scorer(artifact, options):
    """Verification of a portable (or tensorrt) graph with every weight's DequantizeLinear folded
    into a float constant, instead of dequantizing at every step: the same weight values, about 7x
    faster on SmolLM2 (11.5 against 78 ms a token). Where the float copies fit FOLD_WEIGHTS_BYTES
    the whole graph is folded once; above it the graph runs layer by layer over every prompt, one
    layer folded at a time (StreamedGraphScorer). Not with FP8 activation Q/DQ, which onnxruntime
    then computes otherwise (None: the artifact's own backend verifies it)."""
    from runtimes.backends.onnxruntime import OnnxRuntimeBackend

    from ..verify import RuntimeScorer
    from .onnx_streamed import StreamedGraphScorer
    weights = artifact.manifest.get("weights", {}).values()
    if any("activation_scale" in e for e in weights):
        return None
    if artifact.spec.parameter_count * 4 > FOLD_WEIGHTS_BYTES:
        return StreamedGraphScorer(artifact, threads=options.threads)
    backend = OnnxRuntimeBackend(artifact, threads=options.threads,
                                 session_config={"session.disable_quant_qdq": "1"})
    scorer = RuntimeScorer(backend)
    scorer.verified_with = "onnxruntime CPU, the weights' DequantizeLinear folded into float constants once"
    return scorer


def _qnn_available() -> tuple[bool, str]:
    from runtimes.backends.qnn import qnn_available
    return qnn_available()


def _available() -> tuple[bool, str]:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False, "pip install onnxruntime"
    return True, ""


register_scorer("folded-dq", folded_scorer)
register_scorer("qnn-static", qnn_verify_scorer)
register_target(Target(name="onnx", needs="onnx to export, onnxruntime to run", lower=lower, available=_available,
                       backend="onnxruntime", variant_available={"qnn": _qnn_available}))
