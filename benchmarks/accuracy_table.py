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
    # the keep layout with its Q8_0 head re-quantized to int4 (run with --kl-only, into its own file)
    ("int4 keep, int4 head", dict(quant="int4", method="keep", head="int4")),
    ("int8", dict(quant="int8", method="rtn")),
    ("fp8 e4m3", dict(quant="fp8", method="rtn")),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="benchmarks/results/accuracy_smollm2.json")
    ap.add_argument("--only", action="append", help="labels to run (default: all)")
    ap.add_argument("--kl-only", action="store_true", help="kl_mean, top1 and greedy match only (no ppl, no answers)")
    ap.add_argument("--render", action="store_true", help="measure nothing: rewrite the .md from the JSON")
    ap.add_argument("--prompts", type=int, default=0, help="the first N built-in prompts only (0: all 24)")
    args = ap.parse_args()
    if args.render:
        write_markdown(args.out, json.loads(Path(args.out).read_text()))
        return
    from edge_export.checkpoint import open_checkpoint
    from edge_export.evaluate import reference_pass
    full = not args.kl_only
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from smollm2_artifacts import first_prompts
    prompts = first_prompts(args.prompts, "/tmp/edge-bench-accuracy")
    ref = reference_pass(open_checkpoint(args.model), prompts, ppl=full, questions=full)
    rows = []
    for label, opts in CANDIDATES:
        if args.only and label not in args.only:
            continue
        t = time.perf_counter()
        candidate = opts.pop("artifact", args.model)
        fig = evaluate(candidate, args.model, ExportOptions(**opts), prompts, ppl=full, questions=full, ref=ref)
        fig.update(label=label, seconds=round(time.perf_counter() - t, 1))
        rows.append(fig)
        print(json.dumps({k: fig.get(k) for k in ("label", "kl_mean", "top1_agreement", "ppl", "seconds")}),
              file=sys.stderr, flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))
    if full:
        write_markdown(args.out, rows)


# results label -> the README's (CLI flags in code spans)
LABELS = {
    "int4 g32 rtn asymmetric": "int4 g32 rtn `--asymmetric`",
    "int4 g32 rtn asymmetric, clip search": "int4 g32 rtn `--asymmetric --clip-search`",
    "int4 keep, ONNX artifact, --kv-cache int8": "int4 keep, ONNX artifact, `--kv-cache int8`",
    "int4 g128 gptq, int4 head": "int4 g128 gptq, int4 head (the fastest decode)",
    "int4 g128 gptq, int4 head, ONNX artifact, --kv-cache int8": "int4 g128 gptq, int4 head, ONNX artifact, `--kv-cache int8`",
    "int8": "int8 (per channel)",
    "fp8 e4m3": "fp8 e4m3 (per tensor)",
}


def write_markdown(out: str, rows: list[dict]) -> None:
    """The README's table, beside the JSON (same name, .md)."""
    Path(out).with_suffix(".md").write_text(markdown(rows))


def markdown(rows: list[dict]) -> str:
    questions = rows[0]["same_answers"]["of"]
    lines = [f"| scheme | weight MiB | kl_mean | top1_agreement | greedy_match_tokens | ppl (reference "
             f"{rows[0]['ppl_reference']:.2f}) | same answers / {questions} |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        same = r.get("same_answers", {})
        size = r["candidate"].get("weight_bytes") or r["candidate"].get("model_bytes", 0)
        lines.append(f"| {LABELS.get(r['label'], r['label'])} | {size / 2**20:.1f} | {r['kl_mean'] + 0.0:.4f} | "
                     f"{r['top1_agreement']:.3f} | {r['greedy_match_tokens']:.1f} | {r['ppl']:.2f} | "
                     f"{same.get('same', '')} |")
    first = rows[0]
    lines += ["", f"KL and top-1 over {first['prompts']} built-in prompts × {first['positions'] // first['prompts']} "
              f"reference tokens; same answers: greedy answers to {questions} chat questions identical to the "
              "reference's."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
