"""`edge-export export`'s options, their choices and help built from the targets' declarations
(runtimes/capabilities.py) and quantizers.SUPPORTED_GROUP_SIZES, and the ExportOptions they make.

Nothing here restates what a target takes: a new target, precision or KV dtype declared there
appears in `--help` and in the choices by itself.
"""
from __future__ import annotations

import textwrap

import click

from quantizers.schemes import SUPPORTED_GROUP_SIZES
from runtimes.capabilities import (INT4_METHODS, KV_CACHE_NAMES, PALETTIZE, RUNS_AS, TARGETS, all_quants, target_names,
                                   variants_of)

from .options import FLAGS, MAX_KL, MIN_TOP1, OrtOptions, QnnOptions, TensorrtOptions, honoured_by

SHORT_KV = {dtype: name for name, dtype in KV_CACHE_NAMES.items()}
QUANT_CHOICE = click.Choice(all_quants())
GROUP_SIZE_CHOICE = click.Choice([str(g) for g in SUPPORTED_GROUP_SIZES])


def _target_line(caps) -> str:
    """One declaration as the help shows it."""
    kv = ", ".join(SHORT_KV.get(k, k) for k in caps.kv_caches)
    options = ", ".join(FLAGS[o] for o in sorted(caps.honours)) or "none of its own"
    runs = ", ".join(f"{kind} ({e.engine})" for kind, e in caps.engines.items()) or "what runs it: " + " or ".join(RUNS_AS.get(caps.name, ()))
    facts = (f"quant {', '.join(caps.quants)}; KV cache {kv} (first: its default)"
             f"{', static' if caps.static_kv else ''}; options {options}; runs on {runs}")
    head = f"{caps.name}{' (default)' if caps.default_variant and len(variants_of(caps.target)) > 1 else ''}"
    body = textwrap.wrap(f"{caps.about}. {facts}.", 84)
    return "\n".join([f"  {head}", *(f"      {line}" for line in body)])


def target_help() -> str:
    """The `export` epilog: every declared target/variant with what it carries and honours."""
    lines = ["Targets and variants (`edge-export targets` says which run here; an option a target does not "
             "honour is refused):", ""]
    for caps in TARGETS.values():
        lines += ["\b", _target_line(caps)]
    return "\n".join(lines) + "\n"


def _kv_help() -> str:
    carriers = {name: [t.name for t in TARGETS.values() if dtype in t.kv_caches] for name, dtype in KV_CACHE_NAMES.items()}
    held = "; ".join(f"{name}: {', '.join(where)}" for name, where in carriers.items())
    return (f"KV-cache precision, where the target carries it ({held}); default: the target's own. int8: "
            "onnxruntime's GroupQueryAttention keeps the cache in int8 with per-channel scales calibrated on "
            "the built-in prompts or --calibration; a quarter of fp32's memory.")


def _only(option: str) -> str:
    return f"[{', '.join(honoured_by(option))} only] "


EXPORT_OPTIONS = [
    click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Artifact folder to create."),
    click.option("--target", type=click.Choice(target_names()), default="onnx", show_default=True,
                 help="Target to lower to (see below)."),
    click.option("--variant", type=click.Choice(sorted({c.variant for c in TARGETS.values()})),
                 help="Variant of the target (default: " + ", ".join(
                     f"{t} for {name}" for name in target_names() for t in [variants_of(name)[0].variant]) + ")."),
    click.option("--quant", type=QUANT_CHOICE, default="int4", show_default=True,
                 help="Weight precision; each target carries some (see below)."),
    click.option("--method", type=click.Choice([*INT4_METHODS, PALETTIZE]),
                 help="int4 method; keep (the default for a GGUF) carries its quantized blocks as they are; "
                      "rtn is the default otherwise; palettize (coreml only): a 16-entry k-means table per 16 "
                      "output rows instead of block-wise scales."),
    click.option("--head", type=click.Choice(["int8", "int4", "float"]), default="int8", show_default=True,
                 help="lm_head (and a tied embedding): int8 per row keeps logits accurate; int4 is smaller and "
                      "faster (with keep, it re-quantizes the GGUF's Q8_0 head instead of carrying it)."),
    click.option("--group-size", type=GROUP_SIZE_CHOICE, default=str(SUPPORTED_GROUP_SIZES[0]), show_default=True,
                 help="int4 group (block-wise; --method palettize refuses it); where it does not divide a tensor's input width the largest that does is used "
                      "(recorded in the manifest)."),
    click.option("--lut-rows", type=click.IntRange(min=1), default=16, show_default=True,
                 help="--method palettize: consecutive output rows sharing one 16-entry float16 table (1: a table "
                      "per row, the most accurate; each table costs 32 bytes)."),
    click.option("--asymmetric", is_flag=True, help=_only("symmetric") + "int4 with zero points."),
    click.option("--clip-search", is_flag=True,
                 help="int4: shrink each group's range where that lowers its squared error (data-free; SmolLM2 g32 "
                      "rtn --asymmetric: kl_mean 0.222 against 0.272 without, 0.359 symmetric)."),
    click.option("--act-order", is_flag=True, help="GPTQ: quantize columns by decreasing Hessian diagonal."),
    click.option("--max-context", default=2048, show_default=True,
                 help="Positions the KV cache holds (1 .. the model's max_position_embeddings)."),
    click.option("--kv-cache", type=click.Choice(list(KV_CACHE_NAMES)), help=_kv_help()),
    click.option("--accuracy-level", type=click.Choice(["0", "4"]), default=str(OrtOptions.accuracy_level),
                 show_default=True, help=_only("accuracy_level") + "MatMulNBits activations: 4 quantizes them to "
                 "int8 per block (fast on CPU), 0 keeps float (exact)."),
    click.option("--soc", help=_only("soc") + "The Snapdragon to compile for (SM8550, SM8650, SM8750, SC8380XP); "
                 "default: --device's, else SM8650."),
    click.option("--prefill-chunk", type=int, default=QnnOptions.prefill_chunk, show_default=True,
                 help=_only("prefill_chunk") + "Tokens per static prefill graph run."),
    click.option("--opt-tokens", type=int, default=TensorrtOptions.opt_tokens, show_default=True,
                 help=_only("opt_tokens") + "The prompt length the engine's optimization profile is tuned for."),
    click.option("--device", "device", help="A device profile the artifact is for (`edge-export devices`): a "
                 "target with no engine on that kind of device, or a precision its hardware lacks (fp8 on Ampere "
                 "Jetsons), is refused."),
    click.option("--fp8-activations/--fp8-weights-only", default=None,
                 help=_only("fp8_activations") + "fp8: also quantize each linear's input with a per-tensor scale "
                      "from calibration (FP8 GEMMs; tensorrt's default) or keep activations float (portable's)."),
    click.option("--calibration", type=click.Path(dir_okay=False),
                 help="JSONL of prompts or messages (AWQ/GPTQ; fp8 activation, int8 KV-cache and qnn activation "
                      "scales)."),
    click.option("--tensor-loss", type=click.Choice(["auto", "kl", "relative_output_error"]), default="auto",
                 show_default=True,
                 help="A GGUF tensor the target does not carry bit for bit: measure its own loss as the KL with only "
                      "it replaced, or its relative output error (auto: KL while it stays cheap)."),
    click.option("--no-verify", is_flag=True, help="Skip checking the artifact against the reference decoder."),
    click.option("--verify-prompts", "prompts", type=click.Path(exists=True, dir_okay=False),
                 help="JSONL of prompts replacing the built-in 24 that verification runs (fewer: a faster check "
                      "of a big model; the manifest records how many)."),
    click.option("--verify-tokens", type=click.IntRange(1, 256), default=32, show_default=True,
                 help="Tokens verification decodes after each prompt (recorded in the manifest)."),
    click.option("--max-kl", type=float, help=f"Verification threshold on kl_mean (default {MAX_KL})."),
    click.option("--min-top1", type=float, help=f"Verification threshold on top1_agreement (default {MIN_TOP1})."),
    click.option("--overwrite", is_flag=True, help="Replace an existing artifact at OUT (atomically)."),
    click.option("--via", type=click.Choice(["optimum"]),
                 help=_only("via") + "Export through another exporter: optimum (optimum-onnx, then int4 by "
                      "onnxruntime's MatMulNBitsQuantizer) for architectures outside the registry; --quant int4|fp32, "
                      "verified against the transformers model."),
    click.option("--json", "as_json", is_flag=True),
]


def export_options(f):
    """Decorate the `export` command with EXPORT_OPTIONS."""
    for option in reversed(EXPORT_OPTIONS):
        f = option(f)
    return f


def options_from_cli(params: dict):
    """The ExportOptions that `export`'s parsed flags ask for (``params``: click's keyword arguments,
    without ``checkpoint``, ``out`` and ``as_json``)."""
    from .options import ExportOptions
    p = dict(params)
    thresholds = {k: p.pop(k) for k in ("max_kl", "min_top1") if p.get(k) is not None}
    p.pop("max_kl", None), p.pop("min_top1", None)
    return ExportOptions(
        symmetric=not p.pop("asymmetric"), verify=not p.pop("no_verify"), group_size=int(p.pop("group_size")),
        ort=OrtOptions(int(p.pop("accuracy_level"))),
        qnn=QnnOptions(p.pop("soc"), p.pop("prefill_chunk")), tensorrt=TensorrtOptions(p.pop("opt_tokens")),
        **p, **thresholds)


def bench_protocol_options(f):
    """`bench`'s protocol options, as devices.protocol.BENCH_OPTIONS declares them."""
    from devices.protocol import BENCH_OPTIONS
    for name, option in reversed(BENCH_OPTIONS.items()):
        f = click.option(f"--{name.replace('_', '-')}", type=click.IntRange(min=option.least), default=option.default,
                         show_default=True, help=option.help)(f)
    return f
