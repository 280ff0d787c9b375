"""`fdec plan`'s output: one plan per target, and its terminal table."""

from __future__ import annotations

from typing import Any

from fdec.errors import InputError
from fdec.plan.capacity import DEFAULT_HEADROOM, plan_capacity
from fdec.plan.shape import ModelShape

__all__ = ["plan_targets", "render_table"]

_GB = 1e9
_GIB = 2**30
_MB = 1e6


def plan_targets(shape: ModelShape, targets: list[Any], **options: Any) -> list[dict[str, Any]]:
    """One plan per target, as dicts; a target lacking the asked precision gets an error row."""
    rows: list[dict[str, Any]] = []
    for target in targets:
        try:
            rows.append(plan_capacity(shape, target, **options).to_dict())
        except InputError as err:  # e.g. --quantize fp8 on an a100
            rows.append({"target": target.name, "error": err.one_line()})
    return rows


def render_table(shape: ModelShape, rows: list[dict[str, Any]]) -> str:
    """The terminal form of `plan_targets`: a header, one line per target, then notes."""
    planned = [row for row in rows if "error" not in row]
    first = planned[0] if planned else {}
    batch, context = first.get("batch", 1), first.get("context", 0)
    lines = [
        f"{shape.name}: {shape.model_type or shape.layout} {shape.kind}, {shape.num_layers} "
        f"layers, {shape.num_heads} heads / {shape.num_kv_heads} KV heads × {shape.head_dim}, "
        f"hidden {shape.hidden_size}, {shape.parameters() / 1e6:,.1f} M parameters, "
        f"{shape.max_positions or '?'} positions",
        f"batch {batch} × context {context}; {first.get('headroom', DEFAULT_HEADROOM):.0%} of "
        "memory kept back; GB = 1e9 bytes, MB = 1e6",
    ]
    header = (
        "target", "usable GB", "weights", "GB", "KV", "MB/token", f"GB/seq@{context}",
        "workspace GB", f"max seqs@{context}", f"max ctx@{batch}", f"{batch}×{context}",
    )  # fmt: skip
    table: list[tuple[str, ...]] = [header]
    notes: list[str] = []
    capped = False
    for row in rows:
        if "error" in row:
            table.append((row["target"], "-", "-", "-", "-", "-", "-", "-", "-", "-", "n/a"))
            notes.append(f"{row['target']}: {row['error']}")
            continue
        max_ctx = row["max_context"]
        limit = row["max_positions"]
        shown = f"{max_ctx:,}"
        if limit and max_ctx > limit:
            shown, capped = f"{max_ctx:,}*", True
        kv = "-" if not row["kv_bytes_per_token"] else row["kv_dtype"]
        table.append(
            (
                row["target"],
                f"{row['usable_bytes'] / _GB:.1f}",
                row["weight_precision"],
                f"{row['weight_bytes'] / _GB:.3f}",
                kv,
                f"{row['kv_bytes_per_token'] / _MB:.4f}",
                f"{row['kv_bytes_per_sequence'] / _GB:.3f}",
                f"{row['workspace_bytes'] / _GB:.3f}",
                f"{row['max_sequences']:,}",
                shown,
                "fits" if row["fits"] else "DOES NOT FIT",
            )
        )
        if not row["memory_source"].endswith(f"memory_gb = {row['memory_bytes'] / _GB:g}"):
            notes.append(
                f"{row['target']}: {row['memory_source']} ({row['memory_bytes'] / _GB:.1f} GB)"
            )
        notes.extend(note for note in row["notes"] if note not in notes)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        cells = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    if capped:
        notes.append(f"* memory alone; beyond the model's {shape.max_positions:,} positions")
    lines.extend(f"note: {note}" for note in notes)
    lines.extend(_compile_lines(rows))
    return "\n".join(lines)


def _compile_lines(rows: list[dict[str, Any]]) -> list[str]:
    """What `fdec compile` would take on this machine per target (fdec.compile.footprint)."""
    known = [row for row in rows if "peak_rss_bytes" in row.get("compile", {})]
    if not known:
        return []
    available = known[0]["compile"]["available_bytes"]
    lines = [f"compiling here ({available / _GIB:.1f} GiB of memory available):"]
    for row in known:
        figures = row["compile"]
        disk = ", ".join(
            f"{size / _GB:.1f} GB in {folder}" for folder, size in figures["disk_bytes"].items()
        )
        front = "streamed" if figures["streamed"] else "whole model"
        lines.append(
            f"  {row['target']} --quantize {figures['quantize']}: {front}, peak RSS about "
            f"{figures['peak_rss_bytes'] / _GIB:.1f} GiB, disk {disk or '-'}"
            + ("" if figures["fits"] else f" (DOES NOT FIT: {figures['problem']})")
        )
    return lines
