"""The `onnxruntime` module and the names of its providers, for every runtime module."""

from __future__ import annotations

import pathlib
import platform
import subprocess
from typing import Any

from fdec.errors import UsageError

__all__ = [
    "CUDA_PROVIDER",
    "GPU_PROVIDERS",
    "INSTALL_LINES",
    "device_name",
    "require_onnxruntime",
]

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


def device_name(provider: str) -> str:
    """The device a session of `provider` runs on, by name: the GPU's (torch, else nvidia-smi)
    for the GPU providers, the CPU's model name (/proc/cpuinfo) otherwise."""
    if provider in GPU_PROVIDERS:
        try:
            import torch

            if torch.cuda.is_available():
                return torch.cuda.get_device_name()
        except ImportError:
            pass
        try:
            return subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout.splitlines()[0].strip()  # fmt: skip
        except (OSError, subprocess.SubprocessError, IndexError):
            return "an NVIDIA GPU (name not found: no torch.cuda, no nvidia-smi)"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
