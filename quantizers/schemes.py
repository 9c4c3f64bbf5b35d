"""Quantization schemes: frozen dataclass configs, registered by the name users type.

A config says *what* to do to one weight; :func:`quantizers.quantize` does it. Every config
round-trips through a plain dict (``to_dict()`` carries a ``"scheme"`` key) so it can live in
an artifact's manifest; :class:`Rules` maps tensor names to configs.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Optional, Union

from .errors import QuantizationError

SUPPORTED_GROUP_SIZES = (32, 64, 128)
CARRIED_INT8_GROUPS = (16,)  # GGUF K-quant sub-blocks of 16 (Q6_K, Q3_K, Q2_K), carried as they are
INT4_METHODS = ("rtn", "awq", "gptq", "keep")  # Int4Config's; "palettize" is Int4LutConfig's
LUT_METHODS = ("palettize",)

SCHEMES: dict[str, type] = {}


def register_scheme(name: str) -> Callable[[type], type]:
    """Class decorator: make a config class known to :func:`scheme_from_dict` as ``name``."""
    def wrap(cls: type) -> type:
        if name in SCHEMES:
            raise QuantizationError(f"scheme {name!r} is registered twice")
        cls.scheme = name
        SCHEMES[name] = cls
        return cls
    return wrap


class _SchemeConfig:
    """Shared dict round-trip of the frozen config dataclasses."""
    scheme: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, **dataclasses.asdict(self)}


def _check_group_size(group_size: Optional[int], allow_none: bool, extra: tuple[int, ...] = ()) -> None:
    if group_size is None and allow_none:
        return
    if group_size not in SUPPORTED_GROUP_SIZES + extra:
        raise QuantizationError(
            f"group_size={group_size!r} is not supported; use one of {SUPPORTED_GROUP_SIZES}"
            + (" or None for one scale per output channel" if allow_none else ""))


@register_scheme("int4")
@dataclass(frozen=True)
class Int4Config(_SchemeConfig):
    """4-bit weights, one scale (and zero point if asymmetric) per ``group_size`` inputs.

    Why 32 by default: it divides every hidden size we meet (SmolLM2's 576 = 18 x 32 = 9 x 64
    but is no multiple of 128; the R1 distills' 1536, 3584, 8960 all divide by 32, 8960 not by
    256); it is the block of GGUF Q4_0/Q4_1 (so GGUF weights carry over unchanged) and of
    Core ML's recommended block-wise int4; and it is the most accurate of the three (about
    +0.8 dB SQNR over 64 and +1.5 dB over 128 on Gaussian weights) for 0.5 bit/weight of
    float16 scales. Use 64 or 128 when memory bandwidth matters more than the last accuracy.

    method: ``rtn`` round-to-nearest; ``awq`` activation-aware scaling (needs calibration
    stats); ``gptq`` Hessian-based error compensation (needs stats); ``keep`` weights that
    arrive already quantized (GGUF Q4_0/Q4_1/Q4_K blocks) are carried as they are — see
    :func:`quantizers.from_gguf_blocks`. ``act_order`` and ``damp`` are GPTQ's; ``clip_search``
    shrinks each group's range to minimise its squared error (any method but ``keep``).
    """
    group_size: int = 32
    symmetric: bool = True
    method: str = "rtn"
    act_order: bool = False
    damp: float = 0.01
    clip_search: bool = False

    def __post_init__(self) -> None:
        _check_group_size(self.group_size, allow_none=False)
        if self.method not in INT4_METHODS:
            raise QuantizationError(f"int4 method={self.method!r} is unknown; use one of {INT4_METHODS}")
        if self.act_order and self.method != "gptq":
            raise QuantizationError(f"act_order=True only applies to method='gptq', not {self.method!r}")
        if not 0.0 < self.damp <= 1.0:
            raise QuantizationError(f"damp={self.damp!r} must be in (0, 1] (a fraction of mean diag(H))")


@register_scheme("int8")
@dataclass(frozen=True)
class Int8Config(_SchemeConfig):
    """Symmetric int8 codes -127..127; one scale max|w|/127 per output row (``group_size=None``)
    or per ``group_size`` inputs. GGUF blocks carried as int8 codes (Q8_0, Q5_0, Q5_K, Q6_K, ...)
    keep their own block: 32, or 16 for Q6_K / Q3_K / Q2_K (``CARRIED_INT8_GROUPS``)."""
    group_size: Optional[int] = None

    def __post_init__(self) -> None:
        _check_group_size(self.group_size, allow_none=True, extra=CARRIED_INT8_GROUPS)


@register_scheme("fp8")
@dataclass(frozen=True)
class Fp8Config(_SchemeConfig):
    """float8 E4M3FN weights (saturating at +-448, never NaN/Inf), one float32 scale per tensor
    or per output row. ``activation_scales`` also records a per-tensor activation scale
    max|x|/448 from calibration stats, for targets that run the matmul in fp8 (FP8 Q/DQ)."""
    per_channel: bool = False
    activation_scales: bool = False


@register_scheme("int4_lut")
@dataclass(frozen=True)
class Int4LutConfig(_SchemeConfig):
    """4-bit palettized weights (``--quant int4 --method palettize``): one 16-entry float16 lookup
    table per ``rows_per_lut`` consecutive output rows, its entries the k-means centroids of those
    rows' values (``iterations`` Lloyd steps from the quantiles); every weight is the uint4 index of
    its nearest entry. Core ML's ``constexpr_lut_to_dense`` (iOS 18, per-grouped-channel) stores it.

    Why 16 rows: the table costs 32 bytes per group, so 16 rows of SmolLM2's K=576 pay 0.028
    bit/weight for it (block-wise int4 at group 32 pays 0.5); a table per row is the most accurate
    and a table per tensor the smallest, and coremltools' own default for grouped channels is 16.
    The groups run along N (output rows), not along K as Int4Config's ``group_size`` does.
    """
    rows_per_lut: int = 16
    iterations: int = 100
    method: str = "palettize"

    def __post_init__(self) -> None:
        if not (isinstance(self.rows_per_lut, int) and self.rows_per_lut >= 1):
            raise QuantizationError(f"rows_per_lut={self.rows_per_lut!r} must be a positive number of rows")
        if not (isinstance(self.iterations, int) and self.iterations >= 0):
            raise QuantizationError(f"iterations={self.iterations!r} must be a number of Lloyd steps >= 0")
        if self.method != "palettize":
            raise QuantizationError(f"int4_lut method={self.method!r} is unknown; use 'palettize'")


Config = Union[Int4Config, Int8Config, Fp8Config, Int4LutConfig]


def scheme_from_dict(d: dict[str, Any]) -> Config:
    """Inverse of ``config.to_dict()``: ``{"scheme": "int4", "group_size": 64}`` -> Int4Config."""
    fields = dict(d)
    name = fields.pop("scheme", None)
    if name not in SCHEMES:
        raise QuantizationError(f"scheme {name!r} is unknown; known schemes: {sorted(SCHEMES)}")
    cls = SCHEMES[name]
    unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise QuantizationError(f"scheme {name!r} has no option(s) {sorted(unknown)}")
    return cls(**fields)


def fallback_group_size(k: int, preferred: int = 32) -> Optional[int]:
    """The largest supported group size <= ``preferred`` that divides ``k`` (in_features), or
    None when none does (keep that tensor in float or int8). E.g. k=576, preferred=128 -> 64."""
    fits = [g for g in SUPPORTED_GROUP_SIZES if g <= preferred and k % g == 0]
    return max(fits) if fits else None


def check_divides(k: int, group_size: int, name: str) -> None:
    """Raise QuantizationError unless ``group_size`` divides ``k`` (the tensor's in_features)."""
    if k % group_size:
        fits = [g for g in SUPPORTED_GROUP_SIZES if k % g == 0]
        hint = (f"group sizes that divide it: {fits}" if fits
                else "no supported group size divides it; keep it in float or int8")
        raise QuantizationError(
            f"tensor {name or '<unnamed>'}: group_size={group_size} does not divide in_features K={k}; {hint}")


@dataclass(frozen=True)
class Rules:
    """Per-tensor configs: an ordered list of (pattern, config or None); the first match wins.

    A pattern is an fnmatch glob on the HF tensor name (``"*proj.weight"``) or, prefixed with
    ``"re:"``, a regular expression that must match the whole name. ``None`` keeps the tensor
    in float; a name that no rule matches is kept in float too (the safe direction: bigger, never
    wrong), and the export records every tensor kept.
    """
    rules: tuple[tuple[str, Optional[Config]], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple((str(p), c) for p, c in self.rules))
        for pattern, _ in self.rules:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise QuantizationError(f"rule pattern {pattern!r} is not a valid regex: {exc}") from exc

    def resolve(self, name: str) -> Optional[Config]:
        """The config for tensor ``name``, or None to keep it in float."""
        for pattern, config in self.rules:
            if _matches(pattern, name):
                return config
        return None

    def to_list(self) -> list[dict[str, Any]]:
        return [{"pattern": p, "config": None if c is None else c.to_dict()} for p, c in self.rules]

    @classmethod
    def from_list(cls, items: Iterable[dict[str, Any]]) -> "Rules":
        return cls(tuple((it["pattern"], None if it["config"] is None else scheme_from_dict(it["config"]))
                         for it in items))


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def default_rules(config: Config) -> Rules:
    """The rules an export uses unless told otherwise (HF tensor names).

    - norms (input/post-attention, final, Qwen3's q_norm/k_norm) and biases stay float: they are
      tiny and every activation passes through them.
    - ``lm_head.weight``: int8 per output row when ``config`` is int4 or int8 — the logits are
      the most quantization-sensitive matmul of the model (an argmax flip is a different token),
      and int4 there costs measurable agreement for ~7% of the weights; with fp8 it takes fp8.
    - ``model.embed_tokens.weight``: int8 per row, whatever the scheme. A gather dequantizes one
      row with one scale, so per-row int8 is free at run time and its error enters once per token
      instead of accumulating over K. It is ~13% of R1-Distill-Qwen-1.5B's weights (151936 x 1536),
      so keeping it float16 would cost a phone 467 MB against 233 MB. Per-row int8 of a
      [vocab, hidden] matrix is also per-output-channel, so a tied lm_head can share it.
    - every other ``*proj.weight`` (q/k/v/o, gate/up/down) takes ``config``.
    """
    head = config if isinstance(config, Fp8Config) else Int8Config()
    return Rules((
        ("*norm.weight", None),
        ("*.bias", None),
        ("lm_head.weight", head),
        ("model.embed_tokens.weight", Int8Config()),
        ("*proj.weight", config),
    ))
