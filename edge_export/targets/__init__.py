"""Targets an export can lower to, registered by the name users type (`--target`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import ExportError


@dataclass
class Target:
    """One lowering. ``lower(spec, weights, folder, options) -> manifest fields`` writes the graph
    files into ``folder``; ``available()`` says whether what it produces can run here."""

    name: str
    variants: dict[str, str]  # variant -> one-line description
    needs: str
    lower: Callable
    available: Callable[[], tuple[bool, str]]
    quant: tuple = ("fp32", "fp16", "int8", "int4", "fp8")
    backend: str = ""
    default_variant: str = ""
    extra: dict = field(default_factory=dict)
    variant_quant: dict = field(default_factory=dict)  # variant -> the precisions it takes, where fewer
    prepare: Callable | None = None  # ExportOptions -> ExportOptions: the target's defaults
    variant_available: dict = field(default_factory=dict)  # variant -> its own available(), where it differs


_TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    _TARGETS[target.name] = target
    return target


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
                         "quant": list(target.variant_quant.get(variant, target.quant)), "runs_here": ok,
                         "why_not": why})
    return rows


def _load_builtin() -> None:
    from . import onnx  # noqa: F401  (registration side effect)
    from . import coreml  # noqa: F401
    from . import tensorrt  # noqa: F401


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
