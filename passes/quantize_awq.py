"""Activation-aware weight quantization (AWQ) for weight-only int4: calibrated per-channel scales before RTN.

AWQ (Lin et al. 2023) protects the weights that multiply large activations. For each group of
linear layers sharing one activation X (q/k/v, gate/up, o, down, the lm_head), with m the
per-input-channel mean |X| over the calibration data, it tries s = m^α (normalised by
sqrt(max(s)·min(s))) for α on a grid in [0, 1] and keeps the α minimising the output error

    ‖X·W − (X/s)·Q(diag(s)·W)‖²  (summed over the group's weights)

on captured calibration rows of X, where Q is the same block-wise RTN int4 QuantizeInt4Pass
applies (ONNX Runtime's kernel). α = 0 is plain RTN, so AWQ never does worse on the rows it
searched. Optionally each weight's blocks are then clipped: per block and output column, the
range is shrunk by the factor in 1.0…0.8 that minimises that block's share of the output error.

X·W = (X/s)·(diag(s)·W) exactly in real arithmetic, so the rewrite is: W's rows are multiplied
by s, and 1/s is folded into the norm producing X (its per-channel weight) or, when X has no
such producer (o, down), applied by an inserted `Mul` — the SmoothQuant folding of
fdec.passes.quantize_static. The scaled weights are then emitted exactly as QuantizeInt4Pass
emits its own (MatMulNBits, or blocked DequantizeLinear for "tensorrt").

Calibration: give `batches` (token id arrays from fdec.calibrate.calibration_batches; the pass
captures X with fdec.calibrate.capture_activations on the model it is given) or `activations`
(tensor name → captured values, last axis the channels). AWQ needs real rows of X, not only
ranges, so fdec.calibrate's ActivationStats are not enough.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from fdec.calibrate import activations_per_batch, active_calibration_source, checked_batches
from fdec.errors import UsageError
from fdec.ir import FdecModel, release_freed_memory
from fdec.passes.awq_search import awq_search, gptq_int4
from fdec.passes.quantize_common import check_choice, require_calibrated
from fdec.passes.quantize_int4 import QuantizeInt4Pass, kept_wider
from fdec.passes.smoothquant import (
    ActivationGroup,
    divide_activation,
    group_by_activation,
)
from fdec.passes.source_grid import widen_to_block_sums
from fdec.passes.weights import Weight, collect_weights, fresh_name
from fdec.pipeline import PassResult, Tolerance

__all__ = ["QuantizeInt4AwqPass"]

logger = logging.getLogger(__name__)

_ROUNDINGS = ("nearest", "gptq")
_SOURCE_GRID_FORMS = ("block_sums", "zero_points")
_GPTQ_HESSIANS = ("all", "searched")


def _correct_bias(graph: ir.Graph, weight: Weight, correction: np.ndarray, taken: set[str]) -> int:
    """Add `correction` ([N]) to the bias of every site of `weight` (a new constant, the site's
    constant bias plus it); returns the sites corrected (a non-constant bias: none).

    The constant is registered as an initializer when the site's node is written
    (QuantizeInt4Pass), not now: an initializer nothing reads yet would be dropped by the
    opset conversion the "tensorrt" form does first."""
    base = weight.value.name
    corrected = 0
    for site in weight.sites:
        bias = correction.astype(weight.dtype.numpy())
        if site.bias is not None:
            if site.bias.const_value is None:
                continue
            bias = bias + site.bias.const_value.numpy().astype(bias.dtype)
        name = fresh_name(graph, f"{base}_bias_corrected", taken)
        tensor = ir.tensor(bias, name=name)
        site.bias = ir.Value(
            name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
            const_value=tensor,
        )  # fmt: skip
        corrected += 1
    return corrected


# --- calibration --------------------------------------------------------------------------------


def _subsample(x: np.ndarray, max_rows: int) -> np.ndarray:
    """At most `max_rows` rows of x, evenly spaced (every domain of the corpus stays in)."""
    if x.shape[0] <= max_rows:
        return x
    index = np.unique(np.linspace(0, x.shape[0] - 1, num=max_rows).round().astype(np.int64))
    return x[index]


@dataclasses.dataclass
class _Calibration:
    """What the search needs of one activation: its per-channel mean |x| and some rows."""

    mean_abs: np.ndarray  # [K] float64, over every calibration row
    rows: np.ndarray  # [R, K] float32, R ≤ max_rows, evenly spaced over the calibration
    gram: np.ndarray | None = None  # [K, K] float32 XᵀX over every calibration row (GPTQ)
    mean: np.ndarray | None = None  # [K] float64 signed mean over every row (bias correction)

    def hessian(self, s: np.ndarray | None) -> np.ndarray:
        """XᵀX of the activation the weights see: X/s once AWQ divided it by s."""
        gram = self.gram if self.gram is not None else self.rows.T @ self.rows
        return gram if s is None else gram / np.outer(s, s)

    @classmethod
    def of(cls, parts: Sequence[np.ndarray], max_rows: int) -> _Calibration:
        """From arrays of one tensor (any leading shape, the channels last)."""
        flat = [np.asarray(part).reshape(-1, np.shape(part)[-1]) for part in parts]
        count = sum(part.shape[0] for part in flat)
        total = sum(np.abs(part).sum(axis=0, dtype=np.float64) for part in flat)
        signed = sum(part.sum(axis=0, dtype=np.float64) for part in flat)
        rows = np.concatenate([_subsample(part, max_rows) for part in flat], axis=0)
        rows = np.ascontiguousarray(_subsample(rows, max_rows), dtype=np.float32)
        return cls(total / count, rows, mean=signed / count)


def _capture(
    model: FdecModel,
    batches: Sequence[np.ndarray],
    names: Sequence[str],
    max_rows: int,
    grams: bool = False,
) -> dict[str, _Calibration]:
    """Each named tensor's calibration over all batches: the same rows `_Calibration.of` picks
    from all batches concatenated (evenly spaced over every calibration row), taken batch by
    batch through one session so only the kept rows are held (stacking the batches into one
    run held every exposed activation of every batch, and batch-16 logits, at once: peak RSS
    3.3 GiB on SmolLM2-135M)."""
    source = active_calibration_source(batches)
    if source is not None:  # a streamed compile: layer by layer (fdec.calibrate_layerwise)
        found = source.sampled(model, names, max_rows, grams)
        return {name: _Calibration(*parts) for name, parts in found.items()}
    counts = [int(np.prod(np.shape(ids))) for ids in batches]  # rows of a [b, s, K] tensor
    total = sum(counts)
    chosen = (
        np.unique(np.linspace(0, total - 1, num=max_rows).round().astype(np.int64))
        if total > max_rows
        else np.arange(total)
    )
    sums: dict[str, np.ndarray] = {}
    signed: dict[str, np.ndarray] = {}
    products: dict[str, np.ndarray] = {}
    kept: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    odd: dict[str, list[np.ndarray]] = collections.defaultdict(list)  # not one row per token
    start = 0
    for count, captured in zip(counts, activations_per_batch(model, batches, names)):
        local = chosen[(chosen >= start) & (chosen < start + count)] - start
        for name, array in captured.items():
            if not (array.ndim and array.size):
                continue
            flat = array.reshape(-1, array.shape[-1])
            if flat.shape[0] != count or name in odd:
                odd[name].append(flat.copy())
                continue
            sums[name] = sums.get(name, 0.0) + np.abs(flat).sum(axis=0, dtype=np.float64)
            signed[name] = signed.get(name, 0.0) + flat.sum(axis=0, dtype=np.float64)
            if grams:
                gram = flat.T @ flat
                products[name] = products[name] + gram if name in products else gram
            kept[name].append(flat[local].copy())
        start += count
    found = {
        name: _Calibration(
            sums[name] / total,
            np.ascontiguousarray(np.concatenate(kept[name]), dtype=np.float32),
            products.get(name),
            signed[name] / total,
        )
        for name in sums
        if name not in odd
    }
    for name, arrays in odd.items():
        found[name] = _Calibration.of(arrays, max_rows)
    return found


def _of_activations(
    activations: Mapping[str, np.ndarray], names: Sequence[str], max_rows: int
) -> dict[str, _Calibration]:
    return {
        name: _Calibration.of([activations[name]], max_rows)
        for name in names
        if name in activations and np.ndim(activations[name]) and np.size(activations[name])
    }


# --- the pass -----------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class QuantizeInt4AwqPass(QuantizeInt4Pass):
    """Weight-only 4-bit block quantization with AWQ's activation-aware per-channel scales.

    Same output as QuantizeInt4Pass (MatMulNBits, or blocked DequantizeLinear for "tensorrt",
    from the same RTN kernel and options), applied to weights whose input rows were first
    multiplied by AWQ's scales s — found by a grid of `grid` + 1 values of α in [0, 1], on at
    most `max_rows` calibration rows per activation — with 1/s folded into the norm producing
    the activation, or an inserted `Mul` named `<activation>_AWQ` where there is none (o,
    down; in the tests' llama also the lm_head). With `clip`, each block's range is then
    shrunk by 1.0…0.8 where that lowers its output error.

    With `keep_source_grid`, weights already on a block grid (a GGUF source's Q4_1 blocks)
    keep it: symmetric or uint8-zero-point blocks whose activation is widened to
    [x, block sums of x] (`MatMul` by a 0/1 matrix, then `Concat`), the extra input rows
    holding each block's float offset (`fdec.passes.source_grid.offset_rows`); stats
    `source_grid_kept` and `block_sum_inputs` count them. With `bias_correction`, each searched
    weight's mean output error on the calibration tokens is folded into its bias.

    Weights without calibration rows (or read by two activations) get plain RTN: the stats'
    `rtn_only` says why. Stats add, per activation, the α chosen and the relative output
    errors ‖X·W − X̂·Ŵ‖² / ‖X·W‖² of RTN and of AWQ on the searched rows.
    """

    name = "quantize-int4-awq"
    family = "quantize"
    summary = "weight-only 4-bit block quantization with AWQ activation-aware scales (calibrated)"
    # The same bounds as quantize-int4: they catch a broken rewrite; quality is gated on
    # perplexity by the pipeline. Measured against PyTorch on 128 held tokens (block 32, sym,
    # calibrated on the built-in corpus, 16 × 128 tokens), as max error / top-1 / perplexity:
    #   tests' tiny llama: RTN 0.78 / 0.66 / 378.0 (source 380.3); AWQ 0.62 / 0.69 / 372.2
    #   (no clip 0.80 / 0.67 / 376.0); mean relative output error of its 15 layers on the held
    #   text 0.0073 → 0.0054 (no clip 0.0069).
    #   SmolLM2-135M (source perplexity 54.0): RTN 12.5 / 0.57 / 70.9; AWQ 8.4 / 0.76 / 60.8;
    #   no clip 10.4 / 0.62 / 64.2; KL divergence 0.46 → 0.18 (no clip 0.23).
    tolerance = Tolerance(max_abs_error=25.0, min_top1_agreement=0.45)

    grid: int = dataclasses.field(default=20, kw_only=True)
    max_rows: int = dataclasses.field(default=512, kw_only=True)
    clip: bool = dataclasses.field(default=True, kw_only=True)
    # "nearest": RTN codes of the scaled (and clipped) weights. "gptq": the same scales, codes
    # chosen by GPTQ's error feedback on the calibration activations' XᵀX (`gptq_hessian`
    # "all": over every calibration token; "searched": over the max_rows searched rows).
    # `keep_source_grid` (QuantizeInt4Pass's): weights already on a block grid (integer zero
    # points, or a GGUF source's Q4_1 / Q8_0 blocks of this block size: `_source_grid`) keep it
    # instead of being scaled and rounded again; their groups are not searched ("onnxruntime"
    # backend only). Off here, on in the int4-awq recipe
    # (fdec.compile.recipe.INT4_KEEP_SOURCE_GRID). Float16 zero points ("zero_points" below)
    # are exact but ONNX Runtime's MatMulNBits decodes SmolLM2 with them at 9.2 tok/s against
    # 86.0 for symmetric blocks (benchmarks/decode.py, same run, 2026-12-04).
    # How a kept asymmetric grid (Q4_1: float zero points) is written. "zero_points": float16
    # zero points, exact, but ONNX Runtime's slow MatMulNBits path (above). "block_sums":
    # symmetric codes plus the blocks' offsets as extra input rows multiplied by the
    # activation's block sums (`offset_rows`, rounded `source_grid_levels` times): the fast
    # path, at (K + levels·P)/K the bytes (P: K/32 padded to 32). "onnxruntime" backend only.
    source_grid_form: str = dataclasses.field(default="block_sums", kw_only=True)
    source_grid_levels: int = dataclasses.field(default=1, kw_only=True)
    # "block_sums" with the zero points rounded to integers kept in the blocks (uint8), the
    # offset rows carrying only the fractions (`offset_rows`).
    source_grid_rounded_zero_points: bool = dataclasses.field(default=False, kw_only=True)
    rounding: str = dataclasses.field(default="nearest", kw_only=True)
    gptq_hessian: str = dataclasses.field(default="all", kw_only=True)
    gptq_damping: float = dataclasses.field(default=0.01, kw_only=True)
    # Bias correction (Nagel et al. 2019): the mean output error E[x]·(W − Ŵ) over the
    # calibration tokens, with x the activation and Ŵ the quantized weight, is added to each
    # searched weight's bias (MatMulNBits' bias input, an Add for "tensorrt"): N floats a weight.
    bias_correction: bool = dataclasses.field(default=False, kw_only=True)
    activations: Mapping[str, np.ndarray] | None = dataclasses.field(default=None, kw_only=True)
    batches: Sequence[np.ndarray] | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits != 4:
            raise UsageError(
                f"{self.name} searches 4-bit scales; bits {self.bits} is not supported",
                "use quantize-int4 with bits=8 (8-bit RTN needs no activation-aware scales)",
            )
        if self.block_grid != "onnxruntime":  # AWQ's scaling moves weights off any source grid
            raise UsageError(
                f"{self.name} rounds on ONNX Runtime's grid; block_grid {self.block_grid!r} is "
                "for quantize-int4",
                "use --quantize int4-rtn with quantize-int4.block_grid=minmax",
            )
        for option in ("grid", "max_rows"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(
                    f"{self.name} {option} {value!r} is not a positive integer",
                    "use the default (grid=20, max_rows=512) or another whole number ≥ 1",
                )
        self.batches = checked_batches(self.name, self.batches)
        check_choice(self.name, "source_grid_form", self.source_grid_form, _SOURCE_GRID_FORMS)
        if self.source_grid_levels not in (1, 2) or isinstance(self.source_grid_levels, bool):
            raise UsageError(
                f"{self.name} source_grid_levels {self.source_grid_levels!r} is not 1 or 2",
                "use 1 (offsets rounded once) or 2 (their residual rounded again)",
            )
        check_choice(self.name, "rounding", self.rounding, _ROUNDINGS)
        check_choice(self.name, "gptq_hessian", self.gptq_hessian, _GPTQ_HESSIANS)

    @property
    def needs_calibration(self) -> bool:
        """True until the pass is given `activations` or `batches`."""
        return self.activations is None and self.batches is None

    def requires(self, model: FdecModel, target: Any = None) -> None:
        super().requires(model, target)
        if self.needs_calibration:
            raise UsageError(
                f"{self.name} needs calibration data and was given none",
                "pass batches=fdec.calibrate.calibration_batches(...) (or activations=...) "
                "to the pass",
            )

    def _calibrate(
        self, model: FdecModel, groups: list[ActivationGroup]
    ) -> dict[str, _Calibration]:
        names = [group.activation.name for group in groups]
        if self.activations is not None:
            return _of_activations(self.activations, names, self.max_rows)
        assert self.batches is not None
        grams = self.rounding == "gptq" and self.gptq_hessian == "all"
        return _capture(model, self.batches, names, self.max_rows, grams=grams)

    def call(self, model: FdecModel) -> PassResult:
        weights, skipped = collect_weights(model, self.include_lm_head, self.share_tied_embedding)
        rtn_only: collections.Counter[str] = collections.Counter()
        on_grid = 0
        # A source grid is kept for ONNX Runtime only (MatMulNBits takes its blocks as they are).
        # GGUF's float-zero-point grids for ONNX Runtime only (MatMulNBits' float zero points
        # or block sums); integer ones for both (a blocked DequantizeLinear's uint4 zero points)
        minmax = self.backend == "onnxruntime"
        for weight in weights if self.keep_source_grid else ():
            weight.quantized = self._source_grid(weight, minmax=minmax)
            on_grid += weight.quantized is not None
            # One float copy at a time: a weight read from the checkpoint is read again when
            # searched (an 8B's all at once were 32 GB).
            weight.release()
        wider = kept_wider(weights, self._bits_of)
        groups = group_by_activation(weights, rtn_only)
        if on_grid:  # groups whose weights all keep their grid need no calibration
            kept = [g for g in groups if all(w.quantized is not None for w in g.weights)]
            rtn_only["on the source's block grid (kept exactly)"] += sum(
                len(g.weights) for g in kept
            )
            groups = [g for g in groups if not any(g is k for k in kept)]
        calibration = self._calibrate(model, groups) if groups else {}
        release_freed_memory()  # the capture's activations and session are gone
        require_calibrated(self.name, groups, calibration, "scale", "capture the activations")
        taken: set[str] = set()
        report: dict[str, Any] = {}
        counts = collections.Counter()
        # A searched group's codes go into the graph (the spill file, streamed) as soon as they
        # are chosen: an 8B's codes held until the end were 4.4 GB. Not with a kept source grid,
        # whose widening below still reads the codes of every weight.
        emitting = (self._start_emitting(model), set()) if weights and not on_grid else None
        emitted: set[int] = set()
        for group in groups:
            seen = calibration.get(group.activation.name)
            reason = self._unusable(group, seen) or self._not_searched(group)
            if reason:
                rtn_only[reason] += len(group.weights)
                continue
            counts["groups_searched"] += 1
            report[group.activation.name] = self._scale_group(model, group, seen, taken, counts)
            for weight in group.weights if emitting else ():
                self._emit(model, weight, *emitting)
                emitted.add(id(weight))
        widened = 0
        if on_grid and self.source_grid_form == "block_sums":
            widened = widen_to_block_sums(
                model.graph, weights, taken, self.source_grid_levels,
                self.source_grid_rounded_zero_points,
            )  # fmt: skip
        if emitting:
            for weight in weights:  # the rest (not searched): rounded and emitted now
                if id(weight) not in emitted:
                    self._emit(model, weight, *emitting)
            stats, _ = emitting
            stats["skipped"] = dict(skipped)
            result = PassResult(model, modified=True, stats=stats)
        else:
            result = self._quantize_weights(model, weights, skipped)
        reductions = [entry["reduction"] for entry in report.values()]
        stats = {
            **result.stats,
            "groups_searched": counts["groups_searched"],
            "groups_scaled": counts["groups_scaled"],
            "scales_folded": counts["scales_folded"],
            "scales_inserted": counts["scales_inserted"],
            "weights_clipped": counts["weights_clipped"],
            "biases_corrected": counts["biases_corrected"],
            "rtn_only": dict(rtn_only),
            "source_grid_kept": on_grid,
            **({"source_grid_kept_wider": wider} if wider else {}),
            "block_sum_inputs": widened,
            "mean_error_reduction": float(np.mean(reductions)) if reductions else 0.0,
            "groups": report,
        }
        return PassResult(model, modified=result.modified, stats=stats)

    def _not_searched(self, group: ActivationGroup) -> str | None:
        """Why AWQ leaves the group to plain rounding although it could search it, or None."""
        if any(self._bits_of(weight) != 4 for weight in group.weights):
            return "8-bit weights (lm_head_bits)"
        return None

    @staticmethod
    def _unusable(group: ActivationGroup, seen: _Calibration | None) -> str | None:
        """Why the group's calibration cannot drive a search, or None."""
        if seen is None:
            return "no calibration activations"
        if seen.mean_abs.shape != (group.weights[0].shape[0],):
            return "calibration activations do not match the weight's input size"
        if not np.all(np.isfinite(seen.mean_abs)) or not np.any(seen.rows):
            return "activation was all zeros (or not finite) in calibration"
        return None

    def _scale_group(
        self,
        model: FdecModel,
        group: ActivationGroup,
        seen: _Calibration,
        taken: set[str],
        counts: collections.Counter[str],
    ) -> dict[str, Any]:
        """Search s for one group, fold 1/s (or insert it), put the scaled arrays in place."""
        roles = [model.spec.roles_of(w.value.name) for w in group.weights]
        mean = seen.mean if self.bias_correction else None
        # E[x]·W of the float weights: what the quantized product should average to
        wanted = [mean @ w.array for w in group.weights] if mean is not None else None
        found = awq_search(
            seen,
            [w.array for w in group.weights],
            self.clip,
            grid=self.grid,
            block_size=min(self._block_size_of(w) for w in group.weights),
            symmetric=all(self._symmetric_of(w) for w in group.weights),
        )
        if found.alpha:
            source, folded = divide_activation(model.graph, group, found.s, taken, label="AWQ")
            counts["groups_scaled"] += 1
            counts["scales_folded" if folded else "scales_inserted"] += 1
            for site in group.sites:  # live at once: later passes keep the inserted Mul
                site.node.replace_input_with(0, source)
                site.activation = source
        for weight, array in zip(group.weights, found.arrays):
            weight.array = np.ascontiguousarray(array, dtype=np.float32)
            if found.alpha:
                weight.row_scales = found.s  # a tied embedding's Gather divides by s again
            # Rounded now, so that the scaled float copies do not pile up over the groups. A
            # shared table's codes are also embedding rows: those keep nearest rounding.
            if self.rounding == "gptq" and not weight.gathers:
                weight.quantized = gptq_int4(
                    weight.array,
                    seen.hessian(found.s if found.alpha else None),
                    self._block_size_of(weight),
                    self._symmetric_of(weight),
                    self.gptq_damping,
                )
            else:
                weight.quantized = self._round(weight)
            # The codes are final: keep no float copy (an empty array, not a view of it).
            weight.array = np.empty((0, weight.array.shape[1]), dtype=np.float32)
        if wanted is not None:
            x_mean = mean / found.s if found.alpha else mean  # the scaled activation's mean
            for weight, want in zip(group.weights, wanted):
                got = weight.quantized.dequantized() @ x_mean  # [N]
                counts["biases_corrected"] += _correct_bias(
                    model.graph, weight, (want - got).astype(np.float32), taken
                )
        counts["weights_clipped"] += sum(found.clipped)
        reduction = 1.0 - found.error / found.error_rtn if found.error_rtn > 0 else 0.0
        logger.info(
            "%s: alpha %.2f, output error %.4g -> %.4g (%.0f%% less)",
            group.activation.name,
            found.alpha,
            found.error_rtn,
            found.error,
            100 * reduction,
        )
        return {
            "roles": sorted(role for r in roles for role in r),
            "alpha": found.alpha,
            "error_rtn": found.error_rtn,
            "error_scaled": found.error_scaled,
            "error_awq": found.error,
            "reduction": reduction,
        }
