"""fdec.runtime.check_forms: the CPU check's lighter forms of dequantized tables give the
logits of the graph as built (an fp8 `--target h100` build and its emulated bf16 TensorRT
model), and sliced runs use them."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from fdec.compile import CompileOptions, compile_model
from fdec.ir import ModelSpec
from fdec.lower.tensorrt_model import TYPED_MODEL
from fdec.runtime import OrtModel, open_session
from fdec.runtime.check_forms import (
    emulate_low_precision,
    lighter_check_forms,
    lighter_session_args,
)
from fdec.runtime.sliced import SlicedModel
from fdec.verify import logits_through_cache


@pytest.fixture(scope="module")
def h100_build(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("check-forms") / "build"
    report = compile_model(
        CompileOptions(model=str(tiny_models("llama")), out=out, target="h100")
    ).report
    return out, ModelSpec.from_dict(report["spec"])


def _logits(model: ir.Model, folder, ids) -> np.ndarray:
    path = folder / "model.onnx"
    ir.save(model, path, external_data="model.onnx.data")
    session = OrtModel(open_session(path, optimization="basic", prepack=False))
    return logits_through_cache(session, ids, 12)


@pytest.mark.parametrize("which", ["build", "emulated TensorRT model"])
def test_lighter_forms_give_the_built_graphs_logits(h100_build, tmp_path, which):
    out, _ = h100_build
    path = out / ("model.onnx" if which == "build" else TYPED_MODEL)

    def load() -> ir.Model:
        model = ir.load(path)
        if which != "build":
            assert emulate_low_precision(model)  # DQ → Cast(bf16) → Cast(fp32) → reader
        return model

    ids = np.random.default_rng(0).integers(0, 300, size=(1, 20))
    (tmp_path / "as-built").mkdir()
    want = _logits(load(), tmp_path / "as-built", ids)
    model = load()
    matmuls = sum(1 for n in model.graph if n.op_type == "MatMul")
    made = lighter_check_forms(model.graph, block_bytes=4096)  # 64 × 320 fp32: 20 blocks
    assert made["gathers"] == 1  # the int8 embedding: rows gathered, then dequantized
    assert made["matmuls"] >= 1  # int8 (W8A16) weights: the lm_head's; fp8 codes take no Slice
    logits = model.graph.outputs[0]
    head = logits.producer()
    while head.op_type == "Cast":  # the TensorRT model's fp16 logits, cast at the edge
        head = head.inputs[0].producer()
    assert logits.name == "logits" and head.op_type == "Concat"
    ops = [n.op_type for n in model.graph]
    assert "Gather" in ops and ops.count("MatMul") > matmuls
    embedding_dq = [
        n for n in model.graph
        if n.op_type == "DequantizeLinear" and any(u.node.op_type == "Gather" for u in n.outputs[0].uses())
    ]  # fmt: skip
    assert not embedding_dq  # the whole table is no longer dequantized
    (tmp_path / "lighter").mkdir()
    got = _logits(model, tmp_path / "lighter", ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_sliced_runs_of_an_fp8_build_give_one_sessions_logits(h100_build):
    out, spec = h100_build
    sliced = SlicedModel(out / "model.onnx", spec=spec, max_slice_bytes=1, optimization="basic")
    assert len(sliced.slices) == 2
    whole = OrtModel(open_session(out / "model.onnx", optimization="basic", prepack=False))
    ids = np.random.default_rng(1).integers(0, 300, size=(1, 20))
    want = logits_through_cache(whole, ids, 12)
    np.testing.assert_allclose(logits_through_cache(sliced, ids, 12), want, rtol=0, atol=1e-5)


def test_the_typed_models_check_slices_layer_by_layer(h100_build, tmp_path):
    """The emulated bf16 TensorRT model slices as the build does, one layer a slice, with one
    session's logits. Its typing once cast the KV input a Shape reads for every layer's mask,
    so all layers joined that cache's layer: an 8B's check ran 22 layers in one slice."""
    out, spec = h100_build
    model = ir.load(out / TYPED_MODEL)
    emulate_low_precision(model)
    path = tmp_path / "model.onnx"
    ir.save(model, path, external_data="model.onnx.data")
    sliced = SlicedModel(path, spec=spec, max_slice_bytes=1, optimization="basic")
    assert [s.stages for s in sliced.slices] == [(0, 1), (1, 2)]
    whole = OrtModel(open_session(path, optimization="basic", prepack=False))
    ids = np.random.default_rng(2).integers(0, 300, size=(1, 20))
    want = logits_through_cache(whole, ids, 12)
    np.testing.assert_allclose(logits_through_cache(sliced, ids, 12), want, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def cuda_build(tiny_models, tmp_path_factory):
    """The fp16 ONNX Runtime CUDA graph of a tiny Llama (fp16 KV cache, fused ops)."""
    out = tmp_path_factory.mktemp("check-forms-cuda") / "build"
    options = CompileOptions(
        model=str(tiny_models("llama")), out=out, target="h200", backend="onnxruntime",
        max_seq_len=256,
    )  # fmt: skip
    report = compile_model(options).report
    return out, ModelSpec.from_dict(report["spec"])


def test_an_emulated_gpu_graph_keeps_the_builds_io_and_data_file(cuda_build):
    """The GPU graph's check form: every fp16 tensor a node computes is rounded (Cast to fp16
    and back) and each node computes in fp32, while the graph keeps the build's fp16 I/O (the
    KV cache) and reads the weights ONNX ops read from the build's own data file, in fp16."""
    out, _ = cuda_build
    path = out / "model.onnx"
    args = lighter_session_args(path, emulate=True)
    assert args["optimization"] == "disable"  # no folding of the weights' Casts into fp32
    model = ir.serde.deserialize_model(onnx.load_from_string(args["model_bytes"]))
    built = ir.load(path)
    assert [(v.name, v.dtype) for v in model.graph.inputs] == [
        (v.name, v.dtype) for v in built.graph.inputs
    ]
    assert [(v.name, v.dtype) for v in model.graph.outputs] == [
        (v.name, v.dtype) for v in built.graph.outputs
    ]
    fp16 = ir.DataType.FLOAT16
    for node in model.graph:
        if node.op_type != "Cast":  # only the rounding and reading Casts make fp16
            assert all(v.dtype != fp16 for v in node.outputs), node
    stored = [v for v in model.graph.initializers.values() if v.dtype == fp16]
    # Every fp16 weight stays as built (the large ones in the build's data file), fused
    # ops' scales and rotary tables included; only Casts read them.
    built_low = [v.name for v in built.graph.initializers.values() if v.dtype == fp16]
    assert sorted(v.name for v in stored) == sorted(built_low)
    large = [v for v in stored if v.const_value.nbytes >= 4096]
    assert large and all(isinstance(v.const_value, ir.ExternalTensor) for v in large)
    assert all(u.node.op_type == "Cast" for v in stored for u in v.uses())
    # Every com.microsoft node (GroupQueryAttention, SkipSimplifiedLayerNormalization, ...)
    # reads fp32: the CPU runs its fp32 kernel, the rounding is at its edges.
    fused = [n for n in model.graph if n.domain == "com.microsoft"]
    assert fused and all(v.dtype != fp16 for n in fused for v in n.inputs if v is not None)
    session = OrtModel(open_session(path, prepack=False, **args))
    assert session.kv_dtype == np.float16 and session.shares_kv_buffer


def test_sliced_runs_of_an_emulated_gpu_graph_give_one_sessions_logits(cuda_build):
    out, spec = cuda_build
    path = out / "model.onnx"
    whole = OrtModel(open_session(path, prepack=False, **lighter_session_args(path, emulate=True)))
    sliced = SlicedModel(path, spec=spec, max_slice_bytes=1, emulate=True)
    assert len(sliced.slices) == 2 and sliced.optimization == "disable"
    assert sliced.to_dict()["emulated"] is True
    # A slice's emulated graph reads only its own layers' weights (it once read every weight
    # of the build through a Cast: an 8B's first slice held all 15 GB and more).
    first = ir.serde.deserialize_model(
        onnx.load_from_string(sliced._slice_model(sliced.slices[0], {}))
    )
    names = set(first.graph.initializers)
    assert "model.layers.0.mlp.down_proj.weight" in names
    assert not any(name.startswith("model.layers.1.") for name in names)
    ids = np.random.default_rng(3).integers(0, 300, size=(1, 20))
    want = logits_through_cache(whole, ids, 12)
    np.testing.assert_allclose(logits_through_cache(sliced, ids, 12), want, rtol=0, atol=1e-5)
