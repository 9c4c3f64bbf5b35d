"""What stands in for TensorRT here: the portable and tensorrt graphs exported and verified on
onnxruntime's CPU, and what folding the weights' DequantizeLinear once is worth.

    python3 benchmarks/targets_check.py --out benchmarks/results/targets_smollm2.json

Each artifact below is exported from SmolLM2-135M-Instruct (the GGUF dequantized is the float
reference) with the export's own verification (built-in prompts x 32 reference tokens); the
table holds its manifest's kl_mean and top1_agreement and the export's wall time. Then the
portable int4 graph decodes on onnxruntime CPU (2 threads) with its DequantizeLinear -> MatMul
kept (the artifact's session config) and folded into float constants once
(`session.disable_quant_qdq`, as its verification runs): median ms per decode step.
Writes the JSON and, beside it, the README's table (.md).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_artifacts import first_prompts  # noqa: E402

ARTIFACTS = {
    "onnx/portable int4 RTN g32 (DQ -> MatMul)": dict(target="onnx", variant="portable", quant="int4", method="rtn"),
    "onnx/portable fp8, weights and activations (per-tensor scales, 16 calibration prompts)": dict(
        target="onnx", variant="portable", quant="fp8", fp8_activations=True,
        calibration=str(Path(__file__).resolve().parent / "calibration_small.jsonl")),
    "tensorrt int4 RTN g32, the fp16 graph an engine is built from (run by onnxruntime)": dict(
        target="tensorrt", quant="int4", method="rtn"),
}


def export_one(label: str, options: dict, root: Path, prompts: str | None) -> dict:
    from edge_export.export import ExportOptions, export
    folder = root / label.split(" ")[0].replace("/", "-") / options["quant"]
    t = time.perf_counter()
    manifest = export("smollm2-135m", folder, ExportOptions(overwrite=True, threads=2, prompts=prompts, **options))
    seconds = time.perf_counter() - t
    v = manifest["verification"]
    row = {"label": label, "folder": str(folder), "export_s": round(seconds, 1), "kl_mean": round(v["kl_mean"], 4),
           "top1_agreement": round(v["top1_agreement"], 3), "verified_with": v.get("verified_with", ""),
           "prompts": v.get("prompts"), "positions": v.get("positions")}
    calibration = (manifest.get("quantization") or {}).get("calibration") or {}
    if calibration:
        row["calibration"] = calibration
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def decode_ms(folder: str, session_config: dict, steps: int = 32) -> float:
    """Median ms of a decode step after a 64-token prompt, the portable graph on onnxruntime CPU."""
    from runtimes.artifact import load_artifact
    from runtimes.backends.onnxruntime import OnnxRuntimeBackend
    backend = OnnxRuntimeBackend(load_artifact(folder), threads=2, session_config=session_config)
    logits = backend.prefill(list(range(100, 164)))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        logits = backend.decode(int(np.argmax(logits)))
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def markdown(rows: list[dict]) -> str:
    lines = ["| artifact | kl_mean | top1_agreement | verified with | export s |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| `{r['label'].split(' ', 1)[0]}` {r['label'].split(' ', 1)[1]} | {r['kl_mean']:.3f} | "
                     f"{r['top1_agreement']:.3f} | {r['verified_with']} | {r['export_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", default="/tmp/edge-bench-targets")
    ap.add_argument("--out", default="benchmarks/results/targets_smollm2.json")
    ap.add_argument("--only", action="append", help="labels to export (default: all); results are merged")
    ap.add_argument("--prompts", type=int, default=0, help="verify on the first N built-in prompts (0: all)")
    args = ap.parse_args()
    prompts = first_prompts(args.prompts, args.artifacts)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {"model": "smollm2-135m", "rows": []}
    for label, options in ARTIFACTS.items():
        if args.only and label not in args.only:
            continue
        row = export_one(label, options, Path(args.artifacts), prompts)
        result["rows"] = [r for r in result["rows"] if r["label"] != label] + [row]
        result["rows"].sort(key=lambda r: list(ARTIFACTS).index(r["label"]))
        if options["target"] == "tensorrt":
            result["tensorrt_export_s"] = row["export_s"]
        if options.get("variant") == "portable" and options["quant"] == "int4":
            result["dq_folding"] = dq_folding(row["folder"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(result["rows"]))


def dq_folding(portable: str) -> dict:
    """ms per decode step of the portable int4 graph, its DequantizeLinear kept and folded."""
    from runtimes.artifact import load_artifact
    kept = load_artifact(portable).manifest["graph"].get("session_config", {})
    folding = {"kept_ms": round(decode_ms(portable, kept), 1),
               "folded_ms": round(decode_ms(portable, {**kept, "session.disable_quant_qdq": "1"}), 1)}
    folding["speedup"] = round(folding["kept_ms"] / folding["folded_ms"], 1)
    print(json.dumps(folding), file=sys.stderr, flush=True)
    return folding


if __name__ == "__main__":
    main()
