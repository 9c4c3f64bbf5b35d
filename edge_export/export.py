"""`export`: checkpoint -> quantized -> lowered -> verified -> published artifact.

Each stage hands the next one a documented object (Checkpoint, QuantizedWeights, the staging
folder with its files, the verification Figures), and the artifact appears at OUT only when all
of them succeeded (see artifact.py).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from importlib import import_module
from pathlib import Path
from typing import Callable

from quantizers import default_rules
from quantizers.schemes import Fp8Config, Int4Config, Int8Config, Rules
from runtimes.capabilities import DEFAULT_KV_CACHE, TARGETS

from .artifact import publish, staging_folder, write_manifest
from .checkpoint import open_checkpoint
from .errors import ExportError, UnsupportedArchitectureError, VerificationError
from .quantize import QuantizedWeights, needs_calibration
from .targets import get_target
from .tensor_loss import record_tensor_losses

log = logging.getLogger(__name__)

# Verification thresholds an export must pass (overridable): the mean KL over the built-in prompts'
# 32 reference tokens, and the share of those positions whose argmax agrees.
MAX_KL = 0.5
MIN_TOP1 = 0.70


@dataclass(frozen=True)
class ExportOptions:
    target: str = "onnx"
    variant: str | None = None
    quant: str = "int4"  # fp32 | fp16 | int8 | int4 | fp8
    method: str | None = None  # rtn | awq | gptq | keep (int4); None: keep for a GGUF, else rtn
    group_size: int = 32
    symmetric: bool = True
    act_order: bool = False
    clip_search: bool = False  # int4: shrink each group's range where that lowers its squared error
    head: str = "int8"  # lm_head (and a tied embedding): int8 per row | int4 (the main scheme) | float
    max_context: int = 2048
    kv_cache: str = DEFAULT_KV_CACHE  # float32 | float16 | int8 (onnx/ort: calibrated per-channel scales)
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations (fast on CPU), 0 = exact float
    device: str | None = None  # a device profile the artifact is for: its precisions are checked
    fp8_activations: bool | None = None  # fp8: also quantize each linear's input (per-tensor scale
    # from calibration); None: the target decides (tensorrt: yes, FP8 GEMMs; others: weights only)
    calibration: str | None = None
    verify: bool = True
    max_kl: float = MAX_KL
    min_top1: float = MIN_TOP1
    prompts: str | None = None
    overwrite: bool = False
    threads: int | None = None
    via: str | None = None  # another exporter (EXPORTERS): optimum, for architectures outside the registry
    tensor_loss: str = "auto"  # a GGUF tensor not carried exactly: kl | relative_output_error | auto (tensor_loss.py)


# KV-cache precisions beyond float32/float16 and the target/variants that carry them (declared in
# runtimes.capabilities). int8 is onnxruntime's GroupQueryAttention cache quantization (static
# per-channel scales, calibrated).
KV_CACHE_TARGETS = {"int8": {tuple(name.split("/")) for name, t in TARGETS.items() if "int8" in t.kv_caches}}


def check_kv_cache(options: ExportOptions, target: str, variant: str) -> None:
    carriers = KV_CACHE_TARGETS.get(options.kv_cache)
    if carriers is not None and (target, variant) not in carriers:
        names = ", ".join(f"{t}/{v}" for t, v in sorted(carriers))
        raise ExportError(f"--kv-cache {options.kv_cache} is carried by {names} only, not {target}/{variant}: "
                          "use --kv-cache fp32 or fp16 there")


# Exporters other than our own builder, by the name `--via` takes: module, function(checkpoint, out,
# options, progress) -> manifest. Imported only when asked for.
EXPORTERS = {"optimum": (".optimum_export", "export_via_optimum")}


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
    if options.quant == "int4":
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
    if options.head == "int4" and not isinstance(config, Int4Config):
        raise ExportError("--head int4 needs --quant int4")
    if head is not None and config.method == "keep":
        # a GGUF's head/embedding is Q8_0 (or wider): --head int4 asks for it re-quantized, not carried
        head = replace(config, method="rtn")
    return Rules((("lm_head.weight", head), ("model.embed_tokens.weight", head)) + rules.rules)


def calibration_ids(tokenizer, path: str | None) -> list[list[int]]:
    """The calibration prompts (built-in reasoning set, or a JSONL file) rendered with the chat
    template, which for R1 ends in ``<think>\\n`` as the model sees it."""
    from .verify import data_file, load_prompts
    prompts = load_prompts(path or data_file("calibration.jsonl"))
    if tokenizer is None:
        raise ExportError("calibration needs the checkpoint's tokenizer; this checkpoint has none")
    return [tokenizer.encode_chat(p) for p in prompts]


def export(checkpoint, out, options: ExportOptions = ExportOptions(),
           progress: Callable[[str], None] = lambda s: None, **overrides) -> dict:
    """Export ``checkpoint`` (folder, .gguf or known name) to the artifact folder ``out``.

    Returns the manifest. Raises ExportError / VerificationError; on any failure nothing is left
    at ``out`` that was not there before.
    """
    if overrides:
        options = ExportOptions(**{**asdict(options), **overrides})
    if options.via is not None:
        if options.via not in EXPORTERS:
            raise ExportError(f"--via '{options.via}' is not an exporter (known: {', '.join(EXPORTERS)})")
        module, function = EXPORTERS[options.via]
        return getattr(import_module(module, __package__), function)(checkpoint, out, options, progress)
    target, variant = get_target(options.target, options.variant)
    quants = target.variant_quant.get(variant, target.quant)
    if options.quant not in quants:
        raise ExportError(f"--quant {options.quant} cannot be carried by target {target.name}/{variant} "
                          f"(it takes: {', '.join(quants)})")
    check_kv_cache(options, target.name, variant)
    if target.prepare is not None:
        options = target.prepare(options)
    t0 = time.perf_counter()
    try:
        ckpt = open_checkpoint(checkpoint)
    except UnsupportedArchitectureError as e:
        raise UnsupportedArchitectureError(f"{e}; `--via optimum` exports other architectures") from e
    options = resolve_method(options, ckpt)
    rules = quant_rules(options)
    with staging_folder(out, options.overwrite, expected_bytes=least_artifact_bytes(ckpt.spec, rules)) as staging:
        calibration = None
        kv_ranges = options.kv_cache in KV_CACHE_TARGETS
        if needs_calibration(rules, ckpt.spec) or kv_ranges:
            calibration = calibration_ids(ckpt.tokenizer, options.calibration)
        weights = QuantizedWeights(ckpt, rules, calibration, kv_ranges=kv_ranges)
        progress(f"quantizing ({options.quant}, {options.method}) and lowering to {target.name}/{variant}")
        lowered = target.lower(ckpt.spec, weights, staging, variant=variant, options=options)
        write_tokenizer(ckpt.tokenizer, staging, ckpt.path)
        manifest = _manifest(ckpt, options, target, variant, rules, weights, lowered)
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


def write_tokenizer(tok, folder: Path, source) -> None:
    """tokenizer.json and tokenizer_config.json (chat template, BOS/EOS) of ``tok`` into ``folder``."""
    if tok is None:
        raise ExportError(f"{source}: has no tokenizer (tokenizer.json); an artifact needs one to run")
    # written here rather than by tokenizers' save(), whose errors (a full disk) are not OSErrors
    (folder / "tokenizer.json").write_text(tok.tok.to_str(pretty=True), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": tok.chat_template, "bos_token": tok.bos_token, "eos_token": tok.eos_token,
        "add_bos_token": tok.add_bos, "tokenizer_class": "PreTrainedTokenizerFast"}, ensure_ascii=False, indent=2))


def least_artifact_bytes(spec, rules: Rules) -> int:
    """A lower bound on the artifact's bytes: its weights under ``rules`` (sizing.py's count), less
    10% since a target may store scales narrower than that count (Core ML: fp16). An export that
    cannot fit even this is refused before anything is written."""
    from .sizing import tensor_bytes
    weights = sum(tensor_bytes(shape, rules.resolve(name)) for name, shape in spec.tensor_shapes().items())
    return int(weights * 0.9)


def _manifest(ckpt, options, target, variant, rules, weights, lowered) -> dict:
    spec = ckpt.spec
    return {
        "target": target.name, "variant": variant, "backend": lowered.get("backend", target.backend),
        "model": spec.to_dict(),
        "source": {"path": str(ckpt.path), "format": ckpt.format, "dtype": ckpt.dtype},
        "quantization": {"quant": options.quant, "method": options.method, "rules": rules.to_list(),
                         "tensors": _tensor_records(weights.records, lowered, target.name, variant)},
        "max_context": options.max_context,
        "graph": lowered["graph"], "weights": lowered["weights"],
        **({"engine": lowered["engine"]} if "engine" in lowered else {}),
        **tokenizer_fields(spec, ckpt.tokenizer),
    }


def _tensor_records(records: dict, lowered: dict, target: str, variant: str | None) -> dict:
    """The per-tensor records; a tensor the target re-quantized in its own form (qnn's
    ``graph.quantization.requantized_weights``) is recorded as such, whatever it arrived as."""
    out = {name: record.to_dict() for name, record in records.items()}
    for name in lowered.get("graph", {}).get("quantization", {}).get("requantized_weights", []):
        if name in out and out[name]["source"] != "requantized":
            out[name].update(source="requantized", requantized_by=f"{target}/{variant}" if variant else target)
    return out


def tokenizer_fields(spec, tok) -> dict:
    """The manifest's tokenizer files, chat template, special token ids and generation defaults."""
    special = {name: tok.token_id(text) for name, text in (("bos", tok.bos_token), ("eos", tok.eos_token),
                                                            ("think_open", "<think>"), ("think_close", "</think>"))
               if text and tok.token_id(text) is not None}
    generation = {k: v for k, v in spec.generation.items() if k in ("temperature", "top_p", "top_k", "do_sample")}
    if tok.token_id("<think>") is not None and tok.token_id("</think>") is not None:
        generation["think_prefix"] = "<think>\n"  # DeepSeek's advice for the R1 distills
    generation["eos_token_ids"] = sorted(set(spec.eos_token_ids) | set(spec.generation.get("eos_token_ids", [])))
    return {
        "tokenizer": {"file": "tokenizer.json", "config": "tokenizer_config.json"},
        "chat_template": tok.chat_template, "special_tokens": special, "generation": generation,
    }


def verify_artifact(folder: Path, ckpt, options: ExportOptions) -> dict:
    """The artifact's next-token distributions against the reference decoder's (figures dict)."""
    import runtimes

    from .verify import FixedReference, LayerMajorScorer, RuntimeScorer, compare, encode_prompts, load_prompts
    prompts = encode_prompts(ckpt.tokenizer, load_prompts(options.prompts))
    reference = LayerMajorScorer(ckpt.spec, ckpt.tensor, rows=lambda name, rows: ckpt.tensor(name, rows=rows))
    ref_tokens, ref_logprobs = reference.greedy(prompts, 32)
    del reference
    from runtimes.artifact import read_manifest
    artifact = read_manifest(folder, staging_ok=True)
    # a target whose artifact cannot run here (Core ML off macOS) brings what verifies it instead
    make = get_target(artifact.target, artifact.variant)[0].extra.get("verify_scorer")
    candidate = make(artifact, options) if make else None
    if candidate is None:
        runtime = runtimes.Runtime(artifact, runtimes.get_backend(artifact.manifest["backend"])(
            artifact, threads=options.threads))
        candidate = RuntimeScorer(runtime.backend)
    figures = compare(FixedReference(ref_tokens, ref_logprobs), candidate, prompts).to_dict()
    if getattr(candidate, "verified_with", None):
        figures["verified_with"] = candidate.verified_with
    return figures


def _check_thresholds(figures: dict, options: ExportOptions) -> None:
    if figures["kl_mean"] > options.max_kl or figures["top1_agreement"] < options.min_top1:
        raise VerificationError(
            f"verification failed: kl_mean {figures['kl_mean']:.4f} (max {options.max_kl}), top1_agreement "
            f"{figures['top1_agreement']:.3f} (min {options.min_top1}); nothing was written. Try "
            "--method awq or gptq, a smaller --group-size, or loosen with --max-kl / --min-top1")
