"""`fdec diff`: what changed between two builds (pipeline, options, versions, figures, deltas)."""

from __future__ import annotations

import difflib
import json
import math
import pathlib
from typing import Any

from fdec.report import load_report

__all__ = ["MODEL_SUFFIXES", "diff_builds", "diff_reports", "load_build", "render_diff"]

# Files that hold the model itself (graph, weights, engines), counted as the model's size.
MODEL_SUFFIXES = (".onnx", ".onnx.data", ".data", ".engine", ".plan", ".safetensors")
_ACCURACY = ("perplexity_source", "perplexity_build", "top1_agreement", "kl_divergence",
             "max_abs_error")  # fmt: skip


def load_build(build: pathlib.Path) -> dict[str, Any]:
    """report.json plus the files listed in the build's manifest (report["outputs"])."""
    from fdec.build import MANIFEST

    report = load_report(build)
    manifest = pathlib.Path(build) / MANIFEST
    if "outputs" not in report and manifest.is_file():
        try:
            report["outputs"] = json.loads(manifest.read_text()).get("outputs") or {}
        except (json.JSONDecodeError, AttributeError):
            pass  # a damaged manifest is `fdec verify`'s business; the diff works without sizes
    return report


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _delta(a: Any, b: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"a": a, "b": b}
    if _num(a) and _num(b):
        entry["delta"] = b - a
        if a:
            entry["ratio"] = b / a
    return entry


def _changes(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    """Keys whose values differ, flattened with dots: [{"key", "a", "b"}]."""
    found = []
    for key in sorted(set(a) | set(b), key=str):
        va, vb = a.get(key), b.get(key)
        name = f"{prefix}{key}"
        if isinstance(va, dict) and isinstance(vb, dict):
            found += _changes(va, vb, f"{name}.")
        elif va != vb:
            found.append({"key": name, "a": va, "b": vb})
    return found


def _sizes(report: dict[str, Any]) -> dict[str, Any]:
    outputs = report.get("outputs") or {}
    model = sum(v["bytes"] for k, v in outputs.items() if k.endswith(MODEL_SUFFIXES))
    passes = report.get("passes") or []
    after = (passes[-1].get("after") or {}) if passes else {}
    return {
        "model_bytes": model if outputs else None,
        "files_bytes": sum(v["bytes"] for v in outputs.values()) if outputs else None,
        "weight_bytes": after.get("bytes"),
        "parameters": after.get("parameters"),
        "nodes": after.get("nodes"),
    }


def _accuracy(report: dict[str, Any]) -> dict[str, Any]:
    verification = report.get("verification") or {}
    numeric = dict(verification.get("numeric") or {})
    figures = {k: numeric.get(k) for k in _ACCURACY}
    if _num(figures["perplexity_build"]) and _num(figures["perplexity_source"]):
        figures["perplexity_increase"] = (
            figures["perplexity_build"] / figures["perplexity_source"] - 1
        )
    greedy = verification.get("greedy") or {}
    figures["greedy_identical"] = greedy.get("identical")
    figures["greedy_first_divergence"] = greedy.get("first_divergence")
    figures["verified"] = verification.get("ok")
    return figures


def _scalar_stats(record: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in (record.get("stats") or {}).items()
        if not isinstance(v, (dict, list)) and not k.endswith("wall_s")
    }


def _passes(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """Align the two pipelines by pass name; matched passes compare options and figures."""
    names_a = [p["name"] for p in a]
    names_b = [p["name"] for p in b]
    added, removed, rows = [], [], []
    matcher = difflib.SequenceMatcher(a=names_a, b=names_b, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            pairs = list(zip(a[i1:i2], b[j1:j2]))
        else:
            pairs = [(p, None) for p in a[i1:i2]] + [(None, p) for p in b[j1:j2]]
        for pa, pb in pairs:
            if pb is None:
                removed.append(pa["name"])
            if pa is None:
                added.append(pb["name"])
            after_a = (pa or {}).get("after") or {}
            after_b = (pb or {}).get("after") or {}
            row: dict[str, Any] = {
                "name": (pa or pb)["name"],
                "in": "both" if pa and pb else ("a" if pa else "b"),
                "index_a": (pa or {}).get("index"),
                "index_b": (pb or {}).get("index"),
                "bytes": _delta(after_a.get("bytes"), after_b.get("bytes")),
                "nodes": _delta(after_a.get("nodes"), after_b.get("nodes")),
                "wall_s": _delta((pa or {}).get("wall_s"), (pb or {}).get("wall_s")),
            }
            if pa and pb:
                row["options_changed"] = _changes(pa.get("options") or {}, pb.get("options") or {})
                row["stats_changed"] = _changes(_scalar_stats(pa), _scalar_stats(pb))
                row["modified"] = _delta(pa.get("modified"), pb.get("modified"))
            rows.append(row)
    return {
        "a": names_a,
        "b": names_b,
        "same": names_a == names_b and not any(r.get("options_changed") for r in rows),
        "added": added,
        "removed": removed,
        "options_changed": [
            {"pass": r["name"], **change} for r in rows for change in r.get("options_changed", [])
        ],
        "passes": rows,
    }


def _options(report: dict[str, Any]) -> dict[str, Any]:
    target = report.get("target") or {}
    source = report.get("source") or {}
    return {
        "model": source.get("given"),
        "config_sha256": source.get("config_sha256"),
        "target": target.get("name"),
        "backend": report.get("backend"),
        "recipe": report.get("recipe") or {},
        "limits": report.get("limits") or {},
    }


def _versions(report: dict[str, Any]) -> dict[str, Any]:
    env = report.get("environment") or {}
    return {"python": env.get("python"), **(env.get("packages") or {})}


def diff_reports(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Every difference between two reports, as one JSON-ready object (a = old, b = new)."""
    sizes_a, sizes_b = _sizes(a), _sizes(b)
    acc_a, acc_b = _accuracy(a), _accuracy(b)
    est_a, est_b = a.get("estimate") or {}, b.get("estimate") or {}
    return {
        "options": _changes(_options(a), _options(b)),
        "pipeline": _passes(a.get("passes") or [], b.get("passes") or []),
        "versions": _changes(_versions(a), _versions(b)),
        "size": {k: _delta(sizes_a[k], sizes_b[k]) for k in sizes_a},
        "accuracy": {k: _delta(acc_a.get(k), acc_b.get(k)) for k in acc_a | acc_b},
        "speed": {
            "estimated_decode_tokens_per_s": _delta(
                est_a.get("decode_tokens_per_s"), est_b.get("decode_tokens_per_s")
            ),
            "compile_wall_s": _delta(a.get("wall_s"), b.get("wall_s")),
        },
    }


def diff_builds(build_a: pathlib.Path, build_b: pathlib.Path) -> dict[str, Any]:
    """Load both builds (InputError, exit 2, when one is not a build) and diff them."""
    result = diff_reports(load_build(build_a), load_build(build_b))
    return {"a": str(build_a), "b": str(build_b), **result}


# ------------------------------------------------------------------------------- text


def _v(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _bytes(n: Any) -> str:
    if not _num(n):
        return "–"
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.3g} {unit}"
        n /= 1000
    return f"{sign}{n:.3g} GB"  # pragma: no cover


def _pct_change(entry: dict[str, Any]) -> str:
    ratio = entry.get("ratio")
    return f" ({ratio - 1:+.1%})" if _num(ratio) else ""


def render_diff(diff: dict[str, Any], *, style: Any = None) -> str:
    """The diff as text; `style(text, kind)` colors headings ('head') and changes ('add'/'del')."""
    paint = style or (lambda text, kind: text)
    lines = [paint(f"fdec diff  a: {diff.get('a', 'a')}  b: {diff.get('b', 'b')}", "head"), ""]

    pipeline = diff["pipeline"]
    lines.append(paint("pipeline", "head"))
    if pipeline["same"]:
        lines.append(f"  same {len(pipeline['a'])} passes, same options")
    else:
        lines.append(f"  a: {' → '.join(pipeline['a'])}")
        lines.append(f"  b: {' → '.join(pipeline['b'])}")
        for name in pipeline["removed"]:
            lines.append(paint(f"  - {name} (only in a)", "del"))
        for name in pipeline["added"]:
            lines.append(paint(f"  + {name} (only in b)", "add"))
        for change in pipeline["options_changed"]:
            lines.append(
                f"  ~ {change['pass']}.{change['key']}: {_v(change['a'])} → {_v(change['b'])}"
            )

    lines.append(paint("options", "head"))
    if not diff["options"]:
        lines.append("  same model, target, backend, recipe and limits")
    for change in diff["options"]:
        lines.append(f"  ~ {change['key']}: {_v(change['a'])} → {_v(change['b'])}")

    lines.append(paint("versions", "head"))
    if not diff["versions"]:
        lines.append("  same python and packages")
    for change in diff["versions"]:
        lines.append(f"  ~ {change['key']}: {_v(change['a'])} → {_v(change['b'])}")

    lines.append(paint("size", "head"))
    for key, entry in diff["size"].items():
        if entry["a"] is None and entry["b"] is None:
            continue
        show = _bytes if key.endswith("bytes") else _v
        delta = entry.get("delta")
        change = f"  Δ {show(delta)}{_pct_change(entry)}" if _num(delta) and delta else "  (same)"
        lines.append(f"  {key:<14} {show(entry['a']):>10} → {show(entry['b']):>10}{change}")

    lines.append(paint("accuracy against the source", "head"))
    for key, entry in diff["accuracy"].items():
        if entry["a"] is None and entry["b"] is None:
            continue
        delta = entry.get("delta")
        if key == "perplexity_increase":
            text = f"{_fmt_pct(entry['a'])} → {_fmt_pct(entry['b'])}"
            change = f"  Δ {delta * 100:+.2f} points" if _num(delta) and delta else "  (same)"
        else:
            text = f"{_v(entry['a'])} → {_v(entry['b'])}"
            change = f"  Δ {delta:+.4g}" if _num(delta) and delta else ""
            change = change or ("" if entry["a"] != entry["b"] else "  (same)")
        lines.append(f"  {key:<24} {text}{change}")

    lines.append(paint("speed", "head"))
    for key, entry in diff["speed"].items():
        if entry["a"] is None and entry["b"] is None:
            continue
        lines.append(f"  {key:<30} {_v(entry['a'])} → {_v(entry['b'])}{_pct_change(entry)}")

    lines.append(paint("per pass (after each pass: weight bytes, nodes, wall time)", "head"))
    for row in pipeline["passes"]:
        mark = {"both": " ", "a": "-", "b": "+"}[row["in"]]
        text = (
            f"  {mark} {row['name']:<22} bytes {_bytes(row['bytes']['a']):>9} → "
            f"{_bytes(row['bytes']['b']):>9}  nodes {_v(row['nodes']['a']):>6} → "
            f"{_v(row['nodes']['b']):>6}  time {_secs(row['wall_s']['a'])} → "
            f"{_secs(row['wall_s']['b'])}"
        )
        lines.append(paint(text, {"a": "del", "b": "add"}.get(row["in"], "")))
        for change in row.get("stats_changed", []):
            lines.append(f"      {change['key']}: {_v(change['a'])} → {_v(change['b'])}")
    return "\n".join(lines)


def _fmt_pct(value: Any) -> str:
    return f"{value:+.2%}" if _num(value) else "–"


def _secs(value: Any) -> str:
    return f"{value:.2f}s" if _num(value) else "–"
