"""Does HQQ earn a place beside RTN, AWQ and GPTQ? Data-free int4 on SmolLM2, measured.

    python benchmarks/hqq_check.py --out benchmarks/results/hqq_check_smollm2.json

HQQ (Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning Models", 2023) fits
each group's zero point (asymmetric) or scale (symmetric) to the weights under an lp loss (p < 1):
with the codes fixed, the error W - (q - z) s splits into a sparse part E (the lp shrinkage
operator) and a part the grid absorbs; z (or s) is the closed-form fit to W - E; re-round q and
raise the penalty. The paper keeps float zero points; onnxruntime's MatMulNBits runs those ~40x
slower on CPU, so here z ends integer (0..15) and the scale is refitted by least squares around it.

This script registers that as method "hqq" for the run only and compares it with round-to-nearest
(symmetric/asymmetric, with and without clip search), every candidate's dequantized weights run
by the float reference decoder against the float reference (kl_mean, top1_agreement).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from quantizers import schemes
from quantizers.dispatch import register_handler
from quantizers.int4 import group_params, make_tensor, quantize_groups

P_NORM = 0.7      # the lp loss HQQ minimises on the weights
BETA = 10.0       # initial half-quadratic penalty, multiplied by KAPPA each iteration
KAPPA = 1.01
ITERATIONS = 20


def shrink_lp(x: np.ndarray, beta: float, p: float = P_NORM) -> np.ndarray:
    """The generalized soft-threshold: argmin_e |e|^p + beta/2 (e - x)^2, elementwise (approx.)."""
    ax = np.abs(x)
    return np.sign(x) * np.maximum(ax - np.power(np.maximum(ax, 1e-12), p - 1) / beta, 0.0)


def _refit_scale(wg: np.ndarray, target: np.ndarray, codes: np.ndarray, zero: np.ndarray,
                 scale: np.ndarray) -> np.ndarray:
    """Least-squares scale per group: argmin_s |target - (codes - zero) s|^2 (kept when degenerate)."""
    c = codes.astype(np.float32) - zero[..., None].astype(np.float32)
    den = np.square(c).sum(-1)
    num = (target * c).sum(-1)
    fitted = np.where(den > 0, num / np.where(den > 0, den, 1.0), scale)
    return np.where(fitted > 0, fitted, scale).astype(np.float32)


def hqq_groups(wg: np.ndarray, symmetric: bool, iterations: int = ITERATIONS) -> tuple[np.ndarray, np.ndarray]:
    """Scale float32 [...] and integer zero point uint8 [...] for groups ``wg`` [..., g]."""
    scale, zero_int = group_params(wg, symmetric)
    zero = zero_int.astype(np.float32)
    beta = BETA
    for _ in range(iterations):
        codes = np.clip(np.round(wg / scale[..., None] + zero[..., None]), 0, 15)
        error = shrink_lp(wg - (codes - zero[..., None]) * scale[..., None], beta)
        target = wg - error
        if symmetric:
            scale = _refit_scale(wg, target, codes, zero, scale)
        else:
            zero = np.clip((codes - target / scale[..., None]).mean(-1), 0.0, 15.0)
        beta *= KAPPA
    if not symmetric:  # carry an integer zero point; refit the scale around it (twice: codes move)
        zero = np.clip(np.round(zero), 0, 15)
        for _ in range(2):
            codes = np.clip(np.round(wg / scale[..., None] + zero[..., None]), 0, 15)
            scale = _refit_scale(wg, wg, codes, zero, scale)
    return scale, zero.astype(np.uint8)


def hqq(w: np.ndarray, group_size: int, symmetric: bool, name: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HQQ of W float32 [N, K] -> (codes uint8 [N, K], scales float32 [N, K/g], zeros uint8 [N, K/g])."""
    return quantize_groups(w, group_size, lambda wg: hqq_groups(wg, symmetric), name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/hqq_check_smollm2.json")
    args = ap.parse_args()
    schemes.INT4_METHODS = schemes.INT4_METHODS + ("hqq",)  # for this run only
    register_handler("int4", "hqq")(
        lambda w, config, name, stats=None: make_tensor(*hqq(w, config.group_size, config.symmetric, name), config))
    from edge_export.checkpoint import open_checkpoint
    from edge_export.evaluate import evaluate, reference_pass
    from edge_export.export import ExportOptions
    ref = reference_pass(open_checkpoint(args.model), ppl=False, questions=False)
    rows = []
    candidates = (("rtn symmetric", "rtn", True, False), ("rtn symmetric, clip search", "rtn", True, True),
                  ("rtn asymmetric", "rtn", False, False), ("rtn asymmetric, clip search", "rtn", False, True),
                  ("hqq symmetric", "hqq", True, False), ("hqq asymmetric", "hqq", False, False))
    for label, method, symmetric, clip in candidates:
        t = time.perf_counter()
        options = ExportOptions(quant="int4", method=method, group_size=args.group_size, symmetric=symmetric,
                                clip_search=clip)
        fig = evaluate(args.model, args.model, options, ppl=False, ref=ref)
        rows.append({"label": label, "kl_mean": round(fig["kl_mean"], 4),
                     "top1_agreement": round(fig["top1_agreement"], 3), "seconds": round(time.perf_counter() - t, 1)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    Path(args.out).write_text(json.dumps({"group_size": args.group_size, "rows": rows}, indent=2))
    print(f"| int4 g{args.group_size}, data-free | kl_mean | top1_agreement |\n| --- | --- | --- |")
    for r in rows:
        print(f"| {r['label']} | {r['kl_mean']} | {r['top1_agreement']} |")


if __name__ == "__main__":
    main()
