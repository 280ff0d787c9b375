"""NVFP4 weights (quantize-fp4, read back by `read.nvfp4_of`) written in compressed-tensors'
nvfp4-pack-quantized format, which vLLM serves (CompressedTensorsW4A4Fp4 on Blackwell,
CompressedTensorsW4A16Fp4 — Marlin — where there are no FP4 tensor cores).

The graph holds, per weight (passes/quantize_fp4.py):

    W_q FLOAT4E2M1 [K, N] ─ DequantizeLinear(axis 0, block 16, scale = DequantizeLinear(s_w, g_w))

with s_w FLOAT8E4M3FN [K/16, N] and g_w the fp32 tensor scale: W = E2M1(W_q) · s_w · g_w. A W4A4
layer reads an activation quantized at run time by `trt::TRT_FP4DynamicQuantize(X, g_a)`.
compressed-tensors stores, per module (torch layout [out, in] = [N, K]):

- `weight_packed`: uint8 [N, K/2], two E2M1 codes a byte, the first in the low nibble (sign in
  bit 3: the codes ONNX's FLOAT4E2M1 holds, unchanged);
- `weight_scale`: float8_e4m3fn [N, K/16], the block scales, unchanged;
- `weight_global_scale`: float32 [1] = 1 / g_w (its dequantization divides by it);
- `input_global_scale` (W4A4 only): float32 [1] = 1 / g_a, the activations' tensor scale.

So the codes and block scales are the graph's bytes; only the tensor scales are inverted.
W4A4 and W4A16 layers of one build are two config groups of one format; where both occur each
group names its modules (`pack.schemes_checkpoint`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fdec.lower.hf_checkpoint.pack import pack_nibbles, schemes_checkpoint
from fdec.lower.hf_checkpoint.read import Nvfp4
from fdec.passes.quantize_fp4 import FP4_BLOCK

__all__ = ["NVFP4_FORMAT", "nvfp4_checkpoint"]

NVFP4_FORMAT = "nvfp4-pack-quantized"


def _tensors(module: str, weight: Nvfp4) -> dict[str, np.ndarray]:
    tensors = {
        f"{module}.weight_packed": pack_nibbles(weight.codes),
        f"{module}.weight_scale": weight.block_scales,
        f"{module}.weight_global_scale": np.array([1 / weight.global_scale], np.float32),
    }
    if weight.input_scale is not None:
        tensors[f"{module}.input_global_scale"] = np.array([1 / weight.input_scale], np.float32)
    return tensors


def _arguments(dynamic: bool | str) -> dict[str, Any]:
    """compressed-tensors' QuantizationArgs of NVFP4 weights (static) or activations ("local":
    per block at run time under the stored global scale)."""
    return {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "group_size": FP4_BLOCK,
        "strategy": "tensor_group",
        "dynamic": dynamic,
        "actorder": None,
        "block_structure": None,
        # FP8 block scales: without it compressed-tensors' reference forward (transformers)
        # keeps the activations' run-time block scales in float, unlike TensorRT and vLLM.
        "scale_dtype": "torch.float8_e4m3fn",
        "zp_dtype": "torch.float8_e4m3fn",
    }


def nvfp4_checkpoint(
    quantized: dict[str, Nvfp4], ignore: list[str]
) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]]:
    """The packed tensors of every NVFP4 module, the config's quantization_config, the
    report's."""
    return schemes_checkpoint(
        quantized, NVFP4_FORMAT, _tensors, _arguments(False),
        lambda scheme: _arguments("local") if scheme == "NVFP4" else None,
        ignore, num_bits=4, group_size=FP4_BLOCK,
    )  # fmt: skip
