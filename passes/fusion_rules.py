"""fdec's own onnxscript rewrite rules for fuse-attention (fdec.passes.fusion): they put
graphs in the forms onnxscript's ort_fusions match (rotary angles as a MatMul, GPT-2's Conv1D
as MatMul, no reshape of the attention output to its own shape) or back in standard ONNX
(RMSNorm; ranges shifted on the host). The attention fusions themselves, onnxscript's rules
corrected where they drop what the traced attention says, are in fdec.passes.attention_rules.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern

__all__ = [
    "Conv1DAsMatMul",
    "DropSameShapeReshape",
    "ExpandOnnxDomainRmsNorm",
    "InterleavedRotary",
    "RotaryAnglesAsMatMul",
    "ScaledRotaryCache",
    "ShiftRangeOnHost",
    "const_scalar",
    "forget_matched_nodes",
    "rotary_tables",
]


class RotaryAnglesAsMatMul(pattern.RewriteRuleClassBase):
    """`Cast(Unsqueeze(position_ids, [-1])) * inv_freq` → `Transpose(inv_freq[1,E,1] @ pos[B,1,S])`.

    The second form is what onnxscript's CosSinCacheFusion matches (transformers < 5). The
    positions stay where other angles read them too (Gemma 3's two rotary tables, one per layer
    kind, share one Cast of position_ids): with them removed only, the rule matched nothing
    there and Gemma 3 kept MultiHeadAttention; what no one reads is removed afterwards.
    """

    def __init__(self) -> None:
        super().__init__("RotaryAnglesAsMatMul", remove_nodes=False)

    def pattern(self, op, position_ids, axes, inv_freq):
        positions = op.Cast(op.Unsqueeze(position_ids, axes), to=ir.DataType.FLOAT)
        return op.Mul(positions, inv_freq)

    def check(self, context, position_ids, axes, inv_freq, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if not _ir_utils.has_rank(position_ids, 2):
            return result.fail("position_ids is not 2-D", position_ids)
        if not _one_of(axes, 2, -1):
            return result.fail("position_ids not unsqueezed on its last axis", axes)
        if _vector(inv_freq) is None:
            return result.fail("inv_freq is not a constant vector", inv_freq)
        return result

    def rewrite(self, op, position_ids, inv_freq, **_):
        values = _vector(inv_freq).astype(np.float32).reshape(1, -1, 1)
        inv = op.Constant(value=ir.tensor(values))
        positions = op.Unsqueeze(position_ids, op.Constant(value_ints=[1]))
        positions = op.Cast(positions, to=ir.DataType.FLOAT)
        return op.Transpose(op.MatMul(inv, positions), perm=[0, 2, 1])


class ScaledRotaryCache(pattern.RewriteRuleClassBase):
    """A rotary whose cos/sin carry an attention factor, or whose frequencies switch on the
    sequence's length, → RotaryEmbedding on constant [max_positions, E] cos/sin tables.

    YaRN and longrope multiply cos and sin by an attention factor (transformers'
    `attention_scaling`), and a longrope model (Phi-3.5, Phi-4-mini) takes its inverse
    frequencies from `Where(length > original positions, long, short)`. onnxscript's
    cos/sin-cache rule matches neither (it wants constant frequencies and no factor), so such
    models kept the rotary traced and MultiHeadAttention. The tables here hold the factor
    (the rotary reads cos and sin only as products with the same input, so scaling the table
    is the same arithmetic); a switched rotary gets both tables with the graph's own switch
    selecting one each step, as onnxruntime-genai's builder selects between two caches (its
    `If` would stop CUDA graph capture; a Where copies one table per step, on the device).
    Angles and rounding as `_constant_rotary_caches` (fdec.passes.fusion): one float32
    product per position and frequency, cos and sin in float64, rounded to float32.
    """

    def __init__(self, rows: int, scaled: bool, matmul: bool = False):
        # matmul: the angles in the form RotaryAnglesAsMatMul gives constant frequencies
        kind = ("scaled" if scaled else "switched") + ("_matmul" if matmul else "")
        super().__init__(f"ScaledRotaryCache_{kind}", remove_nodes=False)
        self._rows, self._scaled, self._matmul = rows, scaled, matmul
        self._tables: dict[tuple, tuple[ir.Value, ir.Value]] = {}

    def cleanup(self) -> None:
        self._tables.clear()

    def pattern(self, op, x, position_ids, axes, inv_freq, cos_scale, sin_scale, cos_axes,
                sin_axes, interleaved, num_heads):  # fmt: skip
        positions = op.Cast(op.Unsqueeze(position_ids, axes), to=ir.DataType.FLOAT)
        if self._matmul:
            freqs = op.Transpose(op.MatMul(inv_freq, positions), perm=[0, 2, 1])
        else:
            freqs = op.Mul(positions, inv_freq)
        emb = op.Concat(freqs, freqs, axis=-1)
        cos, sin = op.Cos(emb), op.Sin(emb)
        if self._scaled:
            cos, sin = op.Mul(cos, cos_scale), op.Mul(sin, sin_scale)
        return op.RotaryEmbedding(
            x, op.Unsqueeze(cos, cos_axes), op.Unsqueeze(sin, sin_axes),
            interleaved=interleaved, num_heads=num_heads, _domain="ai.onnxruntime._fusion",
        )  # fmt: skip

    def check(self, context, position_ids, axes, inv_freq, cos_axes, sin_axes, cos_scale=None,
              sin_scale=None, **_) -> pattern.MatchResult:  # fmt: skip
        result = pattern.MatchResult()
        if self._rows <= 0 or not _ir_utils.has_rank(position_ids, 2):
            return result.fail("no positions, or position_ids not 2-D", position_ids)
        if not _one_of(axes, *((1,) if self._matmul else (2, -1))):
            return result.fail("position_ids not unsqueezed where the angles want", axes)
        if not all(_one_of(a, 1) for a in (cos_axes, sin_axes)):
            return result.fail("cos/sin not unsqueezed on the head axis", cos_axes)
        if self._scaled and (
            const_scalar(cos_scale) is None or const_scalar(cos_scale) != const_scalar(sin_scale)
        ):
            return result.fail("cos and sin scaled differently or by no constant", cos_scale)
        if _switched_frequencies(inv_freq) is None:
            if not self._scaled or _vector(inv_freq) is None:  # onnxscript's own rule's case
                return result.fail("frequencies neither constant nor switched", inv_freq)
        return result

    def rewrite(self, op, x, position_ids, inv_freq, interleaved, num_heads, cos_scale=None,
                **_):  # fmt: skip
        scale = const_scalar(cos_scale) if self._scaled else 1.0
        key = (id(inv_freq), scale)
        if key not in self._tables:
            switched = _switched_frequencies(inv_freq)
            if switched is None:
                self._tables[key] = self._table(op, _vector(inv_freq), scale)
            else:
                condition, long, short = switched
                pairs = zip(self._table(op, long, scale), self._table(op, short, scale))
                self._tables[key] = tuple(
                    _typed(op.Where(condition, on_long, on_short), on_long)
                    for on_long, on_short in pairs
                )
        cos, sin = self._tables[key]
        return op.RotaryEmbedding(
            x, position_ids, cos, sin, interleaved=interleaved, num_heads=num_heads,
            _domain="com.microsoft",
        )  # fmt: skip

    def _table(self, op, frequencies: np.ndarray, scale: float) -> tuple[ir.Value, ir.Value]:
        tables = rotary_tables(self._rows, frequencies, scale)
        return tuple(_typed(op.Constant(value=ir.tensor(t)), ir.tensor(t)) for t in tables)


class InterleavedRotary(pattern.RewriteRuleClassBase):
    """transformers' interleaved rotary over whole heads (Helium, ERNIE 4.5: pairs of adjacent
    dims rotated, `x[..., ::2]` / `x[..., 1::2]` stacked back, cos and sin halves
    `repeat_interleave`d) → the RotaryEmbedding onnxscript's rotary rule writes for the
    rotate-half form, with `interleaved=1` and the full-width cos/sin the halves were sliced
    from (ONNX Runtime's interleaved kernels read cos[i] for the pair 2i, 2i + 1, which is
    the first half of that width). The cos/sin-cache rules then take it to constant tables,
    and GroupQueryAttention takes its rotary with `rotary_interleaved=1`. Cohere's tables
    (interleaved themselves, not sliced halves) and GLM's partial rotary do not match."""

    def __init__(self) -> None:
        super().__init__("InterleavedRotary", remove_nodes=False)

    def pattern(self, op, x, even_start, odd_start, end, axes, step, cos_full, sin_full,
                half_start, half_end, half_axes, half_step, stack_axis, pair_axis, pairs):  # fmt: skip
        even = op.Slice(x, even_start, end, axes, step)
        odd = op.Slice(x, odd_start, end, axes, step)
        stacked = op.Concat(
            op.Unsqueeze(op.Neg(odd), stack_axis), op.Unsqueeze(even, stack_axis), axis=-1
        )
        rotated = op.Reshape(stacked, pattern.ANY_VALUE)
        cos, sin = (
            op.Reshape(
                op.Expand(
                    op.Unsqueeze(op.Slice(full, half_start, half_end, half_axes, half_step), pair_axis),
                    pairs,
                ),
                pattern.ANY_VALUE,
            )
            for full in (cos_full, sin_full)
        )  # fmt: skip
        return op.Add(op.Mul(x, cos), op.Mul(rotated, sin))

    def check(self, context, x, even_start, odd_start, end, axes, step, half_start, half_end,
              half_axes, half_step, stack_axis, pair_axis, pairs, **_) -> pattern.MatchResult:  # fmt: skip
        result = pattern.MatchResult()
        if x.shape is None or x.shape.rank() != 4:
            return result.fail("not a 4-D query or key", x)
        heads, head = x.shape[1], x.shape[3]
        if not isinstance(heads, int) or not isinstance(head, int):
            return result.fail("heads or head size unknown", x)
        if not (
            _one_of(even_start, 0) and _one_of(odd_start, 1) and _one_of(step, 2)
            and _one_of(end, lambda e: e >= head) and _one_of(half_start, 0)
            and _one_of(half_end, head // 2) and _one_of(half_step, 1)
            and all(_one_of(a, 3, -1) for a in (axes, half_axes))
            and all(_one_of(a, 4, -1) for a in (stack_axis, pair_axis))
        ):  # fmt: skip
            return result.fail("not every other dim, or not the cos/sin halves", x)
        repeats = _vector(pairs)
        if repeats is None or repeats.tolist() != [1, 1, 1, 1, 2]:
            return result.fail("cos/sin halves not repeated in pairs", pairs)
        self._heads = heads
        return result

    def rewrite(self, op, x, cos_full, sin_full, **_):
        return op.RotaryEmbedding(
            x, cos_full, sin_full, interleaved=1, num_heads=self._heads,
            _domain="ai.onnxruntime._fusion",
        )  # fmt: skip


def rotary_tables(
    rows: int, inv_freq: np.ndarray, scale: float = 1.0, dtype: Any = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [rows, E] of positions 0..rows-1 times inv_freq (E values), times `scale`:
    each angle one float32 product (as the traced graph computes it), cos and sin in float64,
    rounded to `dtype`."""
    positions = np.arange(rows, dtype=np.float32)[:, None]
    angles = (positions * inv_freq.astype(np.float32).reshape(1, -1)).astype(np.float64)
    return (np.cos(angles) * scale).astype(dtype), (np.sin(angles) * scale).astype(dtype)


def _typed(value: ir.Value, like: Any) -> ir.Value:
    """`value` with the float type and shape of `like` (a value or tensor): the rotary and
    GroupQueryAttention rules after this one read the table's width from its shape."""
    value.dtype, value.shape = like.dtype, ir.Shape(like.shape)
    return value


def _one_of(value: ir.Value, *allowed: Any) -> bool:
    """Whether `value` is a one-element constant equal to one of `allowed` (or for which
    an `allowed` predicate holds)."""
    return any(_ir_utils.is_singleton_value(value, a) for a in allowed)


def const_scalar(value: ir.Value | None) -> float | None:
    """The value of a one-element constant (an initializer or a Constant's output), or None."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return float(tensor.numpy().reshape(())) if tensor is not None and tensor.size == 1 else None


def _vector(value: ir.Value | None) -> np.ndarray | None:
    tensor = value.const_value if value is not None else None
    if tensor is None or tensor.numpy().squeeze().ndim != 1:
        return None
    return tensor.numpy().reshape(-1)


def _switched_frequencies(value: ir.Value) -> tuple[ir.Value, np.ndarray, np.ndarray] | None:
    """(condition, long, short) where `value` is Where(scalar condition, long, short) of two
    constant frequency vectors (transformers' longrope switch)."""
    node = value.producer()
    if node is None or node.op_type != "Where" or node.domain not in ("", "ai.onnx"):
        return None
    condition, long, short = node.inputs
    long, short = _vector(long), _vector(short)
    if long is None or short is None or long.shape != short.shape:
        return None
    if condition is None or condition.shape is None or condition.shape.rank() != 0:
        return None
    return condition, long, short


class Conv1DAsMatMul(pattern.RewriteRuleClassBase):
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


class DropSameShapeReshape(pattern.RewriteRuleClassBase):
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


class ShiftRangeOnHost(pattern.RewriteRuleClassBase):
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


class ExpandOnnxDomainRmsNorm(pattern.RewriteRuleClassBase):
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


def forget_matched_nodes() -> int:
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
