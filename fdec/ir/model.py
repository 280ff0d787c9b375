"""FdecModel: an onnx-ir model together with the ModelSpec that describes it."""

from __future__ import annotations

import dataclasses
import pathlib

import onnx_ir as ir

from fdec.ir.spec import ModelSpec

__all__ = ["FdecModel", "GraphCounts", "count_graph", "save_model"]

EXTERNAL_DATA_SUFFIX = ".data"

#: Ops that read only their input's shape, never its values (so never its dtype).
SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})
# Tensors up to this size stay in the proto: shape inputs (axes, shapes) must be inline for ORT.
_INLINE_BYTES = 1024


@dataclasses.dataclass(frozen=True)
class GraphCounts:
    """Size figures of a graph, recorded before and after every pass."""

    nodes: int
    initializers: int
    parameters: int
    bytes: int
    op_types: int

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def count_graph(graph: ir.Graph) -> GraphCounts:
    """Count nodes (all subgraphs included), initializers, their elements and their bytes."""
    nodes = 0
    op_types = set()
    for node in ir.traversal.RecursiveGraphIterator(graph):
        nodes += 1
        op_types.add((node.domain, node.op_type))
    parameters = 0
    nbytes = 0
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        parameters += tensor.size
        nbytes += tensor.nbytes
    return GraphCounts(
        nodes=nodes,
        initializers=len(graph.initializers),
        parameters=parameters,
        bytes=nbytes,
        op_types=len(op_types),
    )


def save_model(model: ir.Model, path: str | pathlib.Path) -> list[pathlib.Path]:
    """Write `model` as `path` plus `path.data` (initializers over 1 KB external); returns the files."""
    path = pathlib.Path(path)
    data_name = path.name + EXTERNAL_DATA_SUFFIX
    ir.save(model, path, external_data=data_name, size_threshold_bytes=_INLINE_BYTES)
    files = [path]
    if (path.parent / data_name).exists():
        files.append(path.parent / data_name)
    return files


@dataclasses.dataclass
class FdecModel:
    """The graph IR fdec passes work on: `model` is the onnx-ir model, `spec` its semantic map."""

    model: ir.Model
    spec: ModelSpec

    @property
    def graph(self) -> ir.Graph:
        return self.model.graph

    def counts(self) -> GraphCounts:
        return count_graph(self.model.graph)

    def spec_problems(self) -> list[str]:
        return self.spec.problems(self.model)

    def save(self, path: str | pathlib.Path) -> list[pathlib.Path]:
        return save_model(self.model, path)


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc `malloc_trim`).

    Weights freed after a model is dropped otherwise stay in the process's heap arenas, so the
    next large allocation (an ONNX Runtime session) adds to the peak RSS instead of reusing them.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
