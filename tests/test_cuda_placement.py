"""Host/device placement under ONNX Runtime's CUDA provider (fdec.lower.cuda_placement).

A graph whose every node has a CUDA kernel can still copy between host and device: some CUDA
kernels read an input in host memory (GroupQueryAttention's total_sequence_length) or write
their output there (Shape). A Memcpy node costs a sync each step and stops ONNX Runtime from
capturing CUDA graphs. The fused build used to compute total_sequence_length on the device
(max(position_ids) + 1); it now reads the attention mask's width, a host-side shape.
"""

from __future__ import annotations

import json
import re

import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from fdec.cli import cli
from fdec.lower.cuda_placement import memory_type_table, memory_types, predict_placement

_MS = "com.microsoft"


def test_memory_types_name_their_source_and_match_the_kernels():
    for domain, ops in memory_type_table()["ops"].items():
        for op, entries in ops.items():
            for entry in entries:
                assert re.fullmatch(r"[0-9a-f]{40}", entry["commit"]), (domain, op)
                assert entry["file"].startswith("onnxruntime/"), (domain, op)
    # Read from the registrations (KernelDefBuilder InputMemoryType / OutputMemoryType):
    assert memory_types("GroupQueryAttention", _MS, 1) == ((6,), ())
    assert memory_types("Shape", "", 21) == ((), (0,))
    assert memory_types("Reshape", "", 21) == ((1,), ())
    assert memory_types("ReduceMax", "", 18) == ((1,), ())  # axes became an input at 18
    assert memory_types("ReduceMax", "", 13) == ((), ())
    assert memory_types("MatMul", "", 21) == ((), ())  # not listed: all on the device


def _graph(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    # A well-formed graph: ONNX Runtime (CPU) loads it, checking every node against its schema.
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return model


def test_shape_work_moves_to_the_host_and_a_device_shape_is_copied():
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    x = helper.make_tensor_value_info("x", f32, [2, 3, 4])
    # Shape(x) → Concat with a small initializer → Reshape's shape: all on the host, no copy.
    shape_on_host = _graph(
        [
            helper.make_node("Shape", ["x"], ["s"], start=0, end=2),
            helper.make_node("Concat", ["s", "minus_one"], ["shape"], axis=0),
            helper.make_node("Reshape", ["x", "shape"], ["y"]),
        ],
        [x],
        [helper.make_tensor_value_info("y", f32, None)],
        [helper.make_tensor("minus_one", i64, [1], [-1])],
    )
    placement = predict_placement(shape_on_host)
    assert placement.host_shape_nodes == {"Concat": 1}
    assert placement.copies == [] and placement.cuda_graph_capturable
    # The same shape computed from the data on the device: one MemcpyToHost for the Reshape.
    shape_from_data = _graph(
        [
            helper.make_node("Cast", ["x"], ["xi"], to=i64),
            helper.make_node("ReduceMax", ["xi", "axes"], ["m"], keepdims=0),
            helper.make_node("Concat", ["m", "minus_one"], ["shape"], axis=0),
            helper.make_node("Reshape", ["x", "shape"], ["y"]),
        ],
        [x],
        [helper.make_tensor_value_info("y", f32, None)],
        [
            helper.make_tensor("minus_one", i64, [1], [-1]),
            helper.make_tensor("axes", i64, [2], [1, 2]),
        ],
    )
    placement = predict_placement(shape_from_data)
    assert [(c.direction, c.value, c.readers) for c in placement.copies] == [
        ("MemcpyToHost", "shape", ("Reshape[1]",))
    ]
    assert not placement.cuda_graph_capturable
    # A host value read by a device input is copied the other way.
    host_into_device = _graph(
        [
            helper.make_node("Shape", ["x"], ["s"], start=0, end=1),
            helper.make_node("Cast", ["x"], ["xi"], to=i64),
            helper.make_node("Add", ["xi", "s"], ["y"]),
        ],
        [x],
        [helper.make_tensor_value_info("y", i64, None)],
    )
    copies = predict_placement(host_into_device).copies
    assert [(c.direction, c.value) for c in copies] == [("MemcpyFromHost", "s")]


def test_fp16_inputs_stay_on_the_device():
    """ONNX Runtime never moves a node with an fp16 input to the CPU (GetCpuPreferredNodes)."""
    f16 = TensorProto.FLOAT16
    model = _graph(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Cast", ["s"], ["sf"], to=f16),
            helper.make_node("Mul", ["sf", "x2"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", f16, [3]), helper.make_tensor_value_info("x2", f16, [3])],
        [helper.make_tensor_value_info("y", f16, None)],
    )  # fmt: skip
    placement = predict_placement(model)
    assert placement.host_shape_nodes == {"Cast": 1}  # its input is int64; its output fp16
    assert [(c.direction, c.value) for c in placement.copies] == [("MemcpyFromHost", "sf")]


def _cuda_build(folder, out, *options, **rules_off) -> None:
    """`fdec compile FOLDER --target h200 --backend onnxruntime` (the fp16 CUDA graph) into
    out, with the fuse-attention helpers named in rules_off turned off."""
    import types

    import fdec.passes.fusion as fusion

    off = {"total_length": ("_total_length_from_mask", lambda model: 0),
           "shift_range": ("_HOST_SHAPE_RULES", types.SimpleNamespace(apply_to_model=lambda m: 0))}  # fmt: skip
    patch = pytest.MonkeyPatch()
    for name in rules_off:
        patch.setattr(fusion, *off[name])
    try:
        result = CliRunner().invoke(
            cli,
            ["compile", str(folder), "--target", "h200", "--backend", "onnxruntime", "-o",
             str(out), "--max-seq-len", "64", "--no-cache", *options],
        )  # fmt: skip
    finally:
        patch.undo()
    assert result.exit_code == 0, result.output + result.stderr


@pytest.fixture(scope="module")
def fused_builds(tiny_models, tmp_path_factory):
    """The tiny Llama's fp16 CUDA build as shipped, and the same with onnxscript's own
    total_sequence_length (the fdec rewrite turned off)."""
    root = tmp_path_factory.mktemp("placement")
    _cuda_build(tiny_models("llama"), root / "shipped")
    _cuda_build(tiny_models("llama"), root / "from_positions", total_length=True)
    return {"shipped": root / "shipped", "from_positions": root / "from_positions"}


def test_fused_build_has_no_memcpy_and_the_report_says_so(fused_builds):
    placement = predict_placement(fused_builds["shipped"] / "model.onnx")
    assert placement.no_kernel == [] and placement.copies == []
    assert placement.host_shape_nodes == {"Cast": 1}  # the mask's width, as int32
    report = json.loads((fused_builds["shipped"] / "report.json").read_text())
    assert report["cuda_placement"]["ok"] is True
    assert report["cuda_placement"]["memcpy_nodes"] == 0
    assert report["cuda_placement"]["cuda_graph_capturable"] is True
    model = onnx.load(fused_builds["shipped"] / "model.onnx", load_external_data=False)
    produced = {out: node for node in model.graph.node for out in node.output}
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert gqa and {n.input[6] for n in gqa} == {"gqa_total_sequence_length"}
    cast = produced["gqa_total_sequence_length"]
    assert produced[cast.input[0]].op_type == "Shape"
    assert produced[cast.input[0]].input == ["attention_mask"]
    # The tied table is one fp16 initializer: the embedding's Gather and the lm_head read it.
    gather = next(n for n in model.graph.node if n.op_type == "Gather")
    head = produced[produced["logits"].input[0]]
    assert head.op_type == "FusedMatMul" and head.input[1] == gather.input[0]
    tables = [i for i in model.graph.initializer if len(i.dims) == 2 and i.dims[0] == 320]
    assert [t.data_type for t in tables] == [TensorProto.FLOAT16]


def test_total_length_from_positions_would_copy_to_the_host(fused_builds):
    """Without the rewrite, every GroupQueryAttention reads a device value in host memory."""
    placement = predict_placement(fused_builds["from_positions"] / "model.onnx")
    assert [c.direction for c in placement.copies] == ["MemcpyToHost"]
    readers = placement.copies[0].readers
    assert len(readers) == 2 and all(
        "GroupQueryAttention" in r and r.endswith("[6]") for r in readers
    )
    assert not placement.cuda_graph_capturable
    report = json.loads((fused_builds["from_positions"] / "report.json").read_text())
    assert report["cuda_placement"]["ok"] is False
    assert report["cuda_placement"]["memcpy_nodes"] == 1


def test_traced_positions_shift_inside_the_range_so_nothing_crosses(tmp_path):
    """A traced causal mask (attention fuse-attention keeps: here a head size of 8, which
    GroupQueryAttention refuses) adds the host-side past length to a Range's device output:
    a MemcpyFromHost every step. fuse-attention shifts the Range itself instead. (GPT-2 was
    the case until its attention fused to GroupQueryAttention, which reads no such mask.)"""
    from models import make_tiny_model

    folder = make_tiny_model(tmp_path / "head8", "llama", hidden_size=32, intermediate_size=64)
    _cuda_build(folder, tmp_path / "shipped")
    _cuda_build(folder, tmp_path / "unshifted", shift_range=True)
    before = predict_placement(tmp_path / "unshifted" / "model.onnx")
    assert [(c.direction, c.readers) for c in before.copies] == [
        ("MemcpyFromHost", (before.copies[0].readers[0],))
    ] and before.copies[0].readers[0].startswith("Add ")
    report = json.loads((tmp_path / "shipped" / "report.json").read_text())
    fusion = next(p for p in report["passes"] if p["name"] == "fuse-attention")
    assert fusion["stats"]["ranges_shifted_to_host"] == 1
    assert fusion["stats"]["not_fused"].startswith("head size 8")
    placement = predict_placement(tmp_path / "shipped" / "model.onnx")
    assert placement.copies == [] and placement.no_kernel == []
    assert report["cuda_placement"]["memcpy_nodes"] == 0 and report["verification"]["ok"]


def test_gpt2_fuses_for_cuda_with_nothing_crossing(tiny_models, tmp_path):
    """GPT-2's fp16 CUDA build: GroupQueryAttention with no rotary on every layer (one shared
    cache buffer), and no Memcpy or CPU-placed node in the placement ONNX Runtime will make."""
    _cuda_build(tiny_models("gpt2"), tmp_path / "shipped")
    report = json.loads((tmp_path / "shipped" / "report.json").read_text())
    fusion = next(p for p in report["passes"] if p["name"] == "fuse-attention")
    assert fusion["stats"]["attention"] == "GroupQueryAttention"
    assert fusion["stats"]["kv_shared_buffer_layers"] == 2
    placement = predict_placement(tmp_path / "shipped" / "model.onnx")
    assert placement.copies == [] and placement.no_kernel == []
    assert report["cuda_placement"]["memcpy_nodes"] == 0 and report["verification"]["ok"]


def test_an_unfused_cuda_graph_gets_host_shapes_instead(tiny_models, tmp_path):
    """Attention sinks keep the traced attention (GroupQueryAttention has none), so no
    fuse-attention shifts the positions: the backend adds host-shapes before the typing."""
    sink = ("--kv-window", "8", "--kv-sink", "2")
    _cuda_build(tiny_models("llama"), tmp_path / "shipped", *sink)
    _cuda_build(tiny_models("llama"), tmp_path / "unshifted", *sink, shift_range=True)
    assert len(predict_placement(tmp_path / "unshifted" / "model.onnx").copies) == 1
    report = json.loads((tmp_path / "shipped" / "report.json").read_text())
    assert report["pipeline"][-3:] == ["host-shapes", "cast-float16", "kv-policy"]
    shapes = next(p for p in report["passes"] if p["name"] == "host-shapes")
    assert shapes["stats"] == {"ranges_shifted_to_host": 1}  # a constant offset stays put
    assert predict_placement(tmp_path / "shipped" / "model.onnx").copies == []
    assert report["cuda_placement"]["memcpy_nodes"] == 0 and report["verification"]["ok"]
