"""Resolve: the options checked and turned into settings (target, backend, limits, recipe).

Everything that can be checked without loading the model is checked here, first: the target
and backend, the output path, the recipe (passes, quantization, emits), the --prune and
--draft values. `for_source` finishes the settings once the source model is known (an
encoder's default recipe differs; --emit genai needs a decoder). `check_before_load` is the
whole pre-load check for one source, capacity included: the build runs it on the model it
compiles, and fdec.matrix on every cell before any build.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from fdec.backends import Backend, choose_backend
from fdec.build import check_output_path
from fdec.compile.options import CompileOptions
from fdec.compile.recipe import Recipe, check_emit, default_quantize, plan_pipeline
from fdec.errors import InputError, UsageError
from fdec.frontend.families import sliding_window
from fdec.frontend.fp8_checkpoint import Fp8Scheme, with_modelopt
from fdec.frontend.prequantized import (
    SOURCE_KEY,
    source_quantization,
    source_recipe,
    source_widths,
)
from fdec.frontend.source import default_cache_dir, resolve_source
from fdec.lower.hf_checkpoint import check_source
from fdec.lower.profiles import ShapeLimits
from fdec.passes import parse_pass_list, weight_quantizers
from fdec.passes.kv_cache import ModelWindow
from fdec.passes.prune import parse_prune
from fdec.plan import check_capacity
from fdec.student import parse_draft
from fdec.targets import load_target

__all__ = [
    "DEFAULT_MAX_SEQ_LEN",
    "Settings",
    "check_before_load",
    "open_source",
    "resolve_settings",
]

DEFAULT_MAX_SEQ_LEN = 2048


def _source_recipe(config: Any, target: Any, backend: Any) -> str | None:
    """The recipe keeping the blocks of a checkpoint fdec reads as quantized
    (fdec.frontend.prequantized.source_recipe), else None."""
    found = source_quantization(config) if isinstance(config, dict) else None
    return source_recipe(found, target, backend)


def _folder_recipe(model: str, target: Any, backend: Any) -> str | None:
    """`_source_recipe` of a local folder (hub ids are known once resolved, in `for_source`)."""
    folder = pathlib.Path(model).expanduser()
    try:
        config = with_modelopt(json.loads((folder / "config.json").read_text()), folder)
    except (OSError, ValueError):
        return None
    return _source_recipe(config, target, backend)


def _describe_source(config: dict) -> str:
    """What a GPTQ / AWQ / compressed-tensors / FP8 source was (fdec.frontend.prequantized)."""
    found = config[SOURCE_KEY]
    if found.get("method") == "nvfp4":
        return f"{found.get('tool', 'compressed-tensors')} NVFP4"
    if found.get("method") == "fp8":
        return Fp8Scheme(**found["fp8"]).describe()
    group = found.get("group_size")
    widths = "+".join(map(str, source_widths(config) or (4,)))
    return f"{found.get('method')} int{widths}" + (
        f" (group {group})" if group and group > 0 else ""
    )


@dataclasses.dataclass
class Settings:
    """A compile's decisions before any model loads."""

    options: CompileOptions
    target: Any
    backend: Backend
    limits: ShapeLimits
    quantize: str  # the --quantize value in force (the target's default recipe when not given)
    recipe_default: bool  # quantize came from the target, not the options
    recipe: Recipe
    capacity: Any = None  # fdec.plan's capacity plan for the source (check_before_load)
    fallback: str | None = None  # why the default precision was given up (bf16_instead)
    listed_quantizer: str | None = None  # the --passes list's own weight quantizer
    model_window: ModelWindow | None = None  # the model's own sliding window

    @property
    def keep(self) -> tuple[pathlib.Path, ...]:
        """Never replaced by the build, even with --force (fdec.build)."""
        return _kept(self.options)

    @property
    def chosen_by(self) -> str:
        if self.listed_quantizer:
            return f"weights quantized by --passes {self.listed_quantizer}"
        if not self.recipe_default:
            return "options"
        if self.backend.default_quantize:  # e.g. onnxruntime-cuda: fp16 until int4 is measured
            chosen = f"backend {self.backend.name} default"
        else:
            chosen = f"target {self.target.name} default"
        return f"{chosen}, {self.fallback}" if self.fallback else chosen

    def bf16_instead(self, why: str) -> Settings | None:
        """These settings typed bf16 instead of a default fp16 whose graph overflowed (`why`),
        where the backend and the target take bf16; None where they do not or where fp16 was
        asked for (the error stands)."""
        from fdec.passes.typing import choose_float_dtype

        if not self.recipe_default or self.quantize != "fp16" or self.fallback:
            return None
        if "bf16" not in self.backend.precisions or choose_float_dtype(self.target) != "bf16":
            return None
        recipe = _plan(
            self.options, self.target, self.backend, "bf16", model_window=self.model_window
        )
        fallback = f"bf16: the fp16 graph overflowed ({why})"
        return dataclasses.replace(self, quantize="bf16", recipe=recipe, fallback=fallback)

    def for_source(self, source: Any) -> Settings:
        """The settings for `source`: an encoder takes the target's encoder recipe; a decoder
        with its own sliding window gets it as a KV-cache policy (kv-policy)."""
        options = self.options
        if "genai" in options.emit and source.family.kind != "decoder":
            raise UsageError(
                f"--emit genai is for decoder builds; {options.model} is an {source.family.kind}",
                "drop --emit genai",
            )
        kind = source.family.kind
        if "hf-checkpoint" in options.emit:
            check_source(self.quantize, source.config, kind)
        if kind != "decoder":  # an encoder's own recipe (and, by default, quantization)
            quantize = (
                default_quantize(self.target, kind, self.backend)
                if self.recipe_default
                else self.quantize
            )
            recipe = _plan(options, self.target, self.backend, quantize, kind=kind)
            return dataclasses.replace(self, quantize=quantize, recipe=recipe)
        found = sliding_window(_hf_config(source))
        # transformers' window counts the query itself; the policy counts its past.
        window = ModelWindow(found[0] - 1, found[1]) if found else None
        # A GPTQ/AWQ/compressed-tensors checkpoint (read as float weights on its grid) keeps
        # its blocks: int4-awq (int8-wo for 8 bits) keeps them exactly (keep_source_grid) and
        # quantizes what the checkpoint left in float (the lm_head) itself.
        # Layers it stores wider (GPTQModel's dynamic 8-bit ones) keep their blocks too.
        kept = (
            _source_recipe(source.config, self.target, self.backend)
            if self.recipe_default
            else None
        )
        quantize = kept or self.quantize
        fallback = f"{quantize}: the source is {_describe_source(source.config)}" if kept else None
        widths = source_widths(source.config)
        if (window and window != self.model_window) or quantize != self.quantize or len(widths) > 1:
            window = window or self.model_window
            recipe = _plan(options, self.target, self.backend, quantize, model_window=window,
                           source_widths=widths)  # fmt: skip
            return dataclasses.replace(self, quantize=quantize, recipe=recipe, model_window=window,
                                       fallback=fallback or self.fallback)  # fmt: skip
        return dataclasses.replace(self, fallback=fallback) if fallback else self

    def check_limits(self, spec: Any) -> None:
        """Engines built for fixed shape ranges: the limits must fit the model (a default
        --max-seq-len shrinks to the model's positions)."""
        if not (self.target.is_gpu and self.backend.fixed_shapes):
            return
        if self.options.max_seq_len is None and spec.max_positions:
            self.limits = dataclasses.replace(
                self.limits, max_seq_len=min(DEFAULT_MAX_SEQ_LEN, spec.max_positions)
            )
        self.limits.check_against(spec)


def resolve_settings(options: CompileOptions) -> Settings:
    """Check `options` and decide everything that needs no model; FdecError on bad input."""
    target = load_target(options.target)
    backend = choose_backend(options.backend, target)
    limits = ShapeLimits(
        max_batch=options.max_batch, max_seq_len=options.max_seq_len or DEFAULT_MAX_SEQ_LEN
    )
    check_output_path(pathlib.Path(options.out), force=options.force, keep=_kept(options))
    # Without --quantize the target's default recipe applies; it depends on the model's kind
    # (encoders quantize differently), known once the source resolves: plan for a decoder now
    # so a bad combination fails before any work, and re-plan if the model is an encoder.
    # A serving checkpoint is written in full precision unless asked otherwise: its loaders
    # take only some quantized formats (fdec.lower.hf_checkpoint.SUPPORTED_QUANTIZE).
    # A --passes list naming its own weight quantizer takes the place of the target's: the
    # default was appended after it, quantizing twice (the report naming the default).
    listed = weight_quantizers(parse_pass_list(options.passes)) if options.passes else []
    if listed and options.quantize:
        raise UsageError(
            f"--quantize {options.quantize} and --passes {listed[0]} both quantize the weights",
            "give one of them",
        )
    recipe_default = not (options.quantize or listed) and "hf-checkpoint" not in options.emit
    quantize = options.quantize or (
        default_quantize(target, "decoder", backend)
        if recipe_default
        else (backend.default_quantize or "none")  # a backend's own float typing stays
    )
    kept = _folder_recipe(options.model, target, backend) if recipe_default else None
    if kept:  # as for_source would: --pass-options for its passes are checked against this plan
        quantize = kept
    recipe = _plan(options, target, backend, quantize)
    if options.prune:
        parse_prune(options.prune)
    parse_draft(options.draft)
    return Settings(
        options, target, backend, limits, quantize, recipe_default, recipe,
        listed_quantizer=listed[0] if listed else None,
    )  # fmt: skip


def check_before_load(
    options: CompileOptions, source: Any, settings: Settings | None = None
) -> Settings:
    """Everything `fdec compile` checks before it loads `source` (fdec.frontend's
    ModelSource): the settings (`settings`, else resolve_settings(options)) for the source's
    kind, and whether --max-batch × --max-seq-len fit the target's memory, from config.json
    alone (CapacityError, exit 4). FdecError on the first problem; the settings, with their
    capacity plan, otherwise."""
    settings = (settings or resolve_settings(options)).for_source(source)
    capacity = check_capacity(
        source.config, settings.target, model=source.given, weights=settings.quantize,
        kv_dtype=options.kv_dtype, batch=settings.limits.max_batch, context=options.max_seq_len,
        default_context=DEFAULT_MAX_SEQ_LEN,
    )  # fmt: skip
    return dataclasses.replace(settings, capacity=capacity)


def open_source(options: CompileOptions, progress: Any) -> Any:
    """The source model (fdec.frontend.source.ModelSource): a folder, file, hub id or name."""
    return resolve_source(
        options.model,
        trust_pickle=options.trust_pickle,
        cache_dir=options.cache_dir or default_cache_dir(),
        progress=progress,
    )


def _kept(options: CompileOptions) -> tuple[pathlib.Path, ...]:
    """The model compiled and the cache: never replaced by -o, even with --force."""
    return (pathlib.Path(options.model), options.cache_dir or default_cache_dir())


def _hf_config(source: Any) -> Any:
    """transformers' config object for the source's config.json (its defaults filled in)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(**source.config)
    except Exception as err:  # transformers' config classes raise many kinds
        first = " ".join(str(err).split())[:240] or type(err).__name__
        raise InputError(
            f"config.json of {source.folder} does not load in transformers: {first}",
            "use the config.json that came with the model",
        ) from None


def _plan(
    options: CompileOptions,
    target: Any,
    backend: Backend,
    quantize: str,
    *,
    kind: str = "decoder",
    model_window: ModelWindow | None = None,
    source_widths: tuple[int, ...] = (),
) -> Recipe:
    check_emit(options.emit, quantize, target, backend, kind=kind, keep_fp=options.keep_fp)
    return plan_pipeline(
        target=target,
        backend=backend,
        passes=options.passes,
        quantize=quantize,
        max_ppl_increase=options.max_ppl_increase,
        calibration=options.calibration,
        emit=options.emit,
        keep_fp=options.keep_fp,
        kv_dtype=options.kv_dtype,
        kv_window=options.kv_window,
        kv_sink=options.kv_sink,
        model_window=model_window,
        pass_options=options.pass_options,
        sparsity=options.sparsity,
        source_widths=source_widths,
        kind=kind,
    )
