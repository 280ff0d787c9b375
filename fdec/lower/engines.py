"""Engine backends for GPU targets: which to build, where it is deployable and where a check.

Both engine backends build from the strongly typed TensorRT model, engines/tensorrt/model.onnx
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
import tempfile
from collections.abc import Callable
from typing import Any

from fdec.errors import CompileError, InputError
from fdec.ir import ModelSpec
from fdec.lower.profiles import ShapeLimits
from fdec.lower.tensorrt_model import TYPED_MODEL, prepare_tensorrt_model

__all__ = ["RTX_ENGINE_DIR", "build_engines", "finish_deferred_engines"]

logger = logging.getLogger(__name__)

RTX_ENGINE_DIR = "engines/tensorrt-rtx"


def _rtx(
    onnx_path: pathlib.Path,
    out_dir: pathlib.Path,
    *,
    spec: ModelSpec,
    target: Any,
    limits: ShapeLimits,
    purpose: str,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    from fdec.lower import tensorrt_rtx

    cc = ".".join(map(str, target.compute_capability))
    if tuple(target.compute_capability) not in tensorrt_rtx.RTX_COMPUTE_CAPABILITIES:
        supported = ", ".join(".".join(map(str, c)) for c in tensorrt_rtx.RTX_COMPUTE_CAPABILITIES)
        return {"backend": "tensorrt-rtx", "status": "not-applicable", "purpose": purpose,
                "compute_capability": cc,
                "reason": f"TensorRT-RTX compiles for {supported}; {target.name} is {cc}"}  # fmt: skip
    if tensorrt_rtx.available() is None:
        progress(f"building a TensorRT-RTX engine for sm {cc} ({purpose})")
    # Unavailable: a "deferred" result that keeps the profiles, so build-engine can finish it.
    result = tensorrt_rtx.build_engine(
        onnx_path, out_dir, spec=spec, limits=limits,
        compute_capability=tuple(target.compute_capability), purpose=purpose, progress=progress,
    )  # fmt: skip
    record = {"backend": "tensorrt-rtx", "model": TYPED_MODEL, **result.to_dict()}
    if purpose == "check":
        record["engine"] = None  # built to prove the graph compiles; not part of the build
    return record


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
    """Write the strongly typed TensorRT model, then plan or build the engines from it.

    `reference` and `tolerance` (fdec.verify.Reference, the build's Tolerance) check the typed
    model against the source model. Returns the report's engine records (the first carries the
    typed model's record under "typed_model"); raises CompileError when a deployable engine
    fails or the typed model misses its tolerance.
    """
    if not target.is_gpu or backend == "onnxruntime":
        return []
    if backend not in ("tensorrt", "tensorrt-rtx"):
        raise CompileError(
            f"unknown backend {backend!r}", "use onnxruntime, tensorrt or tensorrt-rtx"
        )
    typed = prepare_tensorrt_model(
        build_dir, target=target, spec=spec, reference=reference, tolerance=tolerance,
        progress=progress,
    )  # fmt: skip
    onnx_path = build_dir / TYPED_MODEL
    records: list[dict[str, Any]] = []
    if backend == "tensorrt":
        from fdec.lower import tensorrt

        plan = tensorrt.plan_engine(build_dir, spec=spec, target=target, limits=limits)
        if tensorrt.tensorrt_available() is None:
            wanted = ".".join(map(str, target.compute_capability))  # visible_gpus: "9.0"
            gpus = tensorrt.visible_gpus()
            here = [gpu for gpu in gpus if gpu["compute_capability"] == wanted]
            if here:
                progress(f"building the TensorRT engine on {here[0]['name']}")
                plan = tensorrt.build_planned_engine(build_dir, progress=progress)
            else:
                names = ", ".join(f"{g['name']} ({g['compute_capability']})" for g in gpus)
                plan.reason = f"the GPUs here ({names}) are not a {target.name}"
        records.append(tensorrt.engine_report(plan))
        with tempfile.TemporaryDirectory(prefix="fdec-rtx-check-") as scratch:
            records.append(
                _rtx(
                    onnx_path,
                    pathlib.Path(scratch),
                    spec=spec,
                    target=target,
                    limits=limits,
                    purpose="check",
                    progress=progress,
                )
            )
    else:
        out_dir = build_dir / RTX_ENGINE_DIR
        out_dir.mkdir(parents=True, exist_ok=True)
        record = _rtx(onnx_path, out_dir, spec=spec, target=target, limits=limits,
                      purpose="deployable", progress=progress)  # fmt: skip
        if record["status"] in ("failed", "unsupported"):
            raise CompileError(
                f"TensorRT-RTX could not build the engine for {target.name}: "
                f"{record.get('reason') or record['status']}",
                "see the unsupported nodes in the message, or compile with --backend onnxruntime",
            )
        if record.get("engine"):
            record["engine"] = f"{RTX_ENGINE_DIR}/{record['engine']}"
        records.append(record)
    records[0]["typed_model"] = typed
    return records


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
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
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
