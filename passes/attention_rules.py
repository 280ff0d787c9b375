"""The attention fusions fuse-attention (fdec.passes.fusion) runs: onnxscript's
GroupQueryAttention and MultiHeadAttention rules, corrected where they drop what the traced
attention says, and extended to the attention they never reached.

`fdec_rules` runs onnxscript's `optimize_for_ort` with subclasses of its rules that keep the
attention's scale, refuse what ONNX Runtime's kernels or the rewrites cannot take (a partial
or interleaved rotary; a rotary table width GroupQueryAttention rejects), and fuse layers
whose heads each have their own key and value, or that rotate nothing (NoPE layers).
"""

from __future__ import annotations

import contextlib
from typing import Any

import onnx_ir as ir
from onnxscript.rewriter import RewriteRuleSet, _ir_utils, pattern
from onnxscript.rewriter.ort_fusions import gqa, gqa_packed_qkv, mha

from fdec.passes.fusion_rules import InterleavedRotary, ScaledRotaryCache

__all__ = ["fdec_rules"]


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


class _Without:
    """The pattern builder onnxscript's GroupQueryAttention pattern is given by fdec's
    variants of it: with `repeat` off, the key and value repeat across the heads of a group
    (Unsqueeze → Expand → Reshape) becomes the value itself; with `rotary` off, each
    RotaryEmbedding becomes the value it would rotate."""

    def __init__(self, op: Any, *, repeat: bool = True, rotary: bool = True) -> None:
        self._op = op
        self._repeat = repeat
        self._rotary = rotary
        self._skipped: set[int] = set()

    def __getattr__(self, name: str) -> Any:
        build = getattr(self._op, name)
        if name == "RotaryEmbedding" and not self._rotary:
            return lambda x, *args, **kwargs: x
        if self._repeat or name not in ("Unsqueeze", "Expand", "Reshape"):
            return build

        def step(x: Any, *args: Any, **kwargs: Any) -> Any:
            if name == "Unsqueeze" or id(x) in self._skipped:
                self._skipped.add(id(x))
                return x
            return build(x, *args, **kwargs)

        return step


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


class _FdecGqaUnrepeated(_FdecGqa):
    """`_FdecGqa` where no head shares its key and value (Llama-2, Phi-3-mini, SmolLM2-1.7B):
    the traced graph repeats no key or value across heads, where onnxscript's pattern looks
    for the repeat, so such models fused to MultiHeadAttention, which concatenates the past
    each step where GroupQueryAttention writes one shared buffer in place."""

    def pattern(self, op, query_BSD, key_BSDkv, value_BSDkv, past_key, past_value, position_ids, cos, sin, mask):  # fmt: skip
        return super().pattern(
            _Without(op, repeat=False), query_BSD, key_BSDkv, value_BSDkv, past_key, past_value,
            position_ids, cos, sin, mask,
        )  # fmt: skip


class _FdecGqaNoRotary(gqa.GroupQueryAttention):
    """onnxscript's GroupQueryAttention fusion for a layer that rotates neither query nor key
    (SmolLM3's NoPE layers, one in four; EXAONE 4's global layers): GroupQueryAttention with
    `do_rotary=0` and no cos/sin, where such a layer fused to MultiHeadAttention over the
    traced past concatenation (a cache copied each step, no shared buffer, no CUDA graph).
    Its sequence lengths come from position_ids as the rotary layers' do."""

    repeat = True

    def pattern(self, op, query_BSD, key_BSDkv, value_BSDkv, past_key, past_value, mask):
        return super().pattern(
            _Without(op, repeat=self.repeat, rotary=False), query_BSD, key_BSDkv, value_BSDkv,
            past_key, past_value, None, None, None, mask,
        )  # fmt: skip

    def _positions_and_scale(self, context) -> pattern.MatchResult | bool:
        positions = next((v for v in context.model.graph.inputs if v.name == "position_ids"), None)
        sdpa = [node for node in context.nodes if node.op_type == "SDPA"]
        if positions is None or len(sdpa) != 1:
            return pattern.MatchResult().fail("no position_ids input or no single SDPA")
        self._positions = positions
        scale = sdpa[0].attributes.get("scale")
        self._scale = None if scale is None else scale.as_float()
        return True

    def check(self, context, query_BSHDh, key_BSHkvDh, **bindings):
        found = self._positions_and_scale(context)
        if not found:
            return found
        # the base check reads the rotary's `interleaved` from the rotated values' producers;
        # without a rotary, the reshapes stand in for them (no such attribute: 0 on both)
        return super().check(
            context, query_BHSDh_rope=query_BSHDh, key_BHkvSDh_rope=key_BSHkvDh,
            query_BSHDh=query_BSHDh, key_BSHkvDh=key_BSHkvDh, **bindings,
        )  # fmt: skip

    def rewrite(self, op, **bindings):
        outputs = super().rewrite(op, position_ids=self._positions, cos=None, sin=None, **bindings)
        attention = outputs[0].producer()
        attention.attributes["do_rotary"] = ir.AttrInt64("do_rotary", 0)
        return _with_scale(outputs, self._scale)


class _FdecGqaNoRotaryUnrepeated(_FdecGqaNoRotary):
    """`_FdecGqaNoRotary` where no head shares its key and value."""

    repeat = False


class _FdecGqaRotated(_FdecGqaNoRotary):
    """GroupQueryAttention with `do_rotary=0` over a query and key rotated before it by what
    its own rotary does not do, the rotary left in the graph: an interleaved one no rotary rule
    recognises (Cohere's), part of each head (StableLM, Nemotron, GLM), or a norm after it
    (Hunyuan). Such layers fused to MultiHeadAttention over
    the traced past concatenation (with RotaryEmbedding for the partial ones); the query and
    key go back to [batch, sequence, heads · head size] with a Transpose and a Reshape each."""

    def pattern(self, op, query_BHSDh, key_BHkvSDh, value_BSDkv, past_key, past_value, mask):
        op = _Without(op, repeat=self.repeat)
        value_BSHkvDh = op.Reshape(value_BSDkv, pattern.ANY_VALUE)
        value_BHkvSDh = op.Transpose(value_BSHkvDh, perm=[0, 2, 1, 3])
        sequences = []
        for past, new in ((past_key, key_BHkvSDh), (past_value, value_BHkvSDh)):
            sequence = op.Concat(past, new, axis=-2)
            repeated = op.Expand(op.Unsqueeze(sequence, [2]), pattern.ANY_VALUE)
            sequences.append((sequence, op.Reshape(repeated, pattern.ANY_VALUE)))
        (key_seq, key_heads), (value_seq, value_heads) = sequences
        attention_BHSDh = op.SDPA(
            query_BHSDh, key_heads, value_heads, mask, key_format="BHSd",
            _domain="ai.onnxruntime._fusion",
        )  # fmt: skip
        attention_BSHDh = op.Transpose(attention_BHSDh, perm=[0, 2, 1, 3])
        return op.Reshape(attention_BSHDh, pattern.ANY_VALUE), key_seq, value_seq

    def check(self, context, query_BHSDh, key_BHkvSDh, past_key, mask, **_):
        heads, kv_heads = (_ir_utils.get_dim(v, 1) for v in (query_BHSDh, key_BHkvSDh))
        head, kv_head = (_ir_utils.get_dim(v, 3) for v in (query_BHSDh, past_key))
        if not all(isinstance(d, int) for d in (heads, kv_heads, head)) or head != kv_head:
            return pattern.MatchResult().fail("heads or head size unknown", query_BHSDh)
        self.num_heads, self.kv_num_heads, self._interleaved = heads, kv_heads, 0
        producer = mask.producer()
        if producer is None or gqa._causal_mask_pattern.match(
            context.model, context.graph_or_function, producer, check_nodes_are_removable=False
        ) is None:  # fmt: skip
            return pattern.MatchResult().fail("mask is not the causal mask", mask)
        return self._positions_and_scale(context)

    def rewrite(self, op, query_BHSDh, key_BHkvSDh, **bindings):
        flat = op.Constant(value_ints=[0, 0, -1])
        query, key = (
            op.Reshape(op.Transpose(value, perm=[0, 2, 1, 3]), flat)
            for value in (query_BHSDh, key_BHkvSDh)
        )
        return super().rewrite(
            op, query_BSD=query, key_BSDkv=key, query_BSHDh=None, key_BSHkvDh=None, **bindings
        )


class _FdecGqaRotatedUnrepeated(_FdecGqaRotated):
    """`_FdecGqaRotated` where no head shares its key and value."""

    repeat = False


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
def fdec_rules(rows: int = 0):
    """Run `optimize_for_ort` with fdec's attention rules above in place of its own, and its
    cos/sin-cache rules beside onnxscript's (`rows`: the model's positions, the tables')."""
    from onnxscript.rewriter import _fusion_utils
    from onnxscript.rewriter.ort_fusions import _core, cos_sin_cache, rotary_embedding

    names = ("fuse_rotary_embedding", "fuse_cos_sin_cache", "fuse_gqa", "fuse_qkv_gqa",
             "fuse_mha1", "fuse_mha2")  # fmt: skip
    saved = {name: getattr(_core, name) for name in names}
    scaled = [
        ScaledRotaryCache.rule(rows=rows, scaled=flag, matmul=matmul)
        for flag, matmul in ((True, False), (True, True), (False, False))
    ]
    rules = (
        RewriteRuleSet([*rotary_embedding.rotary_embedding_rules.rules, InterleavedRotary.rule()]),
        RewriteRuleSet([*cos_sin_cache.cos_sin_cache_rules.rules, *scaled]),
        RewriteRuleSet(
            [
                _FdecGqa.rule(),
                _FdecGqaUnrepeated.rule(),
                _FdecGqaNoRotary.rule(),
                _FdecGqaNoRotaryUnrepeated.rule(),
                _FdecGqaRotated.rule(),
                _FdecGqaRotatedUnrepeated.rule(),
            ]
        ),
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
