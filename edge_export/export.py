"""`export`: checkpoint -> quantized -> lowered -> verified -> published artifact.

Each stage hands the next one a documented object (Checkpoint, QuantizedWeights, the staging
folder with its files, the verification Figures), and the artifact appears at OUT only when all
of them succeeded (see artifact.py).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from importlib import import_module
from pathlib import Path
from typing import Callable

from quantizers import default_rules
from quantizers.schemes import Fp8Config, Int4Config, Int4LutConfig, Int8Config, Rules
from runtimes.capabilities import CALIBRATED_KV_CACHES

from .artifact import publish, staging_folder, write_manifest
from .calibration import calibration_ids
from .checkpoint import open_checkpoint
from .errors import ExportError, UnsupportedArchitectureError, VerificationError
from .manifest import build_manifest, write_tokenizer
from .options import MAX_KL, MIN_TOP1, ExportOptions, check_context, check_options  # noqa: F401  (the API's names)
from .quantize import QuantizedWeights, needs_calibration
from .targets import get_target, scorer
from .tensor_loss import record_tensor_losses

log = logging.getLogger(__name__)


# Exporters other than our own builder, by the name `--via` takes: module, function(checkpoint, out,
# options, progress) -> manifest, and the variant its artifacts name. Imported only when asked for.
EXPORTERS = {"optimum": (".optimum_export", "export_via_optimum", "optimum")}


def resolve_method(options: ExportOptions, ckpt) -> ExportOptions:
    """Weights that arrive quantized (GGUF) are carried as they are unless a method is asked for."""
    if options.method is not None:
        return options
    return replace(options, method="keep" if ckpt.format == "gguf" and options.quant == "int4" else "rtn")


def quant_rules(options: ExportOptions) -> Rules:
    """The per-tensor rules for ``--quant``/``--method`` (default_rules of the chosen scheme)."""
    if options.clip_search and options.quant != "int4":
        raise ExportError(f"--clip-search applies to int4 groups; --quant {options.quant} has none")
    if options.quant in ("fp32", "fp16"):
        return Rules((("*", None),))
    if options.quant == "int4" and options.method == "palettize":
        config = Int4LutConfig(rows_per_lut=options.lut_rows)
    elif options.quant == "int4":
        config = Int4Config(options.group_size, options.symmetric, options.method, act_order=options.act_order,
                            clip_search=options.clip_search)
    elif options.method not in ("rtn", "keep"):
        raise ExportError(f"--method {options.method} applies to int4 only; --quant {options.quant} uses rtn")
    elif options.quant == "int8":
        config = Int8Config()
    elif options.quant == "fp8":
        config = Fp8Config(activation_scales=bool(options.fp8_activations))
    else:
        raise ExportError(f"--quant '{options.quant}' is not one of fp32, fp16, int8, int4, fp8")
    rules = default_rules(config)
    if options.head == "int8":
        return rules
    if options.head not in ("int4", "float"):
        raise ExportError(f"--head '{options.head}' must be int8, int4 or float")
    head = None if options.head == "float" else config
    if options.head == "int4" and not isinstance(config, (Int4Config, Int4LutConfig)):
        raise ExportError("--head int4 needs --quant int4")
    if head is not None and getattr(config, "method", None) == "keep":
        # a GGUF's head/embedding is Q8_0 (or wider): --head int4 asks for it re-quantized, not carried
        head = replace(config, method="rtn")
    return Rules((("lm_head.weight", head), ("model.embed_tokens.weight", head)) + rules.rules)


def export(checkpoint, out, options: ExportOptions = ExportOptions(),
           progress: Callable[[str], None] = lambda s: None, **overrides) -> dict:
    """Export ``checkpoint`` (folder, .gguf or known name) to the artifact folder ``out``.

    Returns the manifest. Raises ExportError / VerificationError; on any failure nothing is left
    at ``out`` that was not there before.
    """
    if overrides:
        options = replace(options, **overrides)
    # another exporter writes a variant of its own: the options are checked against the target's
    # default variant then, which honours --via where any does
    own = options.via in EXPORTERS and options.variant == EXPORTERS[options.via][2]
    target, variant = get_target(options.target, None if own else options.variant)
    caps = target.capabilities(variant)
    options = check_options(options, caps)
    if options.via is not None:
        if options.via not in EXPORTERS:
            raise ExportError(f"--via '{options.via}' is not an exporter (known: {', '.join(EXPORTERS)})")
        module, function, _ = EXPORTERS[options.via]
        return getattr(import_module(module, __package__), function)(checkpoint, out, options, progress)
    if target.prepare is not None:
        options = target.prepare(options)
    t0 = time.perf_counter()
    try:
        ckpt = open_checkpoint(checkpoint)
    except UnsupportedArchitectureError as e:
        raise UnsupportedArchitectureError(f"{e}; `--via optimum` exports other architectures") from e
    check_context(options, caps, ckpt.spec)
    options = resolve_method(options, ckpt)
    rules = quant_rules(options)
    with staging_folder(out, options.overwrite, expected_bytes=least_artifact_bytes(ckpt.spec, rules)) as staging:
        calibration = None
        kv_ranges = options.kv_cache in CALIBRATED_KV_CACHES
        if needs_calibration(rules, ckpt.spec) or kv_ranges or caps.calibrates:
            calibration = calibration_ids(ckpt.tokenizer, options.calibration)
        weights = QuantizedWeights(ckpt, rules, calibration, kv_ranges=kv_ranges)
        progress(f"quantizing ({options.quant}, {options.method}) and lowering to {target.name}/{variant}")
        lowered = target.lower(ckpt.spec, weights, staging, variant=variant, options=options, calibration=calibration)
        write_tokenizer(ckpt.tokenizer, staging, ckpt.path)
        manifest = build_manifest(ckpt, options, target, variant, rules, weights, lowered)
        record_tensor_losses(staging, manifest, ckpt, options.tensor_loss)
        manifest["export_seconds"] = round(time.perf_counter() - t0, 1)
        write_manifest(staging, manifest)
        if options.verify:
            progress("verifying against the reference decoder")
            figures = verify_artifact(staging, ckpt, options)
            manifest["verification"] = figures
            write_manifest(staging, manifest)
            _check_thresholds(figures, options)
        publish(staging, Path(out).absolute(), options.overwrite)
    return json.loads((Path(out) / "edge_manifest.json").read_text())


def least_artifact_bytes(spec, rules: Rules) -> int:
    """A lower bound on the artifact's bytes: its weights under ``rules`` (sizing.py's count), less
    10% since a target may store scales narrower than that count (Core ML: fp16). An export that
    cannot fit even this is refused before anything is written."""
    from .sizing import tensor_bytes
    weights = sum(tensor_bytes(shape, rules.resolve(name)) for name, shape in spec.tensor_shapes().items())
    return int(weights * 0.9)


def verify_artifact(folder: Path, ckpt, options: ExportOptions) -> dict:
    """The artifact's next-token distributions against the reference decoder's (figures dict)."""
    import runtimes

    from .verify import FixedReference, LayerMajorScorer, RuntimeScorer, compare, encode_prompts, load_prompts
    prompts = encode_prompts(ckpt.tokenizer, load_prompts(options.prompts))
    reference = LayerMajorScorer(ckpt.spec, ckpt.tensor, rows=lambda name, rows: ckpt.tensor(name, rows=rows))
    ref_tokens, ref_logprobs = reference.greedy(prompts, options.verify_tokens)
    del reference
    from runtimes.artifact import read_manifest
    artifact = read_manifest(folder, staging_ok=True)
    # a target whose artifact cannot run here (Core ML off macOS) declares what verifies it instead
    target, variant = get_target(artifact.target, artifact.variant)
    make = scorer(target.capabilities(variant).scorer)
    candidate = make(artifact, options) if make else None
    if candidate is None:
        runtime = runtimes.Runtime(artifact, runtimes.get_backend(artifact.manifest["backend"])(
            artifact, threads=options.threads))
        candidate = RuntimeScorer(runtime.backend)
    figures = compare(FixedReference(ref_tokens, ref_logprobs), candidate, prompts, options.verify_tokens).to_dict()
    figures["new_tokens"] = options.verify_tokens
    if getattr(candidate, "verified_with", None):
        figures["verified_with"] = candidate.verified_with
    return figures


def _check_thresholds(figures: dict, options: ExportOptions) -> None:
    if figures["kl_mean"] > options.max_kl or figures["top1_agreement"] < options.min_top1:
        raise VerificationError(
            f"verification failed: kl_mean {figures['kl_mean']:.4f} (max {options.max_kl}), top1_agreement "
            f"{figures['top1_agreement']:.3f} (min {options.min_top1}); nothing was written. Try "
            "--method awq or gptq, a smaller --group-size, or loosen with --max-kl / --min-top1")
