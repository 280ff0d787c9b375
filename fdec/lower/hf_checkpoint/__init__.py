"""Lowering to a Hugging Face checkpoint (config.json + model.safetensors) for serving engines.

The graph's initializers are mapped back to the source model's parameter names: weights with
a role go through `ModelSpec.weights` (the family's parameter patterns name the role of each
HF parameter), every other parameter (norms, biases, position embeddings) kept its HF name in
the graph. The expected names, shapes and module types (`nn.Linear`, GPT-2's `Conv1D`, ...)
come from the HF model class built on the meta device from the written config, so the
checkpoint holds exactly the keys `from_pretrained` looks for. Linear weights read by MatMul
as [in, out] are transposed back to torch's [out, in]; Conv1D weights stay [in, out].

Weight-only int4 (`quantize-int4`, either backend) and int8 (`quantize-int8-wo`) are written
in compressed-tensors' "pack-quantized" W4A16 / W8A16 format (what llm-compressor writes),
which vLLM loads (CompressedTensorsWNA16: Marlin/Machete kernels, zero points too), as does
transformers with the `compressed-tensors` package (b bits, p = 32 / b values a word):

- `<module>.weight_packed`: int32 [out, ceil(in / p)]; value i of a row sits in bits
  b·i..b·i+b-1 of the little-endian words, stored as `q + 2^(b-1)` for the signed code q;
- `<module>.weight_scale`: [out, in / group_size] in the scales' float dtype;
- `<module>.weight_shape`: int64 [out, in];
- `<module>.weight_zero_point` (asymmetric only): int32 [ceil(out / p), in / group_size],
  the signed zero points packed the same way along the output dimension;

dequantized as `(q - zero_point) * scale`, which equals MatMulNBits' `(code - zp) * scale`
and DequantizeLinear's `(x - zp) * scale` exactly (q = code - 2^(b-1), the same for zp). One
width per checkpoint: weights of another (an int4 recipe's 8-bit lm_head) are written in float.
Only `nn.Linear` modules can be packed: a quantized weight of another module (GPT-2's
Conv1D) is written dequantized, in float, and listed in the config's `ignore`. So is a
quantized lm_head unless `pack_lm_head=True`: vLLM before PR #37291 (2026) and SGLang load a
packed lm_head as an unquantized embedding (an error, or silently garbage logits), and
llm-compressor's own recipes leave it out. Dequantized weights hold exactly the values the
ONNX graph computes, so the checkpoint's numerics equal the ONNX build's either way.

Transformers + compressed-tensors 0.20 cannot load *asymmetric* pack-quantized checkpoints
with the default `from_pretrained` (it builds zero points unpacked on the meta device:
llm-compressor issue #1618); `quantization_config=CompressedTensorsConfig(dequantize=True)`
loads them, and vLLM reads the packed zero points.
NVFP4 (`quantize-fp4`: fp4 = W4A4, fp4-wo) is written in compressed-tensors'
"nvfp4-pack-quantized" format, which vLLM serves (FP4 GEMMs on Blackwell, Marlin W4A16
elsewhere): the graph's E2M1 codes and FP8 block scales byte for byte, the tensor scales
inverted, W4A4 and W4A16 layers as two config groups (`nvfp4`). A build whose activations are
scaled by an inserted Mul (SmoothQuant / AWQ scales that did not fold into a norm) is refused:
`--emit hf-checkpoint` makes quantize-fp4 smooth only where the scales fold.
Dynamic int8 (`quantize-int8`) has no format serving engines load with the same numerics and
is refused with a UsageError.

Modules: supported (the --quantize values it takes), expected (what the HF class expects), read
(weights back from the graph), pack (compressed-tensors' int formats), nvfp4 (its NVFP4
format), write (the checkpoint).
"""

from __future__ import annotations

from fdec.lower.hf_checkpoint.supported import SUPPORTED_QUANTIZE, check_quantize, check_source
from fdec.lower.hf_checkpoint.write import CHECKPOINT_DIR, SAFETENSORS_FILE, write_hf_checkpoint

__all__ = [
    "CHECKPOINT_DIR",
    "SAFETENSORS_FILE",
    "SUPPORTED_QUANTIZE",
    "check_quantize",
    "check_source",
    "write_hf_checkpoint",
]
