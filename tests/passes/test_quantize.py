"""Tests of the quantization passes on tiny exported models (llama, gpt2) and small graphs.

The tiny models are exported once per module, untied and cleaned; each test quantizes a fresh
copy, checks the structure it left (op types, initializers, the ModelSpec, stats), unpacks the
quantized weights with numpy following the operator specs, and runs the result with ONNX
Runtime against the PyTorch reference within the pass's declared tolerance.
"""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np
import onnx
import onnx.numpy_helper
import onnx_ir as ir
import pytest
from exported import dump, export_tiny, load, matmul_weights, op_counts, run_pass
from graphs import ir_model, run_ort, tiny_spec

import fdec.passes.quantize_int8 as quantize_int8
from fdec.errors import UsageError
from fdec.ir import FdecModel, ModelSpec
from fdec.passes.quantize import QuantizeInt4Pass, QuantizeInt8Pass
from fdec.pipeline import Pass
from fdec.runtime import session_for_model
from fdec.verify import Reference

_MS = "com.microsoft"
_LAYER_ROLES = ("q", "k", "v", "o", "gate", "up", "down")
_GPT2_ROLES = ("qkv", "o", "fc_in", "fc_out")


@dataclasses.dataclass
class _Tiny:
    """A tiny exported model: as imported (tied), and untied + cleaned, plus its reference."""

    tied_proto: bytes
    tied_spec: ModelSpec
    proto: bytes
    spec: ModelSpec
    reference: Reference

    def tied(self) -> FdecModel:
        return load(self.tied_proto, self.tied_spec)

    def cleaned(self) -> FdecModel:
        return load(self.proto, self.spec)

    def weights(self) -> dict[str, np.ndarray]:
        return matmul_weights(self.cleaned())


def _export(tiny_models, tmp_path_factory, family: str) -> _Tiny:
    tiny = export_tiny(tiny_models, tmp_path_factory, family)
    return _Tiny(tiny.tied_proto, tiny.tied_spec, tiny.proto, tiny.spec, tiny.reference)


@pytest.fixture(scope="module")
def llama(tiny_models, tmp_path_factory) -> _Tiny:
    return _export(tiny_models, tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def gpt2(tiny_models, tmp_path_factory) -> _Tiny:
    return _export(tiny_models, tmp_path_factory, "gpt2")


def _assert_within_tolerance(model: FdecModel, reference: Reference, pass_: Pass) -> dict:
    figures = reference.compare(session_for_model(model))
    tolerance = pass_.tolerance
    assert figures["max_abs_error"] <= tolerance.max_abs_error, figures
    assert figures["top1_agreement"] >= tolerance.min_top1_agreement, figures
    assert figures["max_abs_error"] > 1e-3  # the weights really changed
    # Weight-only rounding of a random model barely moves its perplexity.
    ratio = figures["perplexity_build"] / figures["perplexity_source"]
    assert 0.95 < ratio < 1.05, figures
    return figures


def _quantized_roles(spec: ModelSpec, layer_roles: tuple[str, ...]) -> list[str]:
    layers = [f"layers.{i}.{role}" for i in range(spec.num_layers) for role in layer_roles]
    return [*layers, "lm_head"]


# --- numpy references of the packed formats ---------------------------------------------------


def _unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    """Low nibble first, along the last axis; keep `count` values."""
    values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    return values[..., :count].astype(np.int32)


def _blocks(w_kn: np.ndarray, block: int) -> np.ndarray:
    """[K, N] → [N, k_blocks, block], zero-padded along K."""
    k, n = w_kn.shape
    k_blocks = -(-k // block)
    padded = np.zeros((k_blocks * block, n), dtype=np.float64)
    padded[:k] = w_kn
    return padded.T.reshape(n, k_blocks, block)


def _check_rtn(
    w_kn: np.ndarray,
    codes: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray,
    block: int,
    symmetric: bool,
) -> None:
    """codes [N, K] (0..15), scales and zero points [N, k_blocks] are W's 4-bit RTN.

    Symmetric: the scale is (value of largest magnitude, sign kept) / -8, zero point 8.
    Asymmetric: the range includes zero, scale (max - min) / 15, zero point round(-min/scale).
    An all-zero block (the pad token's lm_head column) gets scale 0 (asymmetric: zero point 0).
    Every dequantized value is the RTN of the original: within half a step, except values
    clipped at the edge of the range (symmetric leaves +8·|scale| out), within one step.
    """
    k = w_kn.shape[0]
    blocks = _blocks(w_kn, block)
    empty = np.all(blocks == 0, axis=-1)  # [N, k_blocks]
    with np.errstate(divide="ignore", invalid="ignore"):
        if symmetric:
            index = np.abs(blocks).argmax(axis=-1)[..., None]
            want_scales = np.take_along_axis(blocks, index, axis=-1)[..., 0] / -8
            want_zero = np.full(empty.shape, 8)
        else:
            low, high = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
            want_scales = (high - low) / 15
            want_zero = np.where(empty, 0, np.clip(np.rint(-low / want_scales), 0, 15))
    np.testing.assert_array_equal(zero_points, want_zero)
    np.testing.assert_allclose(scales, want_scales, rtol=1e-6)
    step = np.repeat(scales, block, axis=1)[:, :k].astype(np.float64)  # [N, K]
    zero = np.repeat(zero_points, block, axis=1)[:, :k]
    dequantized = (codes - zero) * step
    original = w_kn.T.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        unclipped = np.where(step != 0, np.rint(original / step), 0) + zero
    np.testing.assert_array_equal(codes, np.clip(unclipped, 0, 15))
    error = np.abs(dequantized - original)
    clipped = (unclipped < 0) | (unclipped > 15)
    assert np.all(error[~clipped] <= np.abs(step[~clipped]) / 2 * (1 + 1e-5))
    assert np.all(error <= np.abs(step) * (1 + 1e-5))
    assert empty.sum() < empty.size / 2  # the check saw real blocks


def _check_nbits_weights(
    model: FdecModel, before: dict[str, np.ndarray], *, block: int, symmetric: bool
) -> int:
    """Unpack every MatMulNBits weight and check it against the original; returns bytes."""
    total = 0
    for node in model.graph:
        if node.op_type != "MatMulNBits":
            continue
        b, scales = node.inputs[1], node.inputs[2]
        zero_points = node.inputs[3] if len(node.inputs) > 3 else None
        (role,) = model.spec.roles_of(b.name)
        w = before[role]
        k, n = w.shape
        k_blocks = -(-k // block)
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        assert attributes["K"] == k and attributes["N"] == n
        assert attributes["bits"] == 4 and attributes["block_size"] == block
        packed = b.const_value.numpy()
        assert packed.dtype == np.uint8 and packed.shape == (n, k_blocks, block // 2)
        scale_array = scales.const_value.numpy()
        assert scale_array.dtype == np.float32 and scale_array.shape == (n, k_blocks)
        if symmetric:
            assert zero_points is None
            zero = np.full((n, k_blocks), 8)
        else:
            zp = zero_points.const_value.numpy()
            assert zp.dtype == np.uint8 and zp.shape == (n, -(-k_blocks // 2))
            zero = _unpack_nibbles(zp, k_blocks)
            total += zp.nbytes
        codes = _unpack_nibbles(packed.reshape(n, -1), k_blocks * block)  # [N, k_blocks·block]
        _check_rtn(w, codes[:, :k], scale_array, zero, block, symmetric)
        total += packed.nbytes + scale_array.nbytes
    return total


def _expected_int4_bytes(
    before: dict[str, np.ndarray], roles: list[str], block: int, symmetric: bool
) -> int:
    total = 0
    for role in roles:
        k, n = before[role].shape
        k_blocks = math.ceil(k / block)
        total += n * k_blocks * (block // 2 + 4)  # packed codes + float32 scales
        if not symmetric:
            total += n * math.ceil(k_blocks / 2)  # zero points, two per byte
    return total


# --- quantize-int4 on llama -------------------------------------------------------------------


def test_int4_turns_every_llama_linear_layer_and_the_lm_head_into_matmulnbits(llama):
    before = llama.weights()
    roles = _quantized_roles(llama.spec, _LAYER_ROLES)
    assert len(roles) == 15
    old_names = {llama.spec.weights[role] for role in roles}
    pass_ = QuantizeInt4Pass()

    model, record = run_pass(pass_, llama.cleaned())

    ops = op_counts(model)
    assert ops[(_MS, "MatMulNBits")] == 15
    assert ops[("", "MatMul")] == 4  # attention scores and context: no weights
    assert not old_names & set(model.graph.initializers)  # no fp32 copies left
    assert model.spec_problems() == []
    for role in roles:
        value = model.graph.initializers[model.spec.weights[role]]
        assert value.dtype == ir.DataType.UINT8
        assert [use.node.op_type for use in value.uses()] == ["MatMulNBits"]
    assert model.spec.weights["embed"] == llama.spec.weights["embed"]  # Gather stays fp32
    assert model.model.opset_imports[_MS] == 1
    bytes_before = sum(before[role].nbytes for role in roles)
    bytes_after = _expected_int4_bytes(before, roles, 32, True)
    # 94,208 weights: 4 bytes each before; per block of 32, 16 bytes of codes + a scale after.
    assert (bytes_before, bytes_after) == (376_832, 58_880)
    assert record.stats == {
        "matmuls_quantized": 15,
        "weights_quantized": 15,
        "skipped": {},
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
    }
    assert record.before.bytes - record.after.bytes == bytes_before - bytes_after
    assert _check_nbits_weights(model, before, block=32, symmetric=True) == bytes_after
    _assert_within_tolerance(model, llama.reference, pass_)

    again = QuantizeInt4Pass()(model)
    assert again.modified is False
    assert again.stats["skipped"] == {"not a float weight": 15}


@pytest.mark.parametrize(
    "block, symmetric", [(64, True), (32, False), (128, True)], ids=["b64", "asym", "b128-padded"]
)
def test_int4_variants_pack_correctly_and_verify(llama, block, symmetric):
    before = llama.weights()
    roles = _quantized_roles(llama.spec, _LAYER_ROLES)
    pass_ = QuantizeInt4Pass(block_size=block, symmetric=symmetric)

    model, record = run_pass(pass_, llama.cleaned())

    assert op_counts(model)[(_MS, "MatMulNBits")] == 15
    expected = _expected_int4_bytes(before, roles, block, symmetric)
    assert record.stats["bytes_after"] == expected
    assert _check_nbits_weights(model, before, block=block, symmetric=symmetric) == expected
    for node in model.graph:
        if node.op_type == "MatMulNBits":
            assert len(node.inputs) == (3 if symmetric else 4)
    assert model.spec_problems() == []
    _assert_within_tolerance(model, llama.reference, pass_)


def test_int4_tensorrt_backend_uses_standard_blocked_dequantize(llama):
    before = llama.weights()
    roles = _quantized_roles(llama.spec, _LAYER_ROLES)
    pass_ = QuantizeInt4Pass(backend="tensorrt", accuracy_level=0)

    model, record = run_pass(pass_, llama.cleaned())

    ops = op_counts(model)
    assert all(domain == "" for domain, _ in ops)
    assert _MS not in model.model.opset_imports
    assert model.model.opset_imports[""] >= 21
    assert ops[("", "DequantizeLinear")] == 15
    assert ops[("", "MatMul")] == 19
    assert record.stats["opset_raised"] is True
    assert record.stats["bytes_after"] == _expected_int4_bytes(before, roles, 32, True)
    assert model.spec_problems() == []
    for role in roles:
        weight = model.graph.initializers[model.spec.weights[role]]
        (use,) = weight.uses()
        dequantize = use.node
        assert dequantize.op_type == "DequantizeLinear" and use.idx == 0
        assert dequantize.attributes["axis"].value == 0
        assert dequantize.attributes["block_size"].value == 32
        assert weight.dtype == ir.DataType.INT4
        k, n = before[role].shape
        assert weight.shape == ir.Shape([k, n])
        scales = dequantize.inputs[1].const_value.numpy()
        assert scales.shape == (k // 32, n)
        codes = weight.const_value.numpy().astype(np.int32) + 8  # int4 -8..7 → codes 0..15
        _check_rtn(before[role], codes.T, scales.T, np.full((n, k // 32), 8), 32, True)
    _assert_within_tolerance(model, llama.reference, pass_)

    # The same quantized values as MatMulNBits: with fp32 compute in both (accuracy_level 0,
    # no graph optimizations fusing DequantizeLinear into MatMulNBits), the logits agree.
    nbits, _ = run_pass(QuantizeInt4Pass(accuracy_level=0), llama.cleaned())
    ids = llama.reference.ids
    got = session_for_model(model, optimization="disable")
    want = session_for_model(nbits, optimization="disable")
    logits, _ = got.decode(ids, got.empty_past(1), 0)
    expected, _ = want.decode(ids, want.empty_past(1), 0)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)


def test_int4_tensorrt_backend_asymmetric_stores_uint4_zero_points(llama):
    pass_ = QuantizeInt4Pass(backend="tensorrt", symmetric=False)

    model, _ = run_pass(pass_, llama.cleaned())

    dequantizers = [node for node in model.graph if node.op_type == "DequantizeLinear"]
    assert len(dequantizers) == 15
    for node in dequantizers:
        weight, scales, zero_points = node.inputs
        assert weight.dtype == ir.DataType.UINT4 and zero_points.dtype == ir.DataType.UINT4
        assert zero_points.shape == scales.shape
    _assert_within_tolerance(model, llama.reference, pass_)


def test_int4_requires_untied_embeddings(llama):
    tied = llama.tied()
    assert tied.spec.tie_word_embeddings

    with pytest.raises(UsageError) as caught:
        QuantizeInt4Pass().requires(tied)
    assert "untie-embeddings" in caught.value.fix
    with pytest.raises(UsageError, match="untie-embeddings"):
        QuantizeInt8Pass().requires(tied)

    QuantizeInt4Pass(include_lm_head=False).requires(tied)  # no lm_head, nothing to untie
    QuantizeInt4Pass().requires(llama.cleaned())


def test_int4_skips_a_tied_lm_head_when_called_without_requires(llama):
    model = llama.tied()
    embed = model.spec.weights["embed"]

    result = QuantizeInt4Pass().apply(model)  # Pass.__call__ runs requires first

    assert result.stats["matmuls_quantized"] == 14
    assert result.stats["skipped"] == {"shared with the embedding": 1}
    assert model.spec.weights["lm_head"] == embed == model.spec.weights["embed"]
    assert model.graph.initializers[embed].dtype == ir.DataType.FLOAT
    assert model.spec_problems() == []
    session_for_model(model)  # still runs


def test_int4_can_leave_the_lm_head_alone(llama):
    model, record = run_pass(QuantizeInt4Pass(include_lm_head=False), llama.cleaned())

    assert record.stats["matmuls_quantized"] == 14
    head = model.graph.initializers[model.spec.weights["lm_head"]]
    assert head.dtype == ir.DataType.FLOAT
    assert [use.node.op_type for use in head.uses()] == ["MatMul"]


def test_int4_options_are_checked_and_keyword_only():
    with pytest.raises(UsageError, match="block_size 48"):
        QuantizeInt4Pass(block_size=48)
    with pytest.raises(UsageError, match="backend 'tvm'"):
        QuantizeInt4Pass(backend="tvm")
    with pytest.raises(UsageError, match="accuracy_level 7"):
        QuantizeInt4Pass(accuracy_level=7)
    with pytest.raises(TypeError):
        QuantizeInt4Pass(64)
    assert QuantizeInt4Pass().options() == {
        "block_size": 32,
        "symmetric": True,
        "accuracy_level": 4,
        "include_lm_head": True,
        "backend": "onnxruntime",
        "bits": 4,
        "lm_head_bits": None,
        "share_tied_embedding": False,
        "block_grid": "onnxruntime",
        "keep_source_grid": False,
        "source_grid_widths": (),
    }


# --- gpt2: Conv1D weights ([in, out]) read by Gemm with a bias, fused qkv -----------------------


def test_int4_quantizes_gpt2_gemms_with_their_bias(gpt2):
    before = gpt2.weights()
    roles = _quantized_roles(gpt2.spec, _GPT2_ROLES)
    pass_ = QuantizeInt4Pass()

    model, record = run_pass(pass_, gpt2.cleaned())

    ops = op_counts(model)
    assert ops[(_MS, "MatMulNBits")] == 9
    assert ops[("", "Gemm")] == 0
    with_bias = [n for n in model.graph if n.op_type == "MatMulNBits" and len(n.inputs) == 6]
    assert len(with_bias) == 8  # every layer's Gemm; the lm_head has no bias
    assert record.stats["bytes_after"] == _expected_int4_bytes(before, roles, 32, True)
    assert before["layers.0.qkv"].shape == (64, 192)
    _check_nbits_weights(model, before, block=32, symmetric=True)
    assert model.spec_problems() == []
    _assert_within_tolerance(model, gpt2.reference, pass_)


def test_int8_quantizes_gpt2(gpt2):
    pass_ = QuantizeInt8Pass()

    model, record = run_pass(pass_, gpt2.cleaned())

    assert op_counts(model)[("", "MatMulInteger")] == 9
    assert op_counts(model)[("", "Gemm")] == 0
    assert record.stats["skipped"] == {}
    assert model.spec_problems() == []
    _assert_within_tolerance(model, gpt2.reference, pass_)


# --- quantize-int8 ----------------------------------------------------------------------------

_FLAGS_AVX2 = "flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma bmi2"


@pytest.mark.parametrize(
    "text, has",
    [
        (_FLAGS_AVX2, False),
        (_FLAGS_AVX2 + " avx512f avx512bw avx512_vnni", True),
        (_FLAGS_AVX2 + " avx_vnni", True),
        (_FLAGS_AVX2 + " avx512_vnnix avx512_vbmi", False),  # whole flags only
        ("processor : 0\nflags : fpu avx2 AVX512_VNNI\n", True),
        ("", False),
    ],
)
def test_cpu_has_vnni_reads_flag_text(text, has):
    assert quantize_int8.has_vnni(text) is has


@pytest.mark.parametrize(
    "flags, weight_type", [(_FLAGS_AVX2, "uint8"), (_FLAGS_AVX2 + " avx_vnni", "int8")]
)
def test_int8_on_llama_replaces_every_linear_layer(llama, monkeypatch, flags, weight_type):
    """Without VNNI the weights are uint8 (zero point 128: u8×u8 cannot overflow int16)."""
    monkeypatch.setattr(quantize_int8, "cpu_flags", lambda: flags)
    before = llama.weights()
    roles = _quantized_roles(llama.spec, _LAYER_ROLES)
    pass_ = QuantizeInt8Pass()

    model, record = run_pass(pass_, llama.cleaned())

    ops = op_counts(model)
    assert ops[("", "MatMulInteger")] == 15
    assert ops[("", "MatMul")] == 4
    # One activation quantizer per distinct input: q/k/v share one, gate/up share one.
    assert ops[("", "DynamicQuantizeLinear")] == 2 * 4 + 1
    assert model.spec_problems() == []
    qmax = 127
    for role in roles:
        weight = model.graph.initializers[model.spec.weights[role]]
        codes = weight.const_value.numpy()
        assert codes.dtype == np.dtype(weight_type) and codes.shape == before[role].shape
        if weight_type == "uint8":
            (use,) = weight.uses()
            zero_point = use.node.inputs[3].const_value.numpy()
            assert zero_point.dtype == np.uint8 and zero_point.tolist() == 128
            codes = codes.astype(np.int32) - 128
        # Per output channel: the largest weight of each column maps to ±qmax (an all-zero
        # column, the pad token's in the lm_head, stays 0).
        peak = np.where(np.abs(before[role]).max(axis=0) > 0, qmax, 0)
        np.testing.assert_array_equal(np.abs(codes.astype(np.int32)).max(axis=0), peak)
        (use,) = weight.uses()
        assert use.node.op_type == "MatMulInteger" and use.idx == 1
    elements = sum(before[role].size for role in roles)
    columns = sum(before[role].shape[1] for role in roles)
    assert record.stats["bytes_before"] == 4 * elements
    assert record.stats["bytes_after"] == elements + 4 * columns
    assert record.stats["weight_type"] == weight_type
    assert record.stats["reduce_range"] is False
    assert record.stats["reduce_range_reason"].startswith("auto")
    assert ("no VNNI" in record.stats["reduce_range_reason"]) is (weight_type == "uint8")
    assert record.stats["matmuls_quantized"] == 15
    assert record.stats["activation_quantizers"] == 9
    _assert_within_tolerance(model, llama.reference, pass_)


def test_int8_reduce_range_option_wins_over_the_cpu(llama, monkeypatch):
    monkeypatch.setattr(quantize_int8, "cpu_flags", lambda: _FLAGS_AVX2)

    model, record = run_pass(QuantizeInt8Pass(reduce_range=False), llama.cleaned())

    assert record.stats["reduce_range"] is False
    assert record.stats["reduce_range_reason"] == "option"
    head = model.graph.initializers[model.spec.weights["lm_head"]].const_value.numpy()
    assert np.abs(head.astype(np.int32)).max() == 127


def test_int8_refuses_gpu_targets(llama):
    from fdec.targets import load_target

    with pytest.raises(UsageError, match="h100 is a GPU"):
        QuantizeInt8Pass().check_target(load_target("h100"))
    QuantizeInt8Pass().check_target(load_target("cpu"))
    QuantizeInt4Pass().check_target(load_target("h100"))


def _synthetic_batches(spec: ModelSpec) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(1, spec.vocab_size, size=(1, 32), dtype=np.int64) for _ in range(4)]


def test_int8_smoothquant_shares_a_tied_table_once(llama):
    """SmoothQuant folded into the norms, and one uint8 [H, V] table for lm_head + embedding."""
    tied = llama.tied()
    table = tied.graph.initializers[tied.spec.weights["embed"]].const_value.numpy().copy()
    layers = tied.spec.num_layers
    pass_ = QuantizeInt8Pass(
        alpha=0.5,
        batches=_synthetic_batches(tied.spec),
        weight_type="uint8",
        share_tied_embedding=True,
    )

    model, record = run_pass(pass_, tied)

    stats = record.stats
    assert stats["gathers_shared"] == 1 and stats["weights_quantized"] == 7 * layers + 1
    # One factor per activation: q/k/v and gate/up read norm outputs (folded there); o, down
    # (and here the lm_head of the uncleaned graph) get a Mul.
    assert stats["smoothing_folded"] + stats["smoothing_inserted"] == 4 * layers + 1
    assert stats["smoothing_folded"] >= 2 * layers
    spec = model.spec
    assert spec.weights["embed"] == spec.weights["lm_head"]
    shared = model.graph.initializers[spec.weights["lm_head"]]
    codes = shared.const_value.numpy()
    assert codes.dtype == np.uint8 and codes.shape == table.T.shape  # [H, V], stored once
    assert not any(
        v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT
        and v.const_value.size >= table.size
        for v in model.graph.initializers.values()
    )  # fmt: skip
    readers = sorted(use.node.op_type for use in shared.uses())
    assert readers == ["Gather", "MatMulInteger"]
    gather = next(use.node for use in shared.uses() if use.node.op_type == "Gather")
    assert gather.attributes["axis"].as_int() == 1
    # Gathered rows: (code - 128) · scale[v] / s[h] is the table within half a step.
    matmul = next(use.node for use in shared.uses() if use.node.op_type == "MatMulInteger")
    scales_mul = matmul.outputs[0].uses()[0].node.outputs[0].uses()[0].node
    scale_node = scales_mul.inputs[1].producer()
    w_scale = scale_node.inputs[1].const_value.numpy()
    inverse = next(
        v.const_value.numpy() for name, v in model.graph.initializers.items()
        if name.endswith("_inv_s")
    )  # fmt: skip
    rows = (codes.astype(np.float64) - 128) * w_scale[None, :] * inverse[:, None]
    step = w_scale[None, :] * inverse[:, None]
    assert np.all(np.abs(rows - table.T) <= step / 2 * (1 + 1e-5) + 1e-7)
    assert model.spec_problems() == []
    _assert_within_tolerance(model, llama.reference, pass_)


def test_int8_smoothquant_needs_calibration_and_checks_its_options():
    with pytest.raises(UsageError, match="needs calibration"):
        QuantizeInt8Pass(alpha=0.5).requires(_small_model()[0])
    assert QuantizeInt8Pass(alpha=0.5).needs_calibration
    assert not QuantizeInt8Pass().needs_calibration
    with pytest.raises(UsageError, match="alpha"):
        QuantizeInt8Pass(alpha=1.5)
    with pytest.raises(UsageError, match="weight_type"):
        QuantizeInt8Pass(weight_type="int4")
    with pytest.raises(UsageError, match="reduce_range"):
        QuantizeInt8Pass(weight_type="uint8", reduce_range=True)


_WORST_CASE = """
<ir_version: 10, opset_import: ["" : 20]>
g (float[2, 64] x) => (float[2, 16] y) {
    y = MatMul (x, w)
}
"""


@pytest.mark.parametrize(
    "options, overflows",
    [
        ({"weight_type": "uint8"}, False),
        ({"weight_type": "int8", "reduce_range": True}, False),
        ({"weight_type": "int8", "reduce_range": False}, None),  # only without VNNI
        ({}, False),  # what this machine's CPU gets by default
    ],
)
def test_int8_weight_formats_on_the_u8s8_worst_case(options, overflows):
    """x = 1 quantizes to u8 255 and w = 1 to ±127: u8×s8 pairs (64,770) overflow int16.

    ONNX Runtime's x86 kernels without VNNI saturate them (vpmaddubsw), halving y; uint8
    weights and reduce_range (±63: 32,130) stay exact. On this machine's CPU the default
    format is exact, whatever it has.
    """
    if overflows is None:
        overflows = not quantize_int8.has_vnni(quantize_int8.cpu_flags())
    arrays = {"w": np.ones((64, 16), dtype=np.float32)}
    spec = tiny_spec(
        num_heads=1, head_dim=64, hidden_size=64, intermediate_size=16, vocab_size=16,
        weights={"layers.0.o": "w"}, outputs=["y"],
    )  # fmt: skip
    model = FdecModel(ir_model(_WORST_CASE, arrays), spec)
    feeds = {"x": np.ones((2, 64), dtype=np.float32)}

    model, record = run_pass(QuantizeInt8Pass(**options), model)

    assert record.stats["weights_quantized"] == 1
    (got,) = run_ort(model.model, feeds)
    if overflows:
        assert got.max() < 40.0  # 32 saturated pairs: 32,767 · 32 / (255 · 127) ≈ 32.4
    else:
        np.testing.assert_allclose(got, 64.0, rtol=1e-5)


# --- small graphs: weights read through Transpose or Gemm(transB=1), and skips -----------------

_TRANSPOSED = """
<ir_version: 10, opset_import: ["" : 20]>
g (float[2, 64] x) => (float[2, 16] y, float[2, 16] z, float[2, 16] r) {
    wt = Transpose <perm = [1, 0]> (w)
    y = MatMul (x, wt)
    z = Gemm <transB = 1> (x, v, bias)
    s = Add (x, u)
    r = MatMul (s, u2)
}
"""


def _small_model() -> tuple[FdecModel, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    arrays = {
        "w": rng.standard_normal((16, 64)).astype(np.float32),  # [N, K] (torch Linear layout)
        "v": rng.standard_normal((16, 64)).astype(np.float32),
        "bias": rng.standard_normal(16).astype(np.float32),
        "u": rng.standard_normal((2, 64)).astype(np.float32),
        "u2": rng.standard_normal((64, 16)).astype(np.float32),
    }
    spec = tiny_spec(
        num_heads=1,
        head_dim=64,
        hidden_size=64,
        intermediate_size=16,
        vocab_size=16,
        # u is read by Add: not a linear layer's weight, so it is skipped with a reason.
        weights={"layers.0.q": "w", "layers.0.k": "v", "layers.0.v": "u", "layers.0.o": "u2"},
        outputs=["y", "z", "r"],
    )
    return FdecModel(ir_model(_TRANSPOSED, arrays), spec), arrays


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_int4_follows_weights_through_transpose_and_gemm_trans_b(backend):
    model, arrays = _small_model()
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)}
    before = run_ort(model.model, feeds)

    model, record = run_pass(QuantizeInt4Pass(backend=backend), model)

    assert record.stats["matmuls_quantized"] == 3
    assert record.stats["skipped"] == {"read by Add (input 1)": 1}
    assert op_counts(model)[("", "Transpose")] == 0
    assert {"w", "v", "u2"}.isdisjoint(model.graph.initializers)
    assert "u" in model.graph.initializers
    assert model.spec_problems() == []
    assert [v.name for v in model.graph.outputs] == ["y", "z", "r"]
    after = run_ort(model.model, feeds)
    for want, got in zip(before, after):
        # 4-bit weights: an error of about step·sqrt(K/12) ≈ 0.7 per output here.
        assert np.abs(got - want).max() < 4.0
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99
    if backend == "onnxruntime":
        node = model.graph.initializers[model.spec.weights["layers.0.q"]].uses()[0].node
        codes = _unpack_nibbles(node.inputs[1].const_value.numpy().reshape(16, -1), 64)
        scales = node.inputs[2].const_value.numpy()
        _check_rtn(arrays["w"].T, codes[:, :64], scales, np.full((16, 2), 8), 32, True)


def test_int8_follows_weights_through_transpose_and_gemm_trans_b():
    model, _ = _small_model()
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)}
    before = run_ort(model.model, feeds)

    model, record = run_pass(QuantizeInt8Pass(reduce_range=True), model)

    assert record.stats["matmuls_quantized"] == 3
    assert record.stats["activation_quantizers"] == 2  # x (shared by y and z) and s
    assert record.stats["skipped"] == {"read by Add (input 1)": 1}
    for want, got in zip(before, run_ort(model.model, feeds)):
        assert np.abs(got - want).max() < 0.5
    assert model.spec_problems() == []


def test_int4_int4_tensors_round_trip_through_onnx():
    """onnx-ir packs INT4 initializers two per byte, low nibble first, like ONNX."""
    values = np.array([[-8, 7, 1], [0, -1, 3]], dtype=np.int8)
    tensor = ir.Tensor(values.astype(ml_dtypes.int4), dtype=ir.DataType.INT4)
    proto = ir.serde.serialize_tensor(tensor)
    assert tensor.nbytes == 3 and len(proto.raw_data) == 3
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(proto).astype(np.int8), values)


# --- a tied table shared by the lm_head and the embedding; 8-bit weights -----------------------


def test_int4_shares_one_packed_table_between_a_tied_lm_head_and_the_embedding(llama):
    model = llama.tied()
    embed = model.spec.weights["embed"]
    table = model.graph.initializers[embed].const_value.numpy().copy()  # [V, H]
    vocab, hidden = table.shape
    pass_ = QuantizeInt4Pass(share_tied_embedding=True)
    pass_.requires(model)  # no untie-embeddings needed

    model, record = run_pass(pass_, model)

    shared = model.spec.weights["embed"]
    assert shared == model.spec.weights["lm_head"] != embed
    assert embed not in model.graph.initializers  # no float copy of the table is left
    value = model.graph.initializers[shared]
    assert value.const_value.numpy().shape == (vocab, hidden // 32, 16)
    readers = sorted(use.node.op_type for use in value.uses())
    assert readers == ["GatherBlockQuantized", "MatMulNBits"]
    ops = op_counts(model)
    assert ops[(_MS, "MatMulNBits")] == 15 and ops[(_MS, "GatherBlockQuantized")] == 1
    assert record.stats["gathers_shared"] == 1 and record.stats["skipped"] == {}
    # The table is counted once: codes and a float32 scale per block of 32, plus the two shape
    # constants of the embedding's Reshapes (3 + 1 int64).
    layers = _quantized_roles(llama.spec, _LAYER_ROLES)[:-1]
    layer_bytes = _expected_int4_bytes(llama.weights(), layers, 32, True)
    head_bytes = vocab * (hidden // 32) * (16 + 4)
    assert record.stats["bytes_after"] == layer_bytes + head_bytes + 4 * 8
    assert record.stats["bytes_before"] - record.stats["bytes_after"] == (
        record.before.bytes - record.after.bytes
    )
    matmul = next(use.node for use in value.uses() if use.node.op_type == "MatMulNBits")
    codes = _unpack_nibbles(value.const_value.numpy().reshape(vocab, -1), hidden)
    scales = matmul.inputs[2].const_value.numpy()
    _check_rtn(table.T, codes, scales, np.full(scales.shape, 8), 32, True)
    figures = _assert_within_tolerance(model, llama.reference, pass_)

    # The embedding reads exactly the lm_head's quantized values: the untied model with the
    # same int4 lm_head and the dequantized table as its fp32 embedding gives the same logits.
    dequantized = (codes - 8) * np.repeat(scales, 32, axis=1)
    untied, _ = run_pass(QuantizeInt4Pass(), llama.cleaned())
    table_value = untied.graph.initializers[untied.spec.weights["embed"]]
    table_value.const_value = ir.tensor(dequantized.astype(np.float32), name=table_value.name)
    same = llama.reference.compare(session_for_model(untied))
    assert (
        abs(same["perplexity_build"] - figures["perplexity_build"])
        < 1e-3 * same["perplexity_build"]
    )


def test_int4_sharing_is_refused_for_tensorrt_and_needs_no_untie(llama):
    with pytest.raises(UsageError, match="only for backend onnxruntime"):
        QuantizeInt4Pass(share_tied_embedding=True, backend="tensorrt")
    with pytest.raises(UsageError, match="bits 3"):
        QuantizeInt4Pass(bits=3)
    # An untied model has nothing to share: the option changes nothing.
    plain, _ = run_pass(QuantizeInt4Pass(), llama.cleaned())
    shared, record = run_pass(QuantizeInt4Pass(share_tied_embedding=True), llama.cleaned())
    assert "gathers_shared" not in record.stats
    assert op_counts(plain) == op_counts(shared)


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_8_bit_weights_pack_one_code_a_byte_within_half_a_step(llama, backend):
    before = llama.weights()
    roles = _quantized_roles(llama.spec, _LAYER_ROLES)
    pass_ = QuantizeInt4Pass(bits=8, backend=backend)

    model, record = run_pass(pass_, llama.cleaned())

    k_n = {role: before[role].shape for role in roles}
    # 8-bit codes: a byte each, plus a float32 scale per block of 32.
    assert record.stats["bytes_after"] == sum(n * (k // 32) * (32 + 4) for k, n in k_n.values())
    for role in roles:
        w = before[role]
        k, n = w.shape
        value = model.graph.initializers[model.spec.weights[role]]
        node = value.uses()[0].node
        if backend == "onnxruntime":
            assert node.op_type == "MatMulNBits" and node.attributes["bits"].as_int() == 8
            codes = value.const_value.numpy().astype(np.int32).reshape(n, k) - 128
            scales = node.inputs[2].const_value.numpy()  # [N, k_blocks]
        else:
            assert node.op_type == "DequantizeLinear" and value.dtype == ir.DataType.INT8
            codes = value.const_value.numpy().astype(np.int32).T  # [K, N] → [N, K]
            scales = node.inputs[1].const_value.numpy().T
        step = np.abs(np.repeat(scales, 32, axis=1))
        error = np.abs(codes * np.repeat(scales, 32, axis=1) - w.T)
        # Symmetric 8 bits (max/-128): within half a step, +max clipped by at most one step.
        assert np.mean(error <= step / 2 * (1 + 1e-5)) > 0.99 and np.all(error <= step * 1.0001)
    figures = _assert_within_tolerance(model, llama.reference, pass_)
    int4_model, _ = run_pass(QuantizeInt4Pass(), llama.cleaned())
    int4 = llama.reference.compare(session_for_model(int4_model))
    assert figures["max_abs_error"] < int4["max_abs_error"] / 4  # 16× finer steps


# --- block_grid "minmax": the grid of GGUF's Q4_1 / Q8_0 blocks -------------------------------


def _on_q4_1_grid(array: np.ndarray, seed: int) -> np.ndarray:
    """`array` [N, K] (torch layout) rounded as GGUF Q4_1 does: blocks of 32 along K, scale
    (max - min) / 15 and an arbitrary float minimum per block."""
    blocks = array.reshape(array.shape[0], -1, 32).astype(np.float64)
    low = blocks.min(-1, keepdims=True) + np.random.default_rng(seed).normal(0, 0.01, (1, 1, 1))
    step = (blocks.max(-1, keepdims=True) - low) / 15
    return (np.round((blocks - low) / step) * step + low).reshape(array.shape).astype(np.float32)


def test_int4_minmax_grid_reproduces_q4_1_weights_where_integer_zero_points_cannot():
    model, arrays = _small_model()
    for name in ("w", "v"):
        grid = _on_q4_1_grid(arrays[name], seed=len(name))
        model.graph.initializers[name].const_value = ir.tensor(grid, name=name)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)}
    before = run_ort(model.model, feeds)
    integer, _ = run_pass(
        QuantizeInt4Pass(symmetric=False),
        load(dump(model), ModelSpec.from_dict(model.spec.to_dict())),
    )
    exact, record = run_pass(QuantizeInt4Pass(symmetric=False, block_grid="minmax"), model)

    assert record.stats["matmuls_quantized"] == 3
    node = exact.graph.initializers[exact.spec.weights["layers.0.q"]].uses()[0].node
    assert node.op_type == "MatMulNBits" and node.inputs[3].dtype == ir.DataType.FLOAT16
    y_int, z_int, _ = run_ort(integer.model, feeds)
    y, z, r = run_ort(exact.model, feeds)
    for want, got, rounded in ((before[0], y, y_int), (before[1], z, z_int)):
        assert np.abs(got - want).max() < 1e-2  # the source's own grid (float16 zero points)
        assert np.abs(rounded - want).max() > 50 * np.abs(got - want).max()
    assert np.abs(r - before[2]).max() > 1e-3  # u2 is not on a grid: rounded as usual


def _on_integer_grid(array, group, symmetric, rng):
    """`array` [N, K] rounded as GPTQ / AWQ store it: groups along K, integer zero points, and
    scales 1.3× the range's (codes stop short of 0 and 15, as after GPTQ's updates)."""
    blocks = array.reshape(array.shape[0], -1, group).astype(np.float64)
    low, high = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
    scale = (np.abs(blocks).max(-1) / 7 if symmetric else (high - low) / 15) * 1.3
    scale = scale.astype(np.float16).astype(np.float64)[..., None]
    zero = 8 if symmetric else np.clip(np.rint(-low / scale[..., 0]), 0, 15)[..., None]
    codes = np.clip(np.rint(blocks / scale) + zero, 0, 15)
    return ((codes - zero) * scale).reshape(array.shape).astype(np.float32)


def test_int4_keeps_integer_zero_point_groups_a_min_max_grid_cannot_reproduce():
    """A GPTQ/AWQ checkpoint's groups (fdec.frontend.prequantized) are kept exactly, in blocks
    of their own size, symmetric ones without zero points; a float weight is rounded as usual."""
    from fdec.passes.int4_codes import integer_grid

    model, arrays = _small_model()
    rng = np.random.default_rng(3)
    grids = {"w": _on_integer_grid(np.abs(arrays["w"]), 64, False, rng),  # zero points 0
             "v": _on_integer_grid(arrays["v"], 32, True, rng)}  # fmt: skip
    for name, grid in grids.items():
        model.graph.initializers[name].const_value = ir.tensor(grid, name=name)
    feeds = {"x": rng.standard_normal((2, 64)).astype(np.float32)}
    before = run_ort(model.model, feeds)
    rounded, _ = run_pass(QuantizeInt4Pass(symmetric=False, accuracy_level=0), load(dump(model),
                          ModelSpec.from_dict(model.spec.to_dict())))  # fmt: skip
    kept, record = run_pass(QuantizeInt4Pass(keep_source_grid=True, accuracy_level=0), model)

    assert record.stats["source_grid_kept"] == 2
    for role, block, zero_points in (("layers.0.q", 64, True), ("layers.0.k", 32, False)):
        node = kept.graph.initializers[kept.spec.weights[role]].uses()[0].node
        assert node.attributes["block_size"].value == block
        assert (len(node.inputs) > 3 and node.inputs[3] is not None) == zero_points
    y_rounded, z_rounded, _ = run_ort(rounded.model, feeds)
    y, z, r = run_ort(kept.model, feeds)
    for want, got, other in ((before[0], y, y_rounded), (before[1], z, z_rounded)):
        assert np.abs(got - want).max() < 1e-4  # the source's own groups, bit for bit
        assert np.abs(other - want).max() > 100 * np.abs(got - want).max()
    assert np.abs(r - before[2]).max() > 1e-3  # u2 is not on a grid: rounded as usual
    # Codes reaching every level but one end, and only every other level: found, z kept at 8
    steps = np.array([[-5, -4, -3, -2, -1, 0, 1, 2] * 4], dtype=np.float32).T * 0.25
    found = integer_grid(steps, 32)
    assert found.zero_points is None and found.scales[0, 0] == 0.25
    assert np.array_equal(found.dequantized().T, steps)
    assert integer_grid(steps * 2 + 0.1, 32) is None  # no zero on the grid


def test_int4_minmax_grid_is_for_matmulnbits_and_plain_rtn():
    with pytest.raises(UsageError, match=r"block_grid 'minmax'.*backend tensorrt"):
        QuantizeInt4Pass(block_grid="minmax", backend="tensorrt")
    with pytest.raises(UsageError, match="block_grid 'other'"):
        QuantizeInt4Pass(block_grid="other")
    from fdec.passes.quantize_awq import QuantizeInt4AwqPass

    with pytest.raises(UsageError, match="int4-rtn"):
        QuantizeInt4AwqPass(block_grid="minmax")


def test_int8_weight_only_and_searched_alpha(llama):
    """weight_only=("down",): each down_proj is W8A16 (int8 codes dequantized by
    DequantizeLinear, multiplied by the float activation: no run-time quantizer, no smoothing
    on it); alpha_search picks each other activation's α from the grid."""
    layers = llama.spec.num_layers
    grid = (0.5, 0.75, 0.9)
    pass_ = QuantizeInt8Pass(
        alpha=0.75,
        alpha_search=grid,
        batches=_synthetic_batches(llama.spec),
        weight_only=("down",),
    )
    model, record = run_pass(pass_, llama.cleaned())
    stats = record.stats
    downs = {llama.spec.weights[f"layers.{i}.down"] for i in range(layers)}
    assert set(stats["weight_only"]) == downs and stats["weights_quantized"] == 7 * layers + 1
    # q/k/v, o, gate/up per layer and the lm_head are smoothed, each with a searched α
    assert len(stats["searched"]) == 3 * layers + 1
    assert {alpha for alpha, _ in stats["searched"].values()} <= set(grid)
    for role, name in model.spec.weights.items():
        if role == "embed":
            continue
        (use,) = model.graph.initializers[name].uses()
        assert use.node.op_type == (
            "DequantizeLinear" if role.endswith(".down") else "MatMulInteger"
        )
        if role.endswith(".down"):
            (matmul,) = [u.node for u in use.node.outputs[0].uses()]
            assert matmul.op_type == "MatMul"
            assert matmul.inputs[0].producer().op_type != "DynamicQuantizeLinear"
    assert op_counts(model)[("", "DynamicQuantizeLinear")] == 3 * layers + 1
    _assert_within_tolerance(model, llama.reference, pass_)
