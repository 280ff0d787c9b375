"""The ONNX Runtime backend: the build's model.onnx is what runs (CPU, or a GPU provider)."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["BACKEND", "OnnxRuntimeBackend"]


@dataclasses.dataclass(frozen=True)
class OnnxRuntimeBackend:
    name: str = "onnxruntime"
    gpu_only: bool = False
    graph_form: str = "onnxruntime"
    op_domains: tuple[str, ...] = ("", "com.microsoft")
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    fixed_shapes: bool = False
    files: tuple[str, ...] = ()
    verifies_here: str = "the build's model.onnx in ONNX Runtime on this CPU"
    precisions: tuple[str, ...] = ("fp32", "int8", "int4", "fp8")
    default_quantize: str | None = None  # the target's default recipe
    precision_fix: str = "use --quantize int4, int8, fp8 or none"
    methods: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    kv_dtype: str | None = None
    kv_dtypes: tuple[str, ...] | None = None
    kv_dtypes_why: str = ""
    gpu_variant: str | None = "onnxruntime-cuda"
    # the quantizers' defaults: MatMulNBits accuracy_level 4 (the CPU kernel's int8 activations)
    weight_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def prepare_passes(
        self,
        *,
        pipeline: list[Any],
        custom: bool,
        emit: tuple[str, ...],
        kv_sink: int | None,
        **_: Any,
    ) -> list[Any]:
        """Attention fusion (com.microsoft GroupQueryAttention) and packed QKV, after the
        shared pipeline, for a default pipeline whose passes all allow fusion; a serving
        checkpoint and attention sinks (GroupQueryAttention has none) keep the plain graph."""
        from fdec.passes.fusion import FuseAttentionPass
        from fdec.passes.pack import PackQkvPass

        if custom or "hf-checkpoint" in emit or kv_sink:
            return []
        if not all(getattr(p, "fusable", True) for p in pipeline):
            return []
        # then q/k/v into one projection per layer (onnxruntime-genai's packed QKV)
        return [FuseAttentionPass(backend=self.name), PackQkvPass()]

    def build_engines(
        self,
        build_dir: pathlib.Path,
        *,
        spec: Any,
        target: Any,
        limits: Any,
        reference: Any = None,
        tolerance: Any = None,
        progress: Callable[[str], None] = lambda message: None,
    ) -> list[dict[str, Any]]:
        return []  # ONNX Runtime runs model.onnx itself


BACKEND = OnnxRuntimeBackend()
