"""Tests of sparsify-2of4: magnitude 2:4 masks along K, refusals, metadata, and the TensorRT flags.

The tiny llama is exported once per module (untied and cleaned); each test masks a fresh copy,
checks every masked weight with numpy against the original (at most 2 nonzeros in each group of
4 along K, and they are the 2 largest magnitudes, unchanged), and runs the result in ONNX
Runtime against the PyTorch reference. The CLI tests compile the tiny model for a100 (TensorRT
plan) and rtx4090 (a real TensorRT-RTX engine) and check the sparse-weights flag reaches them.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx_ir as ir
import pytest
from exported import export_tiny, matmul_weights, run_pass
from graphs import ir_model, run_ort, tiny_spec

from fdec.calibrate import calibration_batches, capture_activations, load_calibration_texts
from fdec.cli import cli
from fdec.compile import plan_pipeline
from fdec.errors import UsageError
from fdec.ir import FdecModel
from fdec.lower.profiles import ShapeLimits
from fdec.lower.tensorrt import graph_sparsity, plan_engine
from fdec.lower.tensorrt_rtx import available as rtx_available
from fdec.passes.quantize import QuantizeInt4Pass
from fdec.passes.sparsity import (
    SPARSITY_METADATA,
    Sparsify2of4Pass,
    mask_2of4,
    sparse_groups_ok,
)
from fdec.runtime import session_for_model
from fdec.targets import load_target

needs_rtx = pytest.mark.skipif(rtx_available() is not None, reason=str(rtx_available()))

_LAYER_ROLE = re.compile(r"^layers\.(\d+)\.(\w+)$")


@pytest.fixture(scope="module")
def tiny(tiny_models, tmp_path_factory):
    return export_tiny(tiny_models, tmp_path_factory, "llama")


def _assert_2of4_of(before: np.ndarray, after: np.ndarray) -> None:
    """`after` ([K, N]) keeps exactly the 2 largest |w| of `before` in every group of 4 along K."""
    k, n = before.shape
    assert k % 4 == 0
    groups, masked = before.reshape(k // 4, 4, n), after.reshape(k // 4, 4, n)
    kept = masked != 0
    assert (kept.sum(axis=1) == 2).all()  # random weights: no zeros, no ties
    np.testing.assert_array_equal(masked[kept], groups[kept])  # kept values are unchanged
    largest = np.sort(np.abs(groups), axis=1)[:, 2:, :]
    np.testing.assert_array_equal(np.sort(np.abs(masked), axis=1)[:, 2:, :], largest)


def _role(role: str) -> str | None:
    match = _LAYER_ROLE.match(role)
    return match.group(2) if match else None


def test_mlp_weights_get_2of4_masks_and_the_rest_is_untouched(tiny):
    before = tiny.weights()
    model, record = run_pass(Sparsify2of4Pass(), tiny.cleaned())
    after = matmul_weights(model)

    masked = {role for role in after if _role(role) in ("gate", "up", "down")}
    assert len(masked) == 3 * model.spec.num_layers
    for role in masked:
        assert sparse_groups_ok(after[role])
        _assert_2of4_of(before[role], after[role])
    for role in set(after) - masked:  # q/k/v/o and the lm_head stay dense, bit for bit
        np.testing.assert_array_equal(after[role], before[role])
    embed = model.spec.weights["embed"]
    np.testing.assert_array_equal(
        model.graph.initializers[embed].const_value.numpy(),
        tiny.cleaned().graph.initializers[embed].const_value.numpy(),
    )

    stats = record.stats
    elements = sum(before[role].size for role in masked)
    assert stats["weights_masked"] == len(masked) and stats["matmuls"] == len(masked)
    assert stats["elements"] == elements and stats["zeros"] == stats["values_zeroed"]
    assert stats["zero_fraction"] == 0.5 and stats["skipped"] == {}
    # fp32: each group of 4 (16 bytes) is stored as 2 values (8 bytes) + 2 × 2-bit indices.
    assert stats["bytes_saved_when_compressed"] == elements // 4 * (16 - 8 - 0.5)
    assert 0.5 < stats["magnitude_kept"] < 1.0
    assert record.modified
    recorded = json.loads(model.model.metadata_props[SPARSITY_METADATA])
    assert recorded["pattern"] == "2:4"
    assert sorted(recorded["roles"]) == sorted(masked)


def test_sparse_graph_runs_in_onnx_runtime_within_its_tolerance(tiny):
    dense = tiny.reference.compare(session_for_model(tiny.cleaned()))
    model, _ = run_pass(Sparsify2of4Pass(), tiny.cleaned())
    figures = tiny.reference.compare(session_for_model(model))
    assert dense["max_abs_error"] < 1e-3
    assert figures["max_abs_error"] > 0.05  # the masks changed the outputs: lossy, reported
    assert Sparsify2of4Pass.tolerance.judge(figures) is None
    # measured: tiny llama perplexity 380.3 → 372.2, well inside the default +100 % gate
    assert figures["perplexity_build"] < 2 * figures["perplexity_source"]


def test_roles_all_and_dense_end_layers(tiny):
    before = tiny.weights()
    layers = tiny.spec.num_layers
    model, record = run_pass(Sparsify2of4Pass(roles="all", skip_last=1), tiny.cleaned())
    after = matmul_weights(model)
    for role in after:
        match = _LAYER_ROLE.match(role)
        if match and int(match.group(1)) < layers - 1:
            _assert_2of4_of(before[role], after[role])
        else:  # the last layer and the lm_head stay dense
            np.testing.assert_array_equal(after[role], before[role])
    assert record.stats["by_role"] == {
        r: layers - 1 for r in ("down", "gate", "k", "o", "q", "up", "v")
    }

    model, record = run_pass(Sparsify2of4Pass(roles="q, o", skip_first=1), tiny.cleaned())
    after = matmul_weights(model)
    changed = {role for role in after if not np.array_equal(after[role], before[role])}
    assert changed == {f"layers.{i}.{r}" for i in range(1, layers) for r in ("q", "o")}


def test_activation_score_weighs_channels_by_calibration_norms(tiny):
    batches = calibration_batches(
        load_calibration_texts(), tiny.tokenizer, tiny.spec.vocab_size, max_samples=4
    )
    plain = tiny.cleaned()
    pass_ = Sparsify2of4Pass(score="activation")
    assert pass_.needs_calibration
    with pytest.raises(UsageError, match="calibration"):
        pass_.requires(plain)
    before = tiny.weights()
    model, record = run_pass(Sparsify2of4Pass(score="activation", batches=batches), plain)
    assert record.stats["score"] == "activation" and record.stats["weights_masked"] == 6
    assert record.options["batches"] == f"4 batches, {4 * batches[0].size} tokens"
    after = matmul_weights(model)

    # The activation each MLP weight multiplies, captured independently on the dense model.
    reference = tiny.cleaned()
    readers = {
        node.inputs[1].name: node.inputs[0].name
        for node in reference.graph
        if node.op_type == "MatMul" and node.inputs[1].is_initializer()
    }
    differs = 0
    for role, name in reference.spec.weights.items():
        if _role(role) not in ("gate", "up", "down"):
            continue
        squares = sum(
            np.square(capture_activations(reference, ids, [readers[name]])[readers[name]])
            .reshape(-1, before[role].shape[0])
            .sum(axis=0, dtype=np.float64)
            for ids in batches
        )
        keep = mask_2of4(before[role], np.sqrt(squares))
        np.testing.assert_array_equal(after[role], np.where(keep, before[role], 0.0))
        assert sparse_groups_ok(after[role])
        differs += int((keep != mask_2of4(before[role])).any())
    assert differs == 6  # the norms changed which weights survive in every weight
    figures = tiny.reference.compare(session_for_model(model))
    assert Sparsify2of4Pass.tolerance.judge(figures) is None


def test_bad_options_are_usage_errors():
    with pytest.raises(UsageError, match="unknown role 'attn'"):
        Sparsify2of4Pass(roles="attn")
    with pytest.raises(UsageError, match="skip_first"):
        Sparsify2of4Pass(skip_first=-1)
    with pytest.raises(UsageError, match="score"):
        Sparsify2of4Pass(score="wanda")


_SMALL = """
<ir_version: 10, opset_import: ["" : 20]>
g (float[2, 64] x, float[2, 6] x6) => (float[2, 16] y, float[2, 16] z, float[2, 16] r, float[2, 8] t) {
    wt = Transpose <perm = [1, 0]> (w)
    y = MatMul (x, wt)
    z = Gemm <transB = 1> (x, v, bias)
    r = MatMul (x, u)
    t = MatMul (x6, u6)
}
"""


def test_transposed_weights_are_masked_along_k_and_odd_k_is_skipped():
    rng = np.random.default_rng(0)
    arrays = {
        "w": rng.standard_normal((16, 64)).astype(np.float32),  # [N, K], read transposed
        "v": rng.standard_normal((16, 64)).astype(np.float32),  # [N, K], Gemm transB
        "bias": rng.standard_normal(16).astype(np.float32),
        "u": rng.standard_normal((64, 16)).astype(np.float32),  # [K, N]
        "u6": rng.standard_normal((6, 8)).astype(np.float32),  # K = 6: not a multiple of 4
    }
    spec = tiny_spec(
        num_heads=1, head_dim=64, hidden_size=64, intermediate_size=16, vocab_size=16,
        weights={"layers.0.q": "w", "layers.0.k": "v", "layers.0.o": "u", "layers.0.v": "u6"},
        inputs=["x", "x6"], outputs=["y", "z", "r", "t"],
    )  # fmt: skip
    model = FdecModel(ir_model(_SMALL, arrays), spec)
    model, record = run_pass(Sparsify2of4Pass(roles="all"), model)

    assert record.stats["weights_masked"] == 3
    assert record.stats["skipped"] == {"u6": "K=6 is not divisible by 4"}
    got = {name: model.graph.initializers[name].const_value.numpy() for name in arrays}
    _assert_2of4_of(arrays["w"].T, got["w"].T)
    _assert_2of4_of(arrays["v"].T, got["v"].T)
    _assert_2of4_of(arrays["u"], got["u"])
    np.testing.assert_array_equal(got["u6"], arrays["u6"])
    feeds = {"x": rng.standard_normal((2, 64)).astype(np.float32),
             "x6": rng.standard_normal((2, 6)).astype(np.float32)}  # fmt: skip
    y, z, r, t = run_ort(model.model, feeds)
    np.testing.assert_allclose(y, feeds["x"] @ got["w"].T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(z, feeds["x"] @ got["v"].T + arrays["bias"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r, feeds["x"] @ got["u"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t, feeds["x6"] @ arrays["u6"], rtol=1e-5, atol=1e-5)


def test_metadata_survives_saving_and_the_pattern_survives_int4_qdq(tiny, tmp_path):
    model, _ = run_pass(Sparsify2of4Pass(), tiny.cleaned())
    model, _ = run_pass(QuantizeInt4Pass(backend="tensorrt", include_lm_head=False), model)
    for role, name in model.spec.weights.items():
        if _role(role) in ("gate", "up", "down"):
            codes = model.graph.initializers[name].const_value.numpy().astype(np.int8)  # [K, N]
            assert sparse_groups_ok(codes), role  # symmetric int4: zero stays code 0
            assert (codes != 0).mean() > 0.4
    model.save(tmp_path / "model.onnx")
    recorded = graph_sparsity(tmp_path / "model.onnx")
    assert recorded is not None and recorded["pattern"] == "2:4"
    assert len(recorded["weights"]) == 3 * model.spec.num_layers
    dense = FdecModel(ir.from_proto(ir.to_proto(tiny.cleaned().model)), tiny.spec)
    dense.save(tmp_path / "dense.onnx")
    assert graph_sparsity(tmp_path / "dense.onnx") is None


def test_plan_checks_the_pattern_is_still_there(tiny, tmp_path):
    """A later pass that refills the zeros (GPTQ-style feedback) is caught and reported."""
    model, _ = run_pass(Sparsify2of4Pass(), tiny.cleaned())
    spec = model.spec
    roles = [role for role in spec.weights if _role(role) in ("gate", "up", "down")]
    dense = tiny.cleaned()
    for role in roles[:2]:  # put two weights back to their dense values
        name = spec.weights[role]
        model.graph.initializers[name].const_value = dense.graph.initializers[name].const_value
    build = tmp_path / "build"
    typed = build / "engines/tensorrt/model.onnx"  # the model TensorRT plans are made from
    typed.parent.mkdir(parents=True)
    model.save(typed)
    record = graph_sparsity(typed, spec)
    assert sorted(record["lost"]) == sorted(roles[:2])
    assert sorted(record["kept"]) == sorted(roles[2:])
    limits = ShapeLimits(max_batch=1, max_seq_len=128)
    plan = plan_engine(build, spec=spec, target=load_target("a100"), limits=limits)
    assert plan.sparse_weights is True  # four weights still qualify
    assert any("2 of 6 weights" in note and "lost the 2:4 pattern" in note for note in plan.notes)
    for role in roles[2:]:
        name = spec.weights[role]
        model.graph.initializers[name].const_value = dense.graph.initializers[name].const_value
    model.save(typed)
    plan = plan_engine(build, spec=spec, target=load_target("a100"), limits=limits)
    assert plan.sparse_weights is False and "--sparsity=enable" not in plan.trtexec


@pytest.mark.parametrize("name", ["t4", "cpu"])
def test_targets_without_sparse_tensor_cores_are_refused(name):
    pass_ = Sparsify2of4Pass()
    with pytest.raises(UsageError) as refused:
        pass_.check_target(load_target(name))
    assert name in refused.value.problem and "sparse tensor cores" in refused.value.problem
    assert "a100" in refused.value.fix
    if name == "t4":
        assert "7.5" in refused.value.problem
    for ok in ("a100", "h100", "rtx4090"):
        pass_.check_target(load_target(ok))


def test_sparsity_option_puts_the_pass_before_quantization_once():
    plan = plan_pipeline(
        target=load_target("h100"), backend="tensorrt", quantize="fp8", sparsity="2:4"
    )
    names = plan.pass_names
    assert names.count("sparsify-2of4") == 1
    sparsify = plan.pipeline[names.index("sparsify-2of4")]
    assert sparsify.score == "activation"  # calibrated: the compile attaches its text
    assert names.index("sparsify-2of4") in plan.calibrating
    assert names.index("sparsify-2of4") < names.index("quantize-fp8")
    assert plan.tolerance.max_perplexity_increase is not None  # lossy: gated on perplexity
    plan = plan_pipeline(
        target=load_target("a100"), backend="tensorrt", passes="default,sparsify-2of4",
        quantize="none", sparsity="2:4",
    )  # fmt: skip
    assert plan.pass_names.count("sparsify-2of4") == 1
    assert plan.tolerance.greedy_identical is False
    with pytest.raises(UsageError, match="--sparsity"):
        plan_pipeline(target=load_target("a100"), backend="tensorrt", sparsity="1:2")


@pytest.mark.parametrize(
    ("target", "args", "cc"),
    [
        ("t4", ["--sparsity", "2:4"], "7.5"),
        ("cpu", ["--sparsity", "2:4"], None),
        ("t4", ["--passes", "default,sparsify-2of4"], "7.5"),
    ],
)
def test_cli_refuses_sparsity_without_sparse_tensor_cores(
    tiny_models, tmp_path, cli_runner, target, args, cc
):
    out = tmp_path / "out"
    result = cli_runner.invoke(
        cli,
        ["compile", str(tiny_models("llama")), "--target", target, "-o", str(out),
         "--quantize", "none", *args],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "2:4 sparsity" in result.stderr and target in result.stderr
    assert "sparse tensor cores" in result.stderr and "a100" in result.stderr
    if cc:
        assert cc in result.stderr
    assert not out.exists()


def _compile(cli_runner, model, out, *args):
    quantize = () if "--quantize" in args else ("--quantize", "none")
    result = cli_runner.invoke(
        cli,
        ["compile", str(model), "-o", str(out), "--json", "--max-seq-len", "256",
         *quantize, "--sparsity", "2:4", *args],
    )  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads((out / "report.json").read_text())


def test_a100_plan_and_command_enable_sparse_weights(tiny_models, tmp_path, cli_runner):
    out = tmp_path / "a100"
    report = _compile(cli_runner, tiny_models("llama"), out, "--target", "a100")
    (row,) = [p for p in report["passes"] if p["name"] == "sparsify-2of4"]
    assert row["stats"]["weights_masked"] == 6 and row["stats"]["zero_fraction"] == 0.5
    assert row["stats"]["score"] == "activation" and row["options"]["batches"]
    assert report["verification"]["ok"] is True
    numeric = report["verification"]["numeric"]
    assert "perplexity_build" in numeric and numeric["max_abs_error"] > 0.05  # lossy, reported

    plan = json.loads((out / "engines/tensorrt/plan.json").read_text())
    assert plan["sparse_weights"] is True
    assert "--sparsity=enable" in plan["trtexec"] and "--sparse-weights" in plan["polygraphy"]
    assert "--sparsity=enable" in (out / "engines/tensorrt/build.sh").read_text()
    trt = next(e for e in report["engines"] if e["backend"] == "tensorrt")
    assert trt["sparse_weights"] is True and "--sparsity=enable" in trt["command"]
    assert any("sparse weights on" in note for note in trt["notes"])
    if rtx_available() is None:  # the TensorRT-RTX compile check for sm 8.0 sets the flag too
        rtx = next(e for e in report["engines"] if e["backend"] == "tensorrt-rtx")
        assert rtx["status"] == "built" and rtx["sparse_weights"] is True


def test_fp8_after_2of4_keeps_the_pattern(tiny_models, tmp_path, cli_runner):
    out = tmp_path / "h100"
    report = _compile(
        cli_runner, tiny_models("llama"), out, "--target", "h100", "--quantize", "fp8"
    )
    names = report["pipeline"]
    assert names.index("sparsify-2of4") < names.index("quantize-fp8")
    (fp8,) = [p for p in report["passes"] if p["name"] == "quantize-fp8"]
    assert fp8["options"]["weight_rounding"] == "nearest"  # GPTQ feedback would refill zeros
    spec = json.loads((out / "report.json").read_text())["spec"]
    graph = ir.load(str(out / "model.onnx")).graph
    for role, name in spec["weights"].items():
        if _role(role) in ("gate", "up", "down"):
            tensor = graph.initializers[name].const_value
            # down_proj is W8A16 in the fp8 recipe (FP8_WEIGHT_ONLY): int8 codes keep zeros too
            wanted = ir.DataType.INT8 if _role(role) == "down" else ir.DataType.FLOAT8E4M3FN
            assert tensor.dtype == wanted, role
            assert sparse_groups_ok(tensor.numpy().astype(np.float32)), role
    plan = json.loads((out / "engines/tensorrt/plan.json").read_text())
    assert "fp8" in plan["precisions"] and plan["sparse_weights"] is True
    assert not any("lost" in note for note in plan["notes"])


@needs_rtx
def test_rtx4090_engine_builds_with_sparse_weights(tiny_models, tmp_path, cli_runner):
    out = tmp_path / "rtx"
    report = _compile(cli_runner, tiny_models("llama"), out, "--target", "rtx4090")
    (engine,) = report["engines"]
    assert engine["status"] == "built" and engine["purpose"] == "deployable"
    assert engine["compute_capability"] == "8.9" and engine["sparse_weights"] is True
    path = out / engine["engine"]
    assert path.is_file() and path.stat().st_size == engine["bytes"] > 100_000
    assert graph_sparsity(out / "model.onnx")["pattern"] == "2:4"
