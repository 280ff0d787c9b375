"""Lowering to TensorRT: a strongly typed engine plan (profiles, exact command) now, the engine where a GPU is.

A compile writes the strongly typed TensorRT model (`engines/tensorrt/model.onnx`, written by
fdec.lower.tensorrt_model: fp16/bf16 types and Q/DQ carry all precision) and, beside it,
`plan.json` and `build.sh`. Where TensorRT and an NVIDIA GPU exist, `build_planned_engine`
builds `model.engine` from that plan with TensorRT's Python API; elsewhere the plan stays
"deferred" and says how to finish it (`fdec build-engine BUILD` on a GPU machine, or the
script, which runs `trtexec`).

TensorRT 11 builds strongly typed networks only and removed the precision builder flags
(FP16/BF16/FP8/INT8/INT4) and trtexec's --fp16/--bf16/--fp8/--int8/--int4/--best; 10.12+ builds
the same graph when asked for a strongly typed network. So fdec writes no precision flag: the
command says `--stronglyTyped` (required on 10.x, accepted on 11.x) and the Python path creates
networks with NetworkDefinitionCreationFlag.STRONGLY_TYPED. `TENSORRT_INTERFACE` lists, per
supported major version, the trtexec flags, builder flags and network flags that version has,
with its source; tests check every flag fdec writes or sets against it.

The plan is the single source of truth for both paths: the Python build and the `trtexec`
command use the same profiles, optimization level and timing cache file, so a rebuild on the
same GPU with the same TensorRT repeats the same tactic choices.

Modules: support (versions, flags, detection), graph_checks (the typed model's ops, sparsity,
inputs), plan (the plan, its command and script, its report), build (the Python API build).
"""

from __future__ import annotations

from fdec.lower.tensorrt.build import build_planned_engine
from fdec.lower.tensorrt.graph_checks import SPARSITY_METADATA, check_standard_ops, graph_sparsity
from fdec.lower.tensorrt.plan import (
    BUILD_SCRIPT,
    ENGINE_DIR,
    PLAN_FILE,
    SCHEMA_VERSION,
    EnginePlan,
    engine_report,
    plan_engine,
    read_plan,
)
from fdec.lower.tensorrt.support import (
    NO_GPU,
    NOT_INSTALLED,
    SUPPORTED_TENSORRT,
    TENSORRT_INTERFACE,
    tensorrt_available,
    visible_gpus,
)

__all__ = [
    "BUILD_SCRIPT",
    "ENGINE_DIR",
    "NOT_INSTALLED",
    "NO_GPU",
    "PLAN_FILE",
    "SCHEMA_VERSION",
    "SPARSITY_METADATA",
    "SUPPORTED_TENSORRT",
    "TENSORRT_INTERFACE",
    "EnginePlan",
    "build_planned_engine",
    "check_standard_ops",
    "engine_report",
    "graph_sparsity",
    "plan_engine",
    "read_plan",
    "tensorrt_available",
    "visible_gpus",
]
