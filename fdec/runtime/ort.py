"""The `onnxruntime` module and the names of its providers, for every runtime module."""

from __future__ import annotations

from typing import Any

from fdec.errors import UsageError

__all__ = ["CUDA_PROVIDER", "GPU_PROVIDERS", "INSTALL_LINES", "require_onnxruntime"]

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
CUDA_PROVIDER = "CUDAExecutionProvider"
# ONNX Runtime ships as two packages that install the same `onnxruntime` module and overwrite
# each other; fdec depends on neither and names both (pyproject.toml extras `cpu` and `gpu`).
INSTALL_LINES = "pip install 'fdec[cpu]' (CPU) or pip install 'fdec[gpu]' (NVIDIA GPU, CUDA 13)"


def require_onnxruntime() -> Any:
    """The `onnxruntime` module, or UsageError (exit 2) naming the two ways to install it."""
    try:
        import onnxruntime
    except ModuleNotFoundError as err:
        if err.name != "onnxruntime":
            raise
        raise UsageError("ONNX Runtime is not installed", f"install one: {INSTALL_LINES}") from None
    return onnxruntime
