"""Tests of fuse-attention: tiny real exports fused into ONNX Runtime ops, checked against the unfused graph."""

from __future__ import annotations

import numpy as np
import pytest
from exported import export_tiny, op_counts, run_pass

from fdec.calibrate import calibration_batches, load_calibration_texts
from fdec.compile import plan_pipeline
from fdec.errors import UsageError
from fdec.ir import FdecModel
from fdec.passes import make_pass
from fdec.passes.fusion import FuseAttentionPass
from fdec.passes.pack import PackQkvPass
from fdec.runtime import generate, session_for_model
from fdec.targets import load_target

_MS = "com.microsoft"
_GQA_FAMILIES = ("llama", "qwen2", "mistral")
_PROMPT = [5, 17, 99, 3, 250, 7, 8, 41, 120, 64, 2, 300]


@pytest.fixture(scope="module")
def exports(tiny_models, tmp_path_factory):
    made = {}

    def get(family: str):
        if family not in made:
            made[family] = export_tiny(tiny_models, tmp_path_factory, family)
        return made[family]

    return get


def _logits(model: FdecModel) -> np.ndarray:
    session = session_for_model(model)
    logits, _ = session.decode(np.asarray([_PROMPT]), session.empty_past(1), 0)
    return logits


def _assert_within_quantization_noise(got, want, fp32) -> None:
    moved = np.abs(got - want).max()
    assert moved < 0.1 * np.abs(want - fp32).max(), moved
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.9


def _io(model: FdecModel) -> tuple[list[str], list[str]]:
    return [v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs]


@pytest.mark.parametrize("family", _GQA_FAMILIES)
def test_llama_style_attention_fuses_to_group_query_attention_and_stays_exact(exports, family):
    tiny = exports(family)
    plain = tiny.cleaned()
    fused, record = run_pass(FuseAttentionPass(), tiny.cleaned())  # checker + ModelSpec check
    layers = tiny.spec.num_layers
    ops = op_counts(fused)
    assert ops[(_MS, "GroupQueryAttention")] == layers
    assert ops[(_MS, "SkipSimplifiedLayerNormalization")] == 2 * layers
    assert ops[("", "Softmax")] == 0 and ops[("", "Concat")] == 0  # traced attention is gone
    stats = record.stats
    assert stats["attention"] == "GroupQueryAttention" and "not_fused" not in stats
    assert stats["fused_ops"]["GroupQueryAttention"] == layers
    assert stats["nodes_after"] * 4 < stats["nodes_before"] == sum(op_counts(plain).values())
    assert stats["kv_shared_buffer_layers"] == layers
    assert _io(fused) == _io(plain)
    # The weights roles point at are still the MatMul weights, same values, same names.
    for role, name in tiny.spec.weights.items():
        assert fused.spec.weights[role] == name
        np.testing.assert_array_equal(
            fused.graph.initializers[name].const_value.numpy(),
            plain.graph.initializers[name].const_value.numpy(),
        )
    np.testing.assert_allclose(_logits(fused), _logits(plain), atol=1e-4, rtol=0)


def test_fused_greedy_tokens_match_unfused_for_64_steps(exports):
    tiny = exports("llama")
    plain = session_for_model(tiny.cleaned())
    fused = session_for_model(run_pass(FuseAttentionPass(), tiny.cleaned())[0])
    want = generate(plain, _PROMPT, max_new_tokens=64, bound=False).tokens
    got = generate(fused, _PROMPT, max_new_tokens=64, bound=False).tokens
    assert len(want) == 64 and got == want
    # Against PyTorch as well: the compile gate's own greedy check.
    assert tiny.reference.compare_greedy(fused)["identical"]


def test_gpt2_attention_fuses_to_group_query_attention_without_rotary(exports):
    """GPT-2 (learned positions, no rotary, every head its own key and value) fuses to
    GroupQueryAttention with do_rotary=0 and kv_num_heads == num_heads, which writes one
    shared cache buffer in place; it fused to MultiHeadAttention, which concatenates the past
    every step (kv_shared_buffer_layers was 0)."""
    tiny = exports("gpt2")
    plain = tiny.cleaned()
    fused, record = run_pass(FuseAttentionPass(), tiny.cleaned())
    ops = op_counts(fused)
    assert ops[(_MS, "GroupQueryAttention")] == tiny.spec.num_layers
    assert ops[(_MS, "MultiHeadAttention")] == 0
    assert ops[("", "Gemm")] == 0  # Conv1D Gemms became 3-D MatMuls the attention rules match
    assert record.stats["attention"] == "GroupQueryAttention"
    assert record.stats["kv_shared_buffer_layers"] == tiny.spec.num_layers
    for node in fused.model.graph:
        if node.op_type == "GroupQueryAttention":
            attributes = node.attributes
            assert attributes.get_int("do_rotary") == 0
            assert attributes.get_int("kv_num_heads") == attributes.get_int("num_heads")
            assert len(node.inputs) == 7  # no cos/sin caches
    assert _io(fused) == _io(plain)
    np.testing.assert_allclose(_logits(fused), _logits(plain), atol=1e-4, rtol=0)


@pytest.mark.parametrize("order", ["fuse-last", "fuse-first"])
def test_int4_and_fusion_build_and_run_in_either_order(exports, order):
    tiny = exports("llama")
    quantize = [make_pass("quantize-int4"), make_pass("quantize-embedding", bits=8)]
    unfused = tiny.cleaned()
    for pass_ in quantize:
        unfused, _ = run_pass(pass_, unfused)
    steps = [*quantize, FuseAttentionPass()]
    if order == "fuse-first":
        steps = [FuseAttentionPass(), *quantize]
    model = tiny.cleaned()
    for pass_ in steps:
        model, _ = run_pass(pass_, model)
    ops = op_counts(model)
    assert ops[(_MS, "GroupQueryAttention")] == tiny.spec.num_layers
    assert ops[(_MS, "MatMulNBits")] == op_counts(unfused)[(_MS, "MatMulNBits")] > 0
    # On top of int4, fusion moves logits by float rounding that MatMulNBits' int8 activation
    # quantization (accuracy_level 4) amplifies: far below what int4 itself moves them.
    _assert_within_quantization_noise(_logits(model), _logits(unfused), _logits(tiny.cleaned()))
    session = session_for_model(model)
    assert len(generate(session, _PROMPT, max_new_tokens=16).tokens) == 16


def test_awq_folded_norm_scales_survive_fusion(exports):
    tiny = exports("llama")
    batches = tuple(
        calibration_batches(
            load_calibration_texts(), tiny.tokenizer, tiny.spec.vocab_size, seq_len=64,
            max_samples=4,
        )
    )  # fmt: skip
    awq, record = run_pass(make_pass("quantize-int4-awq", batches=batches), tiny.cleaned())
    assert record.stats["scales_folded"] > 0  # 1/s went into RMSNorm weights
    want = _logits(awq)
    fused, _ = run_pass(FuseAttentionPass(), awq)
    ops = op_counts(fused)
    assert ops[(_MS, "GroupQueryAttention")] == tiny.spec.num_layers
    assert ops[(_MS, "SkipSimplifiedLayerNormalization")] == 2 * tiny.spec.num_layers
    _assert_within_quantization_noise(_logits(fused), want, _logits(tiny.cleaned()))


def test_fusion_is_refused_for_tensorrt_and_planned_last_for_onnxruntime():
    with pytest.raises(UsageError, match=r"com\.microsoft") as caught:
        FuseAttentionPass(backend="tensorrt").check_target(None)
    assert "--passes" in caught.value.fix
    gpu = load_target("h100")
    with pytest.raises(UsageError, match="tensorrt backend"):
        plan_pipeline(target=gpu, backend="tensorrt", passes="default,fuse-attention")
    assert "fuse-attention" not in plan_pipeline(target=gpu, backend="tensorrt").pass_names
    cpu = load_target("cpu")
    for quantize in (None, "int4", "int4-awq", "int8"):
        names = plan_pipeline(target=cpu, backend="onnxruntime", quantize=quantize).pass_names
        assert names[-2:] == ["fuse-attention", "pack-qkv"], (quantize, names)
    assert (
        "fuse-attention"
        not in plan_pipeline(target=cpu, backend="onnxruntime", quantize="int8-dynamic").pass_names
    )
    # An explicit --passes list is the user's: no fusion added, and the pass keeps its place.
    assert plan_pipeline(target=cpu, backend="onnxruntime", passes="default").pass_names[-1] != (
        "fuse-attention"
    )
    names = plan_pipeline(
        target=cpu, backend="onnxruntime", passes="fuse-attention", quantize="int4"
    ).pass_names
    assert names[0] == "fuse-attention"


def test_encoders_are_left_alone_and_say_so(exports, tiny_models, tmp_path_factory):
    from fdec.frontend.export import import_model
    from fdec.frontend.source import resolve_source

    model = import_model(resolve_source(str(tiny_models("bert")))).fdec_model
    nodes = sum(op_counts(model).values())
    result = FuseAttentionPass()(model)
    assert not result.modified and "encoder" in result.stats["not_fused"]
    assert sum(op_counts(result.model).values()) == nodes


def _greedy(model: FdecModel, steps: int = 64) -> list[int]:
    return generate(session_for_model(model), _PROMPT, max_new_tokens=steps).tokens


@pytest.mark.parametrize("family", _GQA_FAMILIES)
def test_rotary_cos_sin_become_constant_tables_with_the_same_numbers(exports, family):
    tiny = exports(family)
    computed, _ = run_pass(FuseAttentionPass(rotary_cache=False), tiny.cleaned())
    tables, record = run_pass(FuseAttentionPass(), tiny.cleaned())
    assert op_counts(computed)[("", "Cos")] == 1  # one per-step table shared by the layers
    assert record.stats["constant_rotary_caches"] == 1
    ops = op_counts(tables)
    assert ops[("", "Cos")] == ops[("", "Sin")] == ops[("", "Range")] == 0
    spec = tiny.spec
    for node in tables.graph:
        if node.op_type == "GroupQueryAttention":
            cos, sin = node.inputs[7], node.inputs[8]
            assert cos.const_value is not None and sin.const_value is not None
            assert cos.const_value.shape == (spec.max_positions, spec.head_dim // 2)
    # Row p holds position p: the tables agree with what the graph computed every step.
    np.testing.assert_allclose(_logits(tables), _logits(computed), atol=1e-5, rtol=0)
    assert _greedy(tables) == _greedy(computed)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v biases packed too
def test_pack_qkv_gives_one_projection_per_layer_and_the_same_tokens(exports, family):
    tiny = exports(family)
    fused, _ = run_pass(FuseAttentionPass(), tiny.cleaned())
    before, logits, tokens = op_counts(fused), _logits(fused), _greedy(fused)
    packed, record = run_pass(PackQkvPass(), fused)  # structure check: ModelSpec still true
    layers = tiny.spec.num_layers
    assert record.stats == {"packed_layers": layers}
    assert op_counts(packed)[("", "MatMul")] == before[("", "MatMul")] - 2 * layers
    for node in packed.graph:
        if node.op_type == "GroupQueryAttention":
            assert node.inputs[1] is None and node.inputs[2] is None
    spec = tiny.spec
    width = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
    for layer in range(layers):
        weights = packed.spec.weights
        assert not {f"layers.{layer}.{r}" for r in "qkv"} & set(weights)
        w = packed.graph.initializers[weights[f"layers.{layer}.qkv"]].const_value.numpy()
        assert w.shape == (spec.hidden_size, width)
        # Columns are q, then k, then v: the unpacked weights, side by side.
        parts = [tiny.spec.weights[f"layers.{layer}.{r}"] for r in "qkv"]
        want = np.concatenate(
            [tiny.cleaned().graph.initializers[n].const_value.numpy() for n in parts], axis=1
        )
        np.testing.assert_array_equal(w, want)
    np.testing.assert_allclose(_logits(packed), logits, atol=1e-5, rtol=0)
    assert _greedy(packed) == tokens
    assert tiny.reference.compare_greedy(session_for_model(packed))["identical"]
    assert PackQkvPass()(packed).modified is False  # already packed: nothing to do


def test_pack_qkv_of_int4_concatenates_blocks_and_keeps_logits(exports):
    tiny = exports("llama")
    model = tiny.cleaned()
    for pass_ in (make_pass("quantize-int4"), make_pass("quantize-embedding", bits=8)):
        model, _ = run_pass(pass_, model)
    fused, _ = run_pass(FuseAttentionPass(), model)
    before, logits, tokens = op_counts(fused), _logits(fused), _greedy(fused, 32)
    packed, record = run_pass(PackQkvPass(), fused)
    layers = tiny.spec.num_layers
    assert record.stats["packed_layers"] == layers
    assert op_counts(packed)[(_MS, "MatMulNBits")] == before[(_MS, "MatMulNBits")] - 2 * layers
    node = next(n for n in packed.graph if n.op_type == "MatMulNBits" and "qkv" in n.name)
    spec = tiny.spec
    assert node.attributes["N"].as_int() == (spec.num_heads + 2 * spec.num_kv_heads) * (
        spec.head_dim
    )
    assert node.attributes["accuracy_level"].as_int() == 4
    # Each output column is the same int4 dot product with the same int8 activations.
    np.testing.assert_allclose(_logits(packed), logits, atol=1e-5, rtol=0)
    assert _greedy(packed, 32) == tokens


# The first layer's norm as onnxscript leaves it: ONNX Runtime's ONNX-domain op (which the ONNX
# checker rejects), read from an embedding table whose rows reach |x| ≈ 1000 (x² > 65504).
_FIRST_NORM = """
<ir_version: 10, opset_import: ["" : 20]>
first_norm (int64[2, 3] ids) => (float[2, 3, 4] y) <float[2, 3, 64] x, float[2, 3, 64] normed> {
    x = Gather <axis = 0> (table, ids)
    normed = SimplifiedLayerNormalization <axis = -1, epsilon = 1e-5> (x, gamma)
    y = MatMul (normed, w)
}
"""


def _first_norm() -> tuple[FdecModel, dict[str, np.ndarray], np.ndarray]:
    import onnx
    import onnx_ir as ir
    from graphs import random_array, tiny_spec

    rng = np.random.default_rng(0)
    table = random_array(10, 64, seed=1) * 300.0
    gamma, w = np.abs(random_array(64, seed=2)) + 0.5, random_array(64, 4, seed=3)
    proto = onnx.parser.parse_model(_FIRST_NORM)
    for name, array in {"table": table, "gamma": gamma, "w": w}.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    model = FdecModel(ir.serde.deserialize_model(proto), tiny_spec(inputs=["ids"]))
    ids = rng.integers(0, 10, (2, 3))
    x = table[ids]
    want = (x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * gamma) @ w
    return model, {"ids": ids}, want


def test_the_first_norm_is_expanded_to_the_form_onnx_runtime_fuses_and_fp16_cannot_overflow(
    tmp_path,
):
    """The first layer's RMSNorm, expanded to standard ops: `Pow(x, 2)` and `Div(x, Sqrt)`,
    which ONNX Runtime's SimplifiedLayerNormFusion folds back into one node (checked on the CPU
    session here; on the GPU its fp16 pattern Cast → Pow and Div → Cast → Mul), and which the
    CUDA typing squares and normalizes in fp32: in fp16, x² of |x| ≈ 1000 is inf."""
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort
    from graphs import run_ort

    from fdec.passes.fusion import _STANDARDIZE_RULES
    from fdec.passes.typing import CastFloat16Pass, cuda_typing
    from fdec.runtime.check_forms import emulate_low_precision

    model, feeds, want = _first_norm()
    assert _STANDARDIZE_RULES.apply_to_model(model.model) == 1
    ops = [n.op_type for n in model.graph]
    assert "Pow" in ops and "SimplifiedLayerNormalization" not in ops
    np.testing.assert_allclose(run_ort(model.model, feeds)[0], want, rtol=1e-4, atol=1e-3)
    # ONNX Runtime's own session optimization folds the expanded form back (not Mul(x, x)).
    path = tmp_path / "optimized.onnx"
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path)
    data = ir.serde.serialize_model(model.model).SerializeToString()
    ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    optimized = [n.op_type for n in onnx.load(path).graph.node]
    assert optimized.count("SimplifiedLayerNormalization") == 1 and "Pow" not in optimized

    record = CastFloat16Pass(**cuda_typing("fp16"))(model)
    assert record.stats["kept_by_reason"]["norm"] == 1
    by_op = {n.op_type: n for n in model.graph if n.op_type in ("Pow", "Div", "Mul")}
    pow_, div, mul = by_op["Pow"], by_op["Div"], by_op["Mul"]
    cast_in = pow_.inputs[0].producer()
    assert cast_in.op_type == "Cast" and div.inputs[0] is pow_.inputs[0]
    assert {use.op_type for use, _ in cast_in.outputs[0].uses()} == {"Pow", "Div"}
    assert pow_.inputs[0].dtype == div.outputs[0].dtype == ir.DataType.FLOAT
    cast_out = mul.inputs[0].producer()
    assert cast_out.op_type == "Cast" and cast_out.inputs[0] is div.outputs[0]
    assert mul.outputs[0].dtype == ir.DataType.FLOAT16
    emulate_low_precision(model.model)  # every fp16 tensor rounded, as the GPU computes it
    got = run_ort(model.model, feeds)[0]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=5e-2 * np.abs(want).max())


def test_soft_caps_go_back_where_nothing_fused(exports):
    """fuse-attention takes Gemma 2's attention soft-capping out before onnxscript's rules
    and hands it to GroupQueryAttention; where no attention fused, the chains go back (here
    with no fusion at all in between): the logits are the unfused graph's, and the final
    logits' cap was never taken."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from fdec.passes.fusion import _Softcaps

    model = exports("gemma2").cleaned()
    want = _logits(model)
    tanh_before = op_counts(model)[("", "Tanh")]
    caps = _Softcaps.strip(model)
    RemoveUnusedNodesPass()(model.model)  # as onnxscript's optimizer does in between
    assert caps.cap == 50.0 and len(caps.readers) == 4
    assert op_counts(model)[("", "Tanh")] == 1  # the final logits' cap
    assert caps.settle(model) == 0
    assert op_counts(model)[("", "Tanh")] == tanh_before == 5
    np.testing.assert_allclose(_logits(model), want, rtol=0, atol=1e-5)
