"""The page: report.html's sections in order, with its stylesheet, as one self-contained document."""

from __future__ import annotations

from typing import Any

from fdec.report.html.passes import layer_charts, pass_charts, pass_table, pipeline_options
from fdec.report.html.serving import (
    capacity_section,
    environment_section,
    estimate_and_engines,
    measured_section,
)
from fdec.report.html.summary import summary_section, warnings
from fdec.report.html.text import esc, fmt

__all__ = ["HTML_FILE", "render_html"]

HTML_FILE = "report.html"

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
        "<ul class='warnings'>" + "".join(f"<li>{esc(w)}</li>" for w in found) + "</ul>"
        if found
        else "<p class='none'>None.</p>"
    )
    passes = report.get("passes") or []
    title = f"fdec build: {source.get('given', '?')} for {target.get('name', '?')}"
    body = [
        f"<h1>{esc(title)} {badge}</h1>",
        f"<p class='sub'>{esc(source.get('architecture', ''))} · {esc(target.get('display_name', ''))}"
        f" · compiled in {esc(fmt(report.get('wall_s')))} s</p>",
        summary_section(report),
        f'<h2 id="warnings">Warnings ({len(found)})</h2>{warn_html}',
        f'<h2 id="passes">Passes ({len(passes)})</h2>',
        pass_charts(report),
        "<h3>Pass table</h3>",
        pass_table(passes),
        pipeline_options(passes),
        layer_charts(report),
        capacity_section(report),
        estimate_and_engines(report),
        measured_section(report),
        environment_section(report),
        f"<footer>report schema {esc(report.get('schema_version', '?'))} · written by fdec; "
        "the same figures are in report.json</footer>",
    ]
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body><main>"
        + "\n".join(body)
        + "</main></body></html>\n"
    )
