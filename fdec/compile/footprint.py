"""What compiling a model takes on this machine, known before anything loads: the peak RSS
(whole-model or streamed, fdec.plan.compile_memory) and the disk (fdec.plan.compile_disk).

`fdec compile` refuses up front when either cannot fit (CapacityError, exit 4), streaming the
weights when only the streamed front end fits; `fdec plan` shows the same figures for each
target (`compile_footprints`), from the checkpoint's headers and config.json.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import tempfile
from collections.abc import Callable
from typing import Any

from fdec.calibrate_layerwise import layerwise_kinds
from fdec.errors import CapacityError, FdecError
from fdec.frontend.stream import STREAM_PARAMETERS, checkpoint_parameters
from fdec.lower.tensorrt_model import MODEL_DIR as TYPED_DIR
from fdec.plan.compile_disk import check_compile_disk, predict_compile_disk
from fdec.plan.compile_memory import (
    CompileMemory,
    available_memory,
    check_compile_memory,
    predict_compile_memory,
)

__all__ = ["check_footprint", "compile_footprints", "plan_memory", "streams_by_default"]


def _memory_options(settings: Any) -> dict[str, Any]:
    recipe = settings.recipe
    return {
        "quantize": settings.quantize,
        "target": settings.target,
        "calibrates": bool(recipe.calibrating),
        "calibration": layerwise_kinds([recipe.pipeline[i] for i in recipe.calibrating]),
    }


def streams_by_default(parameters: int, stream: bool | None) -> bool:
    """--stream/--no-stream when given, else whether the checkpoint is above STREAM_PARAMETERS."""
    return parameters > STREAM_PARAMETERS if stream is None else stream


def plan_memory(
    source: Any, settings: Any, *, parameters: int, stream: bool | None,
    progress: Callable[[str], None],
) -> tuple[CompileMemory, bool]:  # fmt: skip
    """(the predicted peak RSS, whether the compile streams), for a checkpoint of `parameters`.
    Unless `stream` was given, a compile that fits only when streamed is streamed.
    CapacityError (exit 4) when the chosen front end cannot fit this machine."""
    check = functools.partial(check_compile_memory, source, **_memory_options(settings))
    streamed = streams_by_default(parameters, stream)
    if stream is not None or streamed:
        return check(streamed=streamed), streamed
    try:
        return check(streamed=False), False
    except CapacityError as refused:
        memory = check(streamed=True)  # raises when streaming does not fit either
        progress(f"streaming the weights: {refused.problem}")
        return memory, True


def _disk_options(settings: Any) -> dict[str, Any]:
    return {
        "quantize": settings.quantize,
        "target": settings.target,
        # A strongly typed backend (TensorRT) writes a typed model and checks an emulated copy.
        "typed": settings.target.is_gpu and TYPED_DIR in settings.backend.files,
        "untie": settings.recipe.unties_embeddings,
    }


def check_footprint(
    source: Any, settings: Any, *, parameters: int, progress: Callable[[str], None]
) -> tuple[CompileMemory, bool]:
    """`plan_memory` for a compile's settings, then its disk: the disks the build (beside
    -o) and its scratch copies go to must hold them. CapacityError (exit 4) up front, not
    after an hour of passes."""
    options = settings.options
    memory, streamed = plan_memory(
        source, settings, parameters=parameters, stream=options.stream, progress=progress
    )
    check_compile_disk(
        source, out=pathlib.Path(options.out), streamed=streamed, **_disk_options(settings)
    )
    return memory, streamed


def compile_footprints(
    model: str, targets: list[str], *, quantize: str | None = None,
    cache_dir: pathlib.Path | None = None, out: pathlib.Path | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """What `fdec compile MODEL --target T [--quantize Q] -o OUT` would take here (OUT:
    ./build) for each of `targets`, for `fdec plan`: {"quantize", "streamed",
    "peak_rss_bytes", "available_bytes", "fits", "problem", "disk_bytes" (per folder)}, or
    {"error": ...} when it would be refused for another reason. The source is opened once;
    nothing is loaded but config.json and the checkpoint's headers."""
    from fdec.compile.options import CompileOptions
    from fdec.compile.resolve import open_source, resolve_settings

    # Resolved as for a build in a scratch folder; the disk is predicted beside `out`.
    scratch = pathlib.Path(tempfile.gettempdir()) / "fdec-plan" / "build"
    asked = CompileOptions(model=model, quantize=quantize, out=scratch, cache_dir=cache_dir)
    try:
        source = open_source(asked, lambda message: None)
    except FdecError as err:
        return [{"error": err.one_line()} for _ in targets]
    if source.pickle_weights or not source.weight_files:
        return [{"error": "no safetensors weights to predict from"} for _ in targets]
    parameters, available = checkpoint_parameters(source), available_memory()[0]
    out = out or pathlib.Path.cwd() / "build"
    figures = []
    for target in targets:
        try:
            options = dataclasses.replace(asked, target=target)
            settings = resolve_settings(options).for_source(source)
        except FdecError as err:
            figures.append({"error": err.one_line()})
            continue
        problem = None
        try:
            memory, streamed = plan_memory(
                source, settings, parameters=parameters, stream=None,
                progress=lambda message: None,
            )  # fmt: skip
        except CapacityError as refused:  # streaming does not fit either: its figure, and why
            problem, streamed = refused.one_line(), True
            memory = predict_compile_memory(source, streamed=True, **_memory_options(settings))
        disk = predict_compile_disk(source, out=out, streamed=streamed, **_disk_options(settings))
        figures.append({
            "quantize": settings.quantize,
            "streamed": streamed,
            "peak_rss_bytes": memory.peak_bytes,
            "available_bytes": available,
            "fits": problem is None,
            "problem": problem,
            "disk_bytes": disk.peak_bytes,
        })  # fmt: skip
    return figures
