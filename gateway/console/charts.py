"""Charts as SVG text, drawn on the server (pure: series in, markup out).

The console's CSP forbids inline styles and scripts, so the markup carries classes only (colours are in
console.css) and presentation attributes. Every text is escaped; every chart has a <title> and an
aria-label so a screen reader says what it shows. `viewBox` lets CSS scale a chart to a phone's width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from html import escape

WIDTH, HEIGHT = 640, 220
_LEFT, _RIGHT, _TOP, _BOTTOM = 52, 12, 12, 28  # plot margins: y labels at the left, x labels below
MAX_POINTS = 2000  # a series longer than this is thinned: a chart has no use for more points than pixels


@dataclass(frozen=True, slots=True)
class Series:
    """One line: points (x, y) in x order; `css` names its colour class; `dashed` for forecasts."""

    name: str
    points: Sequence[tuple[float, float]]
    css: str = "s0"
    dashed: bool = False


@dataclass(frozen=True, slots=True)
class Axis:
    """The x range and its labelled ticks (x value, text)."""

    start: float
    end: float
    ticks: Sequence[tuple[float, str]] = field(default_factory=tuple)


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times 10^k at or above `value` (1 for nothing to show)."""
    if not math.isfinite(value) or value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        candidate = step * 10.0**exponent
        if candidate >= value * (1 - 1e-12):
            return candidate
    return 10.0 ** (exponent + 1)


def compact(value: float) -> str:
    """1234 → 1.2k, 5000000 → 5M, 0.5 → 0.5: labels that fit beside an axis."""
    magnitude = abs(value)
    for divisor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= divisor:
            text = f"{value / divisor:.1f}".rstrip("0").rstrip(".")
            return text + suffix
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _thin(points: Sequence[tuple[float, float]]) -> Sequence[tuple[float, float]]:
    if len(points) <= MAX_POINTS:
        return points
    step = math.ceil(len(points) / MAX_POINTS)
    return [*points[::step], points[-1]]


def line_chart(series: Sequence[Series], axis: Axis, *, title: str, limit: float | None = None,
               y_max: float | None = None, width: int = WIDTH, height: int = HEIGHT) -> str:
    """Lines of `series` over `axis`, a y axis from 0 to a round maximum, and a limit line when given."""
    finite = [y for s in series for _, y in s.points if math.isfinite(y)]
    top = nice_ceiling(max([*finite, limit or 0.0, y_max or 0.0, 0.0]))
    span = (axis.end - axis.start) or 1.0
    plot_w, plot_h = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM

    def sx(x: float) -> float:
        return _LEFT + (min(max(x, axis.start), axis.end) - axis.start) / span * plot_w

    def sy(y: float) -> float:
        return _TOP + plot_h - max(0.0, min(y, top)) / top * plot_h

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}" '
             f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>']
    for i in range(5):  # grid lines and y labels at 0, ¼, ½, ¾ and the top
        value = top * i / 4
        y = sy(value)
        parts.append(f'<line class="grid" x1="{_LEFT}" y1="{y:.1f}" x2="{width - _RIGHT}" y2="{y:.1f}"/>')
        parts.append(f'<text class="label" x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
                     f'{escape(compact(value))}</text>')
    for x, text in axis.ticks:
        if axis.start <= x <= axis.end:
            parts.append(f'<text class="label" x="{sx(x):.1f}" y="{height - 8}" text-anchor="middle">'
                         f'{escape(text)}</text>')
    if limit is not None:
        y = sy(limit)
        parts.append(f'<line class="limit" x1="{_LEFT}" y1="{y:.1f}" x2="{width - _RIGHT}" y2="{y:.1f}"/>')
        parts.append(f'<text class="label limit-label" x="{width - _RIGHT}" y="{y - 4:.1f}" text-anchor="end">'
                     f'limit {escape(compact(limit))}</text>')
    for s in series:
        points = [(x, y) for x, y in _thin(s.points) if math.isfinite(x) and math.isfinite(y)]
        if not points:
            continue
        if len(points) == 1:  # a line of one point draws nothing: a dot shows it
            (x, y), = points
            parts.append(f'<circle class="dot {escape(s.css)}" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3">'
                         f'<title>{escape(s.name)}</title></circle>')
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        dashed = " dashed" if s.dashed else ""
        parts.append(f'<polyline class="line {escape(s.css)}{dashed}" points="{path}"><title>{escape(s.name)}'
                     f'</title></polyline>')
    parts.append("</svg>")
    return "".join(parts)


def day_ticks(start: datetime, end: datetime) -> list[tuple[float, str]]:
    """Labelled ticks over a billing period: every day, or every 7th of a period longer than two weeks."""
    step = 7 if (end - start).days > 14 else 1
    ticks = []
    day = start
    while day <= end:
        ticks.append((day.timestamp(), day.strftime("%d %b")))
        day += timedelta(days=step)
    return ticks


def size(value: float) -> str:
    """Bytes as an operator reads them: 0 B, 512 KiB, 1 GiB."""
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= factor:
            return f"{value / factor:.1f}".rstrip("0").rstrip(".") + " " + unit
    return f"{value:.0f} B"


def usage_bar(used: float, limit: float | None, *, label: str, width: int = 200, height: int = 14) -> str:
    """A bar of `used` of `limit` (over the limit: full, marked over); unlimited draws an empty track."""
    if limit is None:
        share, state = 0.0, "unlimited"
        text = f"{label}: {compact(used)} used, unlimited"
    else:
        share = 1.0 if limit <= 0 else max(0.0, min(used / limit, 1.0))
        ratio = math.inf if limit <= 0 and used > 0 else (used / limit if limit > 0 else 0.0)
        state = "over" if ratio >= 1 else "warn" if ratio >= 0.8 else "ok"
        text = f"{label}: {compact(used)} of {compact(limit)} used"
    fill = round(share * width, 1)
    return (f'<svg class="bar bar-{state}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{escape(text)}" xmlns="http://www.w3.org/2000/svg"><title>{escape(text)}</title>'
            f'<rect class="track" x="0" y="0" width="{width}" height="{height}" rx="3"/>'
            f'<rect class="fill" x="0" y="0" width="{fill}" height="{height}" rx="3"/></svg>')
