"""The TensorRT-RTX backend (GeForce RTX targets): a real engine built ahead of time on this CPU,
from the strongly typed TensorRT model (fdec.lower.tensorrt_model)."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

from fdec.errors import CompileError

__all__ = [
    "BACKEND",
    "ENGINE_DIR",
    "StronglyTypedBackend",
    "TensorRtRtxBackend",
    "rtx_engine",
    "typed_model",
]

ENGINE_DIR = "engines/tensorrt-rtx"


def typed_model(
    build_dir: pathlib.Path, *, spec: Any, target: Any, reference: Any, tolerance: Any,
    progress: Callable[[str], None],
) -> dict[str, Any]:  # fmt: skip
    """The TensorRT backends' own graph preparation: the verified model typed in fp16/bf16
    with its Q/DQ, written to engines/tensorrt/model.onnx and checked against the source."""
    from fdec.lower.tensorrt_model import prepare_tensorrt_model

    return prepare_tensorrt_model(
        build_dir, target=target, spec=spec, reference=reference, tolerance=tolerance,
        progress=progress,
    )  # fmt: skip


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
    parses and compiles for its architecture); its record for the report. Where tensorrt-rtx
    is not installed, a "deferred" record that keeps the profiles (fdec build-engine)."""
    from fdec.lower import tensorrt_rtx
    from fdec.lower.tensorrt_model import TYPED_MODEL

    cc = ".".join(map(str, target.compute_capability))
    if tuple(target.compute_capability) not in tensorrt_rtx.RTX_COMPUTE_CAPABILITIES:
        supported = ", ".join(".".join(map(str, c)) for c in tensorrt_rtx.RTX_COMPUTE_CAPABILITIES)
        return {"backend": "tensorrt-rtx", "status": "not-applicable", "purpose": purpose,
                "compute_capability": cc,
                "reason": f"TensorRT-RTX compiles for {supported}; {target.name} is {cc}"}  # fmt: skip
    if tensorrt_rtx.available() is None:
        progress(f"building a TensorRT-RTX engine for sm {cc} ({purpose})")
    result = tensorrt_rtx.build_engine(
        onnx_path, out_dir, spec=spec, limits=limits,
        compute_capability=tuple(target.compute_capability), purpose=purpose, progress=progress,
    )  # fmt: skip
    record = {"backend": "tensorrt-rtx", "model": TYPED_MODEL, **result.to_dict()}
    if purpose == "check":
        record["engine"] = None  # built to prove the graph compiles; not part of the build
    return record


@dataclasses.dataclass(frozen=True)
class StronglyTypedBackend:
    """What the two TensorRT backends share: a GPU-only Q/DQ graph form, fixed shape ranges,
    the precisions a strongly typed engine takes, and no preparation passes (their graph is
    typed from the verified build by `typed_model`). Each sets its name, providers, files and
    how it is verified, and builds its own engines."""

    name: str = ""
    gpu_only: bool = True
    graph_form: str = "tensorrt"
    op_domains: tuple[str, ...] = ("", "trt")  # trt: TensorRT's TRT_FP4DynamicQuantize
    providers: tuple[str, ...] = ()
    fixed_shapes: bool = True
    files: tuple[str, ...] = ("engines/tensorrt",)
    verifies_here: str = ""
    precisions: tuple[str, ...] = ("fp32", "int8", "int4", "fp8", "fp4")
    default_quantize: str | None = None  # the target's default recipe
    precision_fix: str = (
        "use --quantize fp8, fp4, int8, int4 or none (the engine is typed fp16/bf16)"
    )
    methods: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    kv_dtype: str | None = None
    # an fp16 cache would make model.onnx part fp16, and the typed model is cast from fp32
    kv_dtypes: tuple[str, ...] | None = ("fp32", "int8", "fp8")
    kv_dtypes_why: str = (
        "its strongly typed model is typed whole from the fp32 graph, which an fp16 cache "
        "would already have typed in part"
    )
    gpu_variant: str | None = None
    weight_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def prepare_passes(self, **context: Any) -> list[Any]:
        return []  # its graph is typed from the verified build (typed_model)


@dataclasses.dataclass(frozen=True)
class TensorRtRtxBackend(StronglyTypedBackend):
    name: str = "tensorrt-rtx"
    providers: tuple[str, ...] = ("NvTensorRTRTXExecutionProvider",)
    files: tuple[str, ...] = ("engines/tensorrt", ENGINE_DIR)
    verifies_here: str = (
        "model.onnx in ONNX Runtime on this CPU, the typed TensorRT model against the source; "
        "the engine is built here"
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
        from fdec.lower.tensorrt_model import TYPED_MODEL

        typed = typed_model(build_dir, spec=spec, target=target, reference=reference,
                            tolerance=tolerance, progress=progress)  # fmt: skip
        out_dir = build_dir / ENGINE_DIR
        out_dir.mkdir(parents=True, exist_ok=True)
        record = rtx_engine(build_dir / TYPED_MODEL, out_dir, spec=spec, target=target,
                            limits=limits, purpose="deployable", progress=progress)  # fmt: skip
        if record["status"] in ("failed", "unsupported"):
            raise CompileError(
                f"TensorRT-RTX could not build the engine for {target.name}: "
                f"{record.get('reason') or record['status']}",
                "see the unsupported nodes in the message, or compile with --backend onnxruntime",
            )
        if record.get("engine"):
            record["engine"] = f"{ENGINE_DIR}/{record['engine']}"
        record["typed_model"] = typed
        return [record]


BACKEND = TensorRtRtxBackend()
