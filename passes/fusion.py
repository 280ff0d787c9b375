"""Attention fusion for ONNX Runtime: traced attention, rotary and RMSNorm → com.microsoft fused ops.

Wraps onnxscript's `ort_fusions.optimize_for_ort` (GroupQueryAttention with the rotary folded
in, SkipSimplifiedLayerNormalization, MultiHeadAttention, ...). One rule of fdec's own runs
first: transformers ≥ 5 computes rotary angles as `position_ids[..., None] * inv_freq`, where
onnxscript's cos/sin-cache rule expects the older `(inv_freq @ position_ids).transpose(1, 2)`;
the rule rewrites the first into the second (same numbers), so the rest is onnxscript's, with
its GroupQueryAttention and MultiHeadAttention rules subclassed where they drop what the
traced attention says (the scale, a partial rotary: `_fdec_rules`).

The fused graph keeps the build's I/O contract (input/output names, KV-cache layout BNSH) and
the names of the MatMul weights ModelSpec roles point at. Only ONNX Runtime runs com.microsoft
ops: the pass refuses other backends, where standard ONNX attention stays.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as onnx_ir_common
from onnxscript import optimizer as onnxscript_optimizer
from onnxscript.rewriter import RewriteRuleSet, _ir_utils, pattern
from onnxscript.rewriter.ort_fusions import gqa, gqa_packed_qkv, mha

from fdec.backends import backend_names, get_backend
from fdec.errors import UsageError
from fdec.ir import FdecModel, shared_kv_layers
from fdec.passes.cleanup import FoldConstantsPass
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


class _RotaryAnglesAsMatMul(pattern.RewriteRuleClassBase):
    """`Cast(Unsqueeze(position_ids, [-1])) * inv_freq` → `Transpose(inv_freq[1,E,1] @ pos[B,1,S])`.

    The second form is what onnxscript's CosSinCacheFusion matches (transformers < 5).
    """

    def __init__(self) -> None:
        super().__init__("RotaryAnglesAsMatMul", remove_nodes=True)

    def pattern(self, op, position_ids, axes, inv_freq):
        positions = op.Cast(op.Unsqueeze(position_ids, axes), to=ir.DataType.FLOAT)
        return op.Mul(positions, inv_freq)

    def check(self, context, position_ids, axes, inv_freq, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if not _ir_utils.has_rank(position_ids, 2):
            return result.fail("position_ids is not 2-D", position_ids)
        if not (_ir_utils.is_singleton_value(axes, 2) or _ir_utils.is_singleton_value(axes, -1)):
            return result.fail("position_ids not unsqueezed on its last axis", axes)
        tensor = inv_freq.const_value
        if tensor is None or tensor.numpy().squeeze().ndim != 1:
            return result.fail("inv_freq is not a constant vector", inv_freq)
        return result

    def rewrite(self, op, position_ids, inv_freq, **_):
        values = inv_freq.const_value.numpy().astype(np.float32).reshape(1, -1, 1)
        inv = op.Constant(value=ir.tensor(values))
        positions = op.Unsqueeze(position_ids, op.Constant(value_ints=[1]))
        positions = op.Cast(positions, to=ir.DataType.FLOAT)
        return op.Transpose(op.MatMul(inv, positions), perm=[0, 2, 1])


class _Conv1DAsMatMul(pattern.RewriteRuleClassBase):
    """`Reshape(Gemm(Reshape(x, [-1, K]), W, b), [B, S, N])` → `MatMul(x, W) + b` on 3-D x.

    GPT-2's Conv1D flattens to 2-D around a Gemm. onnxscript's MultiHeadAttention rule then
    swallows the flattening Reshape and hands the Gemm a 3-D input, which ONNX Runtime refuses;
    with a 3-D MatMul there is nothing to swallow. The weight keeps its name.
    """

    def __init__(self) -> None:
        super().__init__("Conv1DAsMatMul", remove_nodes=True)

    def pattern(self, op, x, flat_shape, weight, out_shape):
        flat = op.Reshape(x, flat_shape, _allow_other_attributes=True)
        y = op.Gemm(
            flat, weight, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["gemm"]
        )
        return op.Reshape(y, out_shape, _allow_other_attributes=True, _outputs=["out"])

    def check(self, context, x, weight, gemm, out, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        attributes = gemm.producer().attributes
        bias = _gemm_bias(gemm)
        if (
            attributes.get_int("transA", 0)
            or attributes.get_int("transB", 0)
            or attributes.get_float("alpha", 1.0) != 1.0
            or attributes.get_float("beta", 1.0) != 1.0
        ):
            return result.fail("Gemm with transposes or scales", gemm)
        if (
            x.shape is None
            or out.shape is None
            or len(x.shape) not in (3, 4)
            or len(out.shape) != 3
        ):
            return result.fail("not a 3-D (or 4-D head-split) input reshaped back to 3-D", x)
        if weight.shape is None or len(weight.shape) != 2:
            return result.fail("weight is not 2-D", weight)
        if len(x.shape) == 4 and not (
            isinstance(x.shape[2], int)
            and isinstance(x.shape[3], int)
            and x.shape[2] * x.shape[3] == weight.shape[0]
        ):
            return result.fail("4-D input whose heads do not merge into the weight's rows", x)
        if bias is not None and (bias.shape is None or len(bias.shape) != 1):
            return result.fail("bias is not 1-D", bias)
        if list(x.shape)[:2] != list(out.shape)[:2] or out.shape[2] != weight.shape[1]:
            return result.fail("output dims are not the input's leading dims", out)
        return result

    def rewrite(self, op, x, weight, gemm, **_):
        if len(x.shape) == 4:  # [B, S, heads, head_dim] → [B, S, hidden]
            x = op.Reshape(x, op.Constant(value_ints=[0, 0, -1]))
        bias = _gemm_bias(gemm)
        product = op.MatMul(x, weight)
        return product if bias is None else op.Add(product, bias)


class _DropSameShapeReshape(pattern.RewriteRuleClassBase):
    """`Reshape(x, shape)` whose output has x's shape, dim for dim (equal sizes or the same
    symbolic names) → x.

    Phi-3's traced attention reshapes its [batch, heads, sequence, head] output to that same
    shape before the Transpose, where onnxscript's GroupQueryAttention rule expects the
    attention output itself; it fell back to MultiHeadAttention (tests/test_compile.py).
    """

    def __init__(self) -> None:
        super().__init__("DropSameShapeReshape", remove_nodes=True)

    def pattern(self, op, x, shape):
        return op.Reshape(x, shape, _allow_other_attributes=True, _outputs=["reshaped"])

    def check(self, context, x, reshaped, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        ours, theirs = x.shape, reshaped.shape
        if ours is None or theirs is None or ours.rank() != theirs.rank():
            return result.fail("shapes unknown or of other ranks", reshaped)
        for a, b in zip(ours, theirs, strict=True):
            named = isinstance(a, ir.SymbolicDim) and isinstance(b, ir.SymbolicDim)
            if a != b or (named and a.value is None):
                return result.fail("a dimension may differ", reshaped)
        return result

    def rewrite(self, op, x, **_):
        return op.Identity(x)


class _ShiftRangeOnHost(pattern.RewriteRuleClassBase):
    """`Range(start, limit, delta) + offset` → `Range(start + offset, limit + offset, delta)`
    for a scalar integer offset (the same numbers).

    GPT-2's traced causal mask makes its positions as `arange(sequence) + past length`. On
    ONNX Runtime's CUDA provider Range reads its three scalars from host memory and writes the
    positions to the device, so the Add of the host-side past length made a MemcpyFromHost on
    every step (and no CUDA graph capture). Shifted inside the Range, the Adds are host shape
    work (fdec.lower.cuda_placement's rule 1) and nothing crosses.
    """

    def __init__(self) -> None:
        super().__init__("ShiftRangeOnHost", remove_nodes=True)

    def pattern(self, op, start, limit, delta, offset):
        return op.Add(op.Range(start, limit, delta), offset)

    def check(self, context, start, limit, delta, offset, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        scalars = (start, limit, delta, offset)
        if any(v.shape is None or v.shape.rank() != 0 for v in scalars):
            return result.fail("not all scalars", offset)
        if any(v.dtype not in (ir.DataType.INT64, ir.DataType.INT32) for v in scalars):
            return result.fail("not integers (a float shift may round differently)", offset)
        if _ir_utils.get_singleton_value(offset) is not None:
            return result.fail("a constant offset is added on the device with no copy", offset)
        return result

    def rewrite(self, op, start, limit, delta, offset, **_):
        return op.Range(op.Add(start, offset), op.Add(limit, offset), delta)


def _gemm_bias(gemm: ir.Value) -> ir.Value | None:
    inputs = gemm.producer().inputs
    return inputs[2] if len(inputs) > 2 else None


class _ExpandOnnxDomainRmsNorm(pattern.RewriteRuleClassBase):
    """A `SimplifiedLayerNormalization` left in the ONNX domain → standard ops.

    onnxscript leaves the norm that follows no residual add (the first layer's) as ONNX Runtime's
    private ONNX-domain op, which the ONNX checker rejects; ORT fuses the standard form back at
    session optimization, so the build stays valid ONNX at no cost. The form is the one ORT's
    SimplifiedLayerNormFusion matches (core/optimizer/layer_norm_fusion.cc): `Pow(x, 2)`, not
    `Mul(x, x)` (which it does not fuse, and which a fp16 graph would square in fp16, overflowing
    at |x| = 256), and `Div(x, Sqrt(...))`, the normalize step fdec's typing keeps in fp32 beside
    the Pow so the CUDA graph keeps the fusion's fp16 pattern (Cast → Pow/Div → Cast → Mul).
    """

    def __init__(self) -> None:
        super().__init__("ExpandOnnxDomainRmsNorm", remove_nodes=True)

    def pattern(self, op, x, scale):
        return op.SimplifiedLayerNormalization(
            x, scale, _allow_other_attributes=True, _outputs=["normalized"]
        )

    def check(self, context, x, normalized, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        node = normalized.producer()
        axis = node.attributes.get_int("axis", -1)
        rank = len(x.shape) if x.shape is not None else None
        if axis != -1 and (rank is None or axis != rank - 1):
            return result.fail("normalizes over an axis other than the last", x)
        if x.dtype != ir.DataType.FLOAT:
            return result.fail("input is not float32", x)
        return result

    def rewrite(self, op, x, scale, normalized, **_):
        epsilon = normalized.producer().attributes.get_float("epsilon", 1e-5)
        squared = op.Pow(x, op.Constant(value=ir.tensor(np.float32(2.0))))
        mean = op.ReduceMean(squared, op.Constant(value_ints=[-1]), keepdims=1)
        std = op.Sqrt(op.Add(mean, op.Constant(value=ir.tensor(np.float32(epsilon)))))
        return op.Mul(op.Div(x, std), scale)


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
            positions = np.arange(rows, dtype=np.float32)[:, None]
            angles = (positions * inv_freq.astype(np.float32)).astype(np.float64)
            dtype = cos.dtype.numpy() if cos.dtype is not None else np.float32
            tables = []
            for which, function in (("cos", np.cos), ("sin", np.sin)):
                name = f"rotary.{which}_cache"
                while name in graph.initializers:
                    name = "_" + name
                tensor = ir.tensor(function(angles).astype(dtype), name=name)
                tables.append(add_initializer(graph, name, tensor))
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


def _forget_matched_nodes() -> int:
    """Drop the node each onnxscript pattern matcher remembers from its last match.

    The rule sets are module globals, and `SimplePatternMatcher._current_node` keeps the last
    node it looked at (and `_graph` the graph), so through them every weight of the model stays alive
    after the pass (measured: 0.52 GiB, all of SmolLM2-135M's weights, still held when the
    build's verifying session opened). Returns how many references were dropped.
    """
    import gc

    from onnxscript.rewriter._matcher import SimplePatternMatcher

    dropped = 0
    for obj in gc.get_objects():
        if isinstance(obj, SimplePatternMatcher):
            for attribute in ("_current_node", "_match", "_graph"):
                if getattr(obj, attribute, None) is not None:
                    setattr(obj, attribute, None)
                    dropped += 1
    return dropped


_NORMALIZE_RULES = RewriteRuleSet(
    [_RotaryAnglesAsMatMul.rule(), _Conv1DAsMatMul.rule(), _DropSameShapeReshape.rule()]
)
_STANDARDIZE_RULES = RewriteRuleSet([_ExpandOnnxDomainRmsNorm.rule()])
_HOST_SHAPE_RULES = RewriteRuleSet([_ShiftRangeOnHost.rule()])


def _consumer_scale(value: ir.Value, op_type: str) -> tuple[bool, float | None]:
    """The `scale` attribute of the one `op_type` node reading `value`: (found, scale or None)."""
    nodes = {use.node for use in value.uses() if use.node.op_type == op_type}
    if len(nodes) != 1:
        return False, None
    attribute = next(iter(nodes)).attributes.get("scale")
    return True, None if attribute is None else attribute.as_float()


def _with_scale(outputs: Any, scale: float | None) -> Any:
    if scale is not None:
        outputs[0].producer().attributes["scale"] = ir.AttrFloat32("scale", scale)
    return outputs


class _FdecGqa(gqa.GroupQueryAttention):
    """onnxscript's GroupQueryAttention fusion, keeping the attention's own scale, and only
    where ONNX Runtime's kernel takes the rotary width.

    onnxscript 0.7.2 reads a scale other than 1/√head_size into its intermediate SDPA node but
    writes GroupQueryAttention without it, so ONNX Runtime applies 1/√head_size: Granite's
    attention_multiplier 1/64 became 1/4 (fp32 logits 0.009 off, tests/test_compile.py). And
    ONNX Runtime refuses a cos/sin table whose width (rotated dims / 2) is not a multiple of 8
    or is over half the head when it runs (a StableLM rotating 4 of 16 dims): those keep
    MultiHeadAttention + RotaryEmbedding.
    """

    def check(self, context, query_BHSDh_rope, cos, query_BSHDh, **bindings):
        result = super().check(
            context, query_BHSDh_rope=query_BHSDh_rope, cos=cos, query_BSHDh=query_BSHDh, **bindings
        )
        if result:
            head = _ir_utils.get_dim(query_BSHDh, 3)
            width = cos.shape[1] if cos.shape is not None and cos.shape.rank() == 2 else None
            if not isinstance(width, int) or not isinstance(head, int):
                return pattern.MatchResult().fail("rotary table width unknown", cos)
            if width % 8 or width > head // 2:
                return pattern.MatchResult().fail(f"rotary table width {width}", cos)
            found, self._scale = _consumer_scale(query_BHSDh_rope, "SDPA")
            if not found:
                return pattern.MatchResult().fail(
                    "no single SDPA reads the query", query_BHSDh_rope
                )
        return result

    def rewrite(self, op, **bindings):
        return _with_scale(super().rewrite(op, **bindings), self._scale)


class _FdecPackedGqa(gqa_packed_qkv.PackedQKVForGQAFusion):
    """onnxscript's packed-qkv GroupQueryAttention rule, keeping the matched node's scale."""

    def check(self, op, query_sliced, **bindings):
        result = super().check(op, query_sliced=query_sliced, **bindings)
        if result:
            found, self._scale = _consumer_scale(query_sliced, "GroupQueryAttention")
            if not found:
                return pattern.MatchResult().fail("no single GroupQueryAttention", query_sliced)
        return result

    def rewrite(self, op, **bindings):
        return _with_scale(super().rewrite(op, **bindings), self._scale)


class _FdecMha(mha.MultiHeadAttention):
    """onnxscript's MultiHeadAttention fusion, refused where a RotaryEmbedding it rewrites
    rotates part of each head or interleaved: its rewrite writes RotaryEmbedding without
    `rotary_embedding_dim` and `interleaved` (onnxscript 0.7.2), rotating all of each head.
    A StableLM rotating 4 of 16 dims was 1.9 off from position 1; refused, its SDPA becomes
    MultiHeadAttention by onnxscript's later `sdpa_via_mha`, which keeps the graph's rotary."""

    def check(self, context, **bindings):
        result = super().check(context, **bindings)
        for node in context.nodes if result else ():
            attributes = node.attributes
            partial = attributes.get_int("rotary_embedding_dim", 0)
            if node.op_type == "RotaryEmbedding" and (
                partial or attributes.get_int("interleaved", 0)
            ):
                return pattern.MatchResult().fail("a rotary its rewrite would widen", node)
        return result


def _mha_rules(past: bool) -> RewriteRuleSet:
    """onnxscript's MultiHeadAttention rule set (`mha._make_rule_set`) with `_FdecMha`."""
    return RewriteRuleSet(
        [
            _FdecMha.rule(
                f"MHA{'_Rotary' * rotary}{'_Past' * past}{'_CrossAttention' * cross}",
                is_rotary=rotary,
                has_past_present=past,
                is_cross_attention=cross,
            )
            for rotary in (False, True)
            for cross in ((False,) if past else (False, True))
        ]
    )


@contextlib.contextmanager
def _fdec_rules():
    """Run `optimize_for_ort` with fdec's attention rules above in place of its own."""
    from onnxscript.rewriter import _fusion_utils
    from onnxscript.rewriter.ort_fusions import _core

    names = ("fuse_gqa", "fuse_qkv_gqa", "fuse_mha1", "fuse_mha2")
    saved = {name: getattr(_core, name) for name in names}
    rules = (
        RewriteRuleSet([_FdecGqa.rule()]),
        RewriteRuleSet([_FdecPackedGqa.rule()]),
        _mha_rules(past=True),
        _mha_rules(past=False),
    )
    for name, rule_set in zip(names, rules, strict=True):
        setattr(_core, name, _fusion_utils.apply_fusion_rules(rule_set))
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(_core, name, function)


def _shift_ranges(model: FdecModel) -> int:
    try:
        return _HOST_SHAPE_RULES.apply_to_model(model.model)
    finally:
        _forget_matched_nodes()


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
        try:
            onnxscript_optimizer.optimize(model.model)
            normalized = _NORMALIZE_RULES.apply_to_model(model.model)
            with _fdec_rules():
                fused_model, fusions = optimize_for_ort(model.model)
            if fused_model is not model.model:
                model.model = fused_model
            expanded = _STANDARDIZE_RULES.apply_to_model(model.model)
            ranges_shifted = _shift_ranges(model)
        finally:
            _forget_matched_nodes()
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
    `Range(...) + offset` becomes a shifted Range (`_ShiftRangeOnHost`), so no MemcpyFromHost
    runs every step. fuse-attention applies the same rules; the onnxruntime-cuda backend adds
    this pass where its pipeline has no fuse-attention (attention sinks, a --passes list)."""

    name = "host-shapes"
    family = "fuse"
    summary = "keep shape arithmetic on the host for ONNX Runtime's CUDA provider (no Memcpy)"
    tolerance = EXACT  # integer positions, the same numbers

    def call(self, model: FdecModel) -> PassResult:
        shifted = _shift_ranges(model)
        return PassResult(model, modified=bool(shifted), stats={"ranges_shifted_to_host": shifted})
