"""The roofline estimator, and ``--device estimate:PROFILE``, which answers a benchmark from a spec sheet.

Decode is memory-bound: one new token reads every streamed weight once plus the KV cache so far,

    decode_tok_s = efficiency x bandwidth / (weight bytes read per token + KV bytes at the context)

with one efficiency per engine class (phone NPU, Apple GPU, Jetson GPU, CPU) fitted on published
measurements (``devices/calibration.py``). Prefill is compute-bound: FLOPs = 2 x parameters x
prompt tokens (+ causal attention), divided by the published peak for the compute precision x an
efficiency; where no peak is published, by a compute-to-bandwidth ratio (FLOP per byte of
bandwidth) fitted on published TTFT / prefill points of the class. Every result says which, in
its ``method``.
"""
from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass

from runtimes.errors import EdgeError
from runtimes.models import ModelSpec

from .calibration import MODELS, PublishedPoint, calibration_points
from .profiles import CPU, DeviceProfile, get_profile, list_profiles
from .protocol import RESULT_FORMAT
from .registry import Device, register_device

# Share of a published dense peak reached in prefill where no published TTFT calibrates it (GPUs).
ASSUMED_PREFILL_EFFICIENCY = 0.5
# Targets whose graphs have static shapes: every decode step reads the whole KV buffer.
STATIC_KV_TARGETS = ("onnx/qnn",)


class EstimateError(EdgeError):
    """An estimate cannot be made (no profile named, an artifact the estimator cannot read)."""


@dataclass(frozen=True)
class Workload:
    """A model as the estimator sees it. Bytes are stored bytes (scales included).

    ``embedding_bytes``: the token-embedding table, gathered one row per token and so not
    streamed (0 when tied: the table is then read whole as the output projection).
    """

    spec: ModelSpec
    weight_bytes: int
    embedding_bytes: int
    precision: str
    kv_bytes_per_element: int = 2

    @property
    def streamed_bytes(self) -> int:
        """Weight bytes read per decoded token."""
        return self.weight_bytes - self.embedding_bytes

    def kv_bytes(self, tokens: int) -> int:
        return self.spec.kv_bytes_per_token(self.kv_bytes_per_element) * tokens


def output_params(spec: ModelSpec) -> int:
    return spec.vocab_size * spec.hidden_size


def compute_params(spec: ModelSpec) -> int:
    """Parameters every token multiplies through (all but an untied embedding table)."""
    return spec.parameter_count - (0 if spec.tied_embeddings else output_params(spec))


def workload_from_bits(spec: ModelSpec, precision: str, body_bits: float, head_bits: float) -> Workload:
    """A Workload from bits per weight: ``head_bits`` for the output projection (and an untied
    embedding table), ``body_bits`` for everything else."""
    head = output_params(spec)
    tables = 1 if spec.tied_embeddings else 2
    body = spec.parameter_count - tables * head
    embedding = 0 if spec.tied_embeddings else int(head * head_bits / 8)
    return Workload(spec, int(body * body_bits / 8 + head * head_bits / 8) + embedding, embedding, precision)


def prefill_flops(spec: ModelSpec, tokens: int) -> float:
    """FLOPs of a prefill of ``tokens``: 2 x compute parameters x tokens, plus causal attention
    (QK^T and AV: 2 x head_dim x T(T+1) per head and layer)."""
    attention = 2 * spec.num_layers * spec.num_heads * spec.head_dim * tokens * (tokens + 1)
    return 2.0 * compute_params(spec) * tokens + attention


# ---- calibration -----------------------------------------------------------------------------
def point_workload(point: PublishedPoint) -> Workload:
    return workload_from_bits(MODELS[point.model], point.precision, point.body_bits, point.head_bits)


def point_efficiency(point: PublishedPoint) -> float:
    """The share of the device's peak bandwidth a published decode rate implies."""
    work = point_workload(point)
    per_token = work.streamed_bytes + work.kv_bytes(point.decode_context)
    return point.decode_tok_s * per_token / get_profile(point.device).bandwidth_bytes_s


def point_prefill_ratio(point: PublishedPoint) -> float | None:
    """Compute rate per byte/s of bandwidth a published TTFT or prefill rate implies (FLOP/byte)."""
    spec, bandwidth = MODELS[point.model], get_profile(point.device).bandwidth_bytes_s
    if point.ttft_ms and point.prompt_tokens:
        return prefill_flops(spec, point.prompt_tokens) / (point.ttft_ms / 1000) / bandwidth
    if point.prefill_tok_s:
        return prefill_flops(spec, 128) / 128 * point.prefill_tok_s / bandwidth
    return None


def _geomean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


@dataclass(frozen=True)
class ClassFit:
    """What calibration gives one engine class: a decode efficiency (share of peak bandwidth) and,
    where published prefill points exist, a compute-to-bandwidth ratio (FLOP per byte)."""

    engine: str
    decode_efficiency: float
    decode_points: int
    prefill_ratio: float | None
    prefill_points: int


@functools.cache
def class_fit(engine: str) -> ClassFit:
    """Geometric means over the class's calibration points (devices/calibration.py)."""
    points = calibration_points(engine)
    if not points:
        raise EstimateError(f"no calibration point for engine class '{engine}' in devices/calibration.py")
    ratios = [r for r in map(point_prefill_ratio, points) if r]
    return ClassFit(engine, _geomean([point_efficiency(p) for p in points]), len(points),
                    _geomean(ratios) if ratios else None, len(ratios))


def peak_ratio(engine: str) -> float | None:
    """Assumed prefill FLOP per byte for a class with published peaks: the assumed efficiency x the
    median peak-to-bandwidth ratio of the class's profiles that publish an fp16 peak."""
    ratios = [p.peak_flops("fp16") / p.bandwidth_bytes_s for p in list_profiles(include_host=False)
              if engine in p.targets.values() and p.peak_flops("fp16")]
    return ASSUMED_PREFILL_EFFICIENCY * statistics.median(ratios) if ratios else None


def point_errors(point: PublishedPoint) -> dict[str, float]:
    """Relative error (estimate / published - 1) of each published figure of a point."""
    profile = get_profile(point.device)
    target = next(t for t, engine in profile.targets.items() if engine == point.engine)
    roof, work = Roofline(profile, target), point_workload(point)
    errors = {"decode_tok_s": roof.decode_tok_s(work, point.decode_context, point.decode_context)
              / point.decode_tok_s - 1}
    if point.ttft_ms and point.prompt_tokens:
        errors["ttft_ms"] = roof.ttft_s(work, point.prompt_tokens) * 1000 / point.ttft_ms - 1
    elif point.prefill_tok_s:
        errors["prefill_tok_s"] = 128 / roof.ttft_s(work, 128) / point.prefill_tok_s - 1
    return errors


# ---- the roofline for one device and target ----------------------------------------------------
@dataclass(frozen=True)
class Roofline:
    """The estimator for one profile and target. Times in seconds unless named otherwise."""

    profile: DeviceProfile
    target: str

    @classmethod
    def for_device(cls, profile: str | DeviceProfile, target: str, precision: str | None = None) -> "Roofline":
        """Checks that the target runs on the device, and the precision if given (ProfileError)."""
        profile = get_profile(profile) if isinstance(profile, str) else profile
        profile.engine(target)
        if precision:
            profile.check_precision(precision)
        return cls(profile, target)

    @property
    def engine(self) -> str:
        return self.profile.targets[self.target]

    @property
    def efficiency(self) -> float:
        # a measured host bandwidth is already an achieved rate, not a spec-sheet peak
        return 1.0 if self.profile.measured else class_fit(self.engine).decode_efficiency

    def kv_tokens(self, context: int, max_context: int | None) -> int:
        """Tokens of KV read per step: the whole buffer for static-shape targets."""
        return max_context if (max_context and self.target in STATIC_KV_TARGETS) else context

    def seconds_per_token(self, work: Workload, context: int, max_context: int | None = None) -> float:
        read = work.streamed_bytes + work.kv_bytes(self.kv_tokens(context, max_context))
        return read / (self.efficiency * self.profile.bandwidth_bytes_s)

    def decode_tok_s(self, work: Workload, context: int, max_context: int | None = None) -> float:
        """Decode rate (tokens/s) with ``context`` tokens in the KV cache."""
        return 1.0 / self.seconds_per_token(work, context, max_context)

    def prefill_rate(self, precision: str) -> tuple[float, str]:
        """Sustained prefill compute (FLOP/s) and how it was obtained."""
        compute = "fp8" if precision == "fp8" else "fp16"  # our int8 / int4 are weight-only: fp16 math
        bandwidth, fit = self.profile.bandwidth_gb_s.value, class_fit(self.engine)
        peak = None if self.engine == CPU else self.profile.peak_flops(compute)
        if peak:
            return peak * ASSUMED_PREFILL_EFFICIENCY, (
                f"published {compute} peak {peak / 1e12:g} T/s x {ASSUMED_PREFILL_EFFICIENCY} assumed prefill "
                f"efficiency (no published TTFT point calibrates {self.engine})")
        if fit.prefill_ratio:
            return fit.prefill_ratio * bandwidth * 1e9, (
                f"no published {compute} peak on {self.profile.name}: compute = {fit.prefill_ratio:.1f} FLOP per "
                f"byte of bandwidth x {bandwidth:g} GB/s (ratio fitted on {fit.prefill_points} published "
                f"{self.engine} prefill point(s))")
        ratio = peak_ratio(self.engine)
        if ratio is None:
            raise EstimateError(f"no way to estimate prefill on {self.profile.name} ({self.engine}): no peak, "
                                "no calibrated ratio")
        return ratio * bandwidth * 1e9, (
            f"no published {compute} peak on {self.profile.name}: compute = {ratio:.1f} FLOP per byte of "
            f"bandwidth x {bandwidth:g} GB/s (the {self.engine} class's published peak-to-bandwidth ratio x "
            f"{ASSUMED_PREFILL_EFFICIENCY} assumed efficiency)")

    def ttft_s(self, work: Workload, prompt_tokens: int, max_context: int | None = None) -> float:
        """Time to the first token: the larger of the prefill's compute time and one weight pass."""
        rate, _ = self.prefill_rate(work.precision)
        return max(prefill_flops(work.spec, prompt_tokens) / rate,
                   self.seconds_per_token(work, prompt_tokens, max_context))

    def trace_s(self, work: Workload, prompt_tokens: int, new_tokens: int, max_context: int | None = None) -> float:
        """Time to produce ``new_tokens`` after a prompt: TTFT + decode, the per-token time growing
        linearly with the KV cache (summed in closed form)."""
        base = self.seconds_per_token(work, 0, max_context)
        if self.target in STATIC_KV_TARGETS and max_context:
            decode = new_tokens * base
        else:
            per_kv_token = self.seconds_per_token(work, 1) - self.seconds_per_token(work, 0)
            decode = new_tokens * base + per_kv_token * (new_tokens * prompt_tokens + new_tokens * (new_tokens - 1) / 2)
        return self.ttft_s(work, prompt_tokens, max_context) + decode

    def method(self, work: Workload) -> dict:
        """How each figure was obtained, in words, with the numbers used."""
        fit = class_fit(self.engine)
        bandwidth = self.profile.bandwidth_gb_s
        if self.profile.measured:
            efficiency = f"efficiency 1.0: the bandwidth is a measured read rate ({bandwidth.source})"
        else:
            efficiency = (f"efficiency {fit.decode_efficiency:.2f} fitted on {fit.decode_points} published "
                          f"{self.engine} point(s) (devices/calibration.py)")
        kv = ("the whole KV buffer (static-shape graph)" if self.target in STATIC_KV_TARGETS else
              "the KV cache at the context")
        decode = (f"roofline: {efficiency} x {bandwidth.value:g} GB/s ({bandwidth.source}) / "
                  f"({work.streamed_bytes / 1e9:.2f} GB weights read per token + {kv}, "
                  f"{work.spec.kv_bytes_per_token(work.kv_bytes_per_element)} B per token)")
        return {"decode": decode, "prefill": self.prefill_rate(work.precision)[1],
                "engine": self.engine, "calibration": "devices/calibration.py"}


# ---- --device estimate:PROFILE --------------------------------------------------------------------
NON_WEIGHT_SUFFIXES = (".json", ".txt", ".jinja", ".md")
# An artifact target a profile does not list, and what runs it there (first one the profile has).
RUNS_AS = {"onnx/portable": ("tensorrt", "onnx/ort")}
KV_ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "fp8": 1}


def artifact_target(manifest: dict) -> str:
    """A manifest's target as profiles name it: onnx/ort, onnx/portable, onnx/qnn, coreml, tensorrt."""
    target = manifest.get("target", "")
    return f"{target}/{manifest['variant']}" if target == "onnx" and manifest.get("variant") else target


def runs_as(target: str, profile: DeviceProfile) -> str:
    """The profile's target that runs an artifact of ``target`` (onnx/portable: TensorRT or onnxruntime)."""
    if target in profile.targets:
        return target
    return next((t for t in RUNS_AS.get(target, ()) if t in profile.targets), target)


def embedding_element_bytes(scheme: dict | None) -> float:
    """Stored bytes per element of a table quantized with ``scheme`` (a manifest tensor record's)."""
    kind = (scheme or {}).get("scheme")
    if kind == "int4":
        return 0.5 + 4 / (scheme.get("group_size") or 32)
    return {"int8": 1.0, "fp8": 1.0}.get(kind, 2.0)


def workload_from_manifest(manifest: dict, source: str = "manifest") -> Workload:
    """The Workload of an artifact: its weight files' bytes, its quantization, its KV dtype."""
    spec = ModelSpec.from_dict(manifest["model"])
    precision = (manifest.get("quantization") or {}).get("quant")
    if not precision:
        raise EstimateError(f"{source}: no quantization.quant in the manifest; re-export the artifact")
    weight_bytes = sum(int(entry["bytes"]) for name, entry in manifest["files"].items()
                       if not name.endswith(NON_WEIGHT_SUFFIXES))
    records = (manifest.get("quantization") or {}).get("tensors") or {}
    embed_record = records.get(spec.tensor_name("embed"), {})
    embedding = 0 if spec.tied_embeddings else int(output_params(spec) * embedding_element_bytes(
        embed_record.get("scheme")))
    kv = KV_ELEMENT_BYTES.get((manifest.get("graph") or {}).get("kv_dtype", "float16"), 2)
    return Workload(spec, weight_bytes, min(embedding, weight_bytes), precision, kv)


def estimate_result(work: Workload, profile: str, target: str, prompt_tokens: int = 128, new_tokens: int = 128,
                    max_context: int | None = None, long_context: int | None = None) -> dict:
    """A bench result (format edge-export-bench/1) from the roofline: ``measured`` false,
    ``estimated`` true. Decode is at the run's mean context (prompt + new / 2)."""
    roof = Roofline.for_device(profile, target, work.precision)
    ttft = roof.ttft_s(work, prompt_tokens, max_context)
    decode = roof.decode_tok_s(work, prompt_tokens + new_tokens // 2, max_context)
    kv_tokens = max_context or prompt_tokens + new_tokens
    result = {
        "format": RESULT_FORMAT, "measured": False, "estimated": True, "device": f"estimate:{roof.profile.name}",
        "device_title": roof.profile.title, "target": target, "quant": work.precision,
        "ttft_ms": round(ttft * 1000, 1), "prefill_tok_s": round(prompt_tokens / ttft, 1),
        "decode_tok_s": round(decode, 2), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
        "runs": 0, "warmup": 0, "peak_rss_mb": round((work.weight_bytes + work.kv_bytes(kv_tokens)) / 2**20, 1),
        "budget_mb": round(roof.profile.budget_bytes / 2**20, 1), "model_bytes": work.weight_bytes,
        "efficiency": round(roof.efficiency, 3), "method": roof.method(work),
    }
    result["method"]["peak_rss_mb"] = f"weights + KV buffer of {kv_tokens} tokens; no runtime overhead"
    if long_context:
        result.update(long_context_tokens=long_context,
                      long_context_decode_tok_s=round(roof.decode_tok_s(work, long_context, max_context), 2))
    return result


@register_device("estimate")
class EstimateDevice(Device):
    """``--device estimate:PROFILE``: the artifact's manifest through the roofline of a profile."""

    def bench(self, artifact: str, options: dict) -> dict:
        if not self.target:
            raise EstimateError("--device estimate:PROFILE needs a profile name (see `edge-export devices`)")
        from runtimes.artifact import read_manifest
        found = read_manifest(artifact)
        manifest = found.manifest
        work = workload_from_manifest(manifest, str(found.path))
        target = runs_as(artifact_target(manifest), get_profile(self.target))
        result = estimate_result(work, self.target, target,
                                 prompt_tokens=options.get("prompt_tokens") or 128,
                                 new_tokens=options.get("new_tokens") or 128,
                                 max_context=manifest.get("max_context"), long_context=options.get("long_context"))
        result.update(artifact=found.path.name, model_bytes=found.model_bytes)
        return result
