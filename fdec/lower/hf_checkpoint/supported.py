"""Which builds the checkpoint holds: the --quantize values serving engines load with the build's numerics."""

from __future__ import annotations

from fdec.errors import UsageError

__all__ = ["SUPPORTED_QUANTIZE", "check_quantize"]

# `--quantize` values whose builds this lowering writes (None: full precision).
SUPPORTED_QUANTIZE = ("int4", "int4-rtn", "int8-wo")


def check_quantize(asked: str | None) -> None:
    """Refuse, before any work, a `--quantize` value whose build this lowering cannot write."""
    if not asked or asked.lower() in ("none", "fp32", "fp32-none", *SUPPORTED_QUANTIZE):
        return
    if asked.lower().startswith("fp4"):
        raise UsageError(
            f"--emit hf-checkpoint cannot write a --quantize {asked} build yet: fdec does not "
            "write compressed-tensors' nvfp4-pack-quantized format",
            f"use --quantize {' or '.join(SUPPORTED_QUANTIZE)} (compressed-tensors "
            "pack-quantized) for a serving checkpoint, or drop --emit hf-checkpoint",
        )
    raise UsageError(
        f"--emit hf-checkpoint cannot write a --quantize {asked} build: serving engines load "
        "no checkpoint format with its numerics",
        f"use --quantize {' or '.join(SUPPORTED_QUANTIZE)} (compressed-tensors pack-quantized), "
        "or --quantize none for a full-precision checkpoint",
    )
