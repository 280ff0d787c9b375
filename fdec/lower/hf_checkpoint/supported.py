"""Which builds the checkpoint holds: the --quantize values serving engines load with the build's numerics."""

from __future__ import annotations

from fdec.errors import UsageError

__all__ = ["SUPPORTED_FIX", "SUPPORTED_QUANTIZE", "check_quantize"]

# `--quantize` values whose builds this lowering writes (None: full precision).
SUPPORTED_QUANTIZE = ("int4", "int4-rtn", "int8-wo", "fp4", "fp4-w4a4", "fp4-wo")
SUPPORTED_FIX = (
    f"use --quantize {' or '.join(SUPPORTED_QUANTIZE)} (compressed-tensors pack-quantized; fp4 "
    "on Blackwell targets), or --quantize none for a full-precision checkpoint"
)


def check_quantize(asked: str | None) -> None:
    """Refuse, before any work, a `--quantize` value whose build this lowering cannot write."""
    if not asked or asked.lower() in ("none", "fp32", "fp32-none", *SUPPORTED_QUANTIZE):
        return
    raise UsageError(
        f"--emit hf-checkpoint cannot write a --quantize {asked} build: serving engines load "
        "no checkpoint format with its numerics",
        SUPPORTED_FIX,
    )
