"""The weight-site library passes share: find a linear layer's weight and the nodes reading it,
add initializers under fresh names, replace a site's node, retire a weight, raise the opset.

A *site* is one node computing `A @ W (+ bias)` (MatMul, or Gemm without transA/alpha/beta)
with W an initializer; a *weight* is that initializer as a float32 [K, N] array with every site
reading it (directly or through `Transpose(perm=[1, 0])`) and, where asked, the axis-0 Gathers
of a tied embedding table. Quantizers, pruning and sparsity rewrite weights through it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
from typing import Any

import numpy as np
import onnx_ir as ir

from fdec.errors import CompileError
from fdec.ir import WEIGHT_ROLES, FdecModel
from fdec.ir.spill import spill_tensor

__all__ = [
    "FLOAT_TYPES",
    "LAYER_ROLE",
    "LINEAR_ROLES",
    "Site",
    "Weight",
    "add_initializer",
    "candidate_names",
    "collect_weights",
    "find_weight",
    "float_attr",
    "fresh_name",
    "int_attr",
    "is_row_gather",
    "matmul_site",
    "per_channel_quantize",
    "raise_opset",
    "replace_node",
    "replace_site",
    "retire_weight",
]

logger = logging.getLogger(__name__)

# Per-layer roles whose weight is a linear layer's [K, N] matrix (the embedding is a Gather).
LINEAR_ROLES = frozenset(WEIGHT_ROLES)
LAYER_ROLE = re.compile(r"^layers\.\d+\.(\w+)$")
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


@dataclasses.dataclass
class Site:
    """One node computing `A @ W` (+ bias) with W a quantizable weight."""

    node: ir.Node  # MatMul or Gemm
    activation: ir.Value
    bias: ir.Value | None = None


@dataclasses.dataclass
class Weight:
    """A weight initializer, its [K, N] array and every site reading it.

    `array` is read from the initializer when first asked when the initializer's data is not
    in memory (a lazy or external tensor: fdec.frontend.stream binds weights to the
    checkpoint), and `release()` drops it again, so a pass walking the weights holds one
    float copy at a time instead of all of them."""

    value: ir.Value
    _array: np.ndarray | None  # [K, N], float32 (read-only: may be a view of the initializer)
    dtype: ir.DataType  # the original dtype (scales keep it)
    sites: list[Site]
    transposes: list[ir.Node]  # Transpose nodes between the weight and its sites
    # Axis-0 Gathers of a tied token embedding ([N, K] rows), when the caller allowed them.
    gathers: list[ir.Node] = dataclasses.field(default_factory=list)
    # The [K] factors `array`'s rows were multiplied by (AWQ) where its sites' activation was
    # divided by them; a gathered row must be divided by them again.
    row_scales: np.ndarray | None = None
    head: bool = False  # the lm_head (ModelSpec role "lm_head")
    # Codes already chosen (AWQ rounds each group as soon as it is searched, then drops the
    # scaled float array); None: the quantizer rounds `array`.
    quantized: Any = None  # fdec.passes.quantize.Int4Weight
    _transposed: bool = False  # the initializer is [N, K]

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = _float32(self.value.const_value, self._transposed)
        return self._array

    @array.setter
    def array(self, array: np.ndarray) -> None:
        self._array = array

    @property
    def shape(self) -> tuple[int, int]:
        """[K, N] of `array`, without reading a lazily bound weight."""
        if self._array is not None:
            return self._array.shape
        rows, columns = (int(d) for d in self.value.const_value.shape)
        return (columns, rows) if self._transposed else (rows, columns)

    def release(self) -> None:
        """Drop a float array read lazily (kept when it is a view of in-memory data), and close
        an external tensor's memory map: the pages read stay in the process's RSS while it is
        open (an 8B's spilled 2.1 GB lm_head stayed mapped into the fp8 pass, 2.08 GiB of RSS)."""
        tensor = self.value.const_value
        if _lazy(tensor):
            self._array = None
        if isinstance(tensor, ir.ExternalTensor):
            try:
                tensor.release()  # read again from the file when next asked
            except BufferError:  # a view of the map is still held elsewhere: it stays open
                logger.debug("%s: its memory map is still in use", self.value.name)


def _lazy(tensor: Any) -> bool:
    return isinstance(tensor, (ir.LazyTensor, ir.ExternalTensor))


def _float32(tensor: Any, transposed: bool) -> np.ndarray:
    array = tensor.numpy().astype(np.float32, copy=False)
    return array.T if transposed else array


_CHUNK_BYTES = 64 << 20  # float32 rows quantized per step: bounds the temporaries of a 2 GB table


def row_chunks(array: np.ndarray) -> list[slice]:
    """Slices of ~64 MB of float32 rows of a 2-D array: what a whole-array computation over an
    8B model's 2.1 GB vocabulary table does a chunk at a time, one chunk of temporaries."""
    rows = max(1, _CHUNK_BYTES // max(1, 4 * int(array.shape[1])))
    return [slice(start, start + rows) for start in range(0, array.shape[0], rows)]


def channel_peaks(array: np.ndarray) -> np.ndarray:
    """Each column's largest |w| of a 2-D float32 [K, N] array, read a chunk of rows at a time."""
    chunks = row_chunks(array)
    peak = np.abs(array[chunks[0]]).max(axis=0) if chunks else np.zeros(array.shape[1])
    for chunk in chunks[1:]:
        np.maximum(peak, np.abs(array[chunk]).max(axis=0), out=peak)
    return peak


def scales_of(peak: np.ndarray, qmax: float) -> np.ndarray:
    """Symmetric scales mapping each `peak` to `qmax` (a zero peak: 1), float32."""
    return np.where(peak > 0, peak / qmax, 1.0).astype(np.float32)


def per_channel_quantize(
    array: np.ndarray, qmax: float, code_dtype: Any, *, channel_axis: int = 1, rint: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel codes of a 2-D float32 array: (codes [same shape] as `code_dtype`,
    float32 scales, one per channel along `channel_axis`).

    Each channel's largest |w| maps to `qmax` (an all-zero channel gets scale 1); values are
    divided by their scale, rounded to integers when `rint` (int8; fp8 rounds in the cast), and
    clipped to ±qmax. Rows are done ~64 MB at a time, so an 8B model's 2.1 GB vocabulary table
    costs its codes and one chunk, not four float copies; the result is the whole-array one.
    """
    chunks = row_chunks(array)
    if channel_axis == 1:
        peak = channel_peaks(array)
    else:
        peak = np.concatenate([np.abs(array[chunk]).max(axis=1) for chunk in chunks])
    scales = scales_of(peak, qmax)
    codes = np.empty(array.shape, dtype=code_dtype)
    for chunk in chunks:
        x = array[chunk] / (scales if channel_axis == 1 else scales[chunk, None])
        if rint:
            np.rint(x, out=x)
        np.clip(x, -qmax, qmax, out=x)
        codes[chunk] = x.astype(code_dtype)
    return codes, scales


def candidate_names(model: FdecModel, include_lm_head: bool) -> list[str]:
    """Initializer names (in spec order, no repeats) whose role is a quantizable linear layer."""
    names: list[str] = []
    for role, name in model.spec.weights.items():
        match = LAYER_ROLE.match(role)
        wanted = (match is not None and match.group(1) in LINEAR_ROLES) or (
            role == "lm_head" and include_lm_head
        )
        if wanted and name not in names:
            names.append(name)
    return names


def int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_float()


def matmul_site(node: ir.Node, index: int, *, through_transpose: bool) -> tuple[Site, bool]:
    """A site for `node` reading the weight at input `index`; (site, reads W transposed).

    Raises ValueError naming the reason when the node is not a plain `A @ W (+ bias)`.
    """
    if node.domain != "" or node.op_type not in ("MatMul", "Gemm") or index != 1:
        raise ValueError(f"read by {node.op_type or 'a node'} (input {index})")
    activation = node.inputs[0]
    if activation is None:
        raise ValueError(f"{node.op_type} without an activation")
    if node.op_type == "MatMul":
        return Site(node, activation), through_transpose
    if int_attr(node, "transA", 0) or float_attr(node, "alpha", 1.0) != 1.0:
        raise ValueError("Gemm with transA or alpha")
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and float_attr(node, "beta", 1.0) != 1.0:
        raise ValueError("Gemm with beta")
    transposed = bool(int_attr(node, "transB", 0)) != through_transpose
    return Site(node, activation, bias), transposed


def is_row_gather(node: ir.Node, index: int) -> bool:
    """Whether `node` reads its input `index` as the table of a top-level axis-0 Gather."""
    axis = node.attributes.get("axis")
    return (
        node.op_type == "Gather"
        and node.domain == ""
        and index == 0
        and (axis is None or axis.as_int() == 0)
    )


def find_weight(graph: ir.Graph, name: str, *, gathers: bool = False) -> Weight:
    """The weight `name` with every site reading it; ValueError names why it cannot be.

    With `gathers`, axis-0 Gathers of the [N, K] table (a tied embedding, whose lm_head reads
    it transposed) are collected too instead of refused.
    """
    value = graph.initializers.get(name)
    tensor = value.const_value if value is not None else None
    if value is None or tensor is None:
        raise ValueError("not an initializer with data")
    if tensor.dtype not in FLOAT_TYPES:
        raise ValueError("not a float weight")
    if len(tensor.shape) != 2:
        raise ValueError("not a 2-D weight")
    if value.is_graph_input() or value.is_graph_output():
        raise ValueError("a graph input or output")
    sites: list[Site] = []
    transposes: list[ir.Node] = []
    row_gathers: list[ir.Node] = []
    layouts: set[bool] = set()
    for use in value.uses():
        node = use.node
        if node.graph is not graph:
            raise ValueError("read inside a subgraph")
        if gathers and is_row_gather(node, use.idx):
            row_gathers.append(node)
            continue
        if node.op_type == "Transpose" and node.domain == "":
            perm = node.attributes.get("perm")
            if perm is not None and list(perm.as_ints()) != [1, 0]:
                raise ValueError("read by a Transpose that is not [1, 0]")
            if node.outputs[0].is_graph_output():
                raise ValueError("transposed into a graph output")
            transposes.append(node)
            for inner in node.outputs[0].uses():
                site, transposed = matmul_site(inner.node, inner.idx, through_transpose=True)
                sites.append(site)
                layouts.add(transposed)
            continue
        site, transposed = matmul_site(node, use.idx, through_transpose=False)
        sites.append(site)
        layouts.add(transposed)
    if not sites:
        raise ValueError("read by no MatMul")
    if len(layouts) != 1:
        raise ValueError("read in two layouts")
    transposed = layouts.pop()
    if row_gathers and not transposed:
        raise ValueError("gathered by rows but read by a MatMul untransposed")
    # A view where the tensor is already float32 (a [K, N] array, or the transposed view of an
    # [N, K] one): holding a float copy of every weight at once doubled a pass's memory. A
    # tensor not in memory is read when the pass first asks (Weight.array).
    array = None if _lazy(tensor) else _float32(tensor, transposed)
    return Weight(
        value, array, tensor.dtype, sites, transposes, row_gathers, _transposed=transposed
    )


def collect_weights(
    model: FdecModel, include_lm_head: bool, share_tied: bool = False
) -> tuple[list[Weight], collections.Counter[str]]:
    """The quantizable weights of `model`, and why the others were skipped (reason → count).

    A weight shared with the token embedding (a tied lm_head) is skipped, unless `share_tied`:
    then it is collected with the embedding's Gathers (`Weight.gathers`).
    """
    weights: list[Weight] = []
    skipped: collections.Counter[str] = collections.Counter()
    embed = model.spec.weights.get("embed")
    head = model.spec.weights.get("lm_head")
    for name in candidate_names(model, include_lm_head):
        if name == embed and not share_tied:
            skipped["shared with the embedding"] += 1
            continue
        try:
            weights.append(find_weight(model.graph, name, gathers=name == embed))
            weights[-1].head = name == head
        except ValueError as reason:
            logger.info("not quantizing %s: %s", name, reason)
            skipped[str(reason)] += 1
    return weights, skipped


def fresh_name(graph: ir.Graph, wanted: str, taken: set[str]) -> str:
    name = wanted
    while name in graph.initializers or name in taken:
        name = "_" + name
    taken.add(name)
    return name


def add_initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    """Register `tensor` as the initializer `name`; on a streamed compile (a weight spill
    attached to the graph, fdec.ir.spill) a large one is written to the spill file and the
    initializer reads it from there, so a pass never holds every new weight in memory."""
    tensor = spill_tensor(graph, name, tensor)
    value = ir.Value(
        name=name,
        shape=ir.Shape(tensor.shape),
        type=ir.TensorType(tensor.dtype),
        const_value=tensor,
    )
    graph.register_initializer(value)
    return value


def replace_node(graph: ir.Graph, node: ir.Node, new_nodes: list[ir.Node]) -> None:
    """Put `new_nodes` where `node` was; the last one's output takes over its output."""
    ir.convenience.replace_nodes_and_values(
        graph,
        insertion_point=node,
        old_nodes=[node],
        new_nodes=new_nodes,
        old_values=[node.outputs[0]],
        new_values=[new_nodes[-1].outputs[0]],
    )


def replace_site(graph: ir.Graph, site: Site, new_nodes: list[ir.Node]) -> None:
    """Put `new_nodes` where `site.node` was (`replace_node`)."""
    replace_node(graph, site.node, new_nodes)


def retire_weight(graph: ir.Graph, weight: Weight) -> None:
    """Remove the weight's Transposes and the weight itself (its sites are gone)."""
    for node in weight.transposes:
        graph.remove(node, safe=True)
    name = weight.value.name
    assert name is not None and not weight.value.uses()
    graph.initializers.pop(name)


def raise_opset(model: FdecModel, version: int) -> bool:
    """Make the default-domain opset at least `version`; True when it changed.

    onnxscript's version converter upgrades every node whose meaning changed on the way (from
    20 to 21 only GroupNormalization does, and it has an adapter; the rest widen types).
    """
    current = model.model.opset_imports.get("", 1)
    if current >= version:
        return False
    from onnxscript import version_converter

    version_converter.convert_version(model.model, target_version=version)
    reached = model.model.opset_imports.get("", 1)
    if reached < version:
        raise CompileError(
            f"could not raise the model's opset from {current} to {version} (reached {reached})",
            "use quantize-int4 with backend=onnxruntime, or report the model",
        )
    return True
