"""How cast-float16 (fdec.passes.typing) types a graph: which type each node computes in, and
the rewrite that gives every value, constant and edge that type.

`GraphTyper` decides per node (the reason is counted in the pass's stats):

- **kept fp32 by op**: ops in `keep_ops` (softmax, norm reductions, pow/sqrt/reciprocal, exp,
  cos/sin, ...), and elementwise ops that only combine such fp32 results with constants (the
  `+ eps` of an RMSNorm stays between its ReduceMean and Sqrt);
- **tables**: floats from positions, masks and constants alone (rotary cos/sin tables, masks):
  cheap, and fp16 rounding of `position × inv_freq` breaks long-context rotary embeddings;
- **norm**: the `x / Sqrt(...)` of an RMSNorm whose `Pow(x, 2)` is kept, so x is normalized in
  fp32 (as ONNX Runtime's norm kernels do) and ONNX Runtime can fold the chain into one
  SimplifiedLayerNormalization on the GPU;
- **masks**: the Add/Sub/Where that applies a mask just before a Softmax, so a -3.4e38 mask
  value is never cast to fp16 (where it becomes -inf);
- **logits** (the `logits` type): the node producing each `logits` output, with the Q/DQ pair
  feeding it, computes in fp32 or fp16 whatever the graph's type (a bf16 graph's logits in
  fp16: 0.03 apart at 32 instead of 0.25), or in the graph's type; an embedding Gather of the
  same tied float table reads it in that type too, rounded to the graph's type after, so the
  table is stored once;
- everything else computes in the low type; initializers and constants are stored in the type
  their readers compute in (clamped to its finite range; a copy per type where readers differ),
  Q/DQ scales included, so DequantizeLinear yields fp16/bf16 and TensorRT fuses Q/DQ into
  low-precision kernels.

Casts go where a value crosses between types, and at the edges with `keep_io_types`.
"""

from __future__ import annotations

import collections
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from fdec.ir import SHAPE_ONLY_OPS, FdecModel
from fdec.ir.spill import spill_tensor

__all__ = ["GraphTyper"]

#: Elementwise ops that stay fp32 when every non-constant float input is an fp32 result.
_FOLLOW_OPS = frozenset(
    {"Add", "Sub", "Mul", "Div", "Neg", "Abs", "Max", "Min", "Clip", "Where", "Sqrt",
     "Reciprocal", "Unsqueeze", "Squeeze", "Reshape", "Expand", "Transpose", "Identity"}
)  # fmt: skip
#: Ops whose output type is an attribute, not their inputs': computed in fp32, cast after.
_FIXED_TYPE_OPS = frozenset(
    {"ConstantOfShape", "EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike",
     "RandomUniformLike", "Multinomial", "Bernoulli"}
)  # fmt: skip
#: Ops whose output depends on the input's shape only: no taint crosses them.
_SHAPE_OPS = frozenset({"Shape", "Size"})
#: (op, input index) that must stay float32 whatever the node computes in.
_FLOAT32_INPUTS = frozenset({("Resize", 2), ("Upsample", 1)})
#: (op, output index) typed float32 whatever the node computes in: the norms' saved statistics
#: (type constraint U = float in ONNX Runtime's kernels).
_FLOAT32_OUTPUTS = frozenset(
    (op, index)
    for op in ("SkipSimplifiedLayerNormalization", "SkipLayerNormalization",
               "LayerNormalization", "SimplifiedLayerNormalization")
    for index in (1, 2)
)  # fmt: skip
_MASK_OPS = frozenset({"Add", "Sub", "Where"})
_COUNTED = ("tensors_cast", "initializers_cast", "constants_cast", "casts_inserted", "io_casts",
            "io_low", "values_clamped", "bytes_before", "bytes_after")  # fmt: skip
_SOFTMAX_OPS = frozenset({"Softmax", "LogSoftmax"})

_NAMES = {ir.DataType.FLOAT: "fp32", ir.DataType.FLOAT16: "fp16", ir.DataType.BFLOAT16: "bf16"}
_NUMPY: dict[ir.DataType, Any] = {
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.BFLOAT16: ml_dtypes.bfloat16,
}
# Largest finite value and smallest positive subnormal of each type (values beyond are clamped,
# as onnxruntime's float16 converter does with its max_finite_val / min_positive_val).
_RANGE: dict[ir.DataType, tuple[float, float]] = {
    ir.DataType.FLOAT16: (65504.0, 2.0**-24),
    ir.DataType.BFLOAT16: (float(ml_dtypes.finfo(ml_dtypes.bfloat16).max), 2.0**-133),
}


def _is_float32(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == ir.DataType.FLOAT


def _const_tensor(value: ir.Value) -> Any:
    """The constant tensor behind `value`: an initializer's, or a Constant node's `value`."""
    if value.const_value is not None and value.is_initializer():
        return value.const_value
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain == "":
        attr = producer.attributes.get("value")
        return attr.value if attr is not None else None
    return None


def _is_constant(value: ir.Value) -> bool:
    producer = value.producer()
    return value.is_initializer() or (
        producer is not None and producer.op_type == "Constant" and producer.domain == ""
    )


class GraphTyper:
    """One typing run over a model's main graph; `run` mutates it and returns the stats."""

    def __init__(
        self,
        model: FdecModel,
        *,
        low: ir.DataType,
        keep_ops: frozenset[str],
        keep_tables: bool,
        logits: ir.DataType,
        keep_io_types: bool,
        low_ops: frozenset[str] = frozenset(),
        low_io: tuple[str, ...] = (),
    ):
        self.model, self.graph, self.low = model, model.graph, low
        self.low_ops, self.low_io = low_ops, low_io
        self.keep_ops, self.keep_tables = keep_ops, keep_tables
        self.logits, self.keep_io_types = logits, keep_io_types
        self.floats = {ir.DataType.FLOAT, low, logits}
        self.nodes = list(self.graph)
        self.kept: dict[int, str] = {}  # id(node) -> reason it stays fp32
        self.apart: dict[int, str] = {}  # id(node) -> reason it computes in `logits` (neither)
        self.shared: set[int] = set()  # Gathers of a tied table the logits read in their type
        self.casts: dict[tuple[int, ir.DataType], ir.Value] = {}
        self.stats: collections.Counter = collections.Counter()

    # -- deciding ------------------------------------------------------------------------------

    def _weights(self) -> set[int]:
        """Initializers that are weights: named by the ModelSpec, or of rank 2 and more."""
        names = set(self.model.spec.weights.values()) if self.model.spec is not None else set()
        return {
            id(value)
            for name, value in self.graph.initializers.items()
            if name in names or (value.shape is not None and len(value.shape) >= 2)
        }

    def _tainted(self) -> set[int]:
        """Values that depend on an activation: a float graph input or a weight."""
        tainted = {id(v) for v in self.graph.inputs if v.dtype and v.dtype.is_floating_point()}
        tainted |= self._weights()
        for node in self.nodes:
            if node.op_type in _SHAPE_OPS and node.domain == "":
                continue
            if any(v is not None and id(v) in tainted for v in node.inputs):
                tainted.update(id(out) for out in node.outputs)
        return tainted

    def _decide(self) -> None:
        tainted = self._tainted()
        kept = self.kept
        for node in self.nodes:
            floats_out = [out for out in node.outputs if _is_float32(out)]
            if not floats_out and not any(_is_float32(v) for v in node.inputs):
                continue
            if node.op_type == "Constant" and node.domain == "":
                continue  # typed with the initializers, by their consumers
            if node.domain not in ("", "ai.onnx") and node.op_type not in self.low_ops:
                kept[id(node)] = "foreign op"
            elif any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                     for attr in node.attributes.values()):  # fmt: skip
                kept[id(node)] = "subgraph"
            elif node.op_type in _FIXED_TYPE_OPS:
                kept[id(node)] = "fixed output type"
            elif node.op_type in self.keep_ops:
                kept[id(node)] = "op"
            elif (
                self.keep_tables
                and floats_out
                and not any(id(out) in tainted for out in node.outputs)
            ):
                kept[id(node)] = "table"
        if self.logits != self.low:
            into = kept if self.logits == ir.DataType.FLOAT else self.apart
            for value in self.graph.outputs:
                producer = value.producer()
                if "logits" in (value.name or "") and producer is not None:
                    into[id(producer)] = "logits"
        # The mask applied right before a softmax: a -3.4e38 fill must not meet fp16.
        for node in self.nodes:
            if node.op_type in _SOFTMAX_OPS and id(node) in kept:
                source = node.inputs[0].producer() if node.inputs and node.inputs[0] else None
                if (
                    source is not None
                    and source.op_type in _MASK_OPS
                    and id(source) not in kept
                    and any(
                        _is_float32(v) and id(v) not in tainted and not _is_constant(v)
                        for v in source.inputs
                    )
                ):
                    kept[id(source)] = "mask"
        # Elementwise ops fed only by fp32 results (and constants) stay fp32.
        for node in self.nodes:
            if id(node) in kept or node.op_type not in _FOLLOW_OPS:
                continue
            sources = [v for v in node.inputs if _is_float32(v) and not _is_constant(v)]
            if sources and all(
                v.producer() is not None and id(v.producer()) in kept for v in sources
            ):
                kept[id(node)] = "follows fp32"
        # An RMSNorm's `x / Sqrt(ReduceMean(Pow(x, 2)) + eps)` reads x as its kept Pow does (fp32,
        # from one Cast; low after), the form ONNX Runtime folds into one node on the GPU
        # (core/optimizer/layer_norm_fusion.cc: Cast → Pow and Div → Cast → Mul).
        for node in self.nodes:
            if id(node) in kept or node.op_type != "Div" or len(node.inputs) != 2:
                continue
            x, std = node.inputs
            sqrt = std.producer() if std is not None else None
            if x is None or sqrt is None or sqrt.op_type != "Sqrt" or id(sqrt) not in kept:
                continue
            if any(use.op_type == "Pow" and id(use) in kept for use, _ in x.uses()):
                kept[id(node)] = "norm"
        # A kept node's Q/DQ inputs stay whole (in its type), so TensorRT still fuses them.
        for group in (kept, self.apart):
            for node in self.nodes:
                if group.get(id(node)) not in ("logits", "op", "mask"):
                    continue
                for value in node.inputs:
                    dq = value.producer() if value is not None else None
                    if dq is None or dq.op_type != "DequantizeLinear" or self._decided(dq):
                        continue
                    group[id(dq)] = "q/dq of a kept node"
                    q = dq.inputs[0].producer() if dq.inputs[0] is not None else None
                    if q is not None and q.op_type == "QuantizeLinear":
                        group[id(q)] = "q/dq of a kept node"
        # Last, so nothing follows it: a tied float table's Gather reads it in the type the
        # lm_head does (one table stored), its rows rounded low for every reader.
        for node in self.nodes:
            table = node.inputs[0] if node.op_type == "Gather" and node.inputs else None
            if table is None or not _is_float32(table) or not _is_constant(table):
                continue
            users = [user for user, _ in table.uses() if user is not node]
            for group, reason in ((kept, "shares an fp32 table"), (self.apart, "shares a table")):
                if not self._decided(node) and any(id(user) in group for user in users):
                    group[id(node)] = reason
                    self.shared.add(id(node))

    def _decided(self, node: ir.Node) -> bool:
        return id(node) in self.kept or id(node) in self.apart

    def _computes(self, node: ir.Node) -> ir.DataType:
        """The type `node` computes in: fp32 where kept, the logits' apart, else the low one."""
        if id(node) in self.kept:
            return ir.DataType.FLOAT
        return self.logits if id(node) in self.apart else self.low

    # -- rewriting ---------------------------------------------------------------------------

    def _wanted(self, node: ir.Node, index: int) -> ir.DataType:
        if (node.op_type, index) in _FLOAT32_INPUTS:
            return ir.DataType.FLOAT
        return self._computes(node)

    def _convert(self, array: np.ndarray, dtype: ir.DataType) -> np.ndarray:
        """`array` in `dtype`, clamped to its range (tiny values kept), 16M at a time."""
        high, tiny = _RANGE[dtype]
        array = np.asarray(array, dtype=np.float32)
        out = np.empty(array.shape, dtype=_NUMPY[dtype])
        source, target = array.reshape(-1), out.reshape(-1)
        for start in range(0, source.size, 1 << 24):
            block = source[start : start + (1 << 24)]
            clamped = np.clip(block, -high, high)
            small = (clamped != 0) & (np.abs(clamped) < tiny)
            self.stats["values_clamped"] += int((clamped != block).sum() + small.sum())
            target[start : start + block.size] = np.where(small, np.sign(clamped) * tiny, clamped)
        return out

    def _retype_constants(self) -> None:
        """Store each float constant in the type its readers want (a copy per other type)."""
        readers: dict[int, list[tuple[ir.Node, int]]] = collections.defaultdict(list)
        values: dict[int, ir.Value] = {}
        for node in self.nodes:
            for index, value in enumerate(node.inputs):
                if _is_float32(value) and _is_constant(value):
                    readers[id(value)].append((node, index))
                    values[id(value)] = value
        for key, uses in readers.items():
            value = values[key]
            by_type: dict[ir.DataType, list[tuple[ir.Node, int]]] = collections.defaultdict(list)
            for node, index in uses:
                by_type[self._wanted(node, index)].append((node, index))
            fp32 = by_type.pop(ir.DataType.FLOAT, None)
            tensor = _const_tensor(value)
            if not by_type or value.is_graph_output() or tensor is None:
                continue
            array = tensor.numpy()
            last = list(by_type)[-1]
            for dtype, typed_uses in by_type.items():  # the original converted last, in place
                self._store(value, array, dtype, typed_uses, in_place=not fp32 and dtype == last)

    def _store(
        self,
        value: ir.Value,
        array: np.ndarray,
        dtype: ir.DataType,
        uses: list[tuple[ir.Node, int]],
        *,
        in_place: bool,
    ) -> None:
        """`value`'s constant in `dtype` for `uses`: converted in place, or a copy beside it."""
        converted = ir.Tensor(self._convert(array, dtype), name=value.name)
        kind = "initializers" if value.is_initializer() else "constants"
        self.stats[f"{kind}_cast"] += 1
        self.stats["bytes_before"] += array.nbytes
        self.stats["bytes_after"] += converted.nbytes
        if in_place:
            target = value
        else:
            target = ir.Value(name=f"{value.name}_{dtype.name.lower()}", shape=value.shape)
            self.stats[f"{kind}_duplicated"] += 1
        if value.is_initializer():  # streamed: to the spill file now, not after the pass
            converted = spill_tensor(self.graph, target.name, converted)
        if target is not value:
            if value.is_initializer():
                target.const_value = converted  # an initializer needs its tensor first
                self.graph.register_initializer(target)
            else:
                constant = ir.Node("", "Constant", [], outputs=[target])
                self.graph.insert_after(value.producer(), constant)
            for node, index in uses:
                node.replace_input_with(index, target)
        target.dtype = dtype
        if target.is_initializer():
            target.const_value = converted
        else:
            producer = target.producer()
            producer.attributes["value"] = ir.AttrTensor("value", converted)

    def _cast_of(self, value: ir.Value, dtype: ir.DataType) -> ir.Value:
        key = (id(value), dtype)
        if key not in self.casts:
            name = f"{value.name}_to_{dtype.name.lower()}"
            out = ir.Value(name=name, shape=value.shape, type=ir.TensorType(dtype))
            cast = ir.Node("", "Cast", [value], {"to": ir.AttrInt64("to", dtype)},
                           outputs=[out], name=f"fdec_cast/{name}")  # fmt: skip
            producer = value.producer()
            if producer is None:  # a graph input: cast at the very start
                first = next(iter(self.graph), None)
                if first is None:
                    self.graph.append(cast)
                else:
                    self.graph.insert_before(first, cast)
                self.stats["io_casts"] += 1
            else:
                self.graph.insert_after(producer, cast)
            self.stats["casts_inserted"] += 1
            self.casts[key] = out
        return self.casts[key]

    def _low_io(self, value: ir.Value) -> bool:
        return any((value.name or "").startswith(prefix) for prefix in self.low_io)

    def run(self) -> dict[str, Any]:
        self._decide()
        originals = {
            id(v): self.low if self._low_io(v) and _is_float32(v) else v.dtype
            for v in self.graph.outputs
        }
        self._retype_constants()
        for value in self.graph.inputs:  # low_io inputs: fed low, cast up where fp32 reads
            if _is_float32(value) and self._low_io(value):
                value.dtype = self.low
                self.stats["io_low"] += 1
        low_nodes = 0
        # Output types first (a node's consumers may come before its casts are made).
        for node in self.nodes:
            if node.op_type == "Constant" or id(node) in self.kept:
                continue
            dtype = self._computes(node)
            touched = False
            for index, out in enumerate(node.outputs):
                fixed = (node.op_type, index) in _FLOAT32_OUTPUTS
                if out.dtype is None and node.op_type in self.low_ops:
                    # Contrib ops have no ONNX shape inference: their outputs are T (or U).
                    out.dtype = ir.DataType.FLOAT if fixed else dtype
                    touched = True
                elif _is_float32(out) and not fixed:
                    out.dtype = dtype
                    self.stats["tensors_cast"] += 1
                    touched = True
            if node.op_type == "Cast" and node.attributes["to"].value == ir.DataType.FLOAT:
                node.attributes["to"] = ir.AttrInt64("to", dtype)
            touched = touched or any(_is_float32(v) for v in node.inputs)
            low_nodes += touched
        for node in self.nodes:
            # A Shape keeps its input: a Cast of a graph input there made every layer's mask read
            # a later layer's KV cache (an 8B's sliced check ran 22 layers in one session).
            if node.op_type == "Constant" or node.op_type in SHAPE_ONLY_OPS:
                continue
            for index, value in enumerate(node.inputs):
                if value is None or value.dtype not in self.floats:
                    continue
                source = value
                producer = value.producer()
                if producer is not None and id(producer) in self.shared:
                    source = self._cast_of(value, self.low)  # a shared table's rows, rounded low
                wanted = self._wanted(node, index)
                if source.dtype != wanted:
                    source = self._cast_of(source, wanted)
                if source is not value:
                    node.replace_input_with(index, source)
        if self.keep_io_types:
            for position, value in enumerate(list(self.graph.outputs)):
                original = originals[id(value)]  # low for low_io outputs
                if value.dtype == original:
                    continue
                name = value.name
                value.name = f"{name}_{value.dtype.name.lower()}"
                out = ir.Value(name=name, shape=value.shape, type=ir.TensorType(original))
                cast = ir.Node("", "Cast", [value], {"to": ir.AttrInt64("to", original)},
                               outputs=[out], name=f"fdec_cast/{name}")  # fmt: skip
                self.graph.insert_after(value.producer(), cast)
                self.graph.outputs[position] = out
                self.stats["io_casts"] += 1
                self.stats["casts_inserted"] += 1
        reasons = collections.Counter(self.kept.values())
        kept_ops = collections.Counter(n.op_type for n in self.nodes if id(n) in self.kept)
        return {
            "dtype": _NAMES[self.low],
            "nodes_low": low_nodes,
            "nodes_kept_fp32": len(self.kept),
            "logits": _NAMES[self.logits],
            "nodes_in_logits_type": len(self.apart),
            "kept_by_reason": dict(sorted(reasons.items())),
            "kept_ops": dict(sorted(kept_ops.items())),
            **{key: self.stats[key] for key in _COUNTED},
            "duplicated": self.stats["initializers_duplicated"]
            + self.stats["constants_duplicated"],
        }
