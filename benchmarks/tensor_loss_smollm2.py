"""What each target loses on llama.cpp's Q4_K_M of SmolLM2, tensor by tensor.

    python benchmarks/tensor_loss_smollm2.py [--targets coreml,tensorrt,onnx/qnn,onnx/ort]
        [--out benchmarks/results/tensor_loss_smollm2.json]

The Q4_K_M is made as benchmarks/gguf_kquants.py makes it (llama.cpp's own quantizer, from an F32
copy of the packaged Q4_1). Each target exports it with its default method (``keep``, int4,
``--no-verify``), and the manifest's per-tensor records are summed up here: how many tensors of
each GGUF type were carried bit for bit, and for the others the measure edge_export/tensor_loss.py
chose (the KL of that tensor alone over 4 built-in prompts x 16 greedy tokens, or each tensor's
relative output error when the KL would pass its flop budget) with its median and maximum.
Writes the .json and, beside it, a .md table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def export_target(gguf: Path, out: Path, name: str) -> tuple[dict, float]:
    from edge_export.export import ExportOptions, export
    target, _, variant = name.partition("/")
    t = time.perf_counter()
    manifest = export(str(gguf), str(out), ExportOptions(target=target, variant=variant or None, verify=False,
                                                          max_context=256, threads=2))
    return manifest, time.perf_counter() - t


def summary(manifest: dict, seconds: float) -> dict:
    """Per GGUF type: tensors, exact count, and the inexact ones' loss (median, max, worst tensor)."""
    quant = manifest["quantization"]
    how = quant.get("tensor_loss")
    by_type: dict[str, list] = defaultdict(list)
    for name, record in quant["tensors"].items():
        if "exact" in record:
            by_type[record["source_type"]].append((name, record))
    rows = {}
    for kind, items in sorted(by_type.items()):
        losses = sorted((r["loss"][how["measure"]], n) for n, r in items if not r["exact"])
        weight = [r["loss"]["relative_weight_error"] for _, r in items if not r["exact"]]
        rows[kind] = {"tensors": len(items), "exact": len(items) - len(losses)}
        if losses:
            rows[kind].update(median=statistics.median(v for v, _ in losses), max=losses[-1][0], worst=losses[-1][1],
                              relative_weight_error_median=statistics.median(weight))
    return {"export_s": round(seconds, 1), "measure": how and how["measure"], "why": how and how["why"],
            "prompts": how and how["prompts"], "positions": how and how["positions"], "types": rows}


def markdown(result: dict) -> str:
    lines = ["| target | GGUF type | tensors | carried bit for bit | loss of one tensor alone: median / max |",
             "| --- | --- | --- | --- | --- |"]
    for target, r in result["targets"].items():
        label = {"kl": "KL", "relative_output_error": "output error"}.get(r["measure"], "")
        for kind, row in r["types"].items():
            loss = f"{label} {row['median']:.1e} / {row['max']:.1e}" if "max" in row else "—"
            lines.append(f"| {target} | {kind} | {row['tensors']} | {row['exact']} | {loss} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="onnx/ort,coreml,tensorrt,onnx/qnn")
    ap.add_argument("--out", default="benchmarks/results/tensor_loss_smollm2.json")
    args = ap.parse_args()
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from gguf_kquants import make_q4km
    result = {"model": "smollm2-135m Q4_K_M (llama.cpp)", "targets": {}}
    with tempfile.TemporaryDirectory() as work:
        gguf = make_q4km(Path(work))
        for name in args.targets.split(","):
            manifest, seconds = export_target(gguf, Path(work) / name.replace("/", "-"), name)
            result["targets"][name] = summary(manifest, seconds)
            print(json.dumps({name: result["targets"][name]}), file=sys.stderr, flush=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(markdown(result))


if __name__ == "__main__":
    main()
