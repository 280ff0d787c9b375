"""Inline SVG charts for the page: line charts (per pass) and bar charts (per unit)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from fdec.report.html.text import esc, fmt, is_number

__all__ = ["PALETTE", "bar_chart", "line_chart"]

PALETTE = ("#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2")
_KEPT = "#94a3b8"  # units a pass left alone (kept in higher precision)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    for mult in (1, 2, 2.5, 5, 10):
        if raw <= mult * step:
            step *= mult
            break
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(ticks[-1] + step)
    return ticks


def _short(value: float) -> str:
    magnitude = abs(value)
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= div:
            return f"{value / div:.3g}{suffix}"
    if magnitude and magnitude < 0.01:
        return f"{value:.1e}"
    return f"{value:.3g}"


def _svg(width: int, height: int, title: str, body: Iterable[str]) -> str:
    return (
        f'<div class="chart"><svg viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{esc(title)}" font-family="system-ui, sans-serif" font-size="11">'
        f"<title>{esc(title)}</title>"
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13" font-weight="600" '
        f'fill="#0f172a">{esc(title)}</text>' + "".join(body) + "</svg></div>"
    )


def line_chart(
    title: str,
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[float | None]]],
    *,
    y_label: str,
    x_label: str = "pass (in order)",
    fmt: Any = _short,
    reference: tuple[str, float] | None = None,
) -> str:
    """Points joined by lines over `labels`; None values are gaps (not measured there)."""
    width, height = 560, 300
    left, right, top, bottom = 64, 16, 40, 92
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for _, vs in series for v in vs if is_number(v)]
    if reference:
        values.append(reference[1])
    if not values:
        return ""
    low, high = min(values), max(values)
    if low >= 0 and low < 0.5 * high:
        low = 0.0
    pad = (high - low) * 0.08 or abs(high) * 0.1 or 1.0
    ticks = _ticks(low - (pad if low else 0), high + pad)
    y0, y1 = ticks[0], ticks[-1]

    def y(v: float) -> float:
        return top + plot_h * (1 - (v - y0) / (y1 - y0))

    n = max(len(labels), 1)
    step = plot_w / n

    def x(i: int) -> float:
        return left + step * (i + 0.5)

    body = []
    for t in ticks:
        body.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y(t):.1f}" y2="{y(t):.1f}" '
            f'stroke="#e2e8f0"/><text x="{left - 6}" y="{y(t) + 4:.1f}" text-anchor="end" '
            f'fill="#64748b">{esc(fmt(t))}</text>'
        )
    body.append(
        f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" stroke="#94a3b8"/>'
        f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" '
        f'stroke="#94a3b8"/>'
    )
    for i, label in enumerate(labels):
        text = label if len(label) <= 18 else label[:17] + "…"
        body.append(
            f'<text transform="translate({x(i):.1f},{top + plot_h + 10}) rotate(-35)" '
            f'text-anchor="end" fill="#334155">{esc(text)}</text>'
        )
    body.append(
        f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle" '
        f'fill="#64748b">{esc(x_label)}</text>'
        f'<text transform="translate(14,{top + plot_h / 2}) rotate(-90)" text-anchor="middle" '
        f'fill="#64748b">{esc(y_label)}</text>'
    )
    if reference:
        name, value = reference
        body.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
            f'stroke="#64748b" stroke-dasharray="4 3"/><text x="{left + plot_w - 4}" '
            f'y="{y(value) - 4:.1f}" text-anchor="end" fill="#64748b">{esc(name)}</text>'
        )
    for k, (name, vs) in enumerate(series):
        color = PALETTE[k % len(PALETTE)]
        points = [(x(i), y(v), v) for i, v in enumerate(vs) if is_number(v)]
        if len(points) > 1:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py, _ in points)
            body.append(
                f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>'
            )
        for px, py, v in points:
            body.append(
                f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3.5" fill="{color}">'
                f"<title>{esc(name)}: {esc(fmt(v))}</title></circle>"
            )
        if len(series) > 1:
            lx = left + 8 + k * 150
            body.append(
                f'<rect x="{lx}" y="{top - 16}" width="10" height="10" fill="{color}"/>'
                f'<text x="{lx + 14}" y="{top - 7}" fill="#334155">{esc(name)}</text>'
            )
    return _svg(width, height, title, body)


def bar_chart(
    title: str,
    labels: Sequence[str],
    values: Sequence[float],
    *,
    x_label: str,
    highlight: set[str] | None = None,
    highlight_name: str = "",
    color: str = PALETTE[0],
) -> str:
    """Horizontal bars, one per label (units, layers), with a labelled value axis."""
    highlight = highlight or set()
    rows = [(str(label), float(v)) for label, v in zip(labels, values) if is_number(v)]
    if not rows:
        return ""
    bar, gap = 16, 6
    label_w = min(200, 12 + 7 * max(len(label) for label, _ in rows))
    width = 560
    left, right, top = label_w, 56, 40
    plot_w = width - left - right
    plot_h = len(rows) * (bar + gap)
    height = top + plot_h + 44
    low = min(0.0, min(v for _, v in rows))
    high = max(0.0, max(v for _, v in rows))
    ticks = _ticks(low, high if high > low else low + 1.0)
    x0, x1 = ticks[0], ticks[-1]

    def x(v: float) -> float:
        return left + plot_w * (v - x0) / (x1 - x0)

    body = []
    for t in ticks:
        body.append(
            f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{top}" y2="{top + plot_h}" '
            f'stroke="#e2e8f0"/><text x="{x(t):.1f}" y="{top + plot_h + 14}" '
            f'text-anchor="middle" fill="#64748b">{esc(_short(t))}</text>'
        )
    for i, (label, v) in enumerate(rows):
        yy = top + i * (bar + gap)
        fill = _KEPT if label in highlight else color
        start, end = sorted((x(0.0), x(v)))
        text = label if len(label) <= 28 else label[:27] + "…"
        body.append(
            f'<text x="{left - 6}" y="{yy + bar - 4}" text-anchor="end" fill="#334155">'
            f"{esc(text)}</text>"
            f'<rect x="{start:.1f}" y="{yy}" width="{max(end - start, 1):.1f}" height="{bar}" '
            f'fill="{fill}" rx="2"><title>{esc(label)}: {esc(fmt(v))}</title></rect>'
            f'<text x="{end + 4:.1f}" y="{yy + bar - 4}" fill="#334155">{esc(_short(v))}</text>'
        )
    body.append(
        f'<line x1="{x(0.0):.1f}" x2="{x(0.0):.1f}" y1="{top}" y2="{top + plot_h}" '
        f'stroke="#94a3b8"/><text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle" '
        f'fill="#64748b">{esc(x_label)}</text>'
    )
    if highlight & {label for label, _ in rows} and highlight_name:
        body.append(
            f'<rect x="{left}" y="{top - 16}" width="10" height="10" fill="{_KEPT}"/>'
            f'<text x="{left + 14}" y="{top - 7}" fill="#334155">{esc(highlight_name)}</text>'
        )
    return _svg(width, height, title, body)
