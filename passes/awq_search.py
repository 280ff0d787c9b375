"""AWQ's search for one group of weights sharing an activation: the α grid, block clipping, GPTQ codes.

QuantizeInt4AwqPass (fdec.passes.quantize_awq) calls `awq_search` per activation group: s = m^α
for α on a grid (m the activation's per-channel mean |x|), the α minimising
‖X·W − (X/s)·Q(s·W)‖² on captured rows, then per block and output column the clipping ratio
minimising that block's share of the error; `gptq_int4` rounds a weight's codes by GPTQ's error
feedback on XᵀX, keeping RTN's scales.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from fdec.passes.gptq import gptq, inverse_factor
from fdec.passes.int4_codes import Int4Weight, blocks_of_k, quantize_int4

__all__ = ["AwqSearch", "awq_search", "gptq_int4"]

logger = logging.getLogger(__name__)

# Clipping ratios tried per block (1.0: no clipping): AutoAWQ's auto_clip steps, down to 0.8.
_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)
_MIN_SCALE = 1e-4  # m^α is kept at least this (a channel never active is not zeroed out)
# Output columns are independent (blocks run along K): the search quantizes and multiplies
# ~64 MB of float32 columns at a time, so an 8B's [4096, 14336] projection costs its scaled
# copy and a few column blocks, not five full-size temporaries per candidate.
_COLUMN_BYTES = 64 << 20


def _dequantized(q: Int4Weight) -> np.ndarray:
    """The float32 [N, K] values a quantized weight stands for: (code - zero point) · scale."""
    return q.dequantized()


def _quantized_output(
    rows: np.ndarray, array: np.ndarray, block_size: int, symmetric: bool
) -> np.ndarray:
    """rows · Q(array) ([R, N]) for a [K, N] float32 array, Q the int4 RTN of QuantizeInt4Pass."""
    return rows @ _dequantized(quantize_int4(array, block_size, symmetric)).T


def _squared_error(want: np.ndarray, got: np.ndarray) -> float:
    diff = want - got
    return float(np.einsum("ij,ij->", diff, diff))


def _column_blocks(k: int, n: int) -> list[slice]:
    """Slices of N holding ~_COLUMN_BYTES of a [K, N] float32 array each (one when it fits)."""
    step = max(1, _COLUMN_BYTES // (4 * max(1, k)))
    return [slice(start, start + step) for start in range(0, n, step)]


def _quantized_error(
    want: np.ndarray,
    rows: np.ndarray,
    array: np.ndarray,
    block_size: int,
    symmetric: bool,
    s: np.ndarray | None = None,
) -> float:
    """‖want − rows·Q(diag(s)·array)‖² (s: [K] row factors, or none), a block of output
    columns at a time (`_column_blocks`)."""
    error = 0.0
    for columns in _column_blocks(*array.shape):
        part = array[:, columns] if s is None else array[:, columns] * s[:, None]
        got = _quantized_output(rows, part, block_size, symmetric)
        error += _squared_error(want[:, columns], got)
    return error


def _scales(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """s = m^α, at least 1e-4, normalised so that max(s)·min(s) = 1 (float32 [K])."""
    if not alpha:
        return np.ones(mean_abs.shape, dtype=np.float32)
    s = np.maximum(np.power(mean_abs, alpha), _MIN_SCALE)
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


@dataclasses.dataclass
class AwqSearch:
    """What the search chose for one group, and the output errors it measured."""

    alpha: float
    s: np.ndarray  # [K] float32 (ones when alpha is 0)
    arrays: list[np.ndarray]  # the group's [K, N] weights scaled by s (and clipped)
    clipped: list[bool]
    error_rtn: float  # relative: ‖X·W − X·Q(W)‖² / ‖X·W‖²
    error_scaled: float  # with the chosen s, before clipping
    error: float  # with the chosen s and clipping


def _search_alpha(
    rows: np.ndarray,
    targets: Sequence[np.ndarray],
    mean_abs: np.ndarray,
    arrays: Sequence[np.ndarray],
    alphas: Sequence[float],
    block_size: int,
    symmetric: bool,
) -> tuple[float, np.ndarray, float, float]:
    """(best α, its s, its error, RTN's error), errors ‖X·W − (X/s)·Q(s·W)‖² summed."""
    best: tuple[float, np.ndarray, float] | None = None
    rtn = float("nan")
    for alpha in alphas:
        s = _scales(mean_abs, alpha)
        scaled_rows = rows / s
        error = sum(
            _quantized_error(want, scaled_rows, a, block_size, symmetric, s)
            for want, a in zip(targets, arrays)
        )
        if not alpha:
            rtn = error
        logger.debug("alpha %.3f: error %.6g", alpha, error)
        if best is None or error < best[2]:
            best = (alpha, s, error)
    assert best is not None
    return best[0], best[1], best[2], rtn


def _block_grams(rows: np.ndarray, block_size: int) -> np.ndarray:
    """Xᵀ·X of each block of K (zero-padded to whole blocks): [k_blocks, block, block]."""
    r, k = rows.shape
    k_blocks = -(-k // block_size)
    padded = np.zeros((r, k_blocks * block_size), dtype=np.float32)
    padded[:, :k] = rows
    blocks = padded.reshape(r, k_blocks, block_size).transpose(1, 0, 2)  # [kb, R, B]
    return np.matmul(blocks.transpose(0, 2, 1), blocks)


def _clip(array: np.ndarray, rows: np.ndarray, block_size: int, symmetric: bool) -> np.ndarray:
    """The [K, N] array with each block's range shrunk by the ratio minimising its error.

    Per block g and output column n, the error of ratio r is dᵀ·H_g·d with d the block's
    W − Q(clip(W, ±r·max|W|)) and H_g = X_gᵀ·X_g: that block's share of ‖X·(W − Q)‖²,
    without the cross terms between blocks (the caller checks the whole error). Each output
    column is chosen on its own, so the columns go a block at a time (`_column_blocks`).
    """
    grams = _block_grams(rows, block_size)
    clipped = np.empty(array.shape, dtype=np.float32)
    for columns in _column_blocks(*array.shape):
        clipped[:, columns] = _clip_columns(array[:, columns], grams, block_size, symmetric)
    return clipped


def _clip_columns(
    array: np.ndarray, grams: np.ndarray, block_size: int, symmetric: bool
) -> np.ndarray:
    """`_clip` of some output columns ([K, n]), given the blocks' XᵀX ([k_blocks, B, B])."""
    k, n = array.shape
    blocks = blocks_of_k(array, block_size)  # [kb, B, N]
    k_blocks = blocks.shape[0]
    peak = np.abs(blocks).max(axis=1, keepdims=True)  # [kb, 1, N]
    best_error = np.full((k_blocks, n), np.inf, dtype=np.float32)
    best_ratio = np.ones((k_blocks, 1, n), dtype=np.float32)
    delta = np.zeros_like(blocks)
    for ratio in _CLIP_RATIOS:
        bound = peak * np.float32(ratio)
        clipped = np.clip(blocks, -bound, bound).reshape(-1, n)[:k]
        deq = _dequantized(quantize_int4(clipped, block_size, symmetric))  # [N, K]
        delta.reshape(-1, n)[:k] = array - deq.T
        error = np.einsum("gbn,gbn->gn", np.matmul(grams, delta), delta)  # [kb, N]
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_ratio[:, 0, :] = np.where(better, np.float32(ratio), best_ratio[:, 0, :])
    bound = peak * best_ratio
    return np.clip(blocks, -bound, bound).reshape(-1, n)[:k]


def awq_search(
    seen: Any,
    arrays: Sequence[np.ndarray],
    clip: bool,
    *,
    grid: int,
    block_size: int,
    symmetric: bool,
) -> AwqSearch:
    """AWQ's α grid search (then the clipping search) for the weights sharing one activation;
    `seen` has the activation's per-channel `mean_abs` ([K]) and captured `rows` ([R, K])."""
    mean_abs, rows = seen.mean_abs, seen.rows
    targets = [rows @ a for a in arrays]  # X·W: (X/s)·(s·W) for every s
    reference = sum(float(np.einsum("ij,ij->", y, y)) for y in targets) or 1.0
    alphas = [i / grid for i in range(grid + 1)]
    alpha, s, scaled_error, rtn = _search_alpha(
        rows, targets, mean_abs, arrays, alphas, block_size, symmetric
    )
    scaled_rows = rows / s
    final, clipped, error = [], [], 0.0
    for want, array in zip(targets, arrays):
        array = array * s[:, None]
        plain = _quantized_error(want, scaled_rows, array, block_size, symmetric)
        if clip:
            candidate = _clip(array, scaled_rows, block_size, symmetric)
            clipped_error = _quantized_error(want, scaled_rows, candidate, block_size, symmetric)
            if clipped_error < plain:
                final.append(candidate)
                clipped.append(True)
                error += clipped_error
                continue
        final.append(array)
        clipped.append(False)
        error += plain
    return AwqSearch(
        alpha, s, final, clipped, rtn / reference, scaled_error / reference, error / reference
    )


def gptq_int4(
    array: np.ndarray, hessian: np.ndarray, block_size: int, symmetric: bool, damping: float
) -> Int4Weight:
    """GPTQ rounding (`gptq`) of a [K, N] weight to block-wise int4 codes.

    The scales and zero points are RTN's (`quantize_int4` of the same array: AWQ's clipping
    stays in them); only the codes change. With H = I nothing spreads and the codes are RTN's.
    """
    nearest = quantize_int4(array, block_size, symmetric)
    k, n = array.shape
    scales = nearest.scales.T.astype(np.float64)  # [kb, N]
    zero = nearest.unpacked_zero_points().T.astype(np.float64)  # [kb, N]
    safe = np.where(scales == 0, 1.0, scales)
    top = (1 << nearest.bits) - 1
    codes = np.empty((k, n), dtype=np.uint8)

    def round_row(i: int, row: np.ndarray) -> np.ndarray:
        g = i // block_size
        code = np.clip(np.rint(row / safe[g]) + zero[g], 0, top)
        codes[i] = code
        return (code - zero[g]) * scales[g]

    if not gptq(array.astype(np.float64), inverse_factor(hessian, damping), round_row):
        return nearest
    padded = nearest._unpack(nearest.packed)  # [N, kb·B]: the kernel's padding kept
    padded[:, :k] = codes.T
    pairs = padded.reshape(n, scales.shape[0], block_size // 2, 2)
    packed = np.ascontiguousarray(pairs[..., 0] | (pairs[..., 1] << 4), dtype=np.uint8)
    return dataclasses.replace(nearest, packed=packed)
