"""Engine backends for GPU targets: which to build, where it is deployable and where a check.

Each backend's engine code is its object in fdec.backends (tensorrt, tensorrt_rtx); this
module dispatches to it and finishes deferred engines (`fdec build-engine`). Both engine
backends build from the strongly typed TensorRT model, engines/tensorrt/model.onnx
(`fdec.lower.tensorrt_model.prepare_tensorrt_model`: the verified graph typed in fp16/bf16
with its Q/DQ, checked against the source model), never from the ONNX Runtime model:

- `tensorrt` (datacenter GPUs): a complete build plan and command; the engine is built where
  TensorRT and a GPU exist, else marked deferred (`fdec build-engine BUILD` builds it later).
- `tensorrt-rtx` (GeForce RTX targets): a real engine built ahead of time on this CPU.
- Other GPUs whose compute capability TensorRT-RTX compiles for: the same build as a check
  that the graph parses and compiles for that architecture; not shipped.
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Callable
from typing import Any

from fdec.backends import get_backend
from fdec.build import read_build_json
from fdec.errors import CompileError, InputError
from fdec.ir import ModelSpec
from fdec.lower.profiles import ShapeLimits
from fdec.lower.tensorrt_model import TYPED_MODEL

__all__ = ["RTX_ENGINE_DIR", "build_engines", "finish_deferred_engines"]

logger = logging.getLogger(__name__)

RTX_ENGINE_DIR = "engines/tensorrt-rtx"  # fdec.backends.tensorrt_rtx.ENGINE_DIR


def build_engines(
    build_dir: pathlib.Path,
    *,
    spec: ModelSpec,
    target: Any,
    backend: str,
    limits: ShapeLimits,
    reference: Any = None,
    tolerance: Any = None,
    progress: Callable[[str], None] = lambda message: None,
) -> list[dict[str, Any]]:
    """The backend's engines (fdec.backends): for TensorRT and TensorRT-RTX, the strongly typed
    TensorRT model written and checked, then the engines planned or built from it.

    `reference` and `tolerance` (fdec.verify.Reference, the build's Tolerance) check the typed
    model against the source model. Returns the report's engine records (the first carries the
    typed model's record under "typed_model"); raises CompileError when a deployable engine
    fails or the typed model misses its tolerance.
    """
    if not target.is_gpu:
        return []
    return get_backend(backend).build_engines(
        build_dir, spec=spec, target=target, limits=limits, reference=reference,
        tolerance=tolerance, progress=progress,
    )  # fmt: skip


def finish_deferred_engines(
    build_dir: str | pathlib.Path, progress: Callable[[str], None] = lambda message: None
) -> list[dict[str, Any]]:
    """Build a build's deferred engines here: the TensorRT plan (needs TensorRT and the GPU)
    and a deployable TensorRT-RTX engine (needs tensorrt-rtx). Updates plan.json and the
    engine records of report.json; returns the records of the engines it built.

    Raises the builder's FdecError when an engine cannot be built here, InputError when the
    build has no deferred engine.
    """
    from fdec.lower import tensorrt

    build_dir = pathlib.Path(build_dir)
    report_path = build_dir / "report.json"
    report = read_build_json(report_path) if report_path.is_file() else {}
    records = report.get("engines") or []
    done: list[dict[str, Any]] = []
    for index, record in enumerate(records):
        if record.get("backend") != "tensorrt-rtx" or record.get("status") != "deferred":
            continue
        if record.get("purpose") != "deployable":
            continue
        done.append(_finish_rtx(build_dir, record, build_dir / TYPED_MODEL, progress))
        records[index] = {**done[-1], "typed_model": record.get("typed_model")}
        if record.get("typed_model") is None:
            records[index].pop("typed_model")
    if (build_dir / tensorrt.ENGINE_DIR / tensorrt.PLAN_FILE).is_file():
        plan = tensorrt.read_plan(build_dir)
        if plan.status != "built":
            plan = tensorrt.build_planned_engine(build_dir, progress=progress)
            built = tensorrt.engine_report(plan)
            done.append(built)
            for index, record in enumerate(records):
                if record.get("backend") == "tensorrt":
                    records[index] = {**built, "typed_model": record.get("typed_model")}
    if not done:
        raise InputError(
            f"{build_dir} has no deferred engine",
            "compile for a GPU target (--target h100, --target rtx4090) to plan an engine",
        )
    if report:
        report["engines"] = records
        tmp = report_path.with_name(f".{report_path.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(report_path)
    return done


def _finish_rtx(
    build_dir: pathlib.Path,
    record: dict[str, Any],
    onnx_path: pathlib.Path,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    from fdec.lower import tensorrt_rtx
    from fdec.lower.profiles import Profile

    reason = tensorrt_rtx.available()
    if reason is not None:
        raise CompileError(
            f"cannot build the TensorRT-RTX engine here: {reason}",
            "install it (pip install 'fdec[rtx]') and run fdec build-engine again",
        )
    cc = tuple(int(part) for part in record["compute_capability"].split("."))
    profiles = [
        Profile(
            name=entry["name"],
            shapes={
                name: (tuple(dims["min"]), tuple(dims["opt"]), tuple(dims["max"]))
                for name, dims in entry["shapes"].items()
            },
        )
        for entry in record.get("profiles") or []
    ]
    result = tensorrt_rtx.build_engine(
        onnx_path, build_dir / RTX_ENGINE_DIR, spec=None, limits=None, profiles=profiles,
        compute_capability=cc, progress=progress,
    )  # fmt: skip
    if result.status != "built":
        raise CompileError(
            f"TensorRT-RTX could not build the engine: {result.reason or result.status}",
            "see the unsupported nodes in the message, or compile with --backend onnxruntime",
        )
    built = {"backend": "tensorrt-rtx", "model": TYPED_MODEL, **result.to_dict()}
    built["engine"] = f"{RTX_ENGINE_DIR}/{result.engine}"
    return built
