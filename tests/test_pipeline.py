"""Unit tests of the pass protocol and the PassManager's instruments, on tiny hand-written graphs.

The passes here are small test passes (dataclasses, like fdec's own) that change a graph in a
known way, so the records, checks and dumps the PassManager produces can be checked exactly.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnx_ir as ir
import onnxruntime as ort
import pytest
from graphs import ir_model as _ir_model
from graphs import random_array as _random
from graphs import tiny_spec

from fdec.errors import CompileError, UsageError, VerificationError
from fdec.ir import FdecModel, GraphCounts, ModelSpec, count_graph
from fdec.passes import make_pipeline, parse_pass_list
from fdec.pipeline import (
    DumpInstrument,
    NumericCheckInstrument,
    Pass,
    PassManager,
    PassResult,
    StructureCheckInstrument,
    Tolerance,
)

_HIDDEN, _VOCAB = 4, 80  # the weight is 1280 bytes, so dumps put it in external data


def _spec(**overrides) -> ModelSpec:
    fields = {"hidden_size": _HIDDEN, "vocab_size": _VOCAB, "weights": {"lm_head": "w"}}
    return tiny_spec(**{**fields, **overrides})


_MATMUL = f"""
<ir_version: 10, opset_import: ["" : 21]>
g (float[2, {_HIDDEN}] x) => (float[2, {_VOCAB}] y) {{
    y = MatMul (x, w)
}}
"""


@pytest.fixture
def model() -> FdecModel:
    """y = x @ w, with a spec naming w as the lm_head."""
    return FdecModel(_ir_model(_MATMUL, {"w": _random(_HIDDEN, _VOCAB, seed=1)}), _spec())


@pytest.fixture
def feeds() -> dict[str, np.ndarray]:
    return {"x": _random(2, _HIDDEN, seed=2)}


def _run_proto(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _run(model: FdecModel, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return _run_proto(ir.serde.serialize_model(model.model), feeds)


def _numeric_check(reference: list[np.ndarray], feeds: dict[str, np.ndarray]):
    """A check callable as fdec.verify gives NumericCheckInstrument: real ORT figures."""

    def check(candidate: FdecModel) -> dict[str, float | str]:
        (expected,), (got,) = reference, _run(candidate, feeds)
        return {
            "max_abs_error": float(np.max(np.abs(got - expected))),
            "top1_agreement": float(np.mean(got.argmax(-1) == expected.argmax(-1))),
            "worst_output": "y",
        }

    return check


# --- test passes ------------------------------------------------------------------------------


@dataclasses.dataclass
class WrapOutputPass(Pass):
    """Feeds the first graph output through a unary op; the output keeps its name."""

    name = "wrap-output"
    family = "test"
    summary = "append a unary op to the first output"

    op_type: str = dataclasses.field(default="Identity", kw_only=True)

    def call(self, model: FdecModel) -> PassResult:
        graph = model.graph
        old = graph.outputs[0]
        name = old.name
        old.name = f"{name}_before_{self.op_type}"  # unique per op: passes can stack
        node = ir.Node("", self.op_type, [old], num_outputs=1)
        node.outputs[0].name = name
        node.outputs[0].type = old.type
        node.outputs[0].shape = old.shape
        graph.append(node)
        graph.outputs[0] = node.outputs[0]
        return PassResult(model, modified=True, stats={"wrapped": 1})


@dataclasses.dataclass
class LooseWrapOutputPass(WrapOutputPass):
    """The same, declaring it may move outputs far (but must keep the top-1 token)."""

    name = "loose-wrap-output"
    tolerance = Tolerance(max_abs_error=100.0, min_top1_agreement=1.0)


@dataclasses.dataclass
class NoOpPass(Pass):
    name = "no-op"
    family = "test"
    summary = "change nothing"

    def call(self, model: FdecModel) -> PassResult:
        return PassResult(model, modified=False, stats={"nodes_seen": len(model.graph)})


@dataclasses.dataclass
class StatsPass(Pass):
    name = "stats"
    family = "test"
    summary = "return stats of every kind"

    stats: dict = dataclasses.field(default_factory=dict, kw_only=True)

    def call(self, model: FdecModel) -> PassResult:
        return PassResult(model, modified=False, stats=self.stats)


@dataclasses.dataclass
class SleepPass(Pass):
    name = "sleep"
    family = "test"
    summary = "take a known time"

    seconds: float = dataclasses.field(default=0.05, kw_only=True)

    def call(self, model: FdecModel) -> PassResult:
        time.sleep(self.seconds)
        return PassResult(model, modified=False)


@dataclasses.dataclass
class RenameWeightPass(Pass):
    """Renames initializer w; with `update_spec` False it leaves the spec pointing at w."""

    name = "rename-weight"
    family = "test"
    summary = "rename the weight"

    update_spec: bool = dataclasses.field(default=False, kw_only=True)

    def call(self, model: FdecModel) -> PassResult:
        model.graph.initializers["w"].name = "w_moved"
        if self.update_spec:
            model.spec.rename_weight("w", "w_moved")
        return PassResult(model, modified=True)


@dataclasses.dataclass
class UnknownOpPass(Pass):
    """Turns the MatMul into an op the default ONNX domain does not have."""

    name = "unknown-op"
    family = "test"
    summary = "make the graph invalid ONNX"

    def call(self, model: FdecModel) -> PassResult:
        model.graph.node(0).op_type = "NoSuchOp"
        return PassResult(model, modified=True)


@dataclasses.dataclass
class RaisingPass(Pass):
    name = "explode"
    family = "test"
    summary = "raise"

    error: Exception = dataclasses.field(default_factory=lambda: ValueError("boom"), kw_only=True)

    def call(self, model: FdecModel) -> PassResult:
        raise self.error


@dataclasses.dataclass
class WrongResultPass(Pass):
    name = "wrong-result"
    family = "test"
    summary = "return something else than a PassResult"

    def call(self, model: FdecModel) -> PassResult:
        return {"model": model}  # type: ignore[return-value]


@dataclasses.dataclass
class RequiringPass(Pass):
    """Logs each `check_target` / `requires` call; refuses the target "too-small"."""

    name = "requiring"
    family = "test"
    summary = "check a precondition"

    log: list = dataclasses.field(default_factory=list, kw_only=True, repr=False)
    called: list = dataclasses.field(default_factory=list, kw_only=True, repr=False)

    def check_target(self, target) -> None:
        self.log.append((self, None, target))
        if target == "too-small":
            raise UsageError("requiring needs a bigger target", "pick another --target")

    def requires(self, model: FdecModel, target=None) -> None:
        self.log.append((self, model, target))

    def call(self, model: FdecModel) -> PassResult:
        self.called.append(model)
        return PassResult(model, modified=False)


# --- records ----------------------------------------------------------------------------------


def test_records_describe_each_pass(model, feeds):
    before = _run(model, feeds)
    wrap, noop = WrapOutputPass(), NoOpPass()
    seen = []

    out, records = PassManager([wrap, noop], on_pass=lambda *args: seen.append(args)).run(model)

    assert out is model
    assert seen == [(1, 2, wrap), (2, 2, noop)]
    assert [(r.index, r.name, r.family) for r in records] == [
        (1, "wrap-output", "test"),
        (2, "no-op", "test"),
    ]
    first, second = records
    assert first.options == {"op_type": "Identity"}
    assert second.options == {}
    assert (first.modified, second.modified) == (True, False)
    assert first.stats == {"wrapped": 1}
    assert second.stats == {"nodes_seen": 2}
    assert first.wall_s >= 0 and second.wall_s >= 0
    weights = GraphCounts(nodes=1, initializers=1, parameters=320, bytes=1280, op_types=1)
    assert first.before == weights
    assert first.after == dataclasses.replace(weights, nodes=2, op_types=2)
    assert second.before == first.after == second.after
    assert first.checks["structure"] == {"ok": True, "problems": []}
    assert first.dump is None
    data = json.loads(json.dumps([r.to_dict() for r in records]))
    assert data[0]["after"]["nodes"] == 2 and data[0]["stats"] == {"wrapped": 1}
    assert [n.op_type for n in out.graph] == ["MatMul", "Identity"]
    assert [v.name for v in out.graph.outputs] == ["y"]
    np.testing.assert_array_equal(_run(out, feeds)[0], before[0])


def test_wall_time_is_the_pass_time(model):
    _, (record,) = PassManager([SleepPass(seconds=0.05)]).run(model)
    assert 0.05 <= record.wall_s < 1.0


def test_stats_are_kept_in_records(model):
    stats = {
        "count": 3,
        "ratio": 0.5,
        "flag": True,
        "nothing": None,
        "names": ("a", "b"),
        "nested": {"k": 1, "where": pathlib.PurePosixPath("x/y")},
        "path": pathlib.PurePosixPath("x"),
    }
    _, (record,) = PassManager([StatsPass(stats=stats)]).run(model)
    assert record.stats == {
        "count": 3,
        "ratio": 0.5,
        "flag": True,
        "nothing": None,
        "names": ["a", "b"],
        "nested": {"k": 1, "where": "x/y"},
        "path": "x",
    }


_CLEANUP = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[2, 4] x) => (float[2, 3] y) {
    c = Add (a, b)
    m = MatMul (x, c)
    p = Relu (m)
    q = Relu (m)
    y = Add (p, q)
}
"""


def test_default_pipeline_records_keep_each_pass_stats():
    initializers = {"a": _random(4, 3, seed=3), "b": _random(4, 3, seed=4)}
    fm = FdecModel(_ir_model(_CLEANUP, initializers), _spec(weights={}, vocab_size=3))
    feeds = {"x": _random(2, 4, seed=5)}
    before = _run(fm, feeds)

    out, records = PassManager(make_pipeline(parse_pass_list("default"))).run(fm)

    assert {r.name: (r.modified, r.stats) for r in records} == {
        "strip-metadata": (False, {"metadata_props_removed": 0, "doc_strings_removed": 0}),
        "fold-constants": (True, {"nodes_folded": 1, "weights_relaid": 0}),
        "cse": (True, {"nodes_merged": 1}),
        "remove-dead-nodes": (False, {"nodes_removed": 0, "initializers_removed": 0}),
        "infer-shapes": (True, {"values_inferred": 2, "values_unknown": 0}),
    }
    assert [r.after.nodes for r in records] == [5, 4, 3, 3, 3]
    assert [n.op_type for n in out.graph] == ["MatMul", "Relu", "Add"]
    np.testing.assert_allclose(_run(out, feeds)[0], before[0], rtol=0, atol=1e-6)


# --- failures ---------------------------------------------------------------------------------


def test_a_pass_that_breaks_the_spec_is_named(model):
    with pytest.raises(CompileError) as caught:
        PassManager([NoOpPass(), RenameWeightPass()]).run(model)
    assert caught.value.problem == (
        "pass rename-weight broke the model: weight 'lm_head' names initializer 'w', which is gone"
    )
    assert caught.value.exit_code == 1


def test_a_pass_that_keeps_the_spec_true_passes_the_structure_check(model):
    _, (record,) = PassManager([RenameWeightPass(update_spec=True)]).run(model)
    assert record.checks["structure"] == {"ok": True, "problems": []}
    assert model.spec.weights == {"lm_head": "w_moved"}


def test_a_pass_that_raises_is_named(model):
    with pytest.raises(CompileError) as caught:
        PassManager([NoOpPass(), RaisingPass()]).run(model)
    assert caught.value.problem == "pass explode failed: ValueError: boom"
    assert isinstance(caught.value.__cause__, ValueError)


def test_fdec_verification_errors_pass_through_unchanged(model):
    error = VerificationError("outputs differ", "fix it")
    with pytest.raises(VerificationError) as caught:
        PassManager([RaisingPass(error=error)]).run(model)
    assert caught.value is error


def test_a_pass_returning_something_else_is_a_compile_error(model):
    with pytest.raises(CompileError, match="pass wrong-result returned dict"):
        PassManager([WrongResultPass()]).run(model)


def test_full_structure_check_runs_the_onnx_checker(model):
    # The spec check alone does not look at op types...
    _, (record,) = PassManager([UnknownOpPass()]).run(model)
    assert record.checks["structure"]["ok"] is True

    # ...the full check does.
    fresh = FdecModel(_ir_model(_MATMUL, {"w": _random(_HIDDEN, _VOCAB)}), _spec())
    manager = PassManager([UnknownOpPass()], [StructureCheckInstrument(full=True)])
    assert sum(isinstance(i, StructureCheckInstrument) for i in manager.instruments) == 1
    with pytest.raises(CompileError) as caught:
        manager.run(fresh)
    assert caught.value.problem.startswith("pass unknown-op broke the model: ONNX checker:")
    assert "NoSuchOp" in caught.value.problem


def test_full_structure_check_accepts_a_valid_graph(model):
    _, (record,) = PassManager([WrapOutputPass()], [StructureCheckInstrument(full=True)]).run(model)
    assert record.checks["structure"] == {"ok": True, "problems": []}


# --- numeric check ----------------------------------------------------------------------------


def test_numeric_check_within_tolerance_is_recorded(model, feeds):
    check = NumericCheckInstrument(_numeric_check(_run(model, feeds), feeds))
    _, (record,) = PassManager([WrapOutputPass()], [check]).run(model)
    assert record.checks["numeric"] == {
        "max_abs_error": 0.0,
        "top1_agreement": 1.0,
        "worst_output": "y",
        "tolerance": {
            "max_abs_error": 1e-3,
            "min_top1_agreement": 1.0,
            "max_perplexity_increase": None,
            "greedy_identical": True,
        },
        "ok": True,
    }


def test_numeric_check_beyond_tolerance_names_the_pass(model, feeds):
    check = NumericCheckInstrument(_numeric_check(_run(model, feeds), feeds))
    # Relu zeroes the negative logits: far beyond the default 1e-3.
    with pytest.raises(VerificationError) as caught:
        PassManager([NoOpPass(), WrapOutputPass(op_type="Relu")], [check]).run(model)
    assert caught.value.problem.startswith(
        "pass wrap-output moved the outputs beyond what it allows"
    )
    assert "y off by" in caught.value.problem and "(limit 0.001)" in caught.value.problem


def test_numeric_check_uses_the_pass_tolerance(model, feeds):
    check = NumericCheckInstrument(_numeric_check(_run(model, feeds), feeds))
    # Relu keeps each row's top-1 logit (they are positive) and moves others by < 100.
    _, (record,) = PassManager([LooseWrapOutputPass(op_type="Relu")], [check]).run(model)
    numeric = record.checks["numeric"]
    assert numeric["ok"] is True
    assert 1e-3 < numeric["max_abs_error"] <= 100.0
    assert numeric["tolerance"] == {
        "max_abs_error": 100.0,
        "min_top1_agreement": 1.0,
        "max_perplexity_increase": None,
        "greedy_identical": True,
    }

    # Neg keeps |error| within 100 but flips the top-1 token.
    fresh = FdecModel(_ir_model(_MATMUL, {"w": _random(_HIDDEN, _VOCAB, seed=1)}), _spec())
    with pytest.raises(
        VerificationError, match=r"top-1 tokens agree on 0\.0% of positions \(needs 100%\)"
    ):
        PassManager([LooseWrapOutputPass(op_type="Neg")], [check]).run(fresh)


def test_numeric_check_after_a_lossy_pass_allows_its_error(model, feeds):
    """An exact pass after a lossy one is compared with the source too: it carries the lossy
    pass's error (every --verify-each compile of an int4 recipe failed at fuse-attention's
    1e-3), and is judged by what both allow together."""
    check = NumericCheckInstrument(_numeric_check(_run(model, feeds), feeds))
    passes = [LooseWrapOutputPass(op_type="Relu"), WrapOutputPass(op_type="Identity")]
    _, (_, exact) = PassManager(passes, [check]).run(model)
    assert exact.checks["numeric"]["ok"] and exact.checks["numeric"]["max_abs_error"] > 1e-3
    assert exact.checks["numeric"]["tolerance"]["max_abs_error"] == 100.0
    fresh = FdecModel(_ir_model(_MATMUL, {"w": _random(_HIDDEN, _VOCAB, seed=1)}), _spec())
    check = NumericCheckInstrument(_numeric_check(_run(fresh, feeds), feeds))
    passes = [LooseWrapOutputPass(op_type="Relu"), WrapOutputPass(op_type="Neg")]
    with pytest.raises(VerificationError) as caught:  # still caught: Neg flips the top-1
        PassManager(passes, [check]).run(fresh)
    assert "beyond what it and the passes before it allow" in caught.value.problem


# --- dumps ------------------------------------------------------------------------------------


def test_dumps_are_numbered_valid_onnx(model, feeds, tmp_path):
    folder = tmp_path / "dumps"
    before = _run(model, feeds)

    out, records = PassManager([WrapOutputPass(), NoOpPass()], [DumpInstrument(folder)]).run(model)

    first, second = folder / "001_WrapOutputPass.onnx", folder / "002_NoOpPass.onnx"
    assert [r.dump for r in records] == [str(first), str(second)]
    assert sorted(p.name for p in folder.iterdir()) == [
        "001_WrapOutputPass.onnx",
        "001_WrapOutputPass.onnx.data",
        "002_NoOpPass.onnx",
        "002_NoOpPass.onnx.data",
    ]
    for path in (first, second):
        proto = onnx.load(path)
        onnx.checker.check_model(proto)
        assert [n.op_type for n in proto.graph.node] == ["MatMul", "Identity"]
        (weight,) = proto.graph.initializer
        np.testing.assert_array_equal(
            onnx.numpy_helper.to_array(weight), _random(_HIDDEN, _VOCAB, seed=1)
        )
        np.testing.assert_array_equal(_run_proto(proto, feeds)[0], before[0])
    # Saving did not disturb the model in memory.
    np.testing.assert_array_equal(_run(out, feeds)[0], before[0])


# --- requirements -----------------------------------------------------------------------------


def test_check_requirements_asks_every_pass_about_the_target(model):
    log: list = []
    first, second = RequiringPass(log=log), RequiringPass(log=log)
    manager = PassManager([first, second], target="big")

    manager.check_requirements()

    assert log == [(first, None, "big"), (second, None, "big")]
    assert first.called == [] and second.called == []  # nothing ran yet


def test_check_requirements_fails_before_any_work(model):
    log: list = []
    passes = [RequiringPass(log=log), RequiringPass(log=log)]
    with pytest.raises(UsageError, match="requiring needs a bigger target"):
        PassManager(passes, target="too-small").check_requirements()
    assert len(log) == 1
    assert [p.called for p in passes] == [[], []]


def test_requires_sees_the_model_earlier_passes_left(model):
    """A precondition an earlier pass establishes (untie before quantize) is met at run time."""
    log: list = []
    first, second = RequiringPass(log=log), RequiringPass(log=log)
    PassManager([first, second], target="big").run(model)
    assert [(entry[0], entry[2]) for entry in log] == [(first, "big"), (second, "big")]
    assert first.called and second.called


# --- count_graph ------------------------------------------------------------------------------


def _counted_graph() -> ir.Graph:
    """Six op types, 5 main-graph nodes plus one in each If branch, three initializers."""
    h = onnx.helper
    float_3 = h.make_tensor_value_info("s", onnx.TensorProto.FLOAT, [2, 3])
    then_branch = h.make_graph([h.make_node("Relu", ["s"], ["t"])], "then", [], [float_3])
    else_branch = h.make_graph([h.make_node("Neg", ["s"], ["e"])], "else", [], [float_3])
    then_branch.output[0].name, else_branch.output[0].name = "t", "e"
    nodes = [
        h.make_node("Cast", ["b"], ["bf"], to=onnx.TensorProto.FLOAT),
        h.make_node("Add", ["x", "bf"], ["a"]),
        h.make_node("Gather", ["w", "idx"], ["g"], axis=0),
        h.make_node("Add", ["g", "a"], ["s"]),
        h.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch),
    ]
    initializers = [
        onnx.numpy_helper.from_array(_random(4, 3), "w"),  # 12 x 4 bytes
        onnx.numpy_helper.from_array(np.ones(3, np.float16), "b"),  # 3 x 2 bytes
        onnx.numpy_helper.from_array(np.array([0, 2], np.int64), "idx"),  # 2 x 8 bytes
    ]
    graph = h.make_graph(
        nodes,
        "counted",
        [
            h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3]),
            h.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []),
        ],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
        initializers,
    )
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto).graph


def test_count_graph_is_exact():
    counts = count_graph(_counted_graph())
    assert counts == GraphCounts(nodes=7, initializers=3, parameters=17, bytes=70, op_types=6)
    assert counts.to_dict() == {
        "nodes": 7,
        "initializers": 3,
        "parameters": 17,
        "bytes": 70,
        "op_types": 6,
    }


def test_model_counts_match_count_graph(model):
    assert model.counts() == count_graph(model.graph)
    assert model.counts() == GraphCounts(
        nodes=1, initializers=1, parameters=_HIDDEN * _VOCAB, bytes=_HIDDEN * _VOCAB * 4, op_types=1
    )


# --- the pass contract (requires → call → ensures, in place) -----------------------------------


@dataclasses.dataclass
class _NewModelPass(Pass):
    """Returns a copy of the model: breaks the in-place contract unless declared not in place."""

    name = "new-model"
    family = "test"
    summary = "return another model"

    ensured: list = dataclasses.field(default_factory=list, kw_only=True, repr=False)

    def call(self, model: FdecModel) -> PassResult:
        return PassResult(FdecModel(model.model, model.spec), modified=True)

    def ensures(self, model: FdecModel) -> None:
        self.ensured.append(model)


@dataclasses.dataclass
class _FunctionalPass(_NewModelPass):
    in_place = False


def test_a_direct_call_runs_requires_before_the_pass(model):
    log: list = []
    pass_ = RequiringPass(log=log)
    pass_(model, "a-target")
    assert log == [(pass_, model, "a-target")] and pass_.called == [model]
    pass_.apply(model)  # call → ensures only
    assert len(log) == 1 and len(pass_.called) == 2


def test_the_in_place_contract_is_checked_and_ensures_runs_on_the_result(model):
    with pytest.raises(CompileError, match="declared in place but returned another model"):
        _NewModelPass()(model)
    functional = _FunctionalPass()
    result = functional(model)
    assert result.model is not model and functional.ensured == [result.model]
    undeclared = dataclasses.dataclass(type("Undeclared", (WrapOutputPass,), {"in_place": False}))
    with pytest.raises(CompileError, match="not in place but returned its input modified"):
        undeclared()(model)  # WrapOutputPass modifies and returns the model it was given


def test_instruments_override_only_what_they_need(model):
    from fdec.pipeline import Instrument

    class CountCalls(Instrument):
        calls = 0

        def after(self, pass_, result, record) -> None:
            CountCalls.calls += 1

    PassManager([NoOpPass(), NoOpPass()], [CountCalls()]).run(model)
    assert CountCalls.calls == 2
