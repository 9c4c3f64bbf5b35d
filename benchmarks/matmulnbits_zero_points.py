"""Why `--method keep` carries Q4_1's minimum as an integer zero point plus a residual, not as
MatMulNBits' float zero points: one decode-step GEMM of each form, timed on onnxruntime's CPU.

    python3 benchmarks/matmulnbits_zero_points.py --out benchmarks/results/matmulnbits_zero_points.json

One com.microsoft MatMulNBits node (4-bit, block 32, accuracy level 4 as the ort artifacts use)
of SmolLM2's gate/up shape (K=576 -> N=3072, one token), with the same codes and scales and zero
points either packed uint8 (integer) or float32: microseconds per call on --threads threads, the
10th percentile of --calls calls after a warm-up (the machine is shared: the low percentile is
what a call costs when nothing else runs), the median of that over alternating rounds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

BLOCK = 32


def model(k: int, n: int, float_zero_points: bool, accuracy_level: int) -> bytes:
    """One MatMulNBits node with random 4-bit codes, float32 scales and (uint8 | float32) zero points."""
    rng = np.random.default_rng(0)
    blocks = k // BLOCK
    codes = rng.integers(0, 256, size=(n, blocks, BLOCK // 2), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.02, size=(n * blocks,)).astype(np.float32)
    if float_zero_points:
        zeros = rng.uniform(0.0, 15.0, size=(n * blocks,)).astype(np.float32)
    else:
        zeros = rng.integers(0, 256, size=(n * ((blocks + 1) // 2),), dtype=np.uint8)
    inits = [numpy_helper.from_array(codes, "B"), numpy_helper.from_array(scales, "scales"),
             numpy_helper.from_array(zeros, "zero_points")]
    node = helper.make_node("MatMulNBits", ["x", "B", "scales", "zero_points"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=BLOCK, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, n])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return m.SerializeToString()


def time_us(blob: bytes, k: int, threads: int, calls: int) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, 1, k)).astype(np.float32)
    for _ in range(20):
        session.run(None, {"x": x})
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        session.run(None, {"x": x})
        times.append((time.perf_counter() - t) * 1e6)
    return float(np.percentile(times, 10))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=576)
    ap.add_argument("--n", type=int, default=3072)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median of each form's figures")
    ap.add_argument("--out", default="benchmarks/results/matmulnbits_zero_points.json")
    args = ap.parse_args()
    forms = {"integer_zero_points": False, "float_zero_points": True}
    blobs = {name: model(args.k, args.n, flag, 4) for name, flag in forms.items()}
    per_round = {name: [] for name in forms}
    for _ in range(args.rounds):
        for name in forms:
            per_round[name].append(round(time_us(blobs[name], args.k, args.threads, args.calls), 1))
    result = {"k": args.k, "n": args.n, "bits": 4, "block_size": BLOCK, "accuracy_level": 4, "threads": args.threads,
              "calls": args.calls, "statistic": "10th percentile of calls, median over rounds", "onnxruntime": ort.__version__, "per_round_us": per_round,
              **{f"{name}_us": statistics.median(v) for name, v in per_round.items()}}
    result["float_over_integer"] = round(result["float_zero_points_us"] / result["integer_zero_points_us"], 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
