"""The recipe: which passes a compile runs, composed from what the passes declare.

`plan_recipe` turns the options (--passes, --quantize, --sparsity, --kv-*, pass options) into a
`Recipe`: the shared target-independent pipeline (cleanup, sparsity, quantization), then the
backend's own preparation (`Backend.prepare_passes`: attention fusion for ONNX Runtime), then the
KV-cache passes; the build's tolerance; the ONNX Runtime optimization level the build runs at.
Everything here is decided, and refused, before the model loads.

What the planner needs to know about a pass it reads from the pass class (fdec.pipeline.Pass):
`fusable`, `qdq_precision`/`writes_qdq`, `masks_weights`/`options_after_masking`,
`needs_calibration`. Ordering is declared once, in `ORDER`, and checked.
"""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
from collections.abc import Mapping
from typing import Any

from fdec import passes as fdec_passes
from fdec.backends import check_precision, get_backend
from fdec.calibrate import calibration_batches, load_calibration_texts
from fdec.compile.defaults import (
    CPU_INT8_METHOD,
    DEFAULT_MAX_PPL_INCREASE,
    FP4_ALPHA_SEARCH,
    FP4_SCALE_SEARCH,
    FP4_WEIGHT_ONLY,
    FP4_WEIGHT_ONLY_LAYERS,
    FP4_WEIGHT_ROUNDING,
    FP8_WEIGHT_ONLY,
    FP8_WEIGHT_ONLY_LAYERS,
    FP8_WEIGHT_ROUNDING,
    INT4_KEEP_SOURCE_GRID,
    INT4_LM_HEAD_BITS,
    INT4_MIXED_KEEP,
    INT4_SOURCE_GRID_LEVELS,
    INT4_SOURCE_GRID_ROUNDED_ZERO_POINTS,
    INT8_DYNAMIC_ALPHA,
    INT8_ENCODER_WEIGHT_ONLY,
    INT8_WEIGHT_ONLY,
    SMOOTHQUANT_ALPHA,
    SMOOTHQUANT_ALPHA_SEARCH,
    SMOOTHQUANT_WEIGHT_ONLY,
)
from fdec.errors import UsageError
from fdec.gates import GateTolerance, default_gate
from fdec.lower.genai import check_genai_cache
from fdec.lower.hf_checkpoint import check_quantize
from fdec.passes.kv_cache import ModelWindow, kv_cache_passes
from fdec.passes.prune import parse_prune
from fdec.pipeline import EXACT, PassManager, Tolerance
from fdec.targets import Precision

__all__ = [
    "EMITS",
    "FP32_TOLERANCE",
    "ORDER",
    "Recipe",
    "bare_method",
    "check_emit",
    "default_quantize",
    "plan_pipeline",
    "prune_recipe",
    "sensitivity_pass",
]

# What an fp32 build must meet against the source model (the contract).
FP32_TOLERANCE = Tolerance(max_abs_error=1e-3, min_top1_agreement=1.0)
EMITS = ("hf-checkpoint", "genai")

# Methods each precision has today; precisions not listed are checked against the target and
# then refused as not built yet.
_QUANTIZE_METHODS = {
    "int4": ("rtn", "awq", "awq-mixed"),
    "int8": ("dynamic", "smoothquant", "wo"),
    "fp8": ("static",),
    "fp4": ("w4a4", "wo"),
    "fp32": ("none",),
}


# --quantize values that mean "no quantization" (weights stay in the exported fp32).
_NO_QUANTIZATION = ("none", "fp32", "fp32-none")


def default_quantize(target: Any, kind: str, backend: Any = None) -> str:
    """The `--quantize` value a compile uses when none is given: the backend's own default
    where it has one (ONNX Runtime CUDA: fp16), else the target's `[default_recipe]` weights
    (its `encoder_weights` for encoders); "none" for float weights, which fdec keeps in the
    exported fp32 (fp16/bf16 conversion is the engine builder's)."""
    if backend is not None and getattr(backend, "default_quantize", None):
        return backend.default_quantize
    recipe = target.default_recipe
    weights = recipe.get("encoder_weights", recipe["weights"]) if kind == "encoder" else None
    weights = weights or recipe["weights"]
    return "none" if weights.split("-", 1)[0] in ("fp32", "fp16", "bf16", "tf32") else weights


def _quantize_passes(
    asked: str | None,
    target: Any,
    backend: Any,
    earlier: list[str],
    *,
    embedding: bool = True,
    keep_fp: int | None = None,
    kind: str = "decoder",
    source_widths: tuple[int, ...] = (),
) -> list[Any]:
    """Passes for `--quantize PRECISION[-METHOD]`, after checking the target has the precision.
    `source_widths`: the bit widths a quantized source's layers are stored at (an int4 build
    keeps the wider ones' blocks at their width)."""
    if asked and backend.default_quantize and asked.lower() in ("fp16", "bf16"):
        return []  # the backend's own float typing (onnxruntime-cuda), not a quantizer
    if not asked or asked.lower() in _NO_QUANTIZATION:
        if keep_fp is not None:
            raise UsageError(
                "--keep-fp needs a quantized build", "add --quantize int4, or drop --keep-fp"
            )
        return []
    precision_text, _, method = asked.lower().partition("-")
    precision = Precision.parse(precision_text)
    target.require(precision)  # e.g. FP8 on an a100: fails here, before any work
    methods = _QUANTIZE_METHODS.get(precision.value)
    if methods is None:
        built = ", ".join(f"{p}-{m[0]}" for p, m in _QUANTIZE_METHODS.items() if p != "fp32")
        raise UsageError(
            f"--quantize {asked}: {target.name} supports {precision.label}, but fdec has no "
            f"{precision.label} quantization pass yet",
            f"use one of: {built}",
        )
    if method and method not in methods:
        raise UsageError(
            f"--quantize {asked}: unknown method {method!r} for {precision.value}",
            f"methods for {precision.value}: {', '.join(methods)}",
        )
    if precision.value == "fp32":
        return []
    # A backend that runs one method of a precision means it by the precision alone: the ONNX
    # Runtime CUDA model's int8 is weight-only (MatMulNBits), never Q/DQ it would emulate.
    method = method or bare_method(precision.value, target, backend, kind, keep_fp)
    weight_only_int8 = precision.value == "int8" and method == "wo"
    pass_backend = backend.graph_form
    # int4 for ONNX Runtime keeps a tied embedding tied: the lm_head's MatMulNBits and the
    # embedding's GatherBlockQuantized read one packed int4 table (SmolLM2: 84 MB instead of
    # 113 MB with an untied int4 lm_head and an int8 embedding).
    # Dynamic int8 (the CPU encoders' int8) does the same with one int8 table (SmolLM2: 140 MB).
    static_int8 = method == "smoothquant" or (not method and target.is_gpu)
    dynamic = precision.value == "int8" and not static_int8 and not weight_only_int8
    dynamic_int8 = dynamic and keep_fp is None
    share = (
        (precision.value in ("int4", "fp8") or dynamic_int8 or weight_only_int8)
        and pass_backend == "onnxruntime"
        and embedding
    )
    # A serving checkpoint of NVFP4 keeps the lm_head in float (llm-compressor's and ModelOpt's
    # NVFP4 leave it out too; vLLM serves no NVFP4 lm_head): quantized, it would be written
    # dequantized in fp32 (SmolLM2: 290.0 MB, 176.7 MB without; the checkpoint ties it again).
    fp4_checkpoint = precision.value == "fp4" and not embedding
    # An FP8 serving checkpoint likewise (vLLM's FP8 checkpoints leave it out), and its W8A16
    # layers hold FP8 weights: compressed-tensors' float-quantized format has no int8 ones.
    fp8_checkpoint = precision.value == "fp8" and not embedding
    untie = (
        []
        if share or "untie-embeddings" in earlier
        else [fdec_passes.make_pass("untie-embeddings")]
    )
    # The token embedding is the largest fp32 tensor left after weight quantization (113 MB of
    # SmolLM2's 202 MB int4 build); per-row int8 moved its perplexity by -0.1 % there. A table
    # the int4 pass shared (or a tied one quantize-mixed kept in float) is left as it is.
    embed_pass = fdec_passes.make_pass(
        "quantize-embedding", bits=8, backend=pass_backend, skip_shared=share
    )
    int4_options: dict[str, Any] = {
        "backend": pass_backend,
        "share_tied_embedding": share,
        **backend.weight_options,
    }
    if keep_fp is not None and not (precision.value == "int4" or dynamic):
        raise UsageError(
            f"--keep-fp works with --quantize int4 or int8-dynamic, not {asked}"
            + (" (static SmoothQuant Q/DQ on GPU targets)" if static_int8 else ""),
            "drop --keep-fp, or quantize weights only (int4)",
        )
    # AWQ (mixed too) keeps a source's own block grid (a GGUF's Q4_1, a GPTQ checkpoint's
    # groups) instead of rounding again.
    wider = tuple(w for w in source_widths if w > 4) if precision.value == "int4" else ()
    grid = ({"source_grid_widths": wider} if wider else {}) | (
        {
            "keep_source_grid": INT4_KEEP_SOURCE_GRID,
            "source_grid_levels": INT4_SOURCE_GRID_LEVELS,
            "source_grid_rounded_zero_points": INT4_SOURCE_GRID_ROUNDED_ZERO_POINTS,
        }
        if precision.value == "int4" and method.startswith("awq")
        # RTN keeps only integer-zero-point blocks (a GPTQ / AWQ / compressed-tensors source)
        else {"keep_source_grid": INT4_KEEP_SOURCE_GRID}
        if precision.value == "int4" or weight_only_int8
        else {}
    )
    if precision.value == "int4" and (keep_fp is not None or method == "awq-mixed"):
        # awq-mixed: the most sensitive layers (measured) in 8-bit weight-only, the rest AWQ
        # int4; --keep-fp N alone keeps N layers in fp32 instead.
        weights = fdec_passes.make_pass(
            "quantize-mixed",
            method="int4-awq" if method.startswith("awq") else "int4",
            quantizer_options={**int4_options, **grid},
            keep_fp=INT4_MIXED_KEEP if keep_fp is None else keep_fp,
            keep_bits=8 if method == "awq-mixed" else None,
            sensitivity_method="int4" if method == "awq-mixed" else None,
        )
    elif keep_fp is not None:
        weights = fdec_passes.make_pass(
            "quantize-mixed",
            method="int8",
            quantizer_options={"alpha": INT8_DYNAMIC_ALPHA},
            keep_fp=keep_fp,
        )
    elif weight_only_int8:
        weights = fdec_passes.make_pass("quantize-int8-wo", **grid, **int4_options)
    elif precision.value == "int4":
        name = "quantize-int4-awq" if method == "awq" else "quantize-int4"
        # TensorRT(-RTX) builds keep a 4-bit lm_head (their measured recipes).
        head_bits = INT4_LM_HEAD_BITS if pass_backend == "onnxruntime" else None
        weights = fdec_passes.make_pass(name, lm_head_bits=head_bits, **grid, **int4_options)
    elif precision.value == "fp8":
        # GPTQ rounding and one shared fp8 table (tied embedding = lm_head): SmolLM2 +11.5 %
        # at 0.31x with nearest rounding and two tables (docs/design-notes.md).
        weights = fdec_passes.make_pass(
            "quantize-fp8",
            share_tied_embedding=share,
            weight_rounding=FP8_WEIGHT_ROUNDING,
            weight_only=FP8_WEIGHT_ONLY,
            weight_only_layers=FP8_WEIGHT_ONLY_LAYERS,
            weight_only_fp8=fp8_checkpoint,
            include_lm_head=not fp8_checkpoint,
        )
    elif precision.value == "fp4":
        # NVFP4: W4A4 (TensorRT quantizes activations per block at run time), or weight-only.
        weights = fdec_passes.make_pass(
            "quantize-fp4",
            activations="float" if method == "wo" else "fp4",
            weight_rounding=FP4_WEIGHT_ROUNDING,
            weight_only=FP4_WEIGHT_ONLY,
            weight_only_layers=FP4_WEIGHT_ONLY_LAYERS,
            alpha_search=FP4_ALPHA_SEARCH,
            scale_search=FP4_SCALE_SEARCH,
            smoothing_folded_only=fp4_checkpoint,  # a serving checkpoint holds no Mul
            include_lm_head=not fp4_checkpoint,
        )
    # int8: weight-only (asked, or the backend's only int8), static SmoothQuant QDQ, dynamic.
    elif static_int8:
        weights = fdec_passes.make_pass(
            "quantize-int8-static",
            alpha=SMOOTHQUANT_ALPHA,
            alpha_search=SMOOTHQUANT_ALPHA_SEARCH,
            weight_only=SMOOTHQUANT_WEIGHT_ONLY,
        )
    else:
        # SmoothQuant before the run-time per-tensor activation scales (calibrated).
        wide = INT8_ENCODER_WEIGHT_ONLY if kind == "encoder" else INT8_WEIGHT_ONLY
        weights = fdec_passes.make_pass(
            "quantize-int8",
            alpha=INT8_DYNAMIC_ALPHA,
            share_tied_embedding=share,
            weight_only=wide,
        )
    # A serving checkpoint keeps the embedding in float: its loaders quantize Linear layers only.
    return [*untie, weights, embed_pass] if embedding else [*untie, weights]


def bare_method(
    precision: str, target: Any, backend: Any, kind: str = "decoder", keep_fp: int | None = None
) -> str:
    """The method `--quantize PRECISION` alone means on `target` and `backend` for a model of
    `kind` ("": the precision's usual one). Its one place: the recipe, --emit's check and
    `fdec plan` all ask here."""
    method = backend.methods.get(precision, ("",))[0]
    if not method and precision == "int8" and not target.is_gpu and keep_fp is None:
        method = CPU_INT8_METHOD.get(kind, "")  # --keep-fp: dynamic's mixed recipe
    return method


def check_emit(
    emit: tuple[str, ...],
    quantize: str | None,
    target: Any,
    backend: Any,
    *,
    kind: str = "decoder",
    keep_fp: int | None = None,
) -> None:
    """Refuse an unknown --emit, or an hf-checkpoint of a build it cannot write; a bare
    precision is judged by what it means for `target` and `backend` (a cpu decoder's int8 is
    int8-wo)."""
    for item in emit:
        if item not in EMITS:
            raise UsageError(f"unknown --emit {item!r}", f"use one of: {', '.join(EMITS)}")
    if "hf-checkpoint" not in emit:
        return
    if quantize and "-" not in quantize:
        method = bare_method(quantize.lower(), target, backend, kind, keep_fp)
        quantize = f"{quantize}-{method}" if method else quantize
    check_quantize(quantize)


def _build_tolerance(pipeline: list[Any], max_ppl_increase: float | None) -> Tolerance:
    """The whole build's gate: exact for fp32 pipelines, else the loosest pass tolerance plus a
    perplexity bound, without requiring identical greedy tokens."""
    lossy = [p.tolerance for p in pipeline if p.tolerance != EXACT]
    if not lossy:
        if max_ppl_increase is not None:
            return dataclasses.replace(FP32_TOLERANCE, max_perplexity_increase=max_ppl_increase)
        return FP32_TOLERANCE
    gate = default_gate(pipeline)  # a measured recipe's gate (fdec.gates), else the generic one
    tolerance = (
        gate.tolerance()
        if gate
        else GateTolerance(
            max_abs_error=max(t.max_abs_error for t in lossy),
            min_top1_agreement=min(t.min_top1_agreement for t in lossy),
            max_perplexity_increase=DEFAULT_MAX_PPL_INCREASE,
            greedy_identical=False,
            source="generic gate (no measured recipe: fdec.gates)",
        )
    )
    if max_ppl_increase is None:
        return tolerance
    return dataclasses.replace(tolerance, max_perplexity_increase=max_ppl_increase)


@dataclasses.dataclass
class Recipe:
    """The passes a compile runs, the gate its build must meet, and how ORT runs it."""

    pipeline: list[Any]
    tolerance: Tolerance
    optimization: str  # ORT graph optimization the build is verified and run at
    calibration_texts: list[str] | None
    # The provider the build's graph is made for when it is not the CPU ("CUDAExecutionProvider"
    # for onnxruntime-cuda): verification on the CPU says what it could not run as built.
    device_graph: str | None = None

    @property
    def pass_names(self) -> list[str]:
        return [p.name for p in self.pipeline]

    @property
    def unties_embeddings(self) -> bool:
        """A tied lm_head gets its own weight (made in fp32 before it is quantized)."""
        return "untie-embeddings" in self.pass_names

    @property
    def calibrating(self) -> list[int]:
        return [i for i, p in enumerate(self.pipeline) if getattr(p, "needs_calibration", False)]

    def attach_calibration(self, tokenizer: Any, spec: Any) -> None:
        """Give every calibrating pass the tokenized calibration batches (for `spec`, the
        model's ModelSpec: its vocabulary and positions)."""
        texts = self.calibration_texts or []
        batches = tuple(
            calibration_batches(
                texts, tokenizer, spec.vocab_size, max_positions=spec.max_positions or 0
            )
        )
        for index in self.calibrating:
            self.pipeline[index] = dataclasses.replace(self.pipeline[index], batches=batches)


def plan_pipeline(
    *,
    target: Any,
    backend: str | Any,
    passes: str | None = None,
    quantize: str | None = None,
    max_ppl_increase: float | None = None,
    calibration: pathlib.Path | None = None,
    emit: tuple[str, ...] = (),
    keep_fp: int | None = None,
    kv_dtype: str | None = None,
    kv_window: int | None = None,
    kv_sink: int | None = None,
    model_window: ModelWindow | None = None,
    pass_options: Mapping[str, Mapping[str, Any]] | None = None,
    sparsity: str | None = None,
    kind: str = "decoder",
    source_widths: tuple[int, ...] = (),
) -> Recipe:
    """Everything about the pipeline that can be decided (and refused) before loading a model.

    `pass_options` ({pass name: {option: value}}, the config file's [pass_options.NAME]) set
    options of passes the pipeline has; naming a pass it does not have is an error. `kind`
    (the ModelSpec's: "decoder" or "encoder") selects the quantizers' per-kind defaults.
    `model_window`: the model's own sliding window (kv-policy). `source_widths`: the bit
    widths of a quantized source's layers (fdec.frontend.prequantized.source_widths)."""
    backend = get_backend(backend) if isinstance(backend, str) else backend
    check_precision(backend, quantize)  # e.g. fp8 Q/DQ for the ONNX Runtime CUDA model
    names = fdec_passes.parse_pass_list(passes)
    # --sparsity masks fp32 weights before any quantizer (symmetric codes keep the zeros).
    pipeline = (
        fdec_passes.make_pipeline(names)
        + _sparsity_passes(sparsity, names)
        + _quantize_passes(
            quantize,
            target,
            backend,
            names,
            embedding="hf-checkpoint" not in emit,
            keep_fp=keep_fp,
            kind=kind,
            source_widths=source_widths,
        )
    )
    accepted = backend.kv_dtypes
    if kv_dtype is not None and accepted is not None and kv_dtype not in accepted:
        raise UsageError(
            f"--kv-dtype {kv_dtype}: the {backend.name} backend takes {', '.join(accepted)} "
            f"({backend.kv_dtypes_why})",
            f"drop --kv-dtype, or give {', '.join(accepted)}",
        )
    if kv_dtype is not None and backend.kv_dtype is not None:
        if kv_dtype != backend.kv_dtype:
            raise UsageError(
                f"--kv-dtype {kv_dtype}: the {backend.name} graph keeps its KV cache in "
                f"{backend.kv_dtype}",
                f"drop --kv-dtype (or give {backend.kv_dtype}), or use --backend tensorrt",
            )
        kv_dtype = None  # the backend's graph has that cache already
    kv_passes = kv_cache_passes(kv_dtype, kv_window, kv_sink, model_window=model_window)
    # fuse-attention runs last by default (after quantization: the quantizers and AWQ's norm
    # folding see the traced graph), for ONNX Runtime builds of fp32/int4 weights; a
    # --passes list places it where the user put it. The pass refuses other backends.
    pipeline = [
        dataclasses.replace(p, backend=backend.name) if p.name == "fuse-attention" else p
        for p in pipeline
    ]
    pipeline = _after_masking(pipeline)
    # The backend's own graph preparation (ONNX Runtime: attention fusion and packed QKV).
    pipeline += backend.prepare_passes(
        pipeline=pipeline, custom=passes is not None, emit=emit, kv_sink=kv_sink,
        quantize=quantize, target=target,
    )  # fmt: skip
    # KV-cache passes go last: they rewrite the cache I/O of the final (possibly fused) graph.
    pipeline += kv_passes
    pipeline = _with_pass_options(pipeline, pass_options or {})
    if "genai" in emit:
        check_genai_cache(pipeline)
    check_order(pipeline, custom=passes is not None)
    PassManager(pipeline, target=target).check_requirements()
    needs = any(getattr(p, "needs_calibration", False) for p in pipeline)
    # ONNX Runtime runs FP8/INT8 QDQ graphs on the CPU only at optimization BASIC (DESIGN.md).
    qdq = any(p.writes_qdq for p in pipeline)
    return Recipe(
        pipeline=pipeline,
        tolerance=_build_tolerance(pipeline, max_ppl_increase),
        optimization="basic" if qdq else "all",
        calibration_texts=load_calibration_texts(calibration) if needs else None,
        device_graph=None
        if backend.providers[0] == "CPUExecutionProvider" or backend.fixed_shapes
        else backend.providers[0],
    )


def _with_pass_options(
    pipeline: list[Any], pass_options: Mapping[str, Mapping[str, Any]]
) -> list[Any]:
    """The pipeline with each named pass rebuilt with its extra options (checked again by the
    pass's own __post_init__)."""
    names = [p.name for p in pipeline]
    for name in pass_options:
        if name not in names:
            near = difflib.get_close_matches(name, names, n=1)
            raise UsageError(
                f"pass_options names {name!r}, which this build's pipeline does not run",
                (f"did you mean {near[0]!r}? " if near else "") + f"its passes: {', '.join(names)}",
            )
    rebuilt = []
    for pass_ in pipeline:
        options = dict(pass_options.get(pass_.name, {}))
        if options:
            fields = {f.name for f in dataclasses.fields(pass_) if f.init}
            for option in options:
                if option not in fields:
                    near = difflib.get_close_matches(option, sorted(fields), n=1)
                    raise UsageError(
                        f"pass {pass_.name} has no option {option!r}",
                        (f"did you mean {near[0]!r}? " if near else "")
                        + f"its options: {', '.join(sorted(fields))} (fdec passes)",
                    )
            try:
                pass_ = dataclasses.replace(pass_, **options)
            except (TypeError, ValueError) as err:
                raise UsageError(
                    f"bad options for pass {pass_.name}: {err}", "see `fdec passes`"
                ) from None
        rebuilt.append(pass_)
    return rebuilt


_SPARSITY = ("none", "2:4")


def _sparsity_passes(sparsity: str | None, earlier: list[str]) -> list[Any]:
    """sparsify-2of4 for --sparsity 2:4 (unless --passes already runs it)."""
    if sparsity is None or sparsity == "none":
        return []
    if sparsity not in _SPARSITY:
        raise UsageError(f"unknown --sparsity {sparsity!r}", "use 2:4 (or none)")
    if "sparsify-2of4" in earlier:
        return []
    # Scores |w| · ‖x_k‖ on the calibration text (Wanda): SmolLM2-135M (MLP, 128 held tokens,
    # fp32 54.05) 165.1 (+205 %) where plain |w| gave 902.6; with skip_first=skip_last=2 98.9
    # (+83 %) against 156.6 (docs/design-notes.md). score=magnitude needs no data.
    return [fdec_passes.make_pass("sparsify-2of4", score="activation")]


def _after_masking(pipeline: list[Any]) -> list[Any]:
    """Passes after one that masks weights take their `options_after_masking`."""
    rebuilt, masked = [], False
    for pass_ in pipeline:
        if masked and pass_.options_after_masking:
            pass_ = dataclasses.replace(pass_, **dict(pass_.options_after_masking))
        masked = masked or pass_.masks_weights
        rebuilt.append(pass_)
    return rebuilt


# Ordering constraints of the default composition, as (this family, before that family): the
# model is torch.fx's this_before_that_pass_constraint. Checked for every default pipeline;
# a --passes list is the user's order.
ORDER = (
    ("prune", "quantize"),  # masks before quantizers (symmetric codes keep the zeros)
    ("quantize", "fuse"),  # quantizers and AWQ's norm folding see the traced graph
    ("quantize", "kv_cache"),  # the cache passes rewrite the I/O of the final graph
    ("fuse", "kv_cache"),
)


def check_order(pipeline: list[Any], *, custom: bool = False) -> None:
    """Raise when a composed pipeline breaks `ORDER` (a bug in the composition, not input).
    A --passes list (`custom`) may order quantizers and fusion its own way, but not a KV-cache
    pass before them: a quantizer calibrating after quantize-kv-cache fed its float cache to
    int8 inputs and died."""
    if not custom:
        families = [p.family for p in pipeline]
        for first, then in ORDER:
            if first in families and then in families:
                last_first = len(families) - 1 - families[::-1].index(first)
                if last_first > families.index(then):
                    raise AssertionError(f"recipe puts a {first} pass after a {then} pass")
        return
    cache = next((i for i, p in enumerate(pipeline) if p.family == "kv_cache"), None)
    calibrating = [i for i, p in enumerate(pipeline) if getattr(p, "needs_calibration", False)]
    if cache is not None and calibrating and cache < calibrating[-1]:
        first, late = pipeline[cache].name, pipeline[calibrating[-1]].name
        raise UsageError(
            f"--passes: {first} rewrites the KV-cache I/O of the final graph, and {late} "
            "calibrates after it",
            f"list {first} after {late} (the target's recipe adds its quantizer after the list "
            "when the list names none), or give --kv-dtype instead",
        )


def sensitivity_pass(method: str, options: Mapping[str, Any], batches: Any) -> Any:
    """The pass measuring each layer's sensitivity to the weight quantizer `method` (with its
    `options`) on two calibration batches: what a failed quality gate reports."""
    return fdec_passes.make_pass(
        "quantize-mixed", method=method, quantizer_options=dict(options), batches=batches,
        max_batches=2,
    )  # fmt: skip


def prune_recipe(prune: str, calibration: pathlib.Path | None) -> Recipe:
    """The prune stage's recipe: the cleanup passes, then `prune` as --prune says (scored on
    the calibration text); judged by its own figures, run at optimization "all"."""
    prune_pass = fdec_passes.make_pass("prune", **parse_prune(prune))
    return Recipe(
        pipeline=[*fdec_passes.make_pipeline(list(fdec_passes.DEFAULT_PIPELINE)), prune_pass],
        tolerance=prune_pass.tolerance,
        optimization="all",
        calibration_texts=load_calibration_texts(calibration)
        if prune_pass.needs_calibration
        else None,
    )
