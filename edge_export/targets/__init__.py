"""Targets an export can lower to, registered by the name users type (`--target`).

What each target and variant carries, honours and runs on is declared in runtimes/capabilities.py;
a Target here is the code that lowers to it, and must implement exactly the declared variants.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from runtimes.capabilities import RUNS_AS, SCORERS, TargetCapabilities, capabilities_of, variants_of

from ..errors import ExportError


@dataclass
class Target:
    """One lowering. ``lower(spec, weights, folder, variant, options, calibration) -> manifest
    fields`` writes the graph files into ``folder`` (``calibration``: the prompts' token ids where
    the declaration says the target calibrates, else what the export calibrated with, or None);
    ``available()`` says whether what it produces can run here."""

    name: str
    needs: str
    lower: Callable
    available: Callable[[], tuple[bool, str]]
    backend: str = ""
    prepare: Callable | None = None  # ExportOptions -> ExportOptions: the target's defaults
    variant_available: dict = field(default_factory=dict)  # variant -> its own available(), where it differs

    @property
    def variants(self) -> dict[str, str]:
        """Variant -> its one-line description, as declared (default variant first)."""
        return {c.variant: c.about for c in variants_of(self.name)}

    @property
    def default_variant(self) -> str:
        return variants_of(self.name)[0].variant

    def capabilities(self, variant: str | None = None) -> TargetCapabilities:
        return capabilities_of(self.name, variant)


_TARGETS: dict[str, Target] = {}
# Verification scorers by the name declarations give (runtimes.capabilities.SCORERS):
# (artifact, options) -> a verify.compare candidate, or None for the artifact's own backend.
_SCORERS: dict[str, Callable | None] = {"backend": None}


def register_target(target: Target) -> Target:
    if not variants_of(target.name):
        raise ExportError(f"target '{target.name}' has no declaration in runtimes/capabilities.py")
    _TARGETS[target.name] = target
    return target


def register_scorer(name: str, make: Callable) -> Callable:
    if name not in SCORERS:
        raise ExportError(f"scorer '{name}' is not declared (runtimes.capabilities.SCORERS: {', '.join(SCORERS)})")
    _SCORERS[name] = make
    return make


def scorer(name: str) -> Callable | None:
    """The verification scorer a declaration names."""
    _load_builtin()
    return _SCORERS[name]


def get_target(name: str, variant: str | None = None) -> tuple[Target, str]:
    _load_builtin()
    if name not in _TARGETS:
        raise ExportError(f"unknown --target '{name}' (known: {', '.join(sorted(_TARGETS))})")
    target = _TARGETS[name]
    variant = variant or target.default_variant
    if variant not in target.variants:
        raise ExportError(f"--variant '{variant}' is not a variant of target '{name}' "
                          f"(variants: {', '.join(target.variants)})")
    return target, variant


def all_targets() -> list[Target]:
    _load_builtin()
    return [_TARGETS[n] for n in sorted(_TARGETS)]


def describe_targets() -> list[dict]:
    """Every registered target and variant: what it needs, which precisions, can it run here."""
    rows = []
    for target in all_targets():
        for variant, about in target.variants.items():
            ok, why = target.variant_available.get(variant, target.available)()
            rows.append({"target": target.name, "variant": variant, "description": about, "needs": target.needs,
                         **declared(target.capabilities(variant)), "runs_here": ok, "why_not": why})
    return rows


def declared(caps: TargetCapabilities) -> dict:
    """A declaration as `targets --json` shows it."""
    least, most = caps.max_context
    return {"name": caps.name, "default_variant": caps.default_variant, "quant": list(caps.quants),
            "kv_cache": list(caps.kv_caches), "static_kv": caps.static_kv,
            "max_context": {"least": least, "most": most or "the model's max_position_embeddings"},
            "honours": sorted(caps.honours), "scorer": caps.scorer, "calibrates": caps.calibrates,
            "compute": dict(caps.compute), "engines": {kind: e.engine for kind, e in caps.engines.items()}}


# The README's table of what each target carries and honours sits between these lines.
TABLE_BEGIN, TABLE_END = "<!-- BEGIN declarations (runtimes/capabilities.py) -->", "<!-- END declarations -->"


def capabilities_markdown() -> str:
    """The README's table of every declaration (what --quant, --kv-cache and the per-target options
    each target takes, its cache, its verification and its engines), between TABLE_BEGIN/END."""
    from runtimes.capabilities import INT4_METHODS, TARGETS, KV_CACHE_NAMES

    from ..options import FLAGS
    short = {dtype: name for name, dtype in KV_CACHE_NAMES.items()}
    rows = [TABLE_BEGIN, "| target/variant | --quant | KV cache (first: default) | options of its own | "
            "verified by | runs on (device kind: engine) |", "| --- | --- | --- | --- | --- | --- |"]
    for caps in TARGETS.values():
        runs_as = RUNS_AS.get(caps.name, ())
        engines = (", ".join(f"{kind}: {e.engine}" for kind, e in caps.engines.items())
                   or ("as " + " or ".join(runs_as) if runs_as else "none: a cross-check, not offered by plan"))
        extra = [m for m in caps.methods if m not in INT4_METHODS]  # an int4 form only some targets store
        quants = ", ".join(caps.quants) + "".join(f" (int4 also `--method {m}`)" for m in extra)
        rows.append(f"| `{caps.name}` | {quants} | "
                    f"{', '.join(short.get(k, k) for k in caps.kv_caches)}{' (static)' if caps.static_kv else ''} | "
                    f"{', '.join(f'`{FLAGS[o]}`' for o in sorted(caps.honours)) or '-'} | {caps.scorer} | {engines} |")
    return "\n".join(rows + [TABLE_END])


def _load_builtin() -> None:
    from . import onnx  # noqa: F401  (registration side effect)
    from . import coreml  # noqa: F401
    from . import tensorrt  # noqa: F401


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
