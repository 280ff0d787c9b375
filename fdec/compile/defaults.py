"""Recipe defaults: each value fdec's recipes use where the user sets none, with the
measurement that chose it beside it.

Defaults are chosen on the corpus' tuning split and quoted on its evaluation split, which no
choice looks at (fdec.gates; benchmarks/quality.py). fdec.compile.recipe composes the passes
from these.
"""

from __future__ import annotations

__all__ = [
    "CPU_INT8_METHOD",
    "DEFAULT_MAX_PPL_INCREASE",
    "FP4_ALPHA_SEARCH",
    "FP4_SCALE_SEARCH",
    "FP4_WEIGHT_ONLY",
    "FP4_WEIGHT_ONLY_LAYERS",
    "FP4_WEIGHT_ROUNDING",
    "FP8_WEIGHT_ONLY",
    "FP8_WEIGHT_ONLY_LAYERS",
    "FP8_WEIGHT_ROUNDING",
    "INT4_KEEP_SOURCE_GRID",
    "INT4_LM_HEAD_BITS",
    "INT4_MIXED_KEEP",
    "INT4_SOURCE_GRID_LEVELS",
    "INT4_SOURCE_GRID_ROUNDED_ZERO_POINTS",
    "INT8_DYNAMIC_ALPHA",
    "INT8_ENCODER_WEIGHT_ONLY",
    "INT8_WEIGHT_ONLY",
    "SMOOTHQUANT_ALPHA",
    "SMOOTHQUANT_ALPHA_SEARCH",
    "SMOOTHQUANT_WEIGHT_ONLY",
]

# Units --quantize int4-awq-mixed keeps in 8 bits (the most sensitive, measured per build).
# SmolLM2-135M (quality.py, 128 held tokens, fp32 54.05): keep 8 (lm_head + 7 layers) 113.6 MB
# 0.21x, -0.9 %; keep 4 (lm_head, layers 11, 29, 2) 106.2 MB 0.197x, +7.1 %; int4-awq alone
# 87.2 MB 0.16x, +17.0 %. 4 was the most that kept a tied-embedding model within 0.20x. Since
# its int4 units keep a Q4_1 source's grid as int4-awq's do (tuning split, 2,657 tokens):
# keep 4 111.2 MB 0.206x +0.25 %, keep 3 109.6 MB 0.203x +0.41 % (AWQ proper's units: keep 4
# +9.09 %); int4-awq alone 0.197x. 4 stays: none within 0.20x, and the best.
INT4_MIXED_KEEP = 4
# The lm_head (and a tied table shared with it) of int4 recipes in 8 bits: SmolLM2 int4-awq
# +17.5 % → +7.3 % perplexity at 86.8 → 100.9 MB (benchmarks/quality.py; docs/design-notes.md).
INT4_LM_HEAD_BITS = 8
# int4-awq keeps weights that already sit on a block grid of its block size (a GGUF source's
# Q4_1 / Q8_0 blocks) on that grid instead of scaling and rounding them again, written for
# MatMulNBits' fast path: uint8 zero points round(z), and the fractions' offsets (round(z) − z)·d
# as one level of extra input rows fed by the activation's block sums (quantize-int4-awq
# source_grid_*). SmolLM2-135M, tuning split (2,657 tokens, fp32 14.96; python
# benchmarks/quality.py --splits tune --recipes "int4-awq:quantize-int4-awq.OPTION=..."):
#   grid kept, offsets (8 − z)·d rounded once (1 level)       0.194x  +6.14 %  KL 0.063
#   grid kept, offsets rounded twice (2 levels)               0.200x  -0.06 %  KL 0.0038
#   grid kept, rounded zero points + fractions, 1 level       0.197x  +0.66 %  KL 0.0040 (chosen)
# AWQ's own scaling instead (keep_source_grid false, the old default): +11.11 % on the
# evaluation split at 0.187x (the README's run); float16 zero points (exact) decode ~9x slower.
INT4_KEEP_SOURCE_GRID = True
INT4_SOURCE_GRID_LEVELS = 1
INT4_SOURCE_GRID_ROUNDED_ZERO_POINTS = True
# SmoothQuant migration strength fdec uses: on SmolLM2-135M, alpha 0.75-0.85 kept perplexity
# within +1-4 % (54.0 -> 53.5-56.3) where the paper's 0.5 gave +25 % (67.7).
SMOOTHQUANT_ALPHA = 0.8
# α per activation group, searched from this grid by each group's output error on calibration
# rows (fdec.passes.smoothquant.search_alpha); SMOOTHQUANT_ALPHA is the fallback. SmolLM2-135M,
# tuning split (2,657 tokens), static int8 (h100): α 0.8 everywhere +8.56 %; searched +11.92 %;
# down_proj W8A16 (INT8_WEIGHT_ONLY) with α 0.8 +2.86 %, with α searched +1.44 %, and the
# lm_head W8A16 too +1.31 % (SMOOTHQUANT_WEIGHT_ONLY); clipping the activation ranges by the
# same search (clip_search 0.95/0.9/0.8) +1.98 %: not used. Dynamic int8 with down_proj W8A16:
# α 0.75 +1.98 %, searched +2.09 %: it keeps INT8_DYNAMIC_ALPHA.
SMOOTHQUANT_ALPHA_SEARCH = (0.4, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
SMOOTHQUANT_WEIGHT_ONLY = ("down", "lm_head")
# Layers decoders' int8 recipes keep W8A16 (int8 weights, the activation not quantized): the
# MLP's down_proj, whose input (SiLU(gate)·up) carries the widest outliers. Same size (the
# weights are int8 either way). SmolLM2-135M, tuning split: static int8 above; dynamic int8
# (α 0.75) +1.98 % with it (+4.80 % on the evaluation split without it, README before).
INT8_WEIGHT_ONLY = ("down",)
# The same before dynamic int8 (CPU): SmolLM2-135M, tied table, 128 held tokens / 2,044 other
# tokens: alpha 0.7 +5.3 % / +5.2 %, 0.75 +3.2 % / +3.7 %, 0.8 +4.6 % / +6.8 %; none +55.7 %.
INT8_DYNAMIC_ALPHA = 0.75
# Layers an encoder's dynamic int8 keeps W8A16 (int8 weights, float activation): the FFN output
# (BERT's output.dense, fed by GELU with wide outliers). all-MiniLM-L6-v2, mean-pooled
# embeddings of the corpus' tuning split (77 sentences), cosine to fp32 (mean / min): all
# W8A8 0.99709 / 0.98985; fc_out W8A16 0.99917 / 0.99814 at the same 24.2 MB; α searched per
# layer instead 0.99720 / 0.99245 (python benchmarks/quality.py --encoder minilm-l6-v2).
INT8_ENCODER_WEIGHT_ONLY = ("fc_out",)
# What `--quantize int8` (no method) means on the CPU, by model kind; on GPU targets it is
# SmoothQuant Q/DQ for TensorRT and weight-only for the ONNX Runtime CUDA model (its
# Backend.methods). Decoders: weight-only 8-bit blocks (MatMulNBits, as onnxruntime-genai's
# `-p int8`). SmolLM2-135M, tuning split (python benchmarks/quality.py --recipes
# none,int8-dynamic,int8-wo --splits tune --peers none --encoder none): int8-wo +0.1 % (top-1
# 0.956), int8-dynamic +2.0 % (0.925); decode 1.5-2.3x dynamic's, prefill 0.5-0.73x
# (benchmarks/decode.py, 2 threads, 64/512-token prompts). Encoders run whole inputs (prefill
# only): dynamic int8 (MatMulInteger). --keep-fp keeps dynamic's mixed recipe.
CPU_INT8_METHOD = {"decoder": "wo", "encoder": "dynamic"}
# FP8 weight rounding ("nearest" or "gptq": error-compensating, on calibration activations).
FP8_WEIGHT_ROUNDING = "gptq"
# Layers fp8 keeps W8A16 (int8 weights per output channel, the activation in float, as
# INT8_WEIGHT_ONLY), by kind and whole decoder layers (FP8_WEIGHT_ONLY_LAYERS: first and last).
# SmolLM2-135M, tuning split (2,657 tokens, fp32 ppl 14.959), --target h100 (tensorrt graph:
# lm_head untied), GPTQ rounding, benchmarks/data/fp8-sweep-smollm2.md (benchmarks/fp8_sweep.py);
# W8A8/W8A16 of the 211 matmuls:
#   all FP8 W8A8 (shared int8 table, onnxruntime graph, earlier)           +2.4 %
#   down                                                  181/30            +2.48 %
#   down, lm_head                                         180/31            +1.73 %
#   down, lm_head, o                                      150/61            +1.68 %
#   down, lm_head, q/k/v (gate/up, o FP8)                  90/121           +1.45 %
#   down, lm_head, o, gate/up (q/k/v FP8)                  90/121           +0.97 %
#   down, lm_head + layers 0, 29                          168/43            +1.33 % (chosen)
#   down, lm_head + layers 0, 1, 28, 29                   156/55            +1.45 %
#   down, lm_head + layers 0-2, 27-29                     144/67            +1.49 %
#   down, lm_head + layers 0, 29, activation_margin 2     168/43            +1.71 % (not used)
#   down, lm_head, GPTQ act order                         180/31            +1.90 % (not used)
# Not used: activation ranges by percentile (ppl 54 → 33,467 on held text, see quantize-fp8)
# or a margin above absmax (above): FP8 steps are relative, so a wider range only pushes values
# into subnormals; SmoothQuant before FP8: the W8A8 activations' absmax is ≤ 7× their 99.9th
# percentile (the 100-2,400× outliers are all down_proj inputs, already W8A16), so there is no
# range to move. On the GPU a W8A16 layer is a bf16 GEMM (TensorRT-RTX's inspector lists them
# as bf16): half FP8's tensor-core rate when compute-bound (prefill, large batches); the
# weights are int8 in the ONNX model either way (same size).
FP8_WEIGHT_ONLY = ("down", "lm_head")
FP8_WEIGHT_ONLY_LAYERS = (0, -1)
# Quality gate of a lossy build when the user sets none: catches broken quantization (DESIGN.md
# measured +6e7 perplexity for an overflowing int8 kernel) while admitting the 25-70 % growth
# weight-only 4-bit and dynamic int8 give a 135M model. Tighten with --max-ppl-increase.
DEFAULT_MAX_PPL_INCREASE = 1.0

# NVFP4 (--quantize fp4 = fp4-w4a4, fp4-wo), chosen on the tuning split (SmolLM2-135M, fp32
# ppl 14.959; python benchmarks/quality.py --splits tune --peers none --encoder none --recipes
# 'none,fp4:…', b200; docs/design-notes.md "NVFP4 for Blackwell"):
#   W4A4, down_proj + lm_head + first/last layers W4A16, nearest rounding    +45.2 %
#   same, GPTQ rounding                                                        +25.8 %
#   + SmoothQuant α search {0.25, 0.5, 0.75} on the W4A4 activations           +23.6 %
#   + block-scale search {0.9, 0.8}                                            +20.6 % (chosen)
#   α search {0.2, 0.35, 0.5, 0.65, 0.8}, W4A16 groups searched too (AWQ)      +21.0 %
#   block-scale search {0.95 … 0.7}, W4A16 groups searched too                 +26.5 %
#   every layer W4A4 (GPTQ, α and block-scale search)                          +35.4 %
#   fp4-wo: nearest +29.5 %, GPTQ +14.8 %, + block-scale search {0.9, 0.8} +12.3 % (chosen),
#   {0.95 … 0.7} +12.6 %, W4A16 groups α-searched (AWQ) +14.9 % (KL 0.153 → 0.141)
FP4_WEIGHT_ROUNDING = "gptq"
FP4_WEIGHT_ONLY = ("down", "lm_head")
FP4_WEIGHT_ONLY_LAYERS = (0, -1)
FP4_ALPHA_SEARCH = (0.25, 0.5, 0.75)
FP4_SCALE_SEARCH = (0.9, 0.8)
