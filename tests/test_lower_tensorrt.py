"""The TensorRT backend: strongly typed engine plans from a real exported tiny Llama, refusals,
the flags each TensorRT major version has, and the GPU build.

Everything but `test_build_engine_with_tensorrt` runs without TensorRT or a GPU; that one builds
a real engine and runs only where `tensorrt_available()` says it can. The fake TensorRT behaves
like 11.x (no precision builder flags) unless a test asks for 10.x.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shlex
import shutil

import onnx
import onnx.helper
import pytest
from models import make_tiny_model

from fdec.build import sha256_file
from fdec.errors import CompileError, InputError, UsageError
from fdec.lower.profiles import ShapeLimits
from fdec.lower.tensorrt import (
    NOT_INSTALLED,
    SUPPORTED_TENSORRT,
    TENSORRT_INTERFACE,
    EnginePlan,
    build_planned_engine,
    check_standard_ops,
    engine_report,
    plan_engine,
    read_plan,
    tensorrt_available,
    visible_gpus,
)
from fdec.lower.tensorrt_model import TYPED_MODEL, prepare_tensorrt_model
from fdec.targets import load_target

_UNAVAILABLE = tensorrt_available()
_LIMITS = ShapeLimits(max_batch=4, max_seq_len=128)
_DATACENTER = ("h100", "h200", "b200", "a100", "l4", "l40s", "a10g", "t4")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny Llama imported, run through the default passes and saved once: (folder, spec)."""
    from fdec.frontend.export import import_model
    from fdec.frontend.source import resolve_source
    from fdec.passes import DEFAULT_PIPELINE, make_pipeline
    from fdec.pipeline import PassManager

    root = tmp_path_factory.mktemp("trt-export")
    source = make_tiny_model(root / "source", "llama")
    imported = import_model(resolve_source(str(source), cache_dir=root / "cache"))
    model, _ = PassManager(make_pipeline(list(DEFAULT_PIPELINE))).run(imported.fdec_model)
    folder = root / "build"
    folder.mkdir()
    model.save(folder / "model.onnx")
    return folder, model.spec


@pytest.fixture
def build(exported, tmp_path):
    """A fresh build folder: the exported model.onnx (+ .data) and its fp16-typed TensorRT model."""
    folder, spec = exported
    out = tmp_path / "build"
    shutil.copytree(folder, out)
    prepare_tensorrt_model(out, target=load_target("t4"), spec=spec, dtype="fp16")
    return out


@pytest.fixture
def spec(exported):
    return exported[1]


def _graph_inputs(path: pathlib.Path) -> dict[str, list[int | None]]:
    model = onnx.load(str(path), load_external_data=False)
    return {
        value.name: [
            d.dim_value if d.HasField("dim_value") else None
            for d in value.type.tensor_type.shape.dim
        ]
        for value in model.graph.input
    }


def _parse_trtexec_shapes(value: str) -> dict[str, list[int]]:
    shapes = {}
    for item in value.split(","):
        name, dims = item.rsplit(":", 1)
        shapes[name] = [int(d) for d in dims.split("x")]
    return shapes


def test_plan_for_h100_writes_profiles_script_and_commands(build, spec):
    plan = plan_engine(build, spec=spec, target=load_target("h100"), limits=_LIMITS)
    folder = build / "engines" / "tensorrt"
    stored = json.loads((folder / "plan.json").read_text())

    assert stored == plan.to_dict()
    assert EnginePlan.from_dict(stored) == plan
    assert read_plan(build) == plan
    assert stored["schema_version"] == 2
    assert stored["target"] == "h100"
    assert stored["compute_capability"] == "9.0"
    assert (stored["onnx"], stored["engine"], stored["timing_cache"]) == (
        "model.onnx",
        "model.engine",
        "timing.cache",
    )
    # The engine's own strongly typed model, not the ONNX Runtime model.
    assert (folder / stored["onnx"]).resolve() == (build / TYPED_MODEL).resolve()
    assert stored["precisions"] == ["fp16"] and stored["strongly_typed"] is True
    assert stored["sparse_weights"] is False
    assert stored["builder_optimization_level"] == 3
    assert stored["status"] == "deferred"
    assert stored["built_on"] is None and stored["sha256"] is None
    if _UNAVAILABLE is not None:
        assert stored["reason"] == _UNAVAILABLE
        assert "tensorrt" in stored["reason"] or "GPU" in stored["reason"]
    if _UNAVAILABLE == NOT_INSTALLED:
        assert "tensorrt" in stored["reason"]

    # Profiles: every dynamic graph input, all KV-cache inputs, min <= opt <= max, static dims kept.
    inputs = _graph_inputs(build / TYPED_MODEL)
    assert inputs == _graph_inputs(build / "model.onnx")  # typing kept the I/O
    dynamic = {name for name, dims in inputs.items() if None in dims}
    past = {
        f"past_key_values.{i}.{kind}" for i in range(spec.num_layers) for kind in ("key", "value")
    }
    assert past <= dynamic
    assert [p["name"] for p in stored["profiles"]] == ["context", "generation"]
    for profile in stored["profiles"]:
        assert set(profile["shapes"]) == dynamic
        for name, dims in profile["shapes"].items():
            assert len(dims["min"]) == len(dims["opt"]) == len(dims["max"]) == len(inputs[name])
            for low, opt, high, static in zip(dims["min"], dims["opt"], dims["max"], inputs[name]):
                assert 0 <= low <= opt <= high
                if static is not None:
                    assert low == opt == high == static
    generation = stored["profiles"][1]["shapes"]
    assert generation["input_ids"]["max"] == [4, 1]
    assert generation["past_key_values.0.key"]["max"] == [4, spec.num_kv_heads, 127, spec.head_dim]

    # build.sh: executable, runs the stored trtexec command from its own folder.
    script = folder / "build.sh"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert 'cd "$(dirname "$0")"' in text
    (line,) = [line for line in text.splitlines() if line.startswith("exec trtexec")]
    command = shlex.split(line)[1:]
    assert command == plan.trtexec
    assert shlex.split(plan.trtexec_shell) == plan.trtexec
    assert shlex.split(plan.polygraphy_shell) == plan.polygraphy
    assert "--onnx=model.onnx" in command
    assert "--stronglyTyped" in command
    assert "--saveEngine=model.engine" in command
    assert "--timingCacheFile=timing.cache" in command
    assert "--skipInference" in command
    assert "--builderOptimizationLevel=3" in command
    assert not any(flag in command for flag in ("--fp16", "--bf16", "--fp8", "--int8", "--best"))
    # Each profile: --profile=N then min, opt and max shapes naming every input, as planned.
    for index, profile in enumerate(stored["profiles"]):
        at = command.index(f"--profile={index}")
        for offset, (flag, key) in enumerate(
            (("--minShapes=", "min"), ("--optShapes=", "opt"), ("--maxShapes=", "max")), 1
        ):
            arg = command[at + offset]
            assert arg.startswith(flag)
            shapes = _parse_trtexec_shapes(arg[len(flag) :])
            assert shapes == {name: dims[key] for name, dims in profile["shapes"].items()}
    polygraphy = plan.polygraphy
    assert polygraphy[:8] == [
        "polygraphy", "convert", "model.onnx", "--convert-to", "trt", "-o", "model.engine",
        "--strongly-typed",
    ]  # fmt: skip
    assert not {"--fp16", "--bf16", "--fp8", "--int8"} & set(polygraphy)
    assert polygraphy.count("--trt-min-shapes") == 2
    assert polygraphy[polygraphy.index("--load-timing-cache") + 1] == "timing.cache"
    assert polygraphy[polygraphy.index("--save-timing-cache") + 1] == "timing.cache"

    report = engine_report(plan)
    assert report["backend"] == "tensorrt"
    assert report["status"] == "deferred"
    assert report["reason"] == plan.reason
    assert report["command"] == plan.trtexec_shell
    assert report["files"] == [
        "engines/tensorrt/plan.json", "engines/tensorrt/build.sh", "engines/tensorrt/model.onnx"
    ]  # fmt: skip
    assert report["precisions"] == ["fp16"] and report["strongly_typed"] is True
    assert "fdec build-engine" in report["fix"]


def _flag_names(command: list[str]) -> list[str]:
    return [arg.split("=", 1)[0] for arg in command if arg.startswith("--")]


@pytest.mark.parametrize("target", ["h100", "a100", "l4", "t4", "b200"])
@pytest.mark.parametrize("major", sorted(TENSORRT_INTERFACE))
def test_every_trtexec_flag_exists_in_each_supported_tensorrt(build, spec, target, major):
    """A flag fdec writes that a supported TensorRT removed fails here, not in a user's build."""
    sparse = load_target(target).sparse_tensor_cores
    plan = plan_engine(
        build, spec=spec, target=load_target(target), limits=_LIMITS, sparse_weights=sparse
    )
    flags = _flag_names(plan.trtexec)
    assert "--stronglyTyped" in flags and ("--sparsity" in flags) == sparse
    missing = sorted(set(flags) - TENSORRT_INTERFACE[major]["trtexec"])
    assert missing == [], f"TensorRT {major}.x has no {missing}"
    script = (build / "engines/tensorrt/build.sh").read_text()
    (line,) = [line for line in script.splitlines() if line.startswith("exec trtexec")]
    assert _flag_names(shlex.split(line)) == flags


def test_flag_table_records_what_11_removed():
    """The table's own facts (from NVIDIA's 10.x → 11.x migration guide, cited in it)."""
    removed = {"--fp16", "--bf16", "--fp8", "--int8", "--int4", "--best", "--calib"}
    assert removed <= TENSORRT_INTERFACE[10]["trtexec"]
    assert not removed & TENSORRT_INTERFACE[11]["trtexec"]
    precision = {"FP16", "BF16", "FP8", "INT8", "INT4"}
    assert precision <= TENSORRT_INTERFACE[10]["builder_flags"]
    assert not precision & TENSORRT_INTERFACE[11]["builder_flags"]
    for major in (10, 11):
        assert "STRONGLY_TYPED" in TENSORRT_INTERFACE[major]["network_flags"]
        assert all("https://" in source for source in TENSORRT_INTERFACE[major]["sources"])
    assert SUPPORTED_TENSORRT == ((10, 12), (12, 0))


def test_graph_precision_is_checked_against_the_target(exported, tmp_path):
    folder, spec = exported
    build = tmp_path / "build"
    shutil.copytree(folder, build)
    record = prepare_tensorrt_model(build, target=load_target("h100"), spec=spec)
    assert record["dtype"] == "bf16" and record["precisions"] == ["bf16", "fp16"]  # fp16 logits
    plan = plan_engine(build, spec=spec, target=load_target("h100"), limits=_LIMITS)
    assert plan.precisions == ["bf16", "fp16"] and plan.notes == []
    with pytest.raises(InputError, match=r"BF16 needs compute capability ≥ 8\.0; t4 is 7\.5"):
        plan_engine(build, spec=spec, target=load_target("t4"), limits=_LIMITS)
    assert (build / "engines/tensorrt/plan.json").read_text().count('"bf16"') == 1  # h100's


def test_fp32_graph_is_planned_with_a_note(exported, tmp_path):
    folder, spec = exported
    build = tmp_path / "build"
    shutil.copytree(folder, build)
    (build / "engines/tensorrt").mkdir(parents=True)
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copy(build / name, build / "engines/tensorrt" / name)
    plan = plan_engine(build, spec=spec, target=load_target("h100"), limits=_LIMITS)
    assert plan.precisions == []
    assert any("fp32 throughout" in note for note in plan.notes)


def test_refused_precision_writes_nothing(exported, tmp_path):
    folder, spec = exported
    build = tmp_path / "build"
    shutil.copytree(folder, build)
    prepare_tensorrt_model(build, target=load_target("a100"), spec=spec, dtype="bf16")
    with pytest.raises(InputError):
        plan_engine(build, spec=spec, target=load_target("t4"), limits=_LIMITS)
    assert not (build / "engines/tensorrt/plan.json").exists()
    assert not (build / "engines/tensorrt/build.sh").exists()


def test_sparse_weights_need_sparse_tensor_cores(build, spec):
    with pytest.raises(UsageError) as refused:
        plan_engine(build, spec=spec, target=load_target("t4"), limits=_LIMITS, sparse_weights=True)
    assert "t4" in refused.value.problem and "sparse" in refused.value.problem
    assert refused.value.fix
    assert not (build / "engines/tensorrt/plan.json").exists()

    plan = plan_engine(
        build, spec=spec, target=load_target("a100"), limits=_LIMITS, sparse_weights=True
    )
    assert plan.sparse_weights is True
    assert "--sparsity=enable" in plan.trtexec
    assert "--sparse-weights" in plan.polygraphy
    assert "--sparsity=enable" in (build / "engines/tensorrt/build.sh").read_text()


def _contrib_model(path: pathlib.Path) -> None:
    """A graph with a com.microsoft node at the top and another inside an If branch."""
    helper = onnx.helper
    floats = onnx.TensorProto.FLOAT
    inner = helper.make_graph(
        [helper.make_node("FastGelu", ["x"], ["z"], domain="com.microsoft", name="gelu_in_if")],
        "then",
        [],
        [helper.make_tensor_value_info("z", floats, [1, 4])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["w"], name="identity_else")],
        "else",
        [],
        [helper.make_tensor_value_info("w", floats, [1, 4])],
    )
    nodes = [
        helper.make_node(
            "SkipSimplifiedLayerNormalization",
            ["x", "x", "gamma"],
            ["y"],
            domain="com.microsoft",
            name="skip_norm_0",
        ),
        helper.make_node("Relu", ["y"], ["r"], name="relu_0"),
        helper.make_node(
            "If", ["cond"], ["out"], then_branch=inner, else_branch=other, name="branch"
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "contrib",
        [
            helper.make_tensor_value_info("x", floats, ["batch", 4]),
            helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("r", floats, ["batch", 4]),
            helper.make_tensor_value_info("out", floats, [1, 4]),
        ],
        [helper.make_tensor("gamma", floats, [4], [1.0] * 4)],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)],
    )
    onnx.save(model, str(path))


def test_contrib_ops_are_listed_and_refused(tmp_path, spec):
    build = tmp_path / "build"
    (build / "engines/tensorrt").mkdir(parents=True)
    _contrib_model(build / TYPED_MODEL)

    found = check_standard_ops(build / TYPED_MODEL)
    assert found == [
        {
            "name": "skip_norm_0",
            "op": "SkipSimplifiedLayerNormalization",
            "domain": "com.microsoft",
        },
        {"name": "branch.then_branch/gelu_in_if", "op": "FastGelu", "domain": "com.microsoft"},
    ]
    with pytest.raises(InputError) as refused:
        plan_engine(build, spec=spec, target=load_target("h100"), limits=_LIMITS)
    message = str(refused.value)
    assert "2 node(s)" in message
    assert "skip_norm_0 (com.microsoft.SkipSimplifiedLayerNormalization)" in message
    assert "gelu_in_if" in message
    assert "standard ONNX ops" in refused.value.fix
    assert not (build / "engines/tensorrt/plan.json").exists()


def test_exported_graph_uses_standard_ops_only(build):
    assert check_standard_ops(build / "model.onnx") == []
    assert check_standard_ops(build / TYPED_MODEL) == []


def test_cpu_target_is_refused(build, spec):
    with pytest.raises(UsageError) as refused:
        plan_engine(build, spec=spec, target=load_target("cpu"), limits=_LIMITS)
    assert "cpu" in refused.value.problem and "NVIDIA GPU" in refused.value.problem
    assert "--backend onnxruntime" in refused.value.fix
    assert not (build / "engines/tensorrt/plan.json").exists()


def test_profiles_that_disagree_with_the_graph_are_refused(build, spec):
    wrong = dataclasses.replace(spec, num_kv_heads=spec.num_kv_heads + 1)
    with pytest.raises(CompileError, match=r"past_key_values\.0\.key.*axis 1"):
        plan_engine(build, spec=wrong, target=load_target("h100"), limits=_LIMITS)


def test_missing_model_or_plan_is_an_input_error(tmp_path, spec):
    with pytest.raises(InputError, match=r"model\.onnx does not exist"):
        plan_engine(tmp_path, spec=spec, target=load_target("h100"), limits=_LIMITS)
    with pytest.raises(InputError, match="has no TensorRT plan"):
        build_planned_engine(tmp_path)


def test_plan_from_another_schema_is_refused(build, spec):
    plan = plan_engine(build, spec=spec, target=load_target("l4"), limits=_LIMITS)
    with pytest.raises(InputError, match="schema_version"):
        EnginePlan.from_dict({**plan.to_dict(), "schema_version": 99})
    with pytest.raises(InputError, match="status"):
        EnginePlan.from_dict({**plan.to_dict(), "status": "half-built"})


@pytest.mark.skipif(_UNAVAILABLE is None, reason="TensorRT and a GPU are here: the build runs")
def test_build_without_tensorrt_explains_and_keeps_the_plan(build, spec):
    plan_engine(build, spec=spec, target=load_target("h100"), limits=_LIMITS)
    path = build / "engines/tensorrt/plan.json"
    before = path.read_bytes()

    with pytest.raises(CompileError) as refused:
        build_planned_engine(build)
    message = str(refused.value)
    assert _UNAVAILABLE in message
    assert f"run `fdec build-engine {shlex.quote(str(build))}` on a machine with an NVIDIA GPU" in (
        message
    )
    assert "or run engines/tensorrt/build.sh there" in message
    assert path.read_bytes() == before
    assert json.loads(before)["status"] == "deferred"
    assert not (build / "engines/tensorrt/model.engine").exists()


@pytest.mark.skipif(_UNAVAILABLE is not None, reason=_UNAVAILABLE or "")
def test_build_engine_with_tensorrt(build, spec):
    import tensorrt as trt

    gpu = visible_gpus()[0]
    matching = [
        name
        for name in _DATACENTER
        if "{}.{}".format(*load_target(name).compute_capability) == gpu["compute_capability"]
    ]
    if not matching:
        pytest.skip(f"no datacenter target has this GPU's compute capability ({gpu})")
    target = load_target(matching[0])
    limits = ShapeLimits(max_batch=2, max_seq_len=64)
    planned = plan_engine(build, spec=spec, target=target, limits=limits)
    folder = build / "engines/tensorrt"

    messages: list[str] = []
    plan = build_planned_engine(build, progress=messages.append)
    engine = folder / "model.engine"
    cache = folder / "timing.cache"
    assert plan.status == "built" and plan.reason == ""
    assert messages
    assert engine.is_file() and engine.stat().st_size == plan.engine_bytes > 0
    assert sha256_file(engine) == plan.sha256
    assert plan.wall_s is not None and plan.wall_s > 0
    assert plan.built_on == {
        "gpu": gpu["name"],
        "compute_capability": gpu["compute_capability"],
        "driver": plan.built_on["driver"],
        "tensorrt": trt.__version__,
    }
    assert plan.built_on["driver"] and plan.built_on["driver"] != "unknown"
    assert cache.is_file() and cache.stat().st_size > 0
    assert plan.timing_cache_reused is False
    assert read_plan(build) == plan
    assert plan.trtexec == planned.trtexec  # the build does not change the plan's command

    # The engine holds one optimization profile per planned profile, with the planned shapes.
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    loaded = runtime.deserialize_cuda_engine(engine.read_bytes())
    assert loaded is not None
    assert loaded.num_optimization_profiles == len(plan.profiles)
    for index, profile in enumerate(plan.profiles):
        for name, dims in profile["shapes"].items():
            got = [list(shape) for shape in loaded.get_tensor_profile_shape(name, index)]
            assert got == [dims["min"], dims["opt"], dims["max"]]

    report = engine_report(plan)
    assert report["status"] == "built"
    assert "engines/tensorrt/model.engine" in report["files"]
    assert "fix" not in report

    # A second build loads the timing cache the first one wrote.
    again = build_planned_engine(build)
    assert again.status == "built"
    assert again.timing_cache_reused is True
    assert cache.stat().st_size > 0
    assert sha256_file(engine) == again.sha256


class _FakeTensorRT:
    """Just enough of TensorRT's Python API to drive `build_planned_engine` without a GPU.

    It checks fdec's side of the build (what is asked of TensorRT, what is written and recorded),
    not TensorRT itself; `test_build_engine_with_tensorrt` does that on a GPU machine. Its
    `BuilderFlag` has exactly the members TENSORRT_INTERFACE lists for its major version, so
    setting a flag that version removed raises AttributeError as the real module does.
    """

    def __init__(self, *, fail: bool = False, version: str = "11.4.0"):
        self.__version__ = version
        self.fail = fail
        self.flags: list[str] = []
        self.network_flags: list[int] = []
        self.profiles: list[dict[str, tuple]] = []
        self.loaded_caches: list[bytes] = []
        self.parsed: list[str] = []
        fake = self

        class Logger:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        class ILogger:
            def __init__(self):
                pass

        major = int(version.split(".")[0])
        interface = TENSORRT_INTERFACE.get(major, TENSORRT_INTERFACE[11])
        BuilderFlag = type("BuilderFlag", (), {name: name for name in interface["builder_flags"]})
        # The real enum: EXPLICIT_BATCH = 0 (deprecated), STRONGLY_TYPED = 1.
        NetworkDefinitionCreationFlag = type(
            "NetworkDefinitionCreationFlag", (), {"STRONGLY_TYPED": 1, "EXPLICIT_BATCH": 0}
        )

        class Cache:
            def __init__(self, data: bytes):
                self.data = data

            def serialize(self) -> bytes:
                return self.data + b"+timings"

        class Config:
            builder_optimization_level = None

            def set_flag(self, flag):
                fake.flags.append(flag)

            def add_optimization_profile(self, profile):
                fake.profiles.append(profile.shapes)
                return len(fake.profiles) - 1

            def create_timing_cache(self, data):
                return Cache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch):
                assert ignore_mismatch is False
                fake.loaded_caches.append(cache.data)
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, low, opt, high):
                self.shapes[name] = (low, opt, high)

        class Builder:
            def __init__(self, logger):
                self.logger = logger

            def create_network(self, flags):
                fake.network_flags.append(flags)
                return object()

            def create_builder_config(self):
                fake.config = Config()
                return fake.config

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                if fake.fail:
                    self.logger.log(Logger.ERROR, "out of memory while building")
                    return None
                return b"ENGINE" * 10

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                fake.parsed.append(path)
                return True

        self.Logger, self.ILogger, self.BuilderFlag = Logger, ILogger, BuilderFlag
        self.NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
        self.Builder, self.OnnxParser = Builder, OnnxParser


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """Install a fake `tensorrt` module and an H100-like GPU; returns a factory for the fake."""
    import sys

    import fdec.lower.tensorrt.support as module

    gpu = {"index": 0, "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    monkeypatch.setattr(module, "visible_gpus", lambda: [gpu])
    monkeypatch.setattr(module, "driver_version", lambda: "550.54.15")

    def install(**options) -> _FakeTensorRT:
        fake = _FakeTensorRT(**options)
        monkeypatch.setitem(sys.modules, "tensorrt", fake)
        return fake

    return install


@pytest.mark.parametrize("version", ["11.4.0", "10.12.0"])
def test_build_records_the_engine_and_reuses_the_timing_cache(build, spec, fake_tensorrt, version):
    fake = fake_tensorrt(version=version)
    assert tensorrt_available() is None
    planned = plan_engine(build, spec=spec, target=load_target("h200"), limits=_LIMITS)
    assert planned.reason == "not built yet"
    folder = build / "engines/tensorrt"

    plan = build_planned_engine(build)
    assert fake.parsed == [str((build / TYPED_MODEL).resolve())]
    assert fake.network_flags == [1 << 1]  # STRONGLY_TYPED
    assert fake.flags == []  # precision is the graph's: no builder flag
    assert fake.config.builder_optimization_level == 3
    assert len(fake.profiles) == 2
    for given, planned_profile in zip(fake.profiles, plan.profiles):
        assert given == {
            name: (tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]))
            for name, d in planned_profile["shapes"].items()
        }
    assert (folder / "model.engine").read_bytes() == b"ENGINE" * 10
    assert (folder / "timing.cache").read_bytes() == b"+timings"
    assert plan.status == "built" and plan.reason == ""
    assert plan.engine_bytes == 60
    assert plan.sha256 == sha256_file(folder / "model.engine")
    assert plan.built_on == {
        "gpu": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0",
        "driver": "550.54.15",
        "tensorrt": version,
    }
    assert plan.timing_cache_reused is False
    assert read_plan(build) == plan
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temp files

    again = build_planned_engine(build)
    assert fake.loaded_caches == [b"", b"+timings"]
    assert again.timing_cache_reused is True
    assert (folder / "timing.cache").read_bytes() == b"+timings+timings"


def test_sparse_weights_set_only_flags_each_version_has(build, spec, fake_tensorrt):
    fake = fake_tensorrt()  # 11.x: a removed flag would raise AttributeError here
    plan_engine(build, spec=spec, target=load_target("a100"), limits=_LIMITS, sparse_weights=True)
    fake_gpu = {"index": 0, "name": "NVIDIA A100", "compute_capability": "8.0"}
    import fdec.lower.tensorrt.support as module

    module.visible_gpus = lambda: [fake_gpu]  # restored by the fixture's monkeypatch
    build_planned_engine(build)
    assert fake.flags == ["SPARSE_WEIGHTS"]
    assert set(fake.flags) <= TENSORRT_INTERFACE[11]["builder_flags"]


@pytest.mark.parametrize("version", ["10.8.0", "9.3.0", "12.0.0"])
def test_unsupported_tensorrt_versions_are_refused(fake_tensorrt, version):
    fake_tensorrt(version=version)
    reason = tensorrt_available()
    assert reason is not None and f"tensorrt {version} is not supported" in reason
    assert "10.12" in reason


def test_failed_build_is_recorded(build, spec, fake_tensorrt):
    fake_tensorrt(fail=True)
    plan_engine(build, spec=spec, target=load_target("h100"), limits=_LIMITS)
    with pytest.raises(CompileError, match="out of memory while building") as failed:
        build_planned_engine(build)
    assert "--max-batch" in failed.value.fix
    stored = read_plan(build)
    assert stored.status == "failed"
    assert "out of memory while building" in stored.reason
    assert not (build / "engines/tensorrt/model.engine").exists()


def test_build_refuses_a_gpu_of_another_compute_capability(build, spec, fake_tensorrt):
    fake = fake_tensorrt()
    plan_engine(build, spec=spec, target=load_target("a100"), limits=_LIMITS)
    before = (build / "engines/tensorrt/plan.json").read_bytes()
    with pytest.raises(CompileError, match=r"plan is for a100 \(compute capability 8\.0\)"):
        build_planned_engine(build)
    assert fake.parsed == []
    assert (build / "engines/tensorrt/plan.json").read_bytes() == before
