"""Engine building for a build's backend (each backend's own code is in fdec.backends)."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

from fdec.backends import get_backend
from fdec.ir import ModelSpec
from fdec.lower.profiles import ShapeLimits

__all__ = ["build_engines"]


def build_engines(
    build_dir: pathlib.Path,
    *,
    spec: ModelSpec,
    target: Any,
    backend: str,
    limits: ShapeLimits,
    precisions: tuple[str, ...] = (),
    progress: Callable[[str], None] = lambda message: None,
) -> list[dict[str, Any]]:
    """Engine records for the report; raises CompileError when a deployable engine fails.

    `precisions` are TensorRT builder flags for the Q/DQ precisions the graph carries.
    """
    if not target.is_gpu:
        return []
    return get_backend(backend).build_engines(
        build_dir, spec=spec, target=target, limits=limits, precisions=precisions,
        progress=progress,
    )  # fmt: skip
