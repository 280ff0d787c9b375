"""Graph forms that check a build on ONNX Runtime's CPU: less memory, or the GPU's rounding.

A build for TensorRT dequantizes its stored tables before reading them (the backend's form,
fdec.passes.quantize_embedding): `DequantizeLinear(codes, scales)` → `Gather` for the
embedding, `DequantizeLinear` → `MatMul` for a weight-only lm_head. ONNX Runtime's CPU kernels
run that as written: an 8B Llama's 128256 × 4096 table becomes a 2.1 GB fp32 tensor in the
check's session, twice. `fdec.runtime.sliced` runs its slices in these forms instead:

- `gather_rows_first`: `Gather(codes, ids)` → `Cast` → (`Sub` zero point) → `Mul` by
  `Gather(scales, ids)`: the rows read, dequantized alone. DequantizeLinear computes each
  element as `(code - zero_point) * scale` in fp32, so the values are the same bit for bit.
- `dequantize_in_column_blocks`: a MatMul whose weight is a large constant DequantizeLinear
  runs as MatMuls over column blocks of the codes (`Slice` → `DequantizeLinear` → `MatMul`),
  concatenated; each output column is the same dot product over the same rows.

A GPU graph (fp16/bf16) is checked in a third form, `emulate_low_precision`: every fp16/bf16
tensor a node computes rounded to its type and each node computing in fp32, the arithmetic of
the GPU rather than of ONNX Runtime's CPU (which runs fp16 nodes without a CPU fp16 kernel in
fp32 and skips the rounding between them, and has no bf16 kernels at all).

Casts between the DequantizeLinear and its reader (the emulation of bf16 storage) move with
it: a Cast is elementwise, so casting the rows read is casting the table and reading them. Only int8/uint8 codes with fp32 outputs are rewritten: ONNX's Gather and
Slice take no FLOAT8 or INT4 at the builds' opsets (an fp8 projection is one layer's weight,
not a vocabulary table), and an unemulated fp16/bf16 graph is left as it is.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx_ir as ir

from fdec.runtime.fp4_form import emulate_fp4, has_fp4

__all__ = [
    "check_form",
    "dequantize_in_column_blocks",
    "emulate_low_precision",
    "external_data_folder",
    "forms_needed",
    "gather_rows_first",
    "lighter_check_forms",
    "lighter_session_args",
    "low_dtype",
]

_COLUMN_BLOCK_BYTES = 256 << 20  # fp32 bytes of one column block's dequantized weight
_PANEL = 16  # columns: blocks start on MLAS's packing panels
# Codes ONNX's Gather and Slice take (not FLOAT8 or INT4 before opset 21): the 8-bit tables.
_SLICEABLE = frozenset({ir.DataType.INT8, ir.DataType.UINT8})


def lighter_check_forms(graph: ir.Graph, block_bytes: int = _COLUMN_BLOCK_BYTES) -> dict[str, int]:
    """Both rewrites on `graph` in place; how many of each were made."""
    return {
        "gathers": gather_rows_first(graph),
        "matmuls": dequantize_in_column_blocks(graph, block_bytes),
    }


def check_form(model: ir.Model, *, emulate: bool = False, edges: bool = False) -> int:
    """`model` rewritten in place into the form a check runs it in on this CPU; how many
    rewrites were made: an NVFP4 graph's FP4 form first (fdec.runtime.fp4_form: the CPU runs
    no FP4), then with `emulate` its fp16/bf16 rounding (`emulate_low_precision`, `edges`),
    then the lighter forms (`lighter_check_forms`), which read the emulated Casts."""
    made = emulate_fp4(model.graph)
    made += emulate_low_precision(model, edges=edges) if emulate else 0
    return made + sum(lighter_check_forms(model.graph).values())


def external_data_folder(path: str | pathlib.Path) -> dict[str, str]:
    """Session config entries that read a graph opened from bytes with the external data
    beside the saved model at `path`."""
    folder = str(pathlib.Path(path).parent)
    return {"session.model_external_initializers_file_folder_path": folder}


def lighter_session_args(path: str | pathlib.Path, *, emulate: bool = False) -> dict[str, Any]:
    """`fdec.runtime.open_session` arguments that open the saved model at `path` in the
    lighter forms (`model_bytes`, `config_entries`); none when it has nothing to rewrite.
    `emulate`: with its fp16/bf16 storage emulated too (`emulate_low_precision(edges=True)`,
    the build's I/O and data file kept), opened at optimization "disable" (in the args)."""
    model = ir.load(path)  # weights stay in the data file
    if not check_form(model, emulate=emulate, edges=True):
        return {}
    serialized = ir.serde.serialize_model(model).SerializeToString()
    args = {"model_bytes": serialized, "config_entries": external_data_folder(path)}
    if emulate:  # ORT would fold the stored weights' Casts into fp32 copies
        args["optimization"] = "disable"
    return args


def low_dtype(path: str | pathlib.Path) -> str | None:
    """'bf16' or 'fp16' when the saved model's inputs, initializers or typed values hold that
    type (bf16 first), else None."""
    return forms_needed(path)[0]


def forms_needed(path: str | pathlib.Path) -> tuple[str | None, bool]:
    """What checking the saved model at `path` on this CPU takes, from one read of its graph:
    (`low_dtype`'s 'bf16' / 'fp16' / None, whether it holds FP4: fdec.runtime.fp4_form)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return _low_dtype_of(graph), has_fp4(graph)


def _low_dtype_of(graph: Any) -> str | None:
    import onnx

    types = {i.type.tensor_type.elem_type for i in [*graph.input, *graph.value_info]}
    types |= {t.data_type for t in graph.initializer}
    types |= {o.type.tensor_type.elem_type for o in graph.output}
    for name, onnx_type in (
        ("bf16", onnx.TensorProto.BFLOAT16),
        ("fp16", onnx.TensorProto.FLOAT16),
    ):
        if onnx_type in types:
            return name
    return None


_LOW = (ir.DataType.BFLOAT16, ir.DataType.FLOAT16)
# Ops whose outputs are some of their inputs' elements: rounded in, rounded out.
_MOVES = frozenset({"Concat", "Expand", "Flatten", "Gather", "Identity", "Reshape", "Slice",
                    "Split", "Squeeze", "Tile", "Transpose", "Unsqueeze"})  # fmt: skip


def emulate_low_precision(model: ir.Model, *, edges: bool = False) -> int:
    """Rewrite an fp16/bf16 graph in place into an fp32 graph ONNX Runtime's CPU kernels run,
    with every fp16/bf16 tensor rounded to its type (Cast to it and back, after each node that
    computes one); returns the casts added. Arithmetic inside an op runs in fp32, as GPU
    kernels' accumulators do. ORT has no bf16 CPU kernels, and it runs fp16 nodes by casting
    around them and dropping the casts between them, so its own fp16 run skips the rounding
    (and the overflow) between nodes; the emulated graph does not.

    `edges=False` (the TensorRT model's check, fdec.lower.tensorrt_model): initializers become
    fp32 in memory. `edges=True` (a GPU build checked on the CPU, fdec.compile.gate): the graph
    keeps the build's I/O and data file. fp16 inputs and outputs stay fp16 (numpy feeds and
    reads them; a Cast to fp32 after an input, the rounding Cast last before an output), bf16
    ones become fp32 holding bf16 values (numpy has no bf16); initializers stay stored in the
    build's data file and are read through a Cast to fp32, so open the graph at optimization
    "disable" or ORT folds them into fp32 copies."""
    graph, fp32 = model.graph, ir.DataType.FLOAT
    added = 0
    reads: list[ir.Node] = []  # Casts that read stored low-precision values in fp32

    def read_as_fp32(value: ir.Value) -> None:
        users = list(value.uses())
        cast = ir.node("Cast", [value], {"to": fp32}, name=f"{value.name}_emul_read")
        cast.outputs[0].name, cast.outputs[0].dtype = f"{value.name}_emul_read", fp32
        cast.outputs[0].shape = value.shape
        for use in users:
            use.node.replace_input_with(use.idx, cast.outputs[0])
        reads.append(cast)

    for value in list(graph.initializers.values()):
        if value.dtype not in _LOW or value.const_value is None or not value.uses():
            continue  # unread (a slice's graph still lists the other slices' weights)
        if edges:  # stored as built, read in fp32 (an 8B's fp32 table would be 2.1 GB inline)
            read_as_fp32(value)
            continue
        array = value.const_value.numpy().astype(np.float32)
        value.const_value = ir.Tensor(array, name=value.name)
        value.dtype = fp32
    for value in list(graph.inputs):
        if value.dtype == ir.DataType.FLOAT16 and edges:
            read_as_fp32(value)
        elif value.dtype in _LOW:
            value.dtype = fp32
    if reads:
        first = next(iter(graph), None)
        if first is None:
            graph.extend(reads)
        else:
            graph.insert_before(first, reads)
        added += len(reads)
    for node in list(graph):  # the reading Casts make fp32: nothing of theirs is rounded
        if node.op_type == "Constant" and "value" in node.attributes:
            tensor = node.attributes["value"].value
            if tensor.dtype in _LOW:
                array = tensor.numpy().astype(np.float32)
                node.attributes["value"] = ir.AttrTensor("value", ir.Tensor(array))
                node.outputs[0].dtype = fp32
            continue
        for out in node.outputs:
            if out.dtype in _LOW:
                added += _round(graph, node, out, edges)
    return added


def _round(graph: ir.Graph, node: ir.Node, out: ir.Value, edges: bool) -> int:
    """Round `node`'s low-precision output `out` to its type for its readers (see
    `emulate_low_precision`); the casts added."""
    fp32, dtype = ir.DataType.FLOAT, out.dtype
    is_cast = node.op_type == "Cast"
    outputs = [i for i, v in enumerate(graph.outputs) if v is out]
    if not is_cast:
        out.dtype = fp32
    if is_cast and edges and dtype == ir.DataType.FLOAT16 and not out.uses():
        return 0  # an fp16 graph output made by a Cast: already what the build returns
    if node.op_type in _MOVES and node.domain in ("", "ai.onnx") and not outputs:
        return 0  # its inputs were rounded already
    users = list(out.uses())
    steps = [fp32] if is_cast else [dtype, fp32]
    chain, anchor, made = out, node, {}
    for step_type in steps:
        step = ir.Value(name=f"{out.name}_emul_{step_type.name.lower()}", shape=out.shape,
                        type=ir.TensorType(step_type))  # fmt: skip
        cast = ir.Node("", "Cast", [chain], {"to": ir.AttrInt64("to", step_type)},
                       outputs=[step])  # fmt: skip
        graph.insert_after(anchor, cast)
        anchor, chain, made[step_type] = cast, step, step
    for use in users:
        use.node.replace_input_with(use.idx, chain)
    if outputs:
        # The output the build returns: fp16 stays fp16 at the edge, else fp32 (rounded).
        edge = chain
        if edges and dtype == ir.DataType.FLOAT16:
            edge = out if is_cast else made[dtype]
        if edge is not out:  # it keeps the output's name
            edge.name, out.name = out.name, f"{out.name}_emul_raw"
        for index in outputs:
            graph.outputs[index] = edge
    return len(steps)


def _constant(value: ir.Value | None) -> bool:
    return value is not None and value.is_initializer() and value.const_value is not None


def _dequantized_chain(value: ir.Value) -> tuple[ir.Node, list[ir.Node]] | None:
    """(DequantizeLinear, Casts after it) when `value` is a constant table's fp32 dequantized
    values, possibly cast after; else None."""
    casts: list[ir.Node] = []
    node = value.producer()
    while node is not None and node.op_type == "Cast" and node.domain == "":
        casts.insert(0, node)
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if node is None or node.op_type != "DequantizeLinear" or node.domain != "":
        return None
    codes, scale, zero = _dequantize_inputs(node)
    block = node.attributes.get("block_size")
    if (
        not (_constant(codes) and _constant(scale))
        or (zero is not None and not _constant(zero))
        or (block is not None and block.as_int() != 0)
        or scale.dtype != ir.DataType.FLOAT
        or codes.dtype not in _SLICEABLE
        or codes.shape is None
        or len(scale.shape or ()) > 1
    ):
        return None
    return node, casts


def _dequantized_readers(
    graph: ir.Graph, op_type: str, index: int
) -> Iterator[tuple[ir.Node, ir.Node, list[ir.Node]]]:
    """(reader, DequantizeLinear, Casts between) for each `op_type` node whose input `index`
    is a constant table's dequantized values (`_dequantized_chain`)."""
    for node in list(graph):
        if node.op_type != op_type or node.domain != "" or len(node.inputs) <= index:
            continue
        value = node.inputs[index]
        found = _dequantized_chain(value) if value is not None else None
        if found is not None:
            yield node, *found


def _dequantize_inputs(dq: ir.Node) -> tuple[ir.Value, ir.Value, ir.Value | None]:
    """A DequantizeLinear's codes, scale and zero point (None when absent)."""
    codes, scale, *rest = dq.inputs
    return codes, scale, rest[0] if rest else None


def _axis(node: ir.Node, rank: int) -> int:
    attribute = node.attributes.get("axis")
    axis = attribute.as_int() if attribute is not None else 1
    return axis % rank


def _constant_input(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array))
    graph.register_initializer(value)
    return value


def _fresh(graph: ir.Graph, stem: str) -> str:
    taken = {v.name for v in graph.initializers.values()}
    taken |= {v.name for n in graph for v in n.outputs}
    index = 0
    while f"{stem}_{index}" in taken:
        index += 1
    return f"{stem}_{index}"


def _through(casts: list[ir.Node], value: ir.Value, added: list[ir.Node]) -> ir.Value:
    """`value` through copies of `casts` (appended to `added`); the last value."""
    for cast in casts:
        added.append(ir.node("Cast", [value], {"to": cast.attributes["to"].as_int()}))
        value = added[-1].outputs[0]
    return value


def _replace(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    for index, output in enumerate(graph.outputs):
        if output is old:  # the output keeps its name
            graph.outputs[index] = new
            new.name, old.name = old.name, f"{old.name}_replaced"
    ir.convenience.replace_all_uses_with(old, new)


def _drop_unused(graph: ir.Graph, nodes: list[ir.Node]) -> None:
    for node in reversed(nodes):  # readers first
        if all(not v.uses() and not v.is_graph_output() for v in node.outputs):
            graph.remove(node, safe=True)


def _rows_of(graph: ir.Graph, added: list[ir.Node], value: ir.Value, ids: ir.Value) -> ir.Value:
    """The rows `ids` of a per-row `value` [V], shaped to broadcast over gathered rows [..., 1]
    (appended to `added`); a per-tensor value as it is."""
    if len(value.shape or ()) == 0:
        return value
    added.append(ir.node("Gather", [value, ids], {"axis": 0}))
    axes = _constant_input(graph, _fresh(graph, "check_axes"), np.array([-1], np.int64))
    added.append(ir.node("Unsqueeze", [added[-1].outputs[0], axes]))
    return added[-1].outputs[0]


def _columns_of(
    graph: ir.Graph, added: list[ir.Node], start: int, stop: int, value: ir.Value, axis: int
) -> ir.Value:
    """`value`[start:stop] along `axis` (a Slice appended to `added`)."""
    bounds = [
        _constant_input(graph, _fresh(graph, "check_slice"), np.array([x], np.int64))
        for x in (start, stop, axis)
    ]
    added.append(ir.node("Slice", [value, *bounds]))
    return added[-1].outputs[0]


def gather_rows_first(graph: ir.Graph) -> int:
    """Rewrite each axis-0 Gather of a per-row (or per-tensor) dequantized constant table to
    dequantize only the rows it reads; the number rewritten."""
    made = 0
    for gather, dq, casts in _dequantized_readers(graph, "Gather", 0):
        codes, scale, zero = _dequantize_inputs(dq)
        rank = len(codes.shape)
        axis_attr = gather.attributes.get("axis")
        if (axis_attr.as_int() if axis_attr else 0) % rank != 0:
            continue
        per_row = len(scale.shape or ()) == 1
        if per_row and _axis(dq, rank) != 0:
            continue
        ids = gather.inputs[1]
        added: list[ir.Node] = [ir.node("Gather", [codes, ids], {"axis": 0})]
        added.append(ir.node("Cast", [added[-1].outputs[0]], {"to": ir.DataType.FLOAT}))
        rows = added[-1].outputs[0]

        if zero is not None:
            offset = _rows_of(graph, added, zero, ids)
            added.append(ir.node("Cast", [offset], {"to": ir.DataType.FLOAT}))
            added.append(ir.node("Sub", [rows, added[-1].outputs[0]]))
            rows = added[-1].outputs[0]
        added.append(ir.node("Mul", [rows, _rows_of(graph, added, scale, ids)]))
        result = _through(casts, added[-1].outputs[0], added)
        graph.insert_before(gather, added)
        _replace(graph, gather.outputs[0], result)
        _drop_unused(graph, [dq, *casts, gather])
        made += 1
    return made


def dequantize_in_column_blocks(graph: ir.Graph, block_bytes: int = _COLUMN_BLOCK_BYTES) -> int:
    """Split each MatMul whose [K, N] weight is a constant dequantized per column (or per
    tensor) into MatMuls over column blocks of at most `block_bytes` of fp32 weight,
    concatenated on the last axis; the number split."""
    made = 0
    for matmul, dq, casts in _dequantized_readers(graph, "MatMul", 1):
        codes, scale, zero = _dequantize_inputs(dq)
        if len(codes.shape) != 2 or not all(isinstance(d, int) for d in codes.shape):
            continue
        rows, columns = codes.shape
        per_column = len(scale.shape or ()) == 1
        if (per_column and _axis(dq, 2) != 1) or 4 * rows * columns <= block_bytes:
            continue
        blocks = math.ceil(4 * rows * columns / block_bytes)
        width = math.ceil(math.ceil(columns / blocks) / _PANEL) * _PANEL
        added: list[ir.Node] = []
        parts: list[ir.Value] = []
        for start in range(0, columns, width):
            stop = min(start + width, columns)

            block = (graph, added, start, stop)
            inputs = [
                _columns_of(*block, codes, 1),
                _columns_of(*block, scale, 0) if per_column else scale,
            ]
            if zero is not None:
                inputs.append(_columns_of(*block, zero, 0) if len(zero.shape or ()) == 1 else zero)
            block_dq = ir.node("DequantizeLinear", inputs, {"axis": 1})
            added.append(block_dq)
            weight = _through(casts, block_dq.outputs[0], added)
            added.append(ir.node("MatMul", [matmul.inputs[0], weight]))
            parts.append(added[-1].outputs[0])
        added.append(ir.node("Concat", parts, {"axis": -1}))
        graph.insert_before(matmul, added)
        _replace(graph, matmul.outputs[0], added[-1].outputs[0])
        _drop_unused(graph, [dq, *casts, matmul])
        made += 1
    return made
