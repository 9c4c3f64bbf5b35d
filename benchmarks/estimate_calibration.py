"""The estimator against every published point: what it fits, and how far off it is where it did not fit.

    python3 benchmarks/estimate_calibration.py   # writes benchmarks/results/estimate_calibration.{json,md}

For each engine class: the fitted efficiency (and that of any other software stack of the class, such as
llama.cpp on a Jetson GPU), the fixed cost per layer, and the ranges (leave-one-out
calibration residuals). For each point of devices/calibration.py: calibration / held out / excluded,
and the relative error of the estimate on each published figure. tests/test_devices.py checks that
the results file says what the code computes now.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devices.calibration import POINTS, PublishedPoint  # noqa: E402
from devices.estimate import point_errors  # noqa: E402
from devices.fit import class_fit, spread  # noqa: E402
from runtimes.capabilities import ENGINE_CLASSES  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "estimate_calibration"


def role(point: PublishedPoint) -> str:
    if point.excluded:
        return "excluded"
    if not point.used_for_calibration:
        return "held out"
    return "calibration" + ("" if "decode" in point.calibrates else " (prefill only)")


def summary() -> dict:
    classes = {}
    for engine in ENGINE_CLASSES:
        fit, decode, ttft = class_fit(engine), spread(engine, "decode"), spread(engine, "ttft")
        classes[engine] = {"efficiency": round(fit.efficiency, 3), "layer_us": round(fit.layer_s * 1e6, 1),
                           "decode_points": fit.points, "layer_from": fit.layer_from,
                           "stack_efficiency": {stack: round(e, 3) for stack, e in fit.stacks},
                           "decode_range_factor": round(decode.factor, 3), "decode_range_pooled": decode.pooled,
                           "ttft_range_factor": round(ttft.factor, 3), "ttft_range_pooled": ttft.pooled}
    points = [{"label": p.label, "role": role(p), "source": p.source, "decode_tok_s": p.decode_tok_s,
               **({"errors": {k: round(v, 3) for k, v in point_errors(p).items()}} if not p.excluded else
                  {"excluded": p.excluded}), **({"known_misses": list(p.known_misses)} if p.known_misses else {})}
              for p in POINTS]
    return {"classes": classes, "points": points}


def markdown(data: dict) -> str:
    lines = ["| engine class | efficiency | other stacks' efficiency | fixed per layer | decode points "
             "| decode widening | TTFT widening |", "|---|---|---|---|---|---|---|"]
    for engine, c in data["classes"].items():
        pooled = lambda flag: " (pooled)" if flag else ""  # noqa: E731
        stacks = ", ".join(f"{stack} {e:.2f}" for stack, e in c["stack_efficiency"].items()) or "-"
        lines.append(f"| {engine} | {c['efficiency']:.2f} | {stacks} | {c['layer_us']:.0f} us"
                     f"{' (borrowed)' if c['layer_from'] != 'fitted' else ''} | {c['decode_points']} | "
                     f"x/÷ {c['decode_range_factor']:.2f}{pooled(c['decode_range_pooled'])} | "
                     f"x/÷ {c['ttft_range_factor']:.2f}{pooled(c['ttft_range_pooled'])} |")
    lines += ["", "| point | role | decode error | TTFT error |", "|---|---|---|---|"]
    for p in data["points"]:
        errors = p.get("errors", {})
        missed = p.get("known_misses", ())
        cell = lambda key: (f"{errors[key]:+.0%}" + (" (known miss)" if key in missed else "")  # noqa: E731
                            if key in errors else "-")
        lines.append(f"| {p['label']} | {p['role']} | {cell('decode_tok_s')} | {cell('ttft_ms')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    data = summary()
    RESULTS.with_suffix(".json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    RESULTS.with_suffix(".md").write_text(markdown(data), encoding="utf-8")
    print(markdown(data))


if __name__ == "__main__":
    main()
