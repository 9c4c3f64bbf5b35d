"""The coreml export's verification off macOS, two ways, on SmolLM2-135M-Instruct:

    python3 benchmarks/coreml_interp_check.py --out benchmarks/results/coreml_interp_smollm2.json
    python3 benchmarks/coreml_interp_check.py --scorers-only   (only the scorers, added to --out)

Each run is a child process under ``/usr/bin/time -v`` (peak RSS, wall time): the whole
`--target coreml --quant int4` export (the GGUF's Q4_1 blocks carried) with its verification over
benchmarks/verify_prompts_4.jsonl x 32 tokens, verified by

- ``interpreter``: the saved ML Program interpreted in numpy (scorer coreml-program, the default);
  SmolLM2's float32 weights fit coreml_interp.HOLD_BYTES, so they are decompressed once and held;
- ``interpreter_streamed``: the same with nothing held (HOLD_BYTES 0): every weight read from
  weight.bin and decompressed a block of rows at a time on every pass, as a 7B runs;
- ``torch_module``: the previous scorer (coreml-module: the torch module built from weight.bin in
  float32), put in its place for this run only.

The figures of the three must agree (same program, same weights); the file records them.

The export's peak is the export's (quantizing, the reference decoder); the scorers alone are then
measured the same way on one artifact (``scorer_only``): each child loads only the candidate and
runs what verify.compare asks of it (teacher forcing on the reference's 4 x 32 tokens, then
greedy), so its peak RSS is the scorer's own.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "benchmarks" / "verify_prompts_4.jsonl"

CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from edge_export.export import ExportOptions, export
from edge_export.targets import coreml, coreml_interp, register_scorer
mode = {mode!r}
if mode == "torch_module":
    register_scorer("coreml-program", coreml.verify_scorer)
if mode == "interpreter_streamed":
    coreml_interp.HOLD_BYTES = 0
start = time.perf_counter()
manifest = export("smollm2-135m", {out!r}, ExportOptions(target="coreml", quant="int4", max_context=512,
                  prompts={prompts!r}, verify_tokens=32))
print("RESULT " + json.dumps({{"export_s": time.perf_counter() - start, "verification": manifest["verification"]}}))
"""


def _timed_child(code: str, what: str) -> tuple[dict, int, str]:
    """Run code in a child under /usr/bin/time -v: its RESULT line, peak RSS in KiB, and stderr."""
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return result, peak_kb, proc.stderr


def run(mode: str, folder: Path) -> dict:
    out = folder / mode
    code = CHILD.format(root=str(ROOT), mode=mode, out=str(out), prompts=str(PROMPTS))
    result, peak_kb, stderr = _timed_child(code, mode)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", stderr).group(1)
    seconds = sum(float(p) * 60 ** i for i, p in enumerate(reversed(wall.split(":"))))
    shutil.rmtree(out, ignore_errors=True)
    v = result["verification"]
    return {"peak_rss_gib": round(peak_kb / 2**20, 3), "wall_s": round(seconds, 1),
            "export_s": round(result["export_s"], 1),
            "verification": {k: v[k] for k in ("kl_mean", "top1_agreement", "greedy_match_tokens", "prompts",
                                               "positions", "verified_with")}}


SCORER = """
import json, sys, time
sys.path.insert(0, {root!r})
from runtimes.artifact import read_manifest
from edge_export.targets import coreml_interp
mode, data = {mode!r}, json.load(open({data!r}))
artifact = read_manifest({artifact!r})
start = time.perf_counter()
if mode == "torch_module":
    from edge_export.targets.coreml_torch import TorchModuleScorer, verification_module
    scorer = TorchModuleScorer(verification_module(artifact))
else:
    if mode == "interpreter_streamed":
        coreml_interp.HOLD_BYTES = 0
    scorer = coreml_interp.program_scorer(artifact, None)
lps = []
for first in range(0, len(data["prompts"]), getattr(scorer, "batch", 1)):
    part = slice(first, first + getattr(scorer, "batch", 1))
    lps += scorer.teacher_forced(data["prompts"][part], data["tokens"][part])
greedy = scorer.greedy(data["prompts"], 32)[0]
print("RESULT " + json.dumps({{"export_s": time.perf_counter() - start, "argmax": [lp.argmax(-1).tolist() for lp in lps],
                               "greedy": greedy}}))
"""


def scorer_only(mode: str, artifact: Path, data: Path) -> dict:
    code = SCORER.format(root=str(ROOT), mode=mode, data=str(data), artifact=str(artifact))
    result, peak_kb, _ = _timed_child(code, f"{mode} scorer")
    return {"peak_rss_gib": round(peak_kb / 2**20, 3), "scoring_s": round(result["export_s"], 1),
            "argmax": result["argmax"], "greedy": result["greedy"]}


def scorers(folder: Path) -> dict:
    """The three scorers alone on one unverified artifact and the reference's tokens."""
    from edge_export.checkpoint import open_checkpoint
    from edge_export.export import ExportOptions, export
    from edge_export.verify import LayerMajorScorer, encode_prompts, load_prompts
    artifact = folder / "artifact"
    export("smollm2-135m", artifact, ExportOptions(target="coreml", quant="int4", max_context=512, verify=False))
    ckpt = open_checkpoint("smollm2-135m")
    prompts = encode_prompts(ckpt.tokenizer, load_prompts(PROMPTS))
    tokens, _ = LayerMajorScorer(ckpt.spec, ckpt.tensor).greedy(prompts, 32)
    data = folder / "tokens.json"
    data.write_text(json.dumps({"prompts": prompts, "tokens": tokens}))
    out = {mode: scorer_only(mode, artifact, data) for mode in ("interpreter", "interpreter_streamed", "torch_module")}
    same = all(out[m]["argmax"] == out["torch_module"]["argmax"] and out[m]["greedy"] == out["torch_module"]["greedy"]
               for m in out)
    result = {m: {k: v for k, v in r.items() if k not in ("argmax", "greedy")} for m, r in out.items()}
    result["same_tokens"] = same
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "coreml_interp_smollm2.json"))
    ap.add_argument("--modes", default="interpreter,interpreter_streamed,torch_module")
    ap.add_argument("--scorers-only", action="store_true", help="add scorer_only to the existing --out")
    args = ap.parse_args()
    if args.scorers_only:
        result = json.loads(Path(args.out).read_text())
        with tempfile.TemporaryDirectory(prefix="coreml-interp-") as tmp:
            result["scorer_only"] = scorers(Path(tmp))
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result["scorer_only"], indent=1))
        return
    result = {"model": "smollm2-135m", "export": "--target coreml --quant int4 --max-context 512",
              "prompts": PROMPTS.name, "verify_tokens": 32,
              "host": "2 shared cores (other jobs running), each run a child under /usr/bin/time -v"}
    with tempfile.TemporaryDirectory(prefix="coreml-interp-") as tmp:
        for mode in args.modes.split(","):
            result[mode] = run(mode, Path(tmp))
            print(mode, result[mode], flush=True)
        result["scorer_only"] = scorers(Path(tmp))
    figures = [result[m]["verification"] for m in args.modes.split(",")]
    result["figures_agree"] = all(abs(f["kl_mean"] - figures[0]["kl_mean"]) < 1e-3
                                  and f["top1_agreement"] == figures[0]["top1_agreement"] for f in figures)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
