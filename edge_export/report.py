"""`edge-export report`: bench results (measured and estimated) as one HTML page or Markdown table.

Inputs are the JSON that ``edge-export bench --json`` prints (one object, or a list of them). The
HTML page is self-contained (inline SVG, no script, nothing fetched): a table, decode tok/s and
TTFT by device and quantization, and memory against the device's budget. Estimated figures are
marked everywhere: an "estimate" cell, hatched and lighter bars with their calibration range as a
dashed error bar, a legend entry.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from html import escape
from pathlib import Path

from devices.profiles import BOARD_SHARE, PROFILES
from devices.protocol import RESULT_FORMAT

from .errors import EdgeError
from .report_svg import Bar, BarChart, render_svg

REQUIRED = ("decode_tok_s", "ttft_ms")
COLUMNS = (("device", "device"), ("model", "model"), ("quant", "quant"), ("target", "target"),
           ("decode tok/s", "decode_tok_s"), ("TTFT ms", "ttft_ms"), ("prefill tok/s", "prefill_tok_s"),
           ("memory MB", "memory_mb"), ("budget MB", "budget_mb"), ("source", "source"))


class ReportError(EdgeError):
    """A report input is missing, not JSON, or not a bench result; or the output format is unknown."""


def load_results(paths: list[str | Path], failures: list[dict] | None = None) -> list[dict]:
    """Read bench result files (an object or a list each) -> result dicts, checked. ReportError names the file.

    A device that failed in a several-device bench (``{"device", "error"}``) is no result: it goes
    to ``failures`` when a list is given (the report names it), and is skipped otherwise."""
    if not paths:
        raise ReportError("no RESULT.json given; pass the output of `edge-export bench --json`")
    results = []
    for path in map(Path, paths):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ReportError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ReportError(f"{path}: not a JSON bench result ({e}); pass the output of `edge-export bench --json`") \
                from None
        for item in data if isinstance(data, list) else [data]:
            if isinstance(item, dict) and "error" in item and "format" not in item:
                if failures is not None:
                    failures.append({"device": str(item.get("device", "?")), "error": str(item["error"])})
                continue
            results.append(_check(item, path))
    if not results:
        raise ReportError(f"{', '.join(map(str, paths))}: no successful bench result to report (every device failed)")
    return results


def _check(item, path: Path) -> dict:
    if not isinstance(item, dict) or item.get("format") != RESULT_FORMAT:
        found = item.get("format") if isinstance(item, dict) else type(item).__name__
        raise ReportError(f"{path}: not a bench result (format {found!r}, expected '{RESULT_FORMAT}' "
                          "from `edge-export bench --json`)")
    missing = [k for k in REQUIRED if not isinstance(item.get(k), (int, float))]
    if missing:
        raise ReportError(f"{path}: bench result without {', '.join(missing)}")
    return item


def is_estimate(result: dict) -> bool:
    return bool(result.get("estimated")) or result.get("measured") is False


def budget_mb(result: dict) -> float | None:
    """The device's memory budget in MB: the result's own, a profile's, or a share of the host's RAM."""
    if result.get("budget_mb"):
        return float(result["budget_mb"])
    device = str(result.get("device", "")).removeprefix("estimate:")
    if device in PROFILES:
        return PROFILES[device].budget_bytes / 2**20
    ram_gb = (result.get("device_info") or {}).get("ram_gb")
    return ram_gb * 1024 * BOARD_SHARE.value if ram_gb else None


def table_rows(results: list[dict]) -> list[dict]:
    """One display row per result (numbers as numbers, None where absent)."""
    rows = []
    for r in results:
        rows.append({"device": str(r.get("device", "?")).removeprefix("estimate:"),
                     "model": r.get("artifact") or r.get("model") or "-", "quant": r.get("quant") or "-",
                     "target": r.get("target") or r.get("backend") or "-", "decode_tok_s": r["decode_tok_s"],
                     "ttft_ms": r["ttft_ms"], "prefill_tok_s": r.get("prefill_tok_s"),
                     "memory_mb": r.get("peak_rss_mb"), "budget_mb": budget_mb(r),
                     "source": "estimate" if is_estimate(r) else "measured", "method": r.get("method"),
                     "decode_range": r.get("decode_tok_s_range"), "ttft_range": r.get("ttft_ms_range"),
                     "engine_warning": (r.get("engine_layers") or {}).get("warning")})
    return rows


def _series(row: dict, several_models: bool) -> str:
    return f"{row['model']} {row['quant']}" if several_models else str(row["quant"])


def charts(rows: list[dict]) -> list[BarChart]:
    """Decode rate, TTFT, and memory as a share of the device's budget (100% = the budget line),
    grouped by device, one series per quantization."""
    several = len({r["model"] for r in rows}) > 1
    groups = list(dict.fromkeys(r["device"] for r in rows))
    series = list(dict.fromkeys(_series(r, several) for r in rows))

    def bars(value, band=None):
        return {(r["device"], _series(r, several)): Bar(value(r), r["source"] == "estimate",
                                                        *_band(r.get(band) if band else None))
                for r in rows if value(r) is not None}

    share = lambda r: 100 * r["memory_mb"] / r["budget_mb"] if r["memory_mb"] and r["budget_mb"] else None  # noqa: E731
    budgeted = {r["device"]: 100.0 for r in rows if share(r) is not None}
    return [BarChart("Decode", "tokens/s", groups, series, bars(lambda r: float(r["decode_tok_s"]), "decode_range")),
            BarChart("Time to first token", "ms", groups, series, bars(lambda r: float(r["ttft_ms"]), "ttft_range")),
            BarChart("Memory against budget", "% of the device's memory budget", groups, series, bars(share),
                     budgeted, "budget (100%)")]


def _band(band) -> tuple[float | None, float | None]:
    """An estimate's [low, high] range as two floats, or (None, None) when absent or malformed."""
    if isinstance(band, (list, tuple)) and len(band) == 2 and all(isinstance(v, (int, float)) for v in band):
        return float(band[0]), float(band[1])
    return None, None


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return str(value)


RANGES = {"decode_tok_s": "decode_range", "ttft_ms": "ttft_range"}


def _figure(row: dict, key: str) -> str:
    """A table cell: the value, and an estimate's range after it."""
    low, high = _band(row.get(RANGES.get(key, "")))
    return _cell(row[key]) + (f" ({low:,.1f}-{high:,.1f})" if low is not None else "")


def render_markdown(rows: list[dict], failures: list[dict] = ()) -> str:
    """The table, then a note of which rows are estimates, then the devices that failed."""
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [_figure(row, key) for _, key in COLUMNS]
        if row["source"] == "estimate":
            cells[-1] = "*estimate*"
        lines.append("| " + " | ".join(cells) + " |")
    estimates = [i + 1 for i, r in enumerate(rows) if r["source"] == "estimate"]
    lines.append("")
    if estimates:
        lines.append(f"Rows {', '.join(map(str, estimates))} ({len(estimates)} of {len(rows)}) are *estimates*: "
                     "figures from the device's spec sheet through the estimator calibrated on published "
                     "measurements (devices/estimate.py), not measurements; the range in brackets is the spread "
                     "of its calibration residuals.")
    else:
        lines.append(f"All {len(rows)} rows are measured.")
    for f in failures:
        lines.append(f"\nFailed, no figures: {f['device']}: {f['error']}")
    for row in rows:
        if row.get("engine_warning"):
            lines.append(f"\n{row['device']} ({row['quant']}): {row['engine_warning']}")
    return "\n".join(lines) + "\n"


STYLE = """body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}td:nth-child(-n+4),th:nth-child(-n+4){text-align:left}
tr.estimate td{color:#555;background:#fafafa;font-style:italic}.tag{font-size:85%;padding:1px 5px;border-radius:3px}
.tag.estimate{background:#fff3cd;border:1px dashed #b58900}.tag.measured{background:#e6f4ea}
.methods{font-size:85%;color:#444}"""


def render_html(rows: list[dict], failures: list[dict] = (), title: str = "edge-export report") -> str:
    """One self-contained HTML page: table, three inline SVG charts, how estimates were made."""
    head = "".join(f"<th>{escape(name)}</th>" for name, _ in COLUMNS)
    body = []
    for row in rows:
        cells = [f"<td>{escape(_figure(row, key))}</td>" for _, key in COLUMNS[:-1]]
        cells.append(f'<td><span class="tag {row["source"]}">{row["source"]}</span></td>')
        body.append(f'<tr class="{row["source"]}">{"".join(cells)}</tr>')
    methods = [f"<li><b>{escape(r['device'])} {escape(str(r['quant']))}</b>: "
               + "; ".join(f"{escape(k)}: {escape(str(v))}" for k, v in r["method"].items()) + "</li>"
               for r in rows if r["source"] == "estimate" and isinstance(r.get("method"), dict)]
    n_est = sum(r["source"] == "estimate" for r in rows)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{escape(title)}</title>",
        f"<style>{STYLE}</style></head><body>", f"<h1>{escape(title)}</h1>",
        f"<p>{len(rows)} results, {n_est} of them <span class=\"tag estimate\">estimate</span> (calibrated "
        "estimates from spec sheets, hatched and lighter in the charts, their calibration range drawn as a dashed "
        f"error bar), the others measured. Generated {stamp}.</p>",
        f"<table><thead><tr>{head}</tr></thead><tbody>", *body, "</tbody></table>",
        *([f"<p>Failed, no figures: {'; '.join(escape(f['device'] + ': ' + f['error']) for f in failures)}</p>"]
          if failures else []),
        *(f"<p><b>{escape(r['device'])} ({escape(str(r['quant']))})</b>: {escape(r['engine_warning'])}</p>"
          for r in rows if r.get("engine_warning")),
        *(f"<figure>{render_svg(chart)}</figure>" for chart in charts(rows)),
        *([f"<details><summary>How the {len(methods)} estimates were made</summary>",
           f'<ul class="methods">{"".join(methods)}</ul></details>'] if methods else []),
        "</body></html>", ""])


def write_report(paths: list[str | Path], out: str | Path) -> Path:
    """Read bench results and write ``out`` (.html / .htm or .md). Returns the path written."""
    out = Path(out)
    renderers = {".html": render_html, ".htm": render_html, ".md": render_markdown}
    if out.suffix.lower() not in renderers:
        raise ReportError(f"-o {out}: unknown report format '{out.suffix}'; use .html or .md")
    failures: list[dict] = []
    rows = table_rows(load_results(paths, failures))
    out.write_text(renderers[out.suffix.lower()](rows, failures), encoding="utf-8")
    return out
