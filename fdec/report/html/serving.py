"""Sections on running the build: KV capacity, speed estimate and engines, measured speed, environment."""

from __future__ import annotations

from typing import Any

from fdec.report.bench_results import bandwidth_method
from fdec.report.html.charts import bar_chart
from fdec.report.html.text import esc, fmt, fmt_bytes, is_number, pct

__all__ = ["capacity_section", "environment_section", "estimate_and_engines", "measured_section"]


def capacity_section(report: dict[str, Any]) -> str:
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
        ("memory", f"{fmt_bytes(capacity.get('memory_bytes'))} ({capacity.get('memory_source', '')})"),
        ("headroom kept back", pct(capacity.get("headroom"))),
        ("usable", fmt_bytes(usable)),
        ("weights", f"{fmt_bytes(weights)} ({capacity.get('weight_precision')}, "
                    f"{capacity.get('weight_precision_from', '')})"),
        ("KV cache per token", f"{fmt_bytes(capacity.get('kv_bytes_per_token'))} "
                               f"({capacity.get('kv_dtype')}, {capacity.get('kv_dtype_from', '')})"),
        ("KV cache per sequence", f"{fmt_bytes(capacity.get('kv_bytes_per_sequence'))} at "
                                  f"{fmt(capacity.get('context'))} tokens"),
        ("workspace", fmt_bytes(workspace)),
        ("needed", f"{fmt_bytes(capacity.get('needed_bytes'))} for batch {capacity.get('batch')}"),
        ("max sequences at this context", fmt(capacity.get("max_sequences"))),
        ("max context at batch 1", f"{fmt(capacity.get('max_context'))} tokens "
                                   f"(model positions: {fmt(capacity.get('max_positions'))})"),
    ]  # fmt: skip
    table = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    notes = "".join(f"<li>{esc(n)}</li>" for n in capacity.get("notes") or [])
    chart = ""
    if usable:
        chart = bar_chart(
            f"Memory plan on {capacity.get('target')} (usable {fmt_bytes(usable)})",
            ["weights", "KV cache", "workspace", "free"],
            [weights, kv, workspace, max(usable - weights - kv - workspace, 0)],
            x_label="bytes",
        )
    return (
        f'<h2 id="capacity">KV capacity plan {status}</h2>'
        f'<div class="charts"><div><table>{table}</table>'
        f"{'<ul>' + notes + '</ul>' if notes else ''}</div>{chart}</div>"
    )


def estimate_and_engines(report: dict[str, Any]) -> str:
    parts = ['<h2 id="speed">Speed and engines</h2>']
    estimate = report.get("estimate") or {}
    if estimate:
        keys = ("label", "target", "decode_tokens_per_s", "decode_bound", "prefill_ms",
                "prompt_tokens", "context_tokens", "weight_bytes", "kv_bytes_per_token",
                "math_precision", "note")  # fmt: skip
        rows = "".join(
            f"<tr><th>{esc(k)}</th><td>{esc(fmt(estimate[k]))}</td></tr>"
            for k in keys
            if k in estimate
        )
        parts.append(f"<h3>Roofline estimate</h3><table>{rows}</table>")
    engines = report.get("engines") or []
    if engines:
        rows = "".join(
            f"<tr><td>{esc(e.get('backend'))}</td><td>{esc(e.get('purpose') or 'engine')}</td>"
            f"<td>{esc(e.get('status'))}</td><td>{esc(e.get('engine') or '')}</td>"
            f"<td>{esc((e.get('engine_precision') or {}).get('precision') or '')}</td>"
            f"<td>{esc(e.get('reason') or '')}</td></tr>"
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


def measured_section(report: dict[str, Any]) -> str:
    """`fdec bench`'s figures (BUILD/bench.json); nothing when it has not run on the build."""
    bench = report.get("bench") or {}
    rows = [row for row in bench.get("rows") or [] if isinstance(row, dict)]
    if not rows:
        return ""
    bandwidth = bench.get("bandwidth") or {}
    table = "".join(
        f"<tr><td>{esc(row.get('batch'))}</td><td>{esc(_two(row.get('prefill_ms')))}</td>"
        f"<td>{esc(_two(row.get('decode_tok_s')))}</td>"
        f"<td>{esc(_two(row.get('decode_tok_s_per_row')))}</td>"
        f"<td>{esc(fmt_bytes(row.get('bytes_per_step')))}</td>"
        f"<td>{esc(pct(row.get('bandwidth_fraction')))}</td></tr>"
        for row in rows
    )
    facts = [
        ("measured at", bench.get("measured_at")),
        ("peak memory (RSS)", f"{_two(bench.get('peak_rss_mb'))} MB"),
        (
            "memory bandwidth",
            f"{_two(bandwidth.get('gb_s'))} GB/s ({bandwidth_method(bandwidth)})",
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
            f"{fmt_bytes(bench.get('weight_bytes'))} ({fmt_bytes(bench.get('gathered_bytes'))} "
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
        + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts if v)
        + "</table>"
    )


def _two(value: Any) -> str:
    """bench.json's figures are rounded to 2 decimals: shown as written."""
    return f"{value:,.2f}" if is_number(value) else "–"


def environment_section(report: dict[str, Any]) -> str:
    env = report.get("environment") or {}
    verification = report.get("verification") or {}
    rows = [
        ("python", env.get("python")),
        ("platform", env.get("platform")),
        ("providers verified", ", ".join(verification.get("providers") or []) or "–"),
        ("reference", verification.get("reference")),
        ("exporter", (report.get("export") or {}).get("exporter")),
    ]
    top = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows if v)
    packages = "".join(
        f"<tr><td><code>{esc(name)}</code></td><td>{esc(version)}</td></tr>"
        for name, version in sorted((env.get("packages") or {}).items())
    )
    return (
        f'<h2 id="environment">Environment</h2><div class="charts"><table>{top}</table>'
        f"<table><tr><th>package</th><th>version</th></tr>{packages}</table></div>"
    )
