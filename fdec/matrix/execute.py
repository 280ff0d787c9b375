"""Building one cell with `fdec.compile`, in this process or on a Ray worker, and the row it gives."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any

from fdec.errors import EXIT_FAILURE, EXIT_OK, FdecError
from fdec.matrix.plan import Cell

__all__ = ["execute_cell", "row_from_build", "up_to_date"]

logger = logging.getLogger(__name__)


def row_from_build(folder: pathlib.Path) -> dict[str, Any]:
    """A build's figures for its matrix row: size, perplexity, speed, engines."""
    from fdec.build import MANIFEST, sha256_file

    report = json.loads((folder / "report.json").read_text())
    manifest_path = folder / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    numeric = (report.get("verification") or {}).get("numeric") or {}
    before, after = numeric.get("perplexity_source"), numeric.get("perplexity_build")
    measured = None
    bench_path = folder / "bench.json"
    if bench_path.is_file():
        try:
            rows = json.loads(bench_path.read_text()).get("rows") or []
            measured = next((r["decode_tok_s"] for r in rows if r.get("batch") == 1), None)
        except (OSError, ValueError, KeyError, TypeError):
            measured = None
    return {
        "quantize": (report.get("recipe") or {}).get("quantize"),
        "backend": report.get("backend"),
        "bytes": sum(int(item["bytes"]) for item in manifest.get("outputs", {}).values()),
        "perplexity_source": before,
        "perplexity_build": after,
        "ppl_increase": after / before - 1.0 if before and after else None,
        "top1_agreement": numeric.get("top1_agreement"),
        "estimated_decode_tok_s": (report.get("estimate") or {}).get("decode_tokens_per_s"),
        "measured_decode_tok_s": measured,
        "engines": [  # "check": built to prove the graph compiles there, not shipped
            {"backend": e.get("backend"), "status": e.get("status"), "purpose": e.get("purpose")}
            for e in report.get("engines") or []
            if e.get("status") != "not-applicable"
        ],
        "export_cached": (report.get("export") or {}).get("cached"),
        "build_wall_s": report.get("wall_s"),
        "manifest_sha256": sha256_file(manifest_path),
        "manifest_inputs": (manifest.get("inputs") or {}).get("files"),
    }


def execute_cell(task: Mapping[str, Any]) -> dict[str, Any]:
    """Build one cell (a `Cell.task`) with `fdec.compile`; never raises for a failed build:
    the row says what happened. Runs in the driver (local) or in a Ray worker."""
    from fdec.api import compile as fdec_compile

    started = time.perf_counter()
    log_path = pathlib.Path(task["log"])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    worker: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # a Ray worker: which node built the cell
        worker["node"] = ray.get_runtime_context().get_node_id()
    with open(task["attempts"], "a") as attempts:  # one line per attempt (a retry adds one)
        attempts.write(json.dumps({**worker, "started": time.time()}) + "\n")
    row: dict[str, Any] = {"worker": worker}
    with log_path.open("a") as log:
        log.write(f"--- {task['id']}: attempt by pid {worker['pid']} on {worker['host']}\n")

        def progress(message: str) -> None:
            log.write(f"[{time.perf_counter() - started:7.1f}s] {message}\n")
            log.flush()

        try:
            build = fdec_compile(
                task["model"], task["target"], task["out"], progress=progress, **task["options"]
            )
            figures = row_from_build(build.path)
            figures.pop("manifest_inputs")
            row.update(status="ok", exit_code=EXIT_OK, error=None, **figures)
        except FdecError as err:
            row.update(status="failed", exit_code=err.exit_code, error=err.one_line())
        except Exception as err:  # a bug: the row says so, the other cells go on
            logger.exception("cell %s", task["id"])
            row.update(
                status="failed", exit_code=EXIT_FAILURE,
                error=f"internal error {type(err).__name__}: {err}",
            )  # fmt: skip
        progress(f"{row['status']}" + (f": {row['error']}" if row.get("error") else ""))
    row["wall_s"] = round(time.perf_counter() - started, 2)
    return row


def up_to_date(cell: Cell, previous: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The build's row when the cell's build is whole and its inputs unchanged, else None."""
    from fdec.build import MANIFEST, verify_build

    if not previous or previous.get("status") not in ("ok", "up-to-date"):
        return None
    if previous.get("digest") != cell.digest or not (cell.out / MANIFEST).is_file():
        return None
    try:
        row = row_from_build(cell.out)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if row["manifest_sha256"] != previous.get("manifest_sha256"):
        return None  # rebuilt or edited since the matrix recorded it
    if row.pop("manifest_inputs") != cell.inputs:
        return None  # the model's files changed
    if not verify_build(cell.out)["ok"]:
        return None  # a missing or changed output
    return row
