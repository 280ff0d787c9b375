"""Static quantization passes for GPU engines: FP8 E4M3 and SmoothQuant INT8, as standard ONNX QDQ.

Both passes rewrite the MatMul/Gemm nodes that read a weight the ModelSpec names (the same
sites, found by the same helpers, as fdec.passes.quantize) into explicit-quantization QDQ:

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
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import ml_dtypes
import numpy as np
import onnx_ir as ir

from fdec.calibrate import (
    ActivationStats,
    checked_batches,
    collect_activation_stats,
)
from fdec.errors import CompileError, UsageError
from fdec.ir import FdecModel
from fdec.passes.quantize import QuantizeInt8Pass
from fdec.passes.quantize import empty_stats as _empty_stats
from fdec.passes.quantize import quantize_int8 as _quantize_int8
from fdec.passes.quantize import require_untied as _require_untied
from fdec.passes.smoothquant import ActivationGroup as _Group
from fdec.passes.smoothquant import divide_activation as _divide_activation
from fdec.passes.smoothquant import group_by_activation as _group_by_activation
from fdec.passes.smoothquant import insert_after_producer as _insert_after_producer
from fdec.passes.smoothquant import smoothing_factors as _smoothing_factors
from fdec.passes.weights import Weight as _Weight
from fdec.passes.weights import add_initializer as _add_initializer
from fdec.passes.weights import collect_weights as _collect
from fdec.passes.weights import fresh_name as _fresh_name
from fdec.passes.weights import raise_opset as _raise_opset
from fdec.passes.weights import replace_site as _replace
from fdec.passes.weights import retire_weight as _retire
from fdec.pipeline import Pass, PassResult, Tolerance
from fdec.targets import Precision

__all__ = ["QuantizeFp8Pass", "QuantizeInt8StaticPass", "gptq"]

logger = logging.getLogger(__name__)

_FP8_MAX = 448.0  # largest finite FLOAT8E4M3FN
_INT8_MAX = 127  # symmetric int8: ±127, zero point 0
_FP8_OPSET = 19  # FLOAT8 types in QuantizeLinear / DequantizeLinear
_INT8_OPSET = 13  # per-axis DequantizeLinear
_ACTIVATION_RANGES = ("absmax", "percentile")
_WEIGHT_ROUNDINGS = ("nearest", "gptq")
_GPTQ_BLOCK = 128  # rows rounded between the lazy (matrix) updates of the rest
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def _scalar(
    graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType, taken: set[str]
) -> ir.Value:
    return _add_initializer(graph, _fresh_name(graph, name, taken), ir.Tensor(array, dtype=dtype))


def _zero_point(graph: ir.Graph, dtype: ir.DataType, taken: set[str]) -> ir.Value:
    """A scalar zero of `dtype` (it sets QuantizeLinear's output type), one per graph."""
    name = f"fdec_{dtype.name.lower()}_zero_point"
    existing = graph.initializers.get(name)
    tensor = existing.const_value if existing is not None else None
    if (
        tensor is not None
        and tensor.dtype == dtype
        and tensor.shape.dims == ()
        and (float(tensor.numpy().astype(np.float32)) == 0.0)
    ):
        return existing
    zero = np.zeros((), dtype=dtype.numpy())
    return _add_initializer(graph, _fresh_name(graph, name, taken), ir.Tensor(zero, dtype=dtype))


def _quantize_fp8(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel FP8 E4M3 of a [K, N] array: (float8 [K, N], float32 scales [N]).

    Each column's largest |w| maps to 448; an all-zero column gets scale 1.
    """
    peak = np.abs(array).max(axis=0)
    scales = np.where(peak > 0, peak / _FP8_MAX, 1.0).astype(np.float32)
    codes = np.clip(array / scales, -_FP8_MAX, _FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    return codes, scales


def _hessians(
    model: FdecModel, batches: Sequence[np.ndarray], names: Sequence[str]
) -> dict[str, np.ndarray]:
    """XᵀX (float64 [K, K]) of each named activation over the calibration batches."""
    from fdec.calibrate import ActivationRunner

    names = list(dict.fromkeys(names))
    sums: dict[str, np.ndarray] = {}
    runner = ActivationRunner(model, names)
    try:
        for ids in batches:
            for name, array in runner.run(np.asarray(ids)).items():
                x = np.asarray(array, dtype=np.float64)
                x = x.reshape(-1, x.shape[-1])
                if name in sums:
                    sums[name] += x.T @ x
                else:
                    sums[name] = x.T @ x
    finally:
        runner.close()
    return sums


def _gptq(
    w: np.ndarray,
    hessian: np.ndarray,
    damping: float,
    round_row: Callable[[int, np.ndarray], np.ndarray],
) -> bool:
    """GPTQ's error feedback (Frantar et al. 2022) over the rows of `w` ([K, N] float64, changed
    in place): rows (input channels) are rounded in order by `round_row(i, row)`, which stores
    row i's codes and returns the values they stand for, and each row's rounding error is spread
    over the rows not yet rounded through the inverse of H = XᵀX (damped by `damping` × its
    mean diagonal), which minimises ‖X·W − X·Ŵ‖². False, with nothing rounded, when H cannot
    be inverted."""
    h = np.array(hessian, dtype=np.float64)
    k = w.shape[0]
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[dead, :] = 0.0
    h[np.diag_indices(k)] += damping * float(np.mean(np.diag(h)))
    try:
        upper = np.linalg.cholesky(np.linalg.inv(h)).T  # H⁻¹ = Uᵀ U
    except np.linalg.LinAlgError:
        return False
    for start in range(0, k, _GPTQ_BLOCK):
        stop = min(start + _GPTQ_BLOCK, k)
        block = w[start:stop].copy()
        errors = np.empty_like(block)
        inverse = upper[start:stop, start:stop]
        for i in range(stop - start):
            error = (block[i] - round_row(start + i, block[i])) / inverse[i, i]
            block[i + 1 :] -= np.outer(inverse[i, i + 1 :], error)
            errors[i] = error
        w[stop:] -= upper[start:stop, stop:].T @ errors
    return True


def _gptq_fp8(
    array: np.ndarray, hessian: np.ndarray, damping: float
) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ rounding (`_gptq`) of a [K, N] weight to per-output-channel FP8: (float8 [K, N],
    scales [N]). The scales are `_quantize_fp8`'s (absmax / 448)."""
    _, scales = _quantize_fp8(array)
    w = array.astype(np.float64) / scales  # in code units
    codes = np.empty(w.shape, dtype=ml_dtypes.float8_e4m3fn)

    def round_row(i: int, row: np.ndarray) -> np.ndarray:
        codes[i] = np.clip(row, -_FP8_MAX, _FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
        return codes[i].astype(np.float64)

    if not _gptq(w, hessian, damping, round_row):
        return _quantize_fp8(array)
    return codes, scales


@dataclasses.dataclass(eq=False)
class _StaticQuantizePass(Pass):
    """Shared machinery: calibration, activation Q/DQ, weight DQ, ModelSpec upkeep, stats."""

    stats: Mapping[str, ActivationStats] | None = dataclasses.field(default=None, kw_only=True)
    batches: Sequence[np.ndarray] | None = dataclasses.field(default=None, kw_only=True)
    include_lm_head: bool = dataclasses.field(default=True, kw_only=True)
    # A tied lm_head keeps sharing the embedding: its [H, V] codes are stored once and the
    # embedding's Gathers read their columns (fdec.passes.quantize.QuantizeInt8Pass's way).
    share_tied_embedding: bool = dataclasses.field(default=False, kw_only=True)

    # Set by subclasses: the precision the target must have, the fix offered to CPU targets,
    # and the lowest default-domain opset the rewritten graph needs.
    _precision: ClassVar[Precision]
    _cpu_fix: ClassVar[str]
    _opset: ClassVar[int]

    def __post_init__(self) -> None:
        self.batches = checked_batches(self.name, self.batches)

    def check_target(self, target: Any) -> None:
        if target is None or not hasattr(target, "require"):
            return
        if not target.is_gpu:
            raise UsageError(
                f"{self.name} writes static QDQ for GPU engines; {target.name} is a CPU",
                self._cpu_fix,
            )
        target.require(self._precision)

    @property
    def needs_calibration(self) -> bool:
        """True until the pass is given `stats` or `batches`."""
        return self.stats is None and self.batches is None

    def requires(self, model: FdecModel, target: Any = None) -> None:
        if not self.share_tied_embedding:
            _require_untied(self.name, model, self.include_lm_head)
        if self.needs_calibration:
            raise UsageError(
                f"{self.name} needs calibration data and was given none",
                "pass batches=fdec.calibrate.calibration_batches(...) (or stats=...) to the pass",
            )

    def _calibrate(self, model: FdecModel, groups: list[_Group]) -> Mapping[str, ActivationStats]:
        if self.stats is not None:
            return self.stats
        assert self.batches is not None
        names = [group.activation.name for group in groups]
        return collect_activation_stats(model, self.batches, names)

    def call(self, model: FdecModel) -> PassResult:
        weights, skipped = _collect(model, self.include_lm_head, self.share_tied_embedding)
        kept: list[_Weight] = []
        for weight in weights:
            if weight.gathers and weight.dtype != ir.DataType.FLOAT:
                skipped["shared table is not float32"] += 1
            else:
                kept.append(weight)
        weights = kept
        stats: dict[str, Any] = {
            **_empty_stats(),
            "activations_quantized": 0,
            "gathers_shared": sum(len(w.gathers) for w in weights),
        }
        groups = _group_by_activation(weights, skipped)
        calibration = self._calibrate(model, groups) if groups else {}
        if groups and not any(group.activation.name in calibration for group in groups):
            raise CompileError(
                f"{self.name}: none of the {len(groups)} activations to quantize has "
                f"calibration statistics (first: {groups[0].activation.name!r})",
                "collect the stats on the model exactly as this pass receives it, or pass "
                "batches=... so the pass calibrates it itself",
            )
        ready: list[tuple[_Group, ActivationStats]] = []
        for group in groups:
            found = calibration.get(group.activation.name)
            if found is None:
                skipped["no calibration statistics for its activation"] += len(group.weights)
            elif found.absmax <= 0 or not math.isfinite(found.absmax):
                skipped["activation was all zeros (or not finite) in calibration"] += len(
                    group.weights
                )
            elif found.channel_absmax.shape != (group.weights[0].array.shape[0],):
                skipped["calibration statistics do not match the weight's input size"] += len(
                    group.weights
                )
            else:
                ready.append((group, found))
        stats.update(self._extra_stats())
        self._prepare(model, [group for group, _ in ready], stats)
        if ready:
            stats["opset_raised"] = _raise_opset(model, self._opset)
        taken: set[str] = set()
        for group, found in ready:
            if self._rewrite(model, group, found, taken, stats) is not False:
                stats["activations_quantized"] += 1
        stats["skipped"] = dict(skipped)
        return PassResult(model, modified=stats["weights_quantized"] > 0, stats=stats)

    # --- subclass hooks -----------------------------------------------------------------------

    def _extra_stats(self) -> dict[str, Any]:
        return {}

    def _prepare(self, model: FdecModel, groups: list[_Group], stats: dict[str, Any]) -> None:
        """Run once before the rewrites, on the incoming model (e.g. to collect Hessians)."""

    def _rewrite(
        self,
        model: FdecModel,
        group: _Group,
        found: ActivationStats,
        taken: set[str],
        stats: dict[str, Any],
    ) -> None:
        raise NotImplementedError

    # --- shared rewriting ---------------------------------------------------------------------

    @staticmethod
    def _activation_qdq(
        graph: ir.Graph,
        source: ir.Value,
        scale: float,
        zero_point: ir.Value,
        dtype: ir.DataType,
        taken: set[str],
    ) -> tuple[list[ir.Node], ir.Value]:
        """QuantizeLinear → DequantizeLinear of `source` (per tensor); (nodes, dequantized)."""
        prefix = source.name
        scale_value = _scalar(
            graph, f"{prefix}_scale", np.array(scale, dtype=dtype.numpy()), dtype, taken
        )
        quantize = ir.node(
            "QuantizeLinear", [source, scale_value, zero_point], name=f"{prefix}_QuantizeLinear"
        )
        dequantize = ir.node(
            "DequantizeLinear",
            [quantize.outputs[0], scale_value, zero_point],
            name=f"{prefix}_DequantizeLinear",
        )
        return [quantize, dequantize], dequantize.outputs[0]

    @staticmethod
    def _quantized_weight(
        model: FdecModel,
        weight: _Weight,
        codes: ir.Tensor,
        scales: np.ndarray,
        activation: ir.Value,
        taken: set[str],
        suffix: str,
    ) -> int:
        """Replace each site of `weight` by DequantizeLinear(codes) → MatMul(activation, ·).

        Retires the float weight, points its roles at `codes`; returns the bytes added.
        """
        graph = model.graph
        old_name = weight.value.name
        assert old_name is not None
        b = _add_initializer(graph, _fresh_name(graph, f"{old_name}_{suffix}", taken), codes)
        w_scale = _add_initializer(
            graph,
            _fresh_name(graph, f"{old_name}_scales", taken),
            ir.tensor(scales.astype(weight.dtype.numpy())),
        )
        for site in weight.sites:
            prefix = site.node.name or old_name
            dequantize = ir.node(
                "DequantizeLinear", [b, w_scale], {"axis": 1}, name=f"{prefix}_DQ_{suffix}"
            )
            matmul = ir.node(
                "MatMul", [activation, dequantize.outputs[0]], name=f"{prefix}_MatMul_{suffix}"
            )
            nodes = [dequantize, matmul]
            if site.bias is not None:
                nodes.append(ir.node("Add", [matmul.outputs[0], site.bias], name=f"{prefix}_bias"))
            _replace(graph, site, nodes)
        added = int(b.const_value.nbytes + w_scale.const_value.nbytes)
        if weight.gathers:  # the tied embedding reads the same codes
            added += QuantizeInt8Pass._share_with_gathers(graph, weight, b, w_scale, False, taken)
        _retire(graph, weight)
        model.spec.rename_weight(old_name, b.name)
        return added


@dataclasses.dataclass(eq=False)
class QuantizeFp8Pass(_StaticQuantizePass):
    """Static FP8 E4M3 QDQ of the linear layers for GPUs with FP8 (compute capability ≥ 8.9).

    Weights: per output channel, scale = absmax / 448, stored as FLOAT8E4M3FN [K, N] and read
    through `DequantizeLinear(axis=1)`. Activations: one static per-tensor scale from
    calibration, `activation_range` / 448 with the range the calibrated absmax ("absmax") or
    the 99.9th percentile of |x| ("percentile": rarer outliers are clipped at ±448). The
    model's opset is raised to 19 (FP8 Q/DQ) when lower.

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
    # "nearest": each weight rounds to its nearest FP8 value. "gptq": columns are rounded in
    # order and each one's error is compensated in the weights not yet rounded, weighted by the
    # calibration activations' second moments H = XᵀX (GPTQ, Frantar et al. 2022); needs
    # `batches` (the activations are captured from the model as this pass receives it).
    weight_rounding: str = dataclasses.field(default="nearest", kw_only=True)
    gptq_damping: float = dataclasses.field(default=0.01, kw_only=True)

    _precision = Precision.FP8_E4M3
    _cpu_fix = "use quantize-int8 (dynamic int8) or quantize-int4 for the CPU"
    _opset = _FP8_OPSET

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.activation_range not in _ACTIVATION_RANGES:
            raise UsageError(
                f"quantize-fp8 activation_range {self.activation_range!r} is unknown",
                f"use one of {', '.join(_ACTIVATION_RANGES)}",
            )
        if self.weight_rounding not in _WEIGHT_ROUNDINGS:
            raise UsageError(
                f"quantize-fp8 weight_rounding {self.weight_rounding!r} is unknown",
                f"use one of {', '.join(_WEIGHT_ROUNDINGS)}",
            )
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
            "weight_rounding": self.weight_rounding,
            "int8_weight_only": [],
        }

    def _prepare(self, model, groups, stats) -> None:
        self._hessians = {}
        if self.weight_rounding != "gptq" or not groups:
            return
        assert self.batches is not None
        names = [group.activation.name for group in groups]
        self._hessians = _hessians(model, self.batches, names)
        stats["gptq_tokens"] = int(sum(np.asarray(b).size for b in self.batches))

    def _codes(self, group: _Group, weight: _Weight) -> tuple[np.ndarray, np.ndarray]:
        hessian = self._hessians.get(group.activation.name)
        if hessian is None:
            return _quantize_fp8(weight.array)
        return _gptq_fp8(weight.array, hessian, self.gptq_damping)

    def _rewrite(self, model, group, found, taken, stats) -> bool:
        graph = model.graph
        dtype = group.dtype
        if any(weight.gathers for weight in group.weights):
            # A shared tied table: ONNX Gather takes no FLOAT8 tensor, so the table is int8
            # per vocabulary row (= per output channel of the lm_head), weight-only: the
            # lm_head's activation stays float and its weight is dequantized (W8A16).
            for weight in group.weights:
                codes, scales = _quantize_int8(weight.array, _INT8_MAX)
                stats["bytes_before"] += weight.value.const_value.nbytes
                stats["matmuls_quantized"] += len(weight.sites)
                stats["weights_quantized"] += 1
                stats["int8_weight_only"].append(weight.value.name)
                stats["bytes_after"] += self._quantized_weight(
                    model, weight, ir.tensor(codes), scales, group.activation, taken, "Q8"
                )
            return False
        zero = _zero_point(graph, ir.DataType.FLOAT8E4M3FN, taken)
        peak = found.absmax if self.activation_range == "absmax" else found.percentile_99_9
        peak = peak if peak > 0 else found.absmax
        nodes, dequantized = self._activation_qdq(
            graph, group.activation, peak / _FP8_MAX, zero, dtype, taken
        )
        _insert_after_producer(graph, group.activation, nodes)
        for weight in group.weights:
            codes, scales = self._codes(group, weight)
            tensor = ir.Tensor(codes, dtype=ir.DataType.FLOAT8E4M3FN)
            stats["bytes_before"] += weight.value.const_value.nbytes
            stats["matmuls_quantized"] += len(weight.sites)
            stats["weights_quantized"] += 1
            stats["bytes_after"] += self._quantized_weight(
                model, weight, tensor, scales, dequantized, taken, "F8"
            )
        return True


@dataclasses.dataclass(eq=False)
class QuantizeInt8StaticPass(_StaticQuantizePass):
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

    _precision = Precision.INT8
    _cpu_fix = "use quantize-int8 (dynamic int8, run-time activation scales) for the CPU"
    _opset = _INT8_OPSET

    def __post_init__(self) -> None:
        super().__post_init__()
        alpha = self.alpha
        if alpha is not None and (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not 0.0 <= alpha <= 1.0
        ):
            raise UsageError(
                f"quantize-int8-static alpha {alpha!r} is not a number from 0 to 1",
                "use 0.5 (SmoothQuant's default; higher moves more range into the weights), "
                "or None for no smoothing",
            )

    def _extra_stats(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "smoothing_folded": 0, "smoothing_inserted": 0}

    def smoothing_factors(self, group_weights: Sequence[np.ndarray], channel_absmax: np.ndarray):
        """s [K] (float32) for activation channel ranges and the [K, N] weights sharing them."""
        assert self.alpha is not None
        return _smoothing_factors(self.alpha, group_weights, channel_absmax)

    def _rewrite(self, model, group, found, taken, stats) -> None:
        graph = model.graph
        dtype = group.dtype
        source = group.activation
        peak = found.absmax
        scale_rows: np.ndarray | None = None
        if self.alpha is not None:
            s = self.smoothing_factors([w.array for w in group.weights], found.channel_absmax)
            scale_rows = s
            peak = float(np.max(found.channel_absmax.astype(np.float64) / s))
            source, folded = _divide_activation(graph, group, s, taken)
            stats["smoothing_folded" if folded else "smoothing_inserted"] += 1
        zero = _zero_point(graph, ir.DataType.INT8, taken)
        nodes, dequantized = self._activation_qdq(
            graph, source, peak / _INT8_MAX, zero, dtype, taken
        )
        _insert_after_producer(graph, source, nodes)
        for weight in group.weights:
            array = weight.array if scale_rows is None else weight.array * scale_rows[:, None]
            if weight.gathers and scale_rows is not None:  # gathered rows are divided again
                weight.row_scales = scale_rows
            codes, scales = _quantize_int8(array, _INT8_MAX)
            stats["bytes_before"] += weight.value.const_value.nbytes
            stats["matmuls_quantized"] += len(weight.sites)
            stats["weights_quantized"] += 1
            stats["bytes_after"] += self._quantized_weight(
                model, weight, ir.tensor(codes), scales, dequantized, taken, "Q8"
            )


# What quantize_awq shares from this module: GPTQ rounding.
gptq = _gptq
