"""Which builds the checkpoint holds: the --quantize values serving engines load with the build's numerics."""

from __future__ import annotations

from fdec.errors import UsageError

__all__ = ["SUPPORTED_FIX", "SUPPORTED_QUANTIZE", "check_quantize", "check_source"]

# `--quantize` values whose builds this lowering writes (None: full precision).
SUPPORTED_QUANTIZE = (
    "int4", "int4-rtn", "int8-wo", "fp4", "fp4-w4a4", "fp4-wo", "fp8", "fp8-static",
)  # fmt: skip
SUPPORTED_FIX = (
    f"use --quantize {' or '.join(SUPPORTED_QUANTIZE)} (compressed-tensors pack-quantized, "
    "nvfp4-pack-quantized on Blackwell targets, float-quantized on FP8 ones), or --quantize "
    "none for a full-precision checkpoint"
)
# Recipes whose layers quantize their activations: a layer no packed format loads (GPT-2's
# Conv1D) cannot be written in float without losing that.
_ACTIVATIONS = {"fp4": "NVFP4", "fp4-w4a4": "NVFP4", "fp8": "FP8", "fp8-static": "FP8"}


def check_quantize(asked: str | None) -> None:
    """Refuse, before any work, a `--quantize` value whose build this lowering cannot write."""
    if not asked or asked.lower() in ("none", "fp32", "fp32-none", *SUPPORTED_QUANTIZE):
        return
    raise UsageError(
        f"--emit hf-checkpoint cannot write a --quantize {asked} build: serving engines load "
        "no checkpoint format with its numerics",
        SUPPORTED_FIX,
    )


def check_source(asked: str | None, config: dict, kind: str) -> None:
    """Refuse, before loading, an NVFP4 W4A4 or FP8 W8A8 checkpoint of a model whose linear
    layers are not nn.Linear (GPT-2's Conv1D): no packed format loads them, and written in
    float they would lose their quantized activations (fp4-wo writes them dequantized, the
    same numbers)."""
    if not asked or asked.lower() not in _ACTIVATIONS:
        return
    from fdec.lower.hf_checkpoint.expected import expected_parameters

    conv1d = [p.name for p in expected_parameters(config, kind)[0] if p.kind == "conv1d"]
    if conv1d:
        raise UsageError(
            f"--emit hf-checkpoint cannot write a --quantize {asked} build of this model: its "
            f"linear layers are Conv1D ({conv1d[0]}, ...), which no "
            f"{_ACTIVATIONS[asked.lower()]} format loads",
            "use --quantize fp4-wo (written dequantized: the same numbers), or drop "
            "--emit hf-checkpoint"
            if _ACTIVATIONS[asked.lower()] == "NVFP4"
            else "use --quantize int4 or int8-wo, or drop --emit hf-checkpoint",
        )
