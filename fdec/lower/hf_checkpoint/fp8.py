"""FP8 weights (quantize-fp8, read back by `read.fp8_of`) written in compressed-tensors'
float-quantized format, which vLLM serves (CompressedTensorsW8A8Fp8 on Ada / Hopper and newer,
CompressedTensorsW8A16Fp8 for weight-only layers) and fdec reads back (fdec.frontend.
fp8_checkpoint).

The graph holds, per weight (passes/quantize_fp8.py):

    W_q FLOAT8E4M3FN [K, N] ─ DequantizeLinear(axis 1, scale s_w [N])

and a W8A8 layer reads its activation through QuantizeLinear → DequantizeLinear with one static
scale s_a (FLOAT8E4M3FN, saturating). compressed-tensors stores, per module (torch layout [out,
in] = [N, K]): `weight` float8_e4m3fn [N, K] (the graph's codes, transposed), `weight_scale`
float32 [N, 1] (s_w) and, W8A8 only, `input_scale` float32 [1] (s_a: x / s_a rounded to E4M3,
as QuantizeLinear computes it). W8A8 and weight-only layers are two config groups naming their
modules where both occur (`pack.schemes_checkpoint`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fdec.lower.hf_checkpoint.pack import schemes_checkpoint
from fdec.lower.hf_checkpoint.read import Fp8

__all__ = ["FP8_FORMAT", "fp8_checkpoint"]

FP8_FORMAT = "float-quantized"


def _arguments(strategy: str) -> dict[str, Any]:
    """compressed-tensors' QuantizationArgs of static FP8 E4M3: weights per channel, activations
    per tensor."""
    return {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "strategy": strategy,
        "dynamic": False,
        "group_size": None,
        "block_structure": None,
        "actorder": None,
    }


def _tensors(module: str, weight: Fp8) -> dict[str, np.ndarray]:
    tensors = {
        f"{module}.weight": weight.codes,
        f"{module}.weight_scale": weight.scales.reshape(-1, 1).astype(np.float32),
    }
    if weight.input_scale is not None:
        tensors[f"{module}.input_scale"] = np.array([weight.input_scale], np.float32)
    return tensors


def fp8_checkpoint(
    quantized: dict[str, Fp8], ignore: list[str]
) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]]:
    """The tensors of every FP8 module, the config's quantization_config, the report's."""
    return schemes_checkpoint(
        quantized, FP8_FORMAT, _tensors, _arguments("channel"),
        lambda scheme: _arguments("tensor") if scheme == "FP8" else None,
        ignore, num_bits=8,
    )  # fmt: skip
