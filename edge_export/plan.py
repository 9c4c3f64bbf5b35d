"""`edge-export plan`: which quantization and target to export for a device, before exporting.

For each quantization (fp16, int8, int4, fp8) and each target the device runs, the planner gives
the engine that runs it there (runtimes.capabilities), the export's weight bytes (the default
quantization rules, edge_export.sizing), the KV cache at the context in the dtype that target's
export holds (its own unless ``kv_cache`` asks for one it carries), whether both fit the device's
memory budget, and the estimator's decode rate, TTFT and time to produce a reasoning trace, each
with its calibration range (devices.estimate). With ``answer_latency_s`` it also gives the longest
thinking trace that finishes within that time: the ``thinking_budget`` to set on that device.

No weights are needed: a preset, a config.json, or a folder holding one is enough.
"""
from __future__ import annotations

import re
from pathlib import Path

from devices.estimate import Roofline, Workload
from devices.profiles import QUANTS, ProfileError, get_profile
from runtimes.capabilities import KV_BYTES, KV_CACHE_NAMES, TARGETS, get_capabilities, kv_dtype
from runtimes.models import ModelSpec, spec_from_config

from .errors import EdgeError
from .presets import PRESETS, preset_spec
from .sizing import export_weight_bytes, precision_config, tensor_bytes

PROMPT_TOKENS = 128
DEFAULT_TRACE_TOKENS = 4000  # trimmed to what fits the context with the prompt
# A higher precision is preferred when its trace is at most this much slower than the fastest.
QUALITY_SLACK = 0.15
QUALITY = {"fp16": 3, "fp8": 2, "int8": 2, "int4": 1}
WEIGHT_SUFFIXES = (".safetensors", ".gguf")
LATENCY_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0}


class PlanError(EdgeError):
    """A plan cannot be made (bad --context / --trace-tokens / --answer-latency, unknown model)."""


def resolve_spec(source: str) -> tuple[str, ModelSpec]:
    """``preset:NAME``, a preset name, a config.json, a folder (with or without weights), a .gguf
    or a known checkpoint name -> (label, spec). Config keys follow export's rules (spec_from_config)."""
    name = source.removeprefix("preset:")
    path = Path(source)
    if source.startswith("preset:") or (name in PRESETS and not path.exists()):
        return name, preset_spec(name)
    if path.is_file() and path.suffix == ".json":
        return str(path), _config_spec(path)
    if path.is_dir() and not any(f.name.endswith(WEIGHT_SUFFIXES) for f in path.iterdir()):
        if not (path / "config.json").is_file():
            raise PlanError(f"{path}: no config.json and no weights; plan needs at least the model's config.json")
        return str(path), _config_spec(path / "config.json")
    from .checkpoint import open_checkpoint
    ckpt = open_checkpoint(source)
    return str(ckpt.path), ckpt.spec


def _config_spec(path: Path) -> ModelSpec:
    from .checkpoint.hf import read_json
    return spec_from_config(read_json(path, "config.json"), str(path))


def export_workload(spec: ModelSpec, quant: str, target: str, kv_cache: str | None = None) -> Workload:
    """The estimator's view of an export at ``quant`` for ``target`` under the default rules, its KV
    cache in the dtype that target's export holds when ``kv_cache`` is asked for."""
    embedding = 0
    if not spec.tied_embeddings:
        config = precision_config(quant)
        if config is not None:
            from quantizers import default_rules
            config = default_rules(config).resolve(spec.tensor_name("embed"))
        embedding = tensor_bytes((spec.vocab_size, spec.hidden_size), config)
    capabilities = get_capabilities(target)
    return Workload(spec, export_weight_bytes(spec, quant), embedding, quant,
                    KV_BYTES[capabilities.kv_cache(kv_cache)], capabilities.compute_precision(quant))


def exportable() -> set[tuple[str, str]]:
    """(target as profiles name it, quant) pairs that `edge-export export` can produce: what each
    declaration carries (runtimes.capabilities)."""
    return {(name, quant) for name, caps in TARGETS.items() for quant in caps.quants}


def parse_latency(text: str | float | None) -> float | None:
    """``30s``, ``2m``, ``500ms`` or a number of seconds -> seconds (PlanError when malformed)."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|min)?\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise PlanError(f"--answer-latency '{text}' is not a positive time; write it like 30s, 2m or 500ms")
    return float(match.group(1)) * LATENCY_UNITS[match.group(2) or "s"]


def plan_option(spec: ModelSpec, roof: Roofline, quant: str, context: int, trace_tokens: int, budget: int,
                kv_cache: str | None = None, answer_latency_s: float | None = None) -> dict:
    """One (quant, target) row: engine, bytes, fit, and the estimator's figures (tok/s, ms, s) with ranges."""
    work = export_workload(spec, quant, roof.target, kv_cache)
    kv = work.kv_bytes(context)
    decode = roof.decode_tok_s(work, PROMPT_TOKENS, context)
    ttft_ms = roof.ttft_s(work, PROMPT_TOKENS, context) * 1000
    ranges = roof.ranges(work, PROMPT_TOKENS, PROMPT_TOKENS, context)
    option = {
        "quant": quant, "target": roof.target, "engine": roof.engine,
        "engine_why": roof.profile.engine_why(roof.target),
        "kv_cache": get_capabilities(roof.target).kv_cache(kv_cache),
        "exportable": (roof.target, quant) in exportable(),
        "weight_bytes": work.weight_bytes, "kv_bytes": kv, "fits": work.weight_bytes + kv <= budget,
        "est_decode_tok_s": round(decode, 2), "est_decode_tok_s_range": ranges["decode_tok_s"],
        "est_decode_tok_s_at_context": round(roof.decode_tok_s(work, context, context), 2),
        "est_ttft_ms": round(ttft_ms, 1), "est_ttft_ms_range": ranges["ttft_ms"],
        "est_trace_s": round(roof.trace_s(work, PROMPT_TOKENS, trace_tokens, context), 1),
    }
    if answer_latency_s is not None:
        option["thinking_budget"] = roof.trace_tokens_within(work, PROMPT_TOKENS, answer_latency_s,
                                                             context - PROMPT_TOKENS, context)
    return option


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


def plan(source: str, device: str, context: int = 8192, trace_tokens: int | None = None,
         kv_cache: str | None = None, answer_latency: str | float | None = None) -> dict:
    """Plan exports of ``source`` for profile ``device`` (see module doc). Bytes in bytes, rates in
    tokens/s, TTFT in ms (128-token prompt), trace time in s. ``trace_tokens`` None: 4000, or what
    fits ``context`` with the prompt. ``kv_cache``: float32 | float16 | int8 (or fp32 / fp16), held by
    each target that carries it; None (export's default): each target's own. Raises PlanError /
    ProfileError / ConfigError."""
    kv_cache = kv_dtype(kv_cache)
    if kv_cache is not None and kv_cache not in KV_CACHE_NAMES.values():
        raise PlanError(f"--kv-cache {kv_cache} is not one of {', '.join(KV_CACHE_NAMES)}")
    latency_s = parse_latency(answer_latency)
    label, spec = resolve_spec(source)
    trace_tokens = default_trace_tokens(context) if trace_tokens is None else trace_tokens
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
            allowed = get_capabilities(target).context_range(spec.max_position_embeddings)
            if context not in allowed:  # the target's declared max_context rule
                skipped.append({"quant": quant, "target": target, "reason": f"{target} holds {allowed.start}.."
                                f"{allowed.stop - 1} positions, not --context {context}"})
                continue
            options.append(plan_option(spec, Roofline(profile, target), quant, context, trace_tokens,
                                       profile.budget_bytes, kv_cache, latency_s))
    return {
        "model": label, "architecture": spec.architecture, "parameters": spec.parameter_count,
        "device": profile.name, "device_title": profile.title, "budget_bytes": profile.budget_bytes,
        "budget": f"{profile.budget_share.value:.0%} of {profile.memory_gb.value:g} GB ({profile.budget_share.source})",
        "context": context, "trace_tokens": trace_tokens, "prompt_tokens": PROMPT_TOKENS, "kv_cache": kv_cache,
        **({"answer_latency_s": latency_s} if latency_s is not None else {}),
        "estimated": True,
        "options": options, "skipped": skipped,
        "recommended": recommend(options, profile.budget_bytes, context, trace_tokens),
        "notes": profile.notes,
    }


def default_trace_tokens(context: int) -> int:
    """4000 tokens, or as many as fit ``context`` after the prompt."""
    return max(1, min(DEFAULT_TRACE_TOKENS, context - PROMPT_TOKENS))


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


def _band(low_high: list[float], digits: int = 0) -> str:
    return f"{low_high[0]:.{digits}f}-{low_high[1]:.{digits}f}"


def render_plan(p: dict) -> str:
    """The plan as a compact table for a terminal."""
    latency = p.get("answer_latency_s")
    lines = [f"{p['model']} on {p['device']} ({p['device_title']}): budget {_gib(p['budget_bytes'])} "
             f"({p['budget'].split(' (')[0]}), context {p['context']}, trace {p['trace_tokens']} tokens",
             f"{'quant':5s} {'target':13s} {'engine':10s} {'weights':>9s} {'KV':>14s} {'fits':>4s} "
             f"{'decode tok/s':>16s} {'TTFT ms':>19s} {'trace s':>8s}"
             + (f" {'think@' + format(latency, 'g') + 's':>10s}" if latency is not None else "") + "  export"]
    for o in p["options"]:
        kv = f"{_gib(o['kv_bytes'])} {o['kv_cache']}"
        decode = f"{o['est_decode_tok_s']:.1f} ({_band(o['est_decode_tok_s_range'])})"
        ttft = f"{o['est_ttft_ms']:.0f} ({_band(o['est_ttft_ms_range'])})"
        lines.append(f"{o['quant']:5s} {o['target']:13s} {o['engine']:10s} {_gib(o['weight_bytes']):>9s} {kv:>14s} "
                     f"{'yes' if o['fits'] else 'no':>4s} {decode:>16s} {ttft:>19s} {o['est_trace_s']:8.0f}"
                     + (f" {o['thinking_budget']:>10d}" if latency is not None else "")
                     + f"  {'yes' if o['exportable'] else 'not yet'}")
    lines += [f"skipped {s['quant']}: {s['reason']}" for s in p["skipped"]]
    rec = p["recommended"]
    lines.append(f"recommended: {rec['quant']} {rec['target']}: {rec['reason']}" if rec["quant"]
                 else f"recommended: none: {rec['reason']}")
    if latency is not None:
        lines.append(f"think@{latency:g}s: the longest thinking trace that finishes within {latency:g} s after a "
                     f"{p['prompt_tokens']}-token prompt; set it as thinking_budget on that device")
    engines = {(o["target"], o["engine"]): o["engine_why"] for o in p["options"]}
    lines += [f"{target} runs on {engine}: {why}" for (target, engine), why in engines.items()]
    if p["notes"]:
        lines.append(f"note: {p['notes']}")
    lines.append("(all figures are estimates calibrated on published measurements, in brackets their range: "
                 "the class's leave-one-out fits widened by its calibration residuals; not measurements. Sources: "
                 "devices/CALIBRATION.md, `edge-export devices --json`)")
    return "\n".join(lines)
