"""The report's SVG line plots: ticks, scales, gaps, bands, legend, hover titles."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET

import pytest

from vlmtune.report.svg import (
    Band,
    Series,
    fmt,
    line_plot,
    linear_ticks,
    log_ticks,
    thin,
    wants_log_scale,
)

SVG = "{http://www.w3.org/2000/svg}"


def points_of(path_d: str) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in re.findall(r"[ML](-?[\d.]+),(-?[\d.]+)", path_d)]


def parsed(svg: str) -> ET.Element:
    return ET.fromstring(svg)  # well-formed XML, or this raises


def test_linear_ticks_are_round_and_cover_the_range():
    assert linear_ticks(0.13, 0.87) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert linear_ticks(1, 540, 6, integer=True) == [0, 100, 200, 300, 400, 500, 600]
    ticks = linear_ticks(0.5, 0.5)  # one value: a window around it, never a zero span
    assert ticks[0] < 0.5 < ticks[-1]
    assert linear_ticks(1, 3, 6, integer=True) == [1, 2, 3]  # no half steps


def test_log_ticks_are_powers_of_ten_with_steps_between_when_few():
    assert log_ticks(0.002, 14) == [0.001, 0.01, 0.1, 1, 10, 100]
    assert log_ticks(0.3, 4) == [0.1, 0.2, 0.5, 1, 2, 5, 10]


def test_a_loss_over_decades_gets_a_log_scale_and_a_share_does_not():
    assert wants_log_scale([14.0, 1.0, 0.002])
    assert not wants_log_scale([0.9, 0.5, 0.2])
    assert not wants_log_scale([1.0, 0.0, 0.001])  # a zero cannot go on a log axis


def test_numbers_read_without_float_noise():
    assert fmt(0.30000000000000004) == "0.3"
    assert fmt(1e-05) == "1e-5"
    assert fmt(2500) == "2,500"
    assert fmt(0) == "0"


def test_a_plot_has_its_lines_axes_legend_and_hover_titles():
    steps = list(range(1, 11))
    svg = line_plot(
        [Series("loss", steps, [1 / s for s in steps]), Series("eval", [5, 10], [0.4, 0.2])],
        y_label="nats",
    )
    root = parsed(svg)
    paths = root.findall(f"{SVG}path")
    assert [p.get("data-label") for p in paths] == ["loss", "eval"]
    for p in paths:
        pts = points_of(p.get("d", ""))
        assert len(pts) >= 2 and all(math.isfinite(v) for xy in pts for v in xy)
        assert all(0 <= x <= 640 and 0 <= y <= 250 for x, y in pts)  # inside the viewBox
    legend = [t.text for t in root.findall(f"{SVG}text") if t.get("class") == "legend"]
    assert legend == ["loss", "eval"]
    titles = [t.text for t in root.iter(f"{SVG}title")]
    assert "loss at step 1: 1" in titles and "eval at step 10: 0.2" in titles
    # the x axis ends at the last step, not at a rounder number past it
    first, *_, last = points_of(paths[0].get("d", ""))
    assert last[0] == pytest.approx(640 - 14)  # the plot's right edge


def test_a_null_value_is_a_gap_not_a_zero():
    svg = line_plot([Series("loss", [1, 2, 3, 4, 5], [1.0, 0.9, None, 0.7, 0.6])])
    paths = parsed(svg).findall(f"{SVG}path")
    assert [len(points_of(p.get("d", ""))) for p in paths] == [2, 2]


def test_higher_values_are_drawn_higher_and_log_scale_is_labelled():
    svg = line_plot([Series("loss", [1, 2, 3], [10.0, 1.0, 0.01])])
    (path,) = parsed(svg).findall(f"{SVG}path")
    ys = [y for _, y in points_of(path.get("d", ""))]
    assert ys[0] < ys[1] < ys[2]  # SVG y grows downwards
    # log scale: 10 -> 1 is as far as 1 -> 0.1, so 1 -> 0.01 is twice that
    assert ys[2] - ys[1] == pytest.approx(2 * (ys[1] - ys[0]), rel=0.02)
    assert "(log scale)" in svg


def test_bands_shade_a_spread_and_percent_ticks():
    xs = [1, 2, 3]
    svg = line_plot(
        [Series("mean", xs, [0.5, 0.6, 0.7])],
        [Band("min to max", xs, [0.0, 0.1, math.nan], [1.0, 1.0, 1.0], "#60a5fa")],
        y_min=0,
        y_max=1,
        percent=True,
    )
    root = parsed(svg)
    (polygon,) = root.findall(f"{SVG}polygon")
    assert len(polygon.get("points", "").split()) == 4  # the NaN step is left out
    ticks = [t.text for t in root.findall(f"{SVG}text") if t.get("class") == "tick"]
    assert "0%" in ticks and "100%" in ticks


def test_labels_are_escaped():
    svg = line_plot([Series("<b>&", [1, 2], [1.0, 2.0])], y_label='"y"')
    root = parsed(svg)
    assert root.find(f"{SVG}path").get("data-label") == "<b>&"  # type: ignore[union-attr]


def test_a_long_line_is_thinned_but_keeps_its_spikes():
    points = [(float(i), 1.0) for i in range(10_000)]
    points[4321] = (4321.0, 50.0)
    kept = thin(points, 1000)
    assert len(kept) <= 1000 and (4321.0, 50.0) in kept
    assert kept == sorted(kept) and kept[0] == (0.0, 1.0)
    svg = line_plot([Series("loss", [x for x, _ in points], [y for _, y in points])])
    assert len(svg) < 60_000  # not 10,000 points' worth


def test_nothing_finite_to_plot_is_an_error():
    with pytest.raises(ValueError, match="nothing to plot"):
        line_plot([Series("loss", [1, 2], [None, math.inf])])
