"""The engine plan: profiles, the exact trtexec command and build.sh, written beside the typed model; its report."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shlex
from typing import Any

from fdec.errors import InputError, UsageError
from fdec.ir import ModelSpec
from fdec.lower.profiles import Profile, ShapeLimits, profiles_for
from fdec.lower.tensorrt.graph_checks import (
    check_profiles,
    check_standard_ops,
    graph_inputs,
    graph_sparsity,
)
from fdec.lower.tensorrt.support import tensorrt_available
from fdec.targets import Target

__all__ = [
    "BUILD_SCRIPT",
    "ENGINE_DIR",
    "PLAN_FILE",
    "REPLAN_FIX",
    "SCHEMA_VERSION",
    "EnginePlan",
    "build_fix",
    "engine_report",
    "plan_engine",
    "read_plan",
    "write_atomic",
    "write_plan",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: strongly typed, the typed model beside the plan, no precision flags
ENGINE_DIR = "engines/tensorrt"  # relative to the build folder
PLAN_FILE = "plan.json"
BUILD_SCRIPT = "build.sh"
_MODEL = "model.onnx"  # the strongly typed model, in ENGINE_DIR

_STATUSES = ("deferred", "built", "failed")


@dataclasses.dataclass(kw_only=True)
class EnginePlan:
    """Everything needed to build the TensorRT engine later; stored as engines/tensorrt/plan.json.

    Paths (onnx, engine, timing_cache) are relative to the plan's own folder.
    """

    target: str
    compute_capability: str
    profiles: list[dict[str, Any]]
    precisions: list[str] = dataclasses.field(default_factory=list)  # in the graph's types
    strongly_typed: bool = True
    sparse_weights: bool = False
    builder_optimization_level: int = 3
    trtexec: list[str] = dataclasses.field(default_factory=list)
    trtexec_shell: str = ""
    polygraphy: list[str] = dataclasses.field(default_factory=list)
    polygraphy_shell: str = ""
    status: str = "deferred"  # "deferred" | "built" | "failed"
    reason: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)
    onnx: str = _MODEL
    engine: str = "model.engine"
    timing_cache: str = "timing.cache"
    schema_version: int = SCHEMA_VERSION
    # Filled in by a successful build.
    built_on: dict[str, Any] | None = None
    wall_s: float | None = None
    engine_bytes: int | None = None
    sha256: str | None = None
    timing_cache_reused: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EnginePlan:
        if not isinstance(data, dict):
            raise InputError("a TensorRT plan must be a JSON object", REPLAN_FIX)
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise InputError(
                f"TensorRT plan schema_version is {version!r}; this fdec reads {SCHEMA_VERSION}",
                REPLAN_FIX,
            )
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            logger.warning("ignoring unknown keys in the TensorRT plan: %s", ", ".join(unknown))
        try:
            plan = cls(**{key: value for key, value in data.items() if key in names})
        except TypeError as error:
            raise InputError(f"the TensorRT plan is incomplete: {error}", REPLAN_FIX) from None
        if plan.status not in _STATUSES:
            raise InputError(f"unknown TensorRT plan status {plan.status!r}", REPLAN_FIX)
        return plan


REPLAN_FIX = "compile the model again with --backend tensorrt to write a new plan"


def build_fix(build_dir: str | os.PathLike[str] | None = None) -> str:
    folder = "BUILD" if build_dir is None else shlex.quote(str(build_dir))
    return (
        f"run `fdec build-engine {folder}` on a machine with an NVIDIA GPU and TensorRT, "
        f"or run {ENGINE_DIR}/{BUILD_SCRIPT} there"
    )


def _commands(plan: EnginePlan, profiles: list[Profile]) -> tuple[list[str], list[str]]:
    """The trtexec and polygraphy commands for `plan`, run from the plan's folder."""
    trtexec = [
        "trtexec",
        f"--onnx={plan.onnx}",
        f"--saveEngine={plan.engine}",
        "--stronglyTyped",  # required on 10.x, always on (accepted) on 11.x
        f"--timingCacheFile={plan.timing_cache}",
        f"--builderOptimizationLevel={plan.builder_optimization_level}",
        "--skipInference",
    ]
    polygraphy = ["polygraphy", "convert", plan.onnx, "--convert-to", "trt", "-o", plan.engine,
                  "--strongly-typed"]  # fmt: skip
    for index, profile in enumerate(profiles):
        # trtexec reads --minShapes/--optShapes/--maxShapes right after --profile=N as profile N.
        trtexec += [f"--profile={index}", *profile.trtexec_args()]
        polygraphy += profile.polygraphy_args()
    if plan.sparse_weights:
        trtexec.append("--sparsity=enable")
        polygraphy.append("--sparse-weights")
    polygraphy += [
        "--builder-optimization-level",
        str(plan.builder_optimization_level),
        "--load-timing-cache",
        plan.timing_cache,
        "--save-timing-cache",
        plan.timing_cache,
    ]
    return trtexec, polygraphy


def _script(plan: EnginePlan) -> str:
    return "\n".join(
        [
            "#!/bin/sh",
            f"# Build the TensorRT engine planned by fdec for {plan.target} "
            f"(compute capability {plan.compute_capability}).",
            "# Run it on a machine with that GPU and TensorRT's trtexec on PATH; it writes",
            f"# {plan.engine} and keeps tactic timings in {plan.timing_cache}, so rebuilds repeat.",
            "# `fdec build-engine BUILD` does the same with TensorRT's Python API and records it",
            "# in plan.json; this script does not update plan.json.",
            "set -eu",
            'cd "$(dirname "$0")"',
            "if ! command -v trtexec >/dev/null 2>&1; then",
            '    echo "trtexec not found: install TensorRT and put its bin folder on PATH" >&2',
            "    exit 127",
            "fi",
            f"exec {plan.trtexec_shell}",
            "",
        ]
    )


def write_atomic(path: pathlib.Path, data: Any) -> None:
    """Write `data` (text, or anything with the buffer protocol) to `path` via a temp file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_plan(folder: pathlib.Path, plan: EnginePlan) -> pathlib.Path:
    path = folder / PLAN_FILE
    write_atomic(path, json.dumps(plan.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def plan_engine(
    build_dir: str | os.PathLike[str],
    *,
    spec: ModelSpec,
    target: Target,
    limits: ShapeLimits,
    sparse_weights: bool | None = None,
    builder_optimization_level: int = 3,
) -> EnginePlan:
    """Write engines/tensorrt/plan.json and build.sh for the strongly typed
    engines/tensorrt/model.onnx (fdec.lower.tensorrt_model writes it); return the plan.

    The plan is "deferred": `build_planned_engine` (or build.sh) builds the engine. Refuses a
    non-GPU target, a graph whose types or Q/DQ need precisions the target lacks, sparsity the
    target lacks, and graphs with non-standard ops.
    `sparse_weights` None: on when the graph carries sparsify-2of4's 2:4 weights
    (`graph_sparsity`) and the target has sparse tensor cores.
    """
    build_dir = pathlib.Path(build_dir)
    if not target.is_gpu or target.vendor.lower() != "nvidia":
        raise UsageError(
            f"the tensorrt backend builds engines for NVIDIA GPUs; {target.name} "
            f"({target.display_name}) is not one",
            "pass an NVIDIA GPU target such as --target h100, or use --backend onnxruntime "
            "for the CPU",
        )
    if sparse_weights and not target.sparse_tensor_cores:
        raise UsageError(
            f"sparse weights need 2:4 sparse tensor cores, which {target.name} "
            f"({target.display_name}) does not have",
            "drop the sparse-weights option for this target, or pick a target with sparse "
            "tensor cores (compute capability 8.0 or newer)",
        )
    if not 0 <= builder_optimization_level <= 5:
        raise UsageError(
            f"TensorRT builder optimization level must be 0..5, got {builder_optimization_level}",
            "use 3 (TensorRT's default) unless you need faster builds (lower) or more search",
        )
    onnx_path = build_dir / ENGINE_DIR / _MODEL
    if not onnx_path.is_file():
        raise InputError(
            f"{onnx_path} does not exist",
            "write the strongly typed TensorRT model first "
            "(fdec.lower.tensorrt_model.prepare_tensorrt_model), then plan",
        )
    foreign = check_standard_ops(onnx_path)
    if foreign:
        listed = ", ".join(f"{n['name']} ({n['domain']}.{n['op']})" for n in foreign[:8])
        more = f" and {len(foreign) - 8} more" if len(foreign) > 8 else ""
        raise InputError(
            f"{len(foreign)} node(s) use ops TensorRT's ONNX parser does not take: {listed}{more}",
            "TensorRT takes standard ONNX ops only: compile without the ONNX Runtime fusion "
            "passes (they emit com.microsoft ops) for --backend tensorrt, or use --backend "
            "onnxruntime",
        )
    profiles = profiles_for(spec, limits)
    inputs, _ = graph_inputs(onnx_path)
    check_profiles(profiles, inputs)
    precisions = _typed_precisions(onnx_path, target)

    notes = []
    sparsity = graph_sparsity(onnx_path, spec)
    kept = len(sparsity["kept"]) if sparsity else 0
    if sparsity and sparsity["lost"]:
        notes.append(
            f"{len(sparsity['lost'])} of {kept + len(sparsity['lost'])} weights sparsify-2of4 "
            f"masked lost the 2:4 pattern in later passes (e.g. {sparsity['lost'][0]}): "
            "TensorRT runs them dense"
        )
        logger.warning("%s", notes[-1])
    if sparse_weights is None:
        sparse_weights = kept > 0 and target.sparse_tensor_cores
        if kept and not sparse_weights:
            notes.append(
                f"the graph has 2:4 sparse weights but {target.name} has no sparse tensor "
                "cores: they run as dense weights"
            )
    if sparse_weights:
        notes.append(
            f"sparse weights on (--sparsity=enable): {kept or 'no'} weight(s) carry the 2:4 "
            "pattern (fdec.sparsity metadata, checked); TensorRT picks sparse kernels only where "
            "they time faster (sparse tensor cores take TF32/FP16/BF16/INT8, and FP8 from sm 8.9)"
        )
    if not precisions:
        notes.append(
            "the graph is fp32 throughout: a strongly typed TensorRT builds it in fp32 (TF32 "
            "from compute capability 8.0); type it with cast-float16 for fp16/bf16 kernels"
        )

    cc = target.compute_capability
    assert cc is not None
    plan = EnginePlan(
        target=target.name,
        compute_capability=f"{cc[0]}.{cc[1]}",
        profiles=[profile.to_dict() for profile in profiles],
        precisions=precisions,
        sparse_weights=sparse_weights,
        builder_optimization_level=builder_optimization_level,
        notes=notes,
    )
    plan.trtexec, plan.polygraphy = _commands(plan, profiles)
    plan.trtexec_shell = shlex.join(plan.trtexec)
    plan.polygraphy_shell = shlex.join(plan.polygraphy)
    plan.reason = tensorrt_available() or "not built yet"

    folder = build_dir / ENGINE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / plan.engine).unlink(missing_ok=True)  # an engine of an earlier graph is stale
    write_plan(folder, plan)
    script = folder / BUILD_SCRIPT
    write_atomic(script, _script(plan))
    script.chmod(0o755)
    logger.info("planned TensorRT engine for %s: %s", target.name, plan.trtexec_shell)
    return plan


def _typed_precisions(onnx_path: pathlib.Path, target: Target) -> list[str]:
    """The precisions the typed graph computes in, each checked against the target."""
    import onnx_ir as ir

    from fdec.lower.tensorrt_model import graph_precisions

    precisions = graph_precisions(ir.load(str(onnx_path)).graph)
    for name in precisions:
        target.require(name)  # InputError: FP8 needs compute capability >= 8.9; a100 is 8.0
    return precisions


def read_plan(build_dir: str | os.PathLike[str]) -> EnginePlan:
    """The plan stored in build_dir/engines/tensorrt/plan.json."""
    path = pathlib.Path(build_dir) / ENGINE_DIR / PLAN_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(
            f"{path} does not exist: {build_dir} has no TensorRT plan",
            "compile with --backend tensorrt (or a target whose default backend is tensorrt) first",
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read {path}: {error}", REPLAN_FIX) from None
    return EnginePlan.from_dict(data)


def engine_report(plan: EnginePlan) -> dict[str, Any]:
    """What the build report says about the TensorRT engine: status, why, files, command."""
    files = [f"{ENGINE_DIR}/{PLAN_FILE}", f"{ENGINE_DIR}/{BUILD_SCRIPT}", f"{ENGINE_DIR}/{_MODEL}"]
    report: dict[str, Any] = {
        "backend": "tensorrt",
        "status": plan.status,
        "reason": plan.reason,
        "target": plan.target,
        "compute_capability": plan.compute_capability,
        "precisions": list(plan.precisions),
        "strongly_typed": plan.strongly_typed,
        "model": f"{ENGINE_DIR}/{_MODEL}",
        "sparse_weights": plan.sparse_weights,
        "profiles": [profile["name"] for profile in plan.profiles],
        "files": files,
        "command": plan.trtexec_shell,
        "polygraphy_command": plan.polygraphy_shell,
        "notes": list(plan.notes),
    }
    if plan.status == "built":
        files += [f"{ENGINE_DIR}/{plan.engine}", f"{ENGINE_DIR}/{plan.timing_cache}"]
        report.update(
            built_on=plan.built_on,
            wall_s=plan.wall_s,
            engine_bytes=plan.engine_bytes,
            sha256=plan.sha256,
            timing_cache_reused=plan.timing_cache_reused,
        )
    else:
        report["fix"] = build_fix()
    return report
