"""Slicing: cutting weights, repeat-KV constants and whole layers out of the graph and its spec."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from fdec.errors import CompileError
from fdec.ir import FdecModel
from fdec.passes.cleanup import InferShapesPass, RemoveDeadNodesPass
from fdec.passes.prune.coupling import LAYER_KEY
from fdec.passes.prune.importance import residuals

__all__ = ["drop_layers", "reinfer_shapes", "rewrite_repeat_kv", "slice_weight"]

_CACHE_NAME = re.compile(r"^(past_key_values|present)\.(\d+)\.(key|value)$")


def slice_weight(weight: Any, index: np.ndarray, *, output: bool) -> None:
    """Keep `index` along the weight's output (N) or input (K) axis, in its stored layout."""
    value: ir.Value = weight.value
    stored = value.const_value.numpy()
    # MatMul reads [K, N]; a Transpose between the weight and its MatMul means it is stored [N, K].
    axis = (1 if output else 0) if not weight.transposes else (0 if output else 1)
    value.const_value = ir.tensor(
        np.ascontiguousarray(np.take(stored, index, axis=axis)), name=value.name
    )
    value.shape = ir.Shape(value.const_value.shape)
    if output:
        for site in weight.sites:
            bias = site.bias or _added_bias(site.node.outputs[0], stored.shape[axis])
            if bias is not None and bias.const_value is not None:
                bias.const_value = ir.tensor(
                    np.ascontiguousarray(np.take(bias.const_value.numpy(), index, axis=-1)),
                    name=bias.name,
                )
                bias.shape = ir.Shape(bias.const_value.shape)


def _added_bias(out: ir.Value, width: int) -> ir.Value | None:
    """The bias a traced linear adds after its MatMul (Add with a [N] initializer), if any."""
    for use in out.uses():
        node = use.node
        if node.op_type != "Add":
            continue
        other = node.inputs[1 - use.idx]
        tensor = other.const_value if other is not None else None
        if tensor is not None and other.is_initializer() and tuple(tensor.shape) == (width,):
            return other
    return None


def _int_constant(value: ir.Value | None) -> int | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.size != 1:
        return None
    array = tensor.numpy()
    return int(array.reshape(-1)[0]) if array.dtype.kind == "i" else None


def rewrite_repeat_kv(graph: ir.Graph, kv_heads: int, group: int, kept: int) -> int:
    """Point repeat_kv's Expand ([b, kv, group, s, d]) and Reshape ([b, heads, s, d]) shape
    constants at the new group size; returns how many constants were replaced."""
    new_group = kept // kv_heads
    replaced = 0
    made: dict[int, ir.Value] = {}

    def constant(number: int) -> ir.Value:
        if number not in made:
            name = f"prune_const_{number}"
            while name in graph.initializers:
                name += "_"
            made[number] = ir.Value(
                name=name, const_value=ir.tensor(np.array([number], np.int64), name=name)
            )
            graph.register_initializer(made[number])
        return made[number]

    for node in list(graph):
        if node.op_type != "Expand" or len(node.inputs) != 2:
            continue
        shape = node.inputs[1].producer() if node.inputs[1] is not None else None
        if shape is None or shape.op_type != "Concat" or len(shape.inputs) != 5:
            continue
        if _int_constant(shape.inputs[1]) != kv_heads or _int_constant(shape.inputs[2]) != group:
            continue
        shape.replace_input_with(2, constant(new_group))
        replaced += 1
        for use in node.outputs[0].uses():
            reshape = use.node
            if reshape.op_type != "Reshape":
                continue
            target = reshape.inputs[1].producer()
            if (
                target is not None
                and target.op_type == "Concat"
                and _int_constant(target.inputs[1]) == kv_heads * group
            ):
                target.replace_input_with(1, constant(kv_heads * new_group))
                replaced += 1
    if group != new_group and not replaced:
        raise CompileError(
            "prune: found no repeat-KV Expand/Reshape to resize for fewer query heads",
            "prune heads= supports graphs exported from transformers' llama-style attention",
        )
    return replaced


def drop_layers(model: FdecModel, weights: Mapping[str, Any], drop: list[int]) -> None:
    """Bypass the layers in `drop`, remove their cache I/O, renumber the rest."""
    graph, spec = model.graph, model.spec
    bypass = {layer: residuals(model, weights, layer) for layer in drop}
    # Later layers first, so a bypassed layer's input is already the real value.
    for layer in sorted(drop, reverse=True):
        x_in, x_out = bypass[layer]
        ir.convenience.replace_all_uses_with(x_out, x_in)
    drop_set = set(drop)
    graph.outputs[:] = [
        v for v in graph.outputs
        if not ((m := _CACHE_NAME.match(v.name or "")) and int(m.group(2)) in drop_set)
    ]  # fmt: skip
    RemoveDeadNodesPass()(model)
    kept_inputs = {
        (int(m.group(2)), m.group(3)): value
        for value in graph.inputs
        if (m := _CACHE_NAME.match(value.name or "")) and int(m.group(2)) not in drop_set
    }
    for value in list(graph.inputs):
        match = _CACHE_NAME.match(value.name or "")
        if match and int(match.group(2)) in drop_set:
            if value.uses():
                # Shape-only readers (the attention mask takes the past length from a cache
                # input): every layer's cache has the same shape, so a kept layer's serves.
                keep = min((k for k in kept_inputs if k[1] == match.group(3)), default=None)
                ir.convenience.replace_all_uses_with(value, kept_inputs[keep])
            graph.inputs.remove(value)
    renumber = {
        old: new for new, old in enumerate(i for i in range(spec.num_layers) if i not in drop_set)
    }
    prefix = _layer_prefix(spec)
    for value in [*graph.inputs, *graph.outputs]:
        match = _CACHE_NAME.match(value.name or "")
        if match:
            value.name = f"{match.group(1)}.{renumber[int(match.group(2))]}.{match.group(3)}"
    # Initializers of later layers take their new index, so names stay HF parameter names.
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    moves = []
    for name in list(graph.initializers):
        match = pattern.match(name)
        if (
            match
            and int(match.group(1)) in renumber
            and renumber[int(match.group(1))] != int(match.group(1))
        ):
            moves.append((name, f"{prefix}{renumber[int(match.group(1))]}.{name[match.end() :]}"))
    for name, new in sorted(moves, key=lambda m: int(pattern.match(m[0]).group(1))):
        graph.initializers[name].name = new
    weights_new = {}
    for role, name in spec.weights.items():
        match = LAYER_KEY.match(role)
        if match:
            old = int(match.group(1))
            if old in drop_set:
                continue
            role = f"layers.{renumber[old]}.{match.group(2)}"
            name = dict(moves).get(name, name)
        weights_new[role] = name
    spec.weights = weights_new
    spec.num_layers -= len(drop)
    spec.inputs = [v.name for v in graph.inputs]
    spec.outputs = [v.name for v in graph.outputs]


def _layer_prefix(spec: Any) -> str:
    """ "model.layers." from the q weight's name "model.layers.0.self_attn.q_proj.weight"."""
    name = spec.weights.get("layers.0.q", "")
    match = re.match(r"^(.*?\.)0\.", name)
    if not match:
        raise CompileError(
            f"prune: cannot tell the layer prefix of weight {name!r}",
            "layer pruning needs HF parameter names (model.layers.N....)",
        )
    return match.group(1)


def reinfer_shapes(model: FdecModel) -> None:
    """Forget the shapes pruning made stale (every intermediate value's) and infer them again."""
    io = {id(v) for v in (*model.graph.inputs, *model.graph.outputs)}
    for node in model.graph:
        for value in node.outputs:
            if id(value) not in io:
                value.shape = None
    InferShapesPass()(model)
