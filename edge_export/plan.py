"""`edge-export plan`: which quantization and target to export for a device, before exporting.

For each quantization (fp16, int8, int4, fp8) and each target the device runs, the planner gives
the export's weight bytes (the default quantization rules, edge_export.sizing), the KV cache at the
context (fp16, or int8 with ``kv_cache="int8"`` on the targets that carry it: onnx/ort), whether
both fit the device's memory budget, and the roofline estimator's decode rate, TTFT and time to
produce a reasoning trace (devices.estimate). Every figure is an estimate.
"""
from __future__ import annotations

from pathlib import Path

from devices.estimate import Roofline, Workload
from devices.profiles import QUANTS, ProfileError, get_profile
from runtimes.models import ModelSpec

from .errors import EdgeError
from .presets import PRESETS, preset_spec
from .sizing import export_weight_bytes, precision_config, tensor_bytes

PROMPT_TOKENS = 128
# A higher precision is preferred when its trace is at most this much slower than the fastest.
QUALITY_SLACK = 0.15
QUALITY = {"fp16": 3, "fp8": 2, "int8": 2, "int4": 1}
# KV-cache precisions a plan can ask for, in bytes per element. Which targets carry one beyond fp16
# is export's KV_CACHE_TARGETS; every other target keeps its fp16 cache.
KV_CACHES = {"fp16": 2, "int8": 1}


class PlanError(EdgeError):
    """A plan cannot be made (bad --context / --trace-tokens, unknown model)."""


def resolve_spec(source: str) -> tuple[str, ModelSpec]:
    """``preset:NAME``, a preset name, or a checkpoint (folder, .gguf, known name) -> (label, spec)."""
    name = source.removeprefix("preset:")
    if source.startswith("preset:") or (name in PRESETS and not Path(source).exists()):
        return name, preset_spec(name)
    from .checkpoint import open_checkpoint
    ckpt = open_checkpoint(source)
    return str(ckpt.path), ckpt.spec


def export_workload(spec: ModelSpec, quant: str, kv_bytes_per_element: int = 2) -> Workload:
    """The estimator's view of an export at ``quant`` under the default rules (fp16 KV cache
    unless told otherwise)."""
    embedding = 0
    if not spec.tied_embeddings:
        config = precision_config(quant)
        if config is not None:
            from quantizers import default_rules
            config = default_rules(config).resolve(spec.tensor_name("embed"))
        embedding = tensor_bytes((spec.vocab_size, spec.hidden_size), config)
    return Workload(spec, export_weight_bytes(spec, quant), embedding, quant, kv_bytes_per_element)


def exportable() -> set[tuple[str, str]]:
    """(target as profiles name it, quant) pairs that `edge-export export` can produce in this version."""
    from .targets import all_targets
    pairs = set()
    for t in all_targets():
        for variant in t.variants:
            names = {f"{t.name}/{variant}"} | ({t.name} if variant == t.default_variant else set())
            pairs |= {(name, quant) for name in names for quant in t.variant_quant.get(variant, t.quant)}
    return pairs


def kv_cache_for(target: str, kv_cache: str) -> str:
    """The KV-cache precision a target's export holds when ``kv_cache`` is asked for."""
    from .export import KV_CACHE_TARGETS
    from .targets import get_target
    carriers = KV_CACHE_TARGETS.get(kv_cache)
    if carriers is None:
        return kv_cache
    name, _, variant = target.partition("/")  # profiles name a default variant by its target alone
    try:
        _, variant = get_target(name, variant or None)
    except EdgeError:
        return "fp16"  # a target this version cannot export yet carries nothing
    return kv_cache if (name, variant) in carriers else "fp16"


def plan_option(spec: ModelSpec, roof: Roofline, quant: str, context: int, trace_tokens: int, budget: int,
                kv_cache: str = "fp16") -> dict:
    """One (quant, target) row: bytes, fit, and the roofline's figures (tok/s, ms, s)."""
    kv_cache = kv_cache_for(roof.target, kv_cache)
    work = export_workload(spec, quant, KV_CACHES[kv_cache])
    kv = work.kv_bytes(context)
    return {
        "quant": quant, "target": roof.target, "engine": roof.engine, "kv_cache": kv_cache,
        "exportable": (roof.target, quant) in exportable(),
        "weight_bytes": work.weight_bytes, "kv_bytes": kv, "fits": work.weight_bytes + kv <= budget,
        "est_decode_tok_s": round(roof.decode_tok_s(work, PROMPT_TOKENS, context), 2),
        "est_decode_tok_s_at_context": round(roof.decode_tok_s(work, context, context), 2),
        "est_ttft_ms": round(roof.ttft_s(work, PROMPT_TOKENS, context) * 1000, 1),
        "est_trace_s": round(roof.trace_s(work, PROMPT_TOKENS, trace_tokens, context), 1),
    }


def recommend(options: list[dict], budget: int, context: int, trace_tokens: int) -> dict | None:
    """The option to export: the fastest trace among those that fit, unless a higher precision is
    within QUALITY_SLACK of it. None when nothing fits."""
    fitting = [o for o in options if o["fits"]]
    if not fitting:
        smallest = min(options, key=lambda o: o["weight_bytes"] + o["kv_bytes"], default=None)
        need = f"; the smallest, {smallest['quant']}, needs {_gib(smallest['weight_bytes'] + smallest['kv_bytes'])}" \
            if smallest else ""
        return {"quant": None, "target": None,
                "reason": f"nothing fits the {_gib(budget)} budget at {context} tokens of context{need}: "
                          "pick a smaller model or a shorter --context"}
    # what this version can export comes first; a target still to come is recommended only when alone
    fitting = [o for o in fitting if o["exportable"]] or fitting
    fastest = min(fitting, key=lambda o: o["est_trace_s"])
    close = [o for o in fitting if o["est_trace_s"] <= fastest["est_trace_s"] * (1 + QUALITY_SLACK)]
    order = {id(o): i for i, o in enumerate(options)}
    best = max(close, key=lambda o: (QUALITY[o["quant"]], -order[id(o)]))
    kind = "exportable option" if best["exportable"] else "option"
    room = f"the {_gib(budget)} budget at {context} tokens of context"
    if len(fitting) == 1:
        why = f"the only {kind} that fits {room} ({trace_tokens}-token trace in {best['est_trace_s']:g} s)"
    elif best is fastest:
        why = (f"the fastest {trace_tokens}-token trace ({best['est_trace_s']:g} s) of the {len(fitting)} {kind}s "
               f"that fit {room}")
    else:
        why = (f"a {trace_tokens}-token trace in {best['est_trace_s']:g} s, within {QUALITY_SLACK:.0%} of the fastest "
               f"({fastest['quant']} {fastest['target']}, {fastest['est_trace_s']:g} s), at higher precision")
    if not best["exportable"]:
        why += f"; `edge-export export` cannot produce {best['target']} yet"
    return {"quant": best["quant"], "target": best["target"], "reason": why}


def plan(source: str, device: str, context: int = 8192, trace_tokens: int = 4000, kv_cache: str = "fp16") -> dict:
    """Plan exports of ``source`` for profile ``device`` (see module doc). Bytes in bytes, rates in
    tokens/s, TTFT in ms (128-token prompt), trace time in s. Raises PlanError / ProfileError."""
    if kv_cache not in KV_CACHES:
        raise PlanError(f"--kv-cache {kv_cache} is not one of {', '.join(KV_CACHES)}")
    label, spec = resolve_spec(source)
    _check_lengths(spec, context, trace_tokens)
    profile = get_profile(device)
    options, skipped = [], []
    for quant in QUANTS:
        try:
            profile.check_precision(quant)
        except ProfileError as e:
            skipped.append({"quant": quant, "reason": str(e)})
            continue
        for target in profile.targets:
            options.append(plan_option(spec, Roofline(profile, target), quant, context, trace_tokens,
                                       profile.budget_bytes, kv_cache))
    return {
        "model": label, "architecture": spec.architecture, "parameters": spec.parameter_count,
        "device": profile.name, "device_title": profile.title, "budget_bytes": profile.budget_bytes,
        "budget": f"{profile.budget_share.value:.0%} of {profile.memory_gb.value:g} GB ({profile.budget_share.source})",
        "context": context, "trace_tokens": trace_tokens, "prompt_tokens": PROMPT_TOKENS, "kv_cache": kv_cache,
        "estimated": True,
        "options": options, "skipped": skipped,
        "recommended": recommend(options, profile.budget_bytes, context, trace_tokens),
        "notes": profile.notes,
    }


def _check_lengths(spec: ModelSpec, context: int, trace_tokens: int) -> None:
    if context <= PROMPT_TOKENS:
        raise PlanError(f"--context {context} must exceed the {PROMPT_TOKENS}-token prompt")
    if context > spec.max_position_embeddings:
        raise PlanError(f"--context {context} exceeds the model's {spec.max_position_embeddings} positions")
    if trace_tokens < 1 or PROMPT_TOKENS + trace_tokens > context:
        raise PlanError(f"--trace-tokens {trace_tokens} must be at least 1 and fit --context {context} "
                        f"with the {PROMPT_TOKENS}-token prompt; raise --context or lower --trace-tokens")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def render_plan(p: dict) -> str:
    """The plan as a compact table for a terminal."""
    lines = [f"{p['model']} on {p['device']} ({p['device_title']}): budget {_gib(p['budget_bytes'])} "
             f"({p['budget'].split(' (')[0]}), context {p['context']}, trace {p['trace_tokens']} tokens",
             f"{'quant':5s} {'target':13s} {'weights':>9s} {'KV':>13s} {'fits':>4s} {'decode tok/s':>12s} "
             f"{'TTFT ms':>8s} {'trace s':>8s}  export"]
    for o in p["options"]:
        kv = f"{_gib(o['kv_bytes'])} {o['kv_cache']}"
        lines.append(f"{o['quant']:5s} {o['target']:13s} {_gib(o['weight_bytes']):>9s} {kv:>13s} "
                     f"{'yes' if o['fits'] else 'no':>4s} {o['est_decode_tok_s']:12.1f} {o['est_ttft_ms']:8.0f} "
                     f"{o['est_trace_s']:8.0f}  {'yes' if o['exportable'] else 'not yet'}")
    lines += [f"skipped {s['quant']}: {s['reason']}" for s in p["skipped"]]
    rec = p["recommended"]
    lines.append(f"recommended: {rec['quant']} {rec['target']}: {rec['reason']}" if rec["quant"]
                 else f"recommended: none: {rec['reason']}")
    if p["notes"]:
        lines.append(f"note: {p['notes']}")
    lines.append("(all figures are roofline estimates from the spec sheet, not measurements; "
                 "`edge-export devices --json` lists the sources)")
    return "\n".join(lines)
