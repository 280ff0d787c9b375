"""A written NVFP4 checkpoint loaded the way serving code reads it, in fp32 (for checks).

transformers + compressed-tensors load an nvfp4-pack-quantized checkpoint and dequantize its
weights at the first forward, in bf16 (`unpack_fp4_from_uint8`'s default), which an fp32 model
then refuses (`expected m1 and m2 to have the same dtype`). To compare the checkpoint with the
build it came from, `load_fp32` decompresses the model and dequantizes each NVFP4 weight again
with compressed-tensors' own functions in fp32; its activations keep compressed-tensors' own
run-time FP4 quantization (W4A4 layers). Needs `pip install 'fdec[hf]'`.
"""

from __future__ import annotations

import pathlib
from typing import Any

__all__ = ["load_fp32"]


def load_fp32(folder: str | pathlib.Path) -> tuple[Any, dict[str, Any]]:
    """(transformers model of `folder` with every NVFP4 weight in fp32, loading info)."""
    import torch
    import transformers
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from safetensors.torch import load_file

    from fdec.lower.hf_checkpoint.write import SAFETENSORS_FILE

    folder = pathlib.Path(folder)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.compressor.decompress_model(model)
    tensors = load_file(folder / SAFETENSORS_FILE)
    modules = dict(model.named_modules())
    for name, packed in tensors.items():
        if not name.endswith(".weight_packed") or packed.dtype != torch.uint8:
            continue  # int formats pack into int32 and load in the model's dtype
        module = name.rpartition(".")[0]
        rows, columns = packed.shape
        modules[module].weight.data = dequantize(
            x_q=unpack_fp4_from_uint8(packed, rows, 2 * columns, dtype=torch.float32),
            scale=tensors[f"{module}.weight_scale"].float(),
            args=modules[module].quantization_scheme.weights,
            global_scale=tensors[f"{module}.weight_global_scale"],
            dtype=torch.float32,
        )
    return model.eval(), info
