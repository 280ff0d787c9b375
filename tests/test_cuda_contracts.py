"""What ONNX Runtime's CUDA kernels refuse in graphs its CPU kernels run (fdec.lower.cuda_contracts).

Each rule is checked on a small graph the CPU provider loads and runs, so the CPU check of a
build would pass it; the CUDA kernel would refuse it, throw on a decode step, or get it wrong.
The fused builds fdec writes for the CUDA provider break none of them, and a build that did is
refused with one line naming the node and the rule.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from fdec.cli import cli
from fdec.lower.cuda_contracts import contract_breaches
from fdec.report import render_report

_MS = "com.microsoft"


def _model(nodes, inputs, outputs, initializers=(), *, runs_on_cpu=True) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(_MS, 1)]
    )
    if runs_on_cpu:  # the CPU provider takes it: a CPU check of the build would pass
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return model


def _matmul_nbits(block_size: int, bits: int = 4, k: int = 256, n: int = 8) -> onnx.ModelProto:
    blocks = -(-k // block_size)
    codes = np.random.default_rng(0).integers(0, 255, (n, blocks, block_size * bits // 8))
    return _model(
        [
            helper.make_node(
                "MatMulNBits",
                ["a", "b", "scales"],
                ["y"],
                domain=_MS,
                K=k,
                N=n,
                bits=bits,
                block_size=block_size,
            )
        ],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [
            numpy_helper.from_array(codes.astype(np.uint8), "b"),
            numpy_helper.from_array(np.full((n, blocks), 0.01, np.float32), "scales"),
        ],
    )


def test_matmul_nbits_blocks_the_one_row_kernel_cannot_take():
    assert contract_breaches(_matmul_nbits(32)) == []
    assert contract_breaches(_matmul_nbits(128)) == []
    # Block 256: the CPU runs it; the CUDA kernel of one-row products (every decode step) throws.
    model = _matmul_nbits(256)
    a = np.ones((1, 256), np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"a": a})[0].shape == (1, 8)
    (breach,) = contract_breaches(model)
    assert breach.op == "MatMulNBits" and breach.effect == "run"
    assert "block_size 256" in breach.rule and "16, 32, 64, 128" in breach.rule
    assert breach.source.endswith("matmul_4bits_m1_impl.cuh")
    # 8-bit codes have one-row kernels up to 256.
    assert contract_breaches(_matmul_nbits(256, bits=8)) == []


def _gather(data: np.ndarray, scales: np.ndarray, **attributes) -> onnx.ModelProto:
    return _model(
        [
            helper.make_node(
                "GatherBlockQuantized", ["data", "ids", "scales"], ["y"], domain=_MS, **attributes
            )
        ],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(data, "data"), numpy_helper.from_array(scales, "scales")],
        runs_on_cpu=False,
    )


def test_gather_block_quantized_rules_the_cpu_does_not_apply():
    rows = np.random.default_rng(1).integers(0, 255, (4, 2, 32)).astype(np.uint8)
    scales = np.full((4, 2, 1), 0.5, np.float32)
    good = _gather(rows, scales, bits=8, block_size=32, quantize_axis=2, gather_axis=0)
    assert contract_breaches(good) == []
    ids = {"ids": np.array([3, 1], np.int64)}
    cpu = ort.InferenceSession(good.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(cpu.run(None, ids)[0], (rows[[3, 1]].astype(np.float32) - 128) / 2)
    # No bits attribute: the CPU reads 4-bit codes, the CUDA kernel refuses the node.
    (no_bits,) = contract_breaches(_gather(rows, scales, block_size=32, quantize_axis=2))
    assert no_bits.effect == "session" and "no bits attribute" in no_bits.rule
    # The quantized axis not last: the CUDA kernel takes the last axis only.
    flat = rows.reshape(4, 64)
    across = _gather(flat, np.full((1, 64), 0.5, np.float32), bits=8, block_size=16,
                     quantize_axis=0, gather_axis=1)  # fmt: skip
    (axis,) = contract_breaches(across)
    assert "quantize_axis 0" in axis.rule and axis.effect == "run"
    # A last axis that blocks do not tile: scales found by flat index, wrong rows, no error.
    ragged = _gather(flat[:, :48], np.full((4, 2), 0.5, np.float32), bits=8, block_size=32,
                     quantize_axis=1, gather_axis=0)  # fmt: skip
    (tiles,) = contract_breaches(ragged)
    assert tiles.effect == "wrong" and "#32663" in tiles.rule


def test_skip_norm_statistics_are_not_written_on_cuda():
    hidden = 8
    f32 = TensorProto.FLOAT

    def norm(read_mean: bool) -> onnx.ModelProto:
        outputs = ["y", "mean", "inv_std", "sum"] if read_mean else ["y", "", "", "sum"]
        nodes = [helper.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "gamma"],
                                  outputs, domain=_MS, epsilon=1e-5)]  # fmt: skip
        graph_outputs = [helper.make_tensor_value_info("y", f32, [1, 2, hidden])]
        if read_mean:
            nodes.append(helper.make_node("Identity", ["inv_std"], ["stats"]))
            graph_outputs.append(helper.make_tensor_value_info("stats", f32, None))
        return _model(
            nodes,
            [helper.make_tensor_value_info(n, f32, [1, 2, hidden]) for n in ("x", "skip")],
            graph_outputs,
            [numpy_helper.from_array(np.ones(hidden, np.float32), "gamma")],
        )

    assert contract_breaches(norm(read_mean=False)) == []
    (breach,) = contract_breaches(norm(read_mean=True))
    assert "output 2 (inverse std)" in breach.rule and breach.source.endswith("skip_layer_norm.cc")


def test_a_fused_cuda_build_breaks_no_contract_and_a_breaking_one_is_refused(
    tiny_models, tmp_path, monkeypatch
):
    """The tiny Llama's int4 CUDA build (MatMulNBits, GatherBlockQuantized, fused norms and
    attention) breaks none; with the one-row kernel's block sizes narrowed to exclude its 32,
    the same compile stops with one line naming the node, and no build is written."""
    import fdec.lower.cuda_contracts as contracts

    args = ["compile", str(tiny_models("llama")), "--target", "h200", "--backend", "onnxruntime",
            "--quantize", "int4", "--max-seq-len", "64", "--no-cache"]  # fmt: skip
    result = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "ok")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "ok" / "report.json").read_text())
    placement = report["cuda_placement"]
    assert placement["contract_breaches"] == [] and placement["ok"] is True
    assert "1.31.1" in placement["contracts"]
    model = onnx.load(tmp_path / "ok" / "model.onnx", load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(
        {a.name: a.i for a in n.attribute}.get("accuracy_level", 0) == 0 for n in nbits
    )  # the CUDA kernel never reads it: the CPU check computes what the GPU does

    monkeypatch.setattr(contracts, "_M1_4BIT_BLOCKS", (16, 64, 128))
    result = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "refused")])
    assert result.exit_code != 0
    message = result.output.strip().splitlines()[-1] if result.output.strip() else ""
    assert "break what ONNX Runtime's CUDA kernels take" in result.output + result.stderr
    assert "MatMulNBits" in result.output + result.stderr, message
    assert not (tmp_path / "refused").exists()
    broken = dict(report, cuda_placement=dict(placement, ok=False, contract_breaches=[
        {"name": "n", "op": "MatMulNBits", "rule": "4-bit block_size 256", "effect": "run",
         "source": "x"}]))  # fmt: skip
    assert "1 node(s) the CUDA provider would refuse" in render_report(broken)


def test_the_cuda_backend_writes_accuracy_level_0_and_pass_options_still_win():
    from fdec.compile.recipe import plan_pipeline
    from fdec.targets import load_target

    def levels(target="h200", backend="onnxruntime-cuda", **options):
        recipe = plan_pipeline(target=load_target(target), backend=backend, **options)
        return [p.accuracy_level for p in recipe.pipeline if p.name.startswith("quantize-int4")]

    assert levels(quantize="int4") == levels(quantize="int4-awq") == [0]
    options = {"quantize-int4": {"accuracy_level": 4}}
    assert levels(quantize="int4", pass_options=options) == [4]
    assert levels("cpu", "onnxruntime", quantize="int4") == [4]  # the CPU kernel's int8 path
