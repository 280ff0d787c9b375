"""TensorRT-RTX lowering: real engines built on the CPU from tiny exported models, no GPU."""

from __future__ import annotations

import json
import pathlib
import sys

import onnx
import pytest
from models import make_tiny_model
from onnx import TensorProto, helper

from fdec.ir import ModelSpec
from fdec.lower.profiles import ShapeLimits
from fdec.lower.tensorrt_rtx import (
    ENGINE_FILE,
    RTX_COMPUTE_CAPABILITIES,
    available,
    build_engine,
    unsupported_nodes,
)

pytestmark = pytest.mark.skipif(
    available() is not None, reason=f"TensorRT-RTX is not usable here: {available()}"
)

# The tiny models have 256 positions; batch 2 gives min 1 / opt 1 / max 2.
LIMITS = ShapeLimits(max_batch=2, max_seq_len=256)
SUPPORTED_TEXT = "7.5, 8.0, 8.6, 8.9, 12.0, 12.1"


def _export(tmp_path_factory, family: str) -> tuple[pathlib.Path, ModelSpec]:
    """Export a tiny random `family` model the way a compile does; returns model.onnx, spec."""
    from fdec.frontend.export import import_model
    from fdec.frontend.source import resolve_source
    from fdec.passes import DEFAULT_PIPELINE, make_pipeline
    from fdec.pipeline import PassManager

    root = tmp_path_factory.mktemp(f"rtx-{family}")
    # Module-scoped: conftest's per-test cache isolation has not run yet, so isolate here.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FDEC_CACHE_DIR", str(root / "cache" / "fdec"))
        patch.setenv("XDG_CACHE_HOME", str(root / "cache"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        folder = make_tiny_model(root / "source", family)
        imported = import_model(resolve_source(str(folder)))
        model, _ = PassManager(make_pipeline(list(DEFAULT_PIPELINE))).run(imported.fdec_model)
    path = root / "onnx" / "model.onnx"
    path.parent.mkdir()
    model.save(path)
    assert (path.parent / "model.onnx.data").is_file()  # weights are external
    return path, model.spec


def _contrib_graph(folder: pathlib.Path) -> pathlib.Path:
    """x -> Relu -> com.microsoft.FastGelu -> Relu -> y, saved as folder/contrib.onnx."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu_in"),
        helper.make_node("FastGelu", ["r"], ["g"], name="gelu_contrib", domain="com.microsoft"),
        helper.make_node("Relu", ["g"], ["y"], name="relu_out"),
    ]
    graph = helper.make_graph(nodes, "contrib", [x], [y])
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    path = folder / "contrib.onnx"
    onnx.save(model, path)
    return path


def _static_spec() -> ModelSpec:
    """A spec for a hand-written graph with no dynamic inputs (one empty encoder profile)."""
    return ModelSpec(
        family="test", architecture="Test", kind="encoder", num_layers=0, num_heads=1,
        num_kv_heads=1, head_dim=8, hidden_size=8, intermediate_size=8, vocab_size=0,
        max_positions=0, tie_word_embeddings=False,
    )  # fmt: skip


def _check_engine_file(path: pathlib.Path, size: int) -> bytes:
    """The engine file is whole: TensorRT's "vtrt" magic, and the total length at byte 16.

    The header layout is what tensorrt-rtx 1.7.1 writes (observed, not documented): the magic,
    then a little-endian 64-bit size of the whole serialized engine at offset 16.
    """
    data = path.read_bytes()
    assert len(data) == size
    assert data[:4] == b"vtrt"
    assert int.from_bytes(data[16:24], "little") == len(data)
    return data


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _export(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def llama_engines(llama, tmp_path_factory):
    """Engines for Ada (8.9) and consumer Blackwell (12.0), built once for the module."""
    path, spec = llama
    results = {}
    for cc in ((8, 9), (12, 0)):
        out = tmp_path_factory.mktemp(f"engine-{cc[0]}{cc[1]}")
        messages: list[str] = []
        result = build_engine(
            path, out, spec=spec, limits=LIMITS, compute_capability=cc, progress=messages.append
        )
        results[cc] = (result, out, messages)
    return results


def test_compute_capabilities_match_the_installed_toolchain():
    import tensorrt_rtx as trt

    members = {
        name for name in trt.ComputeCapability.__members__ if name not in ("NONE", "CURRENT")
    }
    assert members == {f"SM{major}{minor}" for major, minor in RTX_COMPUTE_CAPABILITIES}
    assert (9, 0) not in RTX_COMPUTE_CAPABILITIES and (10, 0) not in RTX_COMPUTE_CAPABILITIES


@pytest.mark.parametrize("cc", [(8, 9), (12, 0)], ids=["ada-8.9", "blackwell-12.0"])
def test_llama_engine_is_built_with_both_profiles(llama_engines, llama, cc):
    import tensorrt_rtx as trt

    result, out, messages = llama_engines[cc]
    assert result.status == "built", result.reason
    assert result.reason is None and result.unsupported == []
    assert result.compute_capability == f"{cc[0]}.{cc[1]}"
    assert result.engine == ENGINE_FILE
    assert result.tensorrt_rtx_version == trt.__version__
    assert result.purpose == "deployable"
    assert 0 < result.wall_s < 60
    # Far more than the 0.4 MB of weights: the graph and its compiled program are in it.
    assert result.bytes > 1_000_000
    _check_engine_file(out / ENGINE_FILE, result.bytes)
    assert sorted(p.name for p in out.iterdir()) == [ENGINE_FILE]  # no partial file left
    assert any("building for compute capability" in m for m in messages)

    # Profiles in TensorRT's order: prefill with an empty past, then one-token decode.
    _, spec = llama
    context, generation = result.profiles
    assert (context["name"], generation["name"]) == ("context", "generation")
    key = spec.past_inputs[0][0]
    kv, dim = spec.num_kv_heads, spec.head_dim
    assert context["shapes"][key] == {"min": [1, kv, 0, dim], "opt": [1, kv, 0, dim],
                                      "max": [2, kv, 0, dim]}  # fmt: skip
    assert generation["shapes"][key]["max"] == [2, kv, 255, dim]
    assert context["shapes"]["input_ids"]["max"] == [2, 256]
    # Kernels each profile launches, from the same listing (the roofline's per-step floor)
    assert list(result.kernels) == ["context", "generation"] and min(result.kernels.values()) > 0
    assert set(context["shapes"]) == set(spec.inputs)
    assert json.loads(json.dumps(result.to_dict())) == result.to_dict()


def test_engine_header_names_one_target_architecture(llama_engines):
    """Byte 32 of a tensorrt-rtx 1.7.1 engine is a mask of target architectures (observed, not
    documented: 0x08 for 8.9, 0x10 for 12.0, 0x7e with no compute capability set). One bit each,
    and different ones: the compute capability we set reached the engine. (Whole-file bytes
    are no evidence: two builds for the same target already differ.)"""
    masks = {}
    for cc, (result, out, _) in llama_engines.items():
        assert result.status == "built", result.reason
        masks[cc] = (out / ENGINE_FILE).read_bytes()[32]
        assert masks[cc] and masks[cc] & (masks[cc] - 1) == 0, f"{cc}: {masks[cc]:#x}"
    assert masks[8, 9] != masks[12, 0]


def test_turing_target_is_honoured_and_its_failure_reported(llama, tmp_path):
    """7.5 is targetable, but TensorRT-RTX has no FP32 GEMM for Turing: a "failed" result
    carrying the builder's first error line, which names the architecture we asked for."""
    path, spec = llama
    result = build_engine(path, tmp_path, spec=spec, limits=LIMITS, compute_capability=(7, 5))
    assert result.status == "failed"
    assert "SM75" in result.reason and "FP32 GEMM" in result.reason
    assert "\n" not in result.reason
    assert result.engine is None and result.bytes == 0
    assert not (tmp_path / ENGINE_FILE).exists()


def test_exported_llama_has_no_unsupported_nodes(llama):
    path, _ = llama
    assert unsupported_nodes(path) == []


def test_contrib_op_is_reported_before_building(tmp_path, capfd):
    path = _contrib_graph(tmp_path)
    found = unsupported_nodes(path)
    assert [(n["name"], n["op_type"], n["domain"], n["index"]) for n in found] == [
        ("gelu_contrib", "FastGelu", "com.microsoft", 1)
    ]
    assert "plugin" in found[0]["reason"].lower()

    out = tmp_path / "build"
    result = build_engine(
        path, out, spec=_static_spec(), limits=LIMITS, compute_capability=(8, 9), purpose="check"
    )
    assert result.status == "unsupported"
    assert result.unsupported == found
    assert "gelu_contrib (com.microsoft.FastGelu)" in result.reason
    assert result.purpose == "check" and result.engine is None
    assert not (out / ENGINE_FILE).exists()
    # TensorRT's error messages were collected, not printed.
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.parametrize("cc", [(9, 0), (10, 0)])
def test_untargetable_compute_capability_is_deferred(llama, tmp_path, cc):
    path, spec = llama
    result = build_engine(path, tmp_path, spec=spec, limits=LIMITS, compute_capability=cc)
    assert result.status == "deferred"
    assert f"{cc[0]}.{cc[1]}" in result.reason and SUPPORTED_TEXT in result.reason
    assert result.engine is None and not (tmp_path / ENGINE_FILE).exists()
    assert [p["name"] for p in result.profiles] == ["context", "generation"]


def test_missing_toolchain_defers_with_the_install_fix(llama, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)  # import now fails
    assert "pip install 'fdec[rtx]'" in available()
    path, spec = llama
    result = build_engine(path, tmp_path, spec=spec, limits=LIMITS, compute_capability=(8, 9))
    assert result.status == "deferred" and "not installed" in result.reason
    assert result.tensorrt_rtx_version is None


def test_bert_encoder_builds(tmp_path_factory, tmp_path):
    path, spec = _export(tmp_path_factory, "bert")
    result = build_engine(path, tmp_path, spec=spec, limits=LIMITS, compute_capability=(8, 9))
    assert result.status == "built", result.reason
    (profile,) = result.profiles
    assert profile["name"] == "encoder"
    assert set(profile["shapes"]) == {"input_ids", "attention_mask", "token_type_ids"}
    assert profile["shapes"]["input_ids"]["max"] == [2, 256]
    assert result.bytes > 100_000
    _check_engine_file(tmp_path / ENGINE_FILE, result.bytes)


def test_deferred_engine_is_finished_by_build_engine(llama, tmp_path, cli_runner):
    """Compiled where tensorrt-rtx is missing: the engine is deferred with its profiles; later
    `fdec build-engine` builds it from the same strongly typed model and updates the report."""
    from fdec.build import write_manifest
    from fdec.cli import cli
    from fdec.lower.engines import build_engines
    from fdec.targets import load_target

    path, spec = llama
    build = tmp_path / "build"
    build.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        (build / name).write_bytes((path.parent / name).read_bytes())
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "tensorrt_rtx", None)
        records = build_engines(
            build, spec=spec, target=load_target("rtx4090"), backend="tensorrt-rtx", limits=LIMITS
        )
    (record,) = records
    assert record["status"] == "deferred" and "not installed" in record["reason"]
    assert record["model"] == "engines/tensorrt/model.onnx"
    assert record["typed_model"]["dtype"] == "bf16"  # sm 8.9 has bf16
    assert not (build / "engines/tensorrt-rtx" / ENGINE_FILE).exists()
    (build / "report.json").write_text(json.dumps({"engines": records}))
    write_manifest(build, {})  # build-engine finishes fdec builds only (fdec.build.MANIFEST)

    result = cli_runner.invoke(cli, ["build-engine", str(build), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    (built,) = json.loads(result.stdout)
    assert built["status"] == "built" and built["engine"] == "engines/tensorrt-rtx/model.engine"
    assert built["engine_precision"]["precision"] == "bf16"
    assert built["profiles"] == record["profiles"]
    _check_engine_file(build / built["engine"], built["bytes"])
    (stored,) = json.loads((build / "report.json").read_text())["engines"]
    assert stored["status"] == "built" and stored["typed_model"] == record["typed_model"]

    again = cli_runner.invoke(cli, ["build-engine", str(build)])
    assert again.exit_code == 2 and "no deferred engine" in again.stderr


def test_engine_precision_reads_the_inspector_listing():
    listing = "\n".join(
        [
            "Layers:",
            *[
                f"Name: a{i}, LayerType: gemm, Inputs: [ {{ Name: x, Dimensions: [-1,64], "
                "Datatype: FP8 }], Constants: [ { Name: w, Dimensions: [64,32], Datatype: FP8 }"
                "], Outputs: [ ]"
                for i in range(2)
            ],
            "Name: b, LayerType: runtime_fusion, Inputs: [ { Name: x, Dimensions: [-1,64], "
            "Datatype: Half }], Constants: [ { Name: w, Dimensions: [64,32], Datatype: Int4 }, "
            "{ Name: s, Dimensions: [2,32], Datatype: Half }], Outputs: [ ]",
            "Name: c, LayerType: gemm, Inputs: [ { Name: q, Dimensions: [-1,-1,16], Datatype: "
            "Half }, { Name: k, Dimensions: [-1,16,-1], Datatype: Half }], Constants: [ { Name: "
            "alpha, Dimensions: [1], Datatype: Float }], Outputs: [ ]",
            "Name: d, LayerType: kgen, Inputs: [ { Name: ids, Dimensions: [-1,-1], Datatype: "
            "Int64 }], Constants: [ { Name: t, Dimensions: [320,64], Datatype: Int8 }], Outputs: [ ]",
            "Name: e, LayerType: kgen, Inputs: [ { Name: x, Dimensions: [-1,64], Datatype: Half }]"
            ", Constants: [], Outputs: [ ]",
            # NVFP4 W4A4 (TensorRT-RTX 1.7.1's words): FP4E2M1 activations and weights, the
            # FP8 block scales listed before the weight
            "Name: f, LayerType: gemm, Inputs: [ { Name: x, Dimensions: [-1,64], Datatype: "
            "FP4E2M1 }, { Name: xs, Dimensions: [-1,4], Datatype: FP8 }], Constants: [ { Name: s, "
            "Dimensions: [4,32], Datatype: FP8 }, { Name: w, Dimensions: [64,32], Datatype: "
            "FP4E2M1 }], Outputs: [ ]",
            # a kgen moving FP8 activation scales against padded FP8 constants: no product
            "Name: g, LayerType: kgen, Inputs: [ { Name: xs, Dimensions: [1,1,36], Datatype: "
            "FP8 }], Constants: [ { Name: p, Dimensions: [1,127,36], Datatype: FP8 }], Outputs: [ ]",
        ]
    )
    from fdec.lower.tensorrt_rtx import engine_precision

    assert engine_precision(listing) == {
        "gemms": {"fp16": 1, "fp16 (int4 weights)": 1, "fp4": 1, "fp8": 2},
        "precision": "fp8",
    }


def test_profile_kernels_count_each_profiles_kernels_in_the_listing():
    from fdec.lower.tensorrt_rtx import profile_kernels

    def layer(name: str, kind: str) -> str:
        return f"Name: {name}, LayerType: {kind}, Inputs: [], Constants: [], Outputs: [ ]"

    listing = "\n".join([
        "Layers:",
        layer("[ShapeHostToDeviceCopy 0]", "ShapeHostToDevice"),
        layer("__myl_a_myl1_0", "kgen"), layer("b_MatMul_myl1_1", "gemm"),
        layer("entry^bb^signal^1_myl1_2", "signal"), layer("entry^bb^wait^2_myl1_3", "wait"),
        layer("[ShapeHostToDeviceCopy 0] [profile 1]", "ShapeHostToDevice"),
        layer("__myl_c_myl3_0", "runtime_fusion"), layer("__mye_0_myl3_1", "shape_call"),
        "Bindings:", "Name: logits, IOMode: Output, DataType: Float",
    ])  # fmt: skip
    assert profile_kernels(listing, ["context", "generation"]) == {"context": 2, "generation": 1}
    assert profile_kernels(listing, ["only"]) is None  # not the engine's profiles
    # A static decode profile's fused graph may carry no mark at all: one graph per profile,
    # in order (a tiny engine's listing: its weight's dequantization listed before the mark)
    unmarked = "\n".join([
        layer("__myl_CastMulCastFc_myl0_1", "runtime_fusion"),
        layer("__myl_CastMulCast_myl1_0", "kgen"), layer("node_of_y [profile 1]_myl1_1", "gemm"),
    ])  # fmt: skip
    assert profile_kernels(unmarked, ["context", "generation"]) == {"context": 1, "generation": 2}
