"""Quantization passes' public home: weight-only int4 and int8 (RTN, block-wise) and dynamic int8 for the CPU.

Both passes rewrite the MatMul/Gemm nodes that read a weight the ModelSpec names (per-layer
q/k/v/qkv/o/gate/up/down/fc_in/fc_out and, unless told otherwise, the lm_head). Weights are
expected in [in, out] = [K, N] layout as MatMul's B (FoldConstantsPass folds transposes);
a weight still read through `Transpose(perm=[1, 0])`, or by `Gemm(transB=1)`, is handled too.
Each rewritten weight's role in `ModelSpec.weights` is pointed at its new quantized
initializer, and the fp32 original is removed.

The passes live in fdec.passes.quantize_int4 and fdec.passes.quantize_int8 (split by job);
this module keeps their import path.
"""

from fdec.passes.quantize_common import empty_stats, require_untied
from fdec.passes.quantize_int4 import (
    Int4Weight,
    QuantizeInt4Pass,
    QuantizeInt8WeightOnlyPass,
    quantize_int4,
)
from fdec.passes.quantize_int8 import QuantizeInt8Pass, quantize_int8

__all__ = [
    "Int4Weight",
    "QuantizeInt4Pass",
    "QuantizeInt8Pass",
    "QuantizeInt8WeightOnlyPass",
    "empty_stats",
    "quantize_int4",
    "quantize_int8",
    "require_untied",
]
