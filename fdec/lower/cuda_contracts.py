"""What ONNX Runtime's CUDA kernels refuse, or compute wrongly, in graphs its CPU kernels run.

A build for the ONNX Runtime CUDA provider is verified on this machine's CPU. Where the CUDA
kernel of an op checks its node differently from the CPU kernel, that check cannot catch it:
the session fails to load on the GPU, a decode step throws, or the numbers are silently wrong.
`contract_breaches` finds those nodes in the graph fdec writes, for the com.microsoft ops fdec
emits, from the CUDA kernels' own checks (read from ONNX Runtime's source, each rule naming its
file; the MatMulNBits and GatherBlockQuantized ones also found in the onnxruntime-gpu 1.31.1
binary, as error strings and kernel instantiations):

- MatMulNBits (contrib_ops/cuda/quantization/matmul_nbits.{h,cc}, matmul_4bits.cu,
  matmul_4bits_m1_impl.cuh): bits 2, 4 or 8; block_size a power of 2 and ≥ 16; 4-bit weights
  with one row of activations (every decode step) only in blocks of 16, 32, 64 or 128: other
  sizes throw "block size N is not supported" instead of falling back; 2-bit blocks ≤ 256; a
  g_idx input only where K is a multiple of block_size. Its `accuracy_level` is never read
  (fp16 activations whatever it says).
- GatherBlockQuantized (contrib_ops/cuda/quantization/gather_block_quantized.{cc,cu}): the
  `bits` attribute given (the CPU defaults it to 4, the CUDA kernel refuses the node);
  block_size a power of 2 and ≥ 16; quantize_axis the last axis; and the last axis (unpacked)
  a multiple of block_size: the kernel finds a value's scale from its flat index, so other
  shapes give wrong rows silently (microsoft/onnxruntime#32663).
- SkipLayerNormalization / SkipSimplifiedLayerNormalization (contrib_ops/cuda/bert/
  skip_layer_norm.cc): outputs 1 and 2 (mean, inverse std) are never written on CUDA, so a
  node or graph output reading them fails there.
- GroupQueryAttention (contrib_ops/cuda/bert/group_query_attention.cc): no `qk_output` (and no
  fourth output); the CPU kernel has it, the CUDA kernel refuses it.

Shape and type rules the two providers share (GroupQueryAttention's CheckInputs, MatMulNBits'
shapes) are left to the CPU run, which applies them; kernels per op and type are
fdec.lower.cuda_kernels', host/device placement fdec.lower.cuda_placement's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from fdec.lower.cuda_kernels import as_ir_model, onnx_domain

__all__ = ["ContractBreach", "contract_breaches"]

_MS = "com.microsoft"
_ORT = "onnxruntime/contrib_ops/cuda"
# The release the rules were checked against: fdec's GPU extra and ../shared/gpu/stage.sh.
CHECKED_AGAINST = "onnxruntime-gpu 1.31.1 (sources; strings of libonnxruntime_providers_cuda.so)"
# 4-bit MatMulNBits, M = 1: MatMulFloat4BitsKernelM1<T, block_size> is built for these only.
_M1_4BIT_BLOCKS = (16, 32, 64, 128)


@dataclasses.dataclass(frozen=True)
class ContractBreach:
    """One node ONNX Runtime's CUDA kernel would refuse or get wrong, and why."""

    name: str
    op: str
    rule: str  # what the node has, against what the kernel takes
    effect: str  # "session" (refused when loaded), "run" (throws when run), "wrong" (silently)
    source: str  # the kernel's file in ONNX Runtime

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        when = {
            "session": "refused when the session loads",
            "run": "throws when it runs",
            "wrong": "silently wrong",
        }[self.effect]
        return f"{self.op} {self.name or '(unnamed)'}: {self.rule} ({when}; {self.source})"


def _int(node: Any, name: str, default: int | None = None) -> int | None:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _power_of_two_from_16(value: int | None) -> bool:
    return value is not None and value >= 16 and value & (value - 1) == 0


def _present(values: Iterable[Any], index: int) -> Any:
    values = list(values)
    return values[index] if index < len(values) and values[index] is not None else None


def _matmul_nbits(node: Any) -> Iterable[tuple[str, str, str]]:
    source = f"{_ORT}/quantization/matmul_nbits.cc, matmul_4bits.cu"
    bits, block, k = _int(node, "bits", 4), _int(node, "block_size"), _int(node, "K")
    if bits not in (2, 4, 8):
        yield f"bits {bits}; the CUDA kernel takes 2, 4 or 8", "session", source
    if not _power_of_two_from_16(block):
        yield f"block_size {block}; it must be a power of 2 and at least 16", "run", source
    elif bits == 4 and block not in _M1_4BIT_BLOCKS:
        yield (
            f"4-bit block_size {block}; the one-row kernel every decode step runs takes "
            f"{', '.join(map(str, _M1_4BIT_BLOCKS))} and throws for others",
            "run",
            f"{_ORT}/quantization/matmul_4bits_m1_impl.cuh",
        )
    elif bits == 2 and block > 256:
        yield f"2-bit block_size {block}; the CUDA kernel takes at most 256", "run", source
    if _present(node.inputs, 4) is not None and block and k is not None and k % block:
        yield f"a g_idx input with K {k} not a multiple of block_size {block}", "run", source


def _gather_block_quantized(node: Any) -> Iterable[tuple[str, str, str]]:
    source = f"{_ORT}/quantization/gather_block_quantized.cc"
    data = _present(node.inputs, 0)
    integer = data is not None and data.dtype is not None and data.dtype.name in (
        "UINT8", "UINT4", "INT4"
    )  # fmt: skip
    bits = _int(node, "bits")
    if integer and bits is None:
        yield (
            "no bits attribute; the CPU assumes 4, the CUDA kernel refuses the node",
            "session",
            source,
        )
    block = _int(node, "block_size", 128)
    if integer and not _power_of_two_from_16(block):
        yield f"block_size {block}; it must be a power of 2 and at least 16", "session", source
    shape = data.shape if data is not None else None
    if shape is None or any(not isinstance(d, int) for d in shape):
        return
    rank = len(shape)
    axis = _int(node, "quantize_axis", 1)
    if axis < 0:
        axis += rank
    if axis != rank - 1:
        yield (
            f"quantize_axis {axis} of a rank-{rank} table; it must be the last axis",
            "run",
            source,
        )
        return
    per_byte = 8 // bits if data.dtype.name == "UINT8" and bits in (2, 4) else 1
    last = shape[-1] * per_byte
    if integer and block and last % block:
        yield (
            f"last axis of {last} values not a multiple of block_size {block}: the CUDA kernel "
            "takes each value's scale from its flat index (microsoft/onnxruntime#32663)",
            "wrong",
            f"{_ORT}/quantization/gather_block_quantized.cu",
        )


def _skip_norm(node: Any) -> Iterable[tuple[str, str, str]]:
    for index, what in ((1, "mean"), (2, "inverse std")):
        value = _present(node.outputs, index)
        if value is not None and (list(value.uses()) or value.is_graph_output()):
            yield (
                f"output {index} ({what}) is read; the CUDA kernel never writes it",
                "run",
                f"{_ORT}/bert/skip_layer_norm.cc",
            )


def _group_query_attention(node: Any) -> Iterable[tuple[str, str, str]]:
    if _int(node, "qk_output", 0) or _present(node.outputs, 3) is not None:
        yield (
            "qk_output (the attention scores as a fourth output); only the CPU kernel has it",
            "run",
            f"{_ORT}/bert/group_query_attention.cc",
        )


_RULES: dict[str, Callable[[Any], Iterable[tuple[str, str, str]]]] = {
    "MatMulNBits": _matmul_nbits,
    "GatherBlockQuantized": _gather_block_quantized,
    "SkipLayerNormalization": _skip_norm,
    "SkipSimplifiedLayerNormalization": _skip_norm,
    "GroupQueryAttention": _group_query_attention,
}


def contract_breaches(model: Any) -> list[ContractBreach]:
    """The nodes of `model` (FdecModel, onnx_ir.Model, onnx.ModelProto or a path) whose CUDA
    kernel would refuse them or compute them wrongly, in graph order."""
    ir_model = as_ir_model(model)
    found: list[ContractBreach] = []
    for node in ir_model.graph.all_nodes():
        rule = _RULES.get(node.op_type) if onnx_domain(node.domain) == _MS else None
        for text, effect, source in rule(node) if rule else ():
            found.append(ContractBreach(node.name or "", node.op_type, text, effect, source))
    return found
