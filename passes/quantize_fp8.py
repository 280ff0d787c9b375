"""Static FP8 E4M3 Q/DQ of the linear layers for GPUs with FP8 (QuantizeFp8Pass), with GPTQ rounding of the per-channel FP8 weights."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from fdec.errors import UsageError
from fdec.ir import FdecModel
from fdec.passes.gptq import gptq, hessians, inverse_factor
from fdec.passes.quantize_common import check_choice, check_margin
from fdec.passes.smoothquant import (
    ActivationGroup,
    insert_after_producer,
)
from fdec.passes.static_qdq import StaticQuantizePass, zero_point
from fdec.passes.weights import channel_peaks, per_channel_quantize, row_chunks, scales_of
from fdec.pipeline import Tolerance
from fdec.targets import Precision

__all__ = ["QuantizeFp8Pass"]

_FP8_MAX = 448.0  # largest finite FLOAT8E4M3FN
_FP8_OPSET = 19  # FLOAT8 types in QuantizeLinear / DequantizeLinear
_ACTIVATION_RANGES = ("absmax", "percentile")
_WEIGHT_ROUNDINGS = ("nearest", "gptq")


def _quantize_fp8(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel FP8 E4M3 of a [K, N] array: (float8 [K, N], float32 scales [N]).

    Each column's largest |w| maps to 448; an all-zero column gets scale 1.
    """
    return per_channel_quantize(array, _FP8_MAX, ml_dtypes.float8_e4m3fn, rint=False)


def _fp8_grid(array: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The FP8 codes and per-channel scales whose values [K, N] `array` is (an FP8 checkpoint's
    weights read as float: fdec.frontend.fp8_checkpoint), else None. Each column's absmax / 448
    (`_quantize_fp8`'s scales: a channel-scaled source's own) is tried, then the largest of them
    for every column (a tensor-scaled source's one scale); a block-scaled source's weights are
    on neither. Equal to float rounding: E4M3 · scale in fp32. Checked a chunk of rows at a
    time, stopping at the first that is off (a float weight's first), so a float weight costs
    one pass for its scales and one chunk."""
    peaks = channel_peaks(array)
    tensor = scales_of(peaks.max(initial=0), _FP8_MAX)
    for scales in (scales_of(peaks, _FP8_MAX), np.full(array.shape[1], tensor, np.float32)):
        if all(
            np.allclose(_codes(array[rows], scales).astype(np.float32) * scales, array[rows],
                        rtol=1e-6, atol=0)
            for rows in row_chunks(array)
        ):  # fmt: skip
            return _codes(array, scales), scales
    return None


def _codes(array: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """E4M3 codes of `array` on per-column `scales`, rounded to nearest."""
    return (array / scales).astype(ml_dtypes.float8_e4m3fn)


def _fp8_factor(
    hessian: np.ndarray, damping: float, act_order: bool, overwrite: bool
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """(the rounding order, `inverse_factor` of H in that order) for `_gptq_fp8_factored`.
    `act_order`: rows are rounded in descending order of H's diagonal (the input channels with
    the largest activations first, while the most rows are left to absorb their error).
    `overwrite`: H may be destroyed (no [K, K] copy is then made)."""
    if not act_order:
        return np.arange(len(hessian)), inverse_factor(hessian, damping, overwrite=overwrite)
    order = np.argsort(-np.diag(hessian), kind="stable")
    return order, inverse_factor(hessian[np.ix_(order, order)], damping, overwrite=True)


def _gptq_fp8_factored(
    array: np.ndarray,
    factored: tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ rounding (`gptq`) of a [K, N] weight to per-output-channel FP8 codes on
    `_quantize_fp8`'s scales (absmax / 448): (float8 [K, N], scales [N]); nearest rounding
    without H (`factored` None) or where it could not be factored."""
    if factored is None or factored[1] is None:
        return _quantize_fp8(array)
    order, factor = factored
    scales = scales_of(channel_peaks(array), _FP8_MAX)
    w = array[order].astype(np.float64) / scales  # in code units, in rounding order
    codes = np.empty(w.shape, dtype=ml_dtypes.float8_e4m3fn)

    def round_row(i: int, row: np.ndarray) -> np.ndarray:
        codes[order[i]] = np.clip(row, -_FP8_MAX, _FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
        return codes[order[i]].astype(np.float64)

    gptq(w, factor, round_row)
    return codes, scales


@dataclasses.dataclass(eq=False)
class QuantizeFp8Pass(StaticQuantizePass):
    """Static FP8 E4M3 QDQ of the linear layers for GPUs with FP8 (compute capability ≥ 8.9).

    Weights: per output channel, scale = absmax / 448, stored as FLOAT8E4M3FN [K, N] and read
    through `DequantizeLinear(axis=1)`. Activations: one static per-tensor scale from
    calibration, `activation_range` / 448 with the range the calibrated absmax ("absmax") or
    the 99.9th percentile of |x| ("percentile": rarer outliers are clipped at ±448). The
    model's opset is raised to 19 (FP8 Q/DQ) when lower.

    A weight whose values already are FP8 codes times a scale per channel or per tensor (an
    FP8 checkpoint's, read as float: fdec.frontend.fp8_checkpoint) keeps them, in W8A16 layers
    too (FP8 weights, not int8), instead of being rounded again (stats `source_grid_kept`).

    `weight_rounding="gptq"` picks each weight's FP8 code (on the same per-channel scales) by
    GPTQ's error compensation against the calibration activations. `share_tied_embedding`
    keeps a tied embedding/lm_head table stored once; ONNX Gather takes no FLOAT8 tensor, so
    that table is int8 per vocabulary row and the lm_head reads it weight-only (float
    activation, int8 weight dequantized: W8A16) — every other linear layer is FP8 W8A8.
    SmolLM2-135M (fp32 ppl 54.05, 128 held tokens): nearest + two tables +11.5 % at 0.31×;
    nearest + shared table +8.0 %; GPTQ + shared table +2.0 % at 136 MB (0.25×).
    """

    name = "quantize-fp8"
    qdq_precision = "fp8"
    # GPTQ's error feedback refills masked zeros (tested): FP8 rounds to nearest after 2:4.
    options_after_masking = (("weight_rounding", "nearest"),)
    fusable = False  # fuse-attention is not yet verified on its graphs
    family = "quantize"
    summary = "static FP8 E4M3 QDQ (per-channel weights, calibrated per-tensor activations)"
    # FP8 E4M3 keeps 3 mantissa bits (relative step 2⁻³), coarser than int8 near the top of
    # the range. Measured against PyTorch on 128 held tokens, ORT CPU at "basic", calibrated on
    # the built-in corpus (16 × 128 tokens):
    #   tests' tiny llama: max error 0.26, top-1 0.90 (absmax); 0.54, 0.88 (percentile);
    #   tiny gpt2: 0.21, 0.88 (absmax); 0.36, 0.90 (percentile);
    #   SmolLM2-135M, absmax: max error 6.45, top-1 0.81, perplexity 54.0 → 60.3 (with
    #   include_lm_head=False: 3.6, 0.86, 58.9); percentile: 48.6, 0.08, 54.0 → 33,467 —
    #   clipping the 0.1 % largest activations cuts LLMs' outlier channels, which matter.
    # As for int4/int8 the bounds catch a broken rewrite (the percentile range on SmolLM2 fails
    # them); finer quality is gated on perplexity by the pipeline.
    tolerance = Tolerance(max_abs_error=25.0, min_top1_agreement=0.45)

    activation_range: str = dataclasses.field(default="absmax", kw_only=True)
    # The activation scale covers the calibrated range × this: text unlike the calibration
    # text can exceed the calibrated absmax, and QuantizeLinear saturates at ±448 (clipping
    # outliers hurts LLMs: see the percentile figures below), while FP8's steps are relative,
    # so a wider range costs precision only in the few values pushed into subnormals.
    activation_margin: float = dataclasses.field(default=1.0, kw_only=True)
    # "nearest": each weight rounds to its nearest FP8 value. "gptq": columns are rounded in
    # order and each one's error is compensated in the weights not yet rounded, weighted by the
    # calibration activations' second moments H = XᵀX (GPTQ, Frantar et al. 2022); needs
    # `batches` (the activations are captured from the model as this pass receives it).
    weight_rounding: str = dataclasses.field(default="nearest", kw_only=True)
    gptq_damping: float = dataclasses.field(default=0.01, kw_only=True)
    gptq_act_order: bool = dataclasses.field(default=False, kw_only=True)
    # W8A16 layers with FP8 weights (per channel, rounded as `weight_rounding` says) instead of
    # int8: what a compressed-tensors FP8 checkpoint can hold (`--emit hf-checkpoint`). A
    # source's FP8 codes are kept either way.
    weight_only_fp8: bool = dataclasses.field(default=False, kw_only=True)

    precision_of = Precision.FP8_E4M3
    _cpu_fix = "use quantize-int8 (dynamic int8) or quantize-int4 for the CPU"
    _opset = _FP8_OPSET

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.name, "activation_range", self.activation_range, _ACTIVATION_RANGES)
        check_margin(self.name, self.activation_margin)
        check_choice(self.name, "weight_rounding", self.weight_rounding, _WEIGHT_ROUNDINGS)
        self._hessians: dict[str, np.ndarray] = {}

    def requires(self, model: FdecModel, target: Any = None) -> None:
        super().requires(model, target)
        if self.weight_rounding == "gptq" and self.batches is None:
            raise UsageError(
                "quantize-fp8 weight_rounding='gptq' needs calibration token batches",
                "pass batches=fdec.calibrate.calibration_batches(...) (stats are not enough)",
            )

    def _extra_stats(self) -> dict[str, Any]:
        return {
            "activation_range": self.activation_range,
            "activation_margin": self.activation_margin,
            "weight_rounding": self.weight_rounding,
            "int8_weight_only": [],
            "weight_only_fp8": self.weight_only_fp8,
            "fp8_weight_only": [],  # W8A16 layers with FP8 weights (a source's, or asked)
            "source_grid_kept": 0,  # weights already on an FP8 grid, their codes kept
        }

    def _prepare(self, model, groups, stats) -> None:
        self._hessians = {}
        if self.weight_rounding != "gptq" or not groups:
            return
        assert self.batches is not None
        # Only the FP8 groups (W8A16 ones too with `weight_only_fp8`): int8 rounds to nearest
        # without XᵀX and a shared table is int8. (An FP8 source's weights keep their codes,
        # found as each is rewritten: checking them here would read every weight once more.)
        names = [
            group.activation.name
            for group in groups
            if (self.weight_only_fp8 or not self._weight_only(model, group))
            and not any(w.gathers for w in group.weights)
        ]
        if not names:
            return
        self._hessians = hessians(model, self.batches, names)
        stats["gptq_tokens"] = int(sum(np.asarray(b).size for b in self.batches))

    def _factor(self, group: ActivationGroup) -> Any:
        """GPTQ's factor of the group's XᵀX (`_fp8_factor`), made once for all its weights and
        in place: the XᵀX are this pass's own and each is used by one group. None: nearest."""
        hessian = self._hessians.get(group.activation.name)
        if hessian is None:
            return None
        return _fp8_factor(hessian, self.gptq_damping, self.gptq_act_order, overwrite=True)

    def _weight_only_coder(self, group, stats):
        """A W8A16 weight on an FP8 grid keeps its FP8 codes (TensorRT: a bf16 GEMM reading
        FP8 weights), and with `weight_only_fp8` every one is FP8 (GPTQ-rounded as the W8A8
        ones); others (and a shared table, which ONNX Gather reads as int8) are int8."""
        int8 = super()._weight_only_coder(group, stats)
        factored = self._factor(group) if self.weight_only_fp8 else None

        def code(weight):
            grid = None if weight.gathers else _fp8_grid(weight.array)
            if grid is None and (weight.gathers or not self.weight_only_fp8):
                return int8(weight)
            stats["source_grid_kept"] += grid is not None
            stats["fp8_weight_only"].append(weight.value.name)
            codes, scales = grid or _gptq_fp8_factored(weight.array, factored)
            return ir.Tensor(codes, dtype=ir.DataType.FLOAT8E4M3FN), scales, "F8"

        return code

    def _rewrite(self, model, group, found, taken, stats) -> bool:
        graph = model.graph
        dtype = group.dtype
        if self._weight_only(model, group):
            return self._rewrite_weight_only(model, group, taken, stats)
        if any(weight.gathers for weight in group.weights):
            # A shared tied table: ONNX Gather takes no FLOAT8 tensor, so the table is int8
            # per vocabulary row (= per output channel of the lm_head), weight-only: the
            # lm_head's activation stays float and its weight is dequantized (W8A16).
            return self._rewrite_weight_only(model, group, taken, stats, "int8_weight_only")
        zero = zero_point(graph, ir.DataType.FLOAT8E4M3FN, taken)
        peak = found.absmax if self.activation_range == "absmax" else found.percentile_99_9
        peak = (peak if peak > 0 else found.absmax) * self.activation_margin
        nodes, dequantized = self._activation_qdq(
            graph, group.activation, peak / _FP8_MAX, zero, dtype, taken
        )
        insert_after_producer(graph, group.activation, nodes)
        factored = self._factor(group)
        for weight in group.weights:
            grid = _fp8_grid(weight.array)
            stats["source_grid_kept"] += grid is not None
            codes, scales = grid or _gptq_fp8_factored(weight.array, factored)
            tensor = ir.Tensor(codes, dtype=ir.DataType.FLOAT8E4M3FN)
            stats["bytes_before"] += weight.value.const_value.nbytes
            stats["matmuls_quantized"] += len(weight.sites)
            stats["weights_quantized"] += 1
            stats["bytes_after"] += self._quantized_weight(
                model, weight, tensor, scales, dequantized, taken, "F8"
            )
        return True
