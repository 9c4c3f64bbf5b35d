"""Grouped bar charts as inline SVG, written by hand (no plotting library, nothing fetched).

Estimated bars are drawn lighter and hatched, with "(estimate)" in their tooltip and a legend
entry; an estimate's calibration range is drawn over its bar as a dashed error bar; a group may
carry a dashed marker line (a memory budget).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

COLORS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f")
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 720, 300, 64, 16, 36, 78


@dataclass
class Bar:
    value: float
    estimated: bool
    low: float | None = None  # the estimate's range, drawn as an error bar
    high: float | None = None


@dataclass
class BarChart:
    """Bars keyed by (group, series); ``markers``: group -> a value drawn as a dashed line."""

    title: str
    unit: str
    groups: list[str]
    series: list[str]
    bars: dict[tuple[str, str], Bar]
    markers: dict[str, float] = field(default_factory=dict)
    marker_label: str = ""


def _nice_top(value: float) -> float:
    """The smallest 1 / 2 / 2.5 / 5 / 10 x 10^k at or above ``value`` (the axis' top)."""
    if value <= 0:
        return 1.0
    magnitude = 10 ** math.floor(math.log10(value))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= value)


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}" if v >= 10 else f"{v:,.2f}"


def _defs() -> str:
    return ('<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
            'patternTransform="rotate(45)"><line x1="0" y1="0" x2="0" y2="6" stroke="#333" stroke-width="1.5" '
            'stroke-opacity="0.55"/></pattern></defs>')


def _axis(top: float, plot_h: float) -> list[str]:
    parts = []
    for i in range(5):
        v = top * i / 4
        y = TOP + plot_h - plot_h * i / 4
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{v:,.4g}</text>')
    return parts


def _bar(x: float, w: float, y: float, h: float, color: str, bar: Bar, tip: str) -> list[str]:
    tip = escape(tip + (" (estimate)" if bar.estimated else " (measured)"))
    if not bar.estimated:
        return [f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" fill="{color}">'
                f'<title>{tip}</title></rect>']
    return [f'<g class="estimate"><title>{tip}</title>'
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" fill="{color}" fill-opacity="0.45" '
            f'stroke="{color}" stroke-dasharray="3 2"/>'
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" fill="url(#hatch)"/></g>']


def _error_bar(x: float, w: float, bar: Bar, plot_h: float, top: float, unit: str) -> list[str]:
    """The range of an estimate: a dashed vertical line with caps from ``low`` to ``high``."""
    if bar.low is None or bar.high is None:
        return []
    y_low, y_high = (TOP + plot_h - plot_h * v / top for v in (bar.low, bar.high))
    mid, cap = x + w / 2, min(6.0, w / 3)
    tip = escape(f"estimate range {_fmt(bar.low)}-{_fmt(bar.high)} {unit} (calibration residuals)")
    return [f'<g class="range"><title>{tip}</title>'
            f'<line x1="{mid:.1f}" y1="{y_low:.1f}" x2="{mid:.1f}" y2="{y_high:.1f}" stroke="#333" '
            f'stroke-width="1.5" stroke-dasharray="3 2"/>'
            + "".join(f'<line x1="{mid - cap:.1f}" y1="{y:.1f}" x2="{mid + cap:.1f}" y2="{y:.1f}" stroke="#333" '
                      f'stroke-width="1.5"/>' for y in (y_low, y_high)) + "</g>"]


def _legend(chart: BarChart, y: float) -> list[str]:
    parts, x = [], LEFT
    for i, name in enumerate(chart.series):
        parts.append(f'<rect x="{x}" y="{y}" width="12" height="12" fill="{COLORS[i % len(COLORS)]}"/>'
                     f'<text x="{x + 16}" y="{y + 10}" font-size="11">{escape(name)}</text>')
        x += 28 + 7 * len(name)
    if any(b.estimated for b in chart.bars.values()):
        parts.append(f'<rect x="{x}" y="{y}" width="12" height="12" fill="#999" fill-opacity="0.45"/>'
                     f'<rect x="{x}" y="{y}" width="12" height="12" fill="url(#hatch)"/>'
                     f'<text x="{x + 16}" y="{y + 10}" font-size="11">estimate (hatched, lighter)</text>')
        x += 190
    if any(b.high is not None for b in chart.bars.values()):
        parts.append(f'<line x1="{x + 6}" y1="{y}" x2="{x + 6}" y2="{y + 12}" stroke="#333" stroke-dasharray="3 2"/>'
                     f'<text x="{x + 14}" y="{y + 10}" font-size="11">estimate range</text>')
        x += 100
    if chart.markers:
        parts.append(f'<line x1="{x}" y1="{y + 6}" x2="{x + 14}" y2="{y + 6}" stroke="#c00" stroke-dasharray="4 3" '
                     f'stroke-width="2"/><text x="{x + 18}" y="{y + 10}" font-size="11">'
                     f'{escape(chart.marker_label)}</text>')
    return parts


def render_svg(chart: BarChart) -> str:
    """The chart as one ``<svg>`` element (width 720 px)."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    top = _nice_top(max([max(b.value, b.high or 0) for b in chart.bars.values()] + list(chart.markers.values()) + [0]))
    group_w = plot_w / max(1, len(chart.groups))
    bar_w = min(36.0, group_w * 0.8 / max(1, len(chart.series)))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(chart.title)}" '
             'font-family="sans-serif">', _defs(),
             f'<text x="{LEFT}" y="20" font-size="14" font-weight="bold">{escape(chart.title)} '
             f'<tspan font-weight="normal" font-size="12">({escape(chart.unit)})</tspan></text>']
    parts += _axis(top, plot_h)
    for gi, group in enumerate(chart.groups):
        present = [s for s in chart.series if (group, s) in chart.bars]
        x0 = LEFT + gi * group_w + (group_w - bar_w * len(present)) / 2
        for si, name in enumerate(present):
            bar = chart.bars[(group, name)]
            h = plot_h * bar.value / top
            x, y = x0 + si * bar_w, TOP + plot_h - h
            parts += _bar(x + 1, bar_w - 2, y, h, COLORS[chart.series.index(name) % len(COLORS)], bar,
                          f"{group}, {name}: {_fmt(bar.value)} {chart.unit}")
            parts += _error_bar(x + 1, bar_w - 2, bar, plot_h, top, chart.unit)
            parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{y - 3:.1f}" text-anchor="middle" font-size="10">'
                         f'{_fmt(bar.value)}</text>')
        if group in chart.markers:
            y = TOP + plot_h - plot_h * chart.markers[group] / top
            parts.append(f'<line x1="{LEFT + gi * group_w + 4:.1f}" y1="{y:.1f}" x2="{LEFT + (gi + 1) * group_w - 4:.1f}" '
                         f'y2="{y:.1f}" stroke="#c00" stroke-dasharray="4 3" stroke-width="2">'
                         f'<title>{escape(group)}: {escape(chart.marker_label)} {_fmt(chart.markers[group])} '
                         f'{escape(chart.unit)}</title></line>')
        parts.append(f'<text x="{LEFT + (gi + 0.5) * group_w:.1f}" y="{TOP + plot_h + 16}" text-anchor="middle" '
                     f'font-size="11">{escape(group)}</text>')
    parts.append(f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - RIGHT}" y2="{TOP + plot_h}" stroke="#333"/>')
    parts += _legend(chart, HEIGHT - 30)
    parts.append("</svg>")
    return "".join(parts)
