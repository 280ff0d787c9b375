"""Running a matrix: cells already built are kept, the others built with an executor (local or ray)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fdec.errors import EXIT_OK, UsageError
from fdec.matrix.board import Board, count_attempts, previous_rows, record
from fdec.matrix.execute import execute_cell, up_to_date
from fdec.matrix.file import Matrix
from fdec.matrix.plan import Cell
from fdec.matrix.ray_executor import require_ray, run_ray

__all__ = ["EXECUTORS", "run_matrix"]

EXECUTORS = ("local", "ray")


def run_matrix(
    matrix: Matrix,
    cells: list[Cell],
    *,
    executor: str = "local",
    address: str | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Build `cells` (from plan_matrix) with `executor`; returns the results (matrix.json's
    content) after writing them to matrix.out. Cells already built with unchanged inputs are
    not built again; failed cells do not stop the others."""
    if executor not in EXECUTORS:
        raise UsageError(f"unknown executor {executor!r}", f"use one of: {', '.join(EXECUTORS)}")
    if executor == "ray":
        require_ray()
    previous = previous_rows(matrix.out)
    board = Board(matrix, cells, executor, address)
    to_build = []
    for cell in cells:
        row = up_to_date(cell, previous.get(cell.id))
        if row is None:
            to_build.append(cell)
            continue
        kept = previous[cell.id]
        board.rows[cell.id].update(
            row, status="up-to-date", exit_code=EXIT_OK, error=None,
            wall_s=0.0, attempts=0, built_wall_s=kept.get("built_wall_s", kept.get("wall_s")),
        )  # fmt: skip
    skipped = len(cells) - len(to_build)
    if skipped:
        progress(f"{skipped} of {len(cells)} cells up to date (whole builds, inputs unchanged)")
    if not to_build:
        board.meta["executor"] = f"{executor} (not started: nothing to build)"
        return board.save()
    board.save()
    if executor == "local":
        _run_local(matrix, to_build, board, progress)
    else:
        run_ray(matrix, to_build, board, address, progress)
    return board.save()


def _run_local(matrix: Matrix, cells: list[Cell], board: Board, progress) -> None:
    for cell in cells:
        board.running = 1
        progress(f"{cell.id}: building [{board.line()}]")
        task = cell.task(matrix.out)
        row = execute_cell(task)
        board.running = 0
        record(board, cell, row, count_attempts(task), progress)
