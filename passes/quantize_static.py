"""Static quantization passes for GPU engines: FP8 E4M3 and SmoothQuant INT8, as standard ONNX QDQ.

Both passes rewrite the MatMul/Gemm nodes that read a weight the ModelSpec names (the same
sites, found by the same helpers, as fdec.passes.quantize) into explicit-quantization QDQ.
QuantizeInt8StaticPass lives here; QuantizeFp8Pass in fdec.passes.quantize_fp8, their shared
base in fdec.passes.static_qdq and GPTQ in fdec.passes.gptq (all importable from here):

    A ─ QuantizeLinear ─ DequantizeLinear ─┐
                          W_q ─ DequantizeLinear(axis=1) ─ MatMul (─ Add bias, for a Gemm)

Weights are stored quantized ([K, N] FLOAT8E4M3FN or INT8 initializers, one scale per output
channel N); each activation gets one static per-tensor scale from calibration, shared by
every weight it multiplies (q/k/v share one, gate/up share one). TensorRT reads this form
directly (explicit quantization). ONNX Runtime's CPU provider runs it at graph optimization
"basic" (DESIGN.md), which is how these passes are verified. onnxruntime 1.32 here also runs
it at "all" with the same logits (FP8 QDQ is not fused; int8 activations read by one MatMul
are fused into MatMulIntegerToFloat), but only "basic" is relied on.

Calibration: give either `stats` (from fdec.calibrate.collect_activation_stats on the model
exactly as this pass will see it, keyed by tensor name) or `batches` (token id arrays from
fdec.calibrate.calibration_batches), in which case the pass calibrates the model it is given.
Neither is a plain option: the report shows them as counts. A pass built without either
(`needs_calibration`) is completed with `dataclasses.replace(pass_, batches=...)` once the
tokenizer is at hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from fdec.passes.gptq import gptq
from fdec.passes.quantize_common import check_alpha
from fdec.passes.quantize_fp8 import QuantizeFp8Pass
from fdec.passes.quantize_int8 import quantize_int8
from fdec.passes.smoothquant import (
    capture_rows,
    divide_activation,
    insert_after_producer,
    search_alpha,
    smoothing_factors,
)
from fdec.passes.static_qdq import StaticQuantizePass, zero_point
from fdec.pipeline import Tolerance
from fdec.targets import Precision

__all__ = ["QuantizeFp8Pass", "QuantizeInt8StaticPass", "gptq"]

_INT8_MAX = 127  # symmetric int8: ±127, zero point 0
_INT8_OPSET = 13  # per-axis DequantizeLinear


@dataclasses.dataclass(eq=False)
class QuantizeInt8StaticPass(StaticQuantizePass):
    """Static INT8 QDQ with SmoothQuant for GPU engines (TensorRT explicit quantization).

    For each activation X multiplied by weights W (one or several sharing X), per input
    channel j: s_j = max|X_j|^α / max|W_j|^(1-α) (max|W_j| over every weight sharing X;
    s_j = 1 where either is 0; clamped to [1e-5, 1e5]). X·W = (X/s)·(s·W), so:

    - W's rows are multiplied by s before quantization;
    - 1/s is **folded** into the op producing X when X feeds only these weights and that op is
      a norm's per-channel scale: a `Mul` by a constant [K] vector (the traced RMSNorm weight
      multiply) or the scale (and bias) of LayerNormalization, RMSNormalization and ORT's
      (Skip)SimplifiedLayerNormalization / SkipLayerNormalization, possibly through Reshapes
      that keep the last axis. In a Llama that is q/k/v (input norm) and gate/up (post-attention
      norm). A norm weight read elsewhere too is copied, not changed.
    - otherwise an explicit `Mul` by 1/s is **inserted** on X (in a Llama: o_proj, down_proj
      and the lm_head). `alpha=None` turns smoothing off (plain static int8).

    α is the migration strength: 1 moves all of X's channel ranges into W, 0 moves all of W's
    into X (s = 1/max|W_j|, which makes LLM activation outliers worse: it is not "off").
    SmoothQuant's default 0.5 suits OPT/BLOOM; on SmolLM2 0.75–0.85 is best (see tolerance).

    Then weights are quantized per output channel, symmetric int8 (±127, stored as INT8 [K, N],
    `DequantizeLinear(axis=1)`), and each smoothed activation per tensor, symmetric int8 with
    scale max_j(max|X_j| / s_j) / 127 — the exact absmax of X/s over the calibration data.
    """

    name = "quantize-int8-static"
    qdq_precision = "int8"
    fusable = False  # fuse-attention is not yet verified on its graphs
    family = "quantize"
    summary = "static int8 QDQ with SmoothQuant (per-channel weights, calibrated activations)"
    # Measured against PyTorch on 128 held tokens, ORT CPU at "basic", calibrated on the
    # built-in corpus (16 × 128 tokens), as max logit error / top-1 agreement:
    #   tests' tiny llama: α 0.5: 0.13 / 0.92; α 0: 0.19 / 0.88; no smoothing: 0.18 / 0.88;
    #   tiny gpt2: α 0.5: 0.08 / 0.93; α 0: 0.10 / 0.91; no smoothing: 0.11 / 0.93;
    #   SmolLM2-135M (perplexity 54.0): α 0.5: 12.0 / 0.66, ppl 67.7; α 0.6: 59.6; α 0.7: 56.2;
    #   α 0.75: 6.9 / 0.81, ppl 54.8; α 0.8: 5.7 / 0.82, ppl 56.3; α 0.85: 8.2 / 0.85, ppl 53.5;
    #   α 0.9: 58.5; α 1: 61.6; α 0: 40.9 / 0.18, ppl 3,136; no smoothing: 22.3 / 0.41, ppl 175.
    # Working settings stay far inside the bounds; α 0 and no smoothing on a real LLM fail
    # them, as they should. Finer quality is gated on perplexity by the pipeline.
    tolerance = Tolerance(max_abs_error=25.0, min_top1_agreement=0.45)

    alpha: float | None = dataclasses.field(default=0.5, kw_only=True)
    # α per activation, chosen from these by the group's output error on calibration rows
    # (`fdec.passes.smoothquant.search_alpha`); empty: `alpha` everywhere.
    alpha_search: tuple[float, ...] = dataclasses.field(default=(), kw_only=True)
    # Activation range clip factors tried at the chosen α (1.0 = the calibrated absmax).
    clip_search: tuple[float, ...] = dataclasses.field(default=(), kw_only=True)
    search_rows: int = dataclasses.field(default=512, kw_only=True)

    precision_of = Precision.INT8
    _cpu_fix = "use quantize-int8 (dynamic int8, run-time activation scales) for the CPU"
    _opset = _INT8_OPSET

    def __post_init__(self) -> None:
        super().__post_init__()
        self.alpha_search = tuple(float(a) for a in self.alpha_search)
        self.clip_search = tuple(float(c) for c in self.clip_search)
        check_alpha(
            self.name, self.alpha,
            "use 0.5 (SmoothQuant's default; higher moves more range into the weights), "
            "or None for no smoothing",
        )  # fmt: skip

    def _extra_stats(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "smoothing_folded": 0,
            "smoothing_inserted": 0,
            "searched": {},  # activation → [α, clip, relative output error]
        }

    def smoothing_factors(self, group_weights: Sequence[np.ndarray], channel_absmax: np.ndarray):
        """s [K] (float32) for activation channel ranges and the [K, N] weights sharing them."""
        assert self.alpha is not None
        return smoothing_factors(self.alpha, group_weights, channel_absmax)

    def _prepare(self, model, groups, stats) -> None:
        """Capture calibration rows of each activation when α or the clip is searched."""
        self._rows: dict[str, np.ndarray] = {}
        if not (self.alpha_search or self.clip_search) or self.alpha is None or not groups:
            return
        assert self.batches is not None
        names = [g.activation.name for g in groups if not self._weight_only(model, g)]
        self._rows = capture_rows(model, self.batches, names, max_rows=self.search_rows)

    def _rewrite(self, model, group, found, taken, stats) -> bool:
        graph = model.graph
        dtype = group.dtype
        source = group.activation
        if self._weight_only(model, group):
            return self._rewrite_weight_only(model, group, taken, stats)
        peak = found.absmax
        scale_rows: np.ndarray | None = None
        if self.alpha is not None:
            alpha, clip = self.alpha, 1.0
            rows = self._rows.get(source.name)
            if rows is not None:
                searched = search_alpha(
                    rows, [w.array for w in group.weights], found.channel_absmax,
                    alphas=self.alpha_search or (self.alpha,), default=self.alpha,
                    activation="static", clips=self.clip_search or (1.0,),
                )  # fmt: skip
                alpha, clip = searched.alpha, searched.clip
                stats["searched"][source.name] = [alpha, clip, round(searched.error, 6)]
            s = smoothing_factors(alpha, [w.array for w in group.weights], found.channel_absmax)
            scale_rows = s
            peak = clip * float(np.max(found.channel_absmax.astype(np.float64) / s))
            source, folded = divide_activation(graph, group, s, taken)
            stats["smoothing_folded" if folded else "smoothing_inserted"] += 1
        zero = zero_point(graph, ir.DataType.INT8, taken)
        nodes, dequantized = self._activation_qdq(
            graph, source, peak / _INT8_MAX, zero, dtype, taken
        )
        insert_after_producer(graph, source, nodes)
        for weight in group.weights:
            array = weight.array if scale_rows is None else weight.array * scale_rows[:, None]
            if weight.gathers and scale_rows is not None:  # gathered rows are divided again
                weight.row_scales = scale_rows
            codes, scales = quantize_int8(array, _INT8_MAX)
            stats["bytes_before"] += weight.value.const_value.nbytes
            stats["matmuls_quantized"] += len(weight.sites)
            stats["weights_quantized"] += 1
            stats["bytes_after"] += self._quantized_weight(
                model, weight, ir.tensor(codes), scales, dequantized, taken, "Q8"
            )
        return True
