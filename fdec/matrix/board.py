"""A run's rows (cells done, running, failed), written to matrix.json and matrix.html after each change."""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections.abc import Mapping
from typing import Any

from fdec.errors import EXIT_OK
from fdec.matrix.file import Matrix
from fdec.matrix.page import render_page
from fdec.matrix.plan import Cell

__all__ = ["PAGE_FILE", "RESULTS_FILE", "Board", "count_attempts", "previous_rows", "record"]

RESULTS_FILE = "matrix.json"
PAGE_FILE = "matrix.html"


class Board:
    """The rows of a run: cells done, running and failed, written to OUT after each change."""

    def __init__(self, matrix: Matrix, cells: list[Cell], executor: str, address: str | None):
        self.matrix = matrix
        self.cells = cells
        self.started = time.perf_counter()
        self.rows: dict[str, dict[str, Any]] = {
            cell.id: {
                "cell": cell.id, "model": cell.model_label, "target": cell.target_name,
                "recipe": cell.recipe, "out": str(cell.out.relative_to(matrix.out)),
                "status": "pending", "exit_code": None, "digest": cell.digest,
                "resources": {"memory_bytes": cell.memory_bytes},
            }
            for cell in cells
        }  # fmt: skip
        self.meta = {
            "matrix": str(matrix.source), "out": str(matrix.out), "executor": executor,
            "address": address, "models": list(matrix.models),
            "targets": list(dict.fromkeys(cell.target_name for cell in cells)),
            "recipes": [recipe.name for recipe in matrix.recipes],
        }  # fmt: skip
        self.running = 0
        self.active = "running"  # Ray: submitted tasks may wait for a free CPU

    def counts(self) -> dict[str, int]:
        statuses = [row["status"] for row in self.rows.values()]
        return {s: statuses.count(s) for s in ("ok", "up-to-date", "failed", "pending")}

    def line(self) -> str:
        c = self.counts()
        done = c["ok"] + c["up-to-date"] + c["failed"]
        return f"{done}/{len(self.rows)} done, {self.running} {self.active}, {c['failed']} failed"

    def results(self) -> dict[str, Any]:
        from fdec.api import worst_exit_code

        codes = [row["exit_code"] for row in self.rows.values() if row["exit_code"] is not None]
        code = worst_exit_code(codes)
        return {
            **self.meta,
            "ok": code == EXIT_OK and all(r["status"] != "pending" for r in self.rows.values()),
            "exit_code": code,
            "wall_s": round(time.perf_counter() - self.started, 2),
            "counts": self.counts(),
            "cells": list(self.rows.values()),
        }

    def save(self) -> dict[str, Any]:
        results = self.results()
        out = self.matrix.out
        out.mkdir(parents=True, exist_ok=True)
        for name, text in (
            (RESULTS_FILE, json.dumps(results, indent=2) + "\n"),
            (PAGE_FILE, render_page(results)),
        ):
            partial = out / f".{name}.{os.getpid()}.partial"
            partial.write_text(text)
            os.replace(partial, out / name)
        return results


def previous_rows(out: pathlib.Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads((out / RESULTS_FILE).read_text())
        return {row["cell"]: row for row in data.get("cells", []) if isinstance(row, dict)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def count_attempts(task: Mapping[str, Any]) -> int:
    try:
        return len(pathlib.Path(task["attempts"]).read_text().splitlines())
    except OSError:
        return 0


def record(board: Board, cell: Cell, row: dict[str, Any], attempts: int, progress) -> None:
    board.rows[cell.id].update(row, attempts=attempts)
    board.save()
    status = row["status"]
    detail = f" ({row['error']})" if row.get("error") else ""
    progress(f"{cell.id}: {status} in {row.get('wall_s', 0):.1f} s{detail} [{board.line()}]")
