"""Wall time of each quantization method on R1-Distill-Qwen-1.5B-sized weights.

    python benchmarks/quantizers_speed.py [--shapes 1536x1536,8960x1536] [--tokens 4096]

Weights are Gaussian; activations are correlated with a few outlier channels. Prints one JSON
line per (shape, method) with seconds and the output SQNR in dB on 256 held-out rows.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

import quantizers as Q

METHODS = {
    "int4-rtn": Q.Int4Config(),
    "int4-rtn-clip": Q.Int4Config(clip_search=True),
    "int4-awq": Q.Int4Config(method="awq"),
    "int4-gptq": Q.Int4Config(method="gptq"),
    "int4-gptq-actorder": Q.Int4Config(method="gptq", act_order=True),
    "int8": Q.Int8Config(),
    "fp8": Q.Fp8Config(),
}


def run(n: int, k: int, tokens: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    # Activations like a real layer's input: correlated features (a rank-32 common part) and a
    # few outlier channels. Their values matter for the SQNR column, not for the seconds.
    x = rng.standard_normal((tokens + 256, k)).astype(np.float32)
    x += rng.standard_normal((tokens + 256, 32)).astype(np.float32) @ rng.standard_normal((32, k)).astype(np.float32)
    x[:, rng.choice(k, 8, replace=False)] *= 20.0
    t0 = time.perf_counter()
    stats = Q.Stats.from_activations(x[:tokens])
    stats_s = time.perf_counter() - t0
    probe = x[tokens:]  # held out: calibrated methods are not scored on their own calibration rows
    ref = probe @ w.T
    for label, config in METHODS.items():
        t0 = time.perf_counter()
        qt = Q.quantize(w, config, label, stats)
        seconds = time.perf_counter() - t0
        err = probe @ qt.effective_weight().T - ref
        sqnr = 10 * np.log10(np.square(ref).sum() / np.square(err).sum())
        print(json.dumps({"shape": [n, k], "method": label, "seconds": round(seconds, 2),
                          "output_sqnr_db": round(float(sqnr), 2), "stats_seconds": round(stats_s, 2)}),
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="1536x1536,8960x1536")
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        run(n, k, args.tokens)


if __name__ == "__main__":
    main()
