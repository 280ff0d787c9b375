"""Which builds the checkpoint holds: the --quantize values serving engines load with the build's numerics."""

from __future__ import annotations

from fdec.errors import UsageError

__all__ = ["SUPPORTED_FIX", "SUPPORTED_QUANTIZE", "check_quantize", "check_source"]

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


def check_source(asked: str | None, config: dict, kind: str) -> None:
    """Refuse, before loading, an NVFP4 W4A4 checkpoint of a model whose linear layers are not
    nn.Linear (GPT-2's Conv1D): no packed format loads them, and written in float they would
    lose their run-time FP4 activations (fp4-wo writes them dequantized, the same numbers)."""
    if not asked or asked.lower() not in ("fp4", "fp4-w4a4"):
        return
    from fdec.lower.hf_checkpoint.expected import expected_parameters

    conv1d = [p.name for p in expected_parameters(config, kind)[0] if p.kind == "conv1d"]
    if conv1d:
        raise UsageError(
            f"--emit hf-checkpoint cannot write a --quantize {asked} build of this model: its "
            f"linear layers are Conv1D ({conv1d[0]}, ...), which no NVFP4 format loads",
            "use --quantize fp4-wo (written dequantized: the same numbers), or drop "
            "--emit hf-checkpoint",
        )
