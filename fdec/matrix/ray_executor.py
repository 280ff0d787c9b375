"""The ray executor: cells as Ray tasks on a local or remote cluster, each declaring what it needs."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from fdec.errors import EXIT_FAILURE, EXIT_USAGE, UsageError
from fdec.matrix.board import Board, count_attempts, record
from fdec.matrix.execute import execute_cell
from fdec.matrix.file import Matrix
from fdec.matrix.plan import GIB, Cell

__all__ = ["require_ray", "run_ray"]

# Cells return a small dict; builds travel through shared storage, never the object store.
_OBJECT_STORE_BYTES = 100 * 2**20


def require_ray() -> None:
    """A UsageError (exit 2) saying how to install Ray when it is missing."""
    try:
        found = importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise UsageError(
            "--executor ray needs Ray, which is not installed",
            "pip install 'fdec[ray]' (or use --executor local)",
        )


def _is_loopback(address: str | None) -> bool:
    if not address:
        return True
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def _gpu_options(cell: Cell, resources: Mapping[str, float]) -> dict[str, Any]:
    """A GPU for a cell that builds a TensorRT engine, when the cluster has the target's GPU
    (Ray names nodes' GPUs `accelerator_type:H100`, ...); elsewhere the cell runs on CPUs and
    its engine is planned and marked deferred, as fdec compile does without that GPU."""
    if cell.gpu_name is None or not resources.get("GPU"):
        return {}
    want = cell.gpu_name.lower().replace("-", "")
    for name in resources:
        kind = name.partition("accelerator_type:")[2]
        if kind and kind.lower().replace("-", "").startswith(want):
            return {"num_gpus": 1, "resources": {name: 0.001}}
    return {}


def _start_ray(address: str | None, progress) -> Any:
    """Connect to the cluster at `address` ($RAY_ADDRESS when None), or start a local one."""
    if _is_loopback(address or os.environ.get("RAY_ADDRESS")):
        # Ray binds a node to the host's outward address unless it runs as a single-machine
        # cluster; this keeps a local cluster (and a driver joining one) on loopback.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        progress(f"connecting to the Ray cluster at {target}")
        ray.init(address=target, logging_level=logging.WARNING, log_to_driver=False)
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        progress(f"starting a local Ray cluster ({os.cpu_count()} CPUs, no dashboard)")
        ray.init(
            num_cpus=os.cpu_count(),
            object_store_memory=_OBJECT_STORE_BYTES,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    return ray


def run_ray(matrix: Matrix, cells: list[Cell], board: Board, address: str | None, progress) -> None:
    # Ray's driver prints the cluster's messages (a worker died, ...) on stdout, which is
    # fdec's own (--json): they go to stderr with the progress lines.
    with contextlib.redirect_stdout(sys.stderr):
        ray = _start_ray(address, progress)
        board.active = "running or queued"
        try:
            _schedule(ray, matrix, cells, board, progress)
        finally:
            ray.shutdown()


def _schedule(ray: Any, matrix: Matrix, cells: list[Cell], board: Board, progress) -> None:
    """Submit each model's first cell, and its other cells once it ends; gather the rows."""
    resources = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    largest = {
        key: max((n["Resources"].get(key, 0.0) for n in nodes), default=0.0)
        for key in ("CPU", "memory")
    }
    progress(
        f"Ray cluster: {len(nodes)} nodes, {resources.get('CPU', 0):g} CPUs, "
        f"{resources.get('GPU', 0):g} GPUs"
    )
    # Each cell in a fresh worker process (max_calls=1): a compile's memory is returned to
    # the node when it ends, and no state outlives a cell (like one `fdec compile` each).
    remote = ray.remote(max_calls=1)(execute_cell)
    pending: dict[Any, Cell] = {}
    waiting: dict[str, list[Cell]] = {}  # model -> cells that start after its first cell
    leaders: set[str] = set()

    def submit(cell: Cell) -> None:
        too_big = [
            f"{need:.1f} {unit} of {key}" for key, need, unit, scale in (
                ("memory", cell.memory_bytes / GIB, "GiB", GIB),
                ("CPU", matrix.cpus_per_cell, "CPUs", 1),
            ) if need * scale > largest[key]
        ]  # fmt: skip
        if too_big:
            row = {
                "status": "failed", "exit_code": EXIT_USAGE, "wall_s": 0.0,
                "error": f"the cell needs {' and '.join(too_big)}, more than any node of "
                f"the Ray cluster offers; add a larger node, or set [matrix] memory_gb / "
                f"cpus_per_cell",
            }  # fmt: skip
            record(board, cell, row, 0, progress)
            return
        options = {
            "num_cpus": matrix.cpus_per_cell, "memory": cell.memory_bytes,
            "max_retries": matrix.retries, "retry_exceptions": False,
            **_gpu_options(cell, resources),
        }  # fmt: skip
        board.rows[cell.id]["resources"] = {
            k: options[k] for k in ("num_cpus", "memory", "num_gpus") if k in options
        }
        task = cell.task(matrix.out)
        pending[remote.options(**options).remote(task)] = cell
        board.running = len(pending)
        progress(f"{cell.id}: submitted [{board.line()}]")

    for cell in cells:
        if cell.model_label in leaders:
            waiting.setdefault(cell.model_label, []).append(cell)
        else:
            leaders.add(cell.model_label)
            submit(cell)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            cell = pending.pop(ref)
            board.running = len(pending)
            task = cell.task(matrix.out)
            try:
                row = ray.get(ref)
            except ray.exceptions.RayError as err:  # the worker died on every attempt
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                row = {
                    "status": "failed", "exit_code": EXIT_FAILURE, "wall_s": None,
                    "error": f"{type(err).__name__} after {count_attempts(task)} attempts: "
                    f"{first[:200]}",
                }  # fmt: skip
            record(board, cell, row, count_attempts(task), progress)
            for follower in waiting.pop(cell.model_label, []):
                submit(follower)  # the front is in the cache now
