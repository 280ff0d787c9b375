"""Engine backends for GPU targets: which to build, where it is deployable and where a check.

- `tensorrt` (datacenter GPUs): a complete build plan and command; the engine is built where
  TensorRT and a GPU exist, else marked deferred (`fdec build-engine BUILD` builds it later).
- `tensorrt-rtx` (GeForce RTX targets): a real engine built ahead of time on this CPU.
- Other GPUs whose compute capability TensorRT-RTX compiles for: the same build as a check
  that the graph parses and compiles for that architecture; not shipped.
"""

from __future__ import annotations

import logging
import pathlib
import tempfile
from collections.abc import Callable
from typing import Any

from fdec.errors import CompileError
from fdec.ir import ModelSpec
from fdec.lower.profiles import ShapeLimits

__all__ = ["build_engines"]

logger = logging.getLogger(__name__)


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
    reason = tensorrt_rtx.available()
    if reason is not None:
        return {"backend": "tensorrt-rtx", "status": "deferred", "purpose": purpose,
                "compute_capability": cc, "reason": reason}  # fmt: skip
    if tuple(target.compute_capability) not in tensorrt_rtx.RTX_COMPUTE_CAPABILITIES:
        supported = ", ".join(".".join(map(str, c)) for c in tensorrt_rtx.RTX_COMPUTE_CAPABILITIES)
        return {"backend": "tensorrt-rtx", "status": "not-applicable", "purpose": purpose,
                "compute_capability": cc,
                "reason": f"TensorRT-RTX compiles for {supported}; {target.name} is {cc}"}  # fmt: skip
    progress(f"building a TensorRT-RTX engine for sm {cc} ({purpose})")
    result = tensorrt_rtx.build_engine(
        onnx_path, out_dir, spec=spec, limits=limits,
        compute_capability=tuple(target.compute_capability), purpose=purpose, progress=progress,
    )  # fmt: skip
    record = {"backend": "tensorrt-rtx", **result.to_dict()}
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
    precisions: tuple[str, ...] = (),
    progress: Callable[[str], None] = lambda message: None,
) -> list[dict[str, Any]]:
    """Engine records for the report; raises CompileError when a deployable engine fails.

    `precisions` are TensorRT builder flags for the Q/DQ precisions the graph carries.
    """
    if not target.is_gpu or backend == "onnxruntime":
        return []
    onnx_path = build_dir / "model.onnx"
    records: list[dict[str, Any]] = []
    if backend == "tensorrt":
        from fdec.lower import tensorrt

        plan = tensorrt.plan_engine(
            build_dir, spec=spec, target=target, limits=limits, precisions=list(precisions)
        )
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
    elif backend == "tensorrt-rtx":
        out_dir = build_dir / "engines" / "tensorrt-rtx"
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
            record["engine"] = str(pathlib.Path("engines/tensorrt-rtx") / record["engine"])
        records.append(record)
    else:
        raise CompileError(
            f"unknown backend {backend!r}", "use onnxruntime, tensorrt or tensorrt-rtx"
        )
    return records
