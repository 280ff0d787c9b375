"""Which TensorRT versions fdec supports (and each one's flags), and whether TensorRT and an NVIDIA GPU are here."""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterable
from typing import Any

__all__ = [
    "NOT_INSTALLED",
    "NO_GPU",
    "SUPPORTED_TENSORRT",
    "TENSORRT_INTERFACE",
    "driver_version",
    "tensorrt_available",
    "visible_gpus",
]

logger = logging.getLogger(__name__)

NOT_INSTALLED = (
    "tensorrt is not installed (needs NVIDIA's package index: "
    "pip install 'fdec[tensorrt]' --extra-index-url https://pypi.nvidia.com)"
)
NO_GPU = "no CUDA GPU visible"

#: TensorRT versions fdec supports: 10.12 (strongly typed networks for every precision fdec
#: uses; weak typing deprecated) up to, not including, 12.
SUPPORTED_TENSORRT = ((10, 12), (12, 0))

#: What each supported TensorRT major version has, of what fdec writes or calls: trtexec flags,
#: `tensorrt.BuilderFlag` members, `tensorrt.NetworkDefinitionCreationFlag` members. Precision
#: flags are listed for 10.x only to show what 11.x removed; fdec uses none of them.
TENSORRT_INTERFACE: dict[int, dict[str, Any]] = {
    10: {
        "trtexec": frozenset(
            {"--onnx", "--saveEngine", "--timingCacheFile", "--builderOptimizationLevel",
             "--skipInference", "--profile", "--minShapes", "--optShapes", "--maxShapes",
             "--sparsity", "--stronglyTyped", "--fp16", "--bf16", "--fp8", "--int8", "--int4",
             "--best", "--calib"}
        ),
        "builder_flags": frozenset(
            {"FP16", "BF16", "FP8", "INT8", "INT4", "SPARSE_WEIGHTS", "TF32", "REFIT"}
        ),
        "network_flags": frozenset({"STRONGLY_TYPED"}),
        "sources": (
            "TensorRT 10.x trtexec reference (--stronglyTyped opts in to strong typing; "
            "weak typing deprecated from 10.12) — https://docs.nvidia.com/deeplearning/"
            "tensorrt/10.16.1/reference/command-line-programs.html",
            "Strong typing migration (10.12-10.x opt in with kSTRONGLY_TYPED / --stronglyTyped) "
            "— https://www.skills.sh/nvidia/tensorrt/trt-strong-typing-migration",
        ),
    },
    11: {
        "trtexec": frozenset(
            {"--onnx", "--saveEngine", "--timingCacheFile", "--builderOptimizationLevel",
             "--skipInference", "--profile", "--minShapes", "--optShapes", "--maxShapes",
             "--sparsity", "--stronglyTyped"}
        ),
        "builder_flags": frozenset({"SPARSE_WEIGHTS", "TF32", "REFIT"}),
        "network_flags": frozenset({"STRONGLY_TYPED"}),
        "sources": (
            "Migrating trtexec usage from TensorRT 10.x to 11.x: removed --fp16, --bf16, "
            "--fp8, --int4, --best, --int8, --calib; --stronglyTyped always on — "
            "https://docs.nvidia.com/deeplearning/tensorrt/11.4.1/api/migration/"
            "tensorrt-10x-to-11x-trtexec.html",
            "Python migration patterns for TensorRT 11.x: BuilderFlag.FP16, BuilderFlag.INT8 "
            "and all other precision-enabling builder flags removed — https://docs.nvidia.com/"
            "deeplearning/tensorrt/11.4.1/api/migration/tensorrt-10x-to-11x-python-api-patterns.html",
            "NVIDIA/TensorRT strong-typing migration skill: on 11.x kSTRONGLY_TYPED is accepted "
            "(ignored) and --stronglyTyped is a no-op — "
            "https://www.skills.sh/nvidia/tensorrt/trt-strong-typing-migration",
            "Migrating from TensorRT 10.x to 11.x, \"Strongly Typed Networks Are Now Required\" "
            "— https://docs.nvidia.com/deeplearning/tensorrt/11.4.0/api/migration/"
            "tensorrt-10x-to-11x.html",
        ),
    },
}  # fmt: skip


def visible_gpus() -> list[dict[str, Any]]:
    """The CUDA GPUs this process can see (index, name, compute capability), via libcuda.

    Empty when there is no NVIDIA driver or no GPU; never raises.
    """
    lib = _load_first(("libcuda.so.1", "libcuda.so", "nvcuda.dll"))
    if lib is None:
        logger.debug("no CUDA driver library found")
        return []
    try:
        if lib.cuInit(0) != 0:
            logger.debug("cuInit failed: no usable CUDA device")
            return []
        count = ctypes.c_int()
        if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return []
        gpus = []
        for index in range(count.value):
            device = ctypes.c_int()
            if lib.cuDeviceGet(ctypes.byref(device), index) != 0:
                continue
            name = ctypes.create_string_buffer(256)
            lib.cuDeviceGetName(name, len(name), device)
            major, minor = ctypes.c_int(), ctypes.c_int()
            lib.cuDeviceGetAttribute(ctypes.byref(major), 75, device)  # COMPUTE_CAPABILITY_MAJOR
            lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)  # COMPUTE_CAPABILITY_MINOR
            gpus.append(
                {
                    "index": index,
                    "name": name.value.decode("utf-8", "replace"),
                    "compute_capability": f"{major.value}.{minor.value}",
                }
            )
        return gpus
    except (AttributeError, OSError) as error:  # a driver library without these entry points
        logger.debug("could not query the CUDA driver: %s", error)
        return []


def tensorrt_available() -> str | None:
    """None when a supported TensorRT (10.12 up to 12) imports and a CUDA GPU is visible;
    else the reason."""
    try:
        import tensorrt
    except ImportError:
        return NOT_INSTALLED
    except OSError as error:  # the wheel is there but its CUDA libraries do not load
        return f"tensorrt is installed but does not load ({error})"
    version = str(getattr(tensorrt, "__version__", "0"))
    parts = [int(p) if p.isdigit() else 0 for p in [*version.split("."), "0"][:2]]
    low, high = SUPPORTED_TENSORRT
    if not low <= tuple(parts) < high:
        return (
            f"tensorrt {version} is not supported: fdec builds strongly typed engines with "
            f"TensorRT {low[0]}.{low[1]} up to (not including) {high[0]} "
            "(pip install 'fdec[tensorrt]')"
        )
    if not visible_gpus():
        return NO_GPU
    return None


def driver_version() -> str:
    """The NVIDIA driver version ("550.54.15") from NVML, else the CUDA driver API version."""
    nvml = _load_first(("libnvidia-ml.so.1", "nvml.dll"))
    if nvml is not None:
        try:
            if nvml.nvmlInit_v2() == 0:
                buffer = ctypes.create_string_buffer(96)
                ok = nvml.nvmlSystemGetDriverVersion(buffer, len(buffer)) == 0
                nvml.nvmlShutdown()
                if ok:
                    return buffer.value.decode("ascii", "replace")
        except (AttributeError, OSError):
            pass
    cuda = _load_first(("libcuda.so.1", "libcuda.so", "nvcuda.dll"))
    if cuda is not None:
        version = ctypes.c_int()
        try:
            if cuda.cuDriverGetVersion(ctypes.byref(version)) == 0:
                return f"CUDA {version.value // 1000}.{version.value % 1000 // 10}"
        except (AttributeError, OSError):
            pass
    return "unknown"


def _load_first(names: Iterable[str]) -> Any:
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None
