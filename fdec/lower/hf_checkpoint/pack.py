"""compressed-tensors' pack-quantized W4A16 / W8A16 format: int4 or int8 weights packed into int32 words, and the config naming it (and every format's: `checkpoint_config`, `schemes_checkpoint`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fdec.lower.hf_checkpoint.read import Blocked

__all__ = [
    "PACK_FORMAT",
    "checkpoint_config",
    "pack_nibbles",
    "pack_weight",
    "quantization_config",
    "schemes_checkpoint",
]

PACK_FORMAT = "pack-quantized"


def _pack_int32(unsigned: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [rows, cols] of 0..2**bits - 1 → int32 [rows, ceil(cols · bits / 32)], value i at
    bits·i.. of its word (4 bits: two to a byte, low nibble first; 8 bits: a byte each)."""
    rows, cols = unsigned.shape
    per = 32 // bits
    padded = np.zeros((rows, -(-cols // per) * per), dtype=np.uint8)
    padded[:, :cols] = unsigned
    if bits == 4:
        pairs = padded.reshape(rows, -1, 2)
        padded = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
    return np.ascontiguousarray(padded).view("<i4").astype(np.int32)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 [rows, cols] of 0..15 (cols a multiple of 8) → uint8 [rows, cols / 2], two a byte,
    the first in the low nibble: `_pack_int32`'s bytes (NVFP4's weight_packed)."""
    return _pack_int32(codes, 4).view(np.uint8)


def _regroup(blocks: np.ndarray, block_size: int, group_size: int, k: int) -> np.ndarray:
    """Per-block values [N, k_blocks] as per-group values [N, k / group_size]."""
    return np.repeat(blocks, block_size // group_size, axis=1)[:, : k // group_size]


def pack_weight(module: str, weight: Blocked, group_size: int, symmetric: bool) -> dict:
    n, k = weight.shape
    tensors = {
        f"{module}.weight_packed": _pack_int32(weight.codes, weight.bits),
        f"{module}.weight_scale": np.ascontiguousarray(
            _regroup(weight.scales, weight.block_size, group_size, k)
        ),
        f"{module}.weight_shape": np.array([n, k], dtype=np.int64),
    }
    if not symmetric:
        zero_points = _regroup(weight.zero_points, weight.block_size, group_size, k)
        tensors[f"{module}.weight_zero_point"] = np.ascontiguousarray(
            _pack_int32(np.ascontiguousarray(zero_points.T), weight.bits).T
        )
    return tensors


def checkpoint_config(
    fmt: str,
    groups: list[tuple[list[str], dict[str, Any], dict[str, Any] | None]],
    ignore: list[str],
) -> dict[str, Any]:
    """compressed-tensors' QuantizationConfig of a checkpoint in format `fmt`: one config group
    per (targets, the weights' QuantizationArgs, the input activations' or None)."""
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {
            f"group_{index}": {
                "targets": targets,
                "weights": weights,
                "input_activations": inputs,
                "output_activations": None,
                "format": fmt,
            }
            for index, (targets, weights, inputs) in enumerate(groups)
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def schemes_checkpoint(
    quantized: dict[str, Any],
    fmt: str,
    tensors_of: Callable[[str, Any], dict[str, np.ndarray]],
    weights: dict[str, Any],
    inputs_of: Callable[[str], dict[str, Any] | None],
    ignore: list[str],
    **described: Any,
) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]]:
    """A checkpoint whose modules each have a scheme (`.scheme`: NVFP4 / NVFP4A16, FP8 /
    FP8A16) in one format: (every module's `tensors_of`, the quantization_config, the report's
    record with `described`). One config group per scheme, its weights' QuantizationArgs
    `weights` and its input activations' `inputs_of(scheme)`; its targets the class "Linear"
    where one scheme holds every module, else each group names its modules (vLLM matches a fused
    qkv_proj / gate_up_proj by its parts' names; a "Linear" target would pull every fused layer
    into one group)."""
    tensors: dict[str, np.ndarray] = {}
    by_scheme: dict[str, list[str]] = {}
    for module, weight in quantized.items():
        tensors.update(tensors_of(module, weight))
        by_scheme.setdefault(weight.scheme, []).append(module)
    groups = [
        (["Linear"] if len(by_scheme) == 1 else sorted(modules), weights, inputs_of(scheme))
        for scheme, modules in sorted(by_scheme.items())
    ]
    report = {
        "method": "compressed-tensors",
        "format": fmt,
        **described,
        "schemes": {scheme: len(modules) for scheme, modules in sorted(by_scheme.items())},
        "graph_operators": ["DequantizeLinear"],
        "ignore": ignore,
    }
    return tensors, checkpoint_config(fmt, groups, ignore), report


def quantization_config(
    group_size: int, symmetric: bool, ignore: list[str], bits: int = 4
) -> dict[str, Any]:
    """compressed-tensors' QuantizationConfig of a W4A16 (W8A16) group-quantized checkpoint."""
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "group_size": group_size,
        "strategy": "group",
        "dynamic": False,
        "actorder": None,
        "block_structure": None,
    }
    return checkpoint_config(PACK_FORMAT, [(["Linear"], weights, None)], ignore)
