"""Checks of the typed model before planning: standard ops only, 2:4 sparse weights, profiles that fit its inputs."""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Iterable
from typing import Any

from fdec.errors import CompileError
from fdec.ir import ModelSpec
from fdec.lower.profiles import Profile

__all__ = [
    "SPARSITY_METADATA",
    "check_profiles",
    "check_standard_ops",
    "graph_inputs",
    "graph_sparsity",
]

logger = logging.getLogger(__name__)

# Model metadata where fdec.passes.sparsity records the 2:4 sparse weights (SPARSITY_METADATA).
SPARSITY_METADATA = "fdec.sparsity"
# Domains TensorRT's ONNX parser imports: the standard operator set, and of its own "trt"
# domain the op fdec writes (NVFP4's run-time activation quantizer, fdec.passes.quantize_fp4).
_STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
_TENSORRT_OPS = frozenset({("trt", "TRT_FP4DynamicQuantize")})


def check_standard_ops(onnx_path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Nodes TensorRT's ONNX parser will not take: those in non-standard domains (com.microsoft…)
    but TensorRT's own ops fdec writes.

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
            elif node.domain not in _STANDARD_DOMAINS and key not in _TENSORRT_OPS:
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


def graph_inputs(onnx_path: pathlib.Path) -> tuple[dict[str, list[int | None]], bool]:
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


def check_profiles(profiles: list[Profile], inputs: dict[str, list[int | None]]) -> None:
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
