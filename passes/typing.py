"""Typing passes: cast a float32 graph to fp16 or bf16 for strongly typed engines, keeping in fp32 what needs it.

TensorRT 11 and TensorRT-RTX build strongly typed networks only: a tensor's precision is the
type the ONNX graph gives it, and no builder flag lowers fp32 math to fp16 any more. So the
graph an engine is built from must carry its precision, as ModelOpt's AutoCast does for ONNX:
most math in fp16/bf16, the numerically fragile parts in fp32, explicit Casts between them.

`CastFloat16Pass` decides per node (the reason is counted in its stats):

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
- **logits** (`keep_logits`): the node producing each `logits` output, with the Q/DQ pair
  feeding it, so the lm_head accumulates and returns fp32 (and an embedding Gather of the
  same tied table, cast after, so the table is stored once);
- everything else computes in `dtype`; initializers and constants only low nodes read are
  stored in `dtype` (clamped to its finite range), Q/DQ scales included, so DequantizeLinear
  yields fp16/bf16 and TensorRT fuses Q/DQ into low-precision kernels.

Casts go where a value crosses between the two, and at the edges with `keep_io_types`, so
inputs and outputs keep their types (but those `low_io` names: a GPU build's KV cache).

ONNX Runtime's CUDA graph (fdec.backends.onnxruntime_cuda) is typed with `cuda_typing`'s
options: `low_ops`, com.microsoft ops that compute low (GroupQueryAttention is fp16/bf16 only on
CUDA), `CUDA_KEEP_FP32_OPS`, and `low_io`, a low KV cache (one shared device buffer).

Not onnxruntime.transformers.float16's converter (fp16 only, a protobuf copy with every weight
loaded, nodes blocked by op type or name): fdec's onnx-ir graph (streamed: new weights go to the
spill at once), with that converter's clamping rule for initializers.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, ClassVar

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_common

from fdec.errors import CompileError, UsageError
from fdec.ir import SHAPE_ONLY_OPS, FdecModel
from fdec.ir.spill import spill_tensor
from fdec.pipeline import Pass, PassResult, Tolerance

__all__ = [
    "BF16_TOLERANCE",
    "CUDA_FP16_TOLERANCE",
    "CUDA_KEEP_FP32_OPS",
    "CUDA_LOW_OPS",
    "FP16_TOLERANCE",
    "KEEP_FP32_OPS",
    "KV_CACHE_IO",
    "CastFloat16Pass",
    "choose_float_dtype",
    "cuda_typing",
    "float_types",
    "untyped_values",
]

logger = logging.getLogger(__name__)

#: Ops computed in fp32 by default: reductions whose sums overflow fp16 (x² of an RMSNorm
#: reaches 65504 at |x| = 256), exponentials and their inverses, and trigonometry.
KEEP_FP32_OPS: tuple[str, ...] = (
    "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2",
    "ReduceLogSumExp", "LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
    "Pow", "Sqrt", "Reciprocal", "Exp", "Log", "Cos", "Sin", "CumSum", "Range",
)  # fmt: skip

#: com.microsoft ops ONNX Runtime's CUDA provider runs in fp16/bf16 (fdec/data/cuda_kernels.json
#: lists both types for each): fused attention (GroupQueryAttention has no fp32 CUDA kernel), the
#: fused norms (their kernels accumulate the reduction in fp32), rotary, and 4-bit weights
#: (MatMulNBits, GatherBlockQuantized with fp16 scales).
CUDA_LOW_OPS: tuple[str, ...] = (
    "GroupQueryAttention", "MultiHeadAttention", "RotaryEmbedding",
    "SkipSimplifiedLayerNormalization", "SkipLayerNormalization", "MatMulNBits",
    "GatherBlockQuantized", "FusedMatMul",
)  # fmt: skip
#: KEEP_FP32_OPS less the ONNX-domain norm ops, whose CUDA kernels (T in fp16/bf16, U = float)
#: accumulate in fp32 like the fused ones: on the GPU they run low.
CUDA_KEEP_FP32_OPS: tuple[str, ...] = tuple(
    op
    for op in KEEP_FP32_OPS
    if op not in ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
)
#: Graph I/O a GPU build keeps in the low type: the KV cache (one shared device buffer).
KV_CACHE_IO: tuple[str, ...] = ("past_key_values.", "present.")

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

_DTYPES: dict[str, ir.DataType] = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}
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

#: Numerics of a typed graph against its fp32 source (tiny Llama, ONNX Runtime CPU, measured in
#: tests/passes/test_typing.py: fp16 max logit error ~2e-3, bf16 ~2e-2, all top-1 agreeing).
FP16_TOLERANCE = Tolerance(max_abs_error=0.05, min_top1_agreement=0.95, greedy_identical=False)
BF16_TOLERANCE = Tolerance(max_abs_error=0.25, min_top1_agreement=0.9, greedy_identical=False)
#: The ONNX Runtime CUDA typing (fp16 activations between fused kernels, an fp16 KV cache):
#: SmolLM2-135M's logits move by up to 0.150 against PyTorch fp32 (`fdec compile smollm2-135m
#: --target h200 --backend onnxruntime`, the GPU's fp16 rounding emulated on the CPU); tiny: 0.003.
CUDA_FP16_TOLERANCE = Tolerance(max_abs_error=0.25, min_top1_agreement=0.95, greedy_identical=False)


def choose_float_dtype(target: Any) -> str:
    """ "bf16" where the target computes BF16 (compute capability 8.0 and newer), else "fp16".

    bf16 keeps fp32's exponent range (no overflow of large activations, no underflow of small
    quantization scales) at 3 fewer mantissa bits; it is chosen where the hardware has it and
    callers check its accuracy (fdec.lower.tensorrt_model falls back to fp16 when it fails).
    """
    from fdec.targets import Precision

    return "bf16" if target is not None and target.supports(Precision.BF16) else "fp16"


def cuda_typing(dtype: str = "fp16") -> dict[str, Any]:
    """CastFloat16Pass options for ONNX Runtime's CUDA graph: the fused com.microsoft ops and
    the norms compute low, the KV cache is low at the graph's edges, the rest as the default.
    An fp16 lm_head too (cuBLAS sums in fp32; the logits round to fp16, cast up at the edge):
    one tied fp16 table, no fp32 copy (SmolLM2 387.1 → 273.8 MB, tune perplexity -0.004 %;
    docs/design-notes.md). bf16 logits (0.25 apart at 32) stay fp32."""
    return {
        "dtype": dtype,
        "keep_ops": CUDA_KEEP_FP32_OPS,
        "low_ops": CUDA_LOW_OPS,
        "low_io": KV_CACHE_IO,
        "keep_logits": dtype != "fp16",
    }


def float_types(graph: ir.Graph) -> collections.Counter:
    """How many values (graph inputs, initializers, node outputs) have each float dtype."""
    counts: collections.Counter = collections.Counter()
    seen: set[int] = set()
    values = [*graph.inputs, *graph.initializers.values()]
    values += [out for node in ir.traversal.RecursiveGraphIterator(graph) for out in node.outputs]
    for value in values:
        if id(value) in seen or value.dtype is None:
            continue
        seen.add(id(value))
        if value.dtype.is_floating_point():
            counts[value.dtype.name] += 1
    return counts


@dataclasses.dataclass
class CastFloat16Pass(Pass):
    """Compute a float32 graph in fp16 or bf16, keeping fp32 where numerics need it.

    Options: `dtype` ("fp16" or "bf16"); `keep_ops` (op types kept in fp32); `keep_tables`
    (position/mask tables in fp32); `keep_logits` (the lm_head's output node in fp32);
    `keep_io_types` (graph I/O keeps its types; casts at the edges); `low_ops` (op types outside
    the ONNX domain that compute low); `low_io` (I/O name prefixes typed low all the same).
    """

    name: ClassVar[str] = "cast-float16"
    family: ClassVar[str] = "typing"
    summary: ClassVar[str] = (
        "type the graph in fp16/bf16 (norms, softmax, logits, rotary tables kept fp32)"
    )

    dtype: str = dataclasses.field(default="fp16", kw_only=True)
    keep_ops: tuple[str, ...] = dataclasses.field(default=KEEP_FP32_OPS, kw_only=True)
    keep_tables: bool = dataclasses.field(default=True, kw_only=True)
    keep_logits: bool = dataclasses.field(default=True, kw_only=True)
    keep_io_types: bool = dataclasses.field(default=True, kw_only=True)
    low_ops: tuple[str, ...] = dataclasses.field(default=(), kw_only=True)
    low_io: tuple[str, ...] = dataclasses.field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise UsageError(
                f"cast-float16: dtype must be fp16 or bf16, got {self.dtype!r}",
                "set cast-float16.dtype=fp16 (any GPU) or bf16 (compute capability 8.0+)",
            )
        self.keep_ops = tuple(self.keep_ops)
        self.low_ops = tuple(self.low_ops)
        self.low_io = tuple(self.low_io)

    @property
    def tolerance(self) -> Tolerance:  # type: ignore[override]
        if self.dtype == "bf16":
            return BF16_TOLERANCE
        return CUDA_FP16_TOLERANCE if self.low_io or self.low_ops else FP16_TOLERANCE

    def check_target(self, target: Any) -> None:
        if target is None or self.dtype != "bf16":
            return
        target.require("bf16")  # InputError: BF16 needs compute capability >= 8.0; t4 is 7.5

    def requires(self, model: FdecModel, target: Any = None) -> None:
        self.check_target(target)
        present = {dtype.name for dtype in (_DTYPES["fp16"], _DTYPES["bf16"])}
        found = present & set(float_types(model.graph))
        if found:
            raise UsageError(
                f"cast-float16: the graph is already typed ({', '.join(sorted(found))} tensors)",
                "run cast-float16 once, on the float32 graph",
            )

    def call(self, model: FdecModel) -> PassResult:
        low = _DTYPES[self.dtype]
        # Quantizers leave their new values untyped; typing needs every element type.
        untyped = len(untyped_values(model.graph))
        if untyped:
            ir_common.ShapeInferencePass(strict_mode=False)(model.model)
        typer = _Typer(
            model,
            low=low,
            keep_ops=frozenset(self.keep_ops),
            keep_tables=self.keep_tables,
            keep_logits=self.keep_logits,
            keep_io_types=self.keep_io_types,
            low_ops=frozenset(self.low_ops),
            low_io=self.low_io,
        )
        stats = typer.run()
        stats["types_inferred"] = untyped - len(untyped_values(model.graph))
        left = untyped_values(model.graph)
        if left:
            raise CompileError(
                f"cast-float16: {len(left)} value(s) have no element type (e.g. {left[0]!r})",
                "run infer-shapes before cast-float16; report the model if that does not help",
            )
        return PassResult(model, modified=stats["nodes_low"] > 0, stats=stats)


# ---------------------------------------------------------------------------------------------
# The typing itself


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


class _Typer:
    """One typing run over a model's main graph; `run` mutates it and returns the stats."""

    def __init__(
        self,
        model: FdecModel,
        *,
        low: ir.DataType,
        keep_ops: frozenset[str],
        keep_tables: bool,
        keep_logits: bool,
        keep_io_types: bool,
        low_ops: frozenset[str] = frozenset(),
        low_io: tuple[str, ...] = (),
    ):
        self.model, self.graph, self.low = model, model.graph, low
        self.low_ops, self.low_io = low_ops, low_io
        self.keep_ops, self.keep_tables = keep_ops, keep_tables
        self.keep_logits, self.keep_io_types = keep_logits, keep_io_types
        self.nodes = list(self.graph)
        self.kept: dict[int, str] = {}  # id(node) -> reason it stays fp32
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
        if self.keep_logits:
            for value in self.graph.outputs:
                producer = value.producer()
                if "logits" in (value.name or "") and producer is not None:
                    kept[id(producer)] = "logits"
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
        # A kept node's Q/DQ inputs stay whole (fp32), so TensorRT still fuses them.
        for node in self.nodes:
            if kept.get(id(node)) not in ("logits", "op", "mask"):
                continue
            for value in node.inputs:
                dq = value.producer() if value is not None else None
                if dq is None or dq.op_type != "DequantizeLinear" or id(dq) in kept:
                    continue
                kept[id(dq)] = "q/dq of a kept node"
                q = dq.inputs[0].producer() if dq.inputs[0] is not None else None
                if q is not None and q.op_type == "QuantizeLinear":
                    kept[id(q)] = "q/dq of a kept node"
        # Last, so nothing follows it into fp32: a tied table's Gather (fp32 rows, rounded low).
        for node in self.nodes:
            table = node.inputs[0] if node.op_type == "Gather" and node.inputs else None
            if table is not None and _is_constant(table) and id(node) not in kept:
                if any(id(user) in kept for user, _ in table.uses() if user is not node):
                    kept[id(node)] = "shares an fp32 table"

    # -- rewriting ---------------------------------------------------------------------------

    def _wanted(self, node: ir.Node, index: int) -> ir.DataType:
        if id(node) in self.kept or (node.op_type, index) in _FLOAT32_INPUTS:
            return ir.DataType.FLOAT
        return self.low

    def _convert(self, array: np.ndarray) -> np.ndarray:
        """`array` in the low dtype, clamped to its range (tiny values kept), 16M at a time."""
        high, tiny = _RANGE[self.low]
        array = np.asarray(array, dtype=np.float32)
        out = np.empty(array.shape, dtype=_NUMPY[self.low])
        source, target = array.reshape(-1), out.reshape(-1)
        for start in range(0, source.size, 1 << 24):
            block = source[start : start + (1 << 24)]
            clamped = np.clip(block, -high, high)
            small = (clamped != 0) & (np.abs(clamped) < tiny)
            self.stats["values_clamped"] += int((clamped != block).sum() + small.sum())
            target[start : start + block.size] = np.where(small, np.sign(clamped) * tiny, clamped)
        return out

    def _retype_constants(self) -> None:
        """Store each float constant in the type its readers want (a copy when they differ)."""
        readers: dict[int, list[tuple[ir.Node, int]]] = collections.defaultdict(list)
        values: dict[int, ir.Value] = {}
        for node in self.nodes:
            for index, value in enumerate(node.inputs):
                if _is_float32(value) and _is_constant(value):
                    readers[id(value)].append((node, index))
                    values[id(value)] = value
        for key, uses in readers.items():
            value = values[key]
            low_uses = [(n, i) for n, i in uses if self._wanted(n, i) == self.low]
            if not low_uses or value.is_graph_output():
                continue
            tensor = _const_tensor(value)
            if tensor is None:
                continue
            converted = ir.Tensor(self._convert(tensor.numpy()), name=value.name)
            kind = "initializers" if value.is_initializer() else "constants"
            self.stats[f"{kind}_cast"] += 1
            self.stats["bytes_before"] += tensor.nbytes
            self.stats["bytes_after"] += converted.nbytes
            if len(low_uses) == len(uses):
                target = value  # every reader computes low: convert in place
            else:  # mixed readers: a low copy beside the fp32 original
                target = ir.Value(name=f"{value.name}_{self.low.name.lower()}", shape=value.shape)
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
                for node, index in low_uses:
                    node.replace_input_with(index, target)
            target.dtype = self.low
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
            touched = False
            for index, out in enumerate(node.outputs):
                fixed = (node.op_type, index) in _FLOAT32_OUTPUTS
                if out.dtype is None and node.op_type in self.low_ops:
                    # Contrib ops have no ONNX shape inference: their outputs are T (or U).
                    out.dtype = ir.DataType.FLOAT if fixed else self.low
                    touched = True
                elif _is_float32(out) and not fixed:
                    out.dtype = self.low
                    self.stats["tensors_cast"] += 1
                    touched = True
            if node.op_type == "Cast" and node.attributes["to"].value == ir.DataType.FLOAT:
                node.attributes["to"] = ir.AttrInt64("to", self.low)
            touched = touched or any(_is_float32(v) for v in node.inputs)
            low_nodes += touched
        for node in self.nodes:
            # A Shape keeps its input: a Cast of a graph input there made every layer's mask read
            # a later layer's KV cache (an 8B's sliced check ran 22 layers in one session).
            if node.op_type == "Constant" or node.op_type in SHAPE_ONLY_OPS:
                continue
            for index, value in enumerate(node.inputs):
                if value is None or value.dtype not in (ir.DataType.FLOAT, self.low):
                    continue
                wanted = self._wanted(node, index)
                if value.dtype != wanted:
                    node.replace_input_with(index, self._cast_of(value, wanted))
        for node in self.nodes:  # a shared table's rows: rounded low for every reader
            if self.kept.get(id(node)) == "shares an fp32 table":
                rows, low = node.outputs[0], self._cast_of(node.outputs[0], self.low)
                for user, index in [u for u in rows.uses() if u[0] is not low.producer()]:
                    user.replace_input_with(index, self._cast_of(low, ir.DataType.FLOAT))
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
            "dtype": "fp16" if self.low == ir.DataType.FLOAT16 else "bf16",
            "nodes_low": low_nodes,
            "nodes_kept_fp32": len(self.kept),
            "kept_by_reason": dict(sorted(reasons.items())),
            "kept_ops": dict(sorted(kept_ops.items())),
            **{key: self.stats[key] for key in _COUNTED},
            "duplicated": self.stats["initializers_duplicated"]
            + self.stats["constants_duplicated"],
        }


def untyped_values(graph: ir.Graph) -> list[str]:
    """Names of node outputs and graph inputs without an element type (a strongly typed
    builder needs every tensor typed)."""
    missing = [v.name or "?" for v in graph.inputs if v.dtype is None]
    for node in ir.traversal.RecursiveGraphIterator(graph):
        missing += [out.name or "?" for out in node.outputs if out.dtype is None]
    return missing
