"""The passes section: per-pass charts, the pass table, options, per-layer charts."""

from __future__ import annotations

from typing import Any

from fdec.report.html.charts import PALETTE, bar_chart, line_chart
from fdec.report.html.text import esc, fmt, fmt_bytes, is_number

__all__ = ["layer_charts", "pass_charts", "pass_table", "pipeline_options", "table_stats"]


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
        if any(is_number(v) for r in value for k, v in r.items() if k != label_key):
            found.append((key, label_key, value))
    return found


def pass_table(passes: list[dict[str, Any]]) -> str:
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
                f"<span class='{'ok' if ok else 'bad'}'>{esc(name)} {'ok' if ok else 'FAIL'}</span>"
            )
        stats = record.get("stats") or {}
        scalar = [
            f"{esc(k)}={esc(fmt(v))}"
            for k, v in stats.items()
            if not isinstance(v, (dict, list)) and v not in (None, "", 0)
        ]
        tables = [
            f"{esc(k)}=[{len(v)}]" for k, v in stats.items() if isinstance(v, (dict, list)) and v
        ]
        rows.append(
            f"<tr><td class='num'>{esc(record.get('index'))}</td><td><code>{esc(record.get('name'))}"
            f"</code></td><td>{esc(record.get('family', ''))}</td>"
            f"<td>{'yes' if record.get('modified') else 'no'}</td>"
            f"<td class='num'>{esc(fmt(before.get('nodes')))} → {esc(fmt(after.get('nodes')))}</td>"
            f"<td class='num'>{esc(fmt(after.get('parameters')))}</td>"
            f"<td class='num'>{esc(fmt_bytes(after.get('bytes')))}</td>"
            f"<td class='num'>{float(record.get('wall_s') or 0):.2f} s</td>"
            f"<td>{' '.join(marks) or '–'}</td><td class='stats'>{', '.join(scalar + tables)}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def pass_charts(report: dict[str, Any]) -> str:
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
    if any(is_number(v) for v in top1):
        charts.append(
            line_chart(
                "Top-1 agreement with the source",
                acc_labels,
                [("top-1", top1)],
                y_label="agreement",
                fmt=lambda v: f"{v:.0%}",
            )
        )
    if any(is_number(v) for v in ppl):
        ref = numeric.get("perplexity_source")
        charts.append(
            line_chart(
                "Perplexity on held text",
                acc_labels,
                [("build", ppl)],
                y_label="perplexity",
                reference=("source model", ref) if is_number(ref) else None,
            )
        )
    elif any(is_number(v) for v in kl):
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


def layer_charts(report: dict[str, Any]) -> str:
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
            metrics = [
                k for k in rows[0] if k != label_key and any(is_number(r.get(k)) for r in rows)
            ]
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
                        color=PALETTE[i % len(PALETTE)],
                    )
                )
            head = "".join(f"<th>{esc(label_key)}</th>" if k == label_key else f"<th class='num'>{esc(k)}</th>"
                           for k in [label_key, *metrics])  # fmt: skip
            body = "".join(
                "<tr>"
                + f"<td><code>{esc(r.get(label_key))}</code></td>"
                + "".join(f"<td class='num'>{esc(fmt(r.get(k)))}</td>" for k in metrics)
                + "</tr>"
                for r in rows
            )
            parts.append(
                f"<h3>{esc(record.get('name'))}: {esc(stat)} ({len(rows)} {esc(label_key)}s)</h3>"
                f'<div class="charts">{"".join(c for c in charts if c)}</div>'
                f"<details><summary>table</summary><table><tr>{head}</tr>{body}</table></details>"
            )
    if not parts:
        return (
            '<h2 id="layers">Per-layer figures</h2><p class="none">No pass recorded per-layer '
            "figures in this build.</p>"
        )
    return '<h2 id="layers">Per-layer figures</h2>' + "".join(parts)


def pipeline_options(passes: list[dict[str, Any]]) -> str:
    items = []
    for record in passes:
        options = record.get("options") or {}
        text = ", ".join(
            f"{k}={fmt(v) if not isinstance(v, dict) else v}" for k, v in options.items()
        )
        items.append(
            f"<li><code>{esc(record.get('name'))}</code> {esc(text) or '(no options)'}</li>"
        )
    return f"<details><summary>pass options</summary><ol>{''.join(items)}</ol></details>"
