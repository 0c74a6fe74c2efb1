"""Line plots as inline SVG, drawn in Python: a report opens with no script and no network.

    line_plot([Series("loss", steps, losses)], y_label="nats/token")

Axes with rounded ticks (linear, or powers of ten on a log scale), a legend, shaded
bands (a spread: min-max, quartiles) and a hover title per point. A value of None (a
NaN a run wrote as null) leaves a gap in its line. Every point is mapped through
``Frame``, so any finite input gives finite coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

Number = float | int
WIDTH, HEIGHT = 640, 250
LEFT, RIGHT, TOP, BOTTOM = 62, 14, 34, 38  # room for tick labels, legend, axis label
CHAR_PX = 6.6  # rough width of a 11px character, for laying out the legend
MAX_PATH_POINTS = 1200  # a longer line keeps each bucket's extremes (``thin``)
MAX_HOVER_POINTS = 120  # hover targets per series (a longer one: every k-th point), ~130 B each
PALETTE = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#4b5563")


@dataclass(frozen=True)
class Series:
    """One line: ``y[i]`` at ``x[i]`` (None: no value there, a gap)."""

    label: str
    x: Sequence[Number]
    y: Sequence[Number | None]
    color: str = ""  # "" takes the next palette colour
    width: float = 2.0
    dashed: bool = False
    faint: bool = False  # drawn light, behind: the raw values under a smoothed line
    markers: bool = False  # a dot on every point (few points: evals)


@dataclass(frozen=True)
class Band:
    """A shaded area between ``low`` and ``high`` (a spread), drawn under the lines."""

    label: str
    x: Sequence[Number]
    low: Sequence[Number]
    high: Sequence[Number]
    color: str
    opacity: float = 0.2


def fmt(value: float) -> str:
    """A tick or hover number: 3 significant digits, no float noise (0.30000000000000004)."""
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        return f"{value:.3g}".replace("e-0", "e-").replace("e+0", "e")
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def nice_step(span: float, target: int) -> float:
    """A round step (1, 2, 2.5 or 5 times a power of ten) giving about ``target`` ticks."""
    raw = span / max(1, target)
    power = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * power >= raw:
            return m * power
    return 10 * power


def linear_ticks(lo: float, hi: float, target: int = 5, integer: bool = False) -> list[float]:
    """Round values covering [lo, hi]: the axis runs from the first to the last."""
    if hi <= lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = nice_step(hi - lo, target)
    if integer:
        step = max(1.0, math.ceil(step))
    first, last = math.floor(lo / step) * step, math.ceil(hi / step) * step
    n = max(1, round((last - first) / step))
    return [round(first + k * step, 12) for k in range(n + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten covering [lo, hi] (lo > 0), with 2x and 5x between when few."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if b == a:
        b += 1
    ticks = [10.0**e for e in range(a, b + 1)]
    if b - a <= 2:
        ticks = sorted({t * m for t in ticks for m in (1, 2, 5) if t * m <= 10.0**b})
    return ticks


def wants_log_scale(values: Sequence[float]) -> bool:
    """A positive series spanning over two decades (a loss from 14 to 0.002) reads
    better on a log scale: on a linear one its whole second half is a flat line."""
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) > 1 and max(positive) / min(positive) > 100


@dataclass(frozen=True)
class Frame:
    """Data -> pixel mapping of one plot."""

    x0: float
    x1: float
    y0: float
    y1: float
    log_y: bool
    width: int
    height: int

    def px(self, x: float) -> float:
        span = (self.x1 - self.x0) or 1.0
        return LEFT + (x - self.x0) / span * (self.width - LEFT - RIGHT)

    def py(self, y: float) -> float:
        if self.log_y:
            y, lo, hi = math.log10(y), math.log10(self.y0), math.log10(self.y1)
        else:
            lo, hi = self.y0, self.y1
        span = (hi - lo) or 1.0
        return self.height - BOTTOM - (y - lo) / span * (self.height - TOP - BOTTOM)


def _finite(v: Number | None, log_y: bool) -> bool:
    return v is not None and math.isfinite(v) and (v > 0 or not log_y)


def _segments(s: Series, log_y: bool) -> list[list[tuple[float, float]]]:
    """The series' runs of plottable points (a None, NaN or, on a log scale, a value
    <= 0 ends a run)."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in zip(s.x, s.y, strict=True):
        if _finite(x, False) and _finite(y, log_y):
            assert y is not None
            runs[-1].append((float(x), float(y)))
        elif runs[-1]:
            runs.append([])
    return [r for r in runs if r]


def thin(points: list[tuple[float, float]], limit: int) -> list[tuple[float, float]]:
    """At most about ``limit`` points of a long line, keeping each bucket's lowest and
    highest (in order): a spike survives, as it would not in every k-th point."""
    if len(points) <= limit:
        return points
    size = math.ceil(len(points) / (limit // 2))
    out: list[tuple[float, float]] = []
    for start in range(0, len(points), size):
        bucket = points[start : start + size]
        lo, hi = min(bucket, key=lambda p: p[1]), max(bucket, key=lambda p: p[1])
        out += sorted({lo, hi}, key=lambda p: p[0])
    return out


def _path(points: list[tuple[float, float]], f: Frame) -> str:
    return " ".join(
        f"{'M' if i == 0 else 'L'}{f.px(x):.1f},{f.py(y):.1f}" for i, (x, y) in enumerate(points)
    )


def _legend(bands: Sequence[Band], series: Sequence[Series], width: int) -> list[str]:
    """A swatch and label per band and line, left to right above the plot."""
    entries: list[tuple[str, str]] = []  # (label, swatch)
    for b in bands:
        entries.append((b.label, f'<rect x="{{x}}" y="10" width="18" height="10" '
                                 f'fill="{b.color}" fill-opacity="{b.opacity}"/>'))  # fmt: skip
    for s in series:
        style = (' stroke-dasharray="5 3"' if s.dashed else "") + (
            ' stroke-opacity="0.3"' if s.faint else ""
        )
        entries.append((s.label, f'<line x1="{{x}}" y1="15" x2="{{x18}}" y2="15" '
                                 f'stroke="{s.color}" stroke-width="2.5"{style}/>'))  # fmt: skip
    out, x = [], float(LEFT)
    for label, swatch in entries:
        if x + 24 + len(label) * CHAR_PX > width:
            break  # a legend that does not fit is cut: the captions name every line
        out.append(swatch.format(x=f"{x:.0f}", x18=f"{x + 18:.0f}"))
        out.append(f'<text x="{x + 23:.0f}" y="19" class="legend">{escape(label)}</text>')
        x += 23 + len(label) * CHAR_PX + 16
    return out


def line_plot(
    series: Sequence[Series],
    bands: Sequence[Band] = (),
    *,
    x_label: str = "step",
    y_label: str = "",
    log_y: bool | None = None,
    y_min: float | None = None,
    y_max: float | None = None,
    percent: bool = False,
    width: int = WIDTH,
    height: int = HEIGHT,
) -> str:
    """An ``<svg>`` plotting ``series`` over ``bands``. ``log_y`` None: a log scale when
    every series spans over two decades of positive values (``wants_log_scale``).
    ``y_min``/``y_max`` widen the axis to include them (0 and 1 for a share);
    ``percent`` writes y ticks as percentages. Raises ``ValueError`` when nothing is
    plottable (the caller shows no plot then)."""
    colors = iter(PALETTE)
    series = [s if s.color else _colored(s, next(colors)) for s in series]
    all_y = [y for s in series for y in s.y if _finite(y, False)]
    all_y += [v for b in bands for v in (*b.low, *b.high) if _finite(v, False)]
    if log_y is None:
        log_y = bool(all_y) and wants_log_scale([float(v) for v in all_y if v is not None])
    segs = {s.label: _segments(s, log_y) for s in series}
    xs = [x for runs in segs.values() for run in runs for x, _ in run]
    ys = [y for runs in segs.values() for run in runs for _, y in run]
    for b in bands:
        for x, lo, hi in zip(b.x, b.low, b.high, strict=True):
            if _finite(x, False) and _finite(lo, log_y) and _finite(hi, log_y):
                xs.append(float(x))
                ys += [float(lo), float(hi)]
    if not xs:
        raise ValueError("nothing to plot: no finite values")
    ys += [v for v in (y_min, y_max) if v is not None and _finite(v, log_y)]
    # x: the data's own range (a run's last step ends the axis); y: rounded out to ticks
    x0, x1 = min(xs), max(xs)
    integer = all(float(x).is_integer() for x in xs)
    x_ticks = [t for t in linear_ticks(x0, x1, 6, integer) if x0 <= t <= x1] or [x0]
    y_ticks = log_ticks(min(ys), max(ys)) if log_y else linear_ticks(min(ys), max(ys), 5)
    if x1 == x0:  # one step: a narrow window around it
        x0, x1 = x0 - 1, x1 + 1
    f = Frame(x0, x1, y_ticks[0], y_ticks[-1], log_y, width, height)

    out = [
        f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img">'
    ]
    out += _axes(f, x_ticks, y_ticks, x_label, y_label, percent)
    for b in bands:
        out += _band(b, f)
    for s in sorted(series, key=lambda s: not s.faint):  # faint ones behind
        out += _line(s, segs[s.label], f, percent, x_label)
    out += _legend(bands, series, width)
    out.append("</svg>")
    return "\n".join(out)


def _colored(s: Series, color: str) -> Series:
    return Series(s.label, s.x, s.y, color, s.width, s.dashed, s.faint, s.markers)


def _axes(
    f: Frame, x_ticks: list[float], y_ticks: list[float], x_label: str, y_label: str, pct: bool
) -> list[str]:
    bottom, right = f.height - BOTTOM, f.width - RIGHT
    out = []
    for t in y_ticks:
        y = f.py(t)
        label = f"{t * 100:.0f}%" if pct else fmt(t)
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" class="gridline"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + 3.5:.1f}" class="tick" text-anchor="end">'
                   f"{label}</text>")  # fmt: skip
    for t in x_ticks:
        x = f.px(t)
        out.append(
            f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}" class="axis"/>'
        )
        out.append(f'<text x="{x:.1f}" y="{bottom + 16}" class="tick" text-anchor="middle">'
                   f"{fmt(t)}</text>")  # fmt: skip
    out.append(f'<line x1="{LEFT}" y1="{bottom}" x2="{right}" y2="{bottom}" class="axis"/>')
    out.append(f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{bottom}" class="axis"/>')
    out.append(f'<text x="{(LEFT + right) / 2:.0f}" y="{f.height - 4}" class="axis-label" '
               f'text-anchor="middle">{escape(x_label)}</text>')  # fmt: skip
    if y_label or f.log_y:
        text = escape(y_label + (" (log scale)" if f.log_y else ""))
        mid = (TOP + bottom) / 2
        out.append(f'<text x="12" y="{mid:.0f}" class="axis-label" text-anchor="middle" '
                   f'transform="rotate(-90 12 {mid:.0f})">{text}</text>')  # fmt: skip
    return out


def _band(b: Band, f: Frame) -> list[str]:
    pts = [
        (float(x), float(lo), float(hi))
        for x, lo, hi in zip(b.x, b.low, b.high, strict=True)
        if _finite(x, False) and _finite(lo, f.log_y) and _finite(hi, f.log_y)
    ]
    if len(pts) < 2:
        return []
    upper = [f"{f.px(x):.1f},{f.py(hi):.1f}" for x, _, hi in pts]
    lower = [f"{f.px(x):.1f},{f.py(lo):.1f}" for x, lo, _ in reversed(pts)]
    return [
        f'<polygon class="band" points="{" ".join(upper + lower)}" fill="{b.color}" '
        f'fill-opacity="{b.opacity}"><title>{escape(b.label)}</title></polygon>'
    ]


def _line(
    s: Series, runs: list[list[tuple[float, float]]], f: Frame, pct: bool, x_label: str
) -> list[str]:
    opacity = ' stroke-opacity="0.3"' if s.faint else ""
    dash = ' stroke-dasharray="5 3"' if s.dashed else ""
    out = []
    for run in runs:
        if len(run) > 1:
            out.append(
                f'<path class="series" data-label="{escape(s.label)}" '
                f'd="{_path(thin(run, MAX_PATH_POINTS), f)}" '
                f'fill="none" stroke="{s.color}" stroke-width="{s.width}"{opacity}{dash} '
                f'stroke-linejoin="round"/>'
            )
    points = [p for run in runs for p in run]
    if s.faint:
        return out
    stride = max(1, math.ceil(len(points) / MAX_HOVER_POINTS))
    radius = 3.5 if s.markers or len(points) == 1 else 3
    fill = s.color if s.markers or len(points) == 1 else "transparent"
    for x, y in points[::stride]:
        value = f"{y * 100:.1f}%" if pct else fmt(y)
        out.append(
            f'<circle cx="{f.px(x):.1f}" cy="{f.py(y):.1f}" r="{radius}" fill="{fill}" '
            f'class="pt"><title>{escape(s.label)} at {escape(x_label)} {fmt(x)}: {value}</title>'
            "</circle>"
        )
    return out
