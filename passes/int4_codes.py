"""Block-quantized int4 (and 8-bit) weights in MatMulNBits layout, and the grids they are found on.

`Int4Weight` holds one [K, N] weight's codes, scales and zero points; `quantize_int4` rounds
to nearest with ONNX Runtime's kernel, `quantize_minmax` on GGUF's legacy grid (float zero
points), and `integer_grid` finds the grid a weight already sits on when it was dequantized from
integer-zero-point blocks (a GPTQ, AWQ or compressed-tensors checkpoint), so the quantizers
keep such a weight exactly instead of rounding it again.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = [
    "Int4Weight",
    "blocks_of_k",
    "find_grid",
    "integer_grid",
    "join_columns",
    "quantize_int4",
    "quantize_minmax",
    "reproduces",
]

_COLUMNS = 8192  # per kernel call (an 8B's [4096, 128256] head: 128 MB copies, not 2.1 GB)


# --- int4 -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Int4Weight:
    """A [K, N] weight quantized in blocks of `block_size` along K, in MatMulNBits layout.

    `codes` are the `bits`-bit values (0..15 for 4 bits, 0..255 for 8) as [N, K]; the
    dequantized weight is `(codes - zero_points) * scales` block by block (symmetric: zero
    point 8 for 4 bits, 128 for 8).
    """

    packed: np.ndarray  # uint8 [N, k_blocks, block_size * bits // 8], low nibble first along K
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(k_blocks·bits/8)], packed; None = symmetric
    k: int
    n: int
    block_size: int
    bits: int = 4

    @property
    def k_blocks(self) -> int:
        return self.scales.shape[1]

    def _unpack(self, packed: np.ndarray) -> np.ndarray:
        if self.bits == 8:
            return packed.reshape(self.n, -1)
        return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(self.n, -1)

    def codes(self) -> np.ndarray:
        """The codes as uint8 [N, K] (the padding past K dropped)."""
        return self._unpack(self.packed)[:, : self.k]

    def unpacked_zero_points(self) -> np.ndarray:
        """Zero points as uint8 [N, k_blocks] (8 or 128 everywhere when symmetric); float
        zero points (grid "minmax") as they are, [N, k_blocks]."""
        if self.zero_points is None:
            return np.full((self.n, self.k_blocks), 1 << (self.bits - 1), dtype=np.uint8)
        if self.zero_points.dtype.kind == "f":
            return self.zero_points
        return self._unpack(self.zero_points)[:, : self.k_blocks]

    def dequantized(self) -> np.ndarray:
        """The float32 [N, K] values this weight stands for: (code - zero point) · scale."""
        codes = self._unpack(self.packed).reshape(self.n, self.k_blocks, -1)
        zero = self.unpacked_zero_points().astype(np.float32)[..., None]
        values = (codes.astype(np.float32) - zero) * self.scales[..., None]
        return values.reshape(self.n, -1)[:, : self.k]


def quantize_int4(array: np.ndarray, block_size: int, symmetric: bool, bits: int = 4) -> Int4Weight:
    """RTN 4-bit (or 8-bit) quantization of a [K, N] float32 array with ONNX Runtime's kernel.

    The kernel (the one `onnxruntime.quantization.matmul_nbits_quantizer` calls) writes into
    the arrays it is given, so they must be contiguous and of the exact dtypes. Symmetric
    scales are max/-8 (8 bits: max/-128) of the value with the largest magnitude (its sign
    kept); asymmetric ranges include zero, scale (max - min)/15 (8 bits: /255).
    """
    from onnxruntime.capi import _pybind_state

    kernel = getattr(_pybind_state, f"quantize_matmul_{bits}bits")
    k, n = array.shape
    k_blocks = -(-k // block_size)
    packed = np.zeros((n, k_blocks, block_size * bits // 8), dtype=np.uint8)
    scales = np.zeros((n, k_blocks), dtype=np.float32)
    zero_points = np.zeros((n, -(-k_blocks * bits // 8)), dtype=np.uint8)
    for a in range(0, n, _COLUMNS):  # columns are independent: one [K, _COLUMNS] copy at a time
        b, part = min(n, a + _COLUMNS), np.ascontiguousarray(array[:, a : a + _COLUMNS], np.float32)
        kernel(packed[a:b], part, scales[a:b], zero_points[a:b], block_size, b - a, k, symmetric)
    return Int4Weight(packed, scales, None if symmetric else zero_points, k, n, block_size, bits)


def blocks_of_k(array: np.ndarray, block_size: int) -> np.ndarray:
    """A [K, N] array zero-padded to whole blocks of K, as float32 [k_blocks, block_size, N]."""
    k, n = array.shape
    k_blocks = -(-k // block_size)
    padded = np.zeros((k_blocks * block_size, n), dtype=np.float32)
    padded[:k] = array
    return padded.reshape(k_blocks, block_size, n)


def reproduces(rounded: Int4Weight, array: np.ndarray) -> bool:
    """Whether `rounded` gives the [K, N] `array` back within 1 % of a step in every block."""
    error = np.abs(rounded.dequantized().T - array)  # [K, N]
    worst = blocks_of_k(error, rounded.block_size).max(axis=1)  # [k_blocks, N]
    return bool(np.all(worst <= 0.01 * np.abs(rounded.scales.T) + 1e-12))  # scales may be < 0


def join_columns(parts: list[Int4Weight]) -> Int4Weight:
    """One weight of the output columns of `parts`, in order (every array is [N, ...])."""
    first = parts[0]
    if len(parts) == 1:
        return first
    zero_points = (
        None if first.zero_points is None else np.concatenate([p.zero_points for p in parts])
    )
    return Int4Weight(
        np.concatenate([p.packed for p in parts]),
        np.concatenate([p.scales for p in parts]),
        zero_points,
        first.k,
        sum(p.n for p in parts),
        first.block_size,
        first.bits,
    )


def quantize_minmax(
    array: np.ndarray, block_size: int, symmetric: bool, bits: int = 4
) -> Int4Weight:
    """Block quantization of a [K, N] float32 array on the grid GGUF's legacy formats use.

    Asymmetric (Q4_1 / Q8_1): scale (max - min) / (2^bits - 1) and a *float* zero point
    -min / scale (float16), so each block's own min and max are grid points (an integer zero
    point moves the grid by up to half a step); MatMulNBits takes float16 zero points.
    Symmetric (Q4_0-like / Q8_0): scale absmax / (2^(bits-1) - 1), codes ±(2^(bits-1) - 1)
    around the implicit zero point. A weight that was dequantized from such blocks (a GGUF
    source) is reproduced exactly, up to float rounding.
    """
    k, n = array.shape
    k_blocks = -(-k // block_size)
    if k % block_size:
        padded = np.full((k_blocks * block_size, n), np.nan, dtype=np.float32)
        padded[:k] = array
    else:
        padded = np.asarray(array, dtype=np.float32)
    blocks = np.ascontiguousarray(padded.T).reshape(n, k_blocks, block_size)  # NaN past K
    levels, half = (1 << bits) - 1, 1 << (bits - 1)
    if symmetric:
        scales = np.nanmax(np.abs(blocks), axis=-1) / (half - 1)
        scales = np.where(scales > 0, scales, 1.0)  # an all-zero block: code `half` is 0
        codes = np.round(blocks / scales[..., None]) + half
        zero_points = None
    else:
        low, high = np.nanmin(blocks, axis=-1), np.nanmax(blocks, axis=-1)
        scales = (high - low) / levels
        safe = np.where(scales > 0, scales, 1.0)
        codes = np.round((blocks - low[..., None]) / safe[..., None])
        # stored as float16 (MatMulNBits takes them with float32 scales): 0.5 bit per weight
        # at block 32 instead of 1, off by at most ~0.004 of a step for zero points up to 15
        zero_points = (-low / safe).astype(np.float16).astype(np.float32)
        scales = np.where(scales > 0, scales, 1.0)  # a constant block: code 0 is its value
    codes = np.clip(np.nan_to_num(codes, nan=half), 0, levels).astype(np.uint8)
    packed = codes if bits == 8 else codes[..., 0::2] | (codes[..., 1::2] << 4)
    return Int4Weight(
        np.ascontiguousarray(packed, dtype=np.uint8),
        scales.astype(np.float32),
        zero_points,
        k,
        n,
        block_size,
        bits,
    )


def _pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [N, k_blocks, B] codes as MatMulNBits' packed B (4 bits: low nibble first)."""
    packed = codes if bits == 8 else codes[..., 0::2] | (codes[..., 1::2] << 4)
    return np.ascontiguousarray(packed, dtype=np.uint8)


def integer_grid(array: np.ndarray, block_size: int, bits: int = 4) -> Int4Weight | None:
    """The [K, N] float32 `array` as `bits`-bit blocks with integer zero points, if every block
    of `block_size` along K is exactly (c − z)·s for codes c and a zero point z in
    0..2^bits − 1 (within 1 % of a step); else None.

    A block spanning `span` steps between its min and max has s = (max − min)/span; the widest
    span whose steps hold every value and leave room for an integer z is taken (the zero point
    8 where it fits, so a symmetric source stays symmetric: no zero points at all). A weight
    dequantized from GPTQ, AWQ or compressed-tensors int4 groups (fdec.frontend.prequantized)
    is found again exactly: codes need not reach 0 and 15 in a block, which the min/max grids
    (`quantize_minmax`, ONNX Runtime's RTN) assume. K must be whole blocks."""
    k, n = array.shape
    if k % block_size or not n:
        return None
    levels, center = (1 << bits) - 1, 1 << (bits - 1)
    blocks = np.ascontiguousarray(array.T, dtype=np.float32).reshape(n, k // block_size, -1)
    low, high = blocks.min(axis=-1), blocks.max(axis=-1)
    # A constant block: code z ± 1 (or z itself for zeros) at scale |value|
    scales = np.where(low == 0, 1.0, np.abs(low)).astype(np.float32)
    zeros = np.full(low.shape, center, dtype=np.int64)
    todo = high > low
    for span in range(levels, 0, -1):
        if not todo.any():
            break
        index = np.nonzero(todo)
        step = (high[index] - low[index]) / span
        steps = blocks[index] / step[:, None]
        whole = np.all(np.abs(steps - np.rint(steps)) <= 0.01, axis=-1)
        bottom = np.rint(low[index] / step)  # the lowest value's code minus z
        z_min, z_max = np.maximum(-bottom, 0), np.minimum(levels - bottom - span, levels)
        fits = whole & (z_min <= z_max)
        chosen = tuple(axis[fits] for axis in index)
        scales[chosen] = step[fits]
        zeros[chosen] = np.clip(center, z_min[fits], z_max[fits])
        todo[chosen] = False
    if todo.any():
        return None
    steps = np.rint(blocks / scales[..., None]).astype(np.int64)  # codes minus zero points
    # Where z is not 8, the block may still be symmetric: with a negative scale (ONNX Runtime's
    # RTN writes max/-8, codes -8..7 around 8, which a positive step sees as -7..8), or on a
    # finer grid than the source's (every other level used): take every m-th step, m < 0
    # flipping the sign, where that puts z at 8. Only an m dividing every step of a block can
    # coarsen it: blocks whose steps share no factor (most asymmetric ones) try m = -1 alone,
    # so an 8-bit weight is not swept over 510 values of m.
    divisor = np.gcd.reduce(np.abs(steps), axis=-1)
    for m in (f * s for f in range(1, levels + 1) for s in (1, -1) if f * s != 1):
        off = np.nonzero((zeros != center) & (divisor % abs(m) == 0))
        if not off[0].size:
            if not np.any((zeros != center) & (divisor > abs(m))):
                break
            continue
        coarse = steps[off]
        fits = np.all(coarse % m == 0, axis=-1)
        ends = np.stack([coarse.min(axis=-1) // m, coarse.max(axis=-1) // m])
        fits &= (ends.min(axis=0) + center >= 0) & (ends.max(axis=0) + center <= levels)
        chosen = tuple(axis[fits] for axis in off)
        steps[chosen] //= m
        scales[chosen] *= m
        zeros[chosen] = center
    codes = np.clip(steps + zeros[..., None], 0, levels).astype(np.uint8)
    zero_points = None
    if np.any(zeros != center):
        z = zeros.astype(np.uint8)
        if bits == 4:
            z = np.pad(z, ((0, 0), (0, z.shape[1] % 2)))
            z = z[:, 0::2] | (z[:, 1::2] << 4)
        zero_points = np.ascontiguousarray(z, dtype=np.uint8)
    return Int4Weight(_pack_codes(codes, bits), scales, zero_points, k, n, block_size, bits)


_PROBE_COLUMNS = 16  # a weight off every grid fails on these, before a whole chunk is tried


def find_grid(
    array: np.ndarray, rounders: list[tuple[str, int, bool]], bits: int
) -> Int4Weight | None:
    """The [K, N] `array` on the first grid of `rounders` — (kind, block size, symmetric),
    kind "integer" (`integer_grid`) or "minmax" (`quantize_minmax`) — that reproduces it
    within 1 % of a step in every block; None when none does.

    Output columns are independent, so they are tried `_COLUMNS` at a time after a probe of
    the first few, and the first block off a grid ends that try: an 8B's vocabulary table
    checked whole took four 2.1 GB float copies, and a weight that is on no grid costs the
    probe."""
    n = array.shape[1]

    def on_grid(part: np.ndarray, kind: str, block: int, symmetric: bool) -> Int4Weight | None:
        part = np.ascontiguousarray(part)
        if kind == "integer":
            rounded = integer_grid(part, block, bits)
        else:
            rounded = quantize_minmax(part, block, symmetric, bits)
        return rounded if rounded is not None and reproduces(rounded, part) else None

    for kind, block, symmetric in rounders:
        if (
            n > _PROBE_COLUMNS
            and on_grid(array[:, :_PROBE_COLUMNS], kind, block, symmetric) is None
        ):
            continue
        parts = []
        for start in range(0, n, _COLUMNS):
            rounded = on_grid(array[:, start : start + _COLUMNS], kind, block, symmetric)
            if rounded is None:
                break
            parts.append(rounded)
        else:
            return join_columns(parts)
    return None
