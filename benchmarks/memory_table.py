"""The README's memory tables: benchmarks/memory_1p5b.sh's measurements (memory_1p5b.jsonl) and
benchmarks/memory_7b.sh's (memory_<preset>.jsonl, one a full-size 7B/8B fixture: memory_r1-distill-qwen-7b
and memory_r1-distill-llama-8b).

    python3 benchmarks/memory_table.py      # writes benchmarks/results/memory_*.md

Peak RSS is /usr/bin/time -v's maximum resident set size: KiB / 1024 (MiB) in the 1.5B table,
KiB / 1024**2 (GiB) in the 7B ones.
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# measurement label -> the README's description of the job, in the table's order
JOBS = {
    "edge-export int4 rtn (quantize + lower, no verification)": "edge-export int4 RTN: quantize + lower (`--no-verify`)",
    "edge-export int4 awq (quantize + lower, no verification; 16 calibration prompts)":
        "edge-export int4 AWQ: quantize + lower (`--no-verify`, calibrating on 16 of the built-in prompts)",
    "edge-export int4 gptq (quantize + lower, no verification; 16 calibration prompts)":
        "edge-export int4 GPTQ: quantize + lower (`--no-verify`, 16 calibration prompts)",
    "edge-export int4 rtn (export with verification)": "edge-export int4 RTN: export with verification (reference run "
        "layer-major over 24 prompts × 32 tokens, then the artifact in onnxruntime)",
    "onnxruntime-genai builder int4 (cpu)": "onnxruntime-genai's model builder, int4, same checkpoint",
}


def wall(text: str) -> str:
    """/usr/bin/time's h:mm:ss or m:ss.ss as '13 s' / '8 min 25 s'."""
    parts = [float(p) for p in text.split(":")]
    seconds = round(sum(p * 60 ** i for i, p in enumerate(reversed(parts))))
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def markdown(rows: list[dict]) -> str:
    by_label = {r["label"]: r for r in rows}  # the last measurement of a job wins
    lines = ["| job | peak RSS MiB | wall |", "| --- | --- | --- |"]
    for label, job in JOBS.items():
        if label in by_label:
            lines.append(f"| {job} | {by_label[label]['peak_rss_mb']} | {wall(by_label[label]['wall'])} |")
    return "\n".join(lines) + "\n"


def big_markdown(rows: list[dict]) -> str:
    """A memory_7b.sh table: the last measurement of each job, in the order first measured."""
    by_label = {r["label"]: r for r in rows}
    lines = ["| job | peak RSS GiB | wall | verification | |", "| --- | --- | --- | --- | --- |"]
    for label, r in by_label.items():
        v = r.get("verification") or {}
        checked = (f"kl_mean {v['kl_mean']:.4f}, top-1 {v['top1_agreement']:.3f} ({v['prompts']} prompts x "
                   f"{v.get('new_tokens', 32)} tokens)" if v else "-")
        outcome = "ok" if r["exit"] == 0 else f"failed (exit {r['exit']}): {r['last_line']}"
        lines.append(f"| {label} | {r['peak_rss_gib']:.2f} | {wall(r['wall']) if r['wall'] else '-'} | {checked} | "
                     f"{outcome} |")
    return "\n".join(lines) + "\n"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    out = RESULTS / "memory_1p5b.md"
    out.write_text(markdown(_rows(RESULTS / "memory_1p5b.jsonl")))
    print(out)
    for path in sorted(RESULTS.glob("memory_*.jsonl")):
        if path.stem != "memory_1p5b":
            out = path.with_suffix(".md")
            out.write_text(big_markdown(_rows(path)))
            print(out)


if __name__ == "__main__":
    main()
