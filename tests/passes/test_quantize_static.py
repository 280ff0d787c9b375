"""Tests of the static quantization passes (FP8 E4M3 and SmoothQuant INT8 QDQ).

The tiny llama (and gpt2, for LayerNormalization) is exported once per module, untied and
cleaned, and calibrated on the built-in corpus through its tiny tokenizer. Each test quantizes
a fresh copy, checks the QDQ structure and the quantized values with numpy, and runs the
result in ONNX Runtime on the CPU at graph optimization "basic" against the PyTorch reference
within the pass's declared tolerance.
"""

from __future__ import annotations

import collections
import copy
import dataclasses

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from exported import export_tiny, matmul_weights, run_pass
from graphs import ir_model, run_ort, tiny_spec

from fdec.calibrate import (
    ActivationStats,
    calibration_batches,
    capture_activations,
    collect_activation_stats,
    load_calibration_texts,
    matmul_activation_inputs,
)
from fdec.errors import CompileError, InputError, UsageError
from fdec.ir import FdecModel, ModelSpec
from fdec.passes.quantize_static import QuantizeFp8Pass, QuantizeInt8StaticPass
from fdec.pipeline import Pass
from fdec.runtime import session_for_model
from fdec.targets import load_target
from fdec.verify import Reference

_LAYER_ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass
class _Tiny:
    """A tiny exported model, untied and cleaned, with its reference and calibration."""

    proto: bytes
    spec: ModelSpec
    reference: Reference
    batches: list[np.ndarray]
    stats: dict[str, ActivationStats]
    tied_proto: bytes
    tied_spec: ModelSpec

    def tied(self) -> FdecModel:
        """The imported model before untie/cleanup: lm_head and embedding share one table."""
        model = ir.serde.deserialize_model(onnx.load_from_string(self.tied_proto))
        return FdecModel(model, copy.deepcopy(self.tied_spec))

    def cleaned(self) -> FdecModel:
        model = ir.serde.deserialize_model(onnx.load_from_string(self.proto))
        return FdecModel(model, copy.deepcopy(self.spec))

    def weights(self) -> dict[str, np.ndarray]:
        return matmul_weights(self.cleaned())

    def initializer(self, name: str) -> np.ndarray:
        return self.cleaned().graph.initializers[name].const_value.numpy().copy()


def _export(tiny_models, tmp_path_factory, family: str) -> _Tiny:
    tiny = export_tiny(tiny_models, tmp_path_factory, family)
    model = tiny.cleaned()
    batches = calibration_batches(
        load_calibration_texts(None), tiny.tokenizer, model.spec.vocab_size
    )
    names = sorted(set(matmul_activation_inputs(model).values()))
    stats = collect_activation_stats(model, batches, names)
    return _Tiny(
        tiny.proto, tiny.spec, tiny.reference, batches, stats, tiny.tied_proto, tiny.tied_spec
    )


@pytest.fixture(scope="module")
def llama(tiny_models, tmp_path_factory) -> _Tiny:
    return _export(tiny_models, tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def gpt2(tiny_models, tmp_path_factory) -> _Tiny:
    return _export(tiny_models, tmp_path_factory, "gpt2")


def _ops(model: FdecModel) -> collections.Counter:
    return collections.Counter((node.domain or "", node.op_type) for node in model.graph)


def _assert_within_tolerance(model: FdecModel, reference: Reference, pass_: Pass) -> dict:
    """ORT CPU at "basic" (QDQ graphs run unfused there) against PyTorch on held text."""
    figures = reference.compare(session_for_model(model, optimization="basic"))
    tolerance = pass_.tolerance
    assert figures["max_abs_error"] <= tolerance.max_abs_error, figures
    assert figures["top1_agreement"] >= tolerance.min_top1_agreement, figures
    assert figures["max_abs_error"] > 1e-3  # the weights really changed
    # 8-bit weights and activations of a random model barely move its perplexity.
    ratio = figures["perplexity_build"] / figures["perplexity_source"]
    assert 0.97 < ratio < 1.03, figures
    return figures


def _roles(spec: ModelSpec) -> list[str]:
    return [f"layers.{i}.{r}" for i in range(spec.num_layers) for r in _LAYER_ROLES] + ["lm_head"]


def _weight_dequantizer(model: FdecModel, role: str) -> tuple[ir.Value, ir.Node]:
    weight = model.graph.initializers[model.spec.weights[role]]
    (use,) = weight.uses()
    assert use.node.op_type == "DequantizeLinear" and use.idx == 0
    assert use.node.attributes["axis"].value == 1
    (matmul,) = [u.node for u in use.node.outputs[0].uses()]
    assert matmul.op_type == "MatMul"
    return weight, use.node


def _activation_scale(matmul: ir.Node) -> tuple[float, ir.Node]:
    """The static scale of the QDQ pair feeding a MatMul's activation input."""
    dequantize = matmul.inputs[0].producer()
    assert dequantize.op_type == "DequantizeLinear"
    quantize = dequantize.inputs[0].producer()
    assert quantize.op_type == "QuantizeLinear"
    assert quantize.inputs[1] is dequantize.inputs[1]  # one scale for the pair
    return float(quantize.inputs[1].const_value.numpy()), quantize


# --- quantize-fp8 -----------------------------------------------------------------------------


def test_fp8_writes_qdq_with_float8_weights_and_calibrated_activation_scales(llama):
    before = llama.weights()
    roles = _roles(llama.spec)
    pass_ = QuantizeFp8Pass(stats=llama.stats)

    model, record = run_pass(pass_, llama.cleaned())

    ops = _ops(model)
    assert ops[("", "QuantizeLinear")] == 9  # one per activation: q/k/v and gate/up share
    assert ops[("", "DequantizeLinear")] == 9 + 15
    assert ops[("", "MatMul")] == 19 and ops[("", "Gemm")] == 0
    assert model.spec_problems() == []
    assert model.model.opset_imports[""] >= 19
    for role in roles:
        weight, dequantize = _weight_dequantizer(model, role)
        assert weight.dtype == ir.DataType.FLOAT8E4M3FN
        codes = weight.const_value.numpy().astype(np.float32)
        w = before[role]
        assert codes.shape == w.shape
        scales = dequantize.inputs[1].const_value.numpy()
        peak = np.abs(w).max(axis=0)
        np.testing.assert_allclose(scales, np.where(peak > 0, peak / 448, 1), rtol=1e-7)
        # Each column's largest weight is ±448; every value is FP8's nearest: within half a
        # step (2⁻⁴ relative for normals, 2⁻¹⁰ of the scale for subnormals).
        live = peak > 0
        np.testing.assert_array_equal(np.abs(codes).max(axis=0)[live], 448)
        error = np.abs(codes * scales - w)
        bound = np.maximum(np.abs(w) * 2.0**-4, scales * 2.0**-10) * (1 + 1e-6)
        assert np.all(error <= bound)
        scale, quantize = _activation_scale(next(iter(dequantize.outputs[0].uses())).node)
        name = quantize.inputs[0].name
        assert scale == pytest.approx(llama.stats[name].absmax / 448, rel=1e-6)
        assert quantize.inputs[2].dtype == ir.DataType.FLOAT8E4M3FN
    elements = sum(before[role].size for role in roles)
    columns = sum(before[role].shape[1] for role in roles)
    assert record.stats == {
        "matmuls_quantized": 15,
        "weights_quantized": 15,
        "activations_quantized": 9,
        "skipped": {},
        "bytes_before": 4 * elements,
        "bytes_after": elements + 4 * columns,
        "activation_range": "absmax",
        "activation_margin": 1.0,
        "weight_rounding": "nearest",
        "int8_weight_only": [],
        "weight_only_fp8": False,
        "fp8_weight_only": [],
        "source_grid_kept": 0,
        "weight_only": [],
        "gathers_shared": 0,
        "opset_raised": False,
    }
    _assert_within_tolerance(model, llama.reference, pass_)

    # At "all", onnxruntime 1.32's CPU provider runs this graph too: it fuses no FP8 QDQ (only
    # attention's MatMul + Mul into FusedMatMul), so the logits are those of "basic".
    basic = session_for_model(model, optimization="basic")
    full = session_for_model(model, optimization="all")
    ids = llama.reference.ids
    want, _ = basic.decode(ids, basic.empty_past(1), 0)
    got, _ = full.decode(ids, full.empty_past(1), 0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_fp8_percentile_range_and_calibrating_from_batches(llama):
    pass_ = QuantizeFp8Pass(batches=llama.batches, activation_range="percentile")

    model, record = run_pass(pass_, llama.cleaned())

    assert record.stats["activations_quantized"] == 9
    assert record.options["batches"] == "16 batches, 2048 tokens"
    assert record.options["stats"] is None
    for node in model.graph:
        if node.op_type == "QuantizeLinear":
            stats = llama.stats[node.inputs[0].name]
            assert stats.percentile_99_9 < stats.absmax
            want = stats.percentile_99_9 / 448
            assert float(node.inputs[1].const_value.numpy()) == pytest.approx(want, rel=1e-5)
    _assert_within_tolerance(model, llama.reference, pass_)


def test_fp8_shares_a_tied_table_once(llama):
    """One int8 [H, V] table (ONNX Gather takes no FLOAT8): lm_head DQ and embedding Gather."""
    tied = llama.tied()
    table = tied.graph.initializers[tied.spec.weights["embed"]].const_value.numpy().copy()
    layers = tied.spec.num_layers
    pass_ = QuantizeFp8Pass(batches=llama.batches, share_tied_embedding=True)
    with pytest.raises(UsageError, match="untie"):
        QuantizeFp8Pass(batches=llama.batches).requires(llama.tied())

    model, record = run_pass(pass_, tied)

    stats = record.stats
    assert stats["gathers_shared"] == 1 and stats["weights_quantized"] == 7 * layers + 1
    assert stats["activations_quantized"] == 4 * layers  # not the lm_head's: weight-only
    spec = model.spec
    assert stats["int8_weight_only"] == [spec.weights["lm_head"].removesuffix("_Q8")]
    assert spec.weights["embed"] == spec.weights["lm_head"] and spec.tie_word_embeddings
    shared = model.graph.initializers[spec.weights["lm_head"]]
    assert shared.dtype == ir.DataType.INT8
    codes = shared.const_value.numpy().astype(np.float32)
    assert codes.shape == table.T.shape  # [H, V], stored once
    assert not any(
        v.const_value is not None and v.const_value.size >= table.size and v is not shared
        for v in model.graph.initializers.values()
    )
    fp8 = [v for v in model.graph.initializers.values() if v.dtype == ir.DataType.FLOAT8E4M3FN]
    assert len([v for v in fp8 if len(v.shape) == 2]) == 7 * layers
    readers = {use.node.op_type: use.node for use in shared.uses()}
    assert sorted(readers) == ["DequantizeLinear", "Gather"]
    assert readers["Gather"].attributes["axis"].as_int() == 1
    dequantize = readers["DequantizeLinear"]
    assert dequantize.attributes["axis"].as_int() == 1
    (matmul,) = [use.node for use in dequantize.outputs[0].uses()]
    assert matmul.op_type == "MatMul"
    assert matmul.inputs[0].producer().op_type != "DequantizeLinear"  # float activation
    scales = dequantize.inputs[1].const_value.numpy()  # one per vocabulary row of the table
    peak = np.abs(table).max(axis=1)
    np.testing.assert_allclose(scales, np.where(peak > 0, peak / 127, 1), rtol=1e-6)
    # The rows the embedding gathers are the table within half an int8 step.
    assert np.all(np.abs(codes * scales[None, :] - table.T) <= scales / 2 * (1 + 1e-5) + 1e-8)
    assert model.spec_problems() == []
    _assert_within_tolerance(model, llama.reference, pass_)


def _output_error(before: np.ndarray, codes: np.ndarray, scales: np.ndarray, h: np.ndarray):
    """‖X·W − X·Ŵ‖² from H = XᵀX."""
    delta = codes.astype(np.float64) * scales - before
    return float(np.einsum("kn,kj,jn->", delta, h, delta))


def test_fp8_gptq_rounding_lowers_the_layer_output_error(llama):
    from fdec.passes.gptq import hessians

    before = llama.weights()
    pass_ = QuantizeFp8Pass(batches=llama.batches, weight_rounding="gptq")
    with pytest.raises(UsageError, match="batches"):
        QuantizeFp8Pass(stats=llama.stats, weight_rounding="gptq").requires(llama.cleaned())
    with pytest.raises(UsageError, match="weight_rounding"):
        QuantizeFp8Pass(batches=llama.batches, weight_rounding="best")

    nearest, _ = run_pass(QuantizeFp8Pass(batches=llama.batches), llama.cleaned())
    model, record = run_pass(pass_, llama.cleaned())

    assert record.stats["weight_rounding"] == "gptq" and record.stats["gptq_tokens"] == 2048
    assert record.stats["weights_quantized"] == 15
    activations = matmul_activation_inputs(llama.cleaned())
    grams = hessians(llama.cleaned(), llama.batches, sorted(set(activations.values())))
    totals = {"nearest": 0.0, "gptq": 0.0}
    for role in _roles(llama.spec):
        h = grams[activations[role]]
        for label, built in (("nearest", nearest), ("gptq", model)):
            weight, dequantize = _weight_dequantizer(built, role)
            assert weight.dtype == ir.DataType.FLOAT8E4M3FN
            codes = weight.const_value.numpy().astype(np.float32)
            scales = dequantize.inputs[1].const_value.numpy()
            # same per-channel scales; GPTQ only chooses other FP8 codes on that grid
            peak = np.abs(before[role]).max(axis=0)
            np.testing.assert_allclose(scales, np.where(peak > 0, peak / 448, 1), rtol=1e-6)
            assert np.all(np.abs(codes) <= 448)
            totals[label] += _output_error(before[role], codes, scales, h)
    assert totals["gptq"] < 0.8 * totals["nearest"], totals
    _assert_within_tolerance(model, llama.reference, pass_)


def test_fp8_is_refused_for_targets_without_fp8():
    with pytest.raises(InputError) as caught:
        QuantizeFp8Pass().check_target(load_target("a100"))
    assert caught.value.problem == "FP8 needs compute capability ≥ 8.9; a100 is 8.0"
    assert caught.value.fix == "use int8 or int4"
    with pytest.raises(UsageError) as caught:
        QuantizeFp8Pass().check_target(load_target("cpu"))
    assert caught.value.problem == "quantize-fp8 writes static QDQ for GPU engines; cpu is a CPU"
    assert "quantize-int8" in caught.value.fix
    for name in ("h100", "l4", "rtx4090"):
        QuantizeFp8Pass().check_target(load_target(name))


def test_int8_static_is_refused_for_the_cpu_with_the_dynamic_pass_as_fix():
    with pytest.raises(UsageError) as caught:
        QuantizeInt8StaticPass().check_target(load_target("cpu"))
    assert "cpu is a CPU" in caught.value.problem
    assert caught.value.fix.startswith("use quantize-int8 (dynamic int8")
    for name in ("t4", "a100", "h100"):
        QuantizeInt8StaticPass().check_target(load_target(name))


def test_options_are_checked_keyword_only_and_reported_as_counts(llama):
    with pytest.raises(UsageError, match="needs calibration data") as caught:
        QuantizeFp8Pass().requires(llama.cleaned())
    assert "calibration_batches" in caught.value.fix
    with pytest.raises(UsageError, match="untie-embeddings"):
        tied = llama.cleaned()
        tied.spec.tie_word_embeddings = True
        QuantizeInt8StaticPass(stats=llama.stats).requires(tied)
    QuantizeInt8StaticPass(stats=llama.stats).requires(llama.cleaned())
    with pytest.raises(UsageError, match="activation_range 'minmax'"):
        QuantizeFp8Pass(activation_range="minmax")
    for alpha in (-0.1, 1.5, True, "0.5", float("nan")):
        with pytest.raises(UsageError, match="alpha"):
            QuantizeInt8StaticPass(alpha=alpha)
    with pytest.raises(UsageError, match="batches"):
        QuantizeInt8StaticPass(batches=[np.zeros(4, dtype=np.int64)])
    with pytest.raises(TypeError):
        QuantizeInt8StaticPass(0.5)
    assert QuantizeInt8StaticPass(stats=llama.stats).options() == {
        "include_lm_head": True,
        "share_tied_embedding": False,
        "alpha": 0.5,
        "weight_only": (),
        "weight_only_layers": (),
        "alpha_search": (),
        "clip_search": (),
        "search_rows": 512,
        "stats": "9 tensors",
        "batches": None,
    }
    assert QuantizeFp8Pass(batches=llama.batches[:2]).options() == {
        "include_lm_head": True,
        "share_tied_embedding": False,
        "activation_range": "absmax",
        "activation_margin": 1.0,
        "weight_rounding": "nearest",
        "gptq_damping": 0.01,
        "gptq_act_order": False,
        "weight_only_fp8": False,
        "weight_only": (),
        "weight_only_layers": (),
        "stats": None,
        "batches": "2 batches, 256 tokens",
    }


def test_missing_statistics_skip_weights_with_a_reason(llama):
    name = matmul_activation_inputs(llama.cleaned(), ["layers.0.q"])["layers.0.q"]
    partial = {k: v for k, v in llama.stats.items() if k != name}

    model, record = run_pass(QuantizeFp8Pass(stats=partial), llama.cleaned())

    assert record.stats["skipped"] == {"no calibration statistics for its activation": 3}
    assert record.stats["weights_quantized"] == 12
    q = model.graph.initializers[model.spec.weights["layers.0.q"]]
    assert q.dtype == ir.DataType.FLOAT
    again = QuantizeFp8Pass(stats=llama.stats)(model)
    assert again.stats["weights_quantized"] == 3  # the rest are FP8 now: not float weights
    assert again.stats["skipped"] == {"not a float weight": 12}


def test_statistics_of_another_graph_are_refused(llama):
    """Stats keyed by names this graph lacks (calibrated before a renaming pass) fail loudly."""
    renamed = {f"old/{name}": stats for name, stats in llama.stats.items()}
    pass_ = QuantizeInt8StaticPass(stats=renamed)
    assert not pass_.needs_calibration and QuantizeInt8StaticPass().needs_calibration

    with pytest.raises(CompileError, match="none of the 9 activations") as caught:
        pass_(llama.cleaned())
    assert "batches=" in caught.value.fix


# --- quantize-int8-static (SmoothQuant) -------------------------------------------------------


def _smoothing(stats: ActivationStats, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """SmoothQuant's s_j = max|X_j|^α / max|W_j|^(1-α), computed independently of the pass."""
    x = stats.channel_absmax.astype(np.float64)
    w = np.max([np.abs(a).max(axis=1) for a in weights], axis=0).astype(np.float64)
    return (x**alpha / w ** (1 - alpha)).astype(np.float32)


def test_int8_smoothquant_folds_into_the_rmsnorm_weights(llama):
    before = llama.weights()
    spec = llama.spec
    pass_ = QuantizeInt8StaticPass(stats=llama.stats)
    activations = matmul_activation_inputs(llama.cleaned())

    model, record = run_pass(pass_, llama.cleaned())

    stats = record.stats
    assert stats["smoothing_folded"] == 2 * spec.num_layers  # input and post-attention norms
    assert stats["smoothing_inserted"] == 2 * spec.num_layers + 1  # o, down; the lm_head
    assert (stats["matmuls_quantized"], stats["activations_quantized"]) == (15, 9)
    assert stats["skipped"] == {} and stats["alpha"] == 0.5
    assert model.spec_problems() == []
    ops = _ops(model)
    assert ops[("", "QuantizeLinear")] == 9 and ops[("", "DequantizeLinear")] == 24
    assert sum(n.op_type == "Mul" and n.name.endswith("_SmoothQuant") for n in model.graph) == 5

    groups = {
        "input_layernorm": ("q", "k", "v"),
        "post_attention_layernorm": ("gate", "up"),
    }
    for layer in range(spec.num_layers):
        for norm, members in groups.items():
            name = f"model.layers.{layer}.{norm}.weight"
            roles = [f"layers.{layer}.{m}" for m in members]
            x_stats = llama.stats[activations[roles[0]]]
            s = _smoothing(x_stats, [before[r] for r in roles], 0.5)
            assert s.max() / s.min() > 1.2  # per channel, not one factor for all
            old = llama.initializer(name)
            new = model.graph.initializers[name].const_value.numpy()
            np.testing.assert_allclose(new, old / s, rtol=1e-6)
            for role in roles:
                weight, dequantize = _weight_dequantizer(model, role)
                codes = weight.const_value.numpy()
                assert weight.dtype == ir.DataType.INT8 and codes.shape == before[role].shape
                scales = dequantize.inputs[1].const_value.numpy()
                smoothed = before[role] * s[:, None]
                np.testing.assert_allclose(scales, np.abs(smoothed).max(axis=0) / 127, rtol=1e-6)
                np.testing.assert_array_equal(np.abs(codes.astype(int)).max(axis=0), 127)
                error = np.abs(codes * scales - smoothed)
                assert np.all(error <= scales / 2 * (1 + 1e-5))
                matmul = next(iter(dequantize.outputs[0].uses())).node
                scale, quantize = _activation_scale(matmul)
                # The activation scale is the exact absmax of X / s over the calibration.
                want = float(np.max(x_stats.channel_absmax / s)) / 127
                assert scale == pytest.approx(want, rel=1e-6)
                assert quantize.inputs[0].name == activations[roles[0]]  # folded: no Mul
                assert quantize.inputs[2].dtype == ir.DataType.INT8
    _assert_within_tolerance(model, llama.reference, pass_)


def test_smoothing_keeps_the_float_product_unchanged(llama):
    """X·W = (X/s)·(s·W) on real activations, before any quantization."""
    model = llama.cleaned()
    weights = llama.weights()
    activations = matmul_activation_inputs(model)
    names = [activations["layers.0.q"], activations["layers.1.down"]]
    captured = capture_activations(model, llama.batches[5], names)
    pass_ = QuantizeInt8StaticPass(alpha=0.5)
    for name, roles in zip(names, (["layers.0.q", "layers.0.k", "layers.0.v"], ["layers.1.down"])):
        x = captured[name][0].astype(np.float64)  # [seq, K]
        s = pass_.smoothing_factors([weights[r] for r in roles], llama.stats[name].channel_absmax)
        np.testing.assert_allclose(
            s, _smoothing(llama.stats[name], [weights[r] for r in roles], 0.5)
        )
        smoothed_x = x / s
        # Smoothing evens the activation's channels out: the ratio of its largest channel
        # range to its median drops.
        spread = lambda a: np.abs(a).max(0).max() / np.median(np.abs(a).max(0))  # noqa: E731
        assert spread(smoothed_x) < spread(x)
        for role in roles:
            w = weights[role].astype(np.float64)
            want = x @ w
            got = smoothed_x @ (w * s[:, None].astype(np.float64))
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())


@pytest.mark.parametrize("alpha", [0.0, None], ids=["alpha0", "no-smoothing"])
def test_int8_static_other_alphas_verify(llama, alpha):
    before = llama.weights()
    pass_ = QuantizeInt8StaticPass(stats=llama.stats, alpha=alpha)

    model, record = run_pass(pass_, llama.cleaned())

    assert record.stats["matmuls_quantized"] == 15
    folded, inserted = (4, 5) if alpha is not None else (0, 0)
    assert (record.stats["smoothing_folded"], record.stats["smoothing_inserted"]) == (
        folded,
        inserted,
    )
    norm = "model.layers.0.input_layernorm.weight"
    changed = not np.array_equal(
        model.graph.initializers[norm].const_value.numpy(), llama.initializer(norm)
    )
    assert changed is (alpha is not None)
    if alpha == 0.0:  # s = 1 / max|W_j|: every smoothed weight row has absmax 1
        weight, dequantize = _weight_dequantizer(model, "layers.0.o")
        codes = weight.const_value.numpy().astype(np.float32)
        rows = np.abs(codes * dequantize.inputs[1].const_value.numpy()).max(axis=1)
        np.testing.assert_allclose(rows, 1.0, atol=0.01)
        assert np.all(np.abs(before["layers.0.o"]).max(axis=1) < 0.5)  # not so before
    _assert_within_tolerance(model, llama.reference, pass_)


def test_int8_static_from_batches_equals_from_stats(llama):
    from_stats, _ = run_pass(QuantizeInt8StaticPass(stats=llama.stats), llama.cleaned())
    from_batches, record = run_pass(QuantizeInt8StaticPass(batches=llama.batches), llama.cleaned())

    assert record.stats["smoothing_folded"] == 4
    for role in _roles(llama.spec):
        a = from_stats.graph.initializers[from_stats.spec.weights[role]].const_value.numpy()
        b = from_batches.graph.initializers[from_batches.spec.weights[role]].const_value.numpy()
        np.testing.assert_array_equal(a, b)


def test_int8_static_folds_into_gpt2_layernorm_scale_and_bias(gpt2):
    before = gpt2.weights()
    pass_ = QuantizeInt8StaticPass(stats=gpt2.stats)
    activations = matmul_activation_inputs(gpt2.cleaned())

    model, record = run_pass(pass_, gpt2.cleaned())

    # ln_1 → Reshape → qkv Gemm and ln_2 → Reshape → fc_in Gemm fold; o, fc_out, lm_head don't.
    assert (record.stats["smoothing_folded"], record.stats["smoothing_inserted"]) == (4, 5)
    assert record.stats["matmuls_quantized"] == 9
    assert _ops(model)[("", "Gemm")] == 0
    assert model.spec_problems() == []
    s = _smoothing(gpt2.stats[activations["layers.1.qkv"]], [before["layers.1.qkv"]], 0.5)
    for part in ("weight", "bias"):
        name = f"transformer.h.1.ln_1.{part}"
        new = model.graph.initializers[name].const_value.numpy()
        np.testing.assert_allclose(new, gpt2.initializer(name) / s, rtol=1e-6)
    _assert_within_tolerance(model, gpt2.reference, pass_)


# --- small graphs: where smoothing folds, where it is inserted --------------------------------

_SMALL = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[3, 8] x) => (float[3, 4] y, float[3, 4] z, float[3, 4] r, float[3, 8] t, float[3, 4] u) {
    n = Mul (x, g1)
    y = MatMul (n, w1)
    z = MatMul (n, w2)
    m = Mul (g2, x)
    r = MatMul (m, w3)
    t = Mul (x, g2)
    u = MatMul (x, w4)
}
"""


def _small() -> tuple[FdecModel, dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    arrays = {
        "g1": rng.uniform(0.5, 2.0, 8).astype(np.float32),
        "g2": rng.uniform(0.5, 2.0, 8).astype(np.float32),
        **{f"w{i}": rng.standard_normal((8, 4)).astype(np.float32) for i in range(1, 5)},
    }
    spec = tiny_spec(
        hidden_size=8,
        weights={
            "layers.0.q": "w1",
            "layers.0.k": "w2",
            "layers.0.gate": "w3",
            "layers.0.down": "w4",
        },
        outputs=["y", "z", "r", "t", "u"],
    )
    x = rng.standard_normal((3, 8)).astype(np.float32) * np.array([1, 1, 9, 1, 1, 1, 1, 0.1])
    feeds = {"x": x.astype(np.float32)}
    return FdecModel(ir_model(_SMALL, arrays), spec), arrays, feeds


def test_smoothing_folds_into_a_private_copy_or_inserts_a_mul():
    model, arrays, feeds = _small()
    x = feeds["x"]
    stats = {
        "n": ActivationStats.of(x * arrays["g1"]),
        "m": ActivationStats.of(x * arrays["g2"]),
        "x": ActivationStats.of(x),
    }
    before = run_ort(model.model, feeds)

    model, record = run_pass(QuantizeInt8StaticPass(stats=stats), model)

    assert (record.stats["smoothing_folded"], record.stats["smoothing_inserted"]) == (2, 1)
    assert record.stats["opset_raised"] is False  # 18 ≥ 13: per-axis DequantizeLinear
    graph = model.graph
    # g1 feeds only the smoothed matmuls: changed in place. g2 is read by t's Mul too: the
    # Mul feeding r got its own smoothed copy, g2 and t stay as they were.
    s1 = _smoothing(stats["n"], [arrays["w1"], arrays["w2"]], 0.5)
    np.testing.assert_allclose(
        graph.initializers["g1"].const_value.numpy(), arrays["g1"] / s1, rtol=1e-6
    )
    np.testing.assert_array_equal(graph.initializers["g2"].const_value.numpy(), arrays["g2"])
    (copy_of_g2,) = [name for name in graph.initializers if name.startswith("g2_smoothed")]
    s3 = _smoothing(stats["m"], [arrays["w3"]], 0.5)
    np.testing.assert_allclose(
        graph.initializers[copy_of_g2].const_value.numpy(), arrays["g2"] / s3, rtol=1e-6
    )
    # x is a graph input (and read by t's Mul): an explicit Mul by 1/s, placed first.
    (inserted,) = [n for n in graph if n.name.endswith("_SmoothQuant")]
    assert inserted.inputs[0].name == "x"
    s4 = _smoothing(stats["x"], [arrays["w4"]], 0.5)
    np.testing.assert_allclose(inserted.inputs[1].const_value.numpy(), 1 / s4, rtol=1e-6)
    after = run_ort(model.model, feeds)
    np.testing.assert_array_equal(after[3], before[3])  # t: untouched
    for i in (0, 1, 2, 4):
        want = before[i]
        assert np.abs(after[i] - want).max() < 0.05 * np.abs(want).max()


def test_fp8_raises_the_opset_to_19():
    model, arrays, feeds = _small()
    stats = {"n": ActivationStats.of(feeds["x"] * arrays["g1"])}
    before = run_ort(model.model, feeds)

    model, record = run_pass(QuantizeFp8Pass(stats=stats), model)

    assert record.stats["opset_raised"] is True
    assert model.model.opset_imports[""] == 19
    assert record.stats["weights_quantized"] == 2
    assert record.stats["skipped"] == {"no calibration statistics for its activation": 2}
    codes = model.graph.initializers[model.spec.weights["layers.0.q"]].const_value.numpy()
    assert codes.dtype == ml_dtypes.float8_e4m3fn
    after = run_ort(model.model, feeds)
    for i in (0, 1):
        assert np.abs(after[i] - before[i]).max() < 0.1 * np.abs(before[i]).max()
    np.testing.assert_array_equal(after[2], before[2])  # r: not calibrated, left in fp32


@pytest.mark.parametrize("pass_class", [QuantizeFp8Pass, QuantizeInt8StaticPass])
def test_weight_only_layers_keep_a_float_activation(llama, pass_class):
    """`weight_only=("down",)`: every down_proj is W8A16 (int8 weights per output channel,
    DequantizeLinear → MatMul on the float activation, no Q/DQ on it); the rest stays W8A8."""
    pass_ = pass_class(batches=llama.batches, weight_only=("down",))
    model, record = run_pass(pass_, llama.cleaned())
    downs = [f"layers.{i}.down" for i in range(llama.spec.num_layers)]
    assert sorted(record.stats["weight_only"]) == sorted(llama.spec.weights[r] for r in downs)
    for role in _roles(llama.spec):
        weight, dequantize = _weight_dequantizer(model, role)
        (matmul,) = [u.node for u in dequantize.outputs[0].uses()]
        producer = matmul.inputs[0].producer()
        if role.endswith(".down"):
            assert weight.dtype == ir.DataType.INT8
            assert producer is None or producer.op_type != "DequantizeLinear"
        else:
            _activation_scale(matmul)  # a static Q/DQ pair feeds it
    # q/k/v (one shared activation), o and gate/up of each layer, and the lm_head
    assert record.stats["activations_quantized"] == 3 * llama.spec.num_layers + 1
    _assert_within_tolerance(model, llama.reference, pass_)


def test_alpha_search_picks_per_activation_alphas_from_the_grid(llama):
    """alpha_search: each smoothed activation gets the α of the grid with the smallest output
    error on its calibration rows, never worse than the default α's."""
    grid = (0.3, 0.5, 0.8)
    pass_ = QuantizeInt8StaticPass(batches=llama.batches, alpha=0.5, alpha_search=grid)
    model, record = run_pass(pass_, llama.cleaned())
    searched = record.stats["searched"]
    assert len(searched) == record.stats["activations_quantized"]
    assert {alpha for alpha, _, _ in searched.values()} <= set(grid)
    assert all(clip == 1.0 and 0 <= error < 0.05 for _, clip, error in searched.values())
    _assert_within_tolerance(model, llama.reference, pass_)


def test_search_alpha_never_loses_to_the_default():
    from fdec.passes.smoothquant import search_alpha

    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 64)).astype(np.float32)
    x[:, 3] *= 40  # an outlier channel, as LLM activations have
    w = rng.standard_normal((64, 32)).astype(np.float32) * 0.05
    absmax = np.abs(x).max(axis=0)
    for activation in ("static", "dynamic"):
        found = search_alpha(
            x, [w], absmax, alphas=(0.0, 0.5, 0.9), default=0.5, activation=activation,
            clips=(1.0, 0.8),
        )  # fmt: skip
        assert found.error <= found.error_at_default
        assert found.alpha in (0.0, 0.5, 0.9) and found.clip in (1.0, 0.8)
        assert found.error < 0.01


def _assert_wide_roles(llama, model, record, wide):
    """Exactly the roles in `wide` are W8A16 (int8 weights, a float activation); every other
    layer keeps its static Q/DQ activation."""
    assert sorted(record.stats["weight_only"]) == sorted(llama.spec.weights[r] for r in wide)
    for role in _roles(llama.spec):
        weight, dequantize = _weight_dequantizer(model, role)
        (matmul,) = [u.node for u in dequantize.outputs[0].uses()]
        producer = matmul.inputs[0].producer()
        if role in wide:
            assert weight.dtype == ir.DataType.INT8
            assert producer is None or producer.op_type != "DequantizeLinear"
        else:
            _activation_scale(matmul)


@pytest.mark.parametrize("pass_class", [QuantizeFp8Pass, QuantizeInt8StaticPass])
def test_weight_only_takes_kinds_and_single_layers(llama, pass_class):
    """`weight_only` entries name a kind ("o": every o_proj) or one layer's role
    ("layers.0.q"): a group (q/k/v share their activation) stays W8A16 only when every weight
    in it is named; every other layer keeps its static Q/DQ activation."""
    layer0 = ("layers.0.q", "layers.0.k", "layers.0.v")
    pass_ = pass_class(batches=llama.batches, weight_only=("o", "down", *layer0, "layers.1.q"))
    model, record = run_pass(pass_, llama.cleaned())
    wide = {f"layers.{i}.{kind}" for i in range(llama.spec.num_layers) for kind in ("o", "down")}
    wide |= set(layer0)
    # layers.1.q alone: its k and v share the activation, so that group stays W8A8
    _assert_wide_roles(llama, model, record, wide)
    # per layer: q/k/v and gate/up, minus layer 0's q/k/v; and the lm_head
    assert record.stats["activations_quantized"] == 2 * llama.spec.num_layers - 1 + 1
    _assert_within_tolerance(model, llama.reference, pass_)


def test_fp8_gptq_act_order_keeps_the_grid_and_the_error_low(llama):
    """gptq_act_order rounds input channels by descending XᵀX diagonal: same per-channel
    scales, other FP8 codes, and the layers' output error still well below nearest rounding."""
    from fdec.passes.gptq import hessians

    before = llama.weights()
    nearest, _ = run_pass(QuantizeFp8Pass(batches=llama.batches), llama.cleaned())
    plain, _ = run_pass(
        QuantizeFp8Pass(batches=llama.batches, weight_rounding="gptq"), llama.cleaned()
    )
    pass_ = QuantizeFp8Pass(batches=llama.batches, weight_rounding="gptq", gptq_act_order=True)
    model, record = run_pass(pass_, llama.cleaned())
    assert record.options["gptq_act_order"] is True
    activations = matmul_activation_inputs(llama.cleaned())
    grams = hessians(llama.cleaned(), llama.batches, sorted(set(activations.values())))
    totals = {"nearest": 0.0, "ordered": 0.0}
    changed = 0
    for role in _roles(llama.spec):
        h = grams[activations[role]]
        weight, dequantize = _weight_dequantizer(model, role)
        codes = weight.const_value.numpy().astype(np.float32)
        scales = dequantize.inputs[1].const_value.numpy()
        peak = np.abs(before[role]).max(axis=0)
        np.testing.assert_allclose(scales, np.where(peak > 0, peak / 448, 1), rtol=1e-6)
        plain_codes = _weight_dequantizer(plain, role)[0].const_value.numpy().astype(np.float32)
        changed += int(not np.array_equal(codes, plain_codes))
        totals["ordered"] += _output_error(before[role], codes, scales, h)
        near, near_dq = _weight_dequantizer(nearest, role)
        near_codes = near.const_value.numpy().astype(np.float32)
        totals["nearest"] += _output_error(before[role], near_codes, near_dq.inputs[1]
                                           .const_value.numpy(), h)  # fmt: skip
    assert changed > 0  # another order gives other codes
    assert totals["ordered"] < 0.8 * totals["nearest"], totals
    _assert_within_tolerance(model, llama.reference, pass_)


def test_fp8_activation_margin_widens_every_scale(llama):
    """activation_margin=2: each activation's FP8 scale covers twice its calibrated absmax, so
    a value up to 2× beyond calibration passes QuantizeLinear unclipped; below 1 is refused."""
    with pytest.raises(UsageError, match="activation_margin"):
        QuantizeFp8Pass(stats=llama.stats, activation_margin=0.5)
    pass_ = QuantizeFp8Pass(stats=llama.stats, activation_margin=2.0)
    model, record = run_pass(pass_, llama.cleaned())
    assert record.stats["activation_margin"] == 2.0
    scales = {}
    for node in model.graph:
        if node.op_type == "QuantizeLinear":
            scale = float(node.inputs[1].const_value.numpy())
            scales[node.inputs[0].name] = scale
            absmax = llama.stats[node.inputs[0].name].absmax
            assert scale == pytest.approx(2 * absmax / 448, rel=1e-6)
    assert len(scales) == 9
    name, scale = next(iter(scales.items()))
    beyond = np.array([1.9 * llama.stats[name].absmax], dtype=np.float32)
    code = (beyond / np.float32(scale)).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert abs(code[0] * scale - beyond[0]) <= beyond[0] / 16  # a relative FP8 step, no clip
    _assert_within_tolerance(model, llama.reference, pass_)


@pytest.mark.parametrize("pass_class", [QuantizeFp8Pass, QuantizeInt8StaticPass])
def test_weight_only_layers_widen_whole_layers_of_deep_enough_models(
    llama, pass_class, monkeypatch
):
    """weight_only_layers=(-1,): every linear layer of the last decoder layer W8A16, the
    others W8A8; on a model shallower than layers_per_wide_layer per index, nothing widens."""
    with pytest.raises(UsageError, match="weight_only_layers"):
        pass_class(stats=llama.stats, weight_only_layers=("last",))
    _, shallow = run_pass(pass_class(stats=llama.stats, weight_only_layers=(-1,)), llama.cleaned())
    assert shallow.stats["weight_only"] == []  # 2 layers < 4 per index: all W8A8
    monkeypatch.setattr(pass_class, "layers_per_wide_layer", 1)
    pass_ = pass_class(stats=llama.stats, weight_only=("lm_head",), weight_only_layers=(-1,))
    model, record = run_pass(pass_, llama.cleaned())
    last = llama.spec.num_layers - 1
    wide = {f"layers.{last}.{kind}" for kind in _LAYER_ROLES} | {"lm_head"}
    _assert_wide_roles(llama, model, record, wide)
    assert record.stats["activations_quantized"] == 4 * (llama.spec.num_layers - 1)
    _assert_within_tolerance(model, llama.reference, pass_)


def test_gptq_factor_is_numpys_inverse_cholesky_in_place():
    """`inverse_factor` (LAPACK potrf/potri/potrf in one buffer) gives the upper Cholesky factor
    of the damped H⁻¹ that numpy's inv + cholesky give, with a dead channel set aside, and with
    `overwrite` it works in the hessian's own memory (an 8B down_proj's XᵀX is 1.6 GB)."""
    from fdec.passes.gptq import inverse_factor

    x = np.random.default_rng(0).standard_normal((600, 96))
    x[:, 9] = 0.0
    hessian = x.T @ x
    h = hessian.copy()
    h[9, 9] = 1.0
    h[np.diag_indices(96)] += 0.01 * np.mean(np.diag(h))
    want = np.linalg.cholesky(np.linalg.inv(h)).T
    upper, dead = inverse_factor(hessian, 0.01)
    np.testing.assert_allclose(upper, want, rtol=0, atol=1e-12)
    assert np.flatnonzero(dead).tolist() == [9] and not np.tril(upper, -1).any()
    owned = hessian.copy()
    upper, _ = inverse_factor(owned, 0.01, overwrite=True)
    assert np.shares_memory(upper, owned)
    np.testing.assert_allclose(upper, want, rtol=0, atol=1e-12)
    assert inverse_factor(-np.eye(4) - 1.0, 0.0) is None  # not positive definite: no factor
