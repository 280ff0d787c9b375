"""matrix.html: the matrix as a table, each cell linking its build's report."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

__all__ = ["render_page"]


def _figure(value: Any, text: str) -> str:
    return text if value is not None else "–"


def render_page(results: Mapping[str, Any]) -> str:
    """OUT/matrix.html: per model, recipes × targets; each cell its status, size, perplexity
    increase, estimated and measured decode speed, and a link to its build's report.html."""
    esc = html.escape
    rows = results["cells"]
    counts = results.get("counts", {})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>fdec matrix</title><style>",
        "body{font:14px system-ui,sans-serif;margin:2em}table{border-collapse:collapse;"
        "margin-bottom:2em}th,td{border:1px solid #ccc;padding:.4em .6em;vertical-align:top}"
        "th{background:#f4f4f4}.ok{background:#eaf7ea}.up-to-date{background:#eef3fb}"
        ".failed{background:#fbeaea}.pending{background:#f7f7f7}small{color:#555}",
        "</style></head><body>",
        f"<h1>fdec matrix</h1><p>{esc(str(results.get('matrix')))} · executor "
        f"{esc(str(results.get('executor')))} · wall {results.get('wall_s', 0):.1f} s · exit "
        f"code {results.get('exit_code')} · ok {counts.get('ok', 0)}, up to date "
        f"{counts.get('up-to-date', 0)}, failed {counts.get('failed', 0)}, pending "
        f"{counts.get('pending', 0)}</p>",
    ]
    targets = list(dict.fromkeys(row["target"] for row in rows))
    for model in dict.fromkeys(row["model"] for row in rows):
        parts.append(f"<h2>{esc(model)}</h2><table><tr><th>recipe</th>")
        parts += [f"<th>{esc(t)}</th>" for t in targets]
        parts.append("</tr>")
        for recipe in dict.fromkeys(row["recipe"] for row in rows if row["model"] == model):
            parts.append(f"<tr><th>{esc(recipe)}</th>")
            for target in targets:
                row = next(
                    (r for r in rows if (r["model"], r["recipe"], r["target"]) ==
                     (model, recipe, target)), None,
                )  # fmt: skip
                if row is None:
                    parts.append("<td><small>excluded</small></td>")
                    continue
                parts.append(_page_cell(row))
            parts.append("</tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "".join(parts)


def _page_cell(row: Mapping[str, Any]) -> str:
    esc = html.escape
    status = row["status"]
    lines = [f"<b>{esc(status)}</b>"]
    if row.get("exit_code"):
        lines[0] += f" (exit {row['exit_code']})"
    if row.get("error"):
        lines.append(f"<small>{esc(row['error'])}</small>")
    if row.get("bytes") is not None:
        ppl = row.get("ppl_increase")
        est, measured = row.get("estimated_decode_tok_s"), row.get("measured_decode_tok_s")
        lines += [
            f"{esc(str(row.get('quantize')))} · {row['bytes'] / 1e6:.1f} MB",
            "perplexity " + _figure(ppl, f"{(ppl or 0) * 100:+.1f} %"),
            "decode est. " + _figure(est, f"{est or 0:,.0f} tok/s")
            + " · measured " + _figure(measured, f"{measured or 0:,.1f} tok/s"),
        ]  # fmt: skip
        engines = ", ".join(
            f"{e['backend']} {e['status']}" + (" (check)" if e.get("purpose") == "check" else "")
            for e in row.get("engines") or []
        )
        if engines:
            lines.append(f"<small>{esc(engines)}</small>")
        lines.append(f"<a href='{esc(row['out'])}/report.html'>report</a>")
    if row.get("wall_s") is not None and status != "up-to-date":
        attempts = row.get("attempts") or 0
        lines.append(
            f"<small>{row['wall_s']:.1f} s"
            + (f", {attempts} attempts" if attempts > 1 else "") + "</small>"
        )  # fmt: skip
    return f"<td class='{esc(status)}'>" + "<br>".join(lines) + "</td>"
