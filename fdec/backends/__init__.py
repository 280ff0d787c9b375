"""Backends as objects: the one registry of what each backend takes, prepares, writes and verifies.

A backend is what runs a build's graph: ONNX Runtime, TensorRT, TensorRT-RTX. Each is one
module here holding one object that satisfies `Backend`; `REGISTRY` lists them. The CLI's
`--backend` choices, the config schema, target files' `default_backend` check, the compile's
backend choice and engine building all read this registry, so adding a backend is one module
plus one line in `_MODULES`.

Heavy imports (TensorRT, the lowering modules) happen inside the backend's methods, so this
package imports only fdec.errors and may be imported by targets and passes.
"""

from __future__ import annotations

import importlib
import pathlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from fdec.errors import UsageError

__all__ = [
    "REGISTRY",
    "Backend",
    "backend_names",
    "check_precision",
    "choose_backend",
    "get_backend",
    "gpu_only_backends",
    "graph_forms",
]


class Backend(Protocol):
    """What fdec knows about one backend (the object each backends/<name>.py module exports)."""

    #: The --backend spelling.
    name: str
    #: Runs on GPUs only (refused for CPU targets).
    gpu_only: bool
    #: The graph form weight quantizers write for it: "onnxruntime" (com.microsoft contrib ops:
    #: MatMulNBits, GatherBlockQuantized) or "tensorrt" (standard blocked Q/DQ).
    graph_form: str
    #: ONNX op domains its graphs may contain ("" is the default ONNX domain).
    op_domains: tuple[str, ...]
    #: ONNX Runtime execution providers that run its builds where they are deployed.
    providers: tuple[str, ...]
    #: Engines are built for fixed shape ranges: the limits are checked against the model.
    fixed_shapes: bool
    #: Folders (relative to a build) holding its files besides model.onnx.
    files: tuple[str, ...]
    #: How its build is verified on this machine (the report's wording).
    verifies_here: str
    #: The --quantize precisions its model runs ("fp32": float weights as exported, typed by
    #: the engine builder where it types; the rest fdec.targets.Precision values); the
    #: target must have them too (Target.require).
    precisions: tuple[str, ...]
    #: The --quantize value used when none is given, instead of the target's default recipe
    #: (None: the target's), and the one line that says what to use instead of a refused one.
    default_quantize: str | None
    precision_fix: str
    #: Per precision, the methods its model runs where it runs only some (the first is what the
    #: precision alone means: onnxruntime-cuda's "int8" is "int8-wo"); precisions not listed
    #: run every method fdec has.
    methods: Mapping[str, tuple[str, ...]]
    #: The KV cache type its graph has built in (--kv-dtype may only repeat it), or None.
    kv_dtype: str | None
    #: The --kv-dtype values it takes (None: all), and why it refuses the others.
    kv_dtypes: tuple[str, ...] | None
    kv_dtypes_why: str
    #: Options the weight quantizers take for this backend's runtime (beside `graph_form`),
    #: e.g. MatMulNBits' accuracy_level; --pass-options still overrides them.
    weight_options: Mapping[str, Any]
    #: The backend a GPU target gets when this one is asked for (onnxruntime → onnxruntime-cuda).
    gpu_variant: str | None

    def prepare_passes(self, context: Any) -> list[Any]:
        """This backend's own graph preparation after the shared pipeline (fdec.compile.recipe
        gives the context: the pipeline so far, whether --passes was given, emits, kv options)."""
        ...

    def build_engines(
        self,
        build_dir: pathlib.Path,
        *,
        spec: Any,
        target: Any,
        limits: Any,
        reference: Any,
        tolerance: Any,
        progress: Callable[[str], None],
    ) -> list[dict[str, Any]]:
        """Engine records for the report (empty when the backend runs the ONNX model itself),
        after the backend's own preparation of the written build (TensorRT: the strongly typed
        model, checked against `reference` under `tolerance`); raises CompileError when a
        deployable engine fails."""
        ...


# One line per backend: name -> module under fdec.backends exporting BACKEND.
_MODULES = {
    "onnxruntime": "fdec.backends.onnxruntime",
    "onnxruntime-cuda": "fdec.backends.onnxruntime_cuda",
    "tensorrt": "fdec.backends.tensorrt",
    "tensorrt-rtx": "fdec.backends.tensorrt_rtx",
}


class _Registry(dict):
    """name -> Backend, each module imported on first use."""

    def __missing__(self, name: str) -> Backend:
        if name not in _MODULES:
            raise KeyError(name)
        backend = importlib.import_module(_MODULES[name]).BACKEND
        self[name] = backend
        return backend


REGISTRY: dict[str, Backend] = _Registry()


def backend_names() -> tuple[str, ...]:
    """Every backend's name, in registry order."""
    return tuple(_MODULES)


def get_backend(name: str) -> Backend:
    """The backend called `name`; UsageError naming the choices for anything else."""
    if name not in _MODULES:
        raise UsageError(f"unknown backend {name!r}", f"use one of: {', '.join(_MODULES)}")
    return REGISTRY[name]


def gpu_only_backends() -> frozenset[str]:
    return frozenset(name for name in _MODULES if REGISTRY[name].gpu_only)


def graph_forms() -> tuple[str, ...]:
    """The graph forms quantizers can write (each backend's `graph_form`, in registry order)."""
    return tuple(dict.fromkeys(REGISTRY[name].graph_form for name in _MODULES))


def choose_backend(asked: str | None, target: Any) -> Backend:
    """The backend a compile uses: the one asked for, else the target's default; on a GPU
    target, its GPU variant (`--backend onnxruntime` → onnxruntime-cuda)."""
    backend = get_backend(asked or target.default_backend)
    if backend.gpu_variant and target.is_gpu:
        backend = get_backend(backend.gpu_variant)
    if backend.gpu_only and not target.is_gpu:
        raise UsageError(
            f"backend {backend.name} needs a GPU target; {target.name} is a CPU",
            "pass --target with a GPU (fdec targets lists them) or --backend onnxruntime",
        )
    return backend


# --quantize values that keep the exported float weights (fdec.compile.recipe's "no quantization").
_FLOAT_WEIGHTS = ("none", "fp32-none")


def check_precision(backend: Backend, quantize: str | None) -> None:
    """UsageError when `backend` does not run `--quantize quantize` models (one line, with the
    backend's fix); "none" (float weights) every backend takes."""
    if not quantize or quantize.lower() in _FLOAT_WEIGHTS:
        return
    precision, _, method = quantize.lower().partition("-")
    runs = backend.methods.get(precision)
    if precision in backend.precisions and (not method or not runs or method in runs):
        return
    if precision in backend.precisions:
        raise UsageError(
            f"--quantize {quantize}: the {backend.name} backend runs {precision} as "
            f"{', '.join(f'{precision}-{m}' for m in runs)} only, not {method}",
            backend.precision_fix,
        )
    raise UsageError(
        f"--quantize {quantize}: the {backend.name} backend runs "
        f"{', '.join(backend.precisions)} models, not {precision}",
        backend.precision_fix,
    )
