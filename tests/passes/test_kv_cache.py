"""Tests of quantize-kv-cache: int8/fp8/fp16 cache I/O on tiny real exports, checked through the cache."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from exported import export_tiny, run_pass

from fdec.calibrate import calibration_batches, load_calibration_texts
from fdec.compile import plan_pipeline
from fdec.errors import InputError, UsageError
from fdec.lower.onnxruntime import shared_kv_layers
from fdec.passes import make_pass
from fdec.passes.fusion import FuseAttentionPass
from fdec.passes.kv_cache import QuantizeKvCachePass, kv_cache_names
from fdec.runtime import generate, session_for_model
from fdec.targets import load_target
from fdec.verify import logits_through_cache, perplexity_through_cache

_PROMPT = [5, 17, 99, 3, 250, 7, 8, 41, 120, 64, 2, 300]


@pytest.fixture(scope="module")
def tiny(tiny_models, tmp_path_factory):
    return export_tiny(tiny_models, tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def batches(tiny):
    texts = load_calibration_texts(None)
    return calibration_batches(texts, tiny.tokenizer, tiny.spec.vocab_size, max_samples=4)


def _quantized(tiny, batches, dtype, *, fused=False):
    model = tiny.cleaned()
    if fused:
        model, _ = run_pass(FuseAttentionPass(), model)
    return run_pass(QuantizeKvCachePass(dtype=dtype, batches=batches), model)


def _held(tiny) -> np.ndarray:
    return tiny.reference.ids[:, :64]


def test_int8_cache_io_and_per_head_scales(tiny, batches):
    model, record = _quantized(tiny, batches, "int8")
    spec = tiny.spec
    inputs = {v.name: v for v in model.graph.inputs}
    outputs = {v.name: v for v in model.graph.outputs}
    dequantizers = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    quantizers = [n for n in model.graph if n.op_type == "QuantizeLinear"]
    assert len(dequantizers) == len(quantizers) == 2 * spec.num_layers
    for past, present in kv_cache_names(spec.num_layers):
        assert inputs[past].dtype == ir.DataType.INT8
        assert outputs[present].dtype == ir.DataType.INT8
        scale = model.graph.initializers[f"{present}_scale"].const_value.numpy()
        assert scale.shape == (spec.num_kv_heads,) and (scale > 0).all()
        (reader,) = [use.node for use in inputs[past].uses()]
        assert reader.op_type == "DequantizeLinear" and reader.attributes["axis"].value == 1
        assert outputs[present].producer().op_type == "QuantizeLinear"
    stats = record.stats
    assert stats["scales_per_tensor"] == spec.num_kv_heads
    assert stats["bytes_per_token_before"] == 4 * stats["bytes_per_token_after"]
    assert stats["bytes_per_token_after"] == 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim
    session = session_for_model(model)
    assert session.kv_dtype == np.int8 and session.empty_past(1)[0].dtype == np.int8


def test_cache_round_trip_error_is_within_half_a_step(tiny, batches):
    model, _ = _quantized(tiny, batches, "int8")
    float_session, int8_session = session_for_model(tiny.cleaned()), session_for_model(model)
    ids = np.asarray([_PROMPT])
    _, want = float_session.decode(ids, float_session.empty_past(1), 0)
    _, codes = int8_session.decode(ids, int8_session.empty_past(1), 0)
    for index, (_, present) in enumerate(kv_cache_names(tiny.spec.num_layers)):
        scale = model.graph.initializers[f"{present}_scale"].const_value.numpy()
        assert codes[index].dtype == np.int8
        step = scale[None, :, None, None]
        restored = codes[index].astype(np.float32) * step
        inside = np.abs(want[index]) <= 127 * step
        error = np.where(inside, np.abs(restored - want[index]), 0.0).max(axis=(0, 2, 3))
        assert (error <= scale / 2 * 1.001 + 1e-6).all(), (present, error, scale)
        # values beyond the calibrated range saturate (int8: 127 or -128)
        outside = ~inside
        assert (codes[index][outside] == np.where(want[index][outside] > 0, 127, -128)).all()
        assert inside.mean() > 0.99 and np.abs(codes[index]).max() >= 64


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_tokens_through_a_quantized_cache_stay_close_to_fp32(tiny, batches, dtype):
    model, _ = _quantized(tiny, batches, dtype)
    plain = session_for_model(tiny.cleaned())
    quantized = session_for_model(model, optimization="basic")
    ids = _held(tiny)
    want = logits_through_cache(plain, ids, 16)
    got = logits_through_cache(quantized, ids, 16)
    # the prefill never reads the cache; every later position does
    assert np.abs(got[:, :16] - want[:, :16]).max() < 1e-4
    moved = np.abs(got[:, 16:] - want[:, 16:]).max()
    assert 0 < moved < 0.2 * np.abs(want).max(), moved
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.9
    growth = perplexity_through_cache(quantized, ids, 16) / perplexity_through_cache(plain, ids, 16)
    assert abs(growth - 1) < 0.05, growth
    tokens = generate(quantized, _PROMPT, max_new_tokens=24, bound=False).tokens
    reference = generate(plain, _PROMPT, max_new_tokens=24, bound=False).tokens
    assert np.mean(np.asarray(tokens) == np.asarray(reference)) >= 0.75


def test_fp8_cache_is_float8_e4m3_in_and_out(tiny, batches):
    model, record = _quantized(tiny, batches, "fp8")
    assert {v.dtype for v in model.graph.inputs if v.name.startswith("past_")} == {
        ir.DataType.FLOAT8E4M3FN
    }
    assert record.stats["opset_raised"] in (True, False) and model.model.opset_imports[""] >= 19
    session = session_for_model(model, optimization="basic")
    _, present = session.decode(np.asarray([_PROMPT]), session.empty_past(1), 0)
    assert present[0].dtype == np.uint8  # the fp8 bytes (numpy has no fp8)
    assert present[0].shape[2] == len(_PROMPT)
    # bound (IOBinding) and numpy loops agree on an fp8 cache
    assert (
        generate(session, _PROMPT, max_new_tokens=12).tokens
        == generate(session, _PROMPT, max_new_tokens=12, bound=False).tokens
    )


def test_fp16_cache_is_a_cast(tiny):
    model, record = run_pass(QuantizeKvCachePass(dtype="fp16"), tiny.cleaned())
    assert record.stats["bytes_per_token_after"] * 2 == record.stats["bytes_per_token_before"]
    session = session_for_model(model)
    assert session.kv_dtype == np.float16
    ids = _held(tiny)
    got = logits_through_cache(session, ids, 16)
    want = logits_through_cache(session_for_model(tiny.cleaned()), ids, 16)
    assert np.abs(got - want).max() < 5e-2


def test_fused_attention_reads_the_dequantized_past_and_drops_the_shared_buffer(tiny, batches):
    fused = run_pass(FuseAttentionPass(), tiny.cleaned())[0]
    assert shared_kv_layers(fused.model) == list(range(tiny.spec.num_layers))
    model, _ = _quantized(tiny, batches, "int8", fused=True)
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert gqa and all(n.inputs[3].producer().op_type == "DequantizeLinear" for n in gqa)
    assert shared_kv_layers(model.model) == []
    session = session_for_model(model)
    assert session.kv_buffer == "concat"
    unfused = session_for_model(_quantized(tiny, batches, "int8")[0])
    ids = _held(tiny)
    got, want = logits_through_cache(session, ids, 16), logits_through_cache(unfused, ids, 16)
    assert np.abs(got - want).max() < 0.05
    bound = generate(session, _PROMPT, max_new_tokens=16).tokens
    assert bound == generate(session, _PROMPT, max_new_tokens=16, bound=False).tokens


def test_quantize_kv_cache_needs_calibration_and_a_float_cache(tiny, batches):
    with pytest.raises(UsageError, match="calibration"):
        run_pass(QuantizeKvCachePass(dtype="int8"), tiny.cleaned())
    model, _ = _quantized(tiny, batches, "int8")
    with pytest.raises(UsageError, match="already int8"):
        run_pass(QuantizeKvCachePass(dtype="int8", batches=batches), model)
    with pytest.raises(UsageError, match="int8, fp8, fp16"):
        make_pass("quantize-kv-cache", dtype="int4")


def test_plan_pipeline_appends_the_kv_pass_and_fp8_needs_a_gpu_with_fp8():
    cpu = load_target("cpu")
    plan = plan_pipeline(target=cpu, backend="onnxruntime", quantize="none", kv_dtype="int8")
    assert plan.pass_names[-1] == "quantize-kv-cache" and plan.optimization == "all"
    assert plan.pipeline[-1].needs_calibration and plan.calibration_texts
    fp8 = plan_pipeline(target=cpu, backend="onnxruntime", quantize="none", kv_dtype="fp8")
    assert fp8.optimization == "basic"  # ORT runs fp8 Q/DQ on the CPU at "basic"
    with pytest.raises(InputError, match=r"(?i)fp8"):
        plan_pipeline(target=load_target("a100"), backend="onnxruntime", quantize="none",
                      kv_dtype="fp8")  # fmt: skip
    h100 = plan_pipeline(target=load_target("h100"), backend="onnxruntime", quantize="none",
                         kv_dtype="fp8")  # fmt: skip
    assert h100.pass_names[-1] == "quantize-kv-cache"
    none = plan_pipeline(target=cpu, backend="onnxruntime", quantize="none", kv_dtype="fp32")
    assert "quantize-kv-cache" not in none.pass_names


def test_the_capacity_check_takes_the_cpu_targets_fp8_cache(tiny_models):
    """`fdec compile --target cpu --kv-dtype fp8` was refused by the capacity check ("FP8
    needs a GPU") although the pass and --kv-dtype's help take it on the cpu target."""
    import json

    from fdec.plan import check_capacity

    config = json.loads((tiny_models("llama") / "config.json").read_text())
    common = dict(model="tiny", weights="int4", kv_dtype="fp8", batch=1, context=64)
    plan = check_capacity(config, load_target("cpu"), default_context=64, **common)
    assert plan is not None
    with pytest.raises(InputError, match=r"(?i)fp8"):
        check_capacity(config, load_target("a100"), default_context=64, **common)


@pytest.mark.parametrize(("target", "backend"), [("h100", "tensorrt"), ("rtx4090", "tensorrt-rtx")])
def test_strongly_typed_backends_refuse_an_fp16_cache_when_planned(target, backend):
    """An fp16 cache typed model.onnx in part, and the TensorRT model is then cast from it:
    the compile died after export and calibration ("the graph is already typed")."""
    with pytest.raises(UsageError, match="takes fp32, int8, fp8") as caught:
        plan_pipeline(target=load_target(target), backend=backend, quantize="none",
                      kv_dtype="fp16")  # fmt: skip
    assert "drop --kv-dtype" in caught.value.one_line()
    int8 = plan_pipeline(target=load_target(target), backend=backend, quantize="none",
                         kv_dtype="int8")  # fmt: skip
    assert int8.pass_names[-1] == "quantize-kv-cache"
