"""Lowering to TensorRT-RTX: an engine built ahead of time on the CPU for one compute capability.

TensorRT-RTX needs no GPU to build: the engine is compiled for the target's compute capability
here and finished just in time on the user's GPU. This module drives the `tensorrt_rtx` Python
API directly (imported inside the functions that need it, never at import time):

- `unsupported_nodes` asks the ONNX parser which nodes it cannot take, before any build;
- `build_engine` parses the graph, adds one optimization profile per `fdec.lower.profiles`
  profile, sets the target compute capability and writes `model.engine` atomically.

TensorRT-RTX is strongly typed: precision is the graph's (fdec.lower.tensorrt_model writes the
typed engines/tensorrt/model.onnx that both TensorRT and TensorRT-RTX build). What the engine
computes in is read back from the engine itself: builds run with detailed profiling verbosity,
so the builder logs the engine inspector's layer listing, and `engine_precision` counts each
GEMM's input and weight types from it (an engine cannot be deserialized here without a GPU).

Every outcome is a `RtxBuildResult`; an unsupported graph, an untargetable compute capability
or a builder error is a status with a reason, not an exception. TensorRT's own messages are
collected by a logger of ours and never printed; warnings and errors go to this module's logger.

Measured with tensorrt-rtx-cu12 1.7.1 (see the tests): a 2-layer Llama builds in ~2 s and a
2-layer BERT in <1 s on 2 cores; an engine is nearly the same size whatever compute capability
it targets (kernels are finished on the GPU), and two builds of the same graph for the same
target differ in their bytes, so hash an engine's inputs, not the engine. FP32 matrix products
cannot be built for Turing (7.5): the builder fails with "FP32 GEMM is not supported", so 7.5
needs an FP16 graph.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from fdec.errors import InputError, UsageError
from fdec.ir import ModelSpec
from fdec.lower.profiles import Profile, ShapeLimits, profiles_for

__all__ = [
    "ENGINE_FILE",
    "NOT_KERNELS",
    "RTX_COMPUTE_CAPABILITIES",
    "RtxBuildResult",
    "available",
    "build_engine",
    "engine_precision",
    "listed_layers",
    "profile_kernels",
    "unsupported_nodes",
]

logger = logging.getLogger(__name__)

ENGINE_FILE = "model.engine"

#: Compute capabilities TensorRT-RTX can build for (`tensorrt_rtx.ComputeCapability` SM75 ...
#: SM121 in 1.7.1). Hopper (9.0) and data-center Blackwell (10.0) are not among them.
RTX_COMPUTE_CAPABILITIES: tuple[tuple[int, int], ...] = (
    (7, 5),
    (8, 0),
    (8, 6),
    (8, 9),
    (12, 0),
    (12, 1),
)

_STATUSES = ("built", "failed", "unsupported", "deferred")
_PURPOSES = ("deployable", "check")
_INSTALL_FIX = "pip install 'fdec[rtx]'"

# TensorRT keeps one logger per process while any builder lives ("the logger passed into
# createInferBuilder differs from one already registered ... the current new logger is
# ignored"), so all builds share one collecting logger and run one at a time.
_BUILD_LOCK = threading.RLock()


@dataclasses.dataclass
class RtxBuildResult:
    """What one TensorRT-RTX build did.

    `engine` is the engine's path relative to the build's `out_dir` (None unless built);
    `profiles` are the optimization profiles in TensorRT's order (index 0 first).
    """

    status: str  # "built" | "failed" | "unsupported" | "deferred"
    compute_capability: str  # "8.9"
    engine: str | None = None
    bytes: int = 0
    wall_s: float = 0.0
    tensorrt_rtx_version: str | None = None
    profiles: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    unsupported: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    reason: str | None = None
    purpose: str = "deployable"  # "deployable" | "check"
    sparse_weights: bool = False  # BuilderFlag.SPARSE_WEIGHTS set (2:4 weights, sm >= 8.0)
    # What the built engine computes in, from its inspector listing (`engine_precision`).
    engine_precision: dict[str, Any] | None = None
    # Kernels each profile launches per run, from the same listing (`profile_kernels`).
    kernels: dict[str, int] | None = None

    def __post_init__(self) -> None:
        if self.status not in _STATUSES:
            raise ValueError(f"status must be one of {_STATUSES}, got {self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def available() -> str | None:
    """None when `tensorrt_rtx` imports; otherwise why it does not, with the fix."""
    try:
        import tensorrt_rtx  # noqa: F401
    except ModuleNotFoundError:
        return f"tensorrt-rtx-cu12 is not installed; {_INSTALL_FIX}"
    except (ImportError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"tensorrt_rtx is installed but does not import ({first}); reinstall with {_INSTALL_FIX}"
    return None


def unsupported_nodes(onnx_path: pathlib.Path) -> list[dict[str, Any]]:
    """The nodes of `onnx_path` that TensorRT-RTX's ONNX parser cannot take (empty: all can).

    Each entry: `name`, `op_type`, `domain`, `index` (position in the graph, -1 when the
    parser names no node) and `reason` (the parser's message). External data next to the
    model file is found through its path.
    """
    reason = available()
    if reason is not None:
        raise UsageError(f"cannot check nodes for TensorRT-RTX: {reason}")
    onnx_path = pathlib.Path(onnx_path)
    nodes = _graph_nodes(onnx_path)
    with _trt_session() as (trt, messages):
        return _unsupported(trt, onnx_path, nodes, messages)


def build_engine(
    onnx_path: pathlib.Path,
    out_dir: pathlib.Path,
    *,
    spec: ModelSpec | None,
    limits: ShapeLimits | None,
    compute_capability: tuple[int, int],
    purpose: str = "deployable",
    profiles: list[Profile] | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> RtxBuildResult:
    """Build `out_dir/model.engine` from `onnx_path` for one compute capability.

    The optimization profiles are `profiles_for(spec, limits)`, or `profiles` as given (a
    deferred build finished later from its recorded profiles; then `spec` may be None).

    Returns status "built", or "unsupported" (nodes the parser cannot take, listed), "deferred"
    (this toolchain cannot build for `compute_capability`, or is not installed) or "failed"
    (the first error TensorRT logged). Bad limits raise `UsageError` before anything is built.
    """
    if purpose not in _PURPOSES:
        raise ValueError(f"purpose must be one of {_PURPOSES}, got {purpose!r}")
    onnx_path, out_dir = pathlib.Path(onnx_path), pathlib.Path(out_dir)
    cc = f"{compute_capability[0]}.{compute_capability[1]}"
    start = time.perf_counter()
    if profiles is None:
        if spec is None or limits is None:
            raise ValueError("build_engine needs spec and limits, or profiles")
        profiles = profiles_for(spec, limits)
    profiles = _engine_profiles(profiles)
    result = RtxBuildResult(
        status="deferred",
        compute_capability=cc,
        profiles=[profile.to_dict() for profile in profiles],
        purpose=purpose,
    )

    def finish(status: str, reason: str | None = None) -> RtxBuildResult:
        result.status, result.reason = status, reason
        result.wall_s = round(time.perf_counter() - start, 3)
        if reason:
            logger.info("tensorrt-rtx %s for %s: %s", status, cc, reason)
        return result

    supported = ", ".join(f"{a}.{b}" for a, b in RTX_COMPUTE_CAPABILITIES)
    if tuple(compute_capability) not in RTX_COMPUTE_CAPABILITIES:
        return finish(
            "deferred",
            f"TensorRT-RTX cannot build for compute capability {cc}; it builds for {supported}. "
            "Use the tensorrt backend for this target",
        )
    missing = available()
    if missing is not None:
        return finish("deferred", missing)
    if not onnx_path.is_file():
        raise InputError(f"{onnx_path} does not exist", "lower the model to ONNX first")
    nodes = _graph_nodes(onnx_path)
    # sparsify-2of4's 2:4 weights: let the builder use sparse tensor cores (sm 8.0 and newer).
    from fdec.lower.tensorrt import graph_sparsity

    sparsity = (
        graph_sparsity(onnx_path, spec)
        if compute_capability >= (8, 0) and spec is not None
        else None
    )
    result.sparse_weights = bool(sparsity and sparsity["kept"])

    with _trt_session() as (trt, messages):
        result.tensorrt_rtx_version = trt.__version__
        # Every TensorRT object lives in _build's frame, so it is gone before the lock is freed.
        status, reason = _build(
            trt, messages, onnx_path, out_dir, nodes, profiles, compute_capability, result, progress
        )
    finish(status, reason)
    if status == "built":
        progress(
            f"tensorrt-rtx: {ENGINE_FILE} for {cc}, {result.bytes / 1e6:.1f} MB "
            f"in {result.wall_s:.1f} s"
        )
    return result


def _build(
    trt: Any,
    messages: list[tuple[Any, str]],
    onnx_path: pathlib.Path,
    out_dir: pathlib.Path,
    nodes: list[tuple[str, str, str]],
    profiles: list[Profile],
    compute_capability: tuple[int, int],
    result: RtxBuildResult,
    progress: Callable[[str], None],
) -> tuple[str, str | None]:
    """Parse, configure, build and write the engine; fills `result`, returns (status, reason)."""
    cc = result.compute_capability
    member = getattr(
        trt.ComputeCapability, f"SM{compute_capability[0]}{compute_capability[1]}", None
    )
    if member is None:
        return "deferred", (
            f"the installed tensorrt-rtx {trt.__version__} cannot build for compute "
            f"capability {cc}; upgrade it with {_INSTALL_FIX}"
        )
    progress(f"tensorrt-rtx {trt.__version__}: parsing {onnx_path.name}")
    builder = trt.Builder(_collector(trt))
    # Networks are always strongly typed in TensorRT-RTX: precision is the graph's types.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, _collector(trt))
    if not parser.parse_from_file(str(onnx_path)):
        first = _first_parser_error(parser) or _first_error(messages)
        result.unsupported = _unsupported(trt, onnx_path, nodes, messages)
        if not result.unsupported:
            return "failed", f"parsing {onnx_path.name} failed: {first or 'no reason given'}"
        names = ", ".join(_node_label(entry) for entry in result.unsupported[:5])
        more = len(result.unsupported) - 5
        return "unsupported", (
            f"TensorRT-RTX's ONNX parser cannot take {len(result.unsupported)} node(s): "
            f"{names}{f' and {more} more' if more > 0 else ''}"
        )

    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    if not config.set_compute_capability(member, 0):
        return "failed", _first_error(messages) or f"TensorRT-RTX refused compute capability {cc}"
    _apply_precision(trt, config, network)
    if result.sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes.items():
            trt_profile.set_shape(name, low, opt, high)
        if config.add_optimization_profile(trt_profile) < 0:
            first = _first_error(messages) or "TensorRT rejected its shapes"
            return "failed", f"optimization profile {profile.name!r}: {first}"

    progress(f"tensorrt-rtx: building for compute capability {cc} ({len(profiles)} profiles)")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        return "failed", _first_error(messages) or "the builder returned no engine"
    listing = next((msg for _, msg in messages if msg.startswith(_LAYERS_HEADER)), None)
    result.engine_precision = engine_precision(listing) if listing else None
    result.kernels = profile_kernels(listing, [p.name for p in profiles]) if listing else None
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / ENGINE_FILE
    partial = out_dir / f".{ENGINE_FILE}.{os.getpid()}.partial"
    try:
        with open(partial, "wb") as handle:
            handle.write(serialized)
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    result.engine = ENGINE_FILE
    result.bytes = final.stat().st_size
    return "built", None


# ---------------------------------------------------------------------------------------------
# Profiles and precision


def _engine_profiles(profiles: list[Profile]) -> list[Profile]:
    """The profiles TensorRT-RTX is given: those of `profiles_for`, a decode profile of batch
    1 at most taking batch 2 at most.

    The "context" profile pins the past to length 0 (min = opt = max = 0 on the sequence axis
    of every past_key_values input). TensorRT-RTX 1.7.1 accepts that and builds (checked in the
    tests), so no dummy past slot is needed; if a later version rejects zero-length
    dimensions, adapt the profiles here (past 1 with a masked slot), not in profiles.py.

    The "generation" profile of a `--max-batch 1` build has every GEMM's rows static (one
    token, one sequence). There TensorRT-RTX 1.7.1 builds each int8 / FP8 weight-only GEMM as
    a kernel with no inputs that writes the whole weight dequantized to bf16/fp16, then a dense
    GEMM; with the batch dynamic it fuses the dequantization into the GEMM (`runtime_fusion`),
    as in the prefill profile. SmolLM2's default rtx4090 engine: 282.0 → 215.6 MB, 428 → 398
    decode kernels (docs/design-notes.md, session 30). Batch 1 still runs (opt stays 1).
    """
    return [_batch_up_to_two(p) if p.name == "generation" else p for p in profiles]


def _batch_up_to_two(profile: Profile) -> Profile:
    if any(high[0] != 1 for _, _, high in profile.shapes.values()):
        return profile  # a batched decode profile is dynamic already
    shapes = {name: (low, opt, (2, *high[1:])) for name, (low, opt, high) in profile.shapes.items()}
    return Profile(profile.name, shapes)


def _apply_precision(trt: Any, config: Any, network: Any) -> None:
    """Precision is the graph's: TensorRT-RTX networks are strongly typed and
    `tensorrt_rtx.BuilderFlag` has no FP16, BF16, INT8 or FP8 flags. The build asks for the
    detailed layer listing instead, so `engine_precision` can say what the engine computes in.
    """
    del network
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED


# The builder's VERBOSE message holding the engine inspector's one-line-per-layer listing.
_LAYERS_HEADER = "Layers:"
# FP4E2M1: what TensorRT-RTX 1.7.1's listing calls FP4 (an NVFP4 GEMM's inputs and weights).
_DATATYPES = {"FP8": "fp8", "Int8": "int8", "Int4": "int4", "FP4": "fp4", "FP4E2M1": "fp4",
              "Half": "fp16", "BFloat16": "bf16", "Float": "fp32"}  # fmt: skip
_QUANTIZED = frozenset({"FP8", "Int8", "Int4", "FP4", "FP4E2M1"})


def engine_precision(listing: str) -> dict[str, Any]:
    """What an engine's matrix products compute in, from the engine inspector's layer listing.

    A matrix product is a `gemm` layer, or a fused layer holding a quantized 2-D weight (int4
    weight-only GEMMs are `runtime_fusion` layers; its largest one is the weight). Returns {"gemms": {label: count},
    "precision": the most common label}; a label is the activations' type, with the weights'
    type when it differs ("fp16 (int4 weights)"). Both optimization profiles are counted.
    """
    import re

    tensor = re.compile(r"Dimensions: \[([^\]]*)\][^}]*?Datatype: (\w+)")
    counts: dict[str, int] = {}
    for line in listing.splitlines():
        match = re.search(
            r"LayerType: (\w+), Inputs: \[(.*?)\], Constants: \[(.*?)\], Outputs", line
        )
        if match is None:
            continue
        inputs = tensor.findall(match.group(2))
        # matrix constants ([K, N], or [1, K, N] in a batched product), largest first: the
        # weight before its block scales (NVFP4's FP8 ones)
        constants = [
            ([abs(int(d)) for d in dims.split(",") if d], dtype)
            for dims, dtype in tensor.findall(match.group(3))
        ]
        matrices = [
            dtype
            for dims, dtype in sorted(constants, key=lambda found: -math.prod(found[0]))
            if sum(d > 1 for d in dims) == 2
        ]
        # a fused layer counts by a quantized weight of exactly [K, N], or [1, K, N] in a
        # runtime fusion (a decoder's batched weight-only GEMM; a kgen reshaping FP8 block
        # scales of [1, rows, K/16] is none)
        fused = match.group(1) == "runtime_fusion"
        quantized = any(
            dtype in _QUANTIZED and (len(dims) == 2 or (fused and len(dims) == 3 and dims[0] == 1))
            for dims, dtype in constants
        )
        if not inputs or inputs[0][1] not in _DATATYPES:  # a Gather of int ids, not a product
            continue
        if not (match.group(1) == "gemm" or quantized):
            continue
        activations = _DATATYPES.get(inputs[0][1], inputs[0][1])
        weight_types = matrices[:1] or [dtype for _, dtype in inputs[1:2]]
        weights = _DATATYPES.get(weight_types[0], weight_types[0]) if weight_types else None
        label = (
            activations if weights in (None, activations) else f"{activations} ({weights} weights)"
        )
        counts[label] = counts.get(label, 0) + 1
    top = max(counts, key=lambda label: counts[label]) if counts else None
    return {"gemms": dict(sorted(counts.items())), "precision": top}


# Listed layers that launch no kernel: stream events and shape bookkeeping.
# listing layer types that launch no kernel: stream events and shape bookkeeping
NOT_KERNELS = frozenset({"signal", "wait", "shape_call", "ShapeHostToDevice"})


def listed_layers(listing: str, profiles: int) -> list[tuple[str, str, int]] | None:
    """(name, layer type, profile index) of each layer of the inspector listing. A layer of
    profile k > 0 is named "... [profile k]"; a fused (Myelin) layer's name ends in
    "_myl<graph>_<i>" and often carries no mark: a graph serves one profile, so with one graph
    per profile the k-th graph listed is profile k's, else a graph takes the mark of any of its
    layers, or the profile of the marked layer before it (TensorRT-RTX 1.7.1's naming:
    observed, not documented). None when the listing does not hold `profiles` profiles."""
    import re

    layers = re.findall(r"Name: (.*?), LayerType: (\w+),", listing)
    graph_of = [re.search(r"_myl(\d+)_\d+$", name) for name, _ in layers]
    marks = [re.search(r"\[profile (\d+)\]", name) for name, _ in layers]
    graphs: dict[str, int] = {}
    for graph, mark in zip(graph_of, marks, strict=True):
        if graph and mark:
            graphs[graph.group(1)] = max(graphs.get(graph.group(1), 0), int(mark.group(1)))
    order = list(dict.fromkeys(graph.group(1) for graph in graph_of if graph))
    if len(order) == profiles and all(graphs.get(g, i) == i for i, g in enumerate(order)):
        graphs = {graph: index for index, graph in enumerate(order)}
    placed, current = [], 0
    for (name, kind), graph, mark in zip(layers, graph_of, marks, strict=True):
        if mark:
            current = int(mark.group(1))
        elif graph:
            current = graphs.setdefault(graph.group(1), current)
        if current >= profiles:
            return None
        placed.append((name, kind, current))
    return placed if {index for *_, index in placed} == set(range(profiles)) else None


def profile_kernels(listing: str, names: list[str]) -> dict[str, int] | None:
    """Kernels each optimization profile launches per run (`listed_layers`), less stream
    events and shape bookkeeping. None when the listing's profiles are not `names`' (the
    roofline then estimates launches without it)."""
    placed = listed_layers(listing, len(names))
    if placed is None:
        return None
    counts = [0] * len(names)
    for _, kind, index in placed:
        counts[index] += kind not in NOT_KERNELS
    return dict(zip(names, counts, strict=True)) if all(counts) else None


# ---------------------------------------------------------------------------------------------
# TensorRT logger and parser helpers


@contextmanager
def _trt_session() -> Iterator[tuple[Any, list[tuple[Any, str]]]]:
    """Hold the build lock and collect TensorRT's messages for this call."""
    import tensorrt_rtx as trt

    with _BUILD_LOCK:
        collector = _collector(trt)
        outer = collector.messages
        collector.messages = []
        try:
            yield trt, collector.messages
        finally:
            collector.messages = outer


_COLLECTOR: Any = None


def _collector(trt: Any) -> Any:
    """The process-wide logger that keeps TensorRT's messages instead of printing them."""
    global _COLLECTOR
    if _COLLECTOR is None:

        class _Collector(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.messages: list[tuple[Any, str]] = []

            def log(self, severity: Any, msg: str) -> None:
                # VERBOSE messages (one per layer and tactic) are dropped, but for the
                # engine's layer listing.
                if severity == trt.ILogger.VERBOSE and not msg.startswith(_LAYERS_HEADER):
                    return
                self.messages.append((severity, msg))
                if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                    logger.debug("tensorrt-rtx error: %s", msg)
                elif severity == trt.ILogger.WARNING:
                    logger.debug("tensorrt-rtx warning: %s", msg)

        _COLLECTOR = _Collector()
    return _COLLECTOR


def _first_error(messages: list[tuple[Any, str]]) -> str | None:
    import tensorrt_rtx as trt

    for severity, msg in messages:
        if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
            lines = [line.strip() for line in msg.splitlines() if line.strip()]
            if lines:
                return lines[0]
    return None


def _first_parser_error(parser: Any) -> str | None:
    if parser.num_errors == 0:
        return None
    error = parser.get_error(0)
    where = f" at node {error.node_name()!r} ({error.node_operator()})" if error.node() >= 0 else ""
    return f"{error.desc()}{where}"


def _graph_nodes(onnx_path: pathlib.Path) -> list[tuple[str, str, str]]:
    """(name, op_type, domain) of the top-level nodes, read without the external weights."""
    import onnx

    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except FileNotFoundError:
        raise InputError(f"{onnx_path} does not exist", "lower the model to ONNX first") from None
    except Exception as error:  # onnx raises DecodeError and friends
        raise InputError(
            f"{onnx_path} is not a readable ONNX model ({error})", "export the model again"
        ) from None
    return [(node.name, node.op_type, node.domain) for node in proto.graph.node]


def _unsupported(
    trt: Any,
    onnx_path: pathlib.Path,
    nodes: list[tuple[str, str, str]],
    messages: list[tuple[Any, str]],
) -> list[dict[str, Any]]:
    """Run `supports_model_v2`; every node the parser reports, plus nodes no subgraph covers."""
    builder = trt.Builder(_collector(trt))
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, _collector(trt))
    if parser.supports_model_v2(onnx_path.read_bytes(), str(onnx_path)):
        return []
    by_name = {name: (op, domain) for name, op, domain in nodes if name}
    found: dict[tuple[int, str], dict[str, Any]] = {}
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        index, name, op_type, domain = error.node(), error.node_name(), error.node_operator(), ""
        if error.local_function_stack_size() == 0 and 0 <= index < len(nodes):
            name, op_type, domain = nodes[index]
        elif name in by_name:  # a node inside a local function: its index is not the graph's
            op_type, domain = by_name[name]
            index = next(k for k, node in enumerate(nodes) if node[0] == name)
        else:
            index = -1
        found.setdefault(
            (index, name),
            {
                "name": name or None,
                "op_type": op_type or None,
                "domain": domain,
                "index": index,
                "reason": error.desc(),
            },
        )
    covered = {int(i) for s in range(parser.num_subgraphs) for i in parser.get_subgraph_nodes(s)}
    for index, (name, op_type, domain) in enumerate(nodes):
        if index not in covered and (index, name) not in found:
            found[index, name] = {
                "name": name,
                "op_type": op_type,
                "domain": domain,
                "index": index,
                "reason": "left out of every subgraph TensorRT-RTX can parse",
            }
    if not found:  # unsupported, yet no node named: report the parser's own words
        first = _first_error(messages) or "the parser gave no reason"
        found[-1, ""] = {"name": None, "op_type": None, "domain": "", "index": -1, "reason": first}
    return [found[key] for key in sorted(found, key=lambda k: (k[0] < 0, k))]


def _node_label(entry: dict[str, Any]) -> str:
    domain = entry.get("domain")
    op = entry.get("op_type") or "?"
    qualified = f"{domain}.{op}" if domain and domain != "ai.onnx" else op
    return f"{entry.get('name') or '(unnamed)'} ({qualified})"
