"""Building a planned engine with TensorRT's Python API where TensorRT and the target's GPU are."""

from __future__ import annotations

import logging
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

from fdec.build import sha256_file
from fdec.errors import CompileError, InputError
from fdec.lower.tensorrt import support
from fdec.lower.tensorrt.plan import (
    ENGINE_DIR,
    REPLAN_FIX,
    EnginePlan,
    build_fix,
    read_plan,
    write_atomic,
    write_plan,
)

__all__ = ["build_planned_engine"]

logger = logging.getLogger(__name__)


class _BuildFailed(Exception):
    """TensorRT refused the network or the build; the message says why."""


def build_planned_engine(
    build_dir: str | os.PathLike[str], progress: Callable[[str], None] = lambda message: None
) -> EnginePlan:
    """Build engines/tensorrt/model.engine from the stored plan with TensorRT's Python API.

    Updates plan.json (status "built", built_on, wall_s, engine_bytes, sha256) and returns the
    plan. Raises CompileError (plan left as it was) where TensorRT or a GPU is missing, or where
    the GPU is not the target's compute capability; a build TensorRT refuses is recorded as
    "failed" in plan.json and raised as CompileError.
    """
    build_dir = pathlib.Path(build_dir)
    plan = read_plan(build_dir)
    folder = build_dir / ENGINE_DIR
    onnx_path = (folder / plan.onnx).resolve()
    if not onnx_path.is_file():
        raise InputError(f"{onnx_path} (named by the TensorRT plan) does not exist", REPLAN_FIX)
    reason = support.tensorrt_available()
    if reason is not None:
        raise CompileError(f"cannot build the TensorRT engine here: {reason}", build_fix(build_dir))
    gpu = support.visible_gpus()[0]
    if gpu["compute_capability"] != plan.compute_capability:
        raise CompileError(
            f"the plan is for {plan.target} (compute capability {plan.compute_capability}) but "
            f"this GPU is {gpu['name']} ({gpu['compute_capability']}); a TensorRT engine runs "
            f"only on the compute capability it was built on",
            f"{build_fix(build_dir)} on a {plan.target}, or compile again with the --target "
            f"of this GPU",
        )

    progress(f"building the TensorRT engine for {plan.target} on {gpu['name']}")
    start = time.perf_counter()
    try:
        version, reused = _build_engine(folder, onnx_path, plan, progress)
    except _BuildFailed as error:
        plan.status, plan.reason = "failed", str(error)
        write_plan(folder, plan)
        raise CompileError(
            f"TensorRT could not build the engine: {error}",
            "check that the graph uses ops TensorRT supports and that the profiles fit the "
            "GPU's memory (lower --max-batch or --max-seq-len)",
        ) from None
    engine = folder / plan.engine
    plan.status, plan.reason = "built", ""
    plan.wall_s = round(time.perf_counter() - start, 3)
    plan.engine_bytes = engine.stat().st_size
    plan.sha256 = sha256_file(engine)
    plan.timing_cache_reused = reused
    plan.built_on = {
        "gpu": gpu["name"],
        "compute_capability": gpu["compute_capability"],
        "driver": support.driver_version(),
        "tensorrt": version,
    }
    write_plan(folder, plan)
    progress(f"wrote {engine} ({plan.engine_bytes / 1e6:.1f} MB) in {plan.wall_s:.1f} s")
    return plan


def _build_engine(
    folder: pathlib.Path,
    onnx_path: pathlib.Path,
    plan: EnginePlan,
    progress: Callable[[str], None],
) -> tuple[str, bool]:
    """Parse, configure and build with TensorRT; writes the engine and timing cache.

    Returns (TensorRT version, whether an existing timing cache was loaded).
    """
    import tensorrt as trt

    trt_logger = _make_logger(trt)
    builder = trt.Builder(trt_logger)
    # Strongly typed: precision is the graph's (required on 10.x for that, always so on 11.x).
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, trt_logger)
    progress(f"parsing {onnx_path.name}")
    # From the file, not from bytes, so the parser finds model.onnx.data beside it.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise _BuildFailed("the ONNX parser refused model.onnx: " + "; ".join(errors[:5]))

    config = builder.create_builder_config()
    config.builder_optimization_level = plan.builder_optimization_level
    if plan.sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    for entry in plan.profiles:
        profile = builder.create_optimization_profile()
        for name, dims in entry["shapes"].items():
            profile.set_shape(name, tuple(dims["min"]), tuple(dims["opt"]), tuple(dims["max"]))
        if config.add_optimization_profile(profile) < 0:
            raise _BuildFailed(f"TensorRT refused shape profile {entry['name']!r}")

    cache_path = folder / plan.timing_cache
    old = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(old)
    reused = bool(old)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        logger.warning("%s was made by another GPU or TensorRT; starting a new one", cache_path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        reused = False

    progress(
        f"building ({len(plan.profiles)} profiles, strongly typed: "
        f"{' + '.join(plan.precisions) or 'fp32'})"
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = "; ".join(trt_logger.errors[-5:]) or "no error message from TensorRT"
        raise _BuildFailed(detail)
    write_atomic(folder / plan.engine, serialized)  # IHostMemory is a buffer: no copy
    write_atomic(cache_path, config.get_timing_cache().serialize())
    return str(trt.__version__), reused


def _make_logger(trt: Any) -> Any:
    """A TensorRT logger that forwards to this module's logger and keeps the errors."""
    levels = {
        trt.Logger.INTERNAL_ERROR: logging.ERROR,
        trt.Logger.ERROR: logging.ERROR,
        trt.Logger.WARNING: logging.WARNING,
        trt.Logger.INFO: logging.DEBUG,
        trt.Logger.VERBOSE: logging.DEBUG,
    }

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, message: str) -> None:
            # TensorRT calls this from C++ and it must not raise.
            try:
                level = levels.get(severity, logging.DEBUG)
                if level >= logging.ERROR:
                    self.errors.append(message)
                logger.log(level, "TensorRT: %s", message)
            except Exception:  # pragma: no cover - logging itself failed
                pass

    return _Logger()
