"""What three of the onnxruntime backend's choices are worth, each timed both ways by the protocol.

    python3 benchmarks/runtime_options.py --out benchmarks/results/runtime_options_smollm2.json

- KV buffer sized to the generation (prompt + new tokens, rounded up to 64 positions) against
  one of the artifact's max_context (2048): decode tok/s at 128 + 128, float32 and int8 cache;
- prefill in 256-position chunks against the whole prompt in one call: TTFT and peak RSS at 1792
  prompt tokens, float32 and int8 cache;
- `--accuracy-level 0` (float activations in MatMulNBits) against the default 4: decode tok/s.

Artifacts: SmolLM2-135M int4 `keep` layouts (benchmarks/smollm2_artifacts.py). Each measurement is
`python -m devices.runner` in a process of its own (peak RSS is its own) with the backend's
constant patched (--child); the two settings alternate over --rounds rounds and each figure is
the median over rounds of the runner's medians (and, since the machine is shared, the best round:
what the setting costs when nothing else runs); ratios pair the runs of the same round.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_artifacts import REPO, ensure  # noqa: E402

# comparison -> (artifact label, runner args, {setting: (PREFILL_CHUNK, KV_ROUND)})
SIZED, UNSIZED = (256, 64), (256, 2048)
CHUNKED, WHOLE = (256, 64), (1792, 64)  # WHOLE: one chunk of the whole 1792-token prompt, same buffer
COMPARISONS = {
    "kv_buffer_float32": ("keep", ["--prompt-tokens", "128", "--new-tokens", "128"],
                          {"sized": SIZED, "max_context": UNSIZED}),
    "kv_buffer_int8": ("keep-kv8", ["--prompt-tokens", "128", "--new-tokens", "128"],
                       {"sized": SIZED, "max_context": UNSIZED}),
    "prefill_float32": ("keep", ["--prompt-tokens", "1792", "--new-tokens", "16"], {"chunked": CHUNKED, "whole": WHOLE}),
    "prefill_int8": ("keep-kv8", ["--prompt-tokens", "1792", "--new-tokens", "16"], {"chunked": CHUNKED, "whole": WHOLE}),
}


def child(chunk: int, kv_round: int, runner_args: list[str]) -> None:
    """Run devices.runner in this process with the backend's constants set."""
    import runtimes.backends.onnxruntime as ortb
    ortb.PREFILL_CHUNK, ortb.KV_ROUND = chunk, kv_round
    sys.argv = ["devices.runner", *runner_args]
    runpy.run_module("devices.runner", run_name="__main__")


def run_runner(artifact: Path, args: list[str], setting: tuple[int, int]) -> dict:
    cmd = [sys.executable, __file__, "--child", str(setting[0]), str(setting[1]), "--", str(artifact), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         timeout=3600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"{cmd}: {out.stderr[-800:]}")
    return json.loads(lines[-1])


def compare(artifact: Path, args: list[str], settings: dict, rounds: int, runs: int) -> dict:
    names = list(settings)
    samples = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % 2:] + names[:r % 2]:
            samples[name].append(run_runner(artifact, [*args, "--runs", str(runs), "--threads", "2"], settings[name]))
            s = samples[name][-1]
            print(f"{artifact.name} {name}: decode {s['decode_tok_s']} ttft {s['ttft_ms']} rss {s['peak_rss_mb']}",
                  file=sys.stderr, flush=True)
    out = {"artifact": artifact.name, "args": args, "rounds": rounds, "runs": runs,
           "settings": {n: {"prefill_chunk": c, "kv_round": k} for n, (c, k) in settings.items()}}
    for name in names:
        out[name] = {k: statistics.median(s[k] for s in samples[name]) for k in ("decode_tok_s", "ttft_ms", "peak_rss_mb")}
        # the machine is shared: the best round is what the setting costs when nothing else runs
        out[name]["best_decode_tok_s"] = max(s["decode_tok_s"] for s in samples[name])
        out[name]["best_ttft_ms"] = min(s["ttft_ms"] for s in samples[name])
    a, b = names
    out[f"decode_{b}_over_{a}"] = round(statistics.median(
        y["decode_tok_s"] / x["decode_tok_s"] for x, y in zip(samples[a], samples[b])), 3)
    out[f"decode_{b}_slower_by"] = round(1 - out[f"decode_{b}_over_{a}"], 3)
    out[f"ttft_{b}_over_{a}"] = round(statistics.median(
        y["ttft_ms"] / x["ttft_ms"] for x, y in zip(samples[a], samples[b])), 3)
    out["samples"] = samples
    return out


def accuracy_level(root: str, rounds: int) -> dict:
    """Decode tok/s of `keep` at accuracy level 0 and at the default 4 (32 new tokens: level 0 is slow)."""
    args = ["--prompt-tokens", "128", "--new-tokens", "32", "--runs", "2", "--threads", "2"]
    out = {"args": args, "rounds": rounds}
    for label in ("keep-acc0", "keep"):
        runs = [run_runner(ensure(label, root), args, SIZED) for _ in range(rounds)]
        out[label] = {"decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
                      "best_decode_tok_s": max(r["decode_tok_s"] for r in runs),
                      "samples": [r["decode_tok_s"] for r in runs]}
        print(f"{label}: {out[label]}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), int(sys.argv[3]), sys.argv[5:])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", default="/tmp/edge-bench-artifacts")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", action="append", help="comparisons to run (default: all, and accuracy_level_0)")
    ap.add_argument("--out", default="benchmarks/results/runtime_options_smollm2.json")
    args = ap.parse_args()
    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.is_file() else {}
    for name, (label, runner_args, settings) in COMPARISONS.items():
        if args.only and name not in args.only:
            continue
        result[name] = compare(ensure(label, args.artifacts), runner_args, settings, args.rounds, args.runs)
        out_path.write_text(json.dumps(result, indent=2) + "\n")
    if not args.only or "accuracy_level_0" in args.only:
        result["accuracy_level_0"] = accuracy_level(args.artifacts, 2)
        out_path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
