"""Packed projections: the q, k and v MatMuls feeding one GroupQueryAttention → one MatMul.

onnxruntime-genai's builder emits one `qkv_proj` MatMulNBits per layer whose output
GroupQueryAttention takes packed (its key and value inputs empty). fdec's graph keeps three
projections through quantization and fusion, so that every earlier pass sees the weights
ModelSpec names; this pass packs them last. Weights are concatenated along N (the output
columns): each output column is the same dot product as before, in the same order, so the
logits are unchanged. ModelSpec: the layer's `q`, `k`, `v` roles are replaced by one `qkv`
role naming the packed initializer, whose columns are q, then k, then v
(num_heads × head_dim, then num_kv_heads × head_dim twice).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import numpy as np
import onnx_ir as ir

from fdec.ir import FdecModel
from fdec.passes.weights import add_initializer
from fdec.pipeline import EXACT, Pass, PassResult

__all__ = ["PackQkvPass"]

logger = logging.getLogger(__name__)

_MS = "com.microsoft"
_NBITS_ATTRIBUTES = ("K", "bits", "block_size", "accuracy_level")
_LAYER_ROLE = re.compile(r"^layers\.(\d+)\.([qkv])$")


@dataclasses.dataclass
class _Projection:
    """`x @ W (+ bias)` as one MatMul (W [K, N]) or one MatMulNBits (B [N, k_blocks, blob])."""

    kind: str  # "MatMul" | "MatMulNBits"
    x: ir.Value
    output: ir.Value
    nodes: list[ir.Node]
    weight: ir.Value  # MatMul's W or MatMulNBits' B
    scales: ir.Value | None = None
    zero_points: ir.Value | None = None
    bias: ir.Value | None = None
    attributes: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def n(self) -> int:
        if self.kind == "MatMul":
            return self.weight.const_value.shape[1]
        return self.attributes["N"]


def _constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None


def _projection(value: ir.Value) -> _Projection | None:
    """The projection computing `value`, when it is one this pass can pack."""
    node = value.producer()
    if node is None or len(value.uses()) != 1:
        return None
    bias = None
    nodes = [node]
    if node.op_type == "Add" and node.domain in ("", "ai.onnx"):
        first, second = node.inputs
        matmul, bias = (first, second) if _constant(second) else (second, first)
        if not _constant(bias) or len(bias.const_value.shape) != 1 or matmul is None:
            return None
        if len(matmul.uses()) != 1 or matmul.producer() is None:
            return None
        node = matmul.producer()
        if node.op_type != "MatMul":
            return None
        nodes.insert(0, node)
    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
        x, weight = node.inputs
        if not _constant(weight) or len(weight.const_value.shape) != 2 or x is None:
            return None
        return _Projection("MatMul", x, value, nodes, weight, bias=bias)
    if node.op_type == "MatMulNBits" and node.domain == _MS and bias is None:
        inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
        x, b, scales, zero_points, g_idx, nbits_bias = inputs[:6]
        if g_idx is not None or not all(_constant(v) for v in (b, scales)):
            return None
        if zero_points is not None and not _constant(zero_points):
            return None
        if nbits_bias is not None and not _constant(nbits_bias):
            return None
        attributes = {
            name: attribute.as_int()
            for name, attribute in node.attributes.items()
            if attribute.type == ir.AttributeType.INT
        }
        if len(attributes) != len(node.attributes) or len(b.const_value.shape) != 3:
            return None
        return _Projection(
            "MatMulNBits", x, value, nodes, b, scales, zero_points, nbits_bias, attributes
        )
    return None


def _mismatch(projections: list[_Projection]) -> str | None:
    first = projections[0]
    for other in projections[1:]:
        if other.kind != first.kind or other.x is not first.x:
            return "q, k and v are not the same kind of projection of one input"
        if (other.bias is None) != (first.bias is None):
            return "only some of q, k and v have a bias"
        if (other.zero_points is None) != (first.zero_points is None):
            return "only some of q, k and v have zero points"
        if other.weight.const_value.dtype != first.weight.const_value.dtype:
            return "q, k and v weights differ in type"
        if first.kind == "MatMulNBits":
            if any(
                other.attributes.get(name, 0) != first.attributes.get(name, 0)
                for name in _NBITS_ATTRIBUTES
            ):
                return "q, k and v MatMulNBits differ in K, bits, block_size or accuracy_level"
            if set(other.attributes) - {"N", *_NBITS_ATTRIBUTES}:
                return "MatMulNBits with attributes this pass does not know"
    return None


def _rows(value: ir.Value, n: int) -> np.ndarray:
    """A per-output-column tensor (scales, zero points) as [N, ...] rows."""
    array = value.const_value.numpy()
    return array.reshape(n, -1)


def _packed_name(graph: ir.Graph, q_name: str) -> str:
    name = q_name.replace("q_proj", "qkv_proj") if "q_proj" in q_name else f"{q_name}.qkv"
    while name in graph.initializers:
        name = "_" + name
    return name


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    return add_initializer(graph, name, ir.tensor(np.ascontiguousarray(array), name=name))


def _pack(graph: ir.Graph, projections: list[_Projection]) -> tuple[ir.Value, ir.Value]:
    """Insert the packed projection before q's; returns (its output, its weight)."""
    q = projections[0]
    weight_name = _packed_name(graph, q.weight.name or "qkv")
    n_total = sum(p.n for p in projections)
    nodes: list[ir.Node] = []
    if q.kind == "MatMul":
        w = np.concatenate([p.weight.const_value.numpy() for p in projections], axis=1)
        weight = _initializer(graph, weight_name, w)
        output: ir.Value = ir.node("MatMul", [q.x, weight], name=f"{weight_name}_MatMul").outputs[0]
        nodes.append(output.producer())
        if q.bias is not None:
            bias = np.concatenate([p.bias.const_value.numpy() for p in projections])
            bias_value = _initializer(graph, f"{weight_name}_bias", bias)
            add = ir.node("Add", [output, bias_value], name=f"{weight_name}_Add")
            nodes.append(add)
            output = add.outputs[0]
    else:
        b = np.concatenate([p.weight.const_value.numpy() for p in projections], axis=0)
        weight = _initializer(graph, weight_name, b)
        scales_shape = q.scales.const_value.shape
        scales = np.concatenate([_rows(p.scales, p.n) for p in projections], axis=0)
        if len(scales_shape) == 1:
            scales = scales.reshape(-1)
        inputs: list[ir.Value | None] = [
            q.x,
            weight,
            _initializer(graph, f"{weight_name}_scales", scales),
        ]
        if q.zero_points is not None:
            zero_points = np.concatenate([_rows(p.zero_points, p.n) for p in projections])
            if len(q.zero_points.const_value.shape) == 1:
                zero_points = zero_points.reshape(-1)
            inputs.append(_initializer(graph, f"{weight_name}_zero_points", zero_points))
        if q.bias is not None:
            bias = np.concatenate([p.bias.const_value.numpy() for p in projections])
            inputs += [None] * (5 - len(inputs))
            inputs.append(_initializer(graph, f"{weight_name}_bias", bias))
        attributes = {**q.attributes, "N": n_total}
        node = ir.node(
            "MatMulNBits", inputs, attributes, domain=_MS, name=f"{weight_name}_MatMulNBits"
        )
        nodes.append(node)
        output = node.outputs[0]
    graph.insert_before(q.nodes[0], nodes)
    output.name = f"{weight_name}_output"
    return output, weight


def _retire(graph: ir.Graph, projections: list[_Projection]) -> None:
    for projection in projections:
        graph.remove(list(reversed(projection.nodes)), safe=True)
        for value in (
            projection.weight,
            projection.scales,
            projection.zero_points,
            projection.bias,
        ):
            if value is not None and value.name in graph.initializers and not value.uses():
                graph.initializers.pop(value.name)


@dataclasses.dataclass
class PackQkvPass(Pass):
    """Pack each layer's q, k, v projections into one MatMul(NBits) feeding GroupQueryAttention.

    Run it after fuse-attention (it packs only projections that feed a com.microsoft
    GroupQueryAttention, whose packed-QKV form needs no Split). fp32 MatMuls (with or without a
    bias Add) and MatMulNBits (same K, bits, block_size, accuracy_level) are packed.
    """

    name = "pack-qkv"
    family = "fuse"
    summary = "pack q/k/v projections into one MatMul per layer (GroupQueryAttention packed QKV)"
    # Same dot products, same order: logits unchanged.
    tolerance = EXACT

    def call(self, model: FdecModel) -> PassResult:
        graph = model.graph
        packed = 0
        skipped: dict[str, int] = {}
        for node in list(graph):
            if node.op_type != "GroupQueryAttention" or node.domain != _MS:
                continue
            inputs = list(node.inputs)
            if len(inputs) < 3 or inputs[1] is None or inputs[2] is None:
                continue  # already packed
            projections = [_projection(value) for value in inputs[:3]]
            if any(p is None for p in projections):
                reason = "q, k or v is not a constant-weight MatMul(NBits) used only here"
            else:
                reason = _mismatch(projections)  # type: ignore[arg-type]
            if reason is not None:
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            old_names = [p.weight.name for p in projections]  # type: ignore[union-attr]
            output, weight = _pack(graph, projections)  # type: ignore[arg-type]
            node.replace_input_with(0, output)
            node.replace_input_with(1, None)
            node.replace_input_with(2, None)
            _retire(graph, projections)  # type: ignore[arg-type]
            _update_roles(model, old_names, weight.name)
            packed += 1
        stats: dict[str, Any] = {"packed_layers": packed}
        if skipped:
            stats["not_packed"] = skipped
            logger.info("pack-qkv: not packed: %s", skipped)
        return PassResult(model, modified=packed > 0, stats=stats)


def _update_roles(model: FdecModel, old_names: list[str], new_name: str) -> None:
    """Roles `layers.i.q|k|v` of the packed weights → one `layers.i.qkv` role."""
    weights = model.spec.weights
    layers = set()
    for role, name in list(weights.items()):
        match = _LAYER_ROLE.match(role)
        if match and name in old_names:
            layers.add(match.group(1))
            del weights[role]
    for layer in layers:
        weights[f"layers.{layer}.qkv"] = new_name
