"""The TensorRT backend (datacenter GPUs): a complete engine build plan and command, from the
strongly typed TensorRT model (fdec.lower.tensorrt_model).

The engine is built where TensorRT and a matching GPU exist, else marked deferred (`fdec
build-engine BUILD` builds it later). Where TensorRT-RTX compiles for the target's compute
capability, the same typed graph is also built with it as a check that it parses and compiles
for that architecture (not shipped).
"""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile
from collections.abc import Callable
from typing import Any

from fdec.backends.tensorrt_rtx import StronglyTypedBackend, rtx_engine, typed_model

__all__ = ["BACKEND", "TensorRtBackend"]


@dataclasses.dataclass(frozen=True)
class TensorRtBackend(StronglyTypedBackend):
    name: str = "tensorrt"
    providers: tuple[str, ...] = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    verifies_here: str = (
        "model.onnx in ONNX Runtime on this CPU, the typed TensorRT model against the source; "
        "the engine where TensorRT and the GPU are"
    )

    def build_engines(
        self,
        build_dir: pathlib.Path,
        *,
        spec: Any,
        target: Any,
        limits: Any,
        reference: Any = None,
        tolerance: Any = None,
        progress: Callable[[str], None] = lambda message: None,
    ) -> list[dict[str, Any]]:
        from fdec.lower import tensorrt
        from fdec.lower.tensorrt_model import TYPED_MODEL

        typed = typed_model(build_dir, spec=spec, target=target, reference=reference,
                            tolerance=tolerance, progress=progress)  # fmt: skip
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
        records = [tensorrt.engine_report(plan)]
        with tempfile.TemporaryDirectory(prefix="fdec-rtx-check-") as scratch:
            records.append(
                rtx_engine(build_dir / TYPED_MODEL, pathlib.Path(scratch), spec=spec,
                           target=target, limits=limits, purpose="check", progress=progress)
            )  # fmt: skip
        records[0]["typed_model"] = typed
        return records


BACKEND = TensorRtBackend()
