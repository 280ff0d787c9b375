"""cast-float16: a hand-written attention block and a real tiny Llama typed in fp16 and bf16.

Checks what stays fp32 and why (norm reductions, softmax and its mask, rotary tables, logits),
that the graph's I/O keeps its types, that no tensor is left untyped, and the numbers: fp16
graphs run in ONNX Runtime on the CPU, bf16 graphs through `emulate_low_precision` (ORT has no
bf16 CPU kernels).
"""

from __future__ import annotations

import collections

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from exported import export_tiny
from graphs import ir_model, random_array, run_ort, tiny_spec

from fdec.errors import InputError, UsageError
from fdec.ir import FdecModel
from fdec.passes import REGISTRY, make_pass
from fdec.passes.typing import CastFloat16Pass, choose_float_dtype, float_types, untyped_values
from fdec.runtime import OrtModel
from fdec.runtime.check_forms import emulate_low_precision
from fdec.targets import load_target

# x → RMSNorm → q/k MatMuls → scores + mask (a -3.4e38 fill chosen by a bool input) → Softmax
# → MatMul with v → y. The mask is a "table": it depends on no activation.
_BLOCK = """
<ir_version: 10, opset_import: ["" : 21]>
block (float[2, 4] x, bool[2, 2] keep) => (float[2, 4] y) {
    two = Constant <value = float {2.0}> ()
    eps = Constant <value = float {1e-5}> ()
    axes = Constant <value = int64[1] {-1}> ()
    zero = Constant <value = float {0.0}> ()
    fill = Constant <value = float {-3.4028235e38}> ()
    sq = Pow (x, two)
    mean = ReduceMean (sq, axes)
    var = Add (mean, eps)
    std = Sqrt (var)
    inv = Reciprocal (std)
    normed = Mul (x, inv)
    h = Mul (normed, gamma)
    q = MatMul (h, wq)
    k = MatMul (h, wk)
    kt = Transpose <perm = [1, 0]> (k)
    scores = MatMul (q, kt)
    mask = Where (keep, zero, fill)
    masked = Add (scores, mask)
    probs = Softmax <axis = -1> (masked)
    v = MatMul (h, wv)
    y = MatMul (probs, v)
}
"""


def _block() -> tuple[FdecModel, dict[str, np.ndarray]]:
    weights = {
        "gamma": np.abs(random_array(4, seed=1)) + 0.5,
        "wq": random_array(4, 4, seed=2),
        "wk": random_array(4, 4, seed=3),
        "wv": random_array(4, 4, seed=4),
    }
    model = FdecModel(ir_model(_BLOCK, weights), tiny_spec())
    feeds = {"x": random_array(2, 4, seed=5) * 300.0, "keep": np.array([[1, 0], [1, 1]], bool)}
    return model, feeds


def _kept(model: FdecModel) -> dict[str, str]:
    """Output name → element type, for every node output."""
    return {out.name: out.dtype.name for node in model.graph for out in node.outputs}


def test_block_keeps_norm_softmax_and_mask_in_fp32():
    model, feeds = _block()
    before = run_ort(model.model, feeds)
    result = CastFloat16Pass(dtype="fp16")(model)

    assert result.model is model and result.modified
    types = _kept(model)
    # The RMSNorm reduction chain and the mask application + softmax stay fp32 ...
    for name in ("sq", "mean", "var", "std", "inv", "mask", "masked", "probs"):
        assert types[name] == "FLOAT", name
    # ... the products and the normalize-multiply run in fp16.
    for name in ("normed", "h", "q", "k", "kt", "scores", "v"):
        assert types[name] == "FLOAT16", name
    assert [v.dtype.name for v in model.graph.outputs] == ["FLOAT"]  # keep_io_types
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert all(v.dtype == ir.DataType.FLOAT16 for v in model.graph.initializers.values())
    assert untyped_values(model.graph) == []
    stats = result.stats
    assert stats["dtype"] == "fp16"
    assert stats["kept_by_reason"] == {
        "follows fp32": 1, "mask": 1, "op": 5, "table": 1
    }  # fmt: skip
    assert stats["kept_ops"] == {
        "Add": 2, "Pow": 1, "ReduceMean": 1, "Reciprocal": 1, "Softmax": 1, "Sqrt": 1, "Where": 1
    }  # fmt: skip
    assert stats["initializers_cast"] == 4
    assert stats["bytes_before"] == 4 * (4 + 3 * 16) and stats["bytes_after"] == 2 * (4 + 3 * 16)
    # x (an fp32 input) is read by Pow (fp32) and Mul (fp16): one cast in; y: one cast out.
    assert stats["io_casts"] == 2
    onnx.checker.check_model(ir.serde.serialize_model(model.model), full_check=True)

    after = run_ort(model.model, feeds)
    assert after[0].dtype == np.float32
    # |x| up to ~900: x² overflows fp16 (65504) unless the reduction is fp32, as kept here.
    assert np.isfinite(after[0]).all()
    np.testing.assert_allclose(after[0], before[0], rtol=2e-2, atol=2e-2)


def test_everything_fp16_overflows_where_the_kept_reduction_does_not():
    """The reason for keeping norms: with no op kept, x² of |x| ≈ 900 overflows fp16."""
    model, feeds = _block()
    want = run_ort(model.model, feeds)[0]
    CastFloat16Pass(dtype="fp16", keep_ops=(), keep_tables=False)(model)
    assert _kept(model)["sq"] == "FLOAT16"
    emulate_low_precision(model.model)  # ORT alone would skip the rounding between fp16 nodes
    got = run_ort(model.model, feeds)[0]
    # x² = inf, so rsqrt = 0 and every output is 0 (or NaN): nothing like the fp32 result.
    assert not np.isfinite(got).all() or not np.abs(got).any()
    assert np.abs(want).max() > 1

    kept, _ = _block()
    CastFloat16Pass(dtype="fp16")(kept)
    emulate_low_precision(kept.model)
    np.testing.assert_allclose(run_ort(kept.model, feeds)[0], want, rtol=2e-2, atol=2e-2)


def test_bf16_block_matches_through_emulation():
    model, feeds = _block()
    before = run_ort(model.model, feeds)
    result = CastFloat16Pass(dtype="bf16")(model)
    assert result.stats["dtype"] == "bf16"
    assert _kept(model)["q"] == "BFLOAT16" and _kept(model)["probs"] == "FLOAT"
    assert float_types(model.graph)["BFLOAT16"] > 0
    added = emulate_low_precision(model.model)
    assert added > 0 and float_types(model.graph)["BFLOAT16"] > 0  # the rounding casts
    after = run_ort(model.model, feeds)
    np.testing.assert_allclose(after[0], before[0], rtol=5e-2, atol=5e-2)


def test_options_and_preconditions():
    assert REGISTRY["cast-float16"] is CastFloat16Pass
    with pytest.raises(UsageError, match="fp16 or bf16"):
        CastFloat16Pass(dtype="fp8")
    with pytest.raises(UsageError, match="bad options"):
        make_pass("cast-float16", dtype_="fp16")
    model, _ = _block()
    CastFloat16Pass(dtype="fp16")(model)
    with pytest.raises(UsageError, match="already typed"):
        CastFloat16Pass(dtype="fp16").requires(model)
    with pytest.raises(InputError, match=r"BF16 needs compute capability ≥ 8\.0; t4 is 7\.5"):
        CastFloat16Pass(dtype="bf16").check_target(load_target("t4"))
    # The dtype follows the target's compute capability (its data, never its name).
    assert choose_float_dtype(load_target("t4")) == "fp16"
    assert choose_float_dtype(load_target("a100")) == "bf16"
    assert choose_float_dtype(load_target("rtx4090")) == "bf16"


def test_huge_constants_are_clamped_to_the_fp16_range():
    text = """
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[2] x) => (float[2] y) {
        y = Add (x, big)
    }
    """
    model = FdecModel(ir_model(text, {"big": np.array([1e6, -3e38], np.float32)}), tiny_spec())
    result = CastFloat16Pass(dtype="fp16")(model)
    assert result.stats["values_clamped"] == 2
    array = model.graph.initializers["big"].const_value.numpy()
    assert array.tolist() == [65504.0, -65504.0]


@pytest.fixture(scope="module")
def llama(tiny_models, tmp_path_factory):
    return export_tiny(tiny_models, tmp_path_factory, "llama")


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_tiny_llama_typed_stays_close_to_the_source(llama, dtype, tmp_path):
    model = llama.cleaned()
    inputs = {v.name: v.dtype for v in model.graph.inputs}
    outputs = {v.name: v.dtype for v in model.graph.outputs}
    shapes_of = {n.name: n.inputs[0].name for n in model.graph if n.op_type == "Shape"}
    assert any(value.startswith("past_key_values.") for value in shapes_of.values())
    result = CastFloat16Pass(dtype=dtype)(model)
    stats = result.stats
    low = "FLOAT16" if dtype == "fp16" else "BFLOAT16"

    assert {v.name: v.dtype for v in model.graph.inputs} == inputs
    assert {v.name: v.dtype for v in model.graph.outputs} == outputs
    # A Shape reads no values: it keeps reading the fp32 KV input, not a Cast of it (with a
    # Cast, every layer's mask read that layer's cache and slicing put them all in its slice).
    assert {n.name: n.inputs[0].name for n in model.graph if n.op_type == "Shape"} == shapes_of
    assert untyped_values(model.graph) == []
    ops = collections.Counter(n.op_type for n in model.graph if n.outputs[0].dtype.name == low)
    assert ops["MatMul"] >= 14  # q/k/v/o/gate/up/down × 2 layers compute low
    layers = model.spec.num_layers
    # RMSNorm (2 per layer + final): Pow, ReduceMean, Sqrt, Reciprocal kept; softmax per layer;
    # the rotary table (Cos, Sin); the logits' MatMul.
    kept = stats["kept_ops"]
    norms = 2 * layers + 1
    assert (kept["Pow"], kept["ReduceMean"], kept["Sqrt"], kept["Reciprocal"]) == (norms,) * 4
    assert kept["Softmax"] == layers and kept["Cos"] == 1 and kept["Sin"] == 1
    assert stats["kept_by_reason"]["logits"] == 1 and stats["kept_by_reason"]["mask"] == layers
    logits = model.graph.outputs[0]
    assert logits.name == "logits" and logits.producer().op_type == "MatMul"
    assert logits.producer().outputs[0].dtype == ir.DataType.FLOAT  # computed fp32, no cast
    assert stats["initializers_cast"] > 0 and stats["bytes_after"] * 2 == stats["bytes_before"]

    path = tmp_path / "typed.onnx"
    emulate_low_precision(model.model)
    ir.save(model.model, str(path), external_data="typed.onnx.data")
    onnx.checker.check_model(str(path), full_check=True)
    from fdec.runtime import open_session

    figures = llama.reference.compare(OrtModel(open_session(path, optimization="basic")))
    # Measured: fp16 max logit error ~2e-3, bf16 ~3e-2 (FP16/BF16_TOLERANCE leave room).
    assert CastFloat16Pass(dtype=dtype).tolerance.judge(figures) is None, figures
    limit = 1e-2 if dtype == "fp16" else 1e-1
    assert figures["max_abs_error"] < limit
    assert figures["top1_agreement"] >= 0.95


def test_an_initializer_read_low_and_in_fp32_gets_a_low_copy():
    """A weight a low MatMul and an fp32 Add read: stored twice, fp16 beside fp32."""
    text = """
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[3, 4] x) => (float[3, 3] y, float[4, 3] w2) {
        y = MatMul (x, w)
        w2 = Softmax (w)
    }
    """
    model = FdecModel(ir_model(text, {"w": random_array(4, 3, seed=7)}), tiny_spec())
    feeds = {"x": random_array(3, 4, seed=8)}
    before = run_ort(model.model, feeds)
    result = CastFloat16Pass(dtype="fp16", logits="fp16")(model)
    assert result.stats["duplicated"] == 1
    inits = model.graph.initializers
    assert inits["w"].dtype == ir.DataType.FLOAT and inits["w_float16"].dtype == ir.DataType.FLOAT16
    after = run_ort(model.model, feeds)
    np.testing.assert_allclose(after[1], before[1], rtol=1e-6)  # softmax: fp32 throughout
    np.testing.assert_allclose(after[0], before[0], rtol=1e-2, atol=1e-2)


def test_a_tied_table_kept_for_fp32_logits_is_stored_once():
    """The embedding Gather of the table an fp32 lm_head reads gathers fp32 rows and rounds
    them low for every reader: one fp32 table, not a bf16 copy beside it, and the same graph
    and numbers as an untied model's (whose embedding table is stored bf16)."""
    text = """
    <ir_version: 10, opset_import: ["" : 21]>
    g (int64[2] ids, float[2, 3] x) => (float[2, 4] logits, float[2, 3] h, float[2, 3] y) {
        rows = Gather (w, ids)
        h = Mul (rows, rows)
        two = Constant <value = float {2.0}> ()
        sq = Pow (rows, two)
        axes = Constant <value = int64[1] {-1}> ()
        mean = ReduceMean (sq, axes)
        std = Sqrt (mean)
        normed = Div (rows, std)
        y = Mul (normed, gamma)
        logits = Gemm <transB = 1> (x, HEAD)
    }
    """
    table = random_array(4, 3, seed=7)
    weights = {"w": table, "gamma": random_array(3, seed=9)}
    feeds = {"ids": np.array([0, 3], np.int64), "x": random_array(2, 3, seed=8)}
    tied = FdecModel(ir_model(text.replace("HEAD", "w"), weights), tiny_spec())
    untied = FdecModel(ir_model(text.replace("HEAD", "w2"), {**weights, "w2": table}), tiny_spec())
    before = run_ort(tied.model, feeds)
    result = CastFloat16Pass(dtype="bf16")(tied)  # logits fp32: the Gemm too
    reference = CastFloat16Pass(dtype="bf16")(untied)
    assert result.stats["duplicated"] == 0
    assert list(tied.graph.initializers) == ["w", "gamma"]
    assert tied.graph.initializers["w"].dtype == ir.DataType.FLOAT
    reasons = dict(result.stats["kept_by_reason"])
    assert reasons.pop("shares an fp32 table") == 1
    assert reasons == reference.stats["kept_by_reason"]  # the norm's Div and Mul as untied
    scale = tied.graph.outputs[2].producer().inputs[0]  # y, before its cast at the edge
    assert scale.producer().op_type == "Mul" and scale.dtype == ir.DataType.BFLOAT16
    gather = next(n for n in tied.graph if n.op_type == "Gather")
    (low,) = [user for user, _ in gather.outputs[0].uses()]  # every reader reads it rounded
    assert low.op_type == "Cast" and low.outputs[0].dtype == ir.DataType.BFLOAT16
    for model in (tied, untied):
        emulate_low_precision(model.model)
    after, want = run_ort(tied.model, feeds), run_ort(untied.model, feeds)
    np.testing.assert_allclose(after[0], before[0], rtol=1e-6)  # logits: fp32 throughout
    for got, expected in zip(after, want, strict=True):
        np.testing.assert_array_equal(got, expected)
    rows = table[[0, 3]].astype(ml_dtypes.bfloat16).astype(np.float32)  # what h squares
    np.testing.assert_array_equal(after[1], (rows * rows).astype(ml_dtypes.bfloat16))


def test_a_bf16_graphs_logits_compute_in_fp16_on_one_tied_table():
    """logits="fp16" in a bf16 graph: the lm_head and the embedding Gather of its tied table
    compute in fp16 (one fp16 table, no bf16 copy), the rows rounded to bf16 for every other
    reader; the logits are fp16's rounding of the fp32 product, far nearer fp32 than bf16's."""
    text = """
    <ir_version: 10, opset_import: ["" : 21]>
    g (int64[2] ids, float[2, 64] x) => (float[2, 32] logits, float[2, 64] h) {
        rows = Gather (w, ids)
        h = Mul (rows, rows)
        logits = Gemm <transB = 1> (x, w)
    }
    """
    table = random_array(32, 64, seed=7)
    feeds = {"ids": np.array([0, 3], np.int64), "x": random_array(2, 64, seed=8) * 8}
    results = {}
    for logits in ("fp16", "bf16"):
        model = FdecModel(ir_model(text, {"w": table}), tiny_spec())
        result = CastFloat16Pass(dtype="bf16", logits=logits)(model)
        stored = {name: value.dtype for name, value in model.graph.initializers.items()}
        emulate_low_precision(model.model)
        results[logits] = (stored, result.stats, run_ort(model.model, feeds))
    stored, stats, (logits, h) = results["fp16"]
    assert stats["duplicated"] == 0 and stats["logits"] == "fp16"
    assert stats["nodes_in_logits_type"] == 2  # the Gemm and the Gather of its table
    assert "logits" not in stats["kept_by_reason"]
    assert stored == {"w": ir.DataType.FLOAT16}
    rounded = table.astype(np.float16).astype(np.float32)
    rows = rounded[[0, 3]].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(h, (rows * rows).astype(ml_dtypes.bfloat16))
    x16 = feeds["x"].astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(logits, (x16 @ rounded.T).astype(np.float16), rtol=1e-3)
    exact = feeds["x"] @ table.T
    error_bf16 = np.abs(results["bf16"][2][0] - exact).max()
    assert np.abs(logits - exact).max() * 4 < error_bf16, (np.abs(logits - exact).max(), error_bf16)


def test_a_quantized_lm_heads_dequantize_computes_in_the_logits_type():
    """An int8 weight-only lm_head (DequantizeLinear → MatMul) in a bf16 graph with fp16
    logits: the DequantizeLinear yields fp16 from an fp16 scale, so TensorRT fuses it into one
    fp16 GEMM (an fp32 one ran a dequantization of the whole weight every decode step)."""
    text = """
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[2, 8] x) => (float[2, 16] logits) {
        h = Relu (x)
        w = DequantizeLinear <axis = 1> (wq, scale)
        logits = MatMul (h, w)
    }
    """
    weights = {
        "wq": np.random.default_rng(3).integers(-127, 128, (8, 16)).astype(np.int8),
        "scale": np.abs(random_array(16, seed=4)) / 100 + 1e-3,
    }
    model = FdecModel(ir_model(text, weights), tiny_spec())
    feeds = {"x": random_array(2, 8, seed=5)}
    before = run_ort(model.model, feeds)[0]
    result = CastFloat16Pass(dtype="bf16", logits="fp16")(model)
    graph = model.graph
    assert result.stats["nodes_in_logits_type"] == 2
    dq = next(n for n in graph if n.op_type == "DequantizeLinear")
    assert dq.inputs[1].dtype == ir.DataType.FLOAT16 == dq.outputs[0].dtype
    relu = next(n for n in graph if n.op_type == "Relu")
    assert relu.outputs[0].dtype == ir.DataType.BFLOAT16  # the graph's own type up to the head
    assert graph.outputs[0].dtype == ir.DataType.FLOAT
    emulate_low_precision(model.model)
    np.testing.assert_allclose(run_ort(model.model, feeds)[0], before, rtol=2e-2, atol=2e-3)
    with pytest.raises(UsageError, match="logits must be fp32, fp16"):
        CastFloat16Pass(dtype="fp16", logits="bf16")


def test_cuda_typing_of_the_fused_tiny_llama(llama):
    """The ONNX Runtime CUDA options: fused ops low, fp16 KV cache at the edges with no cast
    between the cache and GroupQueryAttention, logits fp32; every node has a CUDA kernel."""
    from exported import run_pass

    from fdec.lower.cuda_kernels import cpu_placed_nodes
    from fdec.passes.fusion import FuseAttentionPass
    from fdec.passes.typing import CUDA_FP16_TOLERANCE, FP16_TOLERANCE, cuda_typing

    fused, _ = run_pass(FuseAttentionPass(), llama.cleaned())
    assert cpu_placed_nodes(fused)  # fp32 GroupQueryAttention: no CUDA kernel
    model, record = run_pass(CastFloat16Pass(**cuda_typing("fp16")), fused)
    graph = model.graph
    layers = model.spec.num_layers
    assert record.stats["io_low"] == 2 * layers and untyped_values(graph) == []
    gqa = [n for n in graph if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == layers
    for index, node in enumerate(gqa):
        assert node.inputs[3] is graph.inputs[3 + 2 * index]  # the cache input, uncast
        assert {v.dtype for v in (*node.inputs[3:5], *node.outputs)} == {ir.DataType.FLOAT16}
        assert node.outputs[1].is_graph_output() and node.outputs[2].is_graph_output()
    norms = [n for n in graph if n.op_type == "SkipSimplifiedLayerNormalization"]
    assert norms and all(n.outputs[0].dtype == ir.DataType.FLOAT16 for n in norms)
    assert all(n.outputs[1].dtype in (ir.DataType.FLOAT, None) for n in norms)
    assert graph.outputs[0].name == "logits" and graph.outputs[0].dtype == ir.DataType.FLOAT
    # The lm_head computes fp16 (no fp32 copy of its weight); only its output is cast to fp32,
    # at the graph's edge. (A compiled build's head reads the embedding's table itself:
    # tests/test_cuda_placement.py.)
    cast = graph.outputs[0].producer()
    head = cast.inputs[0].producer()
    assert cast.op_type == "Cast" and head.outputs[0].dtype == ir.DataType.FLOAT16
    assert {v.dtype for v in head.inputs} == {ir.DataType.FLOAT16}
    assert record.stats["duplicated"] == 0
    assert cpu_placed_nodes(model) == []
    # A bf16 graph's lm_head computes fp16 too (bf16's 8 mantissa bits: logits 0.25 apart at
    # 32), a type CUDA's MatMul takes.
    bf16, bf16_record = run_pass(
        CastFloat16Pass(**cuda_typing("bf16")), run_pass(FuseAttentionPass(), llama.cleaned())[0]
    )
    head = bf16.graph.outputs[0].producer().inputs[0].producer()
    assert {v.dtype for v in (*head.inputs, *head.outputs)} == {ir.DataType.FLOAT16}
    assert bf16_record.stats["logits"] == "fp16" and bf16_record.stats["nodes_in_logits_type"]
    assert cpu_placed_nodes(bf16) == []
    from fdec.runtime import session_for_model

    figures = llama.reference.compare(session_for_model(model))
    assert FP16_TOLERANCE.judge(figures) is None, figures  # the tiny model meets the strict one
    # The build is judged by the CUDA typing's own (SmolLM2: 0.081 at unchanged perplexity).
    assert CastFloat16Pass(**cuda_typing("fp16")).tolerance is CUDA_FP16_TOLERANCE
    assert CastFloat16Pass(dtype="fp16").tolerance is FP16_TOLERANCE
