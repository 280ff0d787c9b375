"""The ONNX Runtime CUDA backend: a fused fp16 (or bf16, or int4-weight) model.onnx for the CUDA EP.

What `--backend onnxruntime` gives on a GPU target (fdec.backends.choose_backend). The CUDA
execution provider runs com.microsoft GroupQueryAttention in fp16/bf16 only: a fused fp32 graph
sends those nodes to the CPU with Memcpy nodes around them, and with the KV cache bound on the
device it printed garbage on an H200 (issue 16). So the backend's own preparation is attention
fusion and packed QKV, as for the CPU, then `cast-float16` with the CUDA options
(fdec.passes.typing.cuda_typing): the fused ops and the norms compute in fp16 (their kernels
accumulate in fp32 inside), softmax-free reductions and rotary/mask tables stay fp32, the
lm_head is fp16 (bf16 graphs keep fp32 logits), and the KV cache inputs/outputs are fp16, one
shared device buffer per tensor.

Precisions: fp16 (the default: float weights typed fp16), bf16 (asked for, on targets with
BF16), and int8 and int4 weight-only (MatMulNBits bits 8 / 4 with fp16 scales, accuracy_level 0:
fp16 activations, as the CUDA kernel computes whatever the attribute says). fp8 and int8 Q/DQ
graphs are not built for it: the CUDA EP only emulates Q/DQ (fp8 Q/DQ measured slower than fp32
on the H200), they belong to the TensorRT backend. Every node of the written graph must have a CUDA kernel for
its types (fdec.lower.cuda_kernels); the compile fails otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fdec.backends.onnxruntime import OnnxRuntimeBackend
from fdec.errors import UsageError

__all__ = ["BACKEND", "OnnxRuntimeCudaBackend", "float_dtype"]


def float_dtype(quantize: str | None) -> str:
    """The float type the CUDA graph computes in for `--quantize`: bf16 when asked, else fp16."""
    return "bf16" if (quantize or "").lower().startswith("bf16") else "fp16"


@dataclasses.dataclass(frozen=True)
class OnnxRuntimeCudaBackend(OnnxRuntimeBackend):
    """The CPU backend's fields and engine step (none: the CUDA EP runs model.onnx itself), its
    own precisions and preparation."""

    name: str = "onnxruntime-cuda"
    gpu_only: bool = True
    providers: tuple[str, ...] = ("CUDAExecutionProvider",)
    verifies_here: str = (
        "the build's fp16 model.onnx on its GPU provider where present, else in ONNX Runtime "
        "on this CPU with its fp16 rounding emulated (fdec.runtime.check_forms)"
    )
    # fp16 first: the default when --quantize is not given (the ORT CUDA model is fp16 unless
    # a faster precision is asked for and measured: int4 is opt-in until a GPU run shows it).
    precisions: tuple[str, ...] = ("fp16", "bf16", "int8", "int4")
    default_quantize: str | None = "fp16"
    kv_dtype: str | None = "fp16"
    gpu_variant: str | None = None
    # MatMulNBits accuracy_level 0: the CUDA kernel never reads it (fp16 activations whatever
    # its value; onnxruntime 1.31.1's contrib_ops/cuda/quantization/matmul_nbits.{h,cc}), while
    # the CPU check of this graph would quantize activations to int8 at 4: the check then
    # computes something the GPU does not. onnxruntime-genai's CUDA builds write 0 too.
    weight_options: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: {"accuracy_level": 0}
    )
    precision_fix: str = (
        "use --quantize fp16 (default), bf16, int8 (weight-only) or int4 for the ONNX Runtime "
        "CUDA model, or --backend tensorrt for fp8/fp4/int8 Q/DQ"
    )
    # int8 weight-only (MatMulNBits bits=8, fp16 activations); int8 Q/DQ the CUDA EP emulates
    methods: Mapping[str, tuple[str, ...]] = dataclasses.field(
        default_factory=lambda: {"int8": ("wo",)}
    )

    def prepare_passes(
        self,
        *,
        pipeline: list[Any],
        custom: bool,
        emit: tuple[str, ...],
        kv_sink: int | None,
        quantize: str | None = None,
        target: Any = None,
        **_: Any,
    ) -> list[Any]:
        """Fusion and packed QKV as on the CPU (when the default pipeline allows them), else
        host-shapes, then the CUDA typing, which every build of this backend gets (a --passes
        list included)."""
        from fdec.passes.fusion import FuseAttentionPass, HostShapesPass
        from fdec.passes.typing import CastFloat16Pass, cuda_typing

        if "hf-checkpoint" in emit:
            raise UsageError(
                "--emit hf-checkpoint writes the float checkpoint; the ONNX Runtime CUDA "
                "build is typed fp16",
                "compile the serving checkpoint with --target cpu, or drop --emit hf-checkpoint",
            )
        passes = super().prepare_passes(
            pipeline=pipeline, custom=custom, emit=emit, kv_sink=kv_sink
        )
        passes = [dataclasses.replace(p, backend=self.name)
                  if p.name == FuseAttentionPass.name else p for p in passes]  # fmt: skip
        names = {p.name for p in [*pipeline, *passes]}
        if not names & {FuseAttentionPass.name, HostShapesPass.name}:
            passes.append(HostShapesPass())  # no Memcpy for the unfused graph's positions
        if any(p.name == CastFloat16Pass.name for p in pipeline):
            return passes
        dtype = float_dtype(quantize)
        if dtype == "bf16" and target is not None:
            target.require("bf16")
        return [*passes, CastFloat16Pass(**cuda_typing(dtype))]


BACKEND = OnnxRuntimeCudaBackend()
