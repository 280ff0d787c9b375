"""The form an NVFP4 graph (fdec.passes.quantize_fp4) is checked in on ONNX Runtime's CPU.

Neither ONNX Runtime's CPU nor its CUDA provider takes FLOAT4E2M1 tensors or TensorRT's
`TRT_FP4DynamicQuantize`, so `emulate_fp4` rewrites the graph into standard ops that compute
the same numbers:

- an FP4 weight `DequantizeLinear(codes, steps, block_size=16)` reads the codes as INT8 holding
  twice each E2M1 value (every E2M1 value is a multiple of 0.5 within ±6) against half the
  steps: code · step = (2 · code) · (step / 2) exactly, as the DequantizeLinear computes it;
- each `TRT_FP4DynamicQuantize` → `DequantizeLinear(scales)` → `DequantizeLinear(values)`
  becomes its quantization written out: per block of 16 along the last axis, the block scale
  absmax / (6 · g) cast to FLOAT8E4M3FN (which the CPU's Cast takes) and back times g, the
  values divided by it and rounded to E2M1 (`_e2m1`: steps of 0.5 below 2, 1 below 4, 2 up to
  6, ties to even, saturated at 6), times it again. Computed in fp32, the input cast from (and
  the result to) its own type.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = ["emulate_fp4", "has_fp4"]

_FP4 = ir.DataType.FLOAT4E2M1
_FP32 = ir.DataType.FLOAT
_DYNAMIC_QUANTIZE = "TRT_FP4DynamicQuantize"


def has_fp4(graph: Any) -> bool:
    """Whether an ONNX GraphProto holds FP4 tensors or TensorRT's FP4 quantizer
    (fdec.runtime.check_forms.forms_needed reads it)."""
    import onnx

    if any(t.data_type == onnx.TensorProto.FLOAT4E2M1 for t in graph.initializer):
        return True
    return any(node.op_type == _DYNAMIC_QUANTIZE for node in graph.node)


def emulate_fp4(graph: ir.Graph) -> int:
    """Rewrite `graph`'s FP4 weights and TensorRT FP4 activation quantizers in place into the
    standard ops of the module docstring; how many were rewritten."""
    done = 0
    constants = _Constants(graph)
    for node in list(graph):
        if node.op_type == _DYNAMIC_QUANTIZE:
            done += _activation(graph, node, constants)
        elif (
            node.op_type == "DequantizeLinear"
            and node.domain == ""
            and node.inputs[0] is not None
            and node.inputs[0].const_value is not None
            and node.inputs[0].const_value.dtype == _FP4
        ):
            done += _weight(graph, node, constants)
    return done


class _Constants:
    """One Constant node per value (and dtype) the rewrites of a graph read, made at the top."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.made: dict[tuple[str, tuple[int, ...], bytes], ir.Value] = {}

    def __call__(self, array: Any, dtype: Any = np.float32) -> ir.Value:
        array = np.asarray(array, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.made:
            name = f"fdec_fp4_emul_const_{len(self.made)}"
            node = ir.node("Constant", [], {"value": ir.tensor(array)}, name=name)
            node.outputs[0].name = name
            node.outputs[0].dtype = ir.DataType.from_numpy(array.dtype)
            node.outputs[0].shape = ir.Shape(array.shape)
            self.graph.insert_before(next(iter(self.graph)), node)
            self.made[key] = node.outputs[0]
        return self.made[key]


def _float_type(value: ir.Value) -> ir.DataType:
    """`value`'s type; a DequantizeLinear's output untyped (no shape inference yet) has its
    scale's."""
    producer = value.producer()
    if value.dtype is None and producer is not None and producer.op_type == "DequantizeLinear":
        return _float_type(producer.inputs[1])
    return value.dtype or _FP32


def _weight(graph: ir.Graph, dq: ir.Node, const: _Constants) -> int:
    codes, steps = dq.inputs[0], dq.inputs[1]
    steps.dtype = _float_type(steps)
    doubled = (codes.const_value.numpy().astype(np.float32) * 2).astype(np.int8)
    name = f"{codes.name}_emul_int8"
    value = graph.initializers.get(name)
    if value is None:
        value = ir.Value(name=name, const_value=ir.Tensor(doubled, name=name))
        graph.register_initializer(value)
    halved = ir.node("Mul", [steps, const(0.5, steps.dtype.numpy())], name=f"{dq.name}_emul_steps")
    halved.outputs[0].dtype = steps.dtype
    graph.insert_before(dq, halved)
    dq.replace_input_with(0, value)
    dq.replace_input_with(1, halved.outputs[0])
    if not codes.uses():
        graph.initializers.pop(codes.name, None)
    return 1


def _activation(graph: ir.Graph, quantize: ir.Node, const: _Constants) -> int:
    """Replace quantize → DQ(scales, g) → DQ(values, ·) by the written-out quantization."""
    x, g = quantize.inputs[0], quantize.inputs[1]
    values = quantize.outputs[0]
    value_dq = next((u.node for u in values.uses() if u.node.op_type == "DequantizeLinear"), None)
    if value_dq is None:
        return 0
    out = value_dq.outputs[0]
    prefix = quantize.name or x.name
    dtype = x.dtype or _FP32
    nodes: list[ir.Node] = []

    def op(kind: str, inputs: list[ir.Value], attributes: dict | None = None) -> ir.Value:
        node = ir.node(kind, inputs, attributes or {}, name=f"{prefix}_emul_{len(nodes)}")
        node.outputs[0].dtype = _FP32
        nodes.append(node)
        return node.outputs[0]

    x32 = op("Cast", [x], {"to": _FP32}) if dtype != _FP32 else x
    g32 = op("Cast", [g], {"to": _FP32}) if g.dtype != _FP32 else g
    shape = op("Shape", [x])
    shape.dtype = ir.DataType.INT64
    leading = op("Shape", [x], {"end": -1})
    leading.dtype = ir.DataType.INT64
    blocked_shape = op("Concat", [leading, const([-1, 16], np.int64)],
                       {"axis": 0})  # fmt: skip
    blocked_shape.dtype = ir.DataType.INT64
    blocks = op("Reshape", [x32, blocked_shape])
    amax = op("ReduceMax", [op("Abs", [blocks]), const([-1], np.int64)],
              {"keepdims": 1})  # fmt: skip
    six = const(6.0)
    scale8 = op("Cast", [op("Div", [amax, op("Mul", [six, g32])])],
                {"to": ir.DataType.FLOAT8E4M3FN})  # fmt: skip
    scale8.dtype = ir.DataType.FLOAT8E4M3FN
    step = op("Mul", [op("Cast", [scale8], {"to": _FP32}), g32])
    zero, one = const(0.0), const(1.0)
    is_zero = op("Equal", [step, zero])
    is_zero.dtype = ir.DataType.BOOL
    safe = op("Where", [is_zero, one, step])
    scaled = op("Div", [blocks, safe])
    magnitude = op("Min", [op("Abs", [scaled]), six])
    two, four = const(2.0), const(4.0)
    below2, below4 = op("Less", [magnitude, two]), op("Less", [magnitude, four])
    below2.dtype = below4.dtype = ir.DataType.BOOL
    grid = op("Where", [below2, const(0.5),
                        op("Where", [below4, one, two])])  # fmt: skip
    rounded = op("Mul", [op("Round", [op("Div", [magnitude, grid])]), grid])
    signed = op("Mul", [op("Sign", [scaled]), rounded])
    result = op("Reshape", [op("Mul", [signed, step]), shape])
    if dtype != _FP32:
        result = op("Cast", [result], {"to": dtype})
        result.dtype = dtype
    graph.insert_before(quantize, nodes)
    ir.convenience.replace_all_uses_with(out, result)
    if out in graph.outputs:
        graph.outputs[graph.outputs.index(out)] = result
    _remove_unread(graph, value_dq)
    return 1


def _remove_unread(graph: ir.Graph, node: ir.Node) -> None:
    """Remove `node`, then each producer of its inputs left unread (the scales' DequantizeLinear,
    Casts the typing put after it, the quantizer): the chain the written-out form replaced."""
    outputs = set(map(id, graph.outputs))
    pending = [node]
    while pending:
        node = pending.pop()
        if node.graph is not graph or any(o.uses() or id(o) in outputs for o in node.outputs):
            continue
        producers = [v.producer() for v in node.inputs if v is not None]
        graph.remove(node, safe=True)
        pending.extend(p for p in producers if p is not None)
