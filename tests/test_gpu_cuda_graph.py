"""The ONNX Runtime CUDA graph of GPU-target builds, checked on this CPU.

`--backend onnxruntime` on a GPU target compiles for the onnxruntime-cuda backend: the fused
graph typed fp16 with a fp16 KV cache, every node with a CUDA kernel for its types (kernel
table), its numerics against the fp32 build of the same model where ONNX Runtime's CPU runs it,
and the precisions the backend refuses. Speed is measured on a GPU only (benchmarks/gpu.py).
"""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import onnx_ir as ir
import pytest
from models import make_tiny_model

from fdec.backends import check_precision, choose_backend, get_backend
from fdec.cli import cli
from fdec.errors import UsageError
from fdec.gates import GATES
from fdec.lower.cuda_kernels import cpu_placed_nodes, cpu_run_check, cpu_unrunnable
from fdec.runtime import OrtModel, generate, open_session
from fdec.targets import load_target

# fp16 graph against the fp32 build of the same tiny Llama, ONNX Runtime CPU (measured here:
# max logit error 0.003, top-1 agreement 1.0 over 48 positions).
MAX_LOGIT_ERROR = 0.05
MIN_TOP1 = 0.95


def _compile(model, out, *args):
    from click.testing import CliRunner

    result = CliRunner().invoke(
        cli, ["compile", str(model), "-o", str(out), "--json", "--max-seq-len", "256", *args]
    )
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def builds(tiny_models, tmp_path_factory):
    """The fp32 CPU build and the fp16 and int4 h200 builds of one tiny Llama."""
    root = tmp_path_factory.mktemp("cuda-graph")
    model = tiny_models("llama")
    made = {
        "fp32": root / "fp32",
        "fp16": root / "fp16",
        "int4": root / "int4",
    }
    reports = {
        "fp32": _compile(model, made["fp32"], "--target", "cpu", "--quantize", "none"),
        "fp16": _compile(model, made["fp16"], "--target", "h200", "--backend", "onnxruntime"),
        "int4": _compile(
            model, made["int4"], "--target", "h200", "--backend", "onnxruntime",
            "--quantize", "int4",
        ),
    }  # fmt: skip
    return made, reports


def _graph(path):
    return ir.load(str(path / "model.onnx"))


def test_gpu_target_gets_the_fp16_cuda_graph(builds):
    made, reports = builds
    report = reports["fp16"]
    assert report["backend"] == "onnxruntime-cuda"
    assert report["recipe"] == {"quantize": "fp16", "chosen_by": "backend onnxruntime-cuda default"}
    assert report["pipeline"][-3:] == ["fuse-attention", "pack-qkv", "cast-float16"]
    gate = GATES["onnxruntime-cuda fp16"]  # its own measured gate, not the generic +100 %
    assert report["verification"]["tolerance"]["source"] == gate.source()
    assert report["verification"]["tolerance"]["max_perplexity_increase"] == gate.max_ppl_increase
    graph = _graph(made["fp16"]).graph
    gqa = [n for n in graph if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(n.inputs[0].dtype == ir.DataType.FLOAT16 for n in gqa)
    norms = [n for n in graph if n.op_type == "SkipSimplifiedLayerNormalization"]
    assert norms and all(n.outputs[0].dtype == ir.DataType.FLOAT16 for n in norms)
    # KV cache fp16 at the edges, past and present one shared buffer; logits stay fp32.
    kv = [v for v in [*graph.inputs, *graph.outputs] if "key" in v.name or "value" in v.name]
    assert len(kv) == 8 and {v.dtype for v in kv} == {ir.DataType.FLOAT16}
    assert next(v for v in graph.outputs if v.name == "logits").dtype == ir.DataType.FLOAT
    assert report["kv_cache"]["dtype"] == "float16" and report["kv_cache"]["buffer"] == "shared"
    assert all(n.inputs[3] is graph.inputs[3 + 2 * i] for i, n in enumerate(gqa))
    # Every node has a CUDA kernel for its types; the report says so and what runs in what.
    assert cpu_placed_nodes(made["fp16"] / "model.onnx") == []
    assert report["cuda_placement"]["ok"] is True and report["cuda_placement"]["required"]
    (model,) = report["models"]
    assert model["summary"] == "fp16 compute, fp16 weights, fp16 KV cache"
    assert model["runs_on"] == "ONNX Runtime CUDAExecutionProvider"
    runtime = json.loads((made["fp16"] / "fdec-runtime.json").read_text())
    assert [p[0] for p in runtime["providers"]] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    # The roofline's per-step floor counts this graph's own nodes.
    floor = report["estimate"]["step_floor"]
    assert (
        floor["nodes_from"] == "graph" and floor["nodes"] == report["passes"][-1]["after"]["nodes"]
    )


def test_cpu_build_is_unchanged(builds):
    made, reports = builds
    assert reports["fp32"]["backend"] == "onnxruntime"
    assert "cast-float16" not in reports["fp32"]["pipeline"]
    assert reports["fp32"]["cuda_placement"] is None
    assert _graph(made["fp32"]).graph.inputs[3].dtype == ir.DataType.FLOAT


def test_fp16_graph_matches_the_fp32_graph_on_the_cpu(builds):
    made, reports = builds
    verification = reports["fp16"]["verification"]
    assert verification["ok"] is True and verification["made_for"] == "CUDAExecutionProvider"
    # Checked with the GPU's fp16 rounding emulated, after the graph as written loaded here.
    emulated = verification["emulated"]
    assert verification["dtype"] == emulated["dtype"] == "fp16"
    assert emulated["as_built_on_cpu"]["loads"] is True

    fp32 = OrtModel(open_session(made["fp32"] / "model.onnx"))
    fp16 = OrtModel(open_session(made["fp16"] / "model.onnx"))
    assert fp16.kv_dtype == np.float16
    ids = np.random.default_rng(0).integers(1, 300, size=(1, 48))
    want, _ = fp32.decode(ids, fp32.empty_past(1), 0)
    got, _ = fp16.decode(ids, fp16.empty_past(1), 0)
    error = float(np.abs(want - got).max())
    top1 = float((want.argmax(-1) == got.argmax(-1)).mean())
    assert error < MAX_LOGIT_ERROR and top1 >= MIN_TOP1, (error, top1)
    # Greedy decoding through the fp16 shared KV buffer gives the fp32 build's tokens.
    prompt = [5, 17, 42, 7, 99]
    tokens = generate(fp32, prompt, max_new_tokens=32).tokens
    assert generate(fp16, prompt, max_new_tokens=32).tokens == tokens


def test_int4_cuda_graph_is_matmulnbits_with_fp16_scales(builds):
    made, reports = builds
    graph = _graph(made["int4"]).graph
    nbits = [n for n in graph if n.op_type == "MatMulNBits"]
    assert nbits and all(n.inputs[2].dtype == ir.DataType.FLOAT16 for n in nbits[:-1])
    assert not [n for n in graph if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert reports["int4"]["cuda_placement"]["ok"] is True
    assert "MatMulNBits" in reports["int4"]["models"][0]["weights"]
    assert reports["int4"]["verification"]["ok"] is True


def test_qdq_precisions_are_refused_for_the_cuda_graph(tiny_models, tmp_path, cli_runner):
    out = tmp_path / "b"
    result = cli_runner.invoke(
        cli,
        ["compile", str(tiny_models("llama")), "-o", str(out), "--target", "h200",
         "--backend", "onnxruntime", "--quantize", "fp8"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "onnxruntime-cuda backend runs fp16, bf16, int8, int4 models, not fp8" in result.stderr
    assert "--backend tensorrt" in result.stderr and not out.exists()


def test_backends_declare_their_precisions():
    h200, cpu = load_target("h200"), load_target("cpu")
    assert choose_backend("onnxruntime", h200).name == "onnxruntime-cuda"
    assert choose_backend("onnxruntime", cpu).name == "onnxruntime"
    assert choose_backend(None, h200).name == "tensorrt"
    with pytest.raises(UsageError, match="needs a GPU target"):
        choose_backend("onnxruntime-cuda", cpu)
    cuda = get_backend("onnxruntime-cuda")
    for ok in ("none", "fp16", "bf16", "int4", "int4-awq"):
        check_precision(cuda, ok)
    for refused in ("fp8", "int8-smoothquant", "fp32"):
        with pytest.raises(UsageError, match="onnxruntime-cuda backend runs"):
            check_precision(cuda, refused)
    check_precision(get_backend("tensorrt"), "fp8")
    with pytest.raises(UsageError, match="not fp16"):
        check_precision(get_backend("onnxruntime"), "fp16")


def test_kv_dtype_other_than_fp16_is_refused_for_the_cuda_graph():
    from fdec.compile.recipe import plan_pipeline

    h200 = load_target("h200")
    cuda = get_backend("onnxruntime-cuda")
    with pytest.raises(UsageError, match="keeps its KV cache in fp16"):
        plan_pipeline(target=h200, backend=cuda, kv_dtype="int8")
    recipe = plan_pipeline(target=h200, backend=cuda, kv_dtype="fp16")
    assert "quantize-kv-cache" not in recipe.pass_names and recipe.pass_names[-1] == "cast-float16"
    assert recipe.device_graph == "CUDAExecutionProvider"


@pytest.mark.parametrize(
    ("target", "head", "shape"),
    [("cpu", 12, {"hidden_size": 48}),
     ("h200", 12, {"hidden_size": 48}),
     ("cpu", 8, {"hidden_size": 72, "num_attention_heads": 9, "num_key_value_heads": 3})],
)  # fmt: skip
def test_head_size_gqa_refuses_keeps_the_traced_attention(target, head, shape, tmp_path):
    """Head sizes 12 and 8: ONNX Runtime's GroupQueryAttention refuses them when it runs (they
    used to be fused and the compile died with an internal error)."""
    model = make_tiny_model(tmp_path / "m", "llama", **shape)
    report = _compile(model, tmp_path / "b", "--target", target, "--quantize", "none",
                      *(("--backend", "onnxruntime") if target != "cpu" else ()))  # fmt: skip
    fuse = next(p for p in report["passes"] if p["name"] == "fuse-attention")
    assert f"head size {head} is not a multiple of 16" in fuse["stats"]["not_fused"]
    graph = _graph(tmp_path / "b").graph
    assert not [n for n in graph if n.op_type == "GroupQueryAttention"]
    assert report["verification"]["ok"] is True
    if target != "cpu":
        assert report["cuda_placement"]["cpu_nodes"] == 0  # every node has a CUDA kernel
        # The traced attention's positions (Range on the device + a past length from Shape
        # on the host) cost a MemcpyFromHost until fuse-attention shifted the Range instead.
        assert fuse["stats"]["ranges_shifted_to_host"] == 1
        assert report["cuda_placement"]["memcpy_nodes"] == 0
        assert report["models"][0]["compute"] == "fp16"


def test_bf16_graph_is_checked_with_bf16_rounding_emulated(builds, tiny_models, tmp_path):
    """ONNX Runtime's CPU has no bf16 kernels: the graph as written does not load here, but
    its emulated form (every bf16 tensor rounded, nodes in fp32) is verified, not skipped;
    --verify-each's check after the typing pass runs it too (it died with NOT_IMPLEMENTED)."""
    report = _compile(tiny_models("llama"), tmp_path / "b", "--target", "h200",
                      "--backend", "onnxruntime", "--quantize", "bf16", "--verify-each")  # fmt: skip
    typing = report["passes"][-1]
    assert typing["name"] == "cast-float16" and typing["checks"]["numeric"]["ok"] is True
    verification = report["verification"]
    assert verification["ok"] is True and verification["greedy"]["steps"] == 32
    emulated = verification["emulated"]
    assert verification["dtype"] == emulated["dtype"] == "bf16"
    assert emulated["as_built_on_cpu"]["loads"] is False
    assert "has no CPU bf16 kernel" in emulated["as_built_on_cpu"]["why"]
    assert report["models"][0]["compute"] == "bf16" and report["cuda_placement"]["ok"] is True
    from fdec.report import render_report

    assert "checked here with its bf16 rounding emulated" in render_report(report)
    # `fdec run` without the GPU: no CPU bf16 kernels, so the emulated form runs, said once;
    # greedy, it gives the fp32 build's tokens.
    from click.testing import CliRunner

    def run(build):
        args = ["run", str(build), "-p", "hello there", "-n", "8", "--json", "--no-chat-template"]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout.splitlines()[-1])

    ran = run(tmp_path / "b")
    assert "bf16 rounding emulated in fp32" in ran["provider_fallback"]
    assert ran["providers"] == ["CPUExecutionProvider"]
    assert ran["tokens"] == run(builds[0]["fp32"])["tokens"]


def _overflowing_model(tiny_models, folder):
    """The tiny Llama with layer 0's MLP up projection ×1e5 and its down projection ÷1e5:
    the same function in fp32, but the up projection's outputs leave fp16's range."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_models("llama"), folder)
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"] *= 1e5
    weights["model.layers.0.mlp.down_proj.weight"] /= 1e5
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize(
    ("target", "asked"), [("h200", ()), ("h200", ("--quantize", "fp16")), ("t4", ())]
)
def test_an_fp16_graph_that_overflows_on_the_gpu_is_found_here(
    target, asked, tiny_models, tmp_path
):
    """ONNX Runtime's CPU runs the fp16 MatMuls and Muls in fp32 between casts it drops, so
    its run of this graph stayed finite and passed (max error 0.063, 32 greedy tokens
    identical, before the emulation); the GPU rounds each MatMul's output to fp16: inf. The
    emulated check finds the inf. fp16 by default on a target with bf16 (h200): the graph is
    typed bf16 instead and says why. fp16 asked for, or a target without bf16 (t4, sm 7.5):
    the compile fails naming bf16, nothing written."""
    from click.testing import CliRunner

    model = _overflowing_model(tiny_models, tmp_path / "m")
    out = tmp_path / "b"
    result = CliRunner().invoke(
        cli, ["compile", str(model), "-o", str(out), "--target", target, "--backend",
              "onnxruntime", "--max-seq-len", "256", "--json", *asked],
    )  # fmt: skip
    if target == "h200" and not asked:
        assert result.exit_code == 0, result.output
        report = json.loads((out / "report.json").read_text())
        assert report["recipe"]["quantize"] == "bf16"
        assert re.search(
            r"default, bf16: the fp16 graph overflowed \(\d+ inf/NaN logits on held text\)$",
            report["recipe"]["chosen_by"],
        )
        assert report["verification"]["ok"] is True and report["models"][0]["compute"] == "bf16"
        # judged by the bf16 model's gate, the recipe planned again
        gate = GATES["onnxruntime-cuda bf16"]
        assert report["verification"]["tolerance"]["source"] == gate.source()
        return
    assert result.exit_code == 1, result.output
    assert "inf/NaN values on held text" in result.stderr
    assert "--quantize bf16" in result.stderr and not out.exists()


def test_a_gpu_graph_whose_fused_op_has_no_cpu_kernel_is_said_not_run(tmp_path):
    """A com.microsoft op with CUDA kernels only (BiasSoftmax): neither the graph as written
    nor its emulated form runs on the CPU, and the record says so, never that it passed."""
    import onnx
    import onnx.helper as h

    from fdec.compile.gate import verify_model
    from fdec.pipeline import Tolerance
    from fdec.verify import Reference

    fp16 = onnx.TensorProto.FLOAT16
    graph = h.make_graph(
        [
            h.make_node(
                "BiasSoftmax",
                ["x", "b"],
                ["y"],
                "softmax",
                domain="com.microsoft",
                axis=1,
                is_inner_broadcast=0,
            )
        ],
        "g",
        [h.make_tensor_value_info(n, fp16, [2, 4]) for n in "xb"],
        [h.make_tensor_value_info("y", fp16, [2, 4])],
    )
    path = tmp_path / "m.onnx"
    opsets = [h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)]
    onnx.save(h.make_model(graph, opset_imports=opsets), path)
    reference = Reference("decoder", np.zeros((1, 2), np.int64), {})  # never reached
    verification, session = verify_model(
        path, reference, Tolerance(), device_graph="CUDAExecutionProvider", optimization="all"
    )
    assert session is None and verification["ok"] is None
    assert verification["not_run"] == (
        "not run here: BiasSoftmax has no CPU fp32 kernel (node 'softmax')"
    )


def test_a_graph_the_cpu_cannot_run_is_said_not_run():
    message = (
        "[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for "
        "SkipSimplifiedLayerNormalization(1) node with name 'norm_3'"
    )
    assert cpu_unrunnable(RuntimeError(message)) == (
        "not run here: SkipSimplifiedLayerNormalization has no CPU fp16 kernel (node 'norm_3')"
    )
    assert cpu_unrunnable(RuntimeError("CUDA failure 100")) is None


def test_cpu_run_check_loads_the_graph_as_written(tmp_path):
    """An fp16 graph loads on the CPU; a bf16 one finds no CPU kernel (said); a graph whose
    types do not resolve raises, as the GPU session would."""
    import onnx
    import onnx.helper as h

    def save(name, dtype, nodes, inputs):
        graph = h.make_graph(
            nodes, "g", [h.make_tensor_value_info(n, t, [4, 4]) for n, t in inputs],
            [h.make_tensor_value_info("y", dtype, [4, 4])],
        )  # fmt: skip
        path = tmp_path / f"{name}.onnx"
        onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), path)
        return path

    fp16, bf16, fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    matmul = [h.make_node("MatMul", ["a", "b"], ["c"]), h.make_node("Softmax", ["c"], ["y"])]
    assert cpu_run_check(save("fp16", fp16, matmul, [("a", fp16), ("b", fp16)]))["loads"]
    refused = cpu_run_check(save("bf16", bf16, matmul, [("a", bf16), ("b", bf16)]))
    assert refused["loads"] is False and "no CPU bf16 kernel" in refused["why"]
    mixed = save("mixed", fp16, [h.make_node("Add", ["a", "b"], ["y"])], [("a", fp16), ("b", fp32)])
    with pytest.raises(Exception, match="Type"):
        cpu_run_check(mixed)
    assert sys.modules["onnxruntime"].get_available_providers()  # a real CPU session ran


def test_int4_awq_keeping_a_layer_shares_the_tied_table_typed(tiny_models, tmp_path):
    """GPT-2's tied table read through GatherBlockQuantized of the int4 lm_head, with AWQ's
    1/s after it: the rows' values were untyped, and the CUDA typing died on them."""
    report = _compile(tiny_models("gpt2"), tmp_path / "b", "--target", "h200", "--backend",
                      "onnxruntime", "--quantize", "int4-awq", "--keep-fp", "1")  # fmt: skip
    graph = _graph(tmp_path / "b").graph
    gathers = [n for n in graph if n.op_type == "GatherBlockQuantized"]
    assert len(gathers) == 1 and gathers[0].outputs[0].dtype == ir.DataType.FLOAT16
    assert report["verification"]["ok"] is True and report["cuda_placement"]["ok"] is True
