"""report.html: one self-contained page (inline CSS and SVG, no scripts, no network) of a build."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["HTML_FILE", "render_html", "table_stats", "warnings"]

HTML_FILE = "report.html"

_PALETTE = ("#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2")
_KEPT = "#94a3b8"  # units a pass left alone (kept in higher precision)
_NEAR_TIE = 0.1  # greedy divergence with a source top-1/top-2 margin below this is a near tie

_CSS = """
:root { --fg:#0f172a; --muted:#64748b; --line:#e2e8f0; --bg:#f8fafc; --ok:#047857; --bad:#b91c1c;
        --warn:#b45309; }
* { box-sizing: border-box; }
body { margin:0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color:var(--fg); background:var(--bg); }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 14px; margin: 16px 0 6px; }
.sub { color: var(--muted); margin: 0 0 16px; }
.badge { display:inline-block; padding:1px 8px; border-radius:10px; font-size:12px; font-weight:600;
         color:#fff; vertical-align: middle; }
.badge.ok { background: var(--ok); color: #fff; } .badge.bad { background: var(--bad); color: #fff; }
.badge.warn { background: var(--warn); color: #fff; }
.cards { display:grid; grid-template-columns: repeat(auto-fill, minmax(210px, 1fr)); gap:10px; }
.card { background:#fff; border:1px solid var(--line); border-radius:8px; padding:10px 12px; }
.card .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .03em; }
.card .v { font-size: 18px; font-weight: 600; margin-top: 2px; word-break: break-word; }
.card .n { color: var(--muted); font-size: 12px; }
table { border-collapse: collapse; width: 100%; background:#fff; border:1px solid var(--line); }
th, td { text-align:left; padding:5px 8px; border-bottom:1px solid var(--line); vertical-align: top; }
th { background:#f1f5f9; font-weight:600; font-size:12px; }
td.num, th.num { text-align:right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.stats { color: var(--muted); font-size: 12px; max-width: 420px; word-break: break-word; }
.charts { display:grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap:12px; }
.chart { background:#fff; border:1px solid var(--line); border-radius:8px; padding:6px; }
.chart svg { display:block; width:100%; height:auto; }
.ok { color: var(--ok); } .bad { color: var(--bad); }
ul.warnings { background:#fffbeb; border:1px solid #fde68a; border-radius:8px; padding:10px 10px 10px 30px; }
ul.warnings li { margin: 3px 0; }
.none { color: var(--muted); font-style: italic; }
details { margin: 6px 0; } summary { cursor: pointer; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; }
footer { margin-top: 36px; color: var(--muted); font-size: 12px; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bytes(n: Any) -> str:
    if not _num(n):
        return "–"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"  # pragma: no cover


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "–"}[value]
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 1e4:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    return str(value)


def _pct(value: Any) -> str:
    return f"{value:.1%}" if _num(value) else "–"


# ---------------------------------------------------------------------------- charts (SVG)


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
        f'role="img" aria-label="{_e(title)}" font-family="system-ui, sans-serif" font-size="11">'
        f"<title>{_e(title)}</title>"
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13" font-weight="600" '
        f'fill="#0f172a">{_e(title)}</text>' + "".join(body) + "</svg></div>"
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
    values = [v for _, vs in series for v in vs if _num(v)]
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
            f'fill="#64748b">{_e(fmt(t))}</text>'
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
            f'text-anchor="end" fill="#334155">{_e(text)}</text>'
        )
    body.append(
        f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle" '
        f'fill="#64748b">{_e(x_label)}</text>'
        f'<text transform="translate(14,{top + plot_h / 2}) rotate(-90)" text-anchor="middle" '
        f'fill="#64748b">{_e(y_label)}</text>'
    )
    if reference:
        name, value = reference
        body.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
            f'stroke="#64748b" stroke-dasharray="4 3"/><text x="{left + plot_w - 4}" '
            f'y="{y(value) - 4:.1f}" text-anchor="end" fill="#64748b">{_e(name)}</text>'
        )
    for k, (name, vs) in enumerate(series):
        color = _PALETTE[k % len(_PALETTE)]
        points = [(x(i), y(v), v) for i, v in enumerate(vs) if _num(v)]
        if len(points) > 1:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py, _ in points)
            body.append(
                f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>'
            )
        for px, py, v in points:
            body.append(
                f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3.5" fill="{color}">'
                f"<title>{_e(name)}: {_e(fmt(v))}</title></circle>"
            )
        if len(series) > 1:
            lx = left + 8 + k * 150
            body.append(
                f'<rect x="{lx}" y="{top - 16}" width="10" height="10" fill="{color}"/>'
                f'<text x="{lx + 14}" y="{top - 7}" fill="#334155">{_e(name)}</text>'
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
    color: str = _PALETTE[0],
) -> str:
    """Horizontal bars, one per label (units, layers), with a labelled value axis."""
    highlight = highlight or set()
    rows = [(str(label), float(v)) for label, v in zip(labels, values) if _num(v)]
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
            f'text-anchor="middle" fill="#64748b">{_e(_short(t))}</text>'
        )
    for i, (label, v) in enumerate(rows):
        yy = top + i * (bar + gap)
        fill = _KEPT if label in highlight else color
        start, end = sorted((x(0.0), x(v)))
        text = label if len(label) <= 28 else label[:27] + "…"
        body.append(
            f'<text x="{left - 6}" y="{yy + bar - 4}" text-anchor="end" fill="#334155">'
            f"{_e(text)}</text>"
            f'<rect x="{start:.1f}" y="{yy}" width="{max(end - start, 1):.1f}" height="{bar}" '
            f'fill="{fill}" rx="2"><title>{_e(label)}: {_e(_fmt(v))}</title></rect>'
            f'<text x="{end + 4:.1f}" y="{yy + bar - 4}" fill="#334155">{_e(_short(v))}</text>'
        )
    body.append(
        f'<line x1="{x(0.0):.1f}" x2="{x(0.0):.1f}" y1="{top}" y2="{top + plot_h}" '
        f'stroke="#94a3b8"/><text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle" '
        f'fill="#64748b">{_e(x_label)}</text>'
    )
    if highlight & {label for label, _ in rows} and highlight_name:
        body.append(
            f'<rect x="{left}" y="{top - 16}" width="10" height="10" fill="{_KEPT}"/>'
            f'<text x="{left + 14}" y="{top - 7}" fill="#334155">{_e(highlight_name)}</text>'
        )
    return _svg(width, height, title, body)


# ---------------------------------------------------------------------------- report pieces


def table_stats(stats: dict[str, Any]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """Per-unit tables in a pass's stats: (stat name, label key, rows) for every list of dicts
    that name a unit (`unit`, `name`, `layer`, ...) and carry at least one number."""
    found = []
    for key, value in stats.items():
        if not isinstance(value, list) or not value or not all(isinstance(r, dict) for r in value):
            continue
        label_key = next(
            (k for k in ("unit", "name", "layer", "node", "tensor") if k in value[0]), None
        )
        if label_key is None:
            continue
        if any(_num(v) for r in value for k, v in r.items() if k != label_key):
            found.append((key, label_key, value))
    return found


def _model_bytes(report: dict[str, Any]) -> tuple[int | None, str]:
    outputs = report.get("outputs") or {}
    model_files = {
        name: item["bytes"]
        for name, item in outputs.items()
        if name.endswith((".onnx", ".onnx.data", ".data", ".engine", ".plan"))
    }
    if model_files:
        return sum(model_files.values()), f"{len(model_files)} model files on disk"
    passes = report.get("passes") or []
    if passes and (passes[-1].get("after") or {}).get("bytes") is not None:
        return passes[-1]["after"]["bytes"], "weights after the last pass"
    return None, ""


def warnings(report: dict[str, Any]) -> list[str]:
    """Everything a reader should not miss: failures, deferred work, fallbacks, near ties."""
    found: list[str] = []
    verification = report.get("verification") or {}
    if verification and not verification.get("ok"):
        found.append(f"verification failed: {verification.get('failure', 'see the figures')}")
    greedy = verification.get("greedy") or {}
    if greedy and not greedy.get("identical"):
        margin = greedy.get("source_margin_at_divergence")
        text = f"greedy tokens diverge from the source at step {greedy.get('first_divergence')}"
        if _num(margin):
            tie = " (a near tie)" if margin < _NEAR_TIE else ""
            text += f"; the source's top-1/top-2 logit margin there was {margin:.3g}{tie}"
        found.append(text)
    for record in report.get("passes") or []:
        name = record.get("name")
        for check, result in (record.get("checks") or {}).items():
            if isinstance(result, dict) and result.get("ok") is False:
                problems = result.get("problems") or []
                found.append(f"pass {name}: {check} check failed {'; '.join(map(str, problems))}")
        stats = record.get("stats") or {}
        if stats.get("fallback"):
            found.append(f"pass {name}: fallback: {stats['fallback']}")
        skipped = stats.get("skipped")
        if isinstance(skipped, str) and skipped:
            found.append(f"pass {name} skipped: {skipped}")
        elif isinstance(skipped, dict) and skipped:
            found.append(f"pass {name} skipped {len(skipped)}: " + ", ".join(map(str, skipped)))
    for engine in report.get("engines") or []:
        status = engine.get("status")
        if status not in ("built", "ok"):
            what = engine.get("purpose") or "engine"
            reason = f": {engine['reason']}" if engine.get("reason") else ""
            found.append(f"{engine.get('backend')} {what} {status}{reason}")
    capacity = report.get("capacity") or {}
    if capacity and capacity.get("fits") is False:
        found.append("the KV capacity plan does not fit the target's memory")
    note = (report.get("estimate") or {}).get("note")
    if note:
        found.append(f"estimate: {note}")
    return found


def _card(key: str, value: str, note: str = "") -> str:
    extra = f'<div class="n">{_e(note)}</div>' if note else ""
    return f'<div class="card"><div class="k">{_e(key)}</div><div class="v">{_e(value)}</div>{extra}</div>'


def _summary(report: dict[str, Any]) -> str:
    source = report.get("source") or {}
    target = report.get("target") or {}
    recipe = report.get("recipe") or {}
    verification = report.get("verification") or {}
    numeric = verification.get("numeric") or {}
    estimate = report.get("estimate") or {}
    cards = [
        _card("model", str(source.get("given", "?")), str(source.get("architecture", ""))),
        _card(
            "target",
            str(target.get("name", "?")),
            f"{target.get('display_name', '')}; backend {report.get('backend', '?')}",
        ),
        _card(
            "recipe", f"--quantize {recipe.get('quantize', '?')}", str(recipe.get("chosen_by", ""))
        ),
    ]
    size, size_note = _model_bytes(report)
    cards.append(_card("size", _bytes(size), size_note))
    if estimate.get("decode_tokens_per_s"):
        cards.append(
            _card(
                "estimated decode",
                f"~{estimate['decode_tokens_per_s']:,.0f} tok/s",
                f"roofline, not measured; batch 1, {estimate.get('context_tokens')}-token context, "
                f"{estimate.get('decode_bound')}-bound",
            )
        )
    measured = report.get("measured") or report.get("benchmark") or {}
    bench_rows = (report.get("bench") or {}).get("rows") or []
    if not measured and bench_rows and isinstance(bench_rows[0], dict):
        first = bench_rows[0]
        measured = {
            "decode_tokens_per_s": first.get("decode_tok_s"),
            "where": f"fdec bench, batch {first.get('batch')}",
        }
    if _num(measured.get("decode_tokens_per_s")):
        cards.append(
            _card(
                "measured decode",
                f"{measured['decode_tokens_per_s']:,.1f} tok/s",
                str(measured.get("where", measured.get("providers", ""))),
            )
        )
    if "perplexity_source" in numeric:
        growth = numeric["perplexity_build"] / numeric["perplexity_source"] - 1.0
        cards.append(
            _card(
                "perplexity",
                f"{numeric['perplexity_source']:.4g} → {numeric['perplexity_build']:.4g}",
                f"source → build ({growth:+.2%}) on {numeric.get('tokens_scored', '?')} held tokens",
            )
        )
    if "top1_agreement" in numeric:
        cards.append(_card("top-1 agreement", _pct(numeric["top1_agreement"]), "with the source"))
    if "kl_divergence" in numeric:
        cards.append(_card("KL divergence", _fmt(numeric["kl_divergence"]), "source ‖ build, mean"))
    if "max_abs_error" in numeric:
        limit = (verification.get("tolerance") or {}).get("max_abs_error")
        cards.append(
            _card(
                "max abs error",
                _fmt(numeric["max_abs_error"]),
                f"{numeric.get('worst_output', '')}; limit {_fmt(limit)}",
            )
        )
    greedy = verification.get("greedy")
    if greedy:
        same = (
            "identical"
            if greedy.get("identical")
            else f"diverge at {greedy.get('first_divergence')}"
        )
        cards.append(_card("greedy tokens", same, f"{greedy.get('steps')} steps vs the source"))
    return '<h2 id="summary">Summary</h2><div class="cards">' + "".join(cards) + "</div>"


def _pass_table(passes: list[dict[str, Any]]) -> str:
    head = (
        "<tr><th class='num'>#</th><th>pass</th><th>family</th><th>modified</th>"
        "<th class='num'>nodes</th><th class='num'>parameters</th><th class='num'>bytes</th>"
        "<th class='num'>time</th><th>checks</th><th>stats</th></tr>"
    )
    rows = []
    for record in passes:
        before, after = record.get("before") or {}, record.get("after") or {}
        checks = record.get("checks") or {}
        marks = []
        for name, result in checks.items():
            ok = isinstance(result, dict) and result.get("ok") is not False
            marks.append(
                f"<span class='{'ok' if ok else 'bad'}'>{_e(name)} {'ok' if ok else 'FAIL'}</span>"
            )
        stats = record.get("stats") or {}
        scalar = [
            f"{_e(k)}={_e(_fmt(v))}"
            for k, v in stats.items()
            if not isinstance(v, (dict, list)) and v not in (None, "", 0)
        ]
        tables = [
            f"{_e(k)}=[{len(v)}]" for k, v in stats.items() if isinstance(v, (dict, list)) and v
        ]
        rows.append(
            f"<tr><td class='num'>{_e(record.get('index'))}</td><td><code>{_e(record.get('name'))}"
            f"</code></td><td>{_e(record.get('family', ''))}</td>"
            f"<td>{'yes' if record.get('modified') else 'no'}</td>"
            f"<td class='num'>{_e(_fmt(before.get('nodes')))} → {_e(_fmt(after.get('nodes')))}</td>"
            f"<td class='num'>{_e(_fmt(after.get('parameters')))}</td>"
            f"<td class='num'>{_e(_bytes(after.get('bytes')))}</td>"
            f"<td class='num'>{float(record.get('wall_s') or 0):.2f} s</td>"
            f"<td>{' '.join(marks) or '–'}</td><td class='stats'>{', '.join(scalar + tables)}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _pass_charts(report: dict[str, Any]) -> str:
    passes = report.get("passes") or []
    if not passes:
        return ""
    labels = ["export"] + [str(p.get("name")) for p in passes]
    first = passes[0].get("before") or {}
    sizes = [first.get("bytes")] + [(p.get("after") or {}).get("bytes") for p in passes]
    nodes = [first.get("nodes")] + [(p.get("after") or {}).get("nodes") for p in passes]
    charts = [
        line_chart("Weight bytes after each pass", labels, [("bytes", sizes)], y_label="bytes"),
        line_chart("Graph nodes after each pass", labels, [("nodes", nodes)], y_label="nodes"),
    ]
    numeric = (report.get("verification") or {}).get("numeric") or {}
    acc_labels = [str(p.get("name")) for p in passes] + ["build (verified)"]
    per_pass = [((p.get("checks") or {}).get("numeric") or {}) for p in passes] + [numeric]
    top1 = [f.get("top1_agreement") for f in per_pass]
    ppl = [f.get("perplexity_build") for f in per_pass]
    kl = [f.get("kl_divergence") for f in per_pass]
    if any(_num(v) for v in top1):
        charts.append(
            line_chart(
                "Top-1 agreement with the source",
                acc_labels,
                [("top-1", top1)],
                y_label="agreement",
                fmt=lambda v: f"{v:.0%}",
            )
        )
    if any(_num(v) for v in ppl):
        ref = numeric.get("perplexity_source")
        charts.append(
            line_chart(
                "Perplexity on held text",
                acc_labels,
                [("build", ppl)],
                y_label="perplexity",
                reference=("source model", ref) if _num(ref) else None,
            )
        )
    elif any(_num(v) for v in kl):
        charts.append(
            line_chart("KL divergence from the source", acc_labels, [("KL", kl)], y_label="KL")
        )
    times = [p.get("wall_s") or 0.0 for p in passes]
    charts.append(
        bar_chart(
            "Wall time per pass", [str(p.get("name")) for p in passes], times, x_label="seconds"
        )
    )
    measured = sum(1 for f in per_pass[:-1] if f)
    note = (
        ""
        if measured
        else "<p class='sub'>Accuracy was measured on the verified build only; compile with "
        "<code>--verify-each</code> to measure it after every pass.</p>"
    )
    return note + '<div class="charts">' + "".join(c for c in charts if c) + "</div>"


_METRIC_NAMES = {
    "kl": "KL divergence (higher = more sensitive)",
    "top1": "top-1 agreement",
    "ppl": "perplexity",
    "importance": "importance",
}


def _layer_charts(report: dict[str, Any]) -> str:
    parts = []
    for record in report.get("passes") or []:
        stats = record.get("stats") or {}
        kept = set()
        for key in ("kept", "kept_fp32", "pruned"):
            if isinstance(stats.get(key), list):
                kept |= {str(u) for u in stats[key]}
        kept_name = (
            "pruned"
            if "pruned" in stats
            else f"kept ({stats.get('kept_precision', 'higher precision')})"
        )
        for stat, label_key, rows in table_stats(stats):
            metrics = [k for k in rows[0] if k != label_key and any(_num(r.get(k)) for r in rows)]
            charts = []
            for i, metric in enumerate(metrics):
                charts.append(
                    bar_chart(
                        f"{record.get('name')}: {stat} — {metric}",
                        [str(r.get(label_key)) for r in rows],
                        [r.get(metric) for r in rows],
                        x_label=_METRIC_NAMES.get(metric, metric),
                        highlight=kept,
                        highlight_name=kept_name,
                        color=_PALETTE[i % len(_PALETTE)],
                    )
                )
            head = "".join(f"<th>{_e(label_key)}</th>" if k == label_key else f"<th class='num'>{_e(k)}</th>"
                           for k in [label_key, *metrics])  # fmt: skip
            body = "".join(
                "<tr>"
                + f"<td><code>{_e(r.get(label_key))}</code></td>"
                + "".join(f"<td class='num'>{_e(_fmt(r.get(k)))}</td>" for k in metrics)
                + "</tr>"
                for r in rows
            )
            parts.append(
                f"<h3>{_e(record.get('name'))}: {_e(stat)} ({len(rows)} {_e(label_key)}s)</h3>"
                f'<div class="charts">{"".join(c for c in charts if c)}</div>'
                f"<details><summary>table</summary><table><tr>{head}</tr>{body}</table></details>"
            )
    if not parts:
        return (
            '<h2 id="layers">Per-layer figures</h2><p class="none">No pass recorded per-layer '
            "figures in this build.</p>"
        )
    return '<h2 id="layers">Per-layer figures</h2>' + "".join(parts)


def _capacity(report: dict[str, Any]) -> str:
    capacity = report.get("capacity") or {}
    if not capacity:
        return '<h2 id="capacity">KV capacity plan</h2><p class="none">No capacity plan.</p>'
    weights = capacity.get("weight_bytes") or 0
    kv = (capacity.get("kv_bytes_per_sequence") or 0) * (capacity.get("batch") or 1)
    workspace = capacity.get("workspace_bytes") or 0
    usable = capacity.get("usable_bytes") or 0
    status = (
        "<span class='badge ok'>fits</span>"
        if capacity.get("fits")
        else "<span class='badge bad'>does not fit</span>"
    )
    rows = [
        ("memory", f"{_bytes(capacity.get('memory_bytes'))} ({capacity.get('memory_source', '')})"),
        ("headroom kept back", _pct(capacity.get("headroom"))),
        ("usable", _bytes(usable)),
        ("weights", f"{_bytes(weights)} ({capacity.get('weight_precision')}, "
                    f"{capacity.get('weight_precision_from', '')})"),
        ("KV cache per token", f"{_bytes(capacity.get('kv_bytes_per_token'))} "
                               f"({capacity.get('kv_dtype')}, {capacity.get('kv_dtype_from', '')})"),
        ("KV cache per sequence", f"{_bytes(capacity.get('kv_bytes_per_sequence'))} at "
                                  f"{_fmt(capacity.get('context'))} tokens"),
        ("workspace", _bytes(workspace)),
        ("needed", f"{_bytes(capacity.get('needed_bytes'))} for batch {capacity.get('batch')}"),
        ("max sequences at this context", _fmt(capacity.get("max_sequences"))),
        ("max context at batch 1", f"{_fmt(capacity.get('max_context'))} tokens "
                                   f"(model positions: {_fmt(capacity.get('max_positions'))})"),
    ]  # fmt: skip
    table = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    notes = "".join(f"<li>{_e(n)}</li>" for n in capacity.get("notes") or [])
    chart = ""
    if usable:
        chart = bar_chart(
            f"Memory plan on {capacity.get('target')} (usable {_bytes(usable)})",
            ["weights", "KV cache", "workspace", "free"],
            [weights, kv, workspace, max(usable - weights - kv - workspace, 0)],
            x_label="bytes",
        )
    return (
        f'<h2 id="capacity">KV capacity plan {status}</h2>'
        f'<div class="charts"><div><table>{table}</table>'
        f"{'<ul>' + notes + '</ul>' if notes else ''}</div>{chart}</div>"
    )


def _estimate_and_engines(report: dict[str, Any]) -> str:
    parts = ['<h2 id="speed">Speed and engines</h2>']
    estimate = report.get("estimate") or {}
    if estimate:
        keys = ("label", "target", "decode_tokens_per_s", "decode_bound", "prefill_ms",
                "prompt_tokens", "context_tokens", "weight_bytes", "kv_bytes_per_token",
                "math_precision", "note")  # fmt: skip
        rows = "".join(
            f"<tr><th>{_e(k)}</th><td>{_e(_fmt(estimate[k]))}</td></tr>"
            for k in keys
            if k in estimate
        )
        parts.append(f"<h3>Roofline estimate</h3><table>{rows}</table>")
    engines = report.get("engines") or []
    if engines:
        rows = "".join(
            f"<tr><td>{_e(e.get('backend'))}</td><td>{_e(e.get('purpose') or 'engine')}</td>"
            f"<td>{_e(e.get('status'))}</td><td>{_e(e.get('engine') or '')}</td>"
            f"<td>{_e((e.get('engine_precision') or {}).get('precision') or '')}</td>"
            f"<td>{_e(e.get('reason') or '')}</td></tr>"
            for e in engines
        )
        parts.append(
            "<h3>Engines</h3><table><tr><th>backend</th><th>purpose</th><th>status</th>"
            "<th>file</th><th>computes in (engine inspector)</th><th>reason</th></tr>"
            f"{rows}</table>"
        )
    else:
        parts.append("<p class='none'>No engines: the ONNX Runtime build is the output.</p>")
    return "".join(parts)


def _measured(report: dict[str, Any]) -> str:
    """`fdec bench`'s figures (BUILD/bench.json); nothing when it has not run on the build."""
    bench = report.get("bench") or {}
    rows = [row for row in bench.get("rows") or [] if isinstance(row, dict)]
    if not rows:
        return ""
    bandwidth = bench.get("bandwidth") or {}
    table = "".join(
        f"<tr><td>{_e(row.get('batch'))}</td><td>{_e(_two(row.get('prefill_ms')))}</td>"
        f"<td>{_e(_two(row.get('decode_tok_s')))}</td>"
        f"<td>{_e(_two(row.get('decode_tok_s_per_row')))}</td>"
        f"<td>{_e(_bytes(row.get('bytes_per_step')))}</td>"
        f"<td>{_e(_pct(row.get('bandwidth_fraction')))}</td></tr>"
        for row in rows
    )
    facts = [
        ("measured at", bench.get("measured_at")),
        ("peak memory (RSS)", f"{_two(bench.get('peak_rss_mb'))} MB"),
        (
            "memory bandwidth",
            f"{_two(bandwidth.get('gb_s'))} GB/s (sum of a {bandwidth.get('array_mb')} MB array, "
            f"{bandwidth.get('threads')} threads, best of {bandwidth.get('tries')})",
        ),
        (
            "options",
            f"--batch {','.join(str(row.get('batch')) for row in rows)} --prompt-len "
            f"{bench.get('prompt_len')} --gen-len {bench.get('gen_len')} --rounds "
            f"{bench.get('rounds')}; threads {bench.get('threads')}",
        ),
        ("providers", ", ".join(bench.get("providers") or []) or None),
        (
            "weights",
            f"{_bytes(bench.get('weight_bytes'))} ({_bytes(bench.get('gathered_bytes'))} "
            "read a row per token)",
        ),
        ("cpus, load average", f"{bench.get('cpu_count')}, {bench.get('load_average')}"),
    ]
    chart = bar_chart(
        "decode tok/s by batch size",
        [f"batch {row.get('batch')}" for row in rows],
        [row.get("decode_tok_s") for row in rows],
        x_label="tok/s (median of rounds)",
    )
    return (
        '<h2 id="measured">Measured speed</h2>'
        "<p class='sub'>fdec bench on this machine (bench.json). Fraction of bound = bytes read "
        "per decode step × steps/s ÷ measured memory bandwidth.</p>"
        "<div class='charts'><table><tr><th>batch</th><th>prefill ms</th><th>decode tok/s</th>"
        "<th>tok/s per row</th><th>bytes/step</th><th>of bandwidth bound</th></tr>"
        f"{table}</table>{chart}</div><table>"
        + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts if v)
        + "</table>"
    )


def _two(value: Any) -> str:
    """bench.json's figures are rounded to 2 decimals: shown as written."""
    return f"{value:,.2f}" if _num(value) else "–"


def _environment(report: dict[str, Any]) -> str:
    env = report.get("environment") or {}
    verification = report.get("verification") or {}
    rows = [
        ("python", env.get("python")),
        ("platform", env.get("platform")),
        ("providers verified", ", ".join(verification.get("providers") or []) or "–"),
        ("reference", verification.get("reference")),
        ("exporter", (report.get("export") or {}).get("exporter")),
    ]
    top = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows if v)
    packages = "".join(
        f"<tr><td><code>{_e(name)}</code></td><td>{_e(version)}</td></tr>"
        for name, version in sorted((env.get("packages") or {}).items())
    )
    return (
        f'<h2 id="environment">Environment</h2><div class="charts"><table>{top}</table>'
        f"<table><tr><th>package</th><th>version</th></tr>{packages}</table></div>"
    )


def _pipeline_options(passes: list[dict[str, Any]]) -> str:
    items = []
    for record in passes:
        options = record.get("options") or {}
        text = ", ".join(
            f"{k}={_fmt(v) if not isinstance(v, dict) else v}" for k, v in options.items()
        )
        items.append(f"<li><code>{_e(record.get('name'))}</code> {_e(text) or '(no options)'}</li>")
    return f"<details><summary>pass options</summary><ol>{''.join(items)}</ol></details>"


def render_html(report: dict[str, Any]) -> str:
    """The whole report as one HTML document; every text from the report is escaped."""
    source = report.get("source") or {}
    target = report.get("target") or {}
    verification = report.get("verification") or {}
    if verification:
        badge = (
            "<span class='badge ok'>verified</span>"
            if verification.get("ok")
            else "<span class='badge bad'>verification failed</span>"
        )
    else:
        badge = "<span class='badge warn'>not verified</span>"
    found = warnings(report)
    warn_html = (
        "<ul class='warnings'>" + "".join(f"<li>{_e(w)}</li>" for w in found) + "</ul>"
        if found
        else "<p class='none'>None.</p>"
    )
    passes = report.get("passes") or []
    title = f"fdec build: {source.get('given', '?')} for {target.get('name', '?')}"
    body = [
        f"<h1>{_e(title)} {badge}</h1>",
        f"<p class='sub'>{_e(source.get('architecture', ''))} · {_e(target.get('display_name', ''))}"
        f" · compiled in {_e(_fmt(report.get('wall_s')))} s</p>",
        _summary(report),
        f'<h2 id="warnings">Warnings ({len(found)})</h2>{warn_html}',
        f'<h2 id="passes">Passes ({len(passes)})</h2>',
        _pass_charts(report),
        "<h3>Pass table</h3>",
        _pass_table(passes),
        _pipeline_options(passes),
        _layer_charts(report),
        _capacity(report),
        _estimate_and_engines(report),
        _measured(report),
        _environment(report),
        f"<footer>report schema {_e(report.get('schema_version', '?'))} · written by fdec; "
        "the same figures are in report.json</footer>",
    ]
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
        + "\n".join(body)
        + "</main></body></html>\n"
    )
