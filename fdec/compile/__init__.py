"""`fdec compile` as a Python API: resolve → front → optimize → lower → verify → engines → write.

Each stage is a module of this package (docs/architecture.md has the picture):

    resolve   options → Settings (target, backend, limits, recipe); nothing loaded yet
    prune     --prune: the source pruned into a smaller checkpoint, which the build then compiles
    front     the source → ONNX export, PyTorch reference, cached pass results (fdec.cache)
    optimize  the recipe's passes (shared pipeline, then the backend's own preparation)
    lower     the build's files (model.onnx, runtime config, --emit outputs)
    gate      verification against the source and the quality gate
    write     report.json, report.html, fdec-build.json (inside the atomic build)
    draft     --draft: a second, layer-pruned build into draft/

`recipe` composes the pipeline from what passes declare; backends (fdec.backends) prepare their
graphs and build their engines.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from fdec import backends
from fdec.build import AtomicBuild, scratch_folder
from fdec.compile.defaults import (
    DEFAULT_MAX_PPL_INCREASE,
    INT8_DYNAMIC_ALPHA,
    INT8_ENCODER_WEIGHT_ONLY,
    INT8_WEIGHT_ONLY,
)
from fdec.compile.draft import plan_draft
from fdec.compile.front import Front
from fdec.compile.gate import Fp16OverflowError, verify_written
from fdec.compile.lower import write_files
from fdec.compile.optimize import run_passes
from fdec.compile.options import CompileOptions, CompileResult
from fdec.compile.prune import add_student, check_prunable, prune_model
from fdec.compile.recipe import FP32_TOLERANCE, Recipe, default_quantize, plan_pipeline
from fdec.compile.resolve import (
    DEFAULT_MAX_SEQ_LEN,
    Settings,
    check_before_load,
    open_source,
    resolve_settings,
)
from fdec.compile.write import Addition, write_build
from fdec.ir.spill import WeightSpill
from fdec.lower.engines import build_engines
from fdec.student import distill_pruned

__all__ = [
    "DEFAULT_MAX_PPL_INCREASE",
    "DEFAULT_MAX_SEQ_LEN",
    "FP32_TOLERANCE",
    "INT8_DYNAMIC_ALPHA",
    "INT8_ENCODER_WEIGHT_ONLY",
    "INT8_WEIGHT_ONLY",
    "CompileOptions",
    "CompileResult",
    "Recipe",
    "choose_backend",
    "compile_model",
    "default_quantize",
    "plan_pipeline",
]


def choose_backend(asked: str | None, target: Any) -> str:
    """The backend a compile uses: `asked`, else the target's (fdec.backends.choose_backend)."""
    return backends.choose_backend(asked, target).name


def compile_model(
    options: CompileOptions, progress: Callable[[str], None] = lambda message: None
) -> CompileResult:
    """Compile `options.model` into `options.out`; raises FdecError subclasses on failure.

    With `prune`, the source is pruned first and the pruned checkpoint is compiled, the build
    carrying it in `student/`; with `draft`, a layer-pruned draft is compiled into the build's
    `draft/` (for `fdec run --speculative draft`)."""
    return _compile(options, progress, draft=True)


def _compile(
    options: CompileOptions, progress: Callable[[str], None], *, draft: bool
) -> CompileResult:
    """resolve → [prune] → build; with `draft`, the build also carries --draft's model."""
    started = time.perf_counter()
    settings = resolve_settings(options)  # everything checkable without the model, checked first
    source = open_source(options, progress)
    settings = settings.for_source(source)
    additions: list[Addition] = []
    if draft and options.draft:
        check_prunable(source)
        planned = plan_draft(options.draft, source.config, settings.recipe.pipeline)
        additions.append(
            planned.addition(options, progress, functools.partial(_compile, draft=False))
        )
    if not options.prune:
        return _build(settings, source, additions, progress, started)
    pruned = prune_model(options, source, settings.target, progress, prune=options.prune)
    try:
        if options.distill_steps:
            distill_pruned(pruned, options.distill_steps, options, progress)
        # The build proper compiles the pruned checkpoint like any other model.
        student = dataclasses.replace(
            options, model=str(pruned.folder), prune=None, draft=None, distill_steps=0
        )
        student_source = open_source(student, progress)
        student_settings = resolve_settings(student).for_source(student_source)
        additions.append(add_student(pruned, source, options.prune))
        return _build(student_settings, student_source, additions, progress, time.perf_counter())
    finally:
        pruned.cleanup()


def _build(
    settings: Settings,
    source: Any,
    additions: Sequence[Addition],
    progress: Callable[[str], None],
    started: float,
) -> CompileResult:
    """front → optimize → lower → verify → engines → write, for one resolved source. Where the
    backend's default fp16 graph overflowed on held text (inf/NaN logits the fp32 model does
    not have), it builds again typed bf16 (fp32's exponent range) where the backend and target
    take it, the report's recipe saying why; the passes before the typing come from the cache."""
    # Capacity from config.json alone: a --max-batch × --max-seq-len that cannot fit the
    # target's memory fails here (exit 4, CapacityError), before the model loads.
    settings = check_before_load(settings.options, source, settings)
    options, target, recipe = settings.options, settings.target, settings.recipe
    out = pathlib.Path(options.out)
    progress(f"recipe: --quantize {settings.quantize} ({settings.chosen_by})")
    # Refused here (exit 4) when this machine's memory or disk cannot hold the compile. The
    # cache serves the export, the reference and the longest cached prefix of the pipeline.
    front = Front(options, source, recipe, progress, settings=settings)
    model, cached_records = front.resume()
    if model is None:
        progress(f"loading {source.given} ({source.family.name}, {source.kind})")
        model = front.export()
    else:
        progress(f"passes 1-{front.resumed} of {len(recipe.pipeline)} taken from the cache")
    spec = model.spec
    settings.check_limits(spec)
    reference = front.reference(spec)
    front.release_hf_model()
    # Streamed: new weights go to a data file beside the build until it is written (ir.spill).
    spill = (
        WeightSpill(scratch_folder(out, "spill")).attach(model.graph) if front.streamed else None
    )
    try:
        optimized = run_passes(
            options, recipe, front, model, cached_records, reference, target=target,
            progress=progress,
        )  # fmt: skip
        del model  # optimized.model holds it until lowering drops it
        with AtomicBuild(out, force=options.force, keep=settings.keep) as staging:
            lowered = write_files(
                optimized, staging, out=out, source=source, target=target,
                optimization=recipe.optimization, emit=options.emit, progress=progress,
                backend=settings.backend,
            )  # fmt: skip
            if spill is not None:
                front.export_info["spilled"] = spill.to_dict()
                spill.close()
            verification = verify_written(
                staging, reference, recipe, optimized, front, progress, spec=spec
            )
            # Engines build from their backend's typed model, checked against the reference.
            engines = build_engines(
                staging, spec=spec, target=target, backend=settings.backend.name,
                limits=settings.limits, reference=reference, tolerance=recipe.tolerance,
                progress=progress,
            )  # fmt: skip
            report = write_build(
                staging, settings=settings, source=source, spec=spec, front=front,
                optimized=optimized, lowered=lowered, verification=verification,
                engines=engines, capacity=settings.capacity, started=started,
                additions=additions,
            )  # fmt: skip
    except Fp16OverflowError as err:
        bf16 = settings.bf16_instead(f"{err.nonfinite} inf/NaN logits on held text")
        if bf16 is None:
            raise
        if spill is not None:
            spill.close()
        progress(f"{err.problem}: typing the graph bf16 instead (fp32's range)")
        return _build(bf16, source, additions, progress, started)
    finally:
        if spill is not None:
            spill.close()
    return CompileResult(out, report)
