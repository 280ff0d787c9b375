"""Build reports: the report.json schema, environment capture and terminal rendering."""

from __future__ import annotations

import importlib.metadata
import pathlib
import platform
from typing import Any

from fdec.build import read_build_json
from fdec.errors import InputError

__all__ = [
    "REPORT_FILE",
    "SCHEMA_VERSION",
    "colored",
    "environment",
    "load_report",
    "render_report",
]

REPORT_FILE = "report.json"
SCHEMA_VERSION = 1
_PACKAGES = (
    "fdec", "torch", "transformers", "onnx", "onnx-ir", "onnxscript", "onnxruntime",
    "onnxruntime-gpu", "optimum", "numpy", "tensorrt", "tensorrt-rtx-cu12",
)  # fmt: skip


def environment() -> dict[str, Any]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "packages": versions,
    }


def load_report(build: pathlib.Path) -> dict[str, Any]:
    path = pathlib.Path(build) / REPORT_FILE
    if not path.is_file():
        raise InputError(f"{build} has no {REPORT_FILE}", "give a folder written by fdec compile")
    report = read_build_json(path)
    from fdec.report.bench_results import BENCH_KEY, load_bench

    bench = load_bench(build)  # written by `fdec bench` after the build: shown, not hashed
    if bench is not None:
        report[BENCH_KEY] = bench
    return report


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _stats_text(stats: dict[str, Any]) -> str:
    """Scalar stats inline; tables (per-layer figures) as a count: they are in report.json."""
    parts = []
    for key, value in stats.items():
        if value in (0, None, "") or value == {} or value == []:
            continue
        if isinstance(value, (dict, list)):
            parts.append(f"{key}=[{len(value)} rows]")
        elif isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        else:
            parts.append(f"{key}={value}")
    return ", ".join(parts)


def colored(text: str, kind: str) -> str:
    """Terminal styling (click): bold headings, green for ok, red for failures, yellow warnings."""
    import click

    styles = {"head": {"bold": True}, "ok": {"fg": "green", "bold": True},
              "bad": {"fg": "red", "bold": True}, "warn": {"fg": "yellow"},
              "add": {"fg": "green"}, "del": {"fg": "red"}}  # fmt: skip
    return click.style(text, **styles[kind]) if kind in styles else text


def _checks_text(checks: dict[str, Any]) -> str:
    marks = []
    for name, result in checks.items():
        ok = not (isinstance(result, dict) and result.get("ok") is False)
        marks.append(f"{name} {'ok' if ok else 'FAIL'}")
    return ", ".join(marks) or "-"


def _pruning_lines(report: dict[str, Any]) -> list[str]:
    """What --prune and --draft did: sizes, and accuracy against the unpruned source."""
    lines = []
    for key, label in (("prune", "pruned"), ("draft", "draft")):
        entry = report.get(key)
        if not entry:
            continue
        accuracy = entry.get("accuracy") or {}
        stats = entry.get("stats") or {}
        text = f"{label} ({entry.get('prune')})"
        if stats:
            text += (
                f": {stats['heads']}, {stats['mlp']}, layers {stats['layers']}; parameters "
                f"{stats['parameters_before']:,} → {stats['parameters_after']:,} "
                f"({stats['parameters_ratio']:.2f}x)"
            )
        elif entry.get("layers"):
            text += f": {entry['layers']} layers"
        if accuracy.get("perplexity_source"):
            text += (
                f"; perplexity {accuracy['perplexity_source']:.2f} → "
                f"{accuracy['perplexity_build']:.2f} ({accuracy['perplexity_increase']:+.1%})"
            )
            if "top1_agreement" in accuracy:
                text += f", top-1 {accuracy['top1_agreement']:.3f}"
            text += " against the unpruned model"
        if entry.get("distill"):
            text += f", after {entry['distill']['steps']} distillation steps"
        lines.append(text + f" — in {entry.get('directory')}/")
    return lines


def _placement_line(placement: dict[str, Any], paint: Any) -> str:
    """One line: which nodes of the model would leave the GPU under the CUDA provider, and the
    Memcpy nodes ONNX Runtime would insert (fdec.lower.cuda_placement)."""
    host = placement.get("host_shape_nodes") or {}
    shapes = (
        f"; {sum(host.values())} shape node(s) on the host by design"
        f" ({', '.join(f'{n}× {op}' for op, n in host.items())})"
        if host
        else ""
    )
    breaches = placement.get("contract_breaches") or []
    if breaches:
        first = breaches[0]
        return paint(
            f"CUDA kernels: {len(breaches)} node(s) the CUDA provider would refuse or get "
            f"wrong; first: {first['op']} {first['name']}: {first['rule']}",
            "bad",
        )
    if placement.get("ok"):
        return (
            f"CUDA placement: {paint('every node has a CUDA kernel, no Memcpy', 'ok')}"
            f"{shapes} (predicted from the kernel tables)"
        )
    if placement.get("cpu_nodes"):
        groups = ", ".join(f"{g['count']}× {op}" for op, g in placement.get("by_op", {}).items())
        return paint(
            f"CUDA placement: {placement.get('cpu_nodes')} nodes have no CUDA kernel and would "
            f"run on the CPU with Memcpy around them: {groups}",
            "bad",
        )
    copies = ", ".join(
        f"{c['direction']} of {c['value']} for {len(c['readers'])} reader(s)"
        for c in placement.get("memcpy", [])[:3]
    )
    text = (
        f"CUDA placement: {placement.get('memcpy_nodes')} Memcpy node(s) between host and "
        f"device ({copies}): a sync each step, and no CUDA graph capture"
    )
    if not placement.get("required"):  # a TensorRT build: its engine runs, not this graph
        return text + (
            " (if ONNX Runtime's CUDA provider ran model.onnx; this build's engine runs it instead)"
        )
    return paint(text, "bad")


def render_report(report: dict[str, Any], *, style: bool = False) -> str:
    """The report as a text table (passes, then verification); `style` adds terminal colors."""
    paint = colored if style else (lambda text, kind: text)
    source = report.get("source", {})
    target = report.get("target", {})
    lines = [
        f"fdec build of {source.get('given')} ({source.get('architecture')}) "
        f"for {target.get('name')}",
        "",
    ]
    header = ("#", "pass", "mod", "nodes", "params", "bytes", "time", "checks", "stats")
    rows = [header]
    for record in report.get("passes", []):
        before, after = record.get("before") or {}, record.get("after") or {}
        rows.append(
            (
                str(record["index"]),
                record["name"],
                "yes" if record["modified"] else "no",
                f"{before.get('nodes', '?')}→{after.get('nodes', '?')}",
                f"{after.get('parameters', 0):,}",
                _human_bytes(after.get("bytes", 0)),
                # a pass taken from the cache: the time it took when it ran, marked
                f"{record.get('cached_wall_s', 0):.2f}s cached"
                if record.get("cached")
                else f"{record.get('wall_s', 0):.2f}s",
                _checks_text(record.get("checks") or {}),
                _stats_text(record.get("stats", {})),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    for number, row in enumerate(rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        if number == 0:
            cells = [paint(cell, "head") for cell in cells]
        else:  # padded first, so color codes do not shift the columns
            checks = cells[-1]
            cells[-1] = paint(checks, "bad" if "FAIL" in checks else "ok")
        lines.append(
            "  ".join([*cells, paint(row[-1], "head") if number == 0 else row[-1]]).rstrip()
        )
    verification = report.get("verification") or {}
    if verification:
        lines.append("")
        numeric = verification.get("numeric", {})
        status = paint("PASS", "ok") if verification.get("ok") else paint("FAIL", "bad")
        if verification.get("not_run"):
            lines.append(f"verification {paint('NOT RUN', 'warn')}: {verification['not_run']}")
        else:
            lines.append(
                f"verification {status}: max abs error {numeric.get('max_abs_error', 0):.3g} "
                f"(limit {verification.get('tolerance', {}).get('max_abs_error', '?')}), "
                f"top-1 agreement {numeric.get('top1_agreement', 0):.3f}"
            )
        if "perplexity_source" in numeric:
            lines.append(
                f"perplexity: source {numeric['perplexity_source']:.3f}, "
                f"build {numeric['perplexity_build']:.3f} on {numeric['tokens_scored']} held tokens"
            )
        greedy = verification.get("greedy")
        if greedy:
            same = (
                "identical" if greedy["identical"] else f"diverge at {greedy['first_divergence']}"
            )
            lines.append(f"greedy tokens ({greedy['steps']} steps): {same}")
        providers = verification.get("providers")
        if providers:
            lines.append(f"verified with ONNX Runtime on: {', '.join(providers)}")
        emulated = verification.get("emulated")
        if emulated:
            lines.append(
                f"  graph made for {verification['made_for']}; checked here with its "
                f"{emulated['dtype']} rounding emulated (every {emulated['dtype']} tensor "
                "rounded, arithmetic in fp32)"
            )
    for model in report.get("models") or []:
        lines.append(f"model {model['file']}: {model.get('summary')} ({model.get('runs_on')})")
        if model.get("note"):
            lines.append(f"  {model['note']}")
    for engine in report.get("engines") or []:
        what = engine.get("purpose") or "engine"
        status = engine["status"]
        line = f"{engine['backend']} {what}: {paint(status, 'ok' if status == 'built' else 'warn')}"
        if engine.get("compute_capability"):
            line += f" (sm {engine['compute_capability']})"
        if engine.get("engine"):
            line += f" → {engine['engine']}"
        if (engine.get("engine_precision") or {}).get("precision"):
            line += f", computes in {engine['engine_precision']['precision']} (engine inspector)"
        if engine.get("reason"):
            line += f" — {engine['reason']}"
        lines.append(line)
        typed = engine.get("typed_model")
        if typed:
            figures = typed.get("numerics") or {}
            checked = f", top-1 {figures['top1_agreement']:.3f} vs source" if figures else ""
            lines.append(
                f"strongly typed model {typed['model']}: {' + '.join(typed['precisions'])}{checked}"
            )
    lines += _pruning_lines(report)
    checkpoint = report.get("checkpoint")
    if checkpoint:
        lines.append(
            f"serving checkpoint: {checkpoint['format']} in {checkpoint['directory']} "
            f"({_human_bytes(checkpoint['bytes'])})"
        )
    guess = report.get("estimate") or {}
    if guess.get("decode_tokens_per_s"):
        text = (
            f"estimate for {guess['target']} (roofline, not measured): "
            f"~{guess['decode_tokens_per_s']:,.0f} decode tok/s at batch 1, "
            f"{guess['context_tokens']}-token context, {guess['decode_bound']}-bound"
        )
        if guess.get("prefill_ms") is not None:
            text += f"; prefill of {guess['prompt_tokens']} tokens ~{guess['prefill_ms']:.3g} ms"
        lines.append(text)
    # GPU placement (issue 16): fdec.lower.cuda_placement.placement_summary of the ONNX Runtime
    # model, stored under "cuda_placement" by the compile stage of GPU-target builds.
    placement = report.get("cuda_placement") or {}
    if placement:
        lines.append(_placement_line(placement, paint))
    outputs = report.get("outputs") or {}
    if outputs:
        total = sum(item["bytes"] for item in outputs.values())
        lines.append(f"build size: {_human_bytes(total)} in {len(outputs)} files")
    bench = report.get("bench")
    if bench and bench.get("rows"):
        from fdec.report.bench_results import render_bench

        when = bench.get("measured_at", "?")
        lines += ["", paint(f"measured speed (fdec bench, {when})", "head"), render_bench(bench)]
    return "\n".join(lines)
