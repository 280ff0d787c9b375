"""Capacity planner: weight, KV-cache and workspace bytes of a model on a target, and what fits.

Everything is computed from the model's config.json (no weights are loaded) and the target's
data file. The formulas, stated once here and in docs/design-notes.md:

- **Weights** follow what `fdec compile` writes. Float precisions (fp32/fp16/bf16) store every
  parameter at that width, tied embeddings once. Quantized precisions store every linear
  weight (the layers' projections and the lm_head, which fdec unties for quantization) at the
  precision plus its scales: int8/fp8 one scale per output channel, int4 one scale per block
  of 32 inputs (0.5 + 2/32 bytes per weight with fp16 scales), fp4 one fp8 scale per 16. The
  token-embedding table is stored int8 per row (`quantize-embedding`), except that int4
  for ONNX Runtime keeps a tied table tied and stores it once in int4; norms, biases and
  position tables stay in float. Scales and float tensors are 2 bytes on a GPU (fp16 engines)
  and 4 bytes on the cpu target (fdec's ONNX Runtime builds keep an fp32 graph).
- **KV cache** per token: 2 (key and value) × layers × KV heads × head dim × KV dtype bytes
  (fp32 4, fp16/bf16 2, fp8/int8 1; static per-head scales are negligible). Encoders (BERT)
  have no KV cache.
- **Activation workspace** for B sequences at context S: T × (2·hidden + q_dim + 2·kv_dim +
  2·intermediate) × activation bytes, the widest set of one layer's tensors alive at once
  (residual and normed input, q/k/v, gate and up), with T = max(B, min(PREFILL_CHUNK, S))
  tokens in flight (B decoding, or one prefill chunk), plus B × vocab × 4 bytes of fp32
  logits for the last position. Activation bytes: 4 for fp32, else 2 (fp8/int8 activations
  are GEMM inputs; outputs, residual and norms stay 16-bit). Encoders process all B × S
  tokens at once and materialise B × heads × S² attention scores.
- **Memory** is the target's `memory_gb` × 1e9 bytes; a cpu target (memory_gb = 0) uses this
  machine's total RAM. `headroom` (default 10 %) is kept back for the runtime, CUDA context
  and fragmentation. A batch × context fits when weights + B·S·KV + workspace ≤ the rest.

The modules, one job each: `shape` (config.json → ModelShape), `capacity` (a target's memory
against weights + KV + workspace), `table` (`fdec plan`'s rows and table), `compile_memory`
(the peak RSS of `fdec compile` itself on this machine, and the up-front refusal),
`compile_disk` (the disk its build and scratch copies take, and the same refusal).
"""

from fdec.plan.capacity import (
    DEFAULT_CONTEXT_CAP,
    DEFAULT_HEADROOM,
    PREFILL_CHUNK,
    CapacityPlan,
    check_capacity,
    plan_capacity,
    target_memory,
    workspace_bytes,
)
from fdec.plan.shape import (
    KV_DTYPES,
    WEIGHT_FORMATS,
    ModelShape,
    WeightFormat,
    load_shape,
    shape_from_config,
)
from fdec.plan.table import plan_targets, render_table

__all__ = [
    "DEFAULT_CONTEXT_CAP",
    "DEFAULT_HEADROOM",
    "KV_DTYPES",
    "PREFILL_CHUNK",
    "WEIGHT_FORMATS",
    "CapacityPlan",
    "ModelShape",
    "WeightFormat",
    "check_capacity",
    "load_shape",
    "plan_capacity",
    "plan_targets",
    "render_table",
    "shape_from_config",
    "target_memory",
    "workspace_bytes",
]
