"""Linear layers' inputs re-laid in the order an activation-ordered int4 checkpoint's groups need.

A GPTQ checkpoint made with `desc_act` (GPTQModel's default) quantized each layer's inputs in
the order of their activations' size, so its groups are not consecutive inputs: `g_idx` names
each input's group. MatMulNBits' and DequantizeLinear's blocks are consecutive inputs, and
MatMulNBits' own `g_idx` input is deprecated (ONNX Runtime 1.23), runs on its CPU's slow path
only and is refused by its 2-bit CUDA kernel. So the converted folder keeps, beside the exact
float weights, the order that sorts each such layer's inputs by group
(fdec.frontend.prequantized.INPUT_ORDER_FILE), and the import re-lays the graph in it:

    x @ W.T  =  Gather(x, order, axis=-1) @ W[:, order].T

exactly (a sum in another order), before any pass. The int4 quantizers then find the
checkpoint's blocks in W[:, order] like any others and keep them. Layers reading the same input
in the same order (GPTQ orders by the input's statistics: q/k/v, gate/up) share one Gather,
which moves one activation row per token: [tokens, hidden] elements. Where the input is an
elementwise function of matmuls nothing else reads (down_proj's act(gate) * up), those
matmuls' outputs are re-laid instead (rows of gate and up: their blocks along K are
untouched) and no Gather is needed: a Llama layer has 3, not 4.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import onnx_ir as ir

from fdec.errors import InputError
from fdec.frontend.prequantized import SOURCE_KEY

__all__ = ["apply_input_orders", "read_input_orders"]


def read_input_orders(source: Any) -> dict[str, np.ndarray]:
    """Weight name → input order, for the activation-ordered layers of a converted int4
    checkpoint (empty for every other source); checked against the digest config.json holds."""
    found = (source.config.get(SOURCE_KEY) or {}).get("input_order")
    if not found:
        return {}
    import safetensors.numpy

    path = source.folder / found["file"]
    data = path.read_bytes() if path.is_file() else b""
    if hashlib.sha256(data).hexdigest() != found["sha256"]:
        raise InputError(
            f"{path} is missing or is not the input order config.json names",
            "run `fdec cache clear --all` and compile again (the checkpoint is converted anew)",
        )
    return safetensors.numpy.load(data)


def _permuted(tensor: Any, order: np.ndarray, axis: int) -> ir.LazyTensor:
    """`tensor` with its `axis` taken in `order`, read when asked (a streamed weight stays on
    disk until then)."""
    return ir.LazyTensor(
        lambda: ir.tensor(np.ascontiguousarray(np.take(tensor.numpy(), order, axis=axis))),
        dtype=tensor.dtype,
        shape=tensor.shape,
        name=tensor.name,
    )


def _weight_reads(value: ir.Value) -> list[tuple[ir.Node, int]] | None:
    """The MatMuls reading `value` as their weight, and the axis of `value` that is their K:
    through its export's Transpose (a [N, K] weight, axis 1) or directly (a weight re-laid as
    [K, N] by the streamed import, axis 0). None where anything else reads it."""
    uses = list(value.uses())
    if len(uses) == 1 and uses[0].node.op_type == "Transpose" and uses[0].node.domain == "":
        transpose = uses[0].node
        perm = transpose.attributes.get("perm")
        if perm is None or tuple(perm.as_ints()) != (1, 0):
            return None
        reads = list(transpose.outputs[0].uses())
        axis = 1
    else:
        reads, axis = uses, 0
    if not reads or any(u.node.op_type != "MatMul" or u.node.domain != "" or u.idx != 1
                        for u in reads):  # fmt: skip
        return None
    return [(use.node, axis) for use in reads]


# Ops through which a last-axis order passes unchanged: each output element depends on the
# elements at its own position (constants broadcast: a scalar, or a vector over that axis).
_ELEMENTWISE = frozenset(
    ("Add", "Sub", "Mul", "Div", "Pow", "Sigmoid", "Tanh", "Erf", "Relu", "Exp", "Sqrt",
     "Neg", "Softplus", "Cast", "Identity")
)  # fmt: skip


def _fold_into_producers(x: ir.Value, order: np.ndarray) -> bool:
    """Make `x` come out in `order` along its last axis by re-laying what makes it: where `x`
    is an elementwise function (an MLP's act(gate) * up) of matmuls whose weights only they
    read, their output axes (and any bias vectors) are taken in `order`, and no Gather is
    needed. False (nothing changed) where anything else feeds it or reads inside it."""
    width = order.size
    nodes: set[int] = set()
    weights: list[tuple[ir.Value, int]] = []
    vectors: list[ir.Value] = []
    inside: list[ir.Value] = []
    pending, seen = [x], set()
    while pending:
        value = pending.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        const = value.const_value
        if const is not None:
            shape = tuple(const.shape)
            if not shape or shape[-1] == 1:
                continue  # broadcast over the axis: nothing to re-lay
            if shape[-1] != width or any(d != 1 for d in shape[:-1]):
                return False
            vectors.append(value)
            continue
        node = value.producer()
        if node is None or node.domain != "":
            return False
        nodes.add(id(node))
        inside.append(value)
        if node.op_type == "MatMul":
            weight = node.inputs[1]
            transpose = weight.producer() if weight is not None else None
            if transpose is not None and transpose.op_type == "Transpose":
                weight, axis = transpose.inputs[0], 0  # [N, K] through the export's Transpose
                nodes.add(id(transpose))
                inside.append(transpose.outputs[0])
            else:
                axis = 1  # [K, N]
            if (
                weight is None
                or weight.const_value is None
                or weight.const_value.shape[axis] != width
            ):
                return False
            weights.append((weight, axis))
            continue
        if node.op_type not in _ELEMENTWISE:
            return False
        pending.extend(i for i in node.inputs if i is not None)
    # Nothing outside reads a value inside (it would see the new order); x's own readers are
    # the caller's matmuls
    for value in [*inside[1:], *vectors, *(w for w, _ in weights)]:
        if any(id(use.node) not in nodes for use in value.uses()):
            return False
    for weight, axis in weights:
        weight.const_value = _permuted(weight.const_value, order, axis)
    for vector in vectors:
        vector.const_value = _permuted(vector.const_value, order, len(vector.const_value.shape) - 1)
    return True


def apply_input_orders(graph: ir.Graph, orders: dict[str, np.ndarray]) -> dict[str, int]:
    """Re-lay each ordered weight's K axis in its order and give its MatMuls their input in the
    same order: re-laid where it is made (`_fold_into_producers`: a down_proj's input), else
    gathered. Returns the layers re-laid, the Gathers added and the inputs re-laid where made.
    A weight not found, read by other ops or of another length is left as it is (its blocks
    are then rounded again, not kept)."""
    indices: dict[bytes, ir.Value] = {}
    ordered: dict[tuple[int, bytes], ir.Value] = {}
    counts = {"layers": 0, "gathers": 0, "folded": 0}
    for name, order in sorted(orders.items()):
        value = graph.initializers.get(name)
        tensor = value.const_value if value is not None else None
        reads = _weight_reads(value) if tensor is not None else None
        if not reads or tensor.shape[reads[0][1]] != order.size:
            continue
        value.const_value = _permuted(tensor, order, reads[0][1])
        key = np.asarray(order, dtype=np.int64).tobytes()
        readers = {id(m) for m, _ in reads}
        for matmul, _ in reads:
            x = matmul.inputs[0]
            if (id(x), key) in ordered:
                matmul.replace_input_with(0, ordered[(id(x), key)])
                continue
            if all(id(use.node) in readers for use in x.uses()) and _fold_into_producers(x, order):
                ordered[(id(x), key)] = x
                counts["folded"] += 1
                continue
            if key not in indices:
                index = ir.Value(
                    name=f"fdec_input_order_{len(indices)}",
                    shape=ir.Shape([order.size]),
                    type=ir.TensorType(ir.DataType.INT64),
                    const_value=ir.tensor(np.asarray(order, dtype=np.int64)),
                )
                graph.register_initializer(index)
                indices[key] = index
            gather = ir.node("Gather", [x, indices[key]], {"axis": -1})
            gather.outputs[0].name = f"{x.name}_in_{indices[key].name}"
            gather.outputs[0].shape, gather.outputs[0].type = x.shape, x.type
            # right after x is made: every MatMul reading it comes later
            if x.producer() is not None:
                graph.insert_after(x.producer(), gather)
            else:
                graph.insert_before(next(iter(graph)), gather)
            ordered[(id(x), key)] = gather.outputs[0]
            counts["gathers"] += 1
            matmul.replace_input_with(0, gather.outputs[0])
        counts["layers"] += 1
    return counts
