"""Core ML int4 on SmolLM2-135M-Instruct: block-wise (RTN, group 32) against palettized (16-entry
k-means tables per 16 output rows), measured off macOS.

    python3 benchmarks/coreml_palettize.py          # writes results/coreml_palettize_smollm2.{json,md}
    python3 benchmarks/coreml_palettize.py --table  # only rewrites the .md from the .json

Each export is `--target coreml --quant int4` with `--method rtn --group-size 32`, or `--method
palettize` with `--lut-rows 16` (the default) or 1, all re-quantizing the GGUF's dequantized Q4_1 weights (the embedding and lm_head stay
int8 per row, as by default), and is verified by the export itself against the float GGUF on the
first --verify-prompts built-in prompts x 32 tokens, thresholds off (the torch module Core ML's converter would
run, built from weight.bin). Figures: kl_mean, top1_agreement, greedy_match_tokens (the verification's),
weight.bin and whole-package MiB, the export's own seconds (quantize + build + save + read-back check,
before verification), the run's wall seconds.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
JSON = RESULTS / "coreml_palettize_smollm2.json"
MD = RESULTS / "coreml_palettize_smollm2.md"
METHODS = {"block-wise int4 (rtn, group 32)": {"method": "rtn", "group_size": 32},
           "palettized int4 (k-means, a table per 16 rows)": {"method": "palettize", "lut_rows": 16},
           "palettized int4 (k-means, a table per row)": {"method": "palettize", "lut_rows": 1}}
LUT = "constexpr_lut_to_dense"
BLOCKWISE = "constexpr_blockwise_shift_scale"


def measure(label: str, changes: dict, folder: Path, prompts: str | None, max_context: int) -> dict:
    from edge_export.export import ExportOptions, export
    t = time.perf_counter()
    # thresholds off: this measures each form, it does not gate it
    manifest = export("smollm2-135m", folder, ExportOptions(target="coreml", quant="int4", overwrite=True,
                                                            max_context=max_context, threads=2, prompts=prompts,
                                                            max_kl=100.0, min_top1=0.0, **changes))
    wall = time.perf_counter() - t
    files = manifest["files"]
    package = sum(f["bytes"] for name, f in files.items() if name.startswith("model.mlpackage/"))
    weight_bin = next(f["bytes"] for name, f in files.items() if name.endswith("weight.bin"))
    v = manifest["verification"]
    ops = manifest["graph"]["ops"]
    return {"label": label, "options": changes, "kl_mean": v["kl_mean"], "top1_agreement": v["top1_agreement"],
            "greedy_match_tokens": v["greedy_match_tokens"], "prompts": v["prompts"], "positions": v["positions"],
            "verified_with": v["verified_with"], "weight_bin_mib": round(weight_bin / 2**20, 1),
            "package_mib": round(package / 2**20, 1), "export_s": manifest["export_seconds"],
            "wall_s": round(wall, 1), "ops": {LUT: ops.get(LUT, 0), BLOCKWISE: ops.get(BLOCKWISE, 0)}}


def markdown(result: dict) -> str:
    lines = ["| int4 form | kl_mean | top1 | greedy match (tokens) | weight.bin MiB | package MiB | export s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        lines.append(f"| {row['label']} | {row['kl_mean']:.4f} | {row['top1_agreement']:.3f} | "
                     f"{row['greedy_match_tokens']:.1f} | {row['weight_bin_mib']:.1f} | {row['package_mib']:.1f} | "
                     f"{row['export_s']:.0f} |")
    first = result["rows"][0]
    lines.append("")
    lines.append(f"Verified against the float GGUF on {first['prompts']} built-in prompts x "
                 f"{first['positions'] // first['prompts']} tokens ({first['verified_with']}).")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/edge-bench-coreml-palettize")
    ap.add_argument("--verify-prompts", type=int, default=4)
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--table", action="store_true", help="rewrite the .md from the existing .json only")
    args = ap.parse_args()
    if not args.table:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from smollm2_artifacts import first_prompts
        work = Path(args.work)
        prompts = first_prompts(args.verify_prompts, work)
        result = {"model": "smollm2-135m", "target": "coreml", "max_context": args.max_context, "rows": []}
        for i, (label, changes) in enumerate(METHODS.items()):
            result["rows"].append(measure(label, changes, work / f"a{i}", prompts, args.max_context))
            print(json.dumps(result["rows"][-1]), file=sys.stderr, flush=True)
            shutil.rmtree(work / f"a{i}", ignore_errors=True)
            JSON.write_text(json.dumps(result, indent=2) + "\n")  # each row as it is measured
    MD.write_text(markdown(json.loads(JSON.read_text())))
    print(MD.read_text())


if __name__ == "__main__":
    main()
