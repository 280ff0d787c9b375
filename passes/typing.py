"""Typing passes: cast a float32 graph to fp16 or bf16 for strongly typed engines, keeping in fp32 what needs it.

TensorRT 11 and TensorRT-RTX build strongly typed networks only: a tensor's precision is the
type the ONNX graph gives it, and no builder flag lowers fp32 math to fp16 any more. So the
graph an engine is built from must carry its precision, as ModelOpt's AutoCast does for ONNX:
most math in fp16/bf16, the numerically fragile parts in fp32, explicit Casts between them.

`CastFloat16Pass` decides per node which type it computes in (fdec.passes.typing_rules, where
the rules are told): fp32 for the numerically fragile parts (softmax, norm reductions,
exponentials, rotary tables, masks), the lm_head in its own `logits` type (fp32, or fp16 even in a
bf16 graph), everything else in fp16/bf16.

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

import onnx_ir as ir
import onnx_ir.passes.common as ir_common

from fdec.errors import CompileError, UsageError
from fdec.ir import FdecModel
from fdec.passes.typing_rules import GraphTyper
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

_DTYPES: dict[str, ir.DataType] = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}

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
    An fp16 lm_head (cuBLAS sums in fp32; the logits round to fp16, cast up at the edge): one
    tied fp16 table, no fp32 copy (SmolLM2 387.1 → 273.8 MB, tune perplexity -0.004 %;
    docs/design-notes.md), in a bf16 graph too (bf16 logits are 0.25 apart at 32, fp16's 0.03)."""
    return {
        "dtype": dtype,
        "keep_ops": CUDA_KEEP_FP32_OPS,
        "low_ops": CUDA_LOW_OPS,
        "low_io": KV_CACHE_IO,
        "logits": "fp16",
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
    (position/mask tables in fp32); `logits` (the type the lm_head's output node and its Q/DQ
    compute in: "fp32", "fp16" in an fp16 or bf16 graph, or the graph's `dtype`);
    `keep_io_types` (graph I/O keeps its types; casts at the edges); `low_ops` (op types outside
    the ONNX domain that compute low); `low_io` (I/O name prefixes typed low all the same).
    """

    name: ClassVar[str] = "cast-float16"
    family: ClassVar[str] = "typing"
    summary: ClassVar[str] = (
        "type the graph in fp16/bf16 (norms, softmax, rotary tables kept fp32, logits fp32/fp16)"
    )

    dtype: str = dataclasses.field(default="fp16", kw_only=True)
    keep_ops: tuple[str, ...] = dataclasses.field(default=KEEP_FP32_OPS, kw_only=True)
    keep_tables: bool = dataclasses.field(default=True, kw_only=True)
    logits: str = dataclasses.field(default="fp32", kw_only=True)
    keep_io_types: bool = dataclasses.field(default=True, kw_only=True)
    low_ops: tuple[str, ...] = dataclasses.field(default=(), kw_only=True)
    low_io: tuple[str, ...] = dataclasses.field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise UsageError(
                f"cast-float16: dtype must be fp16 or bf16, got {self.dtype!r}",
                "set cast-float16.dtype=fp16 (any GPU) or bf16 (compute capability 8.0+)",
            )
        if self.logits not in ("fp32", "fp16", self.dtype):
            raise UsageError(
                f"cast-float16: logits must be fp32, fp16 or the graph's dtype, got "
                f"{self.logits!r}",
                "set cast-float16.logits=fp32 (full precision) or fp16 (half the lm_head bytes)",
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
        typer = GraphTyper(
            model,
            low=low,
            keep_ops=frozenset(self.keep_ops),
            keep_tables=self.keep_tables,
            logits={"fp32": ir.DataType.FLOAT, **_DTYPES}[self.logits],
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


def untyped_values(graph: ir.Graph) -> list[str]:
    """Names of node outputs and graph inputs without an element type (a strongly typed
    builder needs every tensor typed)."""
    missing = [v.name or "?" for v in graph.inputs if v.dtype is None]
    for node in ir.traversal.RecursiveGraphIterator(graph):
        missing += [out.name or "?" for out in node.outputs if out.dtype is None]
    return missing
