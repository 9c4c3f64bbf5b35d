"""Calibration of the step-time model on published points (devices/calibration.py).

One decode step costs a fixed time per layer (kernel launches, synchronisation, per-layer
overheads: what dominates a sub-1B model) plus the bytes it reads at the engine's share of the
device's bandwidth:

    step_s = layers x layer_s + (streamed weight bytes + KV bytes) / (efficiency x bandwidth)

``layer_s`` and ``efficiency`` are fitted per engine class by least squares on relative error
(efficiency <= 1, layer_s >= 0). A class whose points do not separate the two (fewer than three,
or all with one layer count) borrows ``layer_s`` from the classes that fit one, and says so.
Points of another software stack in a class (``PublishedPoint.stack``: llama.cpp on a Jetson GPU)
get their own efficiency and share the class's ``layer_s``; estimates use the class's own stack.

The time to the first token adds one decode step's weight pass and fixed cost (a prefill reads
every weight and goes through every layer once) to the prompt's FLOPs at a compute rate fitted per
(engine class, compute precision) as FLOP per byte of the device's bandwidth, each point's rate net
of its own weight pass and fixed cost; where a class has no published prefill figure, the rate is
the share of a published peak that the points on devices with published peaks reach, pooled across
classes.

Ranges: each class carries the leave-one-out log residuals of its calibration points (each point
against a fit of the class's others); with fewer than three the residuals of every class are
pooled, and the method says which.
"""
from __future__ import annotations

import functools
import itertools
import math
import statistics
from dataclasses import dataclass

import numpy as np

from runtimes.capabilities import CPU, ENGINE_CLASSES, JETSON_CPU
from runtimes.errors import EdgeError
from runtimes.models import ModelSpec

from .calibration import MODELS, OWN_STACK, PublishedPoint, calibration_points
from .profiles import get_profile

MIN_POINTS = 3  # fewer than this in a class: its fixed cost is borrowed and its residuals pooled
# A class with no published prefill figure whose compute is another class's: the Jetson's Arm cores
# run the same CPU kernels as a phone's.
PREFILL_FROM = {JETSON_CPU: CPU}


class EstimateError(EdgeError):
    """An estimate cannot be made (no profile named, an artifact the estimator cannot read)."""


@dataclass(frozen=True)
class Workload:
    """A model as the estimator sees it. Bytes are stored bytes (scales included).

    ``embedding_bytes``: the token-embedding table, gathered one row per token and so not
    streamed (0 when tied: the table is then read whole as the output projection).
    ``compute``: the precision prefill computes in (runtimes.capabilities).
    """

    spec: ModelSpec
    weight_bytes: int
    embedding_bytes: int
    precision: str
    kv_bytes_per_element: int = 2
    compute: str = "fp16"

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


def workload_from_bits(spec: ModelSpec, precision: str, body_bits: float, head_bits: float,
                       compute: str = "fp16") -> Workload:
    """A Workload from bits per weight: ``head_bits`` for the output projection (and an untied
    embedding table), ``body_bits`` for everything else."""
    head = output_params(spec)
    tables = 1 if spec.tied_embeddings else 2
    body = spec.parameter_count - tables * head
    embedding = 0 if spec.tied_embeddings else int(head * head_bits / 8)
    return Workload(spec, int(body * body_bits / 8 + head * head_bits / 8) + embedding, embedding, precision,
                    compute=compute)


def prefill_flops(spec: ModelSpec, tokens: int) -> float:
    """FLOPs of a prefill of ``tokens``: 2 x compute parameters x tokens, plus causal attention
    (QK^T and AV: 2 x head_dim x T(T+1) per head and layer)."""
    attention = 2 * spec.num_layers * spec.num_heads * spec.head_dim * tokens * (tokens + 1)
    return 2.0 * compute_params(spec) * tokens + attention


def step_s(work: Workload, kv_tokens: int, layer_s: float, efficiency: float, bandwidth: float) -> float:
    """Seconds of one decode step with ``kv_tokens`` in the cache (bandwidth in bytes/s)."""
    read = work.streamed_bytes + work.kv_bytes(kv_tokens)
    return work.spec.num_layers * layer_s + read / (efficiency * bandwidth)


def ttft_s(work: Workload, prompt_tokens: int, rate: float, layer_s: float, weight_pass_s: float) -> float:
    """Seconds to the first token: one pass over the weights (``weight_pass_s``, bytes at the decode
    kernels' bandwidth), the fixed cost of one pass through the layers, and the prompt's FLOPs at the
    calibrated compute rate (``rate`` in FLOP/s). The terms add: a short prompt costs about a decode
    step plus its FLOPs, a long one is dominated by its FLOPs (a prefill engine does not hide the
    weight reads behind the compute at batch sizes this small, and a max() of the two priced a
    19-token TensorRT prefill at one decode step, 41% short)."""
    return weight_pass_s + work.spec.num_layers * layer_s + prefill_flops(work.spec, prompt_tokens) / rate


# ---- the fit ----------------------------------------------------------------------------------
def point_workload(point: PublishedPoint) -> Workload:
    return workload_from_bits(MODELS[point.model], point.precision, point.body_bits, point.head_bits, point.compute)


def point_bandwidth(point: PublishedPoint) -> float:
    """Bytes/s: the point's own measured bandwidth where it has one, else its profile's."""
    if point.bandwidth_gb_s:
        return point.bandwidth_gb_s * 1e9
    return get_profile(point.device).bandwidth_bytes_s


def _rows(points: list[PublishedPoint], stacks: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The least-squares system on relative step time: columns layer_s and one inverse
    efficiency per stack; a point whose bandwidth was measured moves its bytes to the target side."""
    rows, target = [], []
    for p in points:
        work = point_workload(p)
        t = 1 / p.decode_tok_s
        read = (work.streamed_bytes + work.kv_bytes(p.decode_context)) / point_bandwidth(p) / t
        # a measured bandwidth is already an achieved rate (efficiency 1, as for the host profile):
        # what the bytes do not explain there is fixed cost
        rows.append([work.spec.num_layers / t, *(0.0 if p.bandwidth_gb_s or p.stack != s else read for s in stacks)])
        target.append(1.0 - (read if p.bandwidth_gb_s else 0.0))
    return np.array(rows), np.array(target)


def _bounded_lstsq(a: np.ndarray, b: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """min |a x - b| with x >= lower, by trying every set of bounds held (the problem is convex and
    has at most a few unknowns: the best feasible solution of all the equality-bounded ones is the optimum)."""
    best, best_cost = None, math.inf
    n = a.shape[1]
    for held in itertools.product((False, True), repeat=n):
        x = np.where(held, lower, 0.0)
        free = [i for i in range(n) if not held[i]]
        if free:
            x[free] = np.linalg.lstsq(a[:, free], b - a @ x, rcond=None)[0]
        if np.all(x >= lower - 1e-15) and (cost := float(np.sum((a @ x - b) ** 2))) < best_cost - 1e-18:
            best, best_cost = x, cost
    return best


def _solve(points: list[PublishedPoint], layer_s: float | None) -> tuple[float, dict[str, float]]:
    """(layer_s, {stack: efficiency}) minimising relative decode error, with layer_s >= 0 and each
    efficiency <= 1; ``layer_s`` given: the efficiencies only. A stack with one point fits that point
    through its own efficiency and leaves layer_s to the others."""
    stacks = sorted({p.stack for p in points})
    a, b = _rows(points, stacks)
    if layer_s is None:
        x = _bounded_lstsq(a, b, np.array([0.0] + [1.0] * len(stacks)))
    else:
        x = np.concatenate([[layer_s], _bounded_lstsq(a[:, 1:], b - a[:, 0] * layer_s, np.ones(len(stacks)))])
    return float(x[0]), {s: 1 / float(inverse) for s, inverse in zip(stacks, x[1:])}


def _separable(points: list[PublishedPoint]) -> bool:
    return len(points) >= MIN_POINTS and len({MODELS[p.model].num_layers for p in points}) > 1


@dataclass(frozen=True)
class ClassFit:
    """What calibration gives one engine class. ``layer_s``: fixed seconds per layer and step;
    ``efficiency``: share of peak bandwidth the bytes move at; ``layer_from``: where ``layer_s``
    comes from ("fitted" or "borrowed: ...")."""

    engine: str
    efficiency: float
    layer_s: float
    points: int
    layer_from: str
    stacks: tuple[tuple[str, float], ...] = ()  # (stack, efficiency) of the class's other software stacks

    @property
    def efficiencies(self) -> dict[str, float]:
        """Stack -> efficiency, the class's own stack ("") included."""
        return {OWN_STACK: self.efficiency, **dict(self.stacks)}


def _points(engine: str) -> list[PublishedPoint]:
    points = calibration_points(engine, "decode")
    if not points:
        raise EstimateError(f"no calibration point for engine class '{engine}' in devices/calibration.py")
    return points


@functools.cache
def borrowed_layer_s() -> tuple[float, str]:
    """The median fixed cost per layer of the classes whose points fit one, and which they are."""
    fitted = {e: _solve(calibration_points(e, "decode"), None)[0] for e in ENGINE_CLASSES
              if _separable(calibration_points(e, "decode"))}
    return statistics.median(fitted.values()), ", ".join(fitted)


@functools.cache
def class_fit(engine: str) -> ClassFit:
    """The class's fit (see module doc)."""
    points = _points(engine)
    if _separable(points):
        layer_s, efficiencies = _solve(points, None)
        how = "fitted"
    else:
        layer_s, sources = borrowed_layer_s()
        _, efficiencies = _solve(points, layer_s)
        how = (f"borrowed: median of the classes that fit one ({sources}); {engine}'s points do not separate it "
               "from the efficiency")
    if OWN_STACK not in efficiencies:
        raise EstimateError(f"engine class '{engine}' has no calibration point of its own stack "
                            "in devices/calibration.py")
    others = tuple((s, e) for s, e in efficiencies.items() if s != OWN_STACK)
    return ClassFit(engine, efficiencies[OWN_STACK], layer_s, len(points), how, others)


def point_efficiency(point: PublishedPoint, efficiencies: dict[str, float]) -> float:
    """The efficiency of the point's stack (with no fitted point of its stack: the class's own), or
    1 for a point whose bandwidth was measured (an achieved rate)."""
    return 1.0 if point.bandwidth_gb_s else efficiencies.get(point.stack, efficiencies[OWN_STACK])


def decode_estimate_s(point: PublishedPoint) -> float:
    fit = class_fit(point.engine)
    return step_s(point_workload(point), point.decode_context, fit.layer_s,
                  point_efficiency(point, fit.efficiencies), point_bandwidth(point))


# ---- prefill ------------------------------------------------------------------------------------
def point_ttft_s(point: PublishedPoint) -> float | None:
    """The published time to first token in seconds (from a prefill rate if that is what is published)."""
    if point.ttft_ms and point.prompt_tokens:
        return point.ttft_ms / 1000
    if point.prefill_tok_s and point.prompt_tokens:
        return point.prompt_tokens / point.prefill_tok_s
    return None


def point_weight_pass_s(point: PublishedPoint) -> float:
    """Seconds of one pass over the point's weights (and the prompt's KV) at its stack's decode bandwidth."""
    fit = class_fit(point.engine)
    return step_s(point_workload(point), point.prompt_tokens, 0.0, point_efficiency(point, fit.efficiencies),
                  point_bandwidth(point))


def point_prefill_rate(point: PublishedPoint) -> float | None:
    """The compute rate (FLOP/s) a published prefill implies, net of one weight pass and the fixed
    per-layer cost (ttft_s solved for its rate)."""
    ttft = point_ttft_s(point)
    if ttft is None:
        return None
    work = point_workload(point)
    compute_s = ttft - work.spec.num_layers * class_fit(point.engine).layer_s - point_weight_pass_s(point)
    if compute_s <= 0:
        raise EstimateError(f"{point.label}: its published prefill ({ttft * 1000:.1f} ms) is shorter than one "
                            "weight pass plus the fixed cost; it cannot calibrate a compute rate "
                            "(devices/calibration.py)")
    return prefill_flops(work.spec, point.prompt_tokens) / compute_s


def _geomean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


@dataclass(frozen=True)
class PrefillFit:
    """How prefill is priced: ``per_byte`` FLOP per byte/s of bandwidth, or ``peak_share`` of a
    published peak, with the words that say which and from what."""

    per_byte: float | None
    peak_share: float | None
    points: int
    how: str


@functools.cache
def prefill_fit(engine: str, compute: str, without: PublishedPoint | None = None) -> PrefillFit:
    """Per (class, compute): FLOP per byte of bandwidth over the class's prefill points of that
    compute; else over the class's points of any compute; else a share of published peaks.
    ``without``: a point left out (for the ranges)."""
    own = [p for p in calibration_points(engine, "prefill") if p is not without]
    lender = PREFILL_FROM.get(engine)
    lent = [p for p in calibration_points(lender, "prefill") if p is not without] if lender and not own else []
    for points, what in (([p for p in own if p.compute == compute], f"{engine} {compute}"),
                         (own, f"{engine} (other compute precisions)"),
                         ([p for p in lent if p.compute == compute], f"{lender} {compute} (no published {engine} "
                                                                     "prefill; same kernels)")):
        ratios = [r / point_bandwidth(p) for p in points if (r := point_prefill_rate(p))]
        if ratios:
            return PrefillFit(_geomean(ratios), None, len(ratios), f"fitted on {len(ratios)} published {what} "
                                                                   "prefill point(s)")
    shares = [r / peak for p in calibration_points(figure="prefill") if p is not without
              and (r := point_prefill_rate(p)) and (peak := get_profile(p.device).peak_flops(p.compute))]
    if not shares:
        raise EstimateError(f"no published prefill point calibrates {engine} and none gives a share of a peak")
    return PrefillFit(None, _geomean(shares), len(shares),
                      f"no published {engine} prefill found: share of the published peak reached by the "
                      f"{len(shares)} point(s) on devices that publish one, pooled across classes")


def prefill_rate_s(fit: PrefillFit, bandwidth: float, peak: float | None) -> float | None:
    """FLOP/s from a prefill fit on a device of ``bandwidth`` bytes/s and a published ``peak``."""
    if fit.per_byte:
        return fit.per_byte * bandwidth
    return fit.peak_share * peak if peak else None


def point_estimate_ttft_s(point: PublishedPoint) -> float:
    """The estimator's TTFT for a point's prompt on its device and engine class."""
    rate = prefill_rate_s(prefill_fit(point.engine, point.compute), point_bandwidth(point),
                          get_profile(point.device).peak_flops(point.compute))
    return ttft_s(point_workload(point), point.prompt_tokens, rate, class_fit(point.engine).layer_s,
                  point_weight_pass_s(point))


# ---- residuals and ranges -------------------------------------------------------------------------
def _fit_without(points: list[PublishedPoint], left_out: PublishedPoint) -> tuple[float, dict[str, float]]:
    """(layer_s, {stack: efficiency}) of a class fitted without one of its points."""
    rest = [p for p in points if p is not left_out]
    return _solve(rest, None if _separable(rest) else borrowed_layer_s()[0])


@functools.cache
def decode_fits(engine: str) -> tuple[tuple[float, float], ...]:
    """(layer_s, efficiency) of the class's fit and of each of its leave-one-out fits."""
    fit, points = class_fit(engine), calibration_points(engine, "decode")
    loo = (_fit_without(points, p) for p in points if len(points) > 1)
    return ((fit.layer_s, fit.efficiency), *((layer_s, e[OWN_STACK]) for layer_s, e in loo))


@functools.cache
def prefill_fits(engine: str, compute: str) -> tuple[PrefillFit, ...]:
    """The (class, compute) prefill fit and each fit with one calibration point left out."""
    fits = [prefill_fit(engine, compute)]
    for p in calibration_points(figure="prefill"):
        try:
            fits.append(prefill_fit(engine, compute, p))
        except EstimateError:  # the point was the only one the fit had: nothing to leave it out of
            continue
    return tuple(dict.fromkeys(fits))


def decode_residuals(engine: str | None = None) -> list[float]:
    """log(published / estimate) of the decode rate over the calibration points (of one class)."""
    return [math.log(p.decode_tok_s * decode_estimate_s(p)) for p in calibration_points(engine, "decode")]


def prefill_residuals(engine: str | None = None) -> list[float]:
    """log(estimated / published TTFT) over the calibration points with a published prefill."""
    return [math.log(point_estimate_ttft_s(p) / t) for p in calibration_points(engine, "prefill")
            if (t := point_ttft_s(p)) is not None]


@dataclass(frozen=True)
class Spread:
    """A symmetric widening in log space: ``factor`` = exp(largest |calibration residual|)."""

    factor: float
    points: int
    pooled: bool

    def band(self, values: list[float], digits: int = 1) -> list[float]:
        """[low, high]: the span of ``values`` (the estimate under each leave-one-out fit), widened."""
        return [round(min(values) / self.factor, digits), round(max(values) * self.factor, digits)]

    def words(self, figure: str, engine: str) -> str:
        where = (f"pooled over all classes' {self.points} points ({engine} has fewer than {MIN_POINTS}; for decode, "
                 "leave-one-out residuals)" if self.pooled else f"over {self.points} {engine} points")
        return (f"{figure} range: the estimates of the class's leave-one-out fits for this model, widened by "
                f"x/÷ {self.factor:.2f}, the largest calibration residual {where}")


def loo_decode_residuals() -> list[float]:
    """log(published / estimate) of each decode calibration point against a fit of its class's
    other points (classes with at least two points)."""
    residuals = []
    for engine in ENGINE_CLASSES:
        points = calibration_points(engine, "decode")
        for p in points if len(points) > 1 else ():
            layer_s, efficiencies = _fit_without(points, p)
            t = step_s(point_workload(p), p.decode_context, layer_s, point_efficiency(p, efficiencies),
                       point_bandwidth(p))
            residuals.append(math.log(p.decode_tok_s * t))
    return residuals


@functools.cache
def spread(engine: str, figure: str) -> Spread:
    """The widening for ``figure`` (decode | ttft) of ``engine``: its own residuals; a class with
    fewer than MIN_POINTS has no leave-one-out fits to span its uncertainty, so its decode widens
    by the largest leave-one-out residual of all classes, and its TTFT by all classes' residuals."""
    residuals = {"decode": decode_residuals, "ttft": prefill_residuals}[figure]
    own = residuals(engine)
    pooled = len(own) < MIN_POINTS
    values = own if not pooled else loo_decode_residuals() if figure == "decode" else residuals()
    return Spread(math.exp(max(abs(r) for r in values)), len(values), pooled)
