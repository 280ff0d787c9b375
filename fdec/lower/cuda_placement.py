"""Which nodes ONNX Runtime's CUDA provider runs on the host, and which values it copies.

fdec.lower.cuda_kernels finds the nodes without a CUDA kernel. A graph where every node has
one can still cross between host and device: some CUDA kernels take an input in host memory
(GroupQueryAttention's total_sequence_length, Reshape's shape, a reduction's axes) or write
their output there (Shape, Size). ONNX Runtime then

1. moves small shape computations to the CPU on purpose: starting from the readers of host
   values, a node goes to the CPU when none of its inputs is fp16/bf16/fp8 and each is a small
   initializer (at most 100 elements), a graph input, or a host value its CUDA kernel does not
   itself take in host memory (onnxruntime/core/framework/fallback_cpu_capability.cc,
   GetCpuPreferredNodes);
2. inserts a MemcpyToHost where a device value is read on the host (by a CPU node, or by a
   CUDA kernel's host-memory input), and a MemcpyFromHost where a host value is read by a CUDA
   kernel's device input. Graph inputs and initializers are copied where they are read, with
   no Memcpy node.

This module replays those two rules on the graph fdec writes, with the CUDA kernels' memory
types from fdec/data/cuda_memory_types.json (read from ONNX Runtime's kernel registrations;
each entry names its file and commit). A Memcpy node costs a device synchronisation each run,
and ONNX Runtime refuses to capture CUDA graphs for a graph that has one
(inference_session.cc: all nodes on CUDA or CPU, and no Memcpy nodes); host shape nodes are
allowed. It is a prediction: ONNX Runtime's graph optimizations may still change the graph,
and benchmarks/gpu.py profiles the real placement on a GPU machine.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
from typing import Any

from fdec.lower.cuda_contracts import CHECKED_AGAINST, contract_breaches
from fdec.lower.cuda_kernels import (
    PROVIDER,
    CpuPlacedNode,
    as_ir_model,
    as_run,
    kernel_misses,
    kernel_table,
    onnx_domain,
)

__all__ = [
    "HostCopy",
    "Placement",
    "memory_type_table",
    "memory_types",
    "placement_summary",
    "predict_placement",
]

_TABLE_FILE = "cuda_memory_types.json"
_SMALL_INITIALIZER = 100  # elements; kSmallInitializerThreshold in fallback_cpu_capability.cc
_LOW_FLOATS = frozenset(
    {"FLOAT16", "BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ"}
)


@functools.cache
def memory_type_table() -> dict[str, Any]:
    """fdec/data/cuda_memory_types.json: {"provider", "source", "ops": {domain: {op: [{"since",
    "until", "cpu_inputs", "cpu_outputs", "file", "commit"}]}}, "notes"}."""
    text = (importlib.resources.files("fdec") / "data" / _TABLE_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def memory_types(op_type: str, domain: str = "", version: int = 1) -> tuple[tuple[int, ...], ...]:
    """(host-memory input indices, host-memory output indices) of the CUDA kernel for the op at
    that opset version; ((), ()) for ops whose kernels keep everything on the device."""
    for entry in memory_type_table()["ops"].get(onnx_domain(domain), {}).get(op_type, []):
        until = entry["until"]
        if entry["since"] <= version and (until is None or version <= until):
            return tuple(entry["cpu_inputs"]), tuple(entry["cpu_outputs"])
    return (), ()


@dataclasses.dataclass(frozen=True)
class HostCopy:
    """A Memcpy node ONNX Runtime would insert: `value` copied `direction` for `readers`."""

    value: str
    direction: str  # "MemcpyToHost" or "MemcpyFromHost"
    producer: str  # "op name" of the node that makes the value
    readers: tuple[str, ...]  # "op name[input index]" of the nodes it is copied for

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Placement:
    """The predicted placement: nodes on the host (without a CUDA kernel, or shape work moved
    there on purpose) and the Memcpy nodes between host and device."""

    nodes: int
    no_kernel: list[CpuPlacedNode]  # no CUDA kernel for their types (fdec.lower.cuda_kernels)
    host_shape_nodes: dict[str, int]  # op → count, moved to the CPU by rule 1
    copies: list[HostCopy]

    @property
    def cuda_graph_capturable(self) -> bool:
        """ONNX Runtime's condition for capturing CUDA graphs: no Memcpy node (nodes without a
        kernel bring one each way around them)."""
        return not self.copies and not self.no_kernel

    def to_dict(self) -> dict[str, Any]:
        return {
            "host_shape_nodes": dict(sorted(self.host_shape_nodes.items())),
            "memcpy_nodes": len(self.copies),
            "memcpy": [copy.to_dict() for copy in self.copies],
            "cuda_graph_capturable": self.cuda_graph_capturable,
        }


def _label(node: Any) -> str:
    op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain} {node.op_type}"
    return f"{op} {node.name}" if node.name else op


def predict_placement(model: Any) -> Placement:
    """ONNX Runtime's CUDA placement of `model` (FdecModel, onnx_ir.Model, ModelProto or path)
    by the two rules in the module docstring; the main graph only (fdec's graphs have no
    control flow)."""
    ir_model = as_ir_model(model)
    graph = ir_model.graph
    opsets = {onnx_domain(d): v for d, v in ir_model.opset_imports.items()}
    misses = kernel_misses(ir_model)
    no_kernel = {id(node) for node, _ in misses}
    nodes = [node for node in graph if not (node.op_type == "Constant" and node.domain == "")]
    order = {id(node): i for i, node in enumerate(nodes)}
    kinds: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    reads: dict[int, list[Any]] = {}  # the inputs each node reads as ONNX Runtime runs it
    for node in nodes:
        domain = onnx_domain(node.domain)
        version = node.version or opsets.get(domain) or 1
        op_type, reads[id(node)] = as_run(node)
        kinds[id(node)] = memory_types(op_type, domain, version)

    def constant(value: Any) -> bool:  # initializers, and Constant nodes (initializers at load)
        producer = value.producer()
        if value.is_initializer() or value.const_value is not None:
            return True
        return producer is not None and producer.op_type == "Constant" and producer.domain == ""

    def small(value: Any) -> bool:
        size = 1
        for dim in value.shape or ():
            if not isinstance(dim, int):
                return False
            size *= dim
        return constant(value) and value.shape is not None and size <= _SMALL_INITIALIZER

    on_host: set[int] = {id(node) for node in nodes if id(node) in no_kernel}
    host_values: set[int] = set()  # ids of values that live in host memory
    candidates: set[int] = set()
    for node in nodes:
        outputs = node.outputs if id(node) in on_host else [
            node.outputs[i] for i in kinds[id(node)][1] if i < len(node.outputs)
        ]  # fmt: skip
        for value in outputs:
            if value is not None:
                host_values.add(id(value))
                candidates.update(id(use.node) for use in value.uses())
    by_id = {id(node): node for node in nodes}
    moved: dict[str, int] = {}
    visited: set[int] = set()
    while candidates:  # ONNX Runtime walks them in topological order
        current = min(candidates, key=lambda i: order.get(i, -1))
        candidates.discard(current)
        node = by_id.get(current)
        if node is None or current in visited or current in on_host:
            visited.add(current)
            continue
        visited.add(current)
        host_inputs = kinds[current][0]
        move = True
        for index, value in enumerate(reads[id(node)]):
            if value is None:
                continue
            dtype = value.dtype.name if value.dtype is not None else ""
            if dtype in _LOW_FLOATS:
                move = False
                break
            if small(value) or value.is_graph_input():
                continue
            if id(value) not in host_values or index in host_inputs:
                move = False
                break
        if move:
            on_host.add(current)
            moved[node.op_type] = moved.get(node.op_type, 0) + 1
            for value in node.outputs:
                host_values.add(id(value))
                candidates.update(id(use.node) for use in value.uses())

    copies: dict[tuple[int, str], tuple[Any, str, list[str]]] = {}
    for node in nodes:
        host = id(node) in on_host
        host_inputs = kinds[id(node)][0]
        for index, value in enumerate(reads[id(node)]):
            if value is None or value.is_graph_input() or constant(value):
                continue
            wants_host = host or index in host_inputs
            is_host = id(value) in host_values
            if wants_host == is_host:
                continue
            direction = "MemcpyToHost" if wants_host else "MemcpyFromHost"
            producer = value.producer()
            key = (id(value), direction)
            if key not in copies:
                copies[key] = (value, _label(producer) if producer else "?", [])
            copies[key][2].append(f"{_label(node)}[{index}]")
    return Placement(
        nodes=len(nodes),
        no_kernel=[found for _, found in misses],
        host_shape_nodes=moved,
        copies=[
            HostCopy(value.name or "?", direction, producer, tuple(readers))
            for (_, direction), (value, producer, readers) in copies.items()
        ],
    )


def placement_summary(model: Any, *, examples: int = 5) -> dict[str, Any]:
    """For a report: the nodes that would leave the GPU under ONNX Runtime's CUDA provider
    (no kernel for their types, grouped by op and types), the shape nodes it runs on the host,
    the Memcpy nodes it would insert, and the nodes its kernels would refuse or get wrong
    (fdec.lower.cuda_contracts), with the tables' sources. `ok` is True when no node lacks a
    kernel, no value crosses between host and device, and no kernel refuses its node."""
    ir_model = as_ir_model(model)  # a path is read once for both
    placement = predict_placement(ir_model)
    breaches = contract_breaches(ir_model)
    groups: dict[str, dict[str, Any]] = {}
    for node in placement.no_kernel:
        types = ", ".join(f"{k}={v}" for k, v in sorted(node.types.items()))
        key = f"{node.op} ({types})" if types else node.op
        group = groups.setdefault(key, {"count": 0, "reason": node.reason, "nodes": []})
        group["count"] += 1
        if len(group["nodes"]) < examples:
            group["nodes"].append(node.name)
    table = kernel_table()
    return {
        "provider": PROVIDER,
        "ok": placement.cuda_graph_capturable and not breaches,
        "nodes": placement.nodes,
        "cpu_nodes": len(placement.no_kernel),
        "by_op": groups,
        **placement.to_dict(),
        "kernel_table": {"url": table["source"]["url"], "commit": table["source"]["commit"]},
        "memory_types": memory_type_table()["source"]["note"],
        # nodes the CUDA kernels would refuse or get wrong (fdec.lower.cuda_contracts)
        "contract_breaches": [breach.to_dict() for breach in breaches],
        "contracts": CHECKED_AGAINST,
        "label": "predicted from ONNX Runtime's kernel registrations, not a GPU session",
    }
