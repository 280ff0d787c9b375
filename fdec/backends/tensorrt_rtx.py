"""The TensorRT-RTX backend (GeForce RTX targets): a real engine built ahead of time on this CPU."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

from fdec.errors import CompileError

__all__ = ["BACKEND", "ENGINE_DIR", "TensorRtRtxBackend", "rtx_engine"]

ENGINE_DIR = "engines/tensorrt-rtx"


def rtx_engine(
    onnx_path: pathlib.Path,
    out_dir: pathlib.Path,
    *,
    spec: Any,
    target: Any,
    limits: Any,
    purpose: str,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Build a TensorRT-RTX engine for `target` ("deployable", or a "check" that the graph
    parses and compiles for its architecture); its record for the report."""
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


@dataclasses.dataclass(frozen=True)
class TensorRtRtxBackend:
    name: str = "tensorrt-rtx"
    gpu_only: bool = True
    graph_form: str = "tensorrt"
    op_domains: tuple[str, ...] = ("",)
    providers: tuple[str, ...] = ("NvTensorRTRTXExecutionProvider",)
    fixed_shapes: bool = True
    files: tuple[str, ...] = (ENGINE_DIR,)
    verifies_here: str = "model.onnx in ONNX Runtime on this CPU; the engine is built here"

    def prepare_passes(self, **context: Any) -> list[Any]:
        return []

    def build_engines(
        self,
        build_dir: pathlib.Path,
        *,
        spec: Any,
        target: Any,
        limits: Any,
        precisions: tuple[str, ...] = (),
        progress: Callable[[str], None] = lambda message: None,
    ) -> list[dict[str, Any]]:
        out_dir = build_dir / ENGINE_DIR
        out_dir.mkdir(parents=True, exist_ok=True)
        record = rtx_engine(build_dir / "model.onnx", out_dir, spec=spec, target=target,
                            limits=limits, purpose="deployable", progress=progress)  # fmt: skip
        if record["status"] in ("failed", "unsupported"):
            raise CompileError(
                f"TensorRT-RTX could not build the engine for {target.name}: "
                f"{record.get('reason') or record['status']}",
                "see the unsupported nodes in the message, or compile with --backend onnxruntime",
            )
        if record.get("engine"):
            record["engine"] = str(pathlib.Path(ENGINE_DIR) / record["engine"])
        return [record]


BACKEND = TensorRtRtxBackend()
