"""Attention fusion for ONNX Runtime: traced attention, rotary and RMSNorm → com.microsoft fused ops.

Wraps onnxscript's `ort_fusions.optimize_for_ort` (GroupQueryAttention with the rotary folded
in, SkipSimplifiedLayerNormalization, MultiHeadAttention, ...). fdec's own rules run first
(fdec.passes.fusion_rules): e.g. transformers ≥ 5 computes rotary angles as
`position_ids[..., None] * inv_freq`, where onnxscript's cos/sin-cache rule expects the older
`(inv_freq @ position_ids).transpose(1, 2)` (same numbers); then onnxscript's, with its
GroupQueryAttention and MultiHeadAttention rules subclassed where they drop what the traced
attention says (the scale, a partial rotary: `fdec_rules`).

The fused graph keeps the build's I/O contract (input/output names, KV-cache layout BNSH) and
the names of the MatMul weights ModelSpec roles point at. Only ONNX Runtime runs com.microsoft
ops: the pass refuses other backends, where standard ONNX attention stays.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as onnx_ir_common
from onnxscript import optimizer as onnxscript_optimizer
from onnxscript.rewriter import RewriteRuleSet, _ir_utils

from fdec.backends import backend_names, get_backend
from fdec.errors import UsageError
from fdec.ir import FdecModel, shared_kv_layers
from fdec.passes.attention_rules import fdec_rules
from fdec.passes.cleanup import FoldConstantsPass
from fdec.passes.fusion_rules import (
    Conv1DAsMatMul,
    DropSameShapeReshape,
    ExpandOnnxDomainRmsNorm,
    RotaryAnglesAsMatMul,
    ShiftRangeOnHost,
    const_scalar,
    forget_matched_nodes,
    rotary_tables,
)
from fdec.passes.weights import add_initializer
from fdec.pipeline import EXACT, Pass, PassResult

__all__ = ["FUSED_ATTENTION_OPS", "GQA_HEAD_SIZE_MULTIPLE", "FuseAttentionPass", "HostShapesPass"]

logger = logging.getLogger(__name__)

# Fused attention ops, by how much of the attention they take over.
FUSED_ATTENTION_OPS = ("GroupQueryAttention", "MultiHeadAttention", "Attention")
_MS = "com.microsoft"
# ONNX Runtime's GroupQueryAttention refuses other head sizes when it runs (onnxruntime 1.32 CPU,
# tiny Llamas: head size 12 "head_size must be a multiple of 8", head size 8 "head_size shall be
# a multiple of 16"; its CUDA kernels share those checks): such models keep their attention.
GQA_HEAD_SIZE_MULTIPLE = 16


def _range_from_zero(value: ir.Value) -> bool:
    """`value` is `Range(0, n, 1)` as float, through Reshape/Cast/Unsqueeze (any n)."""
    node = value.producer()
    while node is not None and node.op_type in ("Reshape", "Cast", "Unsqueeze"):
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if node is None or node.op_type != "Range" or len(node.inputs) != 3:
        return False
    start, _, delta = node.inputs
    return (
        start is not None
        and delta is not None
        and _ir_utils.is_singleton_value(start, 0)
        and _ir_utils.is_singleton_value(delta, 1)
    )


def _rotary_angles(cos: ir.Value, sin: ir.Value) -> np.ndarray | None:
    """inv_freq [1, E] when cos, sin = Cos(x), Sin(x) of x = Range(0, n) ⊗ inv_freq."""
    cos_node, sin_node = cos.producer(), sin.producer()
    if cos_node is None or sin_node is None:
        return None
    if cos_node.op_type != "Cos" or sin_node.op_type != "Sin":
        return None
    angles = cos_node.inputs[0]
    if angles is None or sin_node.inputs[0] is not angles:
        return None
    matmul = angles.producer()
    if matmul is None or matmul.op_type != "MatMul":
        return None
    positions, inv_freq = matmul.inputs
    if inv_freq is None or inv_freq.const_value is None or positions is None:
        return None
    values = inv_freq.const_value.numpy()
    if values.ndim != 2 or values.shape[0] != 1 or not _range_from_zero(positions):
        return None
    return values


# Fused ops whose outputs take their first input's element type.
_SAME_TYPE_AS_INPUT = frozenset(
    {"MultiHeadAttention", "GroupQueryAttention", "RotaryEmbedding",
     "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"}
)  # fmt: skip


def _type_fused_outputs(model: FdecModel) -> None:
    """Give untyped outputs of fused attention, rotary and norm nodes their input's type:
    ONNX's shape inference has no com.microsoft schemas, so what follows them stayed untyped
    and cast-float16 refused the graph (Phi-3's MultiHeadAttention)."""
    for node in model.graph:
        first = node.inputs[0] if node.inputs else None
        if node.domain != _MS or node.op_type not in _SAME_TYPE_AS_INPUT or first is None:
            continue
        for out in node.outputs:
            if out.dtype is None and out.name and first.dtype is not None:
                out.type = ir.TensorType(first.dtype)


# The cos/sin cache inputs of the fused ops that take them.
_ROTARY_CACHE_INPUTS = {"GroupQueryAttention": (7, 8), "RotaryEmbedding": (2, 3)}


def _constant_rotary_caches(model: FdecModel) -> int:
    """Per-step cos/sin caches of GroupQueryAttention and RotaryEmbedding (beside
    MultiHeadAttention, e.g. Phi-3's) → constant [max_positions, E] tables.

    onnxscript's fusion computes the caches every step for positions 0..max(position_ids)
    (a cost that grows with the sequence); onnxruntime-genai stores them as initializers.
    Angles are the same float32 products (position × inv_freq, one product each, as the
    K=1 MatMul did); cos and sin are taken in float64 and rounded. Returns the tables made;
    the caller removes the nodes that computed the caches.
    """
    graph = model.graph
    rows = model.spec.max_positions
    made: dict[tuple[int, int], tuple[ir.Value, ir.Value]] = {}
    for node in list(graph):
        slots = _ROTARY_CACHE_INPUTS.get(node.op_type) if node.domain == _MS else None
        if slots is None or len(node.inputs) <= slots[1]:
            continue
        cos, sin = node.inputs[slots[0]], node.inputs[slots[1]]
        if cos is None or sin is None or cos.const_value is not None:
            continue
        key = (id(cos), id(sin))
        if key not in made:
            inv_freq = _rotary_angles(cos, sin)
            if inv_freq is None or rows <= 0:
                continue
            dtype = cos.dtype.numpy() if cos.dtype is not None else np.float32
            tables = []
            for which, values in zip(("cos", "sin"), rotary_tables(rows, inv_freq, dtype=dtype)):
                name = f"rotary.{which}_cache"
                while name in graph.initializers:
                    name = "_" + name
                tables.append(add_initializer(graph, name, ir.tensor(values, name=name)))
            made[key] = (tables[0], tables[1])
        node.replace_input_with(slots[0], made[key][0])
        node.replace_input_with(slots[1], made[key][1])
    return len(made)


def _total_length_from_mask(model: FdecModel) -> int:
    """GroupQueryAttention's total_sequence_length ← the attention mask's width, as a shape.

    ONNX Runtime's CUDA kernel reads total_sequence_length (input 6) from host memory.
    onnxscript's fusion computes it as max(position_ids) + 1: a reduction over a device
    input, so the CUDA session needs a MemcpyToHost before every step's attention, and
    ONNX Runtime refuses to capture CUDA graphs for a graph with Memcpy nodes. The mask's
    width ([batch, past + seq], onnxruntime-genai's contract too) is the same number for
    every caller that feeds a mask of the sequence's length, and Shape's output lives in host
    memory on the CUDA provider, so Cast(Shape(mask)[1:2]) is a host-side shape computation
    with no copy. A static decode step (fdec.runtime.bound, CUDA graphs) binds a max-length
    mask, so its total is the buffer's length, as the kernel expects with a shared buffer;
    per-row lengths still come from seqlens_k. Returns the GroupQueryAttention nodes rewired;
    the caller removes the nodes that computed the old total.
    """
    graph = model.graph
    mask = next((v for v in graph.inputs if v.name == "attention_mask"), None)
    if mask is None or mask.shape is None or len(mask.shape) != 2:
        return 0
    nodes = [
        node
        for node in graph
        if node.op_type == "GroupQueryAttention" and node.domain == _MS and len(node.inputs) > 6
    ]
    if not nodes:
        return 0
    width = ir.node("Shape", [mask], {"start": 1, "end": 2}, name="gqa_total_length_Shape")
    total = ir.node(
        "Cast", [width.outputs[0]], {"to": ir.DataType.INT32}, name="gqa_total_length_Cast"
    )
    total.outputs[0].name = "gqa_total_sequence_length"
    total.outputs[0].dtype = ir.DataType.INT32
    total.outputs[0].shape = ir.Shape([1])
    graph.insert_before(nodes[0], [width, total])
    for node in nodes:
        node.replace_input_with(6, total.outputs[0])
    return len(nodes)


@dataclasses.dataclass
class _Softcaps:
    """Attention soft-capping (Gemma 2: `cap · tanh(scores / cap)` before the mask) taken out
    of the graph so that onnxscript's attention rules match, then handed to
    GroupQueryAttention's `softcap` attribute, which computes the same. Each entry: the
    capped scores, and the node and input index that read the capped output."""

    cap: float | None = None
    readers: list[tuple[ir.Value, ir.Node, int]] = dataclasses.field(default_factory=list)

    @classmethod
    def strip(cls, model: FdecModel) -> _Softcaps:
        found = cls()
        for tanh in [node for node in model.graph if node.op_type == "Tanh"]:
            divide = tanh.inputs[0].producer() if tanh.inputs[0] is not None else None
            uses = list(tanh.outputs[0].uses())
            if divide is None or divide.op_type != "Div" or len(uses) != 1:
                continue
            multiply = uses[0][0]
            cap = const_scalar(divide.inputs[1])
            other = multiply.inputs[1 - uses[0][1]] if multiply.op_type == "Mul" else None
            if cap is None or other is None or const_scalar(other) != cap or cap <= 0:
                continue
            if not _reaches_softmax(multiply.outputs[0]) or found.cap not in (None, cap):
                continue  # the final logits' soft-capping stays; so do mixed caps
            found.cap = cap
            for reader, index in list(multiply.outputs[0].uses()):
                reader.replace_input_with(index, divide.inputs[0])
                found.readers.append((divide.inputs[0], reader, index))
        return found

    def settle(self, model: FdecModel) -> int:
        """After fusion: the cap on every GroupQueryAttention where each capped attention
        fused into one, else the soft-capping back where its readers are still in the graph.
        Returns the GroupQueryAttention nodes capped."""
        if not self.readers:
            return 0
        attention = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
        gone = [reader.graph is None for _, reader, _ in self.readers]
        if all(gone) and len(attention) == len(self.readers):
            for node in attention:
                node.attributes["softcap"] = ir.AttrFloat32("softcap", self.cap)
            return len(attention)
        if any(gone):
            raise FusionError(
                "soft-capped attention fused into an op without the cap "
                f"({sum(gone)} of {len(gone)} layers, {len(attention)} GroupQueryAttention)"
            )
        for scores, reader, index in self.readers:  # nothing fused: the graph as it was
            cap = ir.tensor(np.asarray(self.cap, dtype=np.float32))
            constant = ir.node("Constant", [], {"value": cap})
            divide = ir.node("Div", [scores, constant.outputs[0]])
            tanh = ir.node("Tanh", [divide.outputs[0]])
            multiply = ir.node("Mul", [tanh.outputs[0], constant.outputs[0]])
            for node in (divide, tanh, multiply):
                node.outputs[0].dtype, node.outputs[0].shape = scores.dtype, scores.shape
            reader.graph.insert_before(reader, [constant, divide, tanh, multiply])
            reader.replace_input_with(index, multiply.outputs[0])
        return 0


class FusionError(RuntimeError):
    """fuse-attention reached a form it cannot keep exact."""


def _reaches_softmax(value: ir.Value) -> bool:
    """Whether `value` is read by a Softmax, directly or through one Add (the mask)."""
    for reader, _ in value.uses():
        if reader.op_type == "Softmax":
            return True
        if reader.op_type == "Add" and any(
            r.op_type == "Softmax" for r, _ in reader.outputs[0].uses()
        ):
            return True
    return False


_NORMALIZE_RULES = RewriteRuleSet(
    [RotaryAnglesAsMatMul.rule(), Conv1DAsMatMul.rule(), DropSameShapeReshape.rule()]
)
_STANDARDIZE_RULES = RewriteRuleSet([ExpandOnnxDomainRmsNorm.rule()])
_HOST_SHAPE_RULES = RewriteRuleSet([ShiftRangeOnHost.rule()])


def _shift_ranges(model: FdecModel) -> int:
    try:
        return _HOST_SHAPE_RULES.apply_to_model(model.model)
    finally:
        forget_matched_nodes()


def _op_counts(model: FdecModel) -> collections.Counter[str]:
    return collections.Counter(
        node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
    )


@dataclasses.dataclass
class FuseAttentionPass(Pass):
    """Fuse attention (+ rotary), RMSNorm and residual adds into ONNX Runtime contrib ops.

    Llama-style models (Llama, Qwen2, Mistral) get one com.microsoft GroupQueryAttention per
    layer, reading the KV cache in BNSH layout straight from the graph inputs, which lets the
    runtime share one max-length buffer between past and present. Where a family's attention
    does not fuse, the pass still fuses what it can and says so in `stats["not_fused"]`.
    Run it after quantization: weight quantizers and AWQ's norm folding see the plain graph.
    """

    name = "fuse-attention"
    family = "fuse"
    summary = "fuse attention (+rotary) and RMSNorm into ONNX Runtime ops (GroupQueryAttention)"
    # Exact up to float rounding (fused kernels reorder sums): the fp32 contract holds.
    tolerance = EXACT

    backend: str = dataclasses.field(default="onnxruntime", kw_only=True)
    # cos/sin tables as initializers [max_positions, rotary_dim / 2] (as onnxruntime-genai)
    # instead of computed every step from position_ids
    rotary_cache: bool = dataclasses.field(default=True, kw_only=True)

    def check_target(self, target: Any) -> None:
        known = self.backend in backend_names()
        if not known or "com.microsoft" not in get_backend(self.backend).op_domains:
            raise UsageError(
                f"fuse-attention emits com.microsoft ops, which the {self.backend} backend "
                "cannot run",
                "drop fuse-attention from --passes (TensorRT keeps standard ONNX attention), "
                "or use --backend onnxruntime",
            )

    def call(self, model: FdecModel) -> PassResult:
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        before = _op_counts(model)
        nodes_before = sum(before.values())
        if not model.spec.is_decoder:
            # Encoders (BERT-style) fuse to Attention/SkipLayerNormalization in onnxscript, but
            # fdec has not verified those builds yet.
            return PassResult(
                model,
                modified=False,
                stats={"nodes_before": nodes_before, "not_fused": "encoder models: not yet"},
            )
        head_dim = model.spec.head_dim
        if head_dim and head_dim % GQA_HEAD_SIZE_MULTIPLE:
            reason = (
                f"head size {head_dim} is not a multiple of {GQA_HEAD_SIZE_MULTIPLE}: ONNX "
                "Runtime's GroupQueryAttention refuses it, so the traced attention is kept"
            )
            logger.info("fuse-attention: %s", reason)
            shifted = _shift_ranges(model)
            return PassResult(
                model,
                modified=bool(shifted),
                stats={"nodes_before": nodes_before, "not_fused": reason,
                       "ranges_shifted_to_host": shifted},
            )  # fmt: skip
        # fdec's folder first: it keeps weight names through folded transposes, so the
        # folding inside onnxscript's optimizer finds no weight left to rename.
        FoldConstantsPass()(model)
        softcaps = _Softcaps.strip(model)
        try:
            onnxscript_optimizer.optimize(model.model)
            normalized = _NORMALIZE_RULES.apply_to_model(model.model)
            with fdec_rules(rows=model.spec.max_positions):
                fused_model, fusions = optimize_for_ort(model.model)
            if fused_model is not model.model:
                model.model = fused_model
            expanded = _STANDARDIZE_RULES.apply_to_model(model.model)
            ranges_shifted = _shift_ranges(model)
        finally:
            forget_matched_nodes()
        capped = softcaps.settle(model)
        _type_fused_outputs(model)
        rotary_caches = _constant_rotary_caches(model) if self.rotary_cache else 0
        total_from_mask = _total_length_from_mask(model)
        if rotary_caches or total_from_mask:  # the per-step computations they replaced
            onnx_ir_common.RemoveUnusedNodesPass()(model.model)
        after = _op_counts(model)
        nodes_after = sum(after.values())
        fused_ops = {
            op.split("::", 1)[1]: count - before.get(op, 0)
            for op, count in sorted(after.items())
            if op.startswith(f"{_MS}::") and count > before.get(op, 0)
        }
        attention = {op: fused_ops[op] for op in FUSED_ATTENTION_OPS if fused_ops.get(op)}
        stats: dict[str, Any] = {
            "nodes_before": nodes_before,
            "nodes_after": nodes_after,
            "node_ratio": round(nodes_before / max(nodes_after, 1), 2),
            "fused_ops": fused_ops,
            "fusions": {k: v for k, v in sorted(fusions.items()) if v},
            "rewritten_for_ort_fusions": normalized,
            "rms_norms_kept_standard": expanded,
            "ranges_shifted_to_host": ranges_shifted,
            "constant_rotary_caches": rotary_caches,
            "softcapped_attention": capped,
            "total_length_from_mask_width": total_from_mask,
            "attention": next(iter(attention), None),
            "kv_layout": "BNSH",
            "kv_shared_buffer_layers": len(shared_kv_layers(model.model)),
        }
        layers = model.spec.num_layers if model.spec.is_decoder else 0
        fused_layers = sum(attention.values())
        if layers and fused_layers < layers:
            stats["not_fused"] = (
                f"attention of {layers - fused_layers} of {layers} layers stayed as traced "
                f"({model.spec.family}: onnxscript's ort_fusions found no fused form for it)"
            )
            logger.info("fuse-attention: %s", stats["not_fused"])
        return PassResult(model, modified=nodes_after != nodes_before, stats=stats)


@dataclasses.dataclass
class HostShapesPass(Pass):
    """Keep a graph's shape arithmetic where ONNX Runtime's CUDA provider reads it, the host:
    `Range(...) + offset` becomes a shifted Range (`ShiftRangeOnHost`), so no MemcpyFromHost
    runs every step. fuse-attention applies the same rules; the onnxruntime-cuda backend adds
    this pass where its pipeline has no fuse-attention (attention sinks, a --passes list)."""

    name = "host-shapes"
    family = "fuse"
    summary = "keep shape arithmetic on the host for ONNX Runtime's CUDA provider (no Memcpy)"
    tolerance = EXACT  # integer positions, the same numbers

    def call(self, model: FdecModel) -> PassResult:
        shifted = _shift_ranges(model)
        return PassResult(model, modified=bool(shifted), stats={"ranges_shifted_to_host": shifted})
