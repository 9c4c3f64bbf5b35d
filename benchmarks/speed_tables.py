"""The README's speed tables and the figures its prose quotes, from bench_vs_peers.py's results.

    python3 benchmarks/speed_tables.py      # rewrites the .md files and speed_summary_smollm2.json

bench_vs_peers.py calls render() after each run; run this by hand to redo the tables and the
pooled summary from the results files as they are (nothing is measured here):

- decode_cpu_smollm2.md (128 prompt tokens) and decode_cpu_smollm2_long.md (1792): medians over
  rounds, ratios to onnxruntime-genai of the medians, and in brackets the range of the per-round
  ratios (entries of the same round ran back to back);
- speed_summary_smollm2.json: genai's median in each 128-token run, the two fastest layouts'
  per-round ratios pooled over all runs (decode_cpu_smollm2.json + decode_cpu_smollm2_more_rounds.json),
  the range of decode's share of read bandwidth, what the int8 cache changes at the long prompt,
  and a decode step's length for each entry.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
GENAI = "onnxruntime-genai int4"
# results-file entry -> the README's label
LABELS = {
    GENAI: "onnxruntime-genai int4 (its builder: RTN g32, int4 head)",
    "llama.cpp Q4_1": "llama.cpp Q4_1 (the GGUF)",
    "edge-export int4-keep": "edge-export int4 `--method keep` (the default for this GGUF: Q4_1 carried exactly)",
    "edge-export int4-keep-kv8": "edge-export int4 `keep --kv-cache int8`",
    "edge-export int4-rtn-g32": "edge-export int4 `--method rtn` (g32, int8 head)",
    "edge-export int4-gptq-g128-head-int4": "edge-export int4 `--method gptq --group-size 128 --head int4`",
    "edge-export int4-gptq-g128-head-int4-kv8": "edge-export int4 `gptq --group-size 128 --head int4 --kv-cache int8`",
}
LONG_LABELS = {
    GENAI: "onnxruntime-genai int4",
    "edge-export int4-keep": "edge-export int4 `keep`",
    "edge-export int4-keep-kv8": "edge-export int4 `keep --kv-cache int8`",
    "edge-export int4-gptq-g128-head-int4": "edge-export int4 `gptq g128, head int4`",
    "edge-export int4-gptq-g128-head-int4-kv8": "edge-export int4 `gptq g128, head int4, --kv-cache int8`",
}
# the same two layouts under the names the extra runs gave them
FASTEST = {"gptq-g128-head-int4": ("edge-export int4-gptq-g128-head-int4", "edge-export gptq-g128-h4g",
                                   "edge-export int4-gptq-g128-head4"),
           "gptq-g128-head-int4-kv8": ("edge-export int4-gptq-g128-head-int4-kv8", "edge-export gptq-g128-h4g-kv8",
                                       "edge-export int4-gptq-g128-head4-kv8")}


def round_ratios(samples: dict, name: str) -> list[float]:
    """decode tok/s of ``name`` over genai's, round by round."""
    return [a["decode_tok_s"] / b["decode_tok_s"] for a, b in zip(samples[name], samples[GENAI])]


def ratio_cell(result: dict, row: dict) -> str:
    if row["name"] == GENAI:
        return "1.00"
    ratios = round_ratios(result["samples"], row["name"])
    return f"{row['decode_vs_genai']:.2f} ({min(ratios):.2f}–{max(ratios):.2f})"


def markdown(result: dict) -> str:
    """The README's table of one bench_vs_peers result (its 'rows' and 'samples')."""
    long = result["prompt_tokens"] != 128
    labels = LONG_LABELS if long else LABELS
    if long:
        head = [f"| runtime | TTFT ms ({result['prompt_tokens']} tok) | decode tok/s | decode ÷ genai (rounds) | "
                "TTFT ÷ genai | peak RSS MB |", "| --- | --- | --- | --- | --- | --- |"]
    else:
        head = ["| runtime | TTFT ms | prefill tok/s | decode tok/s | decode ÷ genai (rounds) | TTFT ÷ genai | "
                "peak RSS MB | model MiB | share of read bandwidth |", "| --- |" + " --- |" * 8]
    lines = []
    for r in result["rows"]:
        label = labels.get(r["name"], r["name"])
        if long:
            lines.append(f"| {label} | {r['ttft_ms']:.0f} | {r['decode_tok_s']:.1f} | {ratio_cell(result, r)} | "
                         f"{r['ttft_vs_genai']:.2f} | {r['peak_rss_mb']:.0f} |")
        else:
            share = f"{r['bandwidth_share']:.2f}" if "bandwidth_share" in r else ""
            lines.append(f"| {label} | {r['ttft_ms']:.1f} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
                         f"{ratio_cell(result, r)} | {r['ttft_vs_genai']:.2f} | {r['peak_rss_mb']:.0f} | "
                         f"{r['model_mb']:.1f} | {share} |")
    return "\n".join(head + lines + ["", caption(result)]) + "\n"


def caption(result: dict) -> str:
    """The run's protocol, under its table."""
    first = result["samples"][GENAI][0]
    text = (f"{result['prompt_tokens']} prompt + {first['new_tokens']} new tokens, {first['threads']} threads; "
            f"{result['rounds']} rounds in rotated order × {result['runs']} runs, medians")
    if result["prompt_tokens"] == 128:
        text += (f"; read bandwidth (numpy sums over 512 MB on 2 threads, same run) "
                 f"{result['read_bandwidth_gbs']:.1f} GB/s")
    return text + "."


def render(path: str | Path) -> Path:
    """Write the .md table beside a bench_vs_peers results file; its path."""
    path = Path(path)
    md = path.with_suffix(".md")
    md.write_text(markdown(json.loads(path.read_text())))
    return md


def pooled(runs: list[dict]) -> dict:
    """Per layout: the per-round ratios to genai of every run, pooled."""
    out = {}
    for layout, names in FASTEST.items():
        ratios = [x for run in runs for n in names if n in run["samples"] for x in round_ratios(run["samples"], n)]
        out[layout] = {"rounds": len(ratios), "median": round(statistics.median(ratios), 2),
                       "min": round(min(ratios), 2), "max": round(max(ratios), 2)}
    return out


def int8_cache_effect(long: dict) -> dict:
    """At the long prompt: the int8 cache's decode tok/s and TTFT over the float cache's, per layout."""
    rows = {r["name"]: r for r in long["rows"]}
    out = {}
    for layout in ("int4-keep", "int4-gptq-g128-head-int4"):
        f, q = rows[f"edge-export {layout}"], rows[f"edge-export {layout}-kv8"]
        out[layout] = {"decode_speedup": round(q["decode_tok_s"] / f["decode_tok_s"], 3),
                       "ttft_ratio": round(q["ttft_ms"] / f["ttft_ms"], 2)}
    return out


def summary() -> dict:
    main = json.loads((RESULTS / "decode_cpu_smollm2.json").read_text())
    long = json.loads((RESULTS / "decode_cpu_smollm2_long.json").read_text())
    extra = json.loads((RESULTS / "decode_cpu_smollm2_more_rounds.json").read_text())["runs"]
    runs = [main, *extra]
    genai = [next(r["decode_tok_s"] for r in run["rows"] if r["name"] == GENAI) for run in runs]
    shares = [r["bandwidth_share"] for r in main["rows"] if "bandwidth_share" in r]
    extra_ratios = [{layout: next(r["decode_vs_genai"] for r in run["rows"] if r["name"] in names)
                     for layout, names in FASTEST.items()} for run in extra]
    return {
        "genai_decode_tok_s_per_run": {"values": genai, "min": min(genai), "max": max(genai)},
        "extra_runs": [{"rounds": run["rounds"], "genai_decode_tok_s": g, "decode_vs_genai": ratios}
                       for run, g, ratios in zip(extra, genai[1:], extra_ratios)],
        "pooled_decode_vs_genai": pooled(runs),
        "read_bandwidth_gbs": round(main["read_bandwidth_gbs"], 1),
        "bandwidth_share": {"min": min(shares), "max": max(shares), "median": statistics.median(shares)},
        "long_prompt_int8_cache": int8_cache_effect(long),
        "decode_step_ms": {r["name"]: round(1000.0 / r["decode_tok_s"], 2) for r in main["rows"]},
    }


def main() -> None:
    for name in ("decode_cpu_smollm2.json", "decode_cpu_smollm2_long.json"):
        print(render(RESULTS / name))
    out = RESULTS / "speed_summary_smollm2.json"
    out.write_text(json.dumps(summary(), indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
