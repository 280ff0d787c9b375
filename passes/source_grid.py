"""A source's own block grid kept as int4 on ONNX Runtime's fast path: offset rows fed by block sums.

A weight already on an asymmetric block grid with float zero points (a GGUF Q4_1 source's
blocks, (c − z)·d) is exact as MatMulNBits with float16 zero points, which ONNX Runtime decodes
on a slow path (SmolLM2: 9.2 against 86.0 tok/s, benchmarks/decode.py). `offset_rows` writes it
instead as symmetric (or uint8-zero-point) blocks over more inputs, and `widen_to_block_sums`
feeds those inputs: the activation x becomes [x, block sums of x] (a MatMul by a 0/1 matrix,
then a Concat), once per activation. QuantizeInt4AwqPass uses both for the weights it keeps on
their grid (`keep_source_grid`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from fdec.passes.int4_codes import Int4Weight, quantize_int4
from fdec.passes.smoothquant import insert_after_producer
from fdec.passes.weights import Weight, add_initializer, fresh_name

__all__ = ["block_sum_matrix", "block_sum_width", "offset_rows", "widen_to_block_sums"]


def offset_rows(q: Int4Weight, levels: int, rounded_zero_points: bool = False) -> Int4Weight:
    """A weight on an asymmetric grid with float zero points, (c − z)·d block by block, as
    symmetric blocks (no zero points: ONNX Runtime's fast MatMulNBits path) over more inputs.

    (c − z)·d = (c − c₀)·d + (c₀ − z)·d with c₀ the symmetric zero point (8 for 4 bits): the
    first K inputs keep the codes and scales; the per-block offsets (c₀ − z)·d ([k_blocks, N],
    zero-padded to whole blocks, P rows) follow as `levels` more sets of P input rows, each the
    symmetric rounding of what the sets before left over. The activation they multiply is
    [x, S, …, S] with S the sums of x over each block of K (`block_sum_matrix`), so
    x·W = x·(c − c₀)·d + S·offsets exactly up to the offsets' rounding: 1 level leaves about
    1/5 of the weight error plain symmetric RTN makes on SmolLM2's Q4_1 layers, 2 levels
    about 1/1000. K must be whole blocks.

    With `rounded_zero_points` the first K inputs' blocks keep z rounded to an integer (uint8
    zero points, still the fast path; the offset rows' blocks get the symmetric 8), so the
    offsets are only (round(z) − z)·d, at most half a step, and rounding them costs that much
    less than rounding the whole (c₀ − z)·d.
    """
    if q.zero_points is None or q.zero_points.dtype.kind != "f" or q.k % q.block_size:
        raise ValueError("offset_rows takes float zero points of whole blocks (grid minmax)")
    block, center = q.block_size, 1 << (q.bits - 1)
    z = q.zero_points.astype(np.float64)
    kept = np.clip(np.rint(z), 0, (1 << q.bits) - 1) if rounded_zero_points else center
    rows = np.zeros((block_sum_width(q.k, block), q.n), dtype=np.float32)
    rows[: q.k_blocks] = ((kept - z) * q.scales).T
    packed, scales = [q.packed], [q.scales]
    for _ in range(levels):
        level = quantize_int4(rows, block, True, q.bits)
        packed.append(level.packed)
        scales.append(level.scales)
        rows = rows - level.dequantized().T
    zero_points = None
    if rounded_zero_points:
        extra = sum(part.shape[1] for part in packed[1:])  # offset blocks: symmetric
        codes = np.concatenate(
            [np.broadcast_to(kept, z.shape), np.full((q.n, extra), center)], axis=1
        ).astype(np.uint8)
        if q.bits == 4:
            codes = np.pad(codes, ((0, 0), (0, codes.shape[1] % 2)))
            codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
        zero_points = np.ascontiguousarray(codes, dtype=np.uint8)
    return Int4Weight(
        np.ascontiguousarray(np.concatenate(packed, axis=1)),
        np.ascontiguousarray(np.concatenate(scales, axis=1)),
        zero_points,
        q.k + levels * rows.shape[0],
        q.n,
        block,
        q.bits,
    )


def block_sum_width(k: int, block: int) -> int:
    """Columns of `block_sum_matrix`: one per block of K, padded to whole blocks."""
    return -(-(k // block) // block) * block


def block_sum_matrix(k: int, block: int) -> np.ndarray:
    """[K, P] float32 of 0/1: x·M sums x over each block of K (columns past K/block: zero)."""
    matrix = np.zeros((k, block_sum_width(k, block)), dtype=np.float32)
    matrix[np.arange(k), np.arange(k) // block] = 1.0
    return matrix


def widen_to_block_sums(
    graph: ir.Graph, weights: list[Weight], taken: set[str], levels: int,
    rounded_zero_points: bool = False,
) -> int:  # fmt: skip
    """Rewrite the weights still on their float-zero-point grid (kept, not searched) as
    symmetric blocks over [x, block sums of x] (`offset_rows`); their sites read the
    widened activation, one per activation. Returns the activations widened."""
    widened: dict[int, ir.Value] = {}
    matrices: dict[tuple[int, int], ir.Value] = {}
    for weight in weights:
        q = weight.quantized
        if (
            q is None
            or q.zero_points is None
            or q.zero_points.dtype.kind != "f"
            or q.k % q.block_size
        ):
            continue  # integer zero points (a GPTQ/AWQ source's) are MatMulNBits' own
        weight.quantized = offset_rows(q, levels, rounded_zero_points)
        for site in weight.sites:
            source = site.activation
            if id(source) not in widened:
                key = (q.k, q.block_size)
                if key not in matrices:
                    name = fresh_name(graph, f"block_sums_{q.k}x{q.block_size}", taken)
                    array = block_sum_matrix(q.k, q.block_size)
                    matrices[key] = add_initializer(graph, name, ir.tensor(array, name=name))
                sums = ir.node("MatMul", [source, matrices[key]], name=f"{source.name}_block_sums")
                wide = ir.node(
                    "Concat",
                    [source, *[sums.outputs[0]] * levels],
                    {"axis": -1},
                    name=f"{source.name}_with_block_sums",
                )
                insert_after_producer(graph, source, [sums, wide])
                widened[id(source)] = wide.outputs[0]
            site.node.replace_input_with(0, widened[id(source)])
            site.activation = widened[id(source)]
    return len(widened)
