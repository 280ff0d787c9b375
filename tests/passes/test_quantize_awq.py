"""Tests of quantize-int4-awq: AWQ's activation-aware scales before weight-only int4 RTN.

A small hand-written graph with one outlier input channel shows what AWQ is for: the search
picks α > 0, the norm weight takes 1/s exactly, and the output error on held inputs drops well
below RTN's. The tiny llama (exported once per module, untied, cleaned, calibrated on the
built-in corpus through its tiny tokenizer) checks the emitted MatMulNBits, the tolerance
against PyTorch, and each linear layer's output error on held text against RTN's.
"""

from __future__ import annotations

import collections
import copy
import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from exported import export_tiny, run_pass
from graphs import ir_model, run_ort, tiny_spec

from fdec.calibrate import (
    calibration_batches,
    capture_activations,
    load_calibration_texts,
    matmul_activation_inputs,
)
from fdec.errors import CompileError, UsageError
from fdec.ir import FdecModel, ModelSpec
from fdec.passes.int4_codes import quantize_int4, quantize_minmax
from fdec.passes.quantize import QuantizeInt4Pass
from fdec.passes.quantize_awq import QuantizeInt4AwqPass
from fdec.passes.source_grid import block_sum_matrix, offset_rows
from fdec.runtime import session_for_model
from fdec.verify import Reference

_MS = "com.microsoft"
_LAYER_ROLES = ("q", "k", "v", "o", "gate", "up", "down")


def _ops(model: FdecModel) -> collections.Counter:
    return collections.Counter((node.domain or "", node.op_type) for node in model.graph)


def _nbits_weight(node: ir.Node) -> np.ndarray:
    """The [K, N] float64 values a symmetric MatMulNBits node multiplies by."""
    k, n = node.attributes["K"].value, node.attributes["N"].value
    packed = node.inputs[1].const_value.numpy()  # [N, k_blocks, block / 2]
    scales = node.inputs[2].const_value.numpy().astype(np.float64)  # [N, k_blocks]
    assert len(node.inputs) == 3  # symmetric: zero point 8
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, scales.shape[1], -1)
    values = (codes.astype(np.float64) - 8) * scales[..., None]
    return values.reshape(n, -1)[:, :k].T


# --- a crafted graph: one outlier channel -----------------------------------------------------

_OUTLIER = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[R, 64] x) => (float[R, 16] y, float[R, 16] z) {
    n = Mul (x, g1)
    y = MatMul (n, w1)
    z = MatMul (x, w2)
}
"""
_K, _N, _HOT = 64, 16, 5  # channel 5 of x is 50× the others


def _outlier_inputs(seed: int, rows: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, _K)).astype(np.float32)
    x[:, _HOT] *= 50
    return x


def _outlier_model() -> tuple[FdecModel, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    arrays = {
        "g1": rng.uniform(0.5, 1.5, _K).astype(np.float32),
        "w1": rng.standard_normal((_K, _N)).astype(np.float32),
        "w2": rng.standard_normal((_K, _N)).astype(np.float32),
    }
    spec = tiny_spec(
        hidden_size=_K,
        weights={"layers.0.q": "w1", "layers.0.down": "w2"},
        outputs=["y", "z"],
    )
    return FdecModel(ir_model(_OUTLIER, arrays), spec), arrays


def _calibration(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    x = _outlier_inputs(1, 256)
    return {"n": x * arrays["g1"], "x": x}


def _awq_scales(x: np.ndarray, alpha: float) -> np.ndarray:
    """AWQ's s = mean|x|^α normalised by sqrt(max·min), computed independently of the pass."""
    s = np.maximum(np.abs(x.astype(np.float64)).mean(axis=0) ** alpha, 1e-4)
    return s / np.sqrt(s.max() * s.min())


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.square(got - want).sum() / np.square(want).sum())


@pytest.mark.parametrize("clip", [True, False], ids=["clip", "no-clip"])
def test_awq_protects_an_outlier_channel_and_folds_one_over_s_into_the_norm(clip):
    model, arrays = _outlier_model()
    calibration = _calibration(arrays)
    held = {"x": _outlier_inputs(2, 512)}
    want = run_ort(model.model, held)
    rtn, _ = run_pass(QuantizeInt4Pass(accuracy_level=0), _outlier_model()[0])
    rtn_out = run_ort(rtn.model, held)

    model, record = run_pass(
        QuantizeInt4AwqPass(activations=calibration, clip=clip, accuracy_level=0), model
    )

    stats = record.stats
    assert _ops(model)[(_MS, "MatMulNBits")] == 2 and _ops(model)[("", "MatMul")] == 0
    assert model.spec_problems() == []
    assert (stats["groups_searched"], stats["groups_scaled"]) == (2, 2)
    assert (stats["scales_folded"], stats["scales_inserted"]) == (1, 1)
    assert (stats["weights_clipped"] > 0) is clip
    assert stats["weights_quantized"] == 2 and stats["rtn_only"] == {}
    graph = model.graph
    for name, output in (("n", 0), ("x", 1)):
        group = stats["groups"][name]
        alpha = group["alpha"]
        assert 0 < alpha <= 1
        assert group["error_awq"] < group["error_rtn"] and group["reduction"] > 0.3
        s = _awq_scales(calibration[name], alpha)
        assert s[_HOT] == s.max() and s.max() / np.median(s) > 3  # the outlier is protected
        weight = arrays["w1" if name == "n" else "w2"].astype(np.float64)
        x = held["x"].astype(np.float64) * (arrays["g1"] if name == "n" else 1)
        # Before quantization the rewrite is exact: X·W = (X/s)·(s·W).
        np.testing.assert_allclose((x / s) @ (weight * s[:, None]), x @ weight, rtol=1e-5)
        if name == "n":  # folded: g1 ← g1 / s, and no Mul was added
            g1 = graph.initializers["g1"].const_value.numpy()
            np.testing.assert_allclose(g1, arrays["g1"] / s, rtol=1e-6)
            np.testing.assert_allclose(
                (held["x"] * g1) @ (weight * s[:, None]), x @ weight, rtol=1e-5, atol=1e-3
            )
        else:  # x is a graph input: an inserted Mul by 1/s feeds the MatMulNBits
            (inserted,) = [node for node in graph if node.name == "x_AWQ"]
            assert inserted.op_type == "Mul" and inserted.inputs[0].name == "x"
            np.testing.assert_allclose(inserted.inputs[1].const_value.numpy(), 1 / s, rtol=1e-6)
            (reader,) = [use.node for use in inserted.outputs[0].uses()]
            assert reader.op_type == "MatMulNBits"
        # On held inputs with the same outlier, AWQ's output error is well below RTN's.
        got = run_ort(model.model, held)[output]
        awq_error = _relative_error(got, want[output])
        rtn_error = _relative_error(rtn_out[output], want[output])
        assert awq_error <= 0.7 * rtn_error, (name, awq_error, rtn_error)


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_bias_correction_removes_the_mean_output_error(backend):
    # Activations with a large common offset: the quantization error's mean, E[x]·(W − Ŵ),
    # is then most of the output error, and the corrected bias takes it out.
    def offset(seed: int, rows: int) -> np.ndarray:
        return _outlier_inputs(seed, rows) + 4.0

    model, arrays = _outlier_model()
    calibration = {"n": offset(1, 256) * arrays["g1"], "x": offset(1, 256)}
    held = {"x": offset(2, 512)}
    want = run_ort(model.model, held)
    options = {"activations": calibration, "accuracy_level": 0, "backend": backend}
    plain, _ = run_pass(QuantizeInt4AwqPass(**options), _outlier_model()[0])

    model, record = run_pass(QuantizeInt4AwqPass(**options, bias_correction=True), model)

    assert record.stats["biases_corrected"] == 2
    if backend == "onnxruntime":  # MatMulNBits' bias input (index 5), one per weight
        nodes = [node for node in model.graph if node.op_type == "MatMulNBits"]
        assert [len(node.inputs) for node in nodes] == [6, 6]
        assert all(node.inputs[5].const_value.shape == (_N,) for node in nodes)
    else:  # standard ONNX: MatMul of the dequantized weight, then Add of the bias
        assert _ops(model)[("", "Add")] == 2
    got, before = run_ort(model.model, held), run_ort(plain.model, held)
    for output in (0, 1):
        mean_error = np.abs((got[output] - want[output]).mean(axis=0)).mean()
        mean_before = np.abs((before[output] - want[output]).mean(axis=0)).mean()
        assert mean_error < 0.25 * mean_before, (output, mean_error, mean_before)
        assert _relative_error(got[output], want[output]) < _relative_error(
            before[output], want[output]
        )


def test_awq_tensorrt_backend_writes_blocked_dequantize_after_the_scales():
    model, arrays = _outlier_model()
    calibration = _calibration(arrays)
    held = {"x": _outlier_inputs(2, 64)}
    want = run_ort(model.model, held)

    model, record = run_pass(
        QuantizeInt4AwqPass(activations=calibration, backend="tensorrt", accuracy_level=0), model
    )

    ops = _ops(model)
    assert ops[("", "DequantizeLinear")] == 2 and ops[("", "MatMul")] == 2
    assert all(domain == "" for domain, _ in ops)
    assert record.stats["opset_raised"] is True and model.model.opset_imports[""] == 21
    got = run_ort(model.model, held)
    for output in (0, 1):
        assert _relative_error(got[output], want[output]) < 0.01


def test_awq_options_are_checked_and_calibration_is_required():
    model, arrays = _outlier_model()
    with pytest.raises(UsageError, match="needs calibration data") as caught:
        QuantizeInt4AwqPass().requires(model)
    assert "calibration_batches" in caught.value.fix
    assert QuantizeInt4AwqPass().needs_calibration
    assert not QuantizeInt4AwqPass(activations={}).needs_calibration
    for option, value in (("grid", 0), ("max_rows", -1), ("grid", True), ("grid", 2.5)):
        with pytest.raises(UsageError, match=option):
            QuantizeInt4AwqPass(**{option: value})
    with pytest.raises(UsageError, match="quantize-int4-awq block_size 16"):
        QuantizeInt4AwqPass(block_size=16)
    with pytest.raises(UsageError, match="batches"):
        QuantizeInt4AwqPass(batches=[np.zeros(4, dtype=np.int64)])
    with pytest.raises(TypeError):
        QuantizeInt4AwqPass(64)
    batches = [np.zeros((1, 8), dtype=np.int64)] * 3
    assert QuantizeInt4AwqPass(batches=batches).options() == {
        "block_size": 32,
        "symmetric": True,
        "accuracy_level": 4,
        "include_lm_head": True,
        "backend": "onnxruntime",
        "bits": 4,
        "lm_head_bits": None,
        "share_tied_embedding": False,
        "block_grid": "onnxruntime",
        "grid": 20,
        "max_rows": 512,
        "clip": True,
        "keep_source_grid": False,
        "source_grid_widths": (),
        "source_grid_form": "block_sums",
        "source_grid_levels": 1,
        "source_grid_rounded_zero_points": False,
        "rounding": "nearest",
        "gptq_hessian": "all",
        "gptq_damping": 0.01,
        "bias_correction": False,
        "activations": None,
        "batches": "3 batches, 24 tokens",
    }
    assert QuantizeInt4AwqPass(activations=_calibration(arrays)).options()["activations"] == (
        "2 tensors"
    )


def test_weights_without_calibration_rows_get_plain_rtn():
    model, arrays = _outlier_model()
    partial = {"n": _calibration(arrays)["n"]}

    model, record = run_pass(QuantizeInt4AwqPass(activations=partial), model)

    assert record.stats["weights_quantized"] == 2  # both int4: x's weight as plain RTN
    assert record.stats["groups_searched"] == 1
    assert record.stats["rtn_only"] == {"no calibration activations": 1}
    assert not any(node.name.endswith("_AWQ") for node in model.graph)
    with pytest.raises(CompileError, match="none of the 2 activations"):
        QuantizeInt4AwqPass(activations={"old/n": partial["n"]})(_outlier_model()[0])


def _on_q4_1_grid(array: np.ndarray) -> np.ndarray:
    """A [K, N] array rounded as GGUF Q4_1 does: blocks of 32 along K, scale (max - min) / 15."""
    blocks = array.T.reshape(array.shape[1], -1, 32).astype(np.float64)
    low, high = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
    step = (high - low) / 15
    grid = np.round((blocks - low) / step) * step + low
    return grid.reshape(array.shape[1], -1).T.astype(np.float32)


@pytest.mark.parametrize(
    ("form", "levels", "ratio"),
    [("zero_points", 1, 100), ("block_sums", 1, 5), ("block_sums", 2, 100), ("rounded", 1, 50)],
)
def test_weights_on_a_q4_1_grid_keep_it_and_are_not_searched(form, levels, ratio):
    model, arrays = _outlier_model()
    model.graph.initializers["w1"].const_value = ir.tensor(_on_q4_1_grid(arrays["w1"]), name="w1")
    feeds = {"x": _outlier_inputs(2, 8)}
    before = run_ort(model.model, feeds)

    # w1 (read through n) sits on the grid; w2 does not and is searched with x's calibration.
    # accuracy_level 0: float activations, so the grid's own error is what is compared.
    kept = QuantizeInt4AwqPass(
        activations=_calibration(arrays),
        keep_source_grid=True,
        source_grid_form="zero_points" if form == "zero_points" else "block_sums",
        source_grid_levels=levels,
        source_grid_rounded_zero_points=form == "rounded",
        accuracy_level=0,
    )
    model, record = run_pass(kept, model)

    assert record.stats["source_grid_kept"] == 1 and record.stats["groups_searched"] == 1
    assert record.stats["rtn_only"] == {"on the source's block grid (kept exactly)": 1}
    y, z = run_ort(model.model, feeds)
    # w1 kept: exact up to float16 zero points' ~1 % of a step (zero_points, 2 levels of block
    # sums) or the once-rounded offsets (1 level); w2 rounded to 4 bits
    assert _relative_error(y, before[0]) < _relative_error(z, before[1]) / ratio
    (w1_node,) = [n for n in model.graph if n.op_type == "MatMulNBits" and "w1" in n.inputs[1].name]
    if form == "zero_points":  # float16 zero points: ONNX Runtime's slow path
        assert w1_node.inputs[3].const_value.dtype == ir.DataType.FLOAT16
        assert record.stats["block_sum_inputs"] == 0
    else:  # blocks over [n, n's block sums (× levels)]: no zero points, or uint8 ones
        zero_points = w1_node.inputs[3:4]
        assert [z.const_value.dtype for z in zero_points] == [ir.DataType.UINT8] * (
            form == "rounded"
        )
        assert record.stats["block_sum_inputs"] == 1
        assert w1_node.attributes["K"].value == _K + levels * 32  # 2 block sums, padded to 32
        widened = w1_node.inputs[0].producer()
        assert widened.op_type == "Concat" and widened.inputs[0].name == "n"
        sums = widened.inputs[1].producer()
        assert sums.op_type == "MatMul" and len(widened.inputs) == 1 + levels
        assert sums.inputs[1].const_value.numpy().sum(axis=0).tolist() == [32, 32] + [0] * 30
    off = QuantizeInt4AwqPass(activations=_calibration(arrays))  # the default: off
    _, searched = run_pass(off, _outlier_model()[0])
    assert searched.stats["source_grid_kept"] == 0 and searched.stats["groups_searched"] == 2


@pytest.mark.parametrize("k", [64, 96])
def test_offset_rows_reproduce_a_q4_1_grid_with_symmetric_blocks(k):
    rng = np.random.default_rng(3)
    weight = _on_q4_1_grid(rng.standard_normal((k, 24)).astype(np.float32) + 0.3)
    x = rng.standard_normal((50, k)).astype(np.float64)
    want = x @ weight
    grid = quantize_minmax(weight, 32, symmetric=False)
    sums = x @ block_sum_matrix(k, 32)  # [50, 32]: the k/32 block sums, then zeros
    errors = {}
    for levels, rounded in ((1, False), (2, False), (1, True)):
        wide = offset_rows(grid, levels, rounded)
        assert (wide.k, wide.bits) == (k + 32 * levels, 4)
        assert wide.k_blocks == k // 32 + levels  # one block of offsets per level
        zero = wide.unpacked_zero_points()
        if rounded:  # the grid's zero points rounded, then the offset blocks' symmetric 8
            np.testing.assert_array_equal(zero[:, : k // 32], np.rint(grid.zero_points))
            assert (zero[:, k // 32 :] == 8).all()
        else:
            assert wide.zero_points is None
        got = np.concatenate([x, *[sums] * levels], axis=1) @ wide.dequantized().T
        errors[levels, rounded] = _relative_error(got, want)
    rtn = _relative_error(x @ quantize_int4(weight, 32, True).dequantized().T, want)
    assert errors[2, False] < 1e-6 and errors[1, False] < rtn / 4, (errors, rtn)
    assert errors[1, True] < errors[1, False] / 5, errors
    with pytest.raises(ValueError, match="float zero points"):
        offset_rows(quantize_int4(weight, 32, False), 1)


# --- the tiny llama ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Tiny:
    """The tiny llama, untied and cleaned, with its reference and calibration batches."""

    proto: bytes
    spec: ModelSpec
    reference: Reference
    batches: list[np.ndarray]
    tied_proto: bytes
    tied_spec: ModelSpec

    def cleaned(self) -> FdecModel:
        model = ir.serde.deserialize_model(onnx.load_from_string(self.proto))
        return FdecModel(model, copy.deepcopy(self.spec))

    def tied(self) -> FdecModel:
        model = ir.serde.deserialize_model(onnx.load_from_string(self.tied_proto))
        return FdecModel(model, copy.deepcopy(self.tied_spec))


@pytest.fixture(scope="module")
def llama(tiny_models, tmp_path_factory) -> _Tiny:
    tiny = export_tiny(tiny_models, tmp_path_factory, "llama")
    batches = calibration_batches(
        load_calibration_texts(None), tiny.tokenizer, tiny.spec.vocab_size
    )
    return _Tiny(tiny.proto, tiny.spec, tiny.reference, batches, tiny.tied_proto, tiny.tied_spec)


def _layer_errors(quantized: FdecModel, source: FdecModel, ids: np.ndarray) -> dict[str, float]:
    """Role → ‖X·W − X̂·Ŵ‖² / ‖X·W‖² of each int4 layer on fp32 activations X of held text.

    Ŵ is unpacked from the MatMulNBits node; X̂ is X times whatever 1/s the quantized graph
    applies to it: an inserted `<X>_AWQ` Mul's constant, or the change of the per-channel
    weight of the Mul producing X (a folded RMSNorm weight).
    """
    activations = matmul_activation_inputs(source)
    captured = capture_activations(source, ids, sorted(set(activations.values())))
    old = source.graph.initializers
    errors: dict[str, float] = {}
    for node in quantized.graph:
        if node.op_type != "MatMulNBits":
            continue
        (role,) = quantized.spec.roles_of(node.inputs[1].name)
        x = captured[activations[role]].reshape(-1, node.attributes["K"].value)
        x = x.astype(np.float64)
        factor = np.ones(x.shape[1])
        producer = node.inputs[0].producer()
        if producer is not None and producer.name.endswith("_AWQ"):
            factor = producer.inputs[1].const_value.numpy().astype(np.float64)
        elif producer is not None and producer.op_type == "Mul":
            for value in producer.inputs:
                if value.const_value is not None and value.name in old:
                    factor = value.const_value.numpy() / old[value.name].const_value.numpy()
        w = old[source.spec.weights[role]].const_value.numpy().astype(np.float64)
        errors[role] = _relative_error((x * factor) @ _nbits_weight(node), x @ w)
    return errors


def test_awq_on_the_tiny_llama_lowers_every_layers_output_error(llama):
    roles = [f"layers.{i}.{r}" for i in range(llama.spec.num_layers) for r in _LAYER_ROLES]
    roles.append("lm_head")
    pass_ = QuantizeInt4AwqPass(batches=llama.batches)

    model, record = run_pass(pass_, llama.cleaned())
    rtn, _ = run_pass(QuantizeInt4Pass(), llama.cleaned())

    stats = record.stats
    assert _ops(model)[(_MS, "MatMulNBits")] == 15
    assert _ops(model)[("", "MatMul")] == 4  # attention scores and context
    assert model.spec_problems() == []
    assert record.options["batches"] == "16 batches, 2048 tokens"
    assert (stats["matmuls_quantized"], stats["weights_quantized"]) == (15, 15)
    assert stats["skipped"] == {} and stats["rtn_only"] == {}
    assert stats["groups_searched"] == 9  # qkv, o, gate/up, down per layer; the lm_head
    assert stats["bytes_after"] == 58_880  # exactly quantize-int4's layout
    inserted = [node for node in model.graph if node.name.endswith("_AWQ")]
    assert len(inserted) == stats["scales_inserted"]
    assert stats["scales_folded"] + stats["scales_inserted"] == stats["groups_scaled"] > 0
    for group in stats["groups"].values():
        assert group["error_awq"] <= group["error_scaled"] <= group["error_rtn"]
    assert stats["mean_error_reduction"] > 0.1
    figures = session_for_model(model)
    figures = llama.reference.compare(figures)
    assert figures["max_abs_error"] <= pass_.tolerance.max_abs_error, figures
    assert figures["top1_agreement"] >= pass_.tolerance.min_top1_agreement, figures
    assert 0.95 < figures["perplexity_build"] / figures["perplexity_source"] < 1.05, figures

    # Out of sample (the held text, not the calibration corpus), layer by layer.
    source = llama.cleaned()
    awq_errors = _layer_errors(model, source, llama.reference.ids)
    rtn_errors = _layer_errors(rtn, source, llama.reference.ids)
    assert sorted(awq_errors) == sorted(rtn_errors) == sorted(roles)
    awq_mean = np.mean(list(awq_errors.values()))
    rtn_mean = np.mean(list(rtn_errors.values()))
    assert awq_mean <= 0.9 * rtn_mean, (awq_mean, rtn_mean)


def test_awq_on_a_shared_tied_table_divides_the_gathered_rows_by_s_again(llama):
    model = llama.tied()
    table = model.graph.initializers[model.spec.weights["embed"]].const_value.numpy().copy()
    pass_ = QuantizeInt4AwqPass(batches=llama.batches, share_tied_embedding=True)

    model, record = run_pass(pass_, model)

    stats = record.stats
    assert stats["gathers_shared"] == 1 and stats["weights_quantized"] == 15
    head_group = next(g for g in stats["groups"].values() if g["roles"] == ["embed", "lm_head"])
    assert head_group["alpha"] > 0  # the lm_head's rows were scaled: the embedding undoes it
    (undo,) = [node for node in model.graph if node.name.endswith("_inv_s")]
    assert _ops(model)[(_MS, "GatherBlockQuantized")] == 1
    # The embedding's rows are the table within the int4 error of s·table, divided by s: one
    # step, or for values AWQ's clipping cut (ranges shrunk to ≥ 0.8), 0.2 · 8 steps more.
    ids = llama.batches[0][:1, :32]
    (rows,) = capture_activations(model, ids, [undo.outputs[0].name]).values()
    want = table[ids]
    s = 1.0 / undo.inputs[1].const_value.numpy()
    step = np.abs(s * table).reshape(table.shape[0], -1, 32).max(-1) / 8  # [V, k_blocks]
    step = np.repeat(step, 32, axis=1)[ids] / s  # one step of the scaled row, divided by s
    error = np.abs(rows - want)
    assert np.all(error <= 2.6001 * step)
    assert np.mean(error <= step * 1.0001) > 0.9
    assert np.abs(rows - want).max() > 0  # really quantized
    figures = llama.reference.compare(session_for_model(model))
    assert figures["top1_agreement"] >= pass_.tolerance.min_top1_agreement
    assert 0.95 < figures["perplexity_build"] / figures["perplexity_source"] < 1.05


# --- GPTQ rounding ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "block", "symmetric"), [(96, 32, True), (80, 64, True), (96, 32, False)]
)
def test_gptq_int4_is_rtn_without_correlation_and_beats_it_with(k, block, symmetric):
    from fdec.passes.awq_search import gptq_int4 as _gptq_int4
    from fdec.passes.quantize import quantize_int4

    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, 24)).astype(np.float32)
    nearest = quantize_int4(w, block, symmetric)
    same = _gptq_int4(w, np.eye(k), block, symmetric, damping=0.0)
    # H = I spreads no error: RTN's packed codes, padding past K (80 at block 64) included.
    assert np.array_equal(same.packed, nearest.packed)
    assert np.array_equal(same.scales, nearest.scales)

    x = rng.standard_normal((4000, k))
    x[:, 1:] += 0.9 * x[:, :-1]  # correlated input channels, as a layer's activations are
    gptq = _gptq_int4(w, x.T @ x, block, symmetric, damping=0.01)
    assert np.array_equal(gptq.scales, nearest.scales)  # only the codes change
    assert not np.array_equal(gptq.packed, nearest.packed)
    held = rng.standard_normal((1000, k))
    held[:, 1:] += 0.9 * held[:, :-1]
    error = {
        name: _relative_error(held @ q.dequantized().T.astype(np.float64), held @ w)
        for name, q in (("rtn", nearest), ("gptq", gptq))
    }
    assert error["gptq"] < 0.8 * error["rtn"], error


@pytest.mark.parametrize("hessian", ["all", "searched"])
def test_awq_with_gptq_rounding_lowers_held_output_error_below_awq_alone(llama, hessian):
    awq, _ = run_pass(QuantizeInt4AwqPass(batches=llama.batches), llama.cleaned())
    pass_ = QuantizeInt4AwqPass(batches=llama.batches, rounding="gptq", gptq_hessian=hessian)
    gptq, record = run_pass(pass_, llama.cleaned())

    assert record.options["rounding"] == "gptq"
    assert record.stats["bytes_after"] == 58_880  # the same layout, other codes
    source = llama.cleaned()
    ids = llama.reference.ids
    awq_errors = _layer_errors(awq, source, ids)
    gptq_errors = _layer_errors(gptq, source, ids)
    assert np.mean(list(gptq_errors.values())) < 0.9 * np.mean(list(awq_errors.values()))
    figures = llama.reference.compare(session_for_model(gptq))
    assert figures["top1_agreement"] >= pass_.tolerance.min_top1_agreement, figures


def test_gptq_options_are_checked(llama):
    with pytest.raises(UsageError, match="rounding 'best'"):
        QuantizeInt4AwqPass(batches=llama.batches, rounding="best")
    with pytest.raises(UsageError, match="gptq_hessian 'some'"):
        QuantizeInt4AwqPass(batches=llama.batches, gptq_hessian="some")


def test_a_shared_table_takes_the_largest_block_that_divides_the_hidden_size(llama):
    # The tiny llama's hidden size is 64: at block 128 its layers' K are padded to one block,
    # but the table the embedding gathers from must be whole blocks, so it is cut in 64s.
    pass_ = QuantizeInt4AwqPass(batches=llama.batches, share_tied_embedding=True, block_size=128)
    model, record = run_pass(pass_, llama.tied())

    assert record.stats["shared_table_block_size"] == 64
    (gather,) = [node for node in model.graph if node.op_type == "GatherBlockQuantized"]
    assert gather.attributes["block_size"].value == 64
    blocks = collections.defaultdict(set)
    for node in model.graph:
        if node.op_type == "MatMulNBits":
            head = model.spec.roles_of(node.inputs[1].name) == ["embed", "lm_head"]
            blocks["lm_head" if head else "layers"].add(node.attributes["block_size"].value)
    assert blocks == {"lm_head": {64}, "layers": {128}}
    figures = llama.reference.compare(session_for_model(model))
    assert figures["top1_agreement"] >= pass_.tolerance.min_top1_agreement, figures


def test_lm_head_bits_keeps_the_head_and_its_shared_table_at_8_bits(llama):
    four, _ = run_pass(
        QuantizeInt4AwqPass(batches=llama.batches, share_tied_embedding=True), llama.tied()
    )
    pass_ = QuantizeInt4AwqPass(batches=llama.batches, share_tied_embedding=True, lm_head_bits=8)
    eight, record = run_pass(pass_, llama.tied())

    bits = collections.defaultdict(set)
    for node in eight.graph:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            table = node.inputs[0 if node.op_type == "GatherBlockQuantized" else 1]
            head = "lm_head" in eight.spec.roles_of(table.name)
            bits[(node.op_type, head)].add(node.attributes["bits"].value)
    assert bits == {
        ("MatMulNBits", True): {8},
        ("GatherBlockQuantized", True): {8},
        ("MatMulNBits", False): {4},
    }
    # AWQ leaves the 8-bit head to rounding; the 4-bit layers are searched as before.
    assert record.stats["rtn_only"] == {"8-bit weights (lm_head_bits)": 1}
    assert record.stats["groups_searched"] == 8
    scores = {
        name: llama.reference.compare(session_for_model(model))
        for name, model in (("int4", four), ("int8 head", eight))
    }
    assert scores["int8 head"]["kl_divergence"] < scores["int4"]["kl_divergence"], scores
    with pytest.raises(UsageError, match="lm_head_bits 3"):
        QuantizeInt4AwqPass(batches=llama.batches, lm_head_bits=3)


# --- memory: column blocks and codes emitted per group (issue 19) ------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_search_over_column_blocks_chooses_what_the_whole_search_does(monkeypatch, symmetric):
    from fdec.passes import awq_search as search

    rng = np.random.default_rng(3)
    rows = rng.standard_normal((64, 256)).astype(np.float32)
    rows[:, 7] *= 30.0  # an outlier channel: α > 0 wins
    seen = _Seen(np.abs(rows).mean(axis=0), rows)
    arrays = [rng.standard_normal((256, 96)).astype(np.float32) for _ in range(2)]
    whole = search.awq_search(seen, arrays, True, grid=10, block_size=32, symmetric=symmetric)
    assert len(search._column_blocks(256, 96)) == 1
    monkeypatch.setattr(search, "_COLUMN_BYTES", 4 * 256 * 40)  # 40, 40 and 16 columns
    assert len(search._column_blocks(256, 96)) == 3
    blocks = search.awq_search(seen, arrays, True, grid=10, block_size=32, symmetric=symmetric)
    assert whole.alpha == blocks.alpha > 0
    assert whole.clipped == blocks.clipped and any(whole.clipped)
    for a, b in zip(whole.arrays, blocks.arrays):
        np.testing.assert_array_equal(a, b)
    for name in ("error_rtn", "error_scaled", "error"):
        assert getattr(blocks, name) == pytest.approx(getattr(whole, name), rel=1e-5)


@dataclasses.dataclass
class _Seen:
    mean_abs: np.ndarray
    rows: np.ndarray


def test_each_group_is_written_before_the_next_is_searched(llama, monkeypatch):
    """The codes of a searched group go into the graph at once (an 8B's, held to the end, were
    4.4 GB) and no Weight keeps them; the build is the one the tests above check."""
    searched: list[tuple[int, int]] = []
    scale_group = QuantizeInt4AwqPass._scale_group

    def watched(self, model, group, *args):
        written = sum(node.op_type == "MatMulNBits" for node in model.graph)
        searched.append((written, len(group.weights)))
        out = scale_group(self, model, group, *args)
        assert all(weight.quantized is not None for weight in group.weights)
        return out

    monkeypatch.setattr(QuantizeInt4AwqPass, "_scale_group", watched)
    pass_ = QuantizeInt4AwqPass(batches=llama.batches)
    model, record = run_pass(pass_, llama.cleaned())
    assert len(searched) == record.stats["groups_searched"] == 9
    before = 0
    for written, size in searched:  # every earlier group already in the graph
        assert written == before
        before += size
    assert _ops(model)[(_MS, "MatMulNBits")] == record.stats["weights_quantized"] == 15
    assert model.spec_problems() == []


def test_a_lazily_bound_weight_is_held_only_while_its_group_is_searched(llama, monkeypatch):
    """A streamed compile binds weights to the checkpoint: the source-grid check reads each
    one, and must drop it again (an 8B's float copies, all kept, were 32 GB), so that only
    the searched group's weights are in memory; the build is the in-memory one's."""
    from fdec.passes import weights as weights_module

    model = llama.cleaned()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.size > 1024:
            value.const_value = ir.LazyTensor(
                lambda tensor=tensor: tensor, dtype=tensor.dtype, shape=tensor.shape
            )
    held: list[int] = []
    collect = weights_module.collect_weights
    found: list = []

    def collect_and_keep(*args, **kwargs):
        result = collect(*args, **kwargs)
        found.extend(result[0])
        return result

    scale_group = QuantizeInt4AwqPass._scale_group

    def watched(self, model, group, *args):
        mine = {id(weight) for weight in group.weights}
        held.append(sum(w._array is not None for w in found if id(w) not in mine))
        return scale_group(self, model, group, *args)

    monkeypatch.setattr("fdec.passes.quantize_awq.collect_weights", collect_and_keep)
    monkeypatch.setattr(QuantizeInt4AwqPass, "_scale_group", watched)
    pass_ = QuantizeInt4AwqPass(batches=llama.batches, keep_source_grid=True)
    lazy, record = run_pass(pass_, model)
    assert record.stats["source_grid_kept"] == 0 and len(held) == 9
    assert held == [0] * 9
    eager, _ = run_pass(QuantizeInt4AwqPass(batches=llama.batches), llama.cleaned())
    assert len(_nbits_nodes(lazy)) == len(_nbits_nodes(eager)) == 15
    for got, want in zip(_nbits_nodes(lazy), _nbits_nodes(eager)):
        np.testing.assert_array_equal(_nbits_weight(got), _nbits_weight(want))


def _nbits_nodes(model: FdecModel) -> list[ir.Node]:
    return sorted(
        (node for node in model.graph if node.op_type == "MatMulNBits"),
        key=lambda node: node.inputs[1].name,
    )


def test_the_source_grid_is_found_a_block_of_columns_at_a_time(monkeypatch):
    """The grid check tries ~_COLUMNS output columns at a time (an 8B's table whole took four
    2.1 GB copies) and gives the whole-array codes; one block off the grid is enough to stop."""
    from fdec.passes import int4_codes
    from fdec.passes.weights import Weight

    rng = np.random.default_rng(5)
    on_grid = _on_q4_1_grid(rng.standard_normal((64, 40)).astype(np.float32))

    def weight(array: np.ndarray) -> Weight:
        return Weight(ir.Value(name="w"), array, ir.DataType.FLOAT, [], [])

    pass_ = QuantizeInt4AwqPass(batches=[np.zeros((1, 4), np.int64)], block_size=32)
    whole = pass_._source_grid(weight(on_grid))
    assert whole is not None and whole.zero_points is not None
    monkeypatch.setattr(int4_codes, "_COLUMNS", 16)  # 16, 16 and 8 columns
    blocks = pass_._source_grid(weight(on_grid))
    for name in ("packed", "scales", "zero_points"):
        np.testing.assert_array_equal(getattr(blocks, name), getattr(whole, name))
    assert (blocks.k, blocks.n) == (64, 40)
    off = on_grid.copy()
    off[3, 37] += 0.3 * np.abs(off[:, 37]).max()  # the last block of columns leaves the grid
    assert pass_._source_grid(weight(off)) is None
