"""Tests of NVFP4 (quantize-fp4) and the FP4 form its graphs are checked in on the CPU.

The codes and scales are checked with numpy against NVFP4's definition; the FP4 form
(fdec.runtime.fp4_form) is checked to compute, in ONNX Runtime on the CPU, exactly what numpy
computes for the same FP4 weights and run-time FP4 activations; the pass runs on the tiny
Llama (exported once), its structure is read back and its logits are compared with PyTorch's.
"""

from __future__ import annotations

import collections

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
from exported import export_tiny, run_pass

from fdec.calibrate import calibration_batches, load_calibration_texts
from fdec.errors import UsageError
from fdec.passes.quantize_fp4 import (
    FP4_BLOCK,
    QuantizeFp4Pass,
    dynamic_quantize_node,
    fake_fp4_activation,
    quantize_nvfp4,
    round_e2m1,
)
from fdec.runtime import session_for_model
from fdec.runtime.fp4_form import emulate_fp4
from fdec.targets import load_target

_E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32)


def test_round_e2m1_rounds_to_nearest_ties_to_even_and_saturates():
    x = np.array([0.2, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 7.0, -0.75, -9.0], np.float32)
    want = np.array([0, 0, 1, 1, 2, 2, 4, 4, 6, 6, -1, -6], np.float32)
    np.testing.assert_array_equal(round_e2m1(x), want)


def test_quantize_nvfp4_codes_scales_and_error():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 24)).astype(np.float32)
    w[16:32, 3] = 0.0  # an all-zero block
    codes, scales, g = quantize_nvfp4(w)
    assert codes.dtype == ml_dtypes.float4_e2m1fn and codes.shape == w.shape
    assert scales.dtype == ml_dtypes.float8_e4m3fn and scales.shape == (4, 24)
    values = codes.astype(np.float32)
    assert set(np.abs(values).ravel()) <= set(_E2M1)
    # g puts the largest block's scale at fp8's top: absmax / 6 / g = 448
    assert g == pytest.approx(np.abs(w).max() / (6 * 448), rel=1e-6)
    steps = scales.astype(np.float32) * g  # [4, 24]
    assert steps[1, 3] == 0 and not values[16:32, 3].any()
    dequantized = (values.reshape(4, 16, 24) * steps[:, None, :]).reshape(64, 24)
    # E2M1's widest step is 2 (between 4 and 6): every weight within one step of its block.
    error = np.abs(dequantized - w).reshape(4, 16, 24).max(axis=1)
    assert np.all(error <= steps * (1 + 1e-6))
    # each block's largest weight lands near ±6 (its fp8 scale rounds by at most 2⁻⁴)
    live = steps > 0
    assert np.all(np.abs(values).reshape(4, 16, 24).max(axis=1)[live] >= 4)


def _fp4_graph(activations: bool) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """x [m, 64] @ an NVFP4 weight [64, 32], the activation FP4 at run time or float."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    codes, scales, g = quantize_nvfp4(w)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["m", 64]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 23, "trt": 1}, name="g")

    def constant(name, array, dtype):
        value = ir.Value(name=name, const_value=ir.Tensor(array, dtype=dtype, name=name))
        graph.register_initializer(value)
        return value

    b = constant("w", codes, ir.DataType.FLOAT4E2M1)
    s = constant("s", scales, ir.DataType.FLOAT8E4M3FN)
    gw = constant("gw", np.array(g, np.float32), ir.DataType.FLOAT)
    nodes = []
    source = x
    if activations:
        ga = constant("ga", np.array(3.0 / (6 * 448), np.float32), ir.DataType.FLOAT)
        quantize, values, block_scales = dynamic_quantize_node(x, ga, "x")
        steps = ir.node("DequantizeLinear", [block_scales, ga])
        source = ir.node("DequantizeLinear", [values, steps.outputs[0]],
                         {"axis": -1, "block_size": FP4_BLOCK})  # fmt: skip
        nodes += [quantize, steps, source]
        source = source.outputs[0]
    wsteps = ir.node("DequantizeLinear", [s, gw])
    weight = ir.node("DequantizeLinear", [b, wsteps.outputs[0]], {"axis": 0, "block_size": 16})
    matmul = ir.node("MatMul", [source, weight.outputs[0]])
    matmul.outputs[0].name = "y"
    for node in [*nodes[1:], wsteps, weight, matmul]:
        node.outputs[0].dtype = ir.DataType.FLOAT
    graph.extend([*nodes, wsteps, weight, matmul])
    graph.outputs.append(matmul.outputs[0])
    weights = {
        "w": codes.astype(np.float32),
        "steps": scales.astype(np.float32) * g,
        "ga": np.float32(3.0 / (6 * 448)),
    }
    return ir.Model(graph, ir_version=11), weights


@pytest.mark.parametrize("activations", [False, True], ids=["w4a16", "w4a4"])
def test_fp4_form_computes_exactly_what_nvfp4_means(activations):
    model, parts = _fp4_graph(activations)
    proto = ir.serde.serialize_model(model)
    assert {node.domain for node in proto.graph.node} <= {"", "trt"}
    import onnxruntime as ort

    with pytest.raises(Exception, match=r"DequantizeLinear|TRT_FP4DynamicQuantize"):
        ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert emulate_fp4(model.graph) == 1 + activations
    kinds = collections.Counter(node.op_type for node in model.graph)
    assert "TRT_FP4DynamicQuantize" not in kinds
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(
        ir.serde.serialize_model(model).SerializeToString(), options,
        providers=["CPUExecutionProvider"],
    )  # fmt: skip
    x = np.random.default_rng(2).standard_normal((5, 64)).astype(np.float32) * 0.7
    x[0, :16] = 0.0  # an all-zero activation block
    (got,) = session.run(None, {"x": x})
    w = (parts["w"].reshape(4, 16, 32) * parts["steps"][:, None, :]).reshape(64, 32)
    if activations:  # per block of 16: fp8(absmax / 6 / g) · g, values rounded to E2M1
        ga = parts["ga"]
        blocks = x.reshape(5, 4, 16)
        amax = np.abs(blocks).max(axis=-1, keepdims=True)
        steps = (amax / (6 * ga)).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * ga
        safe = np.where(steps == 0, 1, steps)
        x = (round_e2m1(blocks / safe) * steps).reshape(5, 64)
    np.testing.assert_array_equal(got, x @ w)


@pytest.fixture(scope="module")
def llama(tiny_models, tmp_path_factory):
    tiny = export_tiny(tiny_models, tmp_path_factory, "llama")
    batches = calibration_batches(
        load_calibration_texts(None), tiny.tokenizer, tiny.spec.vocab_size
    )
    return tiny, batches


@pytest.mark.parametrize("activations", ["fp4", "float"])
def test_fp4_pass_writes_nvfp4_weights_and_trt_activation_quantizers(llama, activations):
    tiny, batches = llama
    before = tiny.weights()
    pass_ = QuantizeFp4Pass(batches=batches, activations=activations, weight_rounding="gptq")
    model, record = run_pass(pass_, tiny.cleaned())

    kinds = collections.Counter((node.domain, node.op_type) for node in model.graph)
    quantizers = kinds[("trt", "TRT_FP4DynamicQuantize")]
    assert quantizers == (9 if activations == "fp4" else 0)  # q/k/v and gate/up share one
    assert record.stats["activations_quantized"] == quantizers
    assert record.stats["weights_quantized"] == 15 and record.stats["skipped"] == {}
    assert model.model.opset_imports[""] >= 23
    assert ("trt" in model.model.opset_imports) == (activations == "fp4")
    for role, w in before.items():
        codes = model.graph.initializers[model.spec.weights[role]]
        assert codes.dtype == ir.DataType.FLOAT4E2M1 and codes.const_value.shape == w.shape
        (use,) = codes.uses()
        dq = use.node
        assert dq.attributes["block_size"].value == FP4_BLOCK
        assert dq.inputs[1].producer().inputs[0].dtype == ir.DataType.FLOAT8E4M3FN
    elements = sum(w.size for w in before.values())
    assert record.stats["bytes_before"] == 4 * elements
    # 4 bits a weight, one fp8 scale per 16 and a 4-byte tensor scale per weight
    assert record.stats["bytes_after"] == elements // 2 + elements // 16 + 4 * 15

    figures = tiny.reference.compare(session_for_model(model, optimization="basic"))
    assert figures["max_abs_error"] <= pass_.tolerance.max_abs_error, figures
    assert figures["top1_agreement"] >= pass_.tolerance.min_top1_agreement, figures
    assert figures["max_abs_error"] > 1e-2  # the weights really changed
    ratio = figures["perplexity_build"] / figures["perplexity_source"]
    assert 0.9 < ratio < 1.1, figures


def test_fp4_is_refused_where_there_is_no_fp4_or_no_multiple_of_16(llama):
    with pytest.raises(UsageError, match="a CPU"):
        QuantizeFp4Pass(batches=llama[1]).check_target(load_target("cpu"))
    with pytest.raises(Exception, match=r"FP4 needs compute capability ≥ 10\.0; rtx4090 is 8\.9"):
        QuantizeFp4Pass(batches=llama[1]).check_target(load_target("rtx4090"))
    QuantizeFp4Pass(batches=llama[1]).check_target(load_target("rtx5090"))
    with pytest.raises(UsageError, match="activations 'int8' is unknown"):
        QuantizeFp4Pass(activations="int8")


@pytest.mark.parametrize("activations", ["fp4", "float"])
def test_fp4_smoothing_search_keeps_the_best_output_error(llama, activations):
    """alpha_search: each activation gets the α (or no smoothing) with the smallest NVFP4
    output error on calibration rows (SmoothQuant for W4A4, AWQ's scaling for weight-only);
    the weights read X / s and the build holds its bounds."""
    tiny, batches = llama
    pass_ = QuantizeFp4Pass(
        batches=batches, alpha_search=(0.25, 0.5, 0.75), activations=activations,
        smooth_weight_only=activations == "float",
    )  # fmt: skip
    model, record = run_pass(pass_, tiny.cleaned())
    smoothed = record.stats["smoothed"]
    assert len(smoothed) == 9  # q/k/v, o, gate/up, down of 2 layers and the lm_head
    assert record.stats["activations_quantized"] == (9 if activations == "fp4" else 0)
    for alpha, error, unsmoothed in smoothed.values():
        assert alpha in (None, 0.25, 0.5, 0.75)
        assert error <= unsmoothed and (alpha is None) == (error == unsmoothed)
    assert any(alpha is not None for alpha, _, _ in smoothed.values())
    figures = tiny.reference.compare(session_for_model(model, optimization="basic"))
    assert figures["top1_agreement"] >= pass_.tolerance.min_top1_agreement, figures
    with pytest.raises(UsageError, match="alpha_search"):
        QuantizeFp4Pass(alpha_search=(1.5,))
    if activations == "float":  # without smooth_weight_only nothing is searched
        unsmoothed = QuantizeFp4Pass(batches=batches, alpha_search=(0.5,), activations="float")
        _, plain = run_pass(unsmoothed, tiny.cleaned())
        assert plain.stats["smoothed"] == {}


def test_fake_fp4_activation_is_the_fp4_form():
    """The numpy quantizer the smoothing search scores with is what the FP4 form runs."""
    model, parts = _fp4_graph(activations=True)
    emulate_fp4(model.graph)
    import onnxruntime as ort

    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    session = ort.InferenceSession(
        ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    w = (parts["w"].reshape(4, 16, 32) * parts["steps"][:, None, :]).reshape(64, 32)
    np.testing.assert_allclose(
        session.run(None, {"x": x})[0], fake_fp4_activation(x, parts["ga"]) @ w, rtol=1e-6
    )


def test_quantize_nvfp4_scale_search_never_rounds_a_block_worse():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((128, 48)).astype(np.float32) * rng.uniform(0.1, 2, (128, 1))
    importance = rng.uniform(0.1, 3, 128).astype(np.float32)

    def block_errors(codes, scales, g):
        steps = scales.astype(np.float32) * g
        values = codes.astype(np.float32).reshape(8, 16, 48) * steps[:, None, :]
        squares = np.square(values - w.reshape(8, 16, 48)) * importance.reshape(8, 16, 1)
        return squares.sum(axis=1)

    plain = block_errors(*quantize_nvfp4(w))
    searched = quantize_nvfp4(w, shrink=(0.9, 0.8), importance=importance)
    found = block_errors(*searched)
    assert np.all(found <= plain + 1e-7)
    assert found.sum() < 0.97 * plain.sum()  # a shrunk scale wins on many blocks
    assert searched[2] == quantize_nvfp4(w)[2]  # the tensor scale is absmax's
    with pytest.raises(UsageError, match="scale_search"):
        QuantizeFp4Pass(scale_search=(1.2,))


def test_the_grid_check_goes_a_chunk_of_whole_blocks_at_a_time(monkeypatch):
    """A weight on its nearest NVFP4 grid is found so chunk by chunk as whole; one value off
    in the last chunk is found too."""
    from fdec.passes import quantize_fp4, weights

    array = quantize_fp4._values(
        *quantize_nvfp4(np.random.default_rng(5).standard_normal((160, 24)).astype(np.float32))
    )
    nearest = quantize_nvfp4(array)
    monkeypatch.setattr(weights, "_CHUNK_BYTES", 4 * 24 * 40)  # 40 rows: 32 a step, 5 steps
    assert quantize_fp4._on_grid(array, nearest)
    off = array.copy()
    off[-1, 3] *= 1.01
    assert not quantize_fp4._on_grid(off, nearest)
    assert quantize_fp4._on_grid(off[:144], (nearest[0][:144], nearest[1][:9], nearest[2]))
    # Memory: a 16 MB weight on its grid is checked in ~1 MB of temporaries, not its own size
    import tracemalloc

    big = quantize_fp4._values(
        *quantize_nvfp4(np.random.default_rng(6).standard_normal((4096, 1024)).astype(np.float32))
    )
    nearest = quantize_nvfp4(big)
    monkeypatch.setattr(weights, "_CHUNK_BYTES", 4 * 1024 * 64)  # 256 KB: 64 rows a step
    tracemalloc.start()
    assert quantize_fp4._on_grid(big, nearest)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < big.nbytes / 8, peak
