"""NVFP4 for Blackwell GPUs (QuantizeFp4Pass): FP4 E2M1 weights on blocks of 16 with FP8 block scales, and FP4 activations quantized on the fly by TensorRT.

NVFP4 is the 4-bit float format of Blackwell's tensor cores (compute capability ≥ 10.0) and
NVIDIA ModelOpt's NVFP4 recipe. Weights [K, N]: each block of 16 inputs of one output column
gets a scale stored as FLOAT8E4M3FN, itself scaled by one fp32 scale per tensor (two levels:
the block scales keep fp8's 3 mantissa bits over the tensor's whole range). The graph form is
the one TensorRT's ONNX parser takes (standard ONNX, opset 23):

    s_w (FLOAT8E4M3FN [K/16, N]) ─ DequantizeLinear(·, g_w) ─┐
    W_q (FLOAT4E2M1 [K, N]) ──────── DequantizeLinear(axis 0, block 16) ─ MatMul

With `activations="fp4"` (W4A4, the tensor-core path and ModelOpt's default) each activation is
quantized at run time per block of 16 along its last axis by TensorRT's own op, with one
static per-tensor scale g_a from calibration (absmax / (6 · 448)):

    A ─ trt::TRT_FP4DynamicQuantize(A, g_a) ─ A_q, s_a ─ DequantizeLinear(s_a, g_a) ─
        DequantizeLinear(A_q, ·, axis -1, block 16) ─ MatMul

`activations="float"` keeps activations in float (W4A16: 4-bit weight storage, the GEMM in
fp16/bf16). Layers listed in `weight_only` / `weight_only_layers` are W4A16 in either case.

Neither ONNX Runtime's CPU nor its CUDA provider runs FLOAT4E2M1 or the TensorRT op: the
build is checked on this CPU in the form `fdec.runtime.fp4_form.emulate_fp4` rewrites it to
(the same weights as int8 codes, exactly; the activation quantization in standard ops), and
TensorRT-RTX builds the real engine here for compute capability 12.0.
"""

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
    capture_rows,
    divide_activation,
    foldable,
    insert_after_producer,
    smoothing_factors,
)
from fdec.passes.static_qdq import (
    StaticQuantizePass,
    read_dequantized,
    retire_quantized,
    scalar_initializer,
)
from fdec.passes.weights import Weight, add_initializer, fresh_name, row_chunks
from fdec.pipeline import Tolerance
from fdec.targets import Precision

__all__ = [
    "FP4_BLOCK",
    "FP4_MAX",
    "FP4_QUANTIZER",
    "TRT_DOMAIN",
    "QuantizeFp4Pass",
    "dynamic_quantize_node",
    "fake_fp4_activation",
    "quantize_nvfp4",
    "round_e2m1",
]

FP4_BLOCK = 16  # NVFP4's block along the reduction axis
FP4_MAX = 6.0  # largest E2M1 value
_FP8_MAX = 448.0  # largest FLOAT8E4M3FN: the block scales' range
_FP4_OPSET = 23  # FLOAT4E2M1 in DequantizeLinear
TRT_DOMAIN = "trt"  # TensorRT's ONNX parser's own ops
_DYNAMIC_QUANTIZE = "TRT_FP4DynamicQuantize"
FP4_QUANTIZER = (TRT_DOMAIN, _DYNAMIC_QUANTIZE)  # (domain, op) of the run-time quantizer
_ACTIVATIONS = ("fp4", "float")
# The smoothing search's rows × K × N per trial: wide groups are tried on fewer rows.
_SEARCH_MACS = 4e8
_MIN_SEARCH_ROWS = 64
_WEIGHT_ROUNDINGS = ("nearest", "gptq")


def _to_fp8(x: np.ndarray) -> np.ndarray:
    """`x` as FLOAT8E4M3FN, saturated at ±448 as ONNX's Cast and TensorRT saturate (a plain
    numpy cast past fp8's range gives NaN)."""
    return np.clip(x, -_FP8_MAX, _FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


def round_e2m1(x: np.ndarray) -> np.ndarray:
    """`x` rounded to the nearest E2M1 value (ties to even mantissa), saturated at ±6, as
    float: steps of 0.5 below 2, 1 below 4, 2 up to 6."""
    return np.clip(x, -FP4_MAX, FP4_MAX).astype(ml_dtypes.float4_e2m1fn).astype(x.dtype)


def _on_steps(
    values: np.ndarray, amax: np.ndarray, g: np.float32
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NVFP4's rounding of `values` on blocks whose absmax is `amax` (broadcast against them):
    (FP8 block scales fp8(amax / 6 / g), their steps scale · g, E2M1 codes of values / step;
    an all-zero block's codes 0)."""
    scales = _to_fp8(amax / FP4_MAX / g)
    steps = scales.astype(np.float32) * g
    codes = round_e2m1(values / np.where(steps == 0, np.float32(1.0), steps))
    return scales, steps, codes


def quantize_nvfp4(
    array: np.ndarray,
    block: int = FP4_BLOCK,
    *,
    shrink: tuple[float, ...] = (),
    importance: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """NVFP4 of a [K, N] weight (K a multiple of `block`): (FP4 codes [K, N], FP8 block scales
    [K/block, N], fp32 tensor scale g). Block b of column n stands for
    codes · float(scales[b, n]) · g; g = absmax / (6 · 448) puts the largest block's scale at
    fp8's top, each block's scale is its absmax / 6 / g rounded to fp8 (ModelOpt's NVFP4).

    `shrink`: factors (< 1) also tried on each block's absmax, the block keeping the scale
    whose rounding error Σ importance_k · (w - ŵ)² is smallest (its largest weights clipped
    to ±6 steps, the rest on finer steps); `importance` [K] weighs input channels (the
    calibration activations' mean squares), uniform when None."""
    k, n = array.shape
    blocks = array.astype(np.float32).reshape(k // block, block, n)
    amax = np.abs(blocks).max(axis=1)  # [K/block, N]
    top = float(amax.max())
    g = np.float32(top / (FP4_MAX * _FP8_MAX)) if top > 0 else np.float32(1.0)
    weigh = (
        np.ones((1, block, 1), np.float32)
        if importance is None
        else importance.astype(np.float32).reshape(k // block, block, 1)
    )

    def rounded(factor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scales, steps, codes = _on_steps(blocks, amax[:, None, :] * factor, g)
        scales, steps = scales[:, 0, :], steps[:, 0, :]
        error = (weigh * np.square(blocks - codes * steps[:, None, :])).sum(axis=1)
        return scales, codes, error

    scales, codes, error = rounded(1.0)
    for factor in shrink:
        other_scales, other_codes, other_error = rounded(factor)
        better = other_error < error
        scales = np.where(better, other_scales, scales)
        codes = np.where(better[:, None, :], other_codes, codes)
        error = np.minimum(error, other_error)
    return codes.reshape(k, n).astype(ml_dtypes.float4_e2m1fn), scales, g


def fake_fp4_activation(x: np.ndarray, g: float) -> np.ndarray:
    """What TensorRT's run-time FP4 quantization of `x` (blocks of 16 along its last axis,
    tensor scale `g`) gives back after dequantization: each block's step fp8(absmax / 6 / g)·g,
    its values rounded to E2M1 on it."""
    blocks = x.reshape(*x.shape[:-1], -1, FP4_BLOCK).astype(np.float32)
    _, steps, codes = _on_steps(blocks, np.abs(blocks).max(axis=-1, keepdims=True), np.float32(g))
    return (codes * steps).reshape(x.shape)


def _values(codes: np.ndarray, scales: np.ndarray, g: np.float32) -> np.ndarray:
    """The [K, N] weight NVFP4 codes, block scales and tensor scale stand for (fp32)."""
    k, n = codes.shape
    steps = scales.astype(np.float32) * g
    blocks = codes.astype(np.float32).reshape(k // FP4_BLOCK, FP4_BLOCK, n) * steps[:, None]
    return blocks.reshape(k, n)


def _nvfp4_dequantized(array: np.ndarray, **options: Any) -> np.ndarray:
    return _values(*quantize_nvfp4(array, **options))


def _on_grid(array: np.ndarray, nearest: tuple[np.ndarray, np.ndarray, np.float32]) -> bool:
    """Whether [K, N] `array` is the values of its nearest NVFP4 rounding (to float rounding: an
    NVFP4 checkpoint's E2M1 · scale / global_scale, read as float in fp32). A chunk of whole
    blocks of rows at a time (`row_chunks`), stopping at the first chunk off the grid, which for
    a float weight is the first: an 8B model's 2.1 GB lm_head costs one chunk of temporaries,
    not several of its own size."""
    codes, scales, g = nearest
    rows = max(FP4_BLOCK, row_chunks(array)[0].stop // FP4_BLOCK * FP4_BLOCK)
    for start in range(0, array.shape[0], rows):
        part, blocks = (
            slice(start, start + rows),
            slice(start // FP4_BLOCK, (start + rows) // FP4_BLOCK),
        )
        if not np.allclose(_values(codes[part], scales[blocks], g), array[part], rtol=1e-5, atol=0):
            return False
    return True


def _gptq_nvfp4(
    array: np.ndarray,
    hessian: np.ndarray,
    damping: float,
    nearest: tuple[np.ndarray, np.ndarray, np.float32],
) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """GPTQ rounding (`gptq`) of a [K, N] weight to NVFP4 codes on the scales of its `nearest`
    rounding (`quantize_nvfp4`): rows are rounded in order (in the weight's own units: the
    block scale changes every 16 rows) and each row's error is spread over the rows left.
    Nearest when H cannot be factored."""
    _, scales, g = nearest

    steps = scales.astype(np.float64) * float(g)  # [K/16, N]
    safe = np.where(steps == 0, 1.0, steps)
    rounded = np.empty(array.shape, dtype=np.float32)

    def round_row(i: int, row: np.ndarray) -> np.ndarray:
        b = i // FP4_BLOCK
        code = round_e2m1(row / safe[b])
        rounded[i] = code
        return code * steps[b]

    if not gptq(array.astype(np.float64), inverse_factor(hessian, damping), round_row):
        return nearest
    return rounded.astype(ml_dtypes.float4_e2m1fn), scales, g


def dynamic_quantize_node(
    source: ir.Value, global_scale: ir.Value, name: str
) -> tuple[ir.Node, ir.Value, ir.Value]:
    """TensorRT's TRT_FP4DynamicQuantize of `source` per block of 16 along its last axis, with
    the outputs typed (FP4 values in `source`'s shape, FP8 block scales): (node, values,
    scales)."""
    node = ir.node(
        _DYNAMIC_QUANTIZE,
        [source, global_scale],
        {"axis": -1, "block_size": FP4_BLOCK, "scale_type": int(ir.DataType.FLOAT8E4M3FN)},
        domain=TRT_DOMAIN,
        num_outputs=2,
        name=f"{source.name}_FP4DynamicQuantize",
    )
    values, scales = node.outputs
    values.dtype = ir.DataType.FLOAT4E2M1
    scales.dtype = ir.DataType.FLOAT8E4M3FN
    if source.shape is not None:
        dims = list(source.shape.dims)
        values.shape = ir.Shape(dims)
        last = dims[-1]
        scales.shape = ir.Shape([*dims[:-1], last // FP4_BLOCK if isinstance(last, int) else None])
    return node, values, scales


@dataclasses.dataclass(eq=False)
class QuantizeFp4Pass(StaticQuantizePass):
    """NVFP4 (FP4 E2M1 on blocks of 16, FP8 block scales, an fp32 tensor scale) for GPUs with
    FP4 tensor cores (compute capability ≥ 10.0), in TensorRT's graph form (module docstring).

    `activations`: "fp4" (W4A4: run-time block quantization by TensorRT, a calibrated
    per-tensor scale) or "float" (W4A16). `weight_rounding` "gptq" picks each weight's codes
    on the same scales by GPTQ's error compensation against the calibration activations.
    Weights whose input size is not a multiple of 16 stay float (listed in the stats). A tied
    embedding must be untied first (ONNX Gather takes no FP4 table).
    """

    name = "quantize-fp4"
    qdq_precision = "fp4"
    options_after_masking = (("weight_rounding", "nearest"),)
    fusable = False
    family = "quantize"
    summary = "NVFP4: FP4 weights (blocks of 16, FP8 scales), FP4 or float activations (sm >= 10.0)"
    # FP4 keeps 1 mantissa bit. Measured against PyTorch with the recipe's options: tests'
    # tiny llama/qwen2/gpt2 on held text: W4A4 max error ≤ 0.99, top-1 0.54–0.69; weight-only
    # ≤ 0.66, 0.73–0.77; SmolLM2-135M, evaluation split: W4A4 23.99 / 0.741 (perplexity
    # +22.4 %), weight-only 17.95 / 0.784 (+17.7 %). The bounds catch a broken rewrite;
    # quality is gated on perplexity (fdec.gates).
    tolerance = Tolerance(max_abs_error=40.0, min_top1_agreement=0.3)

    activations: str = dataclasses.field(default="fp4", kw_only=True)
    # The activation's tensor scale covers the calibrated absmax × this.
    activation_margin: float = dataclasses.field(default=1.0, kw_only=True)
    weight_rounding: str = dataclasses.field(default="nearest", kw_only=True)
    gptq_damping: float = dataclasses.field(default=0.01, kw_only=True)
    # Smoothing (X·W = (X/s)·(s·W), s_j = max|X_j|^α / max|W_j|^(1-α)): per activation, the α
    # of these (or none: s = 1) whose NVFP4 output error on calibration rows is smallest —
    # SmoothQuant for W4A4 groups, AWQ's activation-aware scaling for weight-only ones. Empty:
    # no smoothing.
    alpha_search: tuple[float, ...] = dataclasses.field(default=(), kw_only=True)
    # The search for weight-only groups too (AWQ's activation-aware scaling). SmolLM2, tuning
    # split, fp4-wo with GPTQ and block-scale search: perplexity +12.3 % → +14.9 % while the
    # KL to the source fell 0.153 → 0.141 and top-1 rose 0.782 → 0.794; off by default.
    smooth_weight_only: bool = dataclasses.field(default=False, kw_only=True)
    # Smoothing only where 1/s folds into a norm's weight (`foldable`), none where it would take
    # a Mul: a serving checkpoint (--emit hf-checkpoint) holds parameters, not graph ops.
    smoothing_folded_only: bool = dataclasses.field(default=False, kw_only=True)
    search_rows: int = dataclasses.field(default=512, kw_only=True)
    # Block scales: each block's absmax × each of these is tried too, the one with the least
    # rounding error (weighted by the calibration activations' mean squares where GPTQ has
    # them) kept (`quantize_nvfp4`'s shrink). Empty: absmax / 6, ModelOpt's choice.
    scale_search: tuple[float, ...] = dataclasses.field(default=(), kw_only=True)

    precision_of = Precision.FP4
    _cpu_fix = "use quantize-int4 (weight-only int4) for the CPU"
    _opset = _FP4_OPSET

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.name, "activations", self.activations, _ACTIVATIONS)
        check_choice(self.name, "weight_rounding", self.weight_rounding, _WEIGHT_ROUNDINGS)
        check_margin(self.name, self.activation_margin)
        self.alpha_search = tuple(float(a) for a in self.alpha_search)
        self.scale_search = tuple(float(f) for f in self.scale_search)
        if not all(0 < f < 1 for f in self.scale_search):
            raise UsageError(
                f"quantize-fp4 scale_search {self.scale_search!r} holds factors outside (0, 1)",
                "give shrink factors such as [0.9, 0.8], or [] for absmax scales",
            )
        if not all(0 <= a <= 1 for a in self.alpha_search):
            raise UsageError(
                f"quantize-fp4 alpha_search {self.alpha_search!r} is not within [0, 1]",
                "give migration strengths such as [0.25, 0.5, 0.75], or [] for none",
            )
        self._hessians: dict[str, np.ndarray] = {}
        self._rows: dict[str, np.ndarray] = {}

    def requires(self, model: FdecModel, target: Any = None) -> None:
        super().requires(model, target)
        if (self.weight_rounding == "gptq" or self.alpha_search) and self.batches is None:
            raise UsageError(
                "quantize-fp4 weight_rounding='gptq' and alpha_search need calibration batches",
                "pass batches=fdec.calibrate.calibration_batches(...) (stats are not enough)",
            )

    def _extra_stats(self) -> dict[str, Any]:
        return {
            "activations": self.activations,
            "weight_rounding": self.weight_rounding,
            "block_size": FP4_BLOCK,
            "float_activations": [],
            "not_multiple_of_16": [],
            "smoothed": {},  # activation → [α, output error, error without smoothing]
            "smoothing_not_foldable": [],  # with smoothing_folded_only
            "source_grid_kept": 0,  # weights already on an NVFP4 grid, their codes kept
        }

    def _prepare(self, model, groups, stats) -> None:
        self._hessians, self._rows = {}, {}
        names = [group.activation.name for group in groups if self._fits(group)]
        if not names:
            return
        searched = [
            g.activation.name
            for g in groups
            if self._fits(g) and (self.smooth_weight_only or self._activations_quantized(model, g))
        ]
        if self.alpha_search and searched:
            assert self.batches is not None
            self._rows = capture_rows(model, self.batches, searched, max_rows=self.search_rows)
        if self.weight_rounding == "gptq":
            assert self.batches is not None
            self._hessians = hessians(model, self.batches, names)
            stats["gptq_tokens"] = int(sum(np.asarray(b).size for b in self.batches))

    def _output_error(self, rows, weights, references, s, absmax, activations: bool) -> float:
        """Relative output error of NVFP4 weights (and, with `activations`, run-time FP4
        activations) on `rows` against `references` (rows @ each weight), with smoothing `s`
        (None: none)."""
        scale = np.ones(rows.shape[1], np.float32) if s is None else s
        x = rows / scale
        g = float(np.max(absmax / scale)) / (FP4_MAX * _FP8_MAX)
        xq = fake_fp4_activation(x, g) if activations else x
        total = norm = 0.0
        for w, reference in zip(weights, references):
            dequantized = _nvfp4_dequantized(w * scale[:, None], shrink=self.scale_search)
            total += float(np.square(reference - xq @ dequantized).sum())
            norm += float(np.square(reference).sum())
        return total / (norm or 1.0)

    def _smoothing(self, graph, group, found, stats, activations: bool) -> np.ndarray | None:
        """s for the group (`alpha_search`'s best, None when no smoothing is best): SmoothQuant
        for W4A4, AWQ's activation-aware scaling for weight-only groups."""
        rows = self._rows.pop(group.activation.name, None)
        if rows is None:
            return None
        if self.smoothing_folded_only and not foldable(graph, group):
            stats["smoothing_not_foldable"].append(group.activation.name)
            return None
        weights = [w.array for w in group.weights]
        width = sum(w.size for w in weights)  # wide groups (an lm_head) on fewer rows
        rows = rows[: max(_MIN_SEARCH_ROWS, int(_SEARCH_MACS // width))]
        absmax = found.channel_absmax.astype(np.float32)
        references = [rows @ w for w in weights]  # the same for every α
        best = none = self._output_error(rows, weights, references, None, absmax, activations)
        chosen: tuple[float | None, np.ndarray | None] = (None, None)
        for alpha in self.alpha_search:
            s = smoothing_factors(alpha, weights, absmax)
            error = self._output_error(rows, weights, references, s, absmax, activations)
            if error < best:
                best, chosen = error, (alpha, s)
        stats["smoothed"][group.activation.name] = [chosen[0], round(best, 6), round(none, 6)]
        return chosen[1]

    def _activations_quantized(self, model: FdecModel, group: ActivationGroup) -> bool:
        return self.activations == "fp4" and not self._weight_only(model, group)

    @staticmethod
    def _fits(group: ActivationGroup) -> bool:
        return group.weights[0].shape[0] % FP4_BLOCK == 0

    def _rewrite(self, model, group, found, taken, stats) -> bool:
        graph = model.graph
        if not self._fits(group):
            stats["not_multiple_of_16"].extend(w.value.name for w in group.weights)
            return False
        source = group.activation
        quantized = self._activations_quantized(model, group)
        s = self._smoothing(graph, group, found, stats, quantized)
        peak = float(found.absmax)
        if s is not None:
            source, folded = divide_activation(graph, group, s, taken)
            assert folded or not self.smoothing_folded_only
            peak = float(np.max(found.channel_absmax / s))
        if quantized:
            dtype = group.dtype
            peak *= self.activation_margin
            g = scalar_initializer(
                graph, f"{source.name}_fp4_global_scale",
                np.array(peak / (FP4_MAX * _FP8_MAX), dtype=dtype.numpy()), dtype, taken,
            )  # fmt: skip
            node, values, scales = dynamic_quantize_node(source, g, source.name)
            model.model.opset_imports.setdefault(TRT_DOMAIN, 1)
            block_scales = ir.node(
                "DequantizeLinear", [scales, g], name=f"{source.name}_DQ_fp4_scales"
            )
            dequantize = ir.node(
                "DequantizeLinear",
                [values, block_scales.outputs[0]],
                {"axis": -1, "block_size": FP4_BLOCK},
                name=f"{source.name}_DQ_fp4",
            )
            insert_after_producer(graph, source, [node, block_scales, dequantize])
            source = dequantize.outputs[0]
        else:
            stats["float_activations"].extend(w.value.name for w in group.weights)
        hessian = self._hessians.pop(group.activation.name, None)
        if hessian is not None and s is not None:  # of X / s
            hessian = hessian / np.outer(s, s)
        for weight in group.weights:
            array = weight.array if s is None else weight.array * s[:, None]
            importance = None if hessian is None else np.diag(hessian).copy()
            nearest = quantize_nvfp4(array, shrink=self.scale_search, importance=importance)
            # A weight nearest rounding gives back exactly (an NVFP4 checkpoint's, read as
            # float: fdec.frontend.prequantized) keeps those codes; GPTQ would move some.
            kept = _on_grid(array, nearest)
            stats["source_grid_kept"] += int(kept)
            if hessian is None or kept:
                codes, scales, g_w = nearest
            else:
                codes, scales, g_w = _gptq_nvfp4(array, hessian, self.gptq_damping, nearest)
            stats["bytes_before"] += weight.value.const_value.nbytes
            stats["matmuls_quantized"] += len(weight.sites)
            stats["weights_quantized"] += 1
            stats["bytes_after"] += self._fp4_weight(
                model, weight, codes, scales, g_w, source, taken
            )
        return quantized

    @staticmethod
    def _fp4_weight(
        model: FdecModel,
        weight: Weight,
        codes: np.ndarray,
        scales: np.ndarray,
        g: np.float32,
        activation: ir.Value,
        taken: set[str],
    ) -> int:
        """Replace each site of `weight` by the two-level DequantizeLinear → MatMul; retires the
        float weight and points its roles at the codes. The bytes stored (codes at 4 bits)."""
        graph = model.graph
        old_name = weight.value.name
        assert old_name is not None
        b = add_initializer(
            graph, fresh_name(graph, f"{old_name}_F4", taken),
            ir.Tensor(codes, dtype=ir.DataType.FLOAT4E2M1),
        )  # fmt: skip
        block_scales = add_initializer(
            graph, fresh_name(graph, f"{old_name}_block_scales", taken),
            ir.Tensor(scales, dtype=ir.DataType.FLOAT8E4M3FN),
        )  # fmt: skip
        dtype = weight.dtype
        tensor_scale = scalar_initializer(
            graph, f"{old_name}_global_scale", np.array(g, dtype=dtype.numpy()), dtype, taken
        )

        def two_level(prefix: str) -> list[ir.Node]:
            steps = ir.node(
                "DequantizeLinear", [block_scales, tensor_scale], name=f"{prefix}_DQ_F4_scales"
            )
            dequantize = ir.node(
                "DequantizeLinear", [b, steps.outputs[0]], {"axis": 0, "block_size": FP4_BLOCK},
                name=f"{prefix}_DQ_F4",
            )  # fmt: skip
            return [steps, dequantize]

        read_dequantized(model, weight, activation, "F4", two_level)
        retire_quantized(model, weight, b)
        return int(codes.size // 2 + scales.nbytes + 4)
