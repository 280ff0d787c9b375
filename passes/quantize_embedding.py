"""Embedding quantization: the token-embedding table stored per row in int8 or 4 bits.

The table the ModelSpec names "embed" is read one row per token by `Gather(table, ids)`; after
weight quantization it is the largest float tensor left in a small LLM (SmolLM2-135M: 49152 ×
576 fp32 = 113 MB of a 197 MB int4 build). This pass stores it quantized, row by row, and
rewrites each Gather to dequantize what it reads. The form depends on the backend, because
no single form is both cheap in ONNX Runtime and accepted by TensorRT:

- "onnxruntime" gathers first and dequantizes only the rows it read:
  8 bits: `Gather(codes, ids)` → `Cast` → `Mul` by `Gather(scales, ids)` (standard ONNX);
  4 bits: com.microsoft `GatherBlockQuantized` (uint8, two codes a byte, zero point 8).
  Dequantizing the whole table before the Gather instead costs ONNX Runtime's CPU EP the full
  table on every call (measured on a 49152 × 576 table: 6.4 ms int8, 44 ms int4, against
  0.01 ms for these forms).
- "tensorrt" dequantizes first: `DequantizeLinear(codes, scales)` → `Gather` (standard ONNX;
  8 bits per-axis, opset 13, or 19 for float16 scales; 4 bits INT4 blocked along the hidden
  axis, opset 21). TensorRT treats INT8/INT4 as quantized types that a constant may only feed
  into a DequantizeLinear ("Quantized constant is only allowed before DQ", TensorRT-RTX
  1.7.1's builder, for both gather-first forms), ONNX's Gather takes no INT4, and TensorRT's
  scales must be strictly positive. TensorRT-RTX keeps the table quantized in the engine (a
  8192 × 576 table: 4.9 MB int8, 3.1 MB int4, against 19.0 MB fp32).

Scales are positive: 8 bits, the row's largest magnitude / 127 (codes -127..127); 4 bits, the
block's largest magnitude / 8 (codes -8..7, so a positive maximum is clipped to 7 steps); an
all-zero row or block gets scale 1 and codes 0. Only Gather reads of the table are rewritten:
a table also read by a MatMul (a tied lm_head) must be untied first (`untie-embeddings`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from fdec.backends import graph_forms
from fdec.errors import UsageError
from fdec.ir import FdecModel
from fdec.passes.weights import (
    add_initializer,
    fresh_name,
    per_channel_quantize,
    raise_opset,
    replace_node,
)
from fdec.pipeline import Pass, PassResult, Tolerance

__all__ = ["QuantizeEmbeddingPass"]

logger = logging.getLogger(__name__)

_BITS = (8, 4)
_BLOCK_SIZES = (16, 32, 64, 128)  # GatherBlockQuantized: a power of 2, at least 16
_MS_DOMAIN = "com.microsoft"
_PER_AXIS_OPSET = 13  # DequantizeLinear with a per-axis (1-D) scale
_HALF_SCALE_OPSET = 19  # DequantizeLinear with float16 scales
_BLOCKED_OPSET = 21  # DequantizeLinear with block_size, and INT4 tensors
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


@dataclasses.dataclass
class _Table:
    """The embedding initializer, the Gathers reading it and its [V, H] values as float32."""

    value: ir.Value
    gathers: list[ir.Node]
    array: np.ndarray
    dtype: ir.DataType


def _other_readers(graph: ir.Graph, value: ir.Value) -> list[str]:
    """How `value` is read other than as the data of a top-level axis-0 Gather ("MatMul", ...)."""
    found = []
    for use in value.uses():
        node = use.node
        axis = node.attributes.get("axis")
        if (
            node.op_type == "Gather"
            and node.domain == ""
            and use.idx == 0
            and node.graph is graph
            and (axis is None or axis.as_int() == 0)
        ):
            continue
        found.append(node.op_type if node.graph is graph else f"{node.op_type} in a subgraph")
    if value.is_graph_output():
        found.append("a graph output")
    return found


def _find_table(model: FdecModel) -> tuple[_Table | None, str | None]:
    """The embedding table and its Gathers, or None and why it cannot be quantized."""
    name = model.spec.weights.get("embed")
    if name is None:
        return None, "the model names no embedding"
    graph = model.graph
    value = graph.initializers.get(name)
    tensor = value.const_value if value is not None else None
    if value is None or tensor is None:
        return None, f"embedding {name!r} is not an initializer with data"
    if tensor.dtype not in _FLOAT_TYPES:
        return None, f"embedding {name!r} is {tensor.dtype.name}, not a float table"
    if len(tensor.shape) != 2:
        return None, f"embedding {name!r} is not a 2-D table"
    if value.is_graph_input():
        return None, f"embedding {name!r} is a graph input"
    others = _other_readers(graph, value)
    if others:
        return None, f"embedding {name!r} is also read by {', '.join(sorted(set(others)))}"
    gathers = [use.node for use in value.uses()]
    if not gathers:
        return None, f"embedding {name!r} is read by no Gather"
    # An fp32 table is read as it is (no copy): a streamed 8B's 2.1 GB table was held twice.
    array = tensor.numpy().astype(np.float32, copy=False)
    return _Table(value, gathers, array, tensor.dtype), None


# --- quantizers (numpy; positive scales, as TensorRT requires) --------------------------------


def _quantize_rows_int8(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row of [V, H]: (codes int8 [V, H] in -127..127, scales float32 [V])."""
    return per_channel_quantize(array, 127, np.int8, channel_axis=0)


def _quantize_rows_int4(array: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 4-bit per block of `block_size` along each row of [V, H].

    Returns codes int8 [V, H] in -8..7 and scales float32 [V, ceil(H / block_size)] (the last
    block of a row may be partial).
    """
    rows, hidden = array.shape
    blocks = -(-hidden // block_size)
    padded = np.zeros((rows, blocks * block_size), dtype=np.float32)
    padded[:, :hidden] = array
    peak = np.abs(padded.reshape(rows, blocks, block_size)).max(axis=2)
    scales = np.where(peak > 0, peak / 8, 1.0).astype(np.float32)
    step = np.repeat(scales, block_size, axis=1)[:, :hidden]
    codes = np.clip(np.rint(array / step), -8, 7).astype(np.int8)
    return codes, scales


def _pack_uint4(codes: np.ndarray) -> np.ndarray:
    """int8 codes -8..7 [V, H] → uint8 [V, ceil(H / 2)]: code + 8, two a byte, low nibble first."""
    values = (codes.astype(np.int16) + 8).astype(np.uint8)
    if values.shape[1] % 2:
        values = np.pad(values, ((0, 0), (0, 1)))
    return (values[:, 0::2] | (values[:, 1::2] << 4)).astype(np.uint8)


def _gather_block_quantized_problem(block_size: int) -> str | None:
    """Why this ONNX Runtime's CPU EP cannot run GatherBlockQuantized (uint8, 4 bits), or None.

    Runs the operator on a small table and compares it with numpy.
    """
    import onnxruntime as ort

    table = np.linspace(-1.0, 1.0, 4 * 2 * block_size, dtype=np.float32).reshape(4, -1)
    codes, scales = _quantize_rows_int4(table, block_size)
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([2]))
    data = ir.Value(name="data", const_value=ir.tensor(_pack_uint4(codes), name="data"))
    scale = ir.Value(name="scales", const_value=ir.tensor(scales, name="scales"))
    node = ir.node(
        "GatherBlockQuantized",
        [data, ids, scale],
        {"gather_axis": 0, "quantize_axis": 1, "block_size": block_size, "bits": 4},
        domain=_MS_DOMAIN,
    )
    node.outputs[0].name = "rows"
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph(
        [ids],
        node.outputs,
        nodes=[node],
        initializers=[data, scale],
        opset_imports={"": _BLOCKED_OPSET, _MS_DOMAIN: 1},
    )
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=10))
    try:
        session = ort.InferenceSession(
            proto.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        (rows,) = session.run(None, {"ids": np.array([3, 1], dtype=np.int64)})
    except Exception as error:  # ORT raises its own exception types
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"onnxruntime {ort.__version__} cannot run GatherBlockQuantized: {first}"
    want = codes[[3, 1]] * np.repeat(scales[[3, 1]], block_size, axis=1)
    if not np.allclose(rows, want, rtol=0, atol=1e-6):
        return f"onnxruntime {ort.__version__}'s GatherBlockQuantized gives wrong values"
    return None


@dataclasses.dataclass
class QuantizeEmbeddingPass(Pass):
    """Store the token-embedding table per row in int8 or 4 bits; dequantize what is gathered.

    Options:
    - `bits` 8: symmetric per-row int8 codes [V, H] and a scale per row;
      `bits` 4: symmetric blocks of `block_size` along each row, a scale per block.
    - `backend` "onnxruntime": gather, then dequantize the gathered rows (4 bits:
      com.microsoft GatherBlockQuantized; if this ONNX Runtime cannot run it, 8 bits are used
      and the stats say why); "tensorrt": standard ONNX only, `DequantizeLinear` then
      `Gather` (the model's opset is raised to 13 for 8 bits, 19 for 8 bits of a float16
      table, 21 for 4 bits).

    The ModelSpec's "embed" role names the codes initializer afterwards, and the float table
    is removed. A table also read by a tied lm_head must be untied first: put
    `untie-embeddings` before this pass.
    """

    name = "quantize-embedding"
    family = "quantize"
    summary = "store the token-embedding table per row in int8 or 4 bits (gather, then dequantize)"
    # Measured against PyTorch on 128 held tokens, the embedding quantized alone:
    #   tests' tiny random llama: max logit error 0.025 / top-1 0.99 / perplexity +0.02 % (8
    #   bits); 0.46 / 0.77 / +0.45 % (4 bits, block 32); 0.43 / 0.80 / +0.28 % (block 128);
    #   SmolLM2-135M: 0.82 / 0.99 / -0.1 % (8 bits); 5.8 / 0.89 / +5.3 % (4 bits, block 32);
    #   11.2 / 0.88 / +8.8 % (block 64); 22.0 / 0.84 / +15.5 % (block 128).
    # The numeric check after a pass compares the whole model with the source, and this pass
    # usually follows a weight quantizer (SmolLM2, quantize-int4 then this pass: 12.1 / 0.59
    # with 8 bits, 13.0 / 0.56 with 4), so it declares the weight quantizers' bounds: they
    # catch a broken rewrite (a wrong packing or zero point), not a small loss. Quality is gated
    # on perplexity by the pipeline.
    tolerance = Tolerance(max_abs_error=25.0, min_top1_agreement=0.45)

    bits: int = dataclasses.field(default=8, kw_only=True)
    backend: str = dataclasses.field(default="onnxruntime", kw_only=True)
    block_size: int = dataclasses.field(default=32, kw_only=True)
    # A table still read by a tied lm_head (kept in float by a mixed-precision pass, or never
    # quantized): False refuses it in `requires`; True leaves it as it is (the stats say why).
    skip_shared: bool = dataclasses.field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        if self.bits not in _BITS:
            raise UsageError(
                f"{self.name} bits {self.bits} is not supported", "use bits=8 or bits=4"
            )
        if self.backend not in graph_forms():
            raise UsageError(
                f"{self.name} backend {self.backend!r} is unknown",
                f"use one of {', '.join(graph_forms())}",
            )
        if self.block_size not in _BLOCK_SIZES:
            raise UsageError(
                f"{self.name} block_size {self.block_size} is not supported",
                f"use one of {', '.join(map(str, _BLOCK_SIZES))}",
            )

    def check_target(self, target: Any) -> None:
        if target is not None and hasattr(target, "require"):
            target.require(f"int{self.bits}")

    def requires(self, model: FdecModel, target: Any = None) -> None:
        name = model.spec.weights.get("embed")
        value = model.graph.initializers.get(name) if name is not None else None
        if value is None:
            return  # nothing to quantize; call() says so in its stats
        others = _other_readers(model.graph, value)
        if others and not self.skip_shared:
            tied = " (the lm_head is tied to it)" if model.spec.tie_word_embeddings else ""
            raise UsageError(
                f"{self.name} can only rewrite Gather reads of the embedding {name!r}, and it "
                f"is also read by {', '.join(sorted(set(others)))}{tied}",
                f"run untie-embeddings before {self.name}",
            )

    def call(self, model: FdecModel) -> PassResult:
        stats: dict[str, Any] = {
            "rows": 0,
            "gathers": 0,
            "bytes_before": 0,
            "bytes_after": 0,
            "bits": self.bits,
            "backend": self.backend,
            "fallback": None,
            "skipped": None,
        }
        table, reason = _find_table(model)
        if table is None:
            logger.info("%s: not quantizing: %s", self.name, reason)
            stats["skipped"] = reason
            return PassResult(model, modified=False, stats=stats)
        bits = self.bits
        if bits == 4 and self.backend == "onnxruntime":
            problem = _gather_block_quantized_problem(self.block_size)
            if problem is not None:
                logger.warning("%s: %s; storing the embedding in 8 bits", self.name, problem)
                bits, stats["fallback"] = 8, f"{problem}; stored in 8 bits instead"
        old_name = table.value.name
        assert old_name is not None
        if self.backend == "tensorrt":
            if bits == 4:
                opset = _BLOCKED_OPSET
            else:
                float32 = table.dtype == ir.DataType.FLOAT
                opset = _PER_AXIS_OPSET if float32 else _HALF_SCALE_OPSET
            stats["opset_raised"] = raise_opset(model, opset)
            added, new_name = self._dequantize_then_gather(model.graph, table, bits)
        elif bits == 8:
            added, new_name = self._gather_then_dequantize(model.graph, table)
        else:
            model.model.opset_imports.setdefault(_MS_DOMAIN, 1)
            added, new_name = self._gather_block_quantized(model.graph, table)
        assert not table.value.uses()
        model.graph.initializers.pop(old_name)
        model.spec.rename_weight(old_name, new_name)
        stats.update(
            rows=int(table.array.shape[0]),
            gathers=len(table.gathers),
            bytes_before=int(table.value.const_value.nbytes),
            bytes_after=added,
            bits=bits,
        )
        return PassResult(model, modified=True, stats=stats)

    # --- the three graph forms ----------------------------------------------------------------

    def _gather_then_dequantize(self, graph: ir.Graph, table: _Table) -> tuple[int, str]:
        """8 bits for ONNX Runtime: Gather(codes) → Cast → Mul by Gather(scales) [V, 1]."""
        codes, scales = _quantize_rows_int8(table.array)
        base = table.value.name
        taken: set[str] = set()
        codes_value = add_initializer(
            graph, fresh_name(graph, f"{base}_Q8", taken), ir.tensor(codes)
        )
        scales_value = add_initializer(
            graph,
            fresh_name(graph, f"{base}_scales", taken),
            ir.tensor(scales[:, None].astype(table.dtype.numpy())),
        )
        for gather in table.gathers:
            ids = gather.inputs[1]
            prefix = gather.name or base
            rows = ir.node("Gather", [codes_value, ids], {"axis": 0}, name=f"{prefix}_Q8")
            cast = ir.node("Cast", [rows.outputs[0]], {"to": table.dtype}, name=f"{prefix}_Cast")
            row_scales = ir.node(
                "Gather", [scales_value, ids], {"axis": 0}, name=f"{prefix}_scales"
            )
            mul = ir.node(
                "Mul", [cast.outputs[0], row_scales.outputs[0]], name=f"{prefix}_dequantize"
            )
            replace_node(graph, gather, [rows, cast, row_scales, mul])
        return codes.nbytes + scales_value.const_value.nbytes, codes_value.name

    def _gather_block_quantized(self, graph: ir.Graph, table: _Table) -> tuple[int, str]:
        """4 bits for ONNX Runtime: com.microsoft GatherBlockQuantized on packed uint8 rows."""
        codes, scales = _quantize_rows_int4(table.array, self.block_size)
        base = table.value.name
        taken: set[str] = set()
        data = add_initializer(
            graph, fresh_name(graph, f"{base}_Q4", taken), ir.tensor(_pack_uint4(codes))
        )
        scales_value = add_initializer(
            graph,
            fresh_name(graph, f"{base}_scales", taken),
            ir.tensor(scales.astype(table.dtype.numpy())),
        )
        attributes = {
            "gather_axis": 0,
            "quantize_axis": 1,
            "block_size": self.block_size,
            "bits": 4,
        }
        for gather in table.gathers:
            node = ir.node(
                "GatherBlockQuantized",
                [data, gather.inputs[1], scales_value],
                attributes,
                domain=_MS_DOMAIN,
                name=f"{gather.name or base}_Q4",
            )
            replace_node(graph, gather, [node])
        added = data.const_value.nbytes + scales_value.const_value.nbytes
        return added, data.name

    def _dequantize_then_gather(self, graph: ir.Graph, table: _Table, bits: int) -> tuple[int, str]:
        """TensorRT: DequantizeLinear(codes, scales) → Gather; standard ONNX only."""
        base = table.value.name
        taken: set[str] = set()
        dtype = table.dtype.numpy()
        if bits == 8:
            codes, scales = _quantize_rows_int8(table.array)
            tensor = ir.tensor(codes)
            attributes = {"axis": 0}
        else:
            codes, scales = _quantize_rows_int4(table.array, self.block_size)
            tensor = ir.Tensor(codes.astype(ml_dtypes.int4), dtype=ir.DataType.INT4)
            attributes = {"axis": 1, "block_size": self.block_size}
        codes_value = add_initializer(graph, fresh_name(graph, f"{base}_Q{bits}", taken), tensor)
        scales_value = add_initializer(
            graph, fresh_name(graph, f"{base}_scales", taken), ir.tensor(scales.astype(dtype))
        )
        dequantize = ir.node(
            "DequantizeLinear",
            [codes_value, scales_value],
            attributes,
            name=f"{base}_DQ_Q{bits}",
        )
        # It reads initializers only: first in the graph, it comes before every Gather.
        graph.insert_before(graph.node(0), dequantize)
        for gather in table.gathers:
            rows = ir.node(
                "Gather",
                [dequantize.outputs[0], gather.inputs[1]],
                {"axis": 0},
                name=f"{gather.name or base}_Q{bits}",
            )
            replace_node(graph, gather, [rows])
        added = codes_value.const_value.nbytes + scales_value.const_value.nbytes
        return added, codes_value.name
