"""Tests of quantize-embedding on a tiny exported llama and on small hand-written graphs.

The tiny llama is exported once per module (tied as imported; untied and cleaned). Each test
quantizes a fresh copy, checks the graph it left (op types, the codes and scales initializers,
the ModelSpec, stats), unpacks the stored codes with numpy following the operator specs,
runs the embedding subgraph in ONNX Runtime against that unpacking, and runs the whole model
against the PyTorch reference.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx_ir as ir
import pytest
from exported import export_tiny, load, run_pass
from graphs import ir_model, tiny_spec
from onnx import helper

import fdec.passes.quantize_embedding as quantize_embedding
from fdec.errors import UsageError
from fdec.ir import FdecModel, ModelSpec
from fdec.passes.quantize_embedding import QuantizeEmbeddingPass
from fdec.pipeline import Pass, PassManager
from fdec.runtime import session_for_model
from fdec.verify import Reference

_MS = "com.microsoft"
_VOCAB, _HIDDEN = 320, 64  # the tiny llama's embedding table


@dataclasses.dataclass
class _Tiny:
    """The tiny llama as imported (tied) and untied + cleaned, its reference, and the name of
    the embedding Gather's output (the quantized forms keep it)."""

    tied_proto: bytes
    tied_spec: ModelSpec
    proto: bytes
    spec: ModelSpec
    reference: Reference
    rows_name: str

    def tied(self) -> FdecModel:
        return load(self.tied_proto, self.tied_spec)

    def cleaned(self) -> FdecModel:
        return load(self.proto, self.spec)

    def table(self) -> np.ndarray:
        model = self.cleaned()
        return model.graph.initializers[model.spec.weights["embed"]].const_value.numpy().copy()


@pytest.fixture(scope="module")
def llama(tiny_models, tmp_path_factory) -> _Tiny:
    tiny = export_tiny(tiny_models, tmp_path_factory, "llama")
    model = tiny.cleaned()
    (use,) = model.graph.initializers[model.spec.weights["embed"]].uses()
    assert use.node.op_type == "Gather"
    rows_name = use.node.outputs[0].name
    return _Tiny(tiny.tied_proto, tiny.tied_spec, tiny.proto, tiny.spec, tiny.reference, rows_name)


def _ops(model: FdecModel) -> collections.Counter:
    return collections.Counter(
        (node.domain or "", node.op_type)
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
    )


def _run_value(model: FdecModel, name: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Run only the nodes computing value `name` (from the graph inputs in `feeds`) in ORT."""
    import onnxruntime as ort

    (dtype,) = {
        int(output.dtype)
        for node in model.graph
        for output in node.outputs
        if output.name == name and output.dtype is not None
    }
    proto = ir.serde.serialize_model(model.model)
    nodes = list(proto.graph.node)
    producer = {output: index for index, node in enumerate(nodes) for output in node.output}
    wanted: set[int] = set()
    stack = [name]
    while stack:
        index = producer.get(stack.pop())
        if index is not None and index not in wanted:
            wanted.add(index)
            stack.extend(value for value in nodes[index].input if value)
    chain = [nodes[index] for index in sorted(wanted)]
    used = {value for node in chain for value in node.input}
    inputs = [value for value in proto.graph.input if value.name in used]
    graph = helper.make_graph(
        chain,
        "embedding",
        inputs,
        [helper.make_tensor_value_info(name, dtype, None)],
        [tensor for tensor in proto.graph.initializer if tensor.name in used],
    )
    small = helper.make_model(graph, opset_imports=proto.opset_import, ir_version=proto.ir_version)
    session = ort.InferenceSession(small.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {value.name: feeds[value.name] for value in inputs})[0]


# --- numpy references of the stored formats ---------------------------------------------------


def _check_int8(table: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """codes [V, H] and scales [V] are `table`'s symmetric per-row int8; returns the rows.

    The scale is the row's largest magnitude / 127 (1 for an all-zero row, codes 0); every
    dequantized value is the round-to-nearest of the original, within half a step.
    """
    peak = np.abs(table).max(axis=1).astype(np.float64)
    np.testing.assert_allclose(scales, np.where(peak > 0, peak / 127, 1.0), rtol=1e-6)
    step = scales.astype(np.float64)[:, None]
    np.testing.assert_array_equal(codes, np.clip(np.rint(table / step), -127, 127))
    np.testing.assert_array_equal(np.abs(codes).max(axis=1), np.where(peak > 0, 127, 0))
    dequantized = codes * step
    assert np.all(np.abs(dequantized - table) <= step / 2 * (1 + 1e-5))
    return dequantized


def _check_int4(table: np.ndarray, codes: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """codes [V, H] (-8..7) and scales [V, ceil(H / block)] are `table`'s 4-bit blocks.

    The scale is the block's largest magnitude / 8 (1 for an all-zero block); values within
    half a step, except values over 7.5 steps, clipped to 7 (within one step).
    """
    rows, hidden = table.shape
    blocks = -(-hidden // block)
    assert scales.shape == (rows, blocks)
    padded = np.zeros((rows, blocks * block))
    padded[:, :hidden] = table
    peak = np.abs(padded.reshape(rows, blocks, block)).max(axis=2)
    np.testing.assert_allclose(scales, np.where(peak > 0, peak / 8, 1.0), rtol=1e-6)
    step = np.repeat(scales.astype(np.float64), block, axis=1)[:, :hidden]
    unclipped = np.rint(table / step)
    np.testing.assert_array_equal(codes, np.clip(unclipped, -8, 7))
    dequantized = codes * step
    error = np.abs(dequantized - table)
    clipped = unclipped > 7
    assert np.all(error[~clipped] <= step[~clipped] / 2 * (1 + 1e-5))
    assert np.all(error <= step * (1 + 1e-5))
    assert clipped.sum() < 0.05 * clipped.size  # only positive block maxima clip
    return dequantized


def _unpack_uint4(packed: np.ndarray, count: int) -> np.ndarray:
    """uint8 [V, ceil(H / 2)], low nibble first, zero point 8 → int codes [V, H]."""
    values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
    return values[:, :count].astype(np.int32) - 8


def _assert_model_close(model: FdecModel, reference: Reference, pass_: Pass, bits: int) -> dict:
    """The whole model within the pass's tolerance, and within what the tiny llama measured."""
    figures = reference.compare(session_for_model(model))
    tolerance = pass_.tolerance
    assert tolerance.judge(figures) is None, figures
    assert figures["max_abs_error"] > 1e-3  # the table really changed
    # Measured: 8 bits 0.025 / top-1 0.99 / perplexity +0.02 %; 4 bits 0.43–0.46 / 0.77–0.80 /
    # +0.3–0.5 %. A wrong scale or zero point moves the logits by far more.
    limit, top1, growth = (0.1, 0.95, 0.005) if bits == 8 else (1.5, 0.6, 0.03)
    assert figures["max_abs_error"] < limit, figures
    assert figures["top1_agreement"] >= top1, figures
    ratio = figures["perplexity_build"] / figures["perplexity_source"]
    assert abs(ratio - 1) < growth, figures
    return figures


def _expected_stats(bits: int, backend: str, bytes_after: int, **extra) -> dict:
    return {
        "rows": _VOCAB,
        "gathers": 1,
        "bytes_before": _VOCAB * _HIDDEN * 4,
        "bytes_after": bytes_after,
        "bits": bits,
        "backend": backend,
        "fallback": None,
        "skipped": None,
        **extra,
    }


# --- onnxruntime backend ----------------------------------------------------------------------


def test_int8_gathers_int8_rows_and_their_scales(llama):
    table = llama.table()
    old_name = llama.spec.weights["embed"]
    pass_ = QuantizeEmbeddingPass()

    model, record = run_pass(pass_, llama.cleaned())

    assert old_name not in model.graph.initializers  # no fp32 table left
    assert model.spec_problems() == []
    codes_value = model.graph.initializers[model.spec.weights["embed"]]
    assert codes_value.dtype == ir.DataType.INT8 and codes_value.shape == ir.Shape([320, 64])
    (use,) = codes_value.uses()
    rows = use.node
    assert (rows.op_type, rows.domain, use.idx) == ("Gather", "", 0)
    (cast_use,) = rows.outputs[0].uses()
    cast = cast_use.node
    assert cast.op_type == "Cast" and cast.attributes["to"].as_int() == ir.DataType.FLOAT
    (mul_use,) = cast.outputs[0].uses()
    mul = mul_use.node
    assert mul.op_type == "Mul" and mul.outputs[0].name == llama.rows_name
    row_scales = mul.inputs[1].producer()
    assert row_scales.op_type == "Gather" and row_scales.inputs[1] is rows.inputs[1]
    scales_value = row_scales.inputs[0]
    assert scales_value.dtype == ir.DataType.FLOAT and scales_value.shape == ir.Shape([320, 1])
    assert _MS not in model.model.opset_imports
    assert model.model.opset_imports[""] == llama.cleaned().model.opset_imports[""]

    codes = codes_value.const_value.numpy().astype(np.int32)
    scales = scales_value.const_value.numpy()[:, 0]
    dequantized = _check_int8(table, codes, scales)
    ids = llama.reference.ids
    got = _run_value(model, llama.rows_name, {"input_ids": ids})
    np.testing.assert_allclose(got, dequantized[ids], rtol=1e-6, atol=0)
    # 320 × 64 codes of one byte and 320 float32 scales, instead of 4 bytes a value.
    assert record.stats == _expected_stats(8, "onnxruntime", 20_480 + 1_280)
    assert record.before.bytes - record.after.bytes == 81_920 - 21_760
    _assert_model_close(model, llama.reference, pass_, 8)

    again = QuantizeEmbeddingPass()(model)
    assert again.modified is False
    assert again.stats["skipped"] == f"embedding {codes_value.name!r} is INT8, not a float table"


@pytest.mark.parametrize("block", [32, 128], ids=["b32", "b128-partial"])
def test_int4_uses_gather_block_quantized(llama, block):
    table = llama.table()
    pass_ = QuantizeEmbeddingPass(bits=4, block_size=block)

    model, record = run_pass(pass_, llama.cleaned())

    blocks = -(-64 // block)
    assert model.spec_problems() == []
    data = model.graph.initializers[model.spec.weights["embed"]]
    (use,) = data.uses()
    node = use.node
    assert (node.domain, node.op_type, use.idx) == (_MS, "GatherBlockQuantized", 0)
    assert node.outputs[0].name == llama.rows_name
    assert len(node.inputs) == 3  # no zero points: uint8 data means zero point 8
    attributes = {name: attr.value for name, attr in node.attributes.items()}
    assert attributes == {"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": 4}
    assert model.model.opset_imports[_MS] == 1
    assert data.dtype == ir.DataType.UINT8 and data.shape == ir.Shape([320, 32])
    scales_value = node.inputs[2]
    assert scales_value.dtype == ir.DataType.FLOAT
    assert scales_value.shape == ir.Shape([320, blocks])
    assert _ops(model)[("", "Cast")] == _ops(llama.cleaned())[("", "Cast")]

    codes = _unpack_uint4(data.const_value.numpy(), 64)
    scales = scales_value.const_value.numpy()
    dequantized = _check_int4(table, codes, scales, block)
    ids = llama.reference.ids
    got = _run_value(model, llama.rows_name, {"input_ids": ids})
    np.testing.assert_allclose(got, dequantized[ids], rtol=1e-6, atol=0)
    assert record.stats == _expected_stats(4, "onnxruntime", 320 * 32 + 320 * blocks * 4)
    _assert_model_close(model, llama.reference, pass_, 4)


def test_int4_falls_back_to_8_bits_when_onnxruntime_cannot_gather_blocks(llama, monkeypatch):
    reason = "onnxruntime 1.0 cannot run GatherBlockQuantized: not implemented"
    monkeypatch.setattr(quantize_embedding, "_gather_block_quantized_problem", lambda b: reason)

    model, record = run_pass(QuantizeEmbeddingPass(bits=4), llama.cleaned())

    assert record.stats["bits"] == 8
    assert record.stats["fallback"] == f"{reason}; stored in 8 bits instead"
    assert record.stats["bytes_after"] == 21_760
    assert _ops(model)[(_MS, "GatherBlockQuantized")] == 0
    assert model.graph.initializers[model.spec.weights["embed"]].dtype == ir.DataType.INT8


def test_gather_block_quantized_runs_in_this_onnxruntime():
    for block in (16, 32, 64, 128):
        assert quantize_embedding._gather_block_quantized_problem(block) is None


# --- tensorrt backend: standard ONNX only -----------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_tensorrt_backend_dequantizes_the_table_then_gathers(llama, bits):
    table = llama.table()
    pass_ = QuantizeEmbeddingPass(bits=bits, backend="tensorrt")

    model, record = run_pass(pass_, llama.cleaned())

    assert all(domain == "" for domain, _ in _ops(model))
    assert _MS not in model.model.opset_imports
    assert model.spec_problems() == []
    codes_value = model.graph.initializers[model.spec.weights["embed"]]
    (use,) = codes_value.uses()
    dequantize = use.node
    assert (dequantize.op_type, use.idx) == ("DequantizeLinear", 0)
    assert len(dequantize.inputs) == 2  # no zero point (TensorRT: symmetric only)
    (gather_use,) = dequantize.outputs[0].uses()
    gather = gather_use.node
    assert (gather.op_type, gather_use.idx) == ("Gather", 0)
    assert gather.outputs[0].name == llama.rows_name
    scales = dequantize.inputs[1].const_value.numpy()
    assert scales.dtype == np.float32 and np.all(scales > 0)  # TensorRT: strictly positive
    attributes = {name: attr.value for name, attr in dequantize.attributes.items()}
    codes = codes_value.const_value.numpy().astype(np.int32)
    assert codes_value.shape == ir.Shape([320, 64])
    if bits == 8:
        assert codes_value.dtype == ir.DataType.INT8
        assert attributes == {"axis": 0} and scales.shape == (320,)
        assert model.model.opset_imports[""] >= 13
        assert record.stats["opset_raised"] is False  # the export is already opset 20
        dequantized = _check_int8(table, codes, scales)
        bytes_after = 20_480 + 1_280
    else:
        assert codes_value.dtype == ir.DataType.INT4
        assert attributes == {"axis": 1, "block_size": 32} and scales.shape == (320, 2)
        assert model.model.opset_imports[""] >= 21
        assert record.stats["opset_raised"] is True
        dequantized = _check_int4(table, codes, scales, 32)
        bytes_after = 320 * 32 + 320 * 2 * 4  # two int4 codes a byte
    ids = llama.reference.ids
    got = _run_value(model, llama.rows_name, {"input_ids": ids})
    np.testing.assert_allclose(got, dequantized[ids], rtol=1e-6, atol=0)
    assert record.stats == _expected_stats(bits, "tensorrt", bytes_after, opset_raised=bits == 4)
    _assert_model_close(model, llama.reference, pass_, bits)


def test_both_backends_store_the_same_values(llama):
    ids = llama.reference.ids
    for bits in (8, 4):
        rows = [
            _run_value(
                run_pass(QuantizeEmbeddingPass(bits=bits, backend=backend), llama.cleaned())[0],
                llama.rows_name,
                {"input_ids": ids},
            )
            for backend in ("onnxruntime", "tensorrt")
        ]
        np.testing.assert_array_equal(rows[0], rows[1])


# --- tied embeddings, options -----------------------------------------------------------------


def test_requires_untied_embeddings(llama):
    tied = llama.tied()
    assert tied.spec.tie_word_embeddings

    with pytest.raises(UsageError) as caught:
        QuantizeEmbeddingPass().requires(tied)
    assert "untie-embeddings" in caught.value.fix
    assert "tied" in caught.value.problem
    with pytest.raises(UsageError, match="untie-embeddings"):
        PassManager([QuantizeEmbeddingPass(bits=4)]).run(llama.tied())
    QuantizeEmbeddingPass().requires(llama.cleaned())


def test_a_shared_table_is_left_alone_when_called_without_requires(llama):
    model = llama.tied()
    embed = model.spec.weights["embed"]

    result = QuantizeEmbeddingPass().apply(model)  # Pass.__call__ runs requires first

    assert result.modified is False
    assert result.stats["skipped"].startswith(f"embedding {embed!r} is also read by")
    assert model.graph.initializers[embed].dtype == ir.DataType.FLOAT
    assert model.spec.weights["lm_head"] == embed
    assert model.spec_problems() == []


def test_options_are_checked_and_keyword_only():
    with pytest.raises(UsageError, match="bits 2"):
        QuantizeEmbeddingPass(bits=2)
    with pytest.raises(UsageError, match="backend 'tvm'"):
        QuantizeEmbeddingPass(backend="tvm")
    with pytest.raises(UsageError, match="block_size 48"):
        QuantizeEmbeddingPass(block_size=48)
    with pytest.raises(TypeError):
        QuantizeEmbeddingPass(4)
    assert QuantizeEmbeddingPass().options() == {
        "bits": 8,
        "backend": "onnxruntime",
        "block_size": 32,
        "skip_shared": False,
    }


# --- a small graph: two Gathers of one table, a hidden size that is not a whole block ---------

_TWO_GATHERS = """
<ir_version: 10, opset_import: ["" : 17]>
g (int64[3] a, int64[2, 2] b) => (float[3, 96] y, float[2, 2, 96] z) {
    z = Gather <axis = 0> (emb, b)
    y = Gather (emb, a)
}
"""


def _two_gathers() -> tuple[FdecModel, np.ndarray]:
    table = np.random.default_rng(0).standard_normal((16, 96)).astype(np.float32)
    table[5] = 0.0  # an all-zero row (a pad token's)
    spec = tiny_spec(
        vocab_size=16,
        hidden_size=96,
        weights={"embed": "emb"},
        inputs=["a", "b"],
        outputs=["y", "z"],
    )
    return FdecModel(ir_model(_TWO_GATHERS, {"emb": table}), spec), table


@pytest.mark.parametrize(
    "bits, backend",
    [(8, "onnxruntime"), (4, "onnxruntime"), (8, "tensorrt"), (4, "tensorrt")],
)
def test_every_gather_of_the_table_is_rewritten(bits, backend):
    model, table = _two_gathers()
    feeds = {"a": np.array([5, 0, 15]), "b": np.array([[1, 5], [-1, 2]])}

    model, record = run_pass(
        QuantizeEmbeddingPass(bits=bits, backend=backend, block_size=64), model
    )

    assert record.stats["gathers"] == 2 and record.stats["rows"] == 16
    assert "emb" not in model.graph.initializers
    assert [value.name for value in model.graph.outputs] == ["y", "z"]
    if bits == 8:
        peak = np.abs(table).max(axis=1)
        step = np.where(peak > 0, peak / 127, 1.0)[:, None]
        dequantized = np.clip(np.rint(table / step), -127, 127) * step
    else:
        padded = np.zeros((16, 128))
        padded[:, :96] = table
        peak = np.abs(padded.reshape(16, 2, 64)).max(axis=2)
        step = np.repeat(np.where(peak > 0, peak / 8, 1.0), 64, axis=1)[:, :96]
        dequantized = np.clip(np.rint(table / step), -8, 7) * step
    assert np.all(dequantized[5] == 0)
    y, z = (_run_value(model, name, feeds) for name in ("y", "z"))
    np.testing.assert_allclose(y, dequantized[feeds["a"]], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(z, dequantized[feeds["b"]], rtol=1e-6, atol=1e-7)
    assert np.abs(y - table[feeds["a"]]).max() > 0  # really quantized


_HALF_TABLE = """
<ir_version: 10, opset_import: ["" : 17]>
g (int64[3] a) => (float16[3, 96] y) {
    y = Gather (emb, a)
}
"""


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_a_float16_table_keeps_float16_scales_and_rows(bits, backend):
    table = np.random.default_rng(0).standard_normal((16, 96)).astype(np.float16)
    spec = tiny_spec(vocab_size=16, hidden_size=96, weights={"embed": "emb"}, inputs=["a"])
    model = FdecModel(ir_model(_HALF_TABLE, {"emb": table}), spec)

    model, record = run_pass(QuantizeEmbeddingPass(bits=bits, backend=backend), model)

    scales = [
        value for value in model.graph.initializers.values() if value.dtype == ir.DataType.FLOAT16
    ]
    assert [value.name for value in scales] == ["emb_scales"]
    if backend == "tensorrt":  # float16 DequantizeLinear scales need opset 19
        assert record.stats["opset_raised"] is True
        assert model.model.opset_imports[""] == (19 if bits == 8 else 21)
    ids = np.array([1, 5, 15])
    rows = _run_value(model, "y", {"a": ids})
    assert rows.dtype == np.float16
    peak = np.abs(table[ids].astype(np.float32)).max(axis=1, keepdims=True)
    step = peak / (127 if bits == 8 else 8)  # the largest step of each row
    error = np.abs(rows.astype(np.float32) - table[ids])
    assert 0 < error.max() and np.all(error <= step * (1.0 if bits == 4 else 0.5) + 2e-3)


# --- TensorRT accepts the tensorrt form, and refuses the gather-first one ---------------------


def _rtx_unavailable() -> str | None:
    from fdec.lower.tensorrt_rtx import available

    return available()


@pytest.mark.skipif(_rtx_unavailable() is not None, reason="TensorRT-RTX is not usable here")
@pytest.mark.parametrize(
    "bits, backend, built",
    [(8, "tensorrt", True), (4, "tensorrt", True), (8, "onnxruntime", False)],
)
def test_tensorrt_rtx_builds_the_tensorrt_form_only(tmp_path, bits, backend, built):
    from fdec.lower.profiles import ShapeLimits
    from fdec.lower.tensorrt_rtx import build_engine

    model, _ = _two_gathers()
    model, _ = run_pass(QuantizeEmbeddingPass(bits=bits, backend=backend, block_size=64), model)
    path = tmp_path / "model.onnx"
    model.save(path)

    result = build_engine(
        path,
        tmp_path / "engine",
        # One empty profile: the hand-written inputs are static.
        spec=dataclasses.replace(model.spec, kind="encoder", inputs=[]),
        limits=ShapeLimits(max_batch=1, max_seq_len=16),
        compute_capability=(8, 9),
        purpose="check",
    )

    if built:
        assert result.status == "built", result.reason
    else:
        assert result.status == "failed"
        assert "Quantized constant" in result.reason


def test_an_fp32_table_is_quantized_without_a_whole_float_copy():
    """The pass reads an fp32 table as it is: a streamed 8B's 2.1 GB table was held twice
    (the read and an fp32 copy of it). Traced by numpy's allocations: codes, scales and one
    ~64 MB block of temporaries, well under the table's own bytes."""
    import tracemalloc

    rows, hidden = 16384, 4096  # 256 MB of fp32
    table = ir.Value(name="embed", const_value=ir.tensor(
        np.random.default_rng(0).standard_normal((rows, hidden), dtype=np.float32)))  # fmt: skip
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([None]))
    gather = ir.node("Gather", [table, ids], {"axis": 0}, name="embedding")
    graph = ir.Graph([ids], gather.outputs, nodes=[gather], initializers=[table],
                     opset_imports={"": 21})  # fmt: skip
    spec = tiny_spec(vocab_size=rows, hidden_size=hidden, weights={"embed": "embed"})
    model = FdecModel(ir.Model(graph, ir_version=10), spec)
    tracemalloc.start()
    try:
        result = QuantizeEmbeddingPass()(model)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.stats["rows"] == rows and result.stats["bytes_after"] < table.const_value.nbytes
    assert peak < table.const_value.nbytes, peak  # measured 0.75 of it; 1.75 with a copy
