"""The CUDA kernel table (from ONNX Runtime's OperatorKernels.md) and the placement check built on it."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from fdec.cli import cli
from fdec.lower.cuda_kernels import cpu_placed_nodes, kernel_for, kernel_table
from fdec.lower.cuda_placement import placement_summary

ROOT = pathlib.Path(__file__).resolve().parent.parent
_MS = "com.microsoft"


def test_table_is_the_generated_one_and_names_its_source(tmp_path):
    """The shipped JSON is exactly what the generator makes from the kept doc excerpt."""
    out = tmp_path / "cuda_kernels.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/cuda_kernel_table.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    assert json.loads(out.read_text()) == kernel_table()
    source = kernel_table()["source"]
    assert source["commit"] in source["url"]
    assert "OperatorKernels.md" in source["url"]
    ops = kernel_table()["ops"]
    assert len(ops["ai.onnx"]) > 140 and len(ops[_MS]) > 60


# Rows checked against the doc text (benchmarks/data/onnxruntime-cuda-kernels.md, copied from
# OperatorKernels.md at the commit the table names).
def test_lookups_match_the_doc_text():
    gqa = kernel_for("GroupQueryAttention", _MS, 1)
    # |GroupQueryAttention|...|1+|**M** = tensor(int32)<br/> **T** = tensor(bfloat16), tensor(float16)<br/> ...
    assert gqa["types"]["T"] == ["bfloat16", "float16"]
    assert gqa["types"]["M"] == ["int32"]
    assert "float8e4m3fn" in gqa["types"]["T_CACHE"]
    # |MatMulNBits|...|1+|**T1** = tensor(bfloat16), tensor(float), tensor(float16)<br/> **T2** = tensor(uint8)...
    nbits = kernel_for("MatMulNBits", _MS, 1)
    assert nbits["types"]["T1"] == ["bfloat16", "float", "float16"]
    assert nbits["types"]["T2"] == ["uint8"]
    # |Add|...|14+| (with int8/int16), |||13| (without), |||[7, 12]| (no bfloat16)
    assert "int8" in kernel_for("Add", "", 14)["types"]["T"]
    assert "int8" not in kernel_for("Add", "", 13)["types"]["T"]
    assert "bfloat16" not in kernel_for("Add", "", 12)["types"]["T"]
    assert (kernel_for("Add", "", 20)["since"], kernel_for("Add", "", 20)["until"]) == (14, None)
    # |Range|...|11+|**T** = tensor(double), tensor(float), tensor(int16), tensor(int32), tensor(int64)
    assert kernel_for("Range", "", 18)["types"]["T"] == [
        "double", "float", "int16", "int32", "int64",
    ]  # fmt: skip
    assert kernel_for("Range", "", 10) is None  # no CUDA Range before opset 11
    # |RMSNormalization|...|23+|: none before 23
    assert kernel_for("RMSNormalization", "", 23) is not None
    assert kernel_for("RMSNormalization", "", 22) is None
    # Ops the CUDA provider lacks entirely
    assert kernel_for("Unique", "", 11) is None
    assert kernel_for("Tokenizer", _MS, 1) is None


def _fp16_fused_graph() -> onnx.ModelProto:
    """One decoder layer as ONNX Runtime's fused CUDA ops, fp16 activations and int4 weights."""
    hidden, heads, kv_heads, head = 64, 4, 2, 16
    fp16, i32 = TensorProto.FLOAT16, TensorProto.INT32
    blocks = hidden // 32

    def nbits(name: str, n: int) -> list:
        return [
            helper.make_tensor(f"{name}.q", TensorProto.UINT8, [n, blocks, 16], bytes(n * blocks * 16), raw=True),
            helper.make_tensor(f"{name}.s", fp16, [n * blocks], [1.0] * (n * blocks)),
        ]  # fmt: skip

    weights = [
        *nbits("qkv", hidden + 2 * kv_heads * head),
        *nbits("o", hidden),
        helper.make_tensor("gamma", fp16, [hidden], [1.0] * hidden),
        helper.make_tensor("cos", fp16, [64, head // 2], [1.0] * (64 * head // 2)),
        helper.make_tensor("sin", fp16, [64, head // 2], [0.0] * (64 * head // 2)),
    ]
    nodes = [
        helper.make_node(
            "SkipSimplifiedLayerNormalization", ["x", "residual", "gamma"],
            ["normed", "", "", "sum"], domain=_MS, epsilon=1e-5,
        ),
        helper.make_node(
            "MatMulNBits", ["normed", "qkv.q", "qkv.s"], ["qkv"], domain=_MS,
            K=hidden, N=hidden + 2 * kv_heads * head, bits=4, block_size=32,
        ),
        helper.make_node(
            "GroupQueryAttention",
            ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total_len", "cos", "sin"],
            ["attn", "present_key", "present_value"], domain=_MS,
            num_heads=heads, kv_num_heads=kv_heads, do_rotary=1,
        ),
        helper.make_node(
            "MatMulNBits", ["attn", "o.q", "o.s"], ["y"], domain=_MS,
            K=hidden, N=hidden, bits=4, block_size=32,
        ),
    ]  # fmt: skip
    cache = [1, kv_heads, 64, head]
    graph = helper.make_graph(
        nodes,
        "fused_fp16_layer",
        [
            helper.make_tensor_value_info("x", fp16, [1, 1, hidden]),
            helper.make_tensor_value_info("residual", fp16, [1, 1, hidden]),
            helper.make_tensor_value_info("past_key", fp16, cache),
            helper.make_tensor_value_info("past_value", fp16, cache),
            helper.make_tensor_value_info("seqlens_k", i32, [1]),
            helper.make_tensor_value_info("total_len", i32, []),
        ],
        [
            helper.make_tensor_value_info("y", fp16, [1, 1, hidden]),
            helper.make_tensor_value_info("sum", fp16, [1, 1, hidden]),
            helper.make_tensor_value_info("present_key", fp16, cache),
            helper.make_tensor_value_info("present_value", fp16, cache),
        ],
        initializer=weights,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(_MS, 1)]
    )


def test_fp16_fused_graph_has_a_cuda_kernel_for_every_node():
    model = _fp16_fused_graph()
    # A well-formed graph: ONNX Runtime (CPU) loads it, checking every node against its schema.
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert cpu_placed_nodes(model) == []
    summary = placement_summary(model)
    assert summary["ok"] is True and summary["cpu_nodes"] == 0 and summary["nodes"] == 4


def test_the_same_graph_in_fp32_puts_group_query_attention_on_the_cpu():
    """Types the graph leaves unnamed are carried from the inputs through the constraints."""
    model = _fp16_fused_graph()
    for value in [*model.graph.input, *model.graph.output]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    for tensor in model.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT16:
            values = onnx.numpy_helper.to_array(tensor).astype("float32")
            tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
    found = cpu_placed_nodes(model)
    assert [(n.op_type, dict(n.types)) for n in found] == [
        ("GroupQueryAttention", {"T": "float", "T_CACHE": "float", "M": "int32"})
    ]
    assert "takes T in {bfloat16, float16}, this node has float" in found[0].reason


def test_unknown_domain_and_old_opset_are_reported():
    graph = helper.make_graph(
        [
            helper.make_node("Range", ["a", "b", "c"], ["r"]),
            helper.make_node("Mystery", ["r"], ["y"], domain="org.example"),
        ],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.INT64, []) for n in "abc"],
        [helper.make_tensor_value_info("y", TensorProto.INT64, None)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 10), helper.make_opsetid("org.example", 1)]
    )
    reasons = {n.op_type: n.reason for n in cpu_placed_nodes(model)}
    assert "no CUDA kernel of Range for opset 10 (kernels: 11+)" in reasons["Range"]
    assert "no kernel for org.example Mystery" in reasons["Mystery"]


def test_cast_like_is_placed_as_the_cast_onnx_runtime_inlines(tmp_path):
    """No provider registers CastLike: ONNX Runtime inlines it as a Cast of its first input
    (checked here on the session's saved graph), and its second input only gives the type.
    Counted as a kernel miss, a traced graph's CastLike nodes failed a --passes CUDA build."""
    graph = helper.make_graph(
        [
            helper.make_node("Shape", ["x"], ["shape"]),  # a host value
            helper.make_node("CastLike", ["x", "shape"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "saved.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    assert "Cast" in [n.op_type for n in onnx.load(str(tmp_path / "saved.onnx")).graph.node]
    assert cpu_placed_nodes(model) == []
    assert placement_summary(model)["memcpy_nodes"] == 0


@pytest.fixture(scope="module")
def fused_fp32_build(tiny_models, tmp_path_factory):
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("fused") / "build"
    result = CliRunner().invoke(
        cli,
        ["compile", str(tiny_models("llama")), "--target", "cpu", "--quantize", "none",
         "-o", str(out), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def test_fused_fp32_cpu_build_is_reported_as_leaving_the_gpu(fused_fp32_build):
    """The H200 'garbage' build: fp32 GroupQueryAttention has no CUDA kernel (fp16/bf16 only)."""
    summary = placement_summary(fused_fp32_build / "model.onnx")
    assert summary["ok"] is False
    gqa = [key for key in summary["by_op"] if key.startswith("com.microsoft GroupQueryAttention")]
    assert len(gqa) == 1 and "T=float" in gqa[0]
    layers = 2  # tests/models.py's tiny llama
    assert summary["by_op"][gqa[0]]["count"] == layers
    # The rest of the fused fp32 graph (SkipSimplifiedLayerNormalization, MatMul, ...) has
    # fp32 CUDA kernels.
    assert summary["cpu_nodes"] == layers


def test_report_renders_the_placement(fused_fp32_build):
    from fdec.report import load_report, render_report

    report = load_report(fused_fp32_build)
    assert "CUDA placement" not in render_report(report)  # cpu target: no entry
    report["cuda_placement"] = placement_summary(fused_fp32_build / "model.onnx")
    text = render_report(report)
    assert "CUDA placement: 2 nodes have no CUDA kernel" in text
    assert "2× com.microsoft GroupQueryAttention (M=int32, T=float, T_CACHE=float)" in text
    report["cuda_placement"] = placement_summary(_fp16_fused_graph())
    assert "CUDA placement: every node has a CUDA kernel" in render_report(report)
