"""Weights read back from the graph: float tensors in torch's layout, block-quantized int4 and
8-bit weights (MatMulNBits, blocked DequantizeLinear), NVFP4 weights (quantize-fp4's two-level
DequantizeLinear, and the activation scale of a W4A4 layer's run-time quantizer), FP8 weights
(quantize-fp8's per-channel DequantizeLinear, and the static scale of a W8A8 layer's
activation QuantizeLinear)."""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np
import onnx_ir as ir

from fdec.errors import CompileError, UsageError
from fdec.lower.hf_checkpoint.expected import Parameter
from fdec.lower.hf_checkpoint.supported import SUPPORTED_FIX
from fdec.passes.quantize_fp4 import FP4_BLOCK, FP4_QUANTIZER

__all__ = [
    "FLOAT_TYPES",
    "Blocked",
    "Fp8",
    "Nvfp4",
    "blocked_of",
    "float_tensor",
    "input_order",
]

_MS_DOMAIN = "com.microsoft"
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)
# blocked DequantizeLinear: bits of each stored type
_BITS = {ir.DataType.INT4: 4, ir.DataType.UINT4: 4, ir.DataType.INT8: 8, ir.DataType.UINT8: 8}


def _direct_layout(node: ir.Node, index: int) -> str | None:
    """How a node reads a 2-D input: "kn" (as MatMul's B, [in, out]), "nk" ([out, in]) or None."""
    if node.domain != "" or index != 1:
        return None
    if node.op_type == "MatMul":
        return "kn"
    if node.op_type == "Gemm":
        attr = node.attributes.get("transB")
        return "nk" if attr is not None and attr.as_int() else "kn"
    return None


def _read_layout(value: ir.Value) -> str | None:
    """The layout every matmul reading `value` sees it in; None when none or ambiguous."""
    layouts: set[str | None] = set()
    flip = {"kn": "nk", "nk": "kn", None: None}
    for use in value.uses():
        node = use.node
        if node.op_type == "Transpose" and node.domain == "":
            perm = node.attributes.get("perm")
            if perm is not None and list(perm.as_ints()) != [1, 0]:
                return None
            for inner in node.outputs[0].uses():
                layouts.add(flip[_direct_layout(inner.node, inner.idx)])
            continue
        layouts.add(_direct_layout(node, use.idx))
    layouts.discard(None)
    return layouts.pop() if len(layouts) == 1 else None


def float_tensor(value: ir.Value, parameter: Parameter) -> np.ndarray:
    """The float initializer `value` in the HF layout of `parameter`."""
    array = value.const_value.numpy()
    want = parameter.shape
    if array.ndim == 2 and parameter.kind in ("linear", "conv1d"):
        hf_layout = "nk" if parameter.kind == "linear" else "kn"
        layout = _read_layout(value)
        if layout is not None and layout != hf_layout:
            array = array.T
        elif layout is None and array.shape != want and array.T.shape == want:
            array = array.T
    if array.shape != want:
        if array.size == math.prod(want) and len(want) <= 1:
            array = array.reshape(want)
        else:
            raise CompileError(
                f"graph weight {value.name!r} is {list(array.shape)}, but the HF parameter "
                f"{parameter.name!r} is {list(want)}",
                "report the model to the fdec developers",
            )
    return np.ascontiguousarray(array)


@dataclasses.dataclass
class Blocked:
    """A block-quantized weight (4 or 8 bits) in one canonical form, whichever graph operator
    reads it.

    `codes` are uint8 [N, K] in 0..2**bits - 1 and `zero_points` uint8 [N, k_blocks] in the same
    range (2**(bits - 1) for symmetric); the weight is `(codes - zero_points) * scales`, block
    by block along K. Packed as compressed-tensors W4A16 or W8A16, one width per checkpoint:
    another width (an int4 recipe's 8-bit lm_head, `lm_head_bits`) is written dequantized.
    """

    codes: np.ndarray
    scales: np.ndarray  # [N, k_blocks], the graph's float dtype
    zero_points: np.ndarray
    block_size: int
    operator: str  # "MatMulNBits" | "DequantizeLinear"
    bits: int = 4

    @property
    def shape(self) -> tuple[int, int]:  # [N, K] = [out, in]
        return self.codes.shape

    @property
    def scheme(self) -> str:
        return f"W{self.bits}A16"

    @property
    def symmetric(self) -> bool:
        return bool(np.all(self.zero_points == 1 << (self.bits - 1)))

    def dequantized(self) -> np.ndarray:
        """The float [N, K] weight, computed as ONNX Runtime does: (code - zp) * scale."""
        k = self.shape[1]
        dtype = self.scales.dtype
        scales = np.repeat(self.scales, self.block_size, axis=1)[:, :k]
        zero = np.repeat(self.zero_points, self.block_size, axis=1)[:, :k]
        return (self.codes.astype(dtype) - zero.astype(dtype)) * scales


@dataclasses.dataclass
class Nvfp4:
    """An NVFP4 weight in torch's layout: E2M1 codes uint8 [N, K] (sign in bit 3), FP8 E4M3
    block scales [N, K/16], the fp32 tensor scale g (W = E2M1 · block scale · g), and the
    activation's tensor scale g_a where the layer quantizes its input to FP4 (W4A4)."""

    codes: np.ndarray
    block_scales: np.ndarray  # ml_dtypes.float8_e4m3fn
    global_scale: np.float32
    input_scale: np.float32 | None
    operator: str = "DequantizeLinear"
    bits: int = 4
    block_size: int = FP4_BLOCK

    @property
    def shape(self) -> tuple[int, int]:  # [N, K] = [out, in]
        return self.codes.shape

    @property
    def scheme(self) -> str:
        return "NVFP4" if self.input_scale is not None else "NVFP4A16"

    def dequantized(self) -> np.ndarray:
        """The float [N, K] weight, as the graph computes it: E2M1 · (s_w · g_w) in fp32."""
        steps = self.block_scales.astype(np.float32) * self.global_scale
        values = self.codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
        return values * np.repeat(steps, FP4_BLOCK, axis=1)


@dataclasses.dataclass
class Fp8:
    """An FP8 weight in torch's layout: E4M3 codes [N, K], one scale per output channel (W =
    E4M3 · scale), and the static per-tensor scale of its activation where the layer quantizes
    it to FP8 (W8A8; None: W8A16, a float activation)."""

    codes: np.ndarray  # ml_dtypes.float8_e4m3fn
    scales: np.ndarray  # [N], float32
    input_scale: np.float32 | None
    operator: str = "DequantizeLinear"
    bits: int = 8

    @property
    def shape(self) -> tuple[int, int]:  # [N, K] = [out, in]
        return self.codes.shape

    @property
    def scheme(self) -> str:
        return "FP8" if self.input_scale is not None else "FP8A16"

    def dequantized(self) -> np.ndarray:
        """The float [N, K] weight, as the graph computes it: E4M3 · scale in fp32."""
        return self.codes.astype(np.float32) * self.scales[:, None]


def fp8_of(node: ir.Node, value: ir.Value, name: str) -> Fp8:
    """The FP8 weight `value` (FLOAT8E4M3FN [K, N]) that DequantizeLinear `node` reads per output
    channel (axis 1), with its activation's static scale where that is FP8 Q/DQ."""
    scales = _const(node.inputs[1], "scales", name).astype(np.float32).reshape(-1)
    codes = _const(value, "codes", name)  # [K, N]
    if _int_attr(node, "axis", 1) != 1 or node.attributes.get("block_size") or (
        scales.size not in (1, codes.shape[1])
    ):  # fmt: skip
        raise CompileError(
            f"FP8 weight {name!r} is not scaled per output channel",
            "quantize with fdec's quantize-fp8",
        )
    return Fp8(
        codes=np.ascontiguousarray(codes.T).astype(ml_dtypes.float8_e4m3fn),
        scales=np.broadcast_to(scales, (codes.shape[1],)).copy(),
        input_scale=_input_scale(node.outputs[0], name, ("", "QuantizeLinear")),
    )


def _input_scale(
    dequantized: ir.Value, name: str, kind: tuple[str, str] = FP4_QUANTIZER
) -> np.float32 | None:
    """The scale of the activation quantizer (`kind`, its (domain, op): the run-time FP4 one's
    g_a, FP8 QuantizeLinear's static scale) whose dequantized output the MatMuls reading the
    weight take, or None (float activations); one for all of them."""
    found: set[float | None] = set()
    for use in dequantized.uses():
        matmul = use.node
        activation = matmul.inputs[0].producer() if matmul.inputs[0] is not None else None
        values = activation.inputs[0] if activation is not None else None
        quantizer = values.producer() if values is not None else None
        if (
            activation is None
            or activation.op_type != "DequantizeLinear"
            or quantizer is None
            or (quantizer.domain, quantizer.op_type) != kind
        ):
            found.add(None)
            continue
        found.add(float(_const(quantizer.inputs[1], "activation scale", name).reshape(-1)[0]))
    if len(found) != 1:
        raise CompileError(
            f"NVFP4 weight {name!r} is read with {len(found)} different activation precisions",
            "report the model to the fdec developers",
        )
    scale = found.pop()
    return None if scale is None else np.float32(scale)


def nvfp4_of(node: ir.Node, value: ir.Value, name: str) -> Nvfp4:
    """The NVFP4 weight `value` (FLOAT4E2M1 [K, N]) that DequantizeLinear `node` reads."""
    axis = node.attributes.get("axis")
    block = node.attributes.get("block_size")
    steps = node.inputs[1].producer() if node.inputs[1] is not None else None
    if (
        axis is None
        or axis.as_int() != 0
        or block is None
        or block.as_int() != FP4_BLOCK
        or steps is None
        or steps.op_type != "DequantizeLinear"
    ):
        raise CompileError(
            f"FP4 weight {name!r} is not NVFP4 (blocks of {FP4_BLOCK} along its inputs, FP8 "
            "block scales under a tensor scale)",
            "quantize with fdec's quantize-fp4",
        )
    codes = _const(value, "codes", name).view(np.uint8) & 0x0F  # [K, N]
    block_scales = _const(steps.inputs[0], "block scales", name)  # [K/16, N]
    global_scale = np.float32(_const(steps.inputs[1], "tensor scale", name).reshape(-1)[0])
    return Nvfp4(
        codes=np.ascontiguousarray(codes.T),
        block_scales=np.ascontiguousarray(block_scales.T).astype(ml_dtypes.float8_e4m3fn),
        global_scale=global_scale,
        input_scale=_input_scale(node.outputs[0], name),
    )


def _nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    """uint8 [..., m] → uint8 [..., count], low nibble first."""
    values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    return values[..., :count]


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _const(value: ir.Value | None, what: str, weight: str) -> np.ndarray:
    if value is None or value.const_value is None:
        raise CompileError(
            f"the {what} of quantized weight {weight!r} is not a constant",
            "report the model to the fdec developers",
        )
    return value.const_value.numpy()


def _from_matmulnbits(node: ir.Node, name: str) -> Blocked:
    bits, k, n = _int_attr(node, "bits", 4), _int_attr(node, "K", 0), _int_attr(node, "N", 0)
    block = _int_attr(node, "block_size", 0)
    if bits not in (4, 8):
        raise CompileError(
            f"MatMulNBits weight {name!r} has {bits} bits; 4 and 8 are written",
            "quantize with fdec's quantize-int4",
        )
    if len(node.inputs) > 4 and node.inputs[4] is not None:
        raise CompileError(
            f"MatMulNBits weight {name!r} has g_idx (act-order)", "quantize without act-order"
        )
    packed = _const(node.inputs[1], "packed weight", name)
    k_blocks = -(-k // block)
    # 8 bits: one code per byte (and one zero point per byte) instead of two
    unpack = _nibbles if bits == 4 else (lambda rows, count: rows[:, :count])
    codes = unpack(packed.reshape(n, -1), k_blocks * block)[:, :k]
    scales = _const(node.inputs[2], "scales", name).reshape(n, k_blocks)
    zp_value = node.inputs[3] if len(node.inputs) > 3 else None
    if zp_value is None:
        zero_points = np.full((n, k_blocks), 1 << (bits - 1), dtype=np.uint8)
    else:
        zp = _const(zp_value, "zero points", name)
        if zp.dtype != np.uint8:
            raise CompileError(
                f"MatMulNBits weight {name!r} has {zp.dtype} zero points; only packed uint8 "
                "zero points are written",
                "quantize with fdec's quantize-int4",
            )
        zero_points = unpack(zp.reshape(n, -1), k_blocks)
    return Blocked(codes, scales, zero_points.astype(np.uint8), block, "MatMulNBits", bits)


def _from_dequantize(node: ir.Node, value: ir.Value, name: str) -> Blocked:
    if _int_attr(node, "axis", 1) != 0 or not node.attributes.get("block_size"):
        raise CompileError(
            f"int4 weight {name!r} is not dequantized in blocks along its input axis",
            "quantize with fdec's quantize-int4",
        )
    for use in node.outputs[0].uses():
        if _direct_layout(use.node, use.idx) != "kn":
            raise CompileError(
                f"dequantized int4 weight {name!r} is read by {use.node.op_type}, not as "
                "MatMul's B",
                "quantize with fdec's quantize-int4",
            )
    block = _int_attr(node, "block_size", 0)
    bits = _BITS[value.const_value.dtype]
    signed = value.const_value.dtype in (ir.DataType.INT4, ir.DataType.INT8)
    offset = 1 << (bits - 1) if signed else 0
    x = value.const_value.numpy().astype(np.int16)  # [K, N]
    codes = (x + offset).T.astype(np.uint8)
    scales = _const(node.inputs[1], "scales", name).T  # [k_blocks, N] → [N, k_blocks]
    zp_value = node.inputs[2] if len(node.inputs) > 2 else None
    if zp_value is None:
        zero_points = np.full(scales.shape, offset, dtype=np.uint8)
    else:
        zero_points = (_const(zp_value, "zero points", name).astype(np.int16) + offset).T
    return Blocked(
        np.ascontiguousarray(codes),
        np.ascontiguousarray(scales),
        np.ascontiguousarray(zero_points.astype(np.uint8)),
        block,
        "DequantizeLinear",
        bits,
    )


def blocked_of(value: ir.Value) -> Blocked | Nvfp4 | Fp8:
    """The quantized weight stored in `value` (MatMulNBits, blocked DequantizeLinear, NVFP4's
    two-level DequantizeLinear, FP8's per-channel one).

    Raises UsageError for int8 (MatMulInteger) weights, CompileError for other encodings.
    """
    name = value.name or "?"
    readers = [(use.node, use.idx) for use in value.uses()]
    for node, index in readers:
        if node.domain == _MS_DOMAIN and node.op_type == "MatMulNBits" and index == 1:
            return _from_matmulnbits(node, name)
        if node.domain == "" and node.op_type == "DequantizeLinear" and index == 0:
            if value.const_value.dtype == ir.DataType.FLOAT4E2M1:
                return nvfp4_of(node, value, name)
            if value.const_value.dtype == ir.DataType.FLOAT8E4M3FN:
                return fp8_of(node, value, name)
            # int8 also as per-channel Q/DQ (SmoothQuant), which the generic error refuses
            bits = _BITS.get(value.const_value.dtype)
            if bits == 4 or (bits == 8 and _int_attr(node, "block_size", 0)):
                return _from_dequantize(node, value, name)
        if node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"):
            raise UsageError(
                f"--emit hf-checkpoint cannot write int8 weights ({name!r} is read by "
                f"{node.op_type}): serving engines load no checkpoint format with dynamic int8's "
                "per-tensor run-time activations",
                SUPPORTED_FIX,
            )
    ops = ", ".join(sorted({node.op_type for node, _ in readers})) or "nothing"
    raise CompileError(
        f"weight {name!r} is {value.const_value.dtype} read by {ops}; the HF checkpoint writes "
        "float, block-quantized (MatMulNBits, blocked DequantizeLinear) and NVFP4 weights only",
        "drop the pass that produced it, or emit the ONNX build only",
    )


# Ops between a weight initializer and the matmul reading it, and the matmuls themselves.
_WEIGHT_PATH = {("", "Transpose"): 0, ("", "DequantizeLinear"): 0}
_MATMULS = {("", "MatMul"), ("", "Gemm"), (_MS_DOMAIN, "MatMulNBits")}


def input_order(value: ir.Value) -> np.ndarray | None:
    """The order the matmuls reading weight `value` take their inputs in, where a constant
    Gather re-lays them (an activation-ordered int4 source: fdec.frontend.input_order):
    the weight's K axis is then in that order, and input `order[j]` meets its row j. None
    where the inputs come as they are."""
    found: set[bytes] = set()
    orders = []
    pending = [value]
    while pending:
        for use in pending.pop().uses():
            node = use.node
            if _WEIGHT_PATH.get((node.domain, node.op_type)) == use.idx:
                pending.append(node.outputs[0])
                continue
            if (node.domain, node.op_type) not in _MATMULS or use.idx != 1:
                continue
            gather = node.inputs[0].producer() if node.inputs[0] is not None else None
            order = _gathered(gather)
            key = order.tobytes() if order is not None else b""
            if key not in found:
                found.add(key)
                orders.append(order)
    if len(orders) > 1:
        raise CompileError(
            f"weight {value.name!r} is read with its inputs in {len(orders)} different orders",
            "report the model to the fdec developers",
        )
    return orders[0] if orders else None


def _gathered(node: ir.Node | None) -> np.ndarray | None:
    """The constant indices of a Gather along the last axis, or None."""
    if node is None or node.op_type != "Gather" or node.domain != "":
        return None
    indices = node.inputs[1].const_value if node.inputs[1] is not None else None
    rank = node.inputs[0].shape.rank() if node.inputs[0].shape is not None else None
    axis = _int_attr(node, "axis", 0)
    if indices is None or rank is None or axis not in (-1, rank - 1):
        return None
    return indices.numpy().astype(np.int64).reshape(-1)
