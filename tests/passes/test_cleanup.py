"""Unit tests of the cleanup passes and the pass registry, on tiny hand-written ONNX graphs.

Each test writes a graph as ONNX text, runs one pass, then checks the structure it left
(op types, initializers, the ModelSpec, `modified` and `stats`) and that ONNX Runtime gives
the same numbers before and after.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from graphs import ir_model as _model
from graphs import random_array as _random
from graphs import run_ort as _run
from graphs import tiny_spec as _spec

import fdec.passes
from fdec.errors import UsageError
from fdec.ir import FdecModel
from fdec.passes import (
    DEFAULT_PIPELINE,
    REGISTRY,
    make_pass,
    make_pipeline,
    parse_pass_list,
)
from fdec.passes.cleanup import (
    EliminateCommonSubexpressionsPass,
    FoldConstantsPass,
    InferShapesPass,
    RemoveDeadNodesPass,
    StripMetadataPass,
    UntieEmbeddingsPass,
)

# Default `input_size_limit` of FoldConstantsPass; weights above it take the "large" path.
_LARGE = (128, 96)  # 12288 elements


def _assert_same_outputs(before: list[np.ndarray], after: list[np.ndarray], atol=1e-6) -> None:
    assert len(before) == len(after)
    for expected, got in zip(before, after):
        assert expected.shape == got.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=atol)


def _op_types(model: FdecModel) -> list[str]:
    return [node.op_type for node in model.graph]


def _output_names(model: FdecModel) -> list[str | None]:
    return [value.name for value in model.graph.outputs]


# --- fold-constants ---------------------------------------------------------------------------

_ADD_MATMUL = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[2, 4] x) => (float[2, 3] y) {
    c = Add (a, b)
    y = MatMul (x, c)
}
"""


def test_fold_constants_folds_add_of_initializers_feeding_matmul():
    a, b = _random(4, 3, seed=1), _random(4, 3, seed=2)
    model = FdecModel(_model(_ADD_MATMUL, {"a": a, "b": b}), _spec())
    feeds = {"x": _random(2, 4, seed=3)}
    before = _run(model.model, feeds)

    result = FoldConstantsPass()(model)

    assert result.model is model
    assert result.modified is True
    assert result.stats == {"nodes_folded": 1, "weights_relaid": 0}
    assert _op_types(model) == ["MatMul"]
    assert list(model.graph.initializers) == ["c"]  # a and b are gone with their only reader
    (matmul,) = model.graph
    assert matmul.inputs[1] is model.graph.initializers["c"]
    np.testing.assert_array_equal(matmul.inputs[1].const_value.numpy(), a + b)
    assert model.spec_problems() == []
    _assert_same_outputs(before, _run(model.model, feeds))

    again = FoldConstantsPass()(model)
    assert again.modified is False
    assert again.stats == {"nodes_folded": 0, "weights_relaid": 0}


_TRANSPOSED_WEIGHT = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[2, {inp}] x) => (float[2, {out}] y) {{
    wt = Transpose <perm = [1, 0]> (w)
    y = MatMul (x, wt)
}}
"""


@pytest.mark.parametrize("out_features, in_features", [(3, 4), _LARGE], ids=["small", "large"])
def test_fold_constants_relays_lone_weight_transpose_under_its_original_name(
    out_features, in_features
):
    w = _random(out_features, in_features, seed=4)  # [out, in], as torch Linear stores it
    text = _TRANSPOSED_WEIGHT.format(inp=in_features, out=out_features)
    spec = _spec(weights={"layers.0.up": "w"}, hidden_size=in_features)
    model = FdecModel(_model(text, {"w": w}), spec)
    feeds = {"x": _random(2, in_features, seed=5)}
    before = _run(model.model, feeds)

    result = FoldConstantsPass()(model)

    assert result.modified is True
    assert result.stats == {"nodes_folded": 1, "weights_relaid": 1}
    assert _op_types(model) == ["MatMul"]
    assert list(model.graph.initializers) == ["w"]
    weight = model.graph.initializers["w"]
    assert model.graph.node(0).inputs[1] is weight
    assert weight.const_value.shape == ir.Shape([in_features, out_features])
    np.testing.assert_array_equal(weight.const_value.numpy(), w.T)
    assert model.spec.weights == {"layers.0.up": "w"}
    assert model.spec_problems() == []
    _assert_same_outputs(before, _run(model.model, feeds), atol=1e-5)


def test_fold_constants_relays_lone_weight_transpose_beyond_the_output_size_limit():
    w = _random(3, 4, seed=6)
    text = _TRANSPOSED_WEIGHT.format(inp=4, out=3)
    model = FdecModel(_model(text, {"w": w}), _spec(weights={"layers.0.up": "w"}))

    result = make_pass("fold-constants", input_size_limit=1, output_size_limit=1)(model)

    assert result.stats == {"nodes_folded": 1, "weights_relaid": 1}
    assert list(model.graph.initializers) == ["w"]
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), w.T)


_CAST_TRANSPOSED_WEIGHT = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[2, 4] x) => (float[2, 3] y) {
    wc = Cast <to = 1> (w)
    wt = Transpose <perm = [1, 0]> (wc)
    y = MatMul (x, wt)
}
"""


def test_fold_constants_keeps_the_name_of_a_weight_cast_then_transposed():
    w = _random(3, 4, seed=16).astype(np.float16)
    model = FdecModel(
        _model(_CAST_TRANSPOSED_WEIGHT, {"w": w}), _spec(weights={"layers.0.up": "w"})
    )
    feeds = {"x": _random(2, 4, seed=17)}
    before = _run(model.model, feeds)

    result = FoldConstantsPass()(model)

    assert _op_types(model) == ["MatMul"]
    _assert_same_outputs(before, _run(model.model, feeds))
    assert list(model.graph.initializers) == ["w"]
    assert model.spec_problems() == []
    assert result.stats == {"nodes_folded": 2, "weights_relaid": 1}


def test_fold_constants_does_not_count_dead_nodes_as_folded():
    text = """
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[2, 4] x) => (float[2, 3] y) {
        y = MatMul (x, w)
        d = Relu (x)
    }
    """
    model = FdecModel(_model(text, {"w": _random(4, 3)}), _spec())

    result = FoldConstantsPass()(model)

    assert result.stats["nodes_folded"] == 0


_TIED = """
<ir_version: 10, opset_import: ["" : 21]>
g (int64[1, 3] input_ids) => (float[1, 3, {vocab}] logits) {{
    h = Gather <axis = 0> ({weight}, input_ids)
    wt = Transpose <perm = [1, 0]> ({weight})
    logits = MatMul (h, wt)
}}
"""


def _tied_model(vocab: int, hidden: int, weight: str = "embed", tied: bool = True) -> FdecModel:
    text = _TIED.format(vocab=vocab, weight="shared")
    graph = _model(text, {"shared": _random(vocab, hidden, seed=7)})
    graph.graph.initializers["shared"].name = weight  # ONNX text has no dotted names
    spec = _spec(
        hidden_size=hidden,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        weights={"embed": weight, "lm_head": weight},
        inputs=["input_ids"],
        outputs=["logits"],
    )
    return FdecModel(graph, spec)


def _ids(vocab: int) -> dict[str, np.ndarray]:
    return {"input_ids": np.random.default_rng(8).integers(0, vocab, (1, 3), dtype=np.int64)}


def _assert_shared_transpose_kept(vocab: int, hidden: int) -> None:
    model = _tied_model(vocab, hidden)
    feeds = _ids(vocab)
    before = _run(model.model, feeds)

    result = FoldConstantsPass()(model)

    assert _op_types(model) == ["Gather", "Transpose", "MatMul"]
    assert list(model.graph.initializers) == ["embed"]  # no second copy of the embedding
    assert result.modified is False
    assert result.stats == {"nodes_folded": 0, "weights_relaid": 0}
    # The lm_head still reads the initializer the spec names for it.
    transpose = model.graph.node(1)
    assert transpose.inputs[0] is model.graph.initializers[model.spec.weights["lm_head"]]
    _assert_same_outputs(before, _run(model.model, feeds))


def test_fold_constants_keeps_transpose_of_a_large_shared_weight():
    _assert_shared_transpose_kept(*_LARGE)


def test_fold_constants_keeps_transpose_of_a_small_shared_weight():
    _assert_shared_transpose_kept(8, 4)


# --- remove-dead-nodes ------------------------------------------------------------------------

_DEAD = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[2, 4] x) => (float[2, 3] y) {
    y = MatMul (x, w)
    d1 = Relu (x)
    d2 = Mul (d1, dead_scale)
}
"""


def test_remove_dead_nodes_removes_dangling_nodes_and_unused_initializers():
    initializers = {
        "w": _random(4, 3, seed=9),
        "dead_scale": _random(2, 4, seed=10),  # read only by a dead node
        "unused": _random(5, seed=11),  # read by nothing
    }
    model = FdecModel(_model(_DEAD, initializers), _spec(weights={"layers.0.up": "w"}))
    feeds = {"x": _random(2, 4, seed=12)}
    before = _run(model.model, feeds)

    result = RemoveDeadNodesPass()(model)

    assert result.modified is True
    assert result.stats == {"nodes_removed": 2, "initializers_removed": 2}
    assert _op_types(model) == ["MatMul"]
    assert list(model.graph.initializers) == ["w"]
    assert _output_names(model) == ["y"]
    assert [value.name for value in model.graph.inputs] == ["x"]
    assert model.spec_problems() == []
    _assert_same_outputs(before, _run(model.model, feeds))


def test_remove_dead_nodes_leaves_a_clean_graph_alone():
    model = FdecModel(_model(_ADD_MATMUL, {"a": _random(4, 3), "b": _random(4, 3)}), _spec())

    result = RemoveDeadNodesPass()(model)

    assert result.modified is False
    assert result.stats == {"nodes_removed": 0, "initializers_removed": 0}
    assert _op_types(model) == ["Add", "MatMul"]
    assert sorted(model.graph.initializers) == ["a", "b"]


# --- cse --------------------------------------------------------------------------------------

_TWIN_ADDS = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[2, 4] x) => (float[2, 4] y) {{
    p = Add (x, b)
    q = Add (x, {second})
    y = Mul (p, q)
}}
"""


def test_cse_merges_identical_adds():
    model = FdecModel(_model(_TWIN_ADDS.format(second="b"), {"b": _random(4, seed=13)}), _spec())
    feeds = {"x": _random(2, 4, seed=14)}
    before = _run(model.model, feeds)

    result = EliminateCommonSubexpressionsPass()(model)

    assert result.modified is True
    assert result.stats == {"nodes_merged": 1}
    assert _op_types(model) == ["Add", "Mul"]
    add, mul = model.graph
    assert mul.inputs[0] is add.outputs[0]
    assert mul.inputs[1] is add.outputs[0]
    _assert_same_outputs(before, _run(model.model, feeds))


def test_cse_keeps_adds_of_different_initializers_even_if_equal_in_value():
    b = _random(4, seed=13)
    model = FdecModel(_model(_TWIN_ADDS.format(second="c"), {"b": b, "c": b.copy()}), _spec())

    result = EliminateCommonSubexpressionsPass()(model)

    assert result.modified is False
    assert result.stats == {"nodes_merged": 0}
    assert _op_types(model) == ["Add", "Add", "Mul"]


# --- infer-shapes -----------------------------------------------------------------------------

_CHAIN = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[batch, 4] x) => (float[batch, 3] y) {
    r = Relu (x)
    m = MatMul (r, w)
    y = Add (m, b)
}
"""


def test_infer_shapes_gives_every_value_a_type_and_shape():
    model = FdecModel(_model(_CHAIN, {"w": _random(4, 3), "b": _random(3)}), _spec())
    r, m = model.graph.node(0).outputs[0], model.graph.node(1).outputs[0]
    assert r.shape is None and m.shape is None  # no value_info in the text

    result = InferShapesPass()(model)

    assert result.modified is True
    assert result.stats == {"values_inferred": 2, "values_unknown": 0}
    assert r.dtype == ir.DataType.FLOAT and m.dtype == ir.DataType.FLOAT
    assert r.shape == ir.Shape(["batch", 4])
    assert m.shape == ir.Shape(["batch", 3])
    assert _op_types(model) == ["Relu", "MatMul", "Add"]

    again = InferShapesPass()(model)
    assert again.modified is False
    assert again.stats == {"values_inferred": 0, "values_unknown": 0}


# --- untie-embeddings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shared, head", [("embed", "lm_head.weight"), ("lm_head.weight", "_lm_head.weight")]
)
def test_untie_embeddings_gives_the_lm_head_its_own_transposed_weight(shared, head):
    vocab, hidden = 8, 4
    model = _tied_model(vocab, hidden, weight=shared)
    original = model.graph.initializers[shared].const_value.numpy().copy()
    feeds = _ids(vocab)
    before = _run(model.model, feeds)

    result = UntieEmbeddingsPass()(model)

    assert result.modified is True
    assert result.stats == {"untied": 1, "bytes_added": vocab * hidden * 4, "lm_head": head}
    assert _op_types(model) == ["Gather", "MatMul"]
    assert sorted(model.graph.initializers) == sorted([shared, head])
    gather, matmul = model.graph
    assert gather.inputs[0] is model.graph.initializers[shared]
    np.testing.assert_array_equal(gather.inputs[0].const_value.numpy(), original)
    assert matmul.inputs[1] is model.graph.initializers[head]
    assert matmul.inputs[1].const_value.shape == ir.Shape([hidden, vocab])
    np.testing.assert_array_equal(matmul.inputs[1].const_value.numpy(), original.T)
    assert model.spec.tie_word_embeddings is False
    assert model.spec.weights == {"embed": shared, "lm_head": head}
    assert model.spec_problems() == []
    _assert_same_outputs(before, _run(model.model, feeds), atol=0)


_TIED_GEMM = """
<ir_version: 10, opset_import: ["" : 21]>
g (int64[3] input_ids) => (float[3, 8] logits) {
    h = Gather <axis = 0> (embed, input_ids)
    logits = Gemm <transB = 1> (h, embed)
}
"""


def test_untie_embeddings_copies_a_weight_read_without_transpose():
    embed = _random(8, 4, seed=15)
    spec = _spec(
        tie_word_embeddings=True,
        weights={"embed": "embed", "lm_head": "embed"},
        inputs=["input_ids"],
        outputs=["logits"],
    )
    model = FdecModel(_model(_TIED_GEMM, {"embed": embed}), spec)
    feeds = {"input_ids": np.array([0, 7, 3], dtype=np.int64)}
    before = _run(model.model, feeds)

    result = UntieEmbeddingsPass()(model)

    assert result.stats == {"untied": 1, "bytes_added": embed.nbytes, "lm_head": "lm_head.weight"}
    gather, gemm = model.graph
    assert gather.inputs[0] is model.graph.initializers["embed"]
    assert gemm.inputs[1] is model.graph.initializers["lm_head.weight"]
    np.testing.assert_array_equal(gemm.inputs[1].const_value.numpy(), embed)
    assert model.spec.weights["lm_head"] == "lm_head.weight"
    assert model.spec_problems() == []
    _assert_same_outputs(before, _run(model.model, feeds), atol=0)


def test_untie_embeddings_leaves_an_untied_spec_alone():
    model = _tied_model(8, 4, tied=False)
    model.spec.weights = {"embed": "embed"}

    result = UntieEmbeddingsPass()(model)

    assert result.modified is False
    assert result.stats == {"untied": 0}
    assert _op_types(model) == ["Gather", "Transpose", "MatMul"]
    assert list(model.graph.initializers) == ["embed"]
    assert model.spec.weights == {"embed": "embed"}


def test_untie_embeddings_does_nothing_without_an_lm_head_reader():
    text = """
    <ir_version: 10, opset_import: ["" : 21]>
    g (int64[3] input_ids) => (float[3, 4] h) {
        h = Gather <axis = 0> (embed, input_ids)
    }
    """
    spec = _spec(
        tie_word_embeddings=True,
        weights={"embed": "embed", "lm_head": "embed"},
        inputs=["input_ids"],
        outputs=["h"],
    )
    model = FdecModel(_model(text, {"embed": _random(8, 4)}), spec)

    result = UntieEmbeddingsPass()(model)

    assert result.modified is False
    assert result.stats == {"untied": 0}
    assert list(model.graph.initializers) == ["embed"]
    assert model.spec.tie_word_embeddings is True


# --- strip-metadata ---------------------------------------------------------------------------


def test_strip_metadata_drops_exporter_metadata_and_keeps_the_numbers(tmp_path):
    initializers = {"a": _random(4, 3, seed=21), "b": _random(4, 3, seed=22)}
    model = FdecModel(_model(_ADD_MATMUL, initializers), _spec())
    trace = "File model.py, line 1, in forward\n" * 200  # as torch.onnx writes per node
    for node in model.graph:
        node.metadata_props["pkg.torch.onnx.stack_trace"] = trace
        node.metadata_props["namespace"] = "model.layers.0: LlamaDecoderLayer"
        node.doc_string = "exported by torch"
        node.outputs[0].metadata_props["pkg.torch.onnx.fx_node"] = "%add"
    model.graph.initializers["a"].metadata_props["source"] = "a.weight"
    model.model.metadata_props["fdec.kept"] = "yes"  # model-level metadata is not the exporter's
    feeds = {"x": _random(2, 4, seed=23)}
    before = _run(model.model, feeds)
    ir.save(model.model, tmp_path / "before.onnx")

    result = StripMetadataPass()(model)

    assert result.modified is True
    assert result.stats == {"metadata_props_removed": 7, "doc_strings_removed": 2}
    for node in model.graph:
        assert node.metadata_props == {} and node.doc_string is None
        assert node.outputs[0].metadata_props == {}
    assert model.graph.initializers["a"].metadata_props == {}
    assert model.model.metadata_props == {"fdec.kept": "yes"}
    assert _op_types(model) == ["Add", "MatMul"]
    ir.save(model.model, tmp_path / "after.onnx")
    saved = (tmp_path / "before.onnx").stat().st_size - (tmp_path / "after.onnx").stat().st_size
    assert saved > 2 * len(trace)
    _assert_same_outputs(before, _run(model.model, feeds))
    assert StripMetadataPass()(model).modified is False


# --- registry ---------------------------------------------------------------------------------


def test_registry_holds_every_cleanup_pass_under_its_name():
    cleanup = {name: cls for name, cls in REGISTRY.items() if cls.family == "cleanup"}
    assert cleanup == {
        "fold-constants": FoldConstantsPass,
        "remove-dead-nodes": RemoveDeadNodesPass,
        "cse": EliminateCommonSubexpressionsPass,
        "infer-shapes": InferShapesPass,
        "strip-metadata": StripMetadataPass,
        "untie-embeddings": UntieEmbeddingsPass,
    }
    for name, cls in REGISTRY.items():
        assert cls.name == name
        assert cls.summary


def test_parse_pass_list_expands_default():
    expected = ["strip-metadata", "fold-constants", "cse", "remove-dead-nodes", "infer-shapes"]
    assert list(DEFAULT_PIPELINE) == expected
    assert parse_pass_list("default") == expected
    assert parse_pass_list(None) == expected
    assert parse_pass_list(" untie-embeddings , default") == ["untie-embeddings", *expected]
    assert parse_pass_list("none") == []
    assert parse_pass_list("cse,,infer-shapes") == ["cse", "infer-shapes"]


def test_parse_pass_list_rejects_an_unknown_pass_naming_the_known_ones():
    with pytest.raises(UsageError) as caught:
        parse_pass_list("default,fold-constnats")
    assert "'fold-constnats'" in caught.value.problem
    for name in REGISTRY:
        assert name in caught.value.fix
    assert caught.value.exit_code == 2


def test_make_pass_sets_options_and_rejects_bad_ones():
    fold = make_pass("fold-constants", input_size_limit=16)
    assert isinstance(fold, FoldConstantsPass)
    assert fold.options() == {"input_size_limit": 16, "output_size_limit": 1 << 20}

    with pytest.raises(UsageError, match="bad options for pass 'cse'"):
        make_pass("cse", no_such_option=1)
    with pytest.raises(UsageError, match="unknown pass 'nope'"):
        make_pass("nope")
    with pytest.raises(TypeError):
        FoldConstantsPass(16)  # options are keyword-only


def test_make_pipeline_builds_passes_in_order():
    passes = make_pipeline(fdec.passes.parse_pass_list("default"))
    assert [type(p) for p in passes] == [
        StripMetadataPass,
        FoldConstantsPass,
        EliminateCommonSubexpressionsPass,
        RemoveDeadNodesPass,
        InferShapesPass,
    ]
