"""How much each quantization loses on the real SmolLM2-135M-Instruct (the Quantizers issue's table).

    python benchmarks/accuracy_table.py --out benchmarks/results/accuracy_smollm2.json

Every candidate is the checkpoint with a scheme applied, its dequantized weights run by the float
reference decoder (so the figures are the quantization's, not a runtime's), against the float
reference of the same GGUF. Figures: weight bytes under the rules, kl_mean, top1_agreement,
greedy_match_tokens, ppl on the held-out text, and same answers on 40 short chat questions.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edge_export.evaluate import evaluate
from edge_export.export import ExportOptions

CANDIDATES = [
    ("int4 g32 rtn", dict(quant="int4", method="rtn", group_size=32)),
    ("int4 g32 awq", dict(quant="int4", method="awq", group_size=32)),
    ("int4 g32 gptq", dict(quant="int4", method="gptq", group_size=32)),
    ("int4 g32 rtn asymmetric", dict(quant="int4", method="rtn", group_size=32, symmetric=False)),
    ("int4 g32 rtn asymmetric, clip search", dict(quant="int4", method="rtn", group_size=32, symmetric=False,
                                                   clip_search=True)),
    ("int4 g64 rtn", dict(quant="int4", method="rtn", group_size=64)),
    ("int4 g64 awq", dict(quant="int4", method="awq", group_size=64)),
    ("int4 g64 gptq", dict(quant="int4", method="gptq", group_size=64)),
    ("int4 keep (GGUF Q4_1 carried)", dict(quant="int4", method="keep")),
    ("int4 keep, ONNX artifact (int8 activations)", dict(artifact="/tmp/qs/smollm2-135m-int4")),
    # the fastest decode measured (README speed table): group 128 where it divides (else 64), GPTQ'd int4 head
    ("int4 g128 gptq, int4 head", dict(quant="int4", method="gptq", group_size=128, head="int4")),
    # artifacts made with `edge-export export smollm2-135m -o DIR ...` and the flags in the label
    ("int4 keep, ONNX artifact, --kv-cache int8", dict(artifact="/tmp/s3/art/keep-kv8")),
    ("int4 g128 gptq, int4 head, ONNX artifact, --kv-cache int8", dict(artifact="/tmp/s3/art/gptq-g128-h4g-kv8")),
    ("int8", dict(quant="int8", method="rtn")),
    ("fp8 e4m3", dict(quant="fp8", method="rtn")),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="benchmarks/results/accuracy_smollm2.json")
    ap.add_argument("--only", action="append", help="labels to run (default: all)")
    args = ap.parse_args()
    from edge_export.checkpoint import open_checkpoint
    from edge_export.evaluate import reference_pass
    ref = reference_pass(open_checkpoint(args.model), ppl=True, questions=True)
    rows = []
    for label, opts in CANDIDATES:
        if args.only and label not in args.only:
            continue
        t = time.perf_counter()
        candidate = opts.pop("artifact", args.model)
        fig = evaluate(candidate, args.model, ExportOptions(**opts), questions=True, ref=ref)
        fig.update(label=label, seconds=round(time.perf_counter() - t, 1))
        rows.append(fig)
        print(json.dumps({k: fig[k] for k in ("label", "kl_mean", "top1_agreement", "ppl", "seconds")}),
              file=sys.stderr, flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    lines = ["| scheme | weight MiB | kl_mean | top1_agreement | greedy_match_tokens | ppl (reference) | same answers / 40 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        same = r.get("same_answers", {})
        size = r["candidate"].get("weight_bytes") or r["candidate"].get("model_bytes", 0)
        lines.append(f"| {r['label']} | {size / 2**20:.1f} | {r['kl_mean']:.4f} | "
                     f"{r['top1_agreement']:.3f} | {r['greedy_match_tokens']:.1f} | {r['ppl']:.2f} ({r['ppl_reference']:.2f}) | "
                     f"{same.get('same', '')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
