"""The TensorRT backend (datacenter GPUs): a complete engine build plan and command.

The engine is built where TensorRT and a matching GPU exist, else marked deferred (`fdec
build-engine BUILD` builds it later). Where TensorRT-RTX compiles for the target's compute
capability, the same graph is also built with it as a check that it parses and compiles for
that architecture (not shipped).
"""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile
from collections.abc import Callable
from typing import Any

from fdec.backends.tensorrt_rtx import rtx_engine

__all__ = ["BACKEND", "TensorRtBackend"]


@dataclasses.dataclass(frozen=True)
class TensorRtBackend:
    name: str = "tensorrt"
    gpu_only: bool = True
    graph_form: str = "tensorrt"
    op_domains: tuple[str, ...] = ("",)
    providers: tuple[str, ...] = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    fixed_shapes: bool = True
    files: tuple[str, ...] = ("engines",)
    verifies_here: str = "model.onnx in ONNX Runtime on this CPU; the engine where a GPU is"

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
        records = [tensorrt.engine_report(plan)]
        with tempfile.TemporaryDirectory(prefix="fdec-rtx-check-") as scratch:
            records.append(
                rtx_engine(build_dir / "model.onnx", pathlib.Path(scratch), spec=spec,
                           target=target, limits=limits, purpose="check", progress=progress)
            )  # fmt: skip
        return records


BACKEND = TensorRtBackend()
