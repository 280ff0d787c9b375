"""Cleanup passes: constant folding, dead-node removal, common subexpressions, shapes, untying embeddings."""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir
import onnx_ir.passes.common as ir_common
from onnxscript import optimizer as onnxscript_optimizer

from fdec.ir import FdecModel
from fdec.ir.spill import transposed_tensor
from fdec.pipeline import Pass, PassResult

__all__ = [
    "EliminateCommonSubexpressionsPass",
    "FoldConstantsPass",
    "InferShapesPass",
    "RemoveDeadNodesPass",
    "StripMetadataPass",
    "UntieEmbeddingsPass",
]

logger = logging.getLogger(__name__)


def _node_count(model: FdecModel) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def _live_node_count(model: FdecModel) -> int:
    """Nodes some graph output depends on (dead nodes counted by a pass are not its work)."""
    graph = model.graph
    seen: set[int] = set()
    stack = [value.producer() for value in graph.outputs if value.producer() is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for value in node.inputs:
            if value is not None and value.producer() is not None:
                stack.append(value.producer())
    return len(seen)


def _weight_transpose_rule(node: ir.Node) -> bool | None:
    """Always fold a Transpose of a weight nothing else reads; never copy a shared weight.

    Folding the first only re-lays the weight ([out, in] → [in, out], as quantizers expect);
    folding a Transpose of a shared weight (tied embeddings) would store it twice.
    """
    if node.op_type != "Transpose" or node.domain != "" or not node.inputs:
        return None
    source = node.inputs[0]
    if source is None or not source.is_initializer():
        return None
    return len(source.uses()) == 1


_FOLDED_FROM_PROP = "pkg.onnxscript.optimizer.folded_from"


@dataclasses.dataclass
class FoldConstantsPass(Pass):
    """Evaluate subgraphs whose inputs are all constant, and store their results as initializers.

    Transposes of weights read by nothing else are always folded (so MatMuls read weights in
    [in, out] layout, as quantizers expect); the folded weight keeps the original name, so
    the ModelSpec stays true.
    """

    name = "fold-constants"
    family = "cleanup"
    summary = "fold constant subgraphs (and weight transposes) into initializers"

    input_size_limit: int = dataclasses.field(default=8192, kw_only=True)
    output_size_limit: int = dataclasses.field(default=1 << 20, kw_only=True)

    def call(self, model: FdecModel) -> PassResult:
        graph = model.graph
        initializers_before = set(graph.initializers)
        live_before = _live_node_count(model)
        result = onnxscript_optimizer.fold_constants(
            model.model,
            input_size_limit=self.input_size_limit,
            output_size_limit=self.output_size_limit,
            should_fold=_weight_transpose_rule,
        )
        # Nodes whose outputs were replaced by constants are dead now: drop them. Nodes that
        # were dead before are dropped too, but not counted as folded.
        ir_common.RemoveUnusedNodesPass()(model.model)
        folded = live_before - _live_node_count(model)
        renamed = 0
        for value in list(graph.initializers.values()):
            # onnxscript also writes its provenance into the saved model; a streamed compile's
            # weights (bound to the checkpoint) fold without it: drop it, so both write the
            # same model.onnx.
            value.metadata_props.pop(_FOLDED_FROM_PROP, None)
            sources = value.meta.get(onnxscript_optimizer.FOLDED_FROM_KEY) or set()
            # A weight folded through a chain (Cast → Transpose) lists every step's value;
            # only the original initializer's name matters.
            originals = set(sources) & initializers_before
            if len(originals) != 1 or value.name in initializers_before:
                continue
            (source,) = originals
            if source not in graph.initializers:
                value.name = source  # same weight, new layout: keep the name people know
                renamed += 1
        return PassResult(
            model,
            modified=bool(result.modified) or folded > 0,
            stats={"nodes_folded": folded, "weights_relaid": renamed},
        )


@dataclasses.dataclass
class RemoveDeadNodesPass(Pass):
    """Remove nodes and initializers that no graph output depends on."""

    name = "remove-dead-nodes"
    family = "cleanup"
    summary = "remove nodes and initializers no output depends on"

    def call(self, model: FdecModel) -> PassResult:
        nodes, initializers = _node_count(model), len(model.graph.initializers)
        ir_common.RemoveUnusedNodesPass()(model.model)
        removed_nodes = nodes - _node_count(model)
        removed_initializers = initializers - len(model.graph.initializers)
        return PassResult(
            model,
            modified=removed_nodes + removed_initializers > 0,
            stats={"nodes_removed": removed_nodes, "initializers_removed": removed_initializers},
        )


@dataclasses.dataclass
class EliminateCommonSubexpressionsPass(Pass):
    """Merge nodes that compute the same op on the same inputs with the same attributes."""

    name = "cse"
    family = "cleanup"
    summary = "merge duplicate computations (common-subexpression elimination)"

    size_limit: int = dataclasses.field(default=10, kw_only=True)

    def call(self, model: FdecModel) -> PassResult:
        nodes = _node_count(model)
        ir_common.CommonSubexpressionEliminationPass(size_limit=self.size_limit)(model.model)
        ir_common.RemoveUnusedNodesPass()(model.model)
        merged = nodes - _node_count(model)
        return PassResult(model, modified=merged > 0, stats={"nodes_merged": merged})


@dataclasses.dataclass
class InferShapesPass(Pass):
    """Run ONNX shape inference so every value carries its dtype and (symbolic) shape."""

    name = "infer-shapes"
    family = "cleanup"
    summary = "infer dtypes and symbolic shapes of every value"

    def call(self, model: FdecModel) -> PassResult:
        values = [
            value
            for node in ir.traversal.RecursiveGraphIterator(model.graph)
            for value in node.outputs
        ]
        unknown_before = sum(1 for value in values if value.shape is None or value.type is None)
        ir_common.ShapeInferencePass(strict_mode=False)(model.model)
        values = [
            value
            for node in ir.traversal.RecursiveGraphIterator(model.graph)
            for value in node.outputs
        ]
        unknown_after = sum(1 for value in values if value.shape is None or value.type is None)
        inferred = unknown_before - unknown_after
        return PassResult(
            model,
            modified=inferred > 0,
            stats={"values_inferred": inferred, "values_unknown": unknown_after},
        )


@dataclasses.dataclass
class UntieEmbeddingsPass(Pass):
    """Give the lm_head its own weight when it shares the token embedding.

    Exporters tie them as one initializer read by Gather (embedding) and Transpose/MatMul
    (lm_head); quantizers then skip the lm_head, which dominates decode reads in small models.
    After this pass the lm_head reads its own [hidden, vocab] weight named `lm_head.weight`.
    """

    name = "untie-embeddings"
    family = "cleanup"
    summary = "give a tied lm_head its own weight so later passes can quantize it"

    def call(self, model: FdecModel) -> PassResult:
        spec = model.spec
        if not spec.tie_word_embeddings or "embed" not in spec.weights:
            return PassResult(model, modified=False, stats={"untied": 0})
        graph = model.graph
        shared = graph.initializers[spec.weights["embed"]]
        readers = [use.node for use in shared.uses() if use.node.op_type != "Gather"]
        if not readers:
            return PassResult(model, modified=False, stats={"untied": 0})
        tensor = shared.const_value
        assert tensor is not None
        name = "lm_head.weight"
        while name in graph.initializers:
            name = "_" + name
        array = tensor.numpy()
        transposed = [n for n in readers if n.op_type == "Transpose" and len(n.outputs) == 1]
        if transposed and len(transposed) == len(readers):
            # Fold the transpose into the new weight: MatMul(x, W^T) reads [hidden, vocab].
            # On a streamed compile the transposed copy goes to the spill a block at a time.
            head = ir.Value(name=name, const_value=transposed_tensor(graph, name, array))
            graph.register_initializer(head)
            for node in transposed:
                ir.convenience.replace_all_uses_with(node.outputs[0], head)
                graph.remove(node, safe=True)
        else:
            head = ir.Value(name=name, const_value=ir.tensor(array.copy(), name=name))
            graph.register_initializer(head)
            for node in readers:
                for index, value in enumerate(node.inputs):
                    if value is shared:
                        node.replace_input_with(index, head)
        spec.weights["lm_head"] = name
        spec.tie_word_embeddings = False
        return PassResult(
            model,
            modified=True,
            stats={"untied": 1, "bytes_added": int(array.nbytes), "lm_head": name},
        )


@dataclasses.dataclass
class StripMetadataPass(Pass):
    """Drop exporter debug metadata: node/value `metadata_props` and doc strings.

    torch.onnx stores a stack trace, the module namespace and class per node
    (`pkg.torch.onnx.*` metadata_props) and doc strings; on SmolLM2-135M that is ~4.7 MB of
    model.onnx which no engine reads. Model-level metadata (fdec's own) is kept.
    """

    name = "strip-metadata"
    family = "cleanup"
    summary = "drop exporter debug metadata (node metadata_props, doc strings)"

    def call(self, model: FdecModel) -> PassResult:
        props = docs = 0
        graphs = [model.graph]
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            props += len(node.metadata_props)
            node.metadata_props.clear()
            if node.doc_string:
                docs += 1
                node.doc_string = None
            for value in node.outputs:
                props += len(value.metadata_props)
                value.metadata_props.clear()
                if value.doc_string:
                    docs += 1
                    value.doc_string = None
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    graphs.append(attr.as_graph())
                elif attr.type == ir.AttributeType.GRAPHS:
                    graphs.extend(attr.as_graphs())
        for graph in graphs:
            for value in [*graph.inputs, *graph.initializers.values()]:
                props += len(value.metadata_props)
                value.metadata_props.clear()
                if value.doc_string:
                    docs += 1
                    value.doc_string = None
            if graph.doc_string:
                docs += 1
                graph.doc_string = None
        return PassResult(
            model,
            modified=props + docs > 0,
            stats={"metadata_props_removed": props, "doc_strings_removed": docs},
        )
