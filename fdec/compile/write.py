"""Write: the build's report (report.json, report.html) and manifest (fdec-build.json).

Called inside the build's AtomicBuild: the files land in the staging folder, which moves into
place only when everything is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from fdec.build import write_manifest
from fdec.frontend.prequantized import SOURCE_KEY
from fdec.lower import RUNTIME_CONFIG
from fdec.pipeline import PassRecord
from fdec.report import REPORT_FILE, SCHEMA_VERSION, environment
from fdec.report.html import HTML_FILE, render_html
from fdec.report.roofline import estimate

__all__ = ["Addition", "write_build"]

#: A step adding files and report entries to a build before its report is written (the pruned
#: student's checkpoint, the draft build).
Addition = Callable[[pathlib.Path, dict[str, Any]], None]


def write_build(
    staging: pathlib.Path,
    *,
    settings: Any,
    source: Any,
    spec: Any,
    front: Any,
    optimized: Any,
    lowered: Any,
    verification: dict[str, Any],
    engines: list[dict[str, Any]],
    capacity: Any,
    started: float,
    additions: Sequence[Addition] = (),
) -> dict[str, Any]:
    """Write report.json, report.html and fdec-build.json into `staging`; the report."""
    options, target, recipe = settings.options, settings.target, settings.recipe
    records, stats_cache = optimized.records, optimized.calibration_cache
    counts = lowered.counts
    kv_cache = json.loads((staging / RUNTIME_CONFIG).read_text()).get("kv_cache")
    report = {
        "schema_version": SCHEMA_VERSION,
        "source": {
            "given": source.given,
            "kind": source.kind,
            "folder": str(source.folder),
            "family": spec.family,
            "architecture": spec.architecture,
            "config_sha256": config_digest(source.folder),
            # a GPTQ / AWQ / compressed-tensors int4 checkpoint read as its float values
            "quantized_by": source.config.get(SOURCE_KEY),
        },
        "target": target.to_dict(),
        "backend": settings.backend.name,
        "limits": dataclasses.asdict(settings.limits),
        "spec": spec.to_dict(),
        "environment": environment(),
        "pipeline": recipe.pass_names,
        "recipe": {"quantize": settings.quantize, "chosen_by": settings.chosen_by},
        "calibration_cache": stats_cache.to_dict()
        if stats_cache is not None and stats_cache.hits + stats_cache.misses
        else None,
        "export": front.export_info,
        "passes": _pass_rows(records, front.resumed),
        "cache": front.to_dict(),
        "verification": verification,
        "engines": engines,
        "checkpoint": lowered.checkpoint,
        "capacity": capacity.to_dict(),
        "kv_cache": kv_cache,
        # The models shipped and what each computes in (the ONNX Runtime model, then each
        # backend's typed TensorRT model), and the CUDA kernel check of GPU builds.
        "models": lowered.models + _typed_models(engines),
        "cuda_placement": lowered.cuda_placement,
        "estimate": estimate(
            spec,
            target,
            weight_bytes=counts.bytes,
            parameters=counts.parameters,
            gathered_bytes=lowered.gathered_bytes,
            **_launches(counts.nodes, engines),
            kv_bytes_per_value=_KV_ITEM_BYTES.get((kv_cache or {}).get("dtype"), 4),
        ),
        "wall_s": round(time.perf_counter() - started, 2),
    }
    for addition in additions:
        addition(staging, report)
    (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    (staging / HTML_FILE).write_text(render_html(report))  # hashed in the manifest below
    manifest = write_manifest(
        staging,
        {
            "schema_version": SCHEMA_VERSION,
            # Everything the build was made from: the same inputs, options and versions
            # give the same model files (fdec verify re-hashes the outputs below).
            "inputs": {
                "model": report["source"]["given"],
                "config_sha256": report["source"]["config_sha256"],
                "files": front.inputs,
                "calibration": front.calibration,
            },
            "target": target.name,
            "pipeline": recipe.pass_names,
            "passes": [{"name": r.name, "options": r.options} for r in records],
            "options": {
                "verify_each": options.verify_each,
                "backend": settings.backend.name,
                "quantize": settings.quantize,
                "limits": dataclasses.asdict(settings.limits),
                "max_ppl_increase": options.max_ppl_increase,
                "keep_fp": options.keep_fp,
                "emit": list(options.emit),
                "sparsity": options.sparsity,
                "draft": options.draft,
            },
            "packages": report["environment"]["packages"],
            "versions": front.versions,
            "cache_keys": {"export": front.export_key, "passes": front.pass_keys},
        },
    )
    report["outputs"] = json.loads(manifest.read_text())["outputs"]
    return report


_KV_ITEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "float8_e4m3fn": 1}


def _launches(nodes: int, engines: list[dict[str, Any]]) -> dict[str, Any]:
    """What the roofline's per-step floor and math come from: a built engine's own listing
    (its decode profile's kernels, its GEMMs' precision); with engines planned but not built
    here, the fused graph's nodes per layer (the Q/DQ graph's nodes are not what runs); else
    the ONNX Runtime graph's nodes."""
    for engine in engines:
        kernels = engine.get("kernels") if engine.get("status") == "built" else None
        if kernels:
            return {
                "nodes": kernels.get("generation", list(kernels.values())[-1]),
                "nodes_from": f"{engine.get('backend')} engine listing, decode profile kernels",
                "math": (engine.get("engine_precision") or {}).get("precision"),
            }
    return {"nodes": None} if engines else {"nodes": nodes}


def _typed_models(engines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The strongly typed TensorRT models the engine records carry, as `models` rows."""
    rows = []
    for engine in engines:
        typed = engine.get("typed_model")
        if typed and typed.get("model") not in (row["file"] for row in rows):
            rows.append({"file": typed["model"], "runs_on": "TensorRT (engines built from it)",
                         "compute": typed.get("dtype"),
                         "summary": " + ".join(typed.get("precisions") or [])})  # fmt: skip
    return rows


def config_digest(folder: pathlib.Path) -> str:
    """sha256 of the folder's config.json ("" without one): report.json `source.config_sha256`."""
    path = folder / "config.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


def _pass_rows(records: list[PassRecord], cached: int) -> list[dict[str, Any]]:
    """The report's pass table: the first `cached` passes came from the cache (no time spent
    now; `cached_wall_s` is what they took when they ran)."""
    rows = []
    for number, record in enumerate(records):
        row = {**record.to_dict(), "cached": number < cached}
        if row["cached"]:
            row["cached_wall_s"], row["wall_s"] = row["wall_s"], 0.0
        rows.append(row)
    return rows
