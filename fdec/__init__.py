"""fdec: compile Hugging Face models into verified ONNX Runtime / TensorRT builds.

Python API (mirrors the command line; heavy modules load on first use, so `import fdec` is fast):

    import fdec
    build = fdec.compile("smollm2-135m", target="cpu", out="build/smollm2", quantize="int4")
    build.report["verification"]["ok"], build.path
    build.run("Why is the sky blue?", max_new_tokens=32)["text"]
    fdec.load("build/smollm2")
"""

from __future__ import annotations

import sys
import types
from typing import Any

__all__ = ["Build", "compile", "load"]


def load(path: Any) -> Any:
    """The build in `path` as a `Build` (fdec.api.load)."""
    from fdec.api import load as _load

    return _load(path)


class _CallableModule(types.ModuleType):
    """The `fdec.compile` submodule (compile_model, CompileOptions), callable as the API."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from fdec.api import compile as _compile

        return _compile(*args, **kwargs)


class _Package(types.ModuleType):
    # `fdec.compile` is both the API function and the package fdec/compile/, which Python's
    # import system assigns to this attribute when it is first imported: the submodule is made
    # callable as the API instead, so `fdec.compile(...)`, `fdec.compile.compile_model` and
    # `monkeypatch.setattr(fdec.compile, ...)` all keep working.
    def __setattr__(self, name: str, value: Any) -> None:
        if name == "compile" and isinstance(value, types.ModuleType):
            value.__class__ = _CallableModule
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        if name == "compile":  # first use: import the submodule (which sets the attribute)
            import importlib

            return importlib.import_module("fdec.compile")
        if name == "Build":
            from fdec.api import Build

            return Build
        raise AttributeError(f"module 'fdec' has no attribute {name!r}")


sys.modules[__name__].__class__ = _Package
