"""gateway/console/charts.py: series in, SVG text out (pure)."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

from gateway.console.charts import MAX_POINTS, Axis, Series, compact, line_chart, nice_ceiling, size, usage_bar

SVG = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)  # well-formed XML, or this raises


def test_nice_ceiling() -> None:
    assert [nice_ceiling(v) for v in (0, -5, math.nan, math.inf, 0.7, 1, 3, 4.2, 7, 10, 12, 26, 999)] == [
        1, 1, 1, 1, 1, 1, 5, 5, 10, 10, 20, 50, 1000]
    assert nice_ceiling(2.2) == 2.5


def test_compact_numbers() -> None:
    assert [compact(v) for v in (0, 5, 0.5, 1234, 1000, 2_500_000, 3e9, 12.345)] == [
        "0", "5", "0.5", "1.2k", "1k", "2.5M", "3G", "12.35"]


def test_line_chart_scales_points_into_the_plot_and_draws_the_limit() -> None:
    axis = Axis(0, 100, [(0, "start"), (50, "mid"), (100, "end"), (200, "outside")])
    svg = line_chart([Series("used", [(0, 0), (50, 40)]), Series("forecast", [(50, 40), (100, 80)], "s2", dashed=True)],
                     axis, title="api_calls", limit=100)
    root = parse(svg)
    assert root.get("role") == "img" and root.get("aria-label") == "api_calls"
    assert root.find(f"{SVG}title").text == "api_calls"
    lines = root.findall(f"{SVG}polyline")
    assert [line.get("class") for line in lines] == ["line s0", "line s2 dashed"]
    # x: 52 + x/100 * 576; y: the top is 100 (the limit), 12 + 180 - y/100 * 180
    assert lines[0].get("points") == "52.0,192.0 340.0,120.0"
    assert lines[1].get("points") == "340.0,120.0 628.0,48.0"
    limit = [e for e in root.findall(f"{SVG}line") if e.get("class") == "limit"]
    assert len(limit) == 1 and limit[0].get("y1") == "12.0"
    labels = [t.text for t in root.findall(f"{SVG}text")]
    assert "mid" in labels and "outside" not in labels and "limit 100" in labels
    assert "style=" not in svg and "<script" not in svg


def test_values_beyond_the_axis_are_clamped_and_non_finite_points_dropped() -> None:
    svg = line_chart([Series("s", [(-10, -5), (5, math.nan), (20, 1e9)])], Axis(0, 10), title="t", y_max=10)
    points = parse(svg).find(f"{SVG}polyline").get("points")
    assert points is not None
    first, last = points.split()
    assert first == "52.0,192.0" and last.startswith("628.0,")


def test_text_is_escaped() -> None:
    svg = line_chart([Series('<b>"x"</b>', [(0, 1), (1, 2)], css='s0" onload="alert(1)')],
                     Axis(0, 1, [(0, "<i>")]), title="a<b & c")
    root = parse(svg)
    assert root.get("aria-label") == "a<b & c"
    assert "<b>" not in svg and "<i>" not in svg and 'onload="' not in svg


def test_an_empty_chart_still_draws_its_axes() -> None:
    root = parse(line_chart([], Axis(0, 0), title="nothing"))
    assert root.findall(f"{SVG}polyline") == [] and len(root.findall(f"{SVG}line")) == 5


def test_long_series_are_thinned() -> None:
    points = [(float(i), float(i)) for i in range(10_000)]
    root = parse(line_chart([Series("many", points)], Axis(0, 9999), title="t"))
    drawn = root.find(f"{SVG}polyline").get("points").split()
    assert len(drawn) <= MAX_POINTS + 1 and drawn[-1] == "628.0,12.0"


def test_usage_bar_states() -> None:
    def state(svg: str) -> tuple[str, str, str]:
        root = parse(svg)
        fill = next(r for r in root.findall(f"{SVG}rect") if r.get("class") == "fill")
        return root.get("class"), fill.get("width"), root.get("aria-label")

    assert state(usage_bar(50, 100, label="api")) == ("bar bar-ok", "100.0", "api: 50 of 100 used")
    assert state(usage_bar(85, 100, label="api"))[0] == "bar bar-warn"
    assert state(usage_bar(150, 100, label="api"))[:2] == ("bar bar-over", "200.0")
    assert state(usage_bar(1, 0, label="api"))[:2] == ("bar bar-over", "200.0")
    assert state(usage_bar(0, 0, label="api"))[:2] == ("bar bar-ok", "200.0")
    assert state(usage_bar(3, None, label="x")) == ("bar bar-unlimited", "0.0", "x: 3 used, unlimited")


def test_a_lone_point_is_a_dot() -> None:
    root = parse(line_chart([Series("now", [(5, 5)], "s3")], Axis(0, 10), title="t", y_max=10))
    dot = root.find(f"{SVG}circle")
    assert dot is not None and dot.get("class") == "dot s3" and (dot.get("cx"), dot.get("cy")) == ("340.0", "102.0")


def test_sizes() -> None:
    assert [size(v) for v in (0, 512, 2048, 1536 * 1024, 2**30, 3 * 2**40)] == [
        "0 B", "512 B", "2 KiB", "1.5 MiB", "1 GiB", "3 TiB"]
