"""The weight-site library (fdec.passes.weights) on hand-written graphs, checked in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from graphs import ir_model, random_array, run_ort, tiny_spec

from fdec.ir import FdecModel
from fdec.passes import weights

_GRAPH = """
<ir_version: 10, opset_import: ["" : 20]>
g (float[2, 8] x) => (float[2, 4] y, float[2, 4] z, float[2, 8] e) {
    wt = Transpose <perm = [1, 0]> (w)
    y = MatMul (x, wt)
    z = Gemm <transB = 1> (x, v, bias)
    e = Add (x, x)
}
"""


def _model() -> tuple[FdecModel, dict[str, np.ndarray]]:
    arrays = {"w": random_array(4, 8, seed=1), "v": random_array(4, 8, seed=2),
              "bias": random_array(4, seed=3)}  # fmt: skip
    spec = tiny_spec(weights={"layers.0.q": "w", "layers.0.k": "v"}, outputs=["y", "z", "e"])
    return FdecModel(ir_model(_GRAPH, arrays), spec), arrays


def test_find_weight_reads_through_transposes_and_gemm_trans_b():
    model, arrays = _model()
    through_transpose = weights.find_weight(model.graph, "w")
    assert through_transpose.array.shape == (8, 4)  # [K, N] as MatMul's B
    np.testing.assert_array_equal(through_transpose.array, arrays["w"].T)
    assert len(through_transpose.sites) == 1 and len(through_transpose.transposes) == 1
    gemm = weights.find_weight(model.graph, "v")
    assert gemm.sites[0].node.op_type == "Gemm" and gemm.sites[0].bias is not None
    np.testing.assert_array_equal(gemm.array, arrays["v"].T)


@pytest.mark.parametrize(
    ("name", "reason"), [("bias", "not a 2-D weight"), ("nothing", "not an initializer")]
)
def test_find_weight_names_why_it_refuses(name, reason):
    model, _ = _model()
    with pytest.raises(ValueError, match=reason):
        weights.find_weight(model.graph, name)


def test_collect_weights_takes_the_specs_linear_roles():
    model, _ = _model()
    found, skipped = weights.collect_weights(model, include_lm_head=True)
    assert [w.value.name for w in found] == ["w", "v"] and not skipped
    assert weights.candidate_names(model, include_lm_head=False) == ["w", "v"]
    assert weights.LAYER_ROLE.match("layers.3.gate").group(1) in weights.LINEAR_ROLES


def test_replace_site_and_retire_weight_keep_the_graph_running():
    """Replace the transposed MatMul by one reading a new [K, N] initializer: same outputs."""
    model, _ = _model()
    x = random_array(2, 8, seed=4)
    want = run_ort(model.model, {"x": x})
    graph = model.graph
    weight = weights.find_weight(graph, "w")
    taken: set[str] = set()
    name = weights.fresh_name(graph, "w", taken)
    assert name == "_w" and name in taken  # "w" is still an initializer
    new = weights.add_initializer(graph, name, ir.tensor(np.ascontiguousarray(weight.array)))
    site = weight.sites[0]
    weights.replace_site(graph, site, [ir.node("MatMul", [site.activation, new])])
    weights.retire_weight(graph, weight)
    assert "w" not in graph.initializers and "_w" in graph.initializers
    assert not any(node.op_type == "Transpose" for node in graph)
    got = run_ort(model.model, {"x": x})
    for a, b in zip(want, got, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_raise_opset_only_upwards():
    model, _ = _model()
    assert weights.raise_opset(model, 21) is True
    assert model.model.opset_imports[""] == 21
    assert weights.raise_opset(model, 19) is False and model.model.opset_imports[""] == 21


def test_weight_shape_does_not_read_a_lazily_bound_weight():
    """A streamed compile binds weights to the checkpoint: a pass asking a weight's [K, N]
    (the static quantizers check every group's before rewriting any) must not read it, or an
    8B model's float copies pile up (issue 19: the fp8 pass grew past 14 GiB that way)."""
    model, arrays = _model()
    for name in ("w", "v"):
        array = arrays[name]

        def refuse() -> ir.Tensor:
            raise AssertionError("the weight was read")

        value = model.graph.initializers[name]
        value.const_value = ir.LazyTensor(
            refuse, dtype=ir.DataType.FLOAT, shape=ir.Shape(array.shape)
        )
        weight = weights.find_weight(model.graph, name)
        assert weight.shape == (8, 4)  # [K, N], the initializer being [N, K]
        with pytest.raises(AssertionError, match="was read"):
            _ = weight.array


def test_release_closes_an_external_weights_memory_map(tmp_path):
    """A weight in a data file (a spilled weight, the build's own) is read through a memory
    map whose pages count in RSS while it is open: release closes it (an 8B's spilled 2.1 GB
    lm_head stayed mapped into the fp8 pass), and the weight reads again."""
    model, arrays = _model()
    for name in ("w", "v"):
        (tmp_path / f"{name}.data").write_bytes(arrays[name].tobytes())
        model.graph.initializers[name].const_value = ir.ExternalTensor(
            f"{name}.data", 0, arrays[name].nbytes, ir.DataType.FLOAT,
            shape=ir.Shape(arrays[name].shape), name=name, base_dir=tmp_path,
        )  # fmt: skip
        weight = weights.find_weight(model.graph, name)
        tensor = weight.value.const_value
        np.testing.assert_array_equal(weight.array, arrays[name].T)
        assert tensor.raw is not None  # mapped while the array is held
        weight.release()
        assert tensor.raw is None
        np.testing.assert_array_equal(weight.array, arrays[name].T)


@pytest.mark.parametrize("channel_axis", [0, 1])
@pytest.mark.parametrize(("qmax", "code", "rint"), [(127, np.int8, True), (448.0, "fp8", False)])
def test_per_channel_quantize_in_chunks_is_the_whole_array_one(
    monkeypatch, channel_axis, qmax, code, rint
):
    import ml_dtypes

    code = ml_dtypes.float8_e4m3fn if code == "fp8" else code
    array = random_array(301, 40, seed=4)
    array[:, 5] = 0.0
    array[7, :] = 0.0
    axis = 1 - channel_axis  # reduced over
    peak = np.abs(array).max(axis=axis, keepdims=True)
    scales = np.where(peak > 0, peak / qmax, 1.0).astype(np.float32)
    x = array / scales
    want = np.clip(np.rint(x) if rint else x, -qmax, qmax).astype(code)
    monkeypatch.setattr(weights, "_CHUNK_BYTES", 4 * 40 * 16)  # 16 rows a step: 19 steps
    codes, got_scales = weights.per_channel_quantize(
        array, qmax, code, channel_axis=channel_axis, rint=rint
    )
    np.testing.assert_array_equal(got_scales, scales.reshape(-1))
    assert codes.dtype == want.dtype
    np.testing.assert_array_equal(codes.view(np.uint8), want.view(np.uint8))
