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
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import pathlib
import shlex
import time
from collections.abc import Callable, Iterable
from typing import Any

from fdec.build import sha256_file
from fdec.errors import CompileError, InputError, UsageError
from fdec.ir import ModelSpec
from fdec.lower.profiles import Profile, ShapeLimits, profiles_for
from fdec.targets import Target

__all__ = [
    "ENGINE_DIR",
    "PLAN_FILE",
    "SCHEMA_VERSION",
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

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: strongly typed, the typed model beside the plan, no precision flags
ENGINE_DIR = "engines/tensorrt"  # relative to the build folder
PLAN_FILE = "plan.json"
BUILD_SCRIPT = "build.sh"
_MODEL = "model.onnx"  # the strongly typed model, in ENGINE_DIR

NOT_INSTALLED = (
    "tensorrt is not installed (needs NVIDIA's package index: "
    "pip install 'fdec[tensorrt]' --extra-index-url https://pypi.nvidia.com)"
)
NO_GPU = "no CUDA GPU visible"

# Model metadata where fdec.passes.sparsity records the 2:4 sparse weights (SPARSITY_METADATA).
SPARSITY_METADATA = "fdec.sparsity"
# Domains TensorRT's ONNX parser imports: the standard operator set only.
_STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
#: TensorRT versions fdec supports: 10.12 (strongly typed networks for every precision fdec
#: uses; weak typing deprecated) up to, not including, 12.
SUPPORTED_TENSORRT = ((10, 12), (12, 0))

#: What each supported TensorRT major version has, of what fdec writes or calls: trtexec flags,
#: `tensorrt.BuilderFlag` members, `tensorrt.NetworkDefinitionCreationFlag` members. Precision
#: flags are listed for 10.x only to show what 11.x removed; fdec uses none of them.
TENSORRT_INTERFACE: dict[int, dict[str, Any]] = {
    10: {
        "trtexec": frozenset(
            {"--onnx", "--saveEngine", "--timingCacheFile", "--builderOptimizationLevel",
             "--skipInference", "--profile", "--minShapes", "--optShapes", "--maxShapes",
             "--sparsity", "--stronglyTyped", "--fp16", "--bf16", "--fp8", "--int8", "--int4",
             "--best", "--calib"}
        ),
        "builder_flags": frozenset(
            {"FP16", "BF16", "FP8", "INT8", "INT4", "SPARSE_WEIGHTS", "TF32", "REFIT"}
        ),
        "network_flags": frozenset({"STRONGLY_TYPED"}),
        "sources": (
            "TensorRT 10.x trtexec reference (--stronglyTyped opts in to strong typing; "
            "weak typing deprecated from 10.12) — https://docs.nvidia.com/deeplearning/"
            "tensorrt/10.16.1/reference/command-line-programs.html",
            "Strong typing migration (10.12-10.x opt in with kSTRONGLY_TYPED / --stronglyTyped) "
            "— https://www.skills.sh/nvidia/tensorrt/trt-strong-typing-migration",
        ),
    },
    11: {
        "trtexec": frozenset(
            {"--onnx", "--saveEngine", "--timingCacheFile", "--builderOptimizationLevel",
             "--skipInference", "--profile", "--minShapes", "--optShapes", "--maxShapes",
             "--sparsity", "--stronglyTyped"}
        ),
        "builder_flags": frozenset({"SPARSE_WEIGHTS", "TF32", "REFIT"}),
        "network_flags": frozenset({"STRONGLY_TYPED"}),
        "sources": (
            "Migrating trtexec usage from TensorRT 10.x to 11.x: removed --fp16, --bf16, "
            "--fp8, --int4, --best, --int8, --calib; --stronglyTyped always on — "
            "https://docs.nvidia.com/deeplearning/tensorrt/11.4.1/api/migration/"
            "tensorrt-10x-to-11x-trtexec.html",
            "Python migration patterns for TensorRT 11.x: BuilderFlag.FP16, BuilderFlag.INT8 "
            "and all other precision-enabling builder flags removed — https://docs.nvidia.com/"
            "deeplearning/tensorrt/11.4.1/api/migration/tensorrt-10x-to-11x-python-api-patterns.html",
            "NVIDIA/TensorRT strong-typing migration skill: on 11.x kSTRONGLY_TYPED is accepted "
            "(ignored) and --stronglyTyped is a no-op — "
            "https://www.skills.sh/nvidia/tensorrt/trt-strong-typing-migration",
            "Migrating from TensorRT 10.x to 11.x, \"Strongly Typed Networks Are Now Required\" "
            "— https://docs.nvidia.com/deeplearning/tensorrt/11.4.0/api/migration/"
            "tensorrt-10x-to-11x.html",
        ),
    },
}  # fmt: skip
_STATUSES = ("deferred", "built", "failed")


# ---------------------------------------------------------------------------------------------
# What this machine has


def visible_gpus() -> list[dict[str, Any]]:
    """The CUDA GPUs this process can see (index, name, compute capability), via libcuda.

    Empty when there is no NVIDIA driver or no GPU; never raises.
    """
    lib = _load_first(("libcuda.so.1", "libcuda.so", "nvcuda.dll"))
    if lib is None:
        logger.debug("no CUDA driver library found")
        return []
    try:
        if lib.cuInit(0) != 0:
            logger.debug("cuInit failed: no usable CUDA device")
            return []
        count = ctypes.c_int()
        if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return []
        gpus = []
        for index in range(count.value):
            device = ctypes.c_int()
            if lib.cuDeviceGet(ctypes.byref(device), index) != 0:
                continue
            name = ctypes.create_string_buffer(256)
            lib.cuDeviceGetName(name, len(name), device)
            major, minor = ctypes.c_int(), ctypes.c_int()
            lib.cuDeviceGetAttribute(ctypes.byref(major), 75, device)  # COMPUTE_CAPABILITY_MAJOR
            lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)  # COMPUTE_CAPABILITY_MINOR
            gpus.append(
                {
                    "index": index,
                    "name": name.value.decode("utf-8", "replace"),
                    "compute_capability": f"{major.value}.{minor.value}",
                }
            )
        return gpus
    except (AttributeError, OSError) as error:  # a driver library without these entry points
        logger.debug("could not query the CUDA driver: %s", error)
        return []


def tensorrt_available() -> str | None:
    """None when a supported TensorRT (10.12 up to 12) imports and a CUDA GPU is visible;
    else the reason."""
    try:
        import tensorrt
    except ImportError:
        return NOT_INSTALLED
    except OSError as error:  # the wheel is there but its CUDA libraries do not load
        return f"tensorrt is installed but does not load ({error})"
    version = str(getattr(tensorrt, "__version__", "0"))
    parts = [int(p) if p.isdigit() else 0 for p in [*version.split("."), "0"][:2]]
    low, high = SUPPORTED_TENSORRT
    if not low <= tuple(parts) < high:
        return (
            f"tensorrt {version} is not supported: fdec builds strongly typed engines with "
            f"TensorRT {low[0]}.{low[1]} up to (not including) {high[0]} "
            "(pip install 'fdec[tensorrt]')"
        )
    if not visible_gpus():
        return NO_GPU
    return None


# ---------------------------------------------------------------------------------------------
# The graph


def check_standard_ops(onnx_path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Nodes TensorRT's ONNX parser will not take: those in non-standard domains (com.microsoft…).

    Looks inside subgraphs (If/Loop/Scan bodies) and model-local functions; a call of a local
    function is fine when the function's own nodes are. Each entry has name, op and domain.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    functions = {(f.domain, f.name): f for f in model.functions}
    found: list[dict[str, str]] = []
    seen_functions: set[tuple[str, str]] = set()

    def visit(nodes: Iterable[Any], where: str) -> None:
        for index, node in enumerate(nodes):
            key = (node.domain, node.op_type)
            if key in functions:
                if key not in seen_functions:
                    seen_functions.add(key)
                    visit(functions[key].node, f"function {node.domain}.{node.op_type}/")
            elif node.domain not in _STANDARD_DOMAINS:
                found.append(
                    {
                        "name": where + (node.name or f"#{index}"),
                        "op": node.op_type,
                        "domain": node.domain,
                    }
                )
            for attribute in node.attribute:
                label = f"{where}{node.name or f'#{index}'}.{attribute.name}/"
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g.node, label)
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    for graph in attribute.graphs:
                        visit(graph.node, label)

    visit(model.graph.node, "")
    return found


def graph_sparsity(
    onnx_path: str | os.PathLike[str], spec: ModelSpec | None = None
) -> dict[str, Any] | None:
    """What sparsify-2of4 recorded in the model's metadata ({"pattern": "2:4", "weights": [...],
    "roles": [...]}), or None for a dense graph.

    With `spec`, the weights each recorded role holds now (quantizers rename them) are read and
    checked: `kept` lists the roles whose weight still has at most 2 nonzeros in every group
    of 4 along an axis, `lost` those where a later pass refilled the zeros (GPTQ-style error
    feedback does)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    record = None
    for prop in model.metadata_props:
        if prop.key == SPARSITY_METADATA:
            try:
                record = json.loads(prop.value)
            except json.JSONDecodeError:
                logger.warning("ignoring unreadable %s metadata in %s", prop.key, onnx_path)
            break
    if not isinstance(record, dict) or not record.get("weights"):
        return None
    if spec is not None:
        record["kept"], record["lost"] = _check_2of4(pathlib.Path(onnx_path), record, spec)
    return record


def _check_2of4(
    onnx_path: pathlib.Path, record: dict[str, Any], spec: ModelSpec
) -> tuple[list[str], list[str]]:
    import numpy as np
    import onnx_ir as ir

    def holds(array: Any) -> bool:
        k, n = array.shape
        return k % 4 == 0 and bool(((array.reshape(k // 4, 4, n) != 0).sum(axis=1) <= 2).all())

    graph = ir.load(str(onnx_path)).graph  # external weights are memory-mapped, read on use
    kept, lost = [], []
    for role in record.get("roles", []):
        value = graph.initializers.get(spec.weights.get(role, ""))
        tensor = value.const_value if value is not None else None
        if tensor is None or len(tensor.shape) != 2:
            lost.append(role)
            continue
        array = np.asarray(tensor.numpy()).astype(np.float32)
        (kept if holds(array) or holds(array.T) else lost).append(role)
    return kept, lost


def _graph_inputs(onnx_path: pathlib.Path) -> tuple[dict[str, list[int | None]], bool]:
    """Graph inputs (not initializers) with their dims (None = dynamic), and whether Q/DQ is used."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs: dict[str, list[int | None]] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        inputs[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    has_qdq = any(
        node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node
    )
    return inputs, has_qdq


def _check_profiles(profiles: list[Profile], inputs: dict[str, list[int | None]]) -> None:
    """Every dynamic input has a shape in every profile, of its rank, agreeing on static dims."""
    dynamic = [name for name, dims in inputs.items() if any(d is None for d in dims)]
    fix = "this is a bug in fdec's shape profiles; report it with the model"
    for profile in profiles:
        missing = [name for name in dynamic if name not in profile.shapes]
        if missing:
            raise CompileError(
                f"shape profile {profile.name!r} gives no shape for dynamic input(s) "
                f"{', '.join(missing)}",
                fix,
            )
        for name, (low, opt, high) in profile.shapes.items():
            if name not in inputs:
                raise CompileError(
                    f"shape profile {profile.name!r} names {name!r}, which is not a graph input",
                    fix,
                )
            dims = inputs[name]
            for label, shape in (("min", low), ("opt", opt), ("max", high)):
                if len(shape) != len(dims):
                    raise CompileError(
                        f"shape profile {profile.name!r}: {label} shape {list(shape)} of {name!r} "
                        f"has rank {len(shape)}, the graph input has rank {len(dims)}",
                        fix,
                    )
                for axis, (given, static) in enumerate(zip(shape, dims)):
                    if static is not None and static > 0 and given != static:
                        raise CompileError(
                            f"shape profile {profile.name!r}: {label} shape of {name!r} has "
                            f"{given} on axis {axis}, where the graph fixes {static}",
                            fix,
                        )
            if not all(0 <= a <= b <= c for a, b, c in zip(low, opt, high)):
                raise CompileError(
                    f"shape profile {profile.name!r}: {name!r} needs min <= opt <= max on every "
                    f"axis, got {list(low)} / {list(opt)} / {list(high)}",
                    fix,
                )


# ---------------------------------------------------------------------------------------------
# The plan


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
            raise InputError("a TensorRT plan must be a JSON object", _REPLAN_FIX)
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise InputError(
                f"TensorRT plan schema_version is {version!r}; this fdec reads {SCHEMA_VERSION}",
                _REPLAN_FIX,
            )
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            logger.warning("ignoring unknown keys in the TensorRT plan: %s", ", ".join(unknown))
        try:
            plan = cls(**{key: value for key, value in data.items() if key in names})
        except TypeError as error:
            raise InputError(f"the TensorRT plan is incomplete: {error}", _REPLAN_FIX) from None
        if plan.status not in _STATUSES:
            raise InputError(f"unknown TensorRT plan status {plan.status!r}", _REPLAN_FIX)
        return plan


_REPLAN_FIX = "compile the model again with --backend tensorrt to write a new plan"


def _build_fix(build_dir: str | os.PathLike[str] | None = None) -> str:
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


def _write_atomic(path: pathlib.Path, data: Any) -> None:
    """Write `data` (text, or anything with the buffer protocol) to `path` via a temp file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_plan(folder: pathlib.Path, plan: EnginePlan) -> pathlib.Path:
    path = folder / PLAN_FILE
    _write_atomic(path, json.dumps(plan.to_dict(), indent=2, sort_keys=True) + "\n")
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
    inputs, _ = _graph_inputs(onnx_path)
    _check_profiles(profiles, inputs)
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
    _write_plan(folder, plan)
    script = folder / BUILD_SCRIPT
    _write_atomic(script, _script(plan))
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
        raise InputError(f"cannot read {path}: {error}", _REPLAN_FIX) from None
    return EnginePlan.from_dict(data)


# ---------------------------------------------------------------------------------------------
# Building the engine


class _BuildFailed(Exception):
    """TensorRT refused the network or the build; the message says why."""


def build_planned_engine(
    build_dir: str | os.PathLike[str], progress: Callable[[str], None] = lambda message: None
) -> EnginePlan:
    """Build engines/tensorrt/model.engine from the stored plan with TensorRT's Python API.

    Updates plan.json (status "built", built_on, wall_s, engine_bytes, sha256) and returns the
    plan. Raises CompileError (plan left as it was) where TensorRT or a GPU is missing, or where
    the GPU is not the target's compute capability; a build TensorRT refuses is recorded as
    "failed" in plan.json and raised as CompileError.
    """
    build_dir = pathlib.Path(build_dir)
    plan = read_plan(build_dir)
    folder = build_dir / ENGINE_DIR
    onnx_path = (folder / plan.onnx).resolve()
    if not onnx_path.is_file():
        raise InputError(f"{onnx_path} (named by the TensorRT plan) does not exist", _REPLAN_FIX)
    reason = tensorrt_available()
    if reason is not None:
        raise CompileError(
            f"cannot build the TensorRT engine here: {reason}", _build_fix(build_dir)
        )
    gpu = visible_gpus()[0]
    if gpu["compute_capability"] != plan.compute_capability:
        raise CompileError(
            f"the plan is for {plan.target} (compute capability {plan.compute_capability}) but "
            f"this GPU is {gpu['name']} ({gpu['compute_capability']}); a TensorRT engine runs "
            f"only on the compute capability it was built on",
            f"{_build_fix(build_dir)} on a {plan.target}, or compile again with the --target "
            f"of this GPU",
        )

    progress(f"building the TensorRT engine for {plan.target} on {gpu['name']}")
    start = time.perf_counter()
    try:
        version, reused = _build_engine(folder, onnx_path, plan, progress)
    except _BuildFailed as error:
        plan.status, plan.reason = "failed", str(error)
        _write_plan(folder, plan)
        raise CompileError(
            f"TensorRT could not build the engine: {error}",
            "check that the graph uses ops TensorRT supports and that the profiles fit the "
            "GPU's memory (lower --max-batch or --max-seq-len)",
        ) from None
    engine = folder / plan.engine
    plan.status, plan.reason = "built", ""
    plan.wall_s = round(time.perf_counter() - start, 3)
    plan.engine_bytes = engine.stat().st_size
    plan.sha256 = sha256_file(engine)
    plan.timing_cache_reused = reused
    plan.built_on = {
        "gpu": gpu["name"],
        "compute_capability": gpu["compute_capability"],
        "driver": _driver_version(),
        "tensorrt": version,
    }
    _write_plan(folder, plan)
    progress(f"wrote {engine} ({plan.engine_bytes / 1e6:.1f} MB) in {plan.wall_s:.1f} s")
    return plan


def _build_engine(
    folder: pathlib.Path,
    onnx_path: pathlib.Path,
    plan: EnginePlan,
    progress: Callable[[str], None],
) -> tuple[str, bool]:
    """Parse, configure and build with TensorRT; writes the engine and timing cache.

    Returns (TensorRT version, whether an existing timing cache was loaded).
    """
    import tensorrt as trt

    trt_logger = _make_logger(trt)
    builder = trt.Builder(trt_logger)
    # Strongly typed: precision is the graph's (required on 10.x for that, always so on 11.x).
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, trt_logger)
    progress(f"parsing {onnx_path.name}")
    # From the file, not from bytes, so the parser finds model.onnx.data beside it.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise _BuildFailed("the ONNX parser refused model.onnx: " + "; ".join(errors[:5]))

    config = builder.create_builder_config()
    config.builder_optimization_level = plan.builder_optimization_level
    if plan.sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    for entry in plan.profiles:
        profile = builder.create_optimization_profile()
        for name, dims in entry["shapes"].items():
            profile.set_shape(name, tuple(dims["min"]), tuple(dims["opt"]), tuple(dims["max"]))
        if config.add_optimization_profile(profile) < 0:
            raise _BuildFailed(f"TensorRT refused shape profile {entry['name']!r}")

    cache_path = folder / plan.timing_cache
    old = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(old)
    reused = bool(old)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        logger.warning("%s was made by another GPU or TensorRT; starting a new one", cache_path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        reused = False

    progress(
        f"building ({len(plan.profiles)} profiles, strongly typed: "
        f"{' + '.join(plan.precisions) or 'fp32'})"
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = "; ".join(trt_logger.errors[-5:]) or "no error message from TensorRT"
        raise _BuildFailed(detail)
    _write_atomic(folder / plan.engine, serialized)  # IHostMemory is a buffer: no copy
    _write_atomic(cache_path, config.get_timing_cache().serialize())
    return str(trt.__version__), reused


def _make_logger(trt: Any) -> Any:
    """A TensorRT logger that forwards to this module's logger and keeps the errors."""
    levels = {
        trt.Logger.INTERNAL_ERROR: logging.ERROR,
        trt.Logger.ERROR: logging.ERROR,
        trt.Logger.WARNING: logging.WARNING,
        trt.Logger.INFO: logging.DEBUG,
        trt.Logger.VERBOSE: logging.DEBUG,
    }

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, message: str) -> None:
            # TensorRT calls this from C++ and it must not raise.
            try:
                level = levels.get(severity, logging.DEBUG)
                if level >= logging.ERROR:
                    self.errors.append(message)
                logger.log(level, "TensorRT: %s", message)
            except Exception:  # pragma: no cover - logging itself failed
                pass

    return _Logger()


def _driver_version() -> str:
    """The NVIDIA driver version ("550.54.15") from NVML, else the CUDA driver API version."""
    nvml = _load_first(("libnvidia-ml.so.1", "nvml.dll"))
    if nvml is not None:
        try:
            if nvml.nvmlInit_v2() == 0:
                buffer = ctypes.create_string_buffer(96)
                ok = nvml.nvmlSystemGetDriverVersion(buffer, len(buffer)) == 0
                nvml.nvmlShutdown()
                if ok:
                    return buffer.value.decode("ascii", "replace")
        except (AttributeError, OSError):
            pass
    cuda = _load_first(("libcuda.so.1", "libcuda.so", "nvcuda.dll"))
    if cuda is not None:
        version = ctypes.c_int()
        try:
            if cuda.cuDriverGetVersion(ctypes.byref(version)) == 0:
                return f"CUDA {version.value // 1000}.{version.value % 1000 // 10}"
        except (AttributeError, OSError):
            pass
    return "unknown"


def _load_first(names: Iterable[str]) -> Any:
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


# ---------------------------------------------------------------------------------------------
# Reporting


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
        report["fix"] = _build_fix()
    return report
