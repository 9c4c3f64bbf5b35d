"""The estimator, and ``--device estimate:PROFILE``, which answers a benchmark from a spec sheet.

A decode step costs a fixed time per layer plus the bytes it reads (weights streamed per token
and the KV cache so far) at the engine's share of the device's bandwidth; prefill costs one such
weight pass and fixed cost plus its FLOPs at a compute rate for the precision the graph computes in. Both are calibrated per engine class
on published measurements (devices/fit.py, devices/calibration.py), and each figure carries a
range from the calibration residuals. The engine is the one that really runs the target on that
kind of device (runtimes.capabilities). Every result says how it was obtained, in ``method``.
"""
from __future__ import annotations

from dataclasses import dataclass

from runtimes.capabilities import KV_BYTES, RUNS_AS, capabilities_of, get_capabilities
from runtimes.models import ModelSpec

from .calibration import PublishedPoint
from .fit import (EstimateError, Workload, class_fit, decode_fits, output_params, point_estimate_ttft_s,  # noqa: F401
                  point_ttft_s, prefill_fit, prefill_fits, prefill_flops, prefill_rate_s, spread, step_s, ttft_s,
                  workload_from_bits)
from .profiles import DeviceProfile, get_profile
from .protocol import RESULT_FORMAT, bench_option
from .registry import Device, register_device

__all__ = ["EstimateError", "Roofline", "Workload", "estimate_result", "point_errors", "prefill_flops",
           "workload_from_bits"]


# ---- the estimator for one device and target ---------------------------------------------------
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
        """The engine class the target's declaration names for this profile's kind of device."""
        return get_capabilities(self.target).engines[self.profile.kind].engine

    @property
    def static_kv(self) -> bool:
        return get_capabilities(self.target).static_kv

    @property
    def efficiency(self) -> float:
        # a measured host bandwidth is already an achieved rate, not a spec-sheet peak
        return 1.0 if self.profile.measured else class_fit(self.engine).efficiency

    def kv_tokens(self, context: int, max_context: int | None) -> int:
        """Tokens of KV read per step: the whole buffer for static-shape targets."""
        return max_context if (max_context and self.static_kv) else context

    def seconds_per_token(self, work: Workload, context: int, max_context: int | None = None) -> float:
        return step_s(work, self.kv_tokens(context, max_context), class_fit(self.engine).layer_s, self.efficiency,
                      self.profile.bandwidth_bytes_s)

    def decode_tok_s(self, work: Workload, context: int, max_context: int | None = None) -> float:
        """Decode rate (tokens/s) with ``context`` tokens in the KV cache."""
        return 1.0 / self.seconds_per_token(work, context, max_context)

    def prefill_rate(self, compute: str) -> tuple[float, str]:
        """Sustained prefill compute (FLOP/s) for graphs computing in ``compute``, and how it was obtained."""
        fit, bandwidth = prefill_fit(self.engine, compute), self.profile.bandwidth_gb_s.value
        if fit.per_byte:
            return fit.per_byte * bandwidth * 1e9, (
                f"{compute} compute = {fit.per_byte:.1f} FLOP per byte of bandwidth x {bandwidth:g} GB/s ({fit.how})")
        peak = self.profile.peak_flops(compute)  # the graph's own precision: an fp32 graph is not priced at fp16's
        if not peak:
            raise EstimateError(f"no way to estimate prefill on {self.profile.name} ({self.engine}, {compute}): "
                                f"no calibrated rate and no published {compute} peak")
        return peak * fit.peak_share, (f"published peak {peak / 1e12:g} T/s x {fit.peak_share:.2f} ({fit.how})")

    def ttft_s(self, work: Workload, prompt_tokens: int, max_context: int | None = None) -> float:
        """Time to the first token (see devices.fit.ttft_s)."""
        rate, _ = self.prefill_rate(work.compute)
        weight_pass = self.seconds_per_token(work, prompt_tokens, max_context) - \
            work.spec.num_layers * class_fit(self.engine).layer_s
        return ttft_s(work, prompt_tokens, rate, class_fit(self.engine).layer_s, weight_pass)

    def trace_s(self, work: Workload, prompt_tokens: int, new_tokens: int, max_context: int | None = None) -> float:
        """Time to produce ``new_tokens`` after a prompt: TTFT + decode, the per-token time growing
        linearly with the KV cache (summed in closed form)."""
        base = self.seconds_per_token(work, 0, max_context)
        if self.static_kv and max_context:
            decode = new_tokens * base
        else:
            per_kv_token = self.seconds_per_token(work, 1) - self.seconds_per_token(work, 0)
            decode = new_tokens * base + per_kv_token * (new_tokens * prompt_tokens + new_tokens * (new_tokens - 1) / 2)
        return self.ttft_s(work, prompt_tokens, max_context) + decode

    def trace_tokens_within(self, work: Workload, prompt_tokens: int, seconds: float, limit: int,
                            max_context: int | None = None) -> int:
        """The longest trace (tokens, at most ``limit``) that finishes within ``seconds`` (bisection)."""
        if self.trace_s(work, prompt_tokens, 1, max_context) > seconds:
            return 0
        low, high = 1, limit
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if self.trace_s(work, prompt_tokens, mid, max_context) <= seconds else (low, mid - 1)
        return low

    def ranges(self, work: Workload, context: int, prompt_tokens: int, max_context: int | None = None) -> dict:
        """[low, high] of the decode rate at ``context`` and of the TTFT (ms): the estimates under each
        leave-one-out fit of the class, widened by its largest calibration residual (devices.fit)."""
        bandwidth, kv = self.profile.bandwidth_bytes_s, self.kv_tokens(context, max_context)
        peak = self.profile.peak_flops(work.compute)
        layer_s, efficiency = decode_fits(self.engine)[0]
        decode = [1 / step_s(work, kv, a, 1.0 if self.profile.measured else e, bandwidth)
                  for a, e in decode_fits(self.engine)]
        weight_pass = self.seconds_per_token(work, prompt_tokens, max_context) - work.spec.num_layers * layer_s
        rates = [r for f in prefill_fits(self.engine, work.compute) if (r := prefill_rate_s(f, bandwidth, peak))]
        ttft = [1000 * ttft_s(work, prompt_tokens, rate, a, weight_pass)
                for rate in rates for a, _ in decode_fits(self.engine)]
        return {"decode_tok_s": spread(self.engine, "decode").band(decode, 2),
                "ttft_ms": spread(self.engine, "ttft").band(ttft)}

    def method(self, work: Workload) -> dict:
        """How each figure was obtained, in words, with the numbers used."""
        fit, bandwidth = class_fit(self.engine), self.profile.bandwidth_gb_s
        if self.profile.measured:
            efficiency = f"efficiency 1.0: the bandwidth is a measured read rate ({bandwidth.source})"
        else:
            efficiency = f"efficiency {fit.efficiency:.2f}"
        kv = "the whole KV buffer (static-shape graph)" if self.static_kv else "the KV cache at the context"
        decode = (f"{work.spec.num_layers} layers x {fit.layer_s * 1e6:.0f} us fixed per layer ({fit.layer_from}) + "
                  f"({work.streamed_bytes / 1e9:.3f} GB weights read per token + {kv}, "
                  f"{work.spec.kv_bytes_per_token(work.kv_bytes_per_element)} B per token) / ({efficiency} x "
                  f"{bandwidth.value:g} GB/s, {bandwidth.source}); fitted on {fit.points} published {self.engine} "
                  "points (devices/calibration.py)")
        return {"engine": self.engine, "engine_why": self.profile.engine_why(self.target), "decode": decode,
                "prefill": self.prefill_rate(work.compute)[1],
                "decode_range": spread(self.engine, "decode").words("decode", self.engine),
                "ttft_range": spread(self.engine, "ttft").words("TTFT", self.engine),
                "calibration": "devices/calibration.py (devices/CALIBRATION.md)"}


# ---- published points through the same estimator ---------------------------------------------------
def point_errors(point: PublishedPoint) -> dict[str, float]:
    """Relative error (estimate / published - 1) of each published figure of a point."""
    from .fit import decode_estimate_s
    errors = {"decode_tok_s": 1 / decode_estimate_s(point) / point.decode_tok_s - 1}
    published = point_ttft_s(point)
    if published is not None:
        errors["ttft_ms"] = point_estimate_ttft_s(point) / published - 1
    return errors


# ---- --device estimate:PROFILE --------------------------------------------------------------------
NON_WEIGHT_SUFFIXES = (".json", ".txt", ".jinja", ".md")


def artifact_target(manifest: dict, source: str = "manifest") -> str:
    """A manifest's target and variant as their declaration names them (onnx/ort, onnx/portable,
    onnx/qnn, coreml, tensorrt); EstimateError when nothing declares it."""
    try:
        return capabilities_of(manifest.get("target", ""), manifest.get("variant")).name
    except KeyError as e:
        raise EstimateError(f"{source}: {e.args[0]}") from None


def runs_as(target: str, profile: DeviceProfile) -> str:
    """The declared target that runs an artifact of ``target`` on the profile's kind of device: its
    own where it declares an engine there, else the first of RUNS_AS that does (onnx/portable:
    TensorRT or onnxruntime)."""
    kind = profile.kind
    if kind in get_capabilities(target).engines:
        return target
    return next((t for t in RUNS_AS.get(target, ()) if kind in get_capabilities(t).engines), target)


def embedding_element_bytes(scheme: dict | None) -> float:
    """Stored bytes per element of a table quantized with ``scheme`` (a manifest tensor record's)."""
    kind = (scheme or {}).get("scheme")
    if kind == "int4":
        return 0.5 + 4 / (scheme.get("group_size") or 32)
    if kind == "int4_lut":  # the 32-byte tables are spread over rows_per_lut rows of the hidden size: ~0
        return 0.5
    return {"int8": 1.0, "fp8": 1.0}.get(kind, 2.0)


def workload_from_manifest(manifest: dict, target: str, source: str = "manifest") -> Workload:
    """The Workload of an artifact run as ``target``: its weight files' bytes, its quantization,
    its KV dtype and the precision its graph computes in."""
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
    capabilities = get_capabilities(target)
    kv_dtype = (manifest.get("graph") or {}).get("kv_dtype") or capabilities.kv_caches[0]
    return Workload(spec, weight_bytes, min(embedding, weight_bytes), precision, KV_BYTES.get(kv_dtype, 2),
                    capabilities.compute_precision(precision))


def estimate_result(work: Workload, profile: str, target: str, prompt_tokens: int = 128, new_tokens: int = 128,
                    max_context: int | None = None, long_context: int | None = None) -> dict:
    """A bench result (format edge-export-bench/1) from the estimator: ``measured`` false,
    ``estimated`` true, with ``decode_tok_s_range`` / ``ttft_ms_range``. Decode is at the run's
    mean context (prompt + new / 2)."""
    roof = Roofline.for_device(profile, target, work.precision)
    ttft = roof.ttft_s(work, prompt_tokens, max_context)
    decode = roof.decode_tok_s(work, prompt_tokens + new_tokens // 2, max_context)
    kv_tokens = max_context or prompt_tokens + new_tokens
    ranges = roof.ranges(work, prompt_tokens + new_tokens // 2, prompt_tokens, max_context)
    result = {
        "format": RESULT_FORMAT, "measured": False, "estimated": True, "device": f"estimate:{roof.profile.name}",
        "device_title": roof.profile.title, "target": target, "engine": roof.engine, "quant": work.precision,
        "ttft_ms": round(ttft * 1000, 1), "ttft_ms_range": ranges["ttft_ms"],
        "prefill_tok_s": round(prompt_tokens / ttft, 1),
        "decode_tok_s": round(decode, 2), "decode_tok_s_range": ranges["decode_tok_s"],
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
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
    """``--device estimate:PROFILE``: the artifact's manifest through the estimator of a profile,
    on the engine that runs the artifact's target there."""

    def bench(self, artifact: str, options: dict) -> dict:
        if not self.target:
            raise EstimateError("--device estimate:PROFILE needs a profile name (see `edge-export devices`)")
        from runtimes.artifact import read_manifest
        found = read_manifest(artifact)
        manifest = found.manifest
        target = runs_as(artifact_target(manifest, str(found.path)), get_profile(self.target))
        get_profile(self.target).engine(target)
        work = workload_from_manifest(manifest, target, str(found.path))
        result = estimate_result(work, self.target, target,
                                 prompt_tokens=bench_option(options, "prompt_tokens"),
                                 new_tokens=bench_option(options, "new_tokens"),
                                 max_context=manifest.get("max_context"), long_context=options.get("long_context"))
        result.update(artifact=found.path.name, model_bytes=found.model_bytes)
        return result
