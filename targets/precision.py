"""Precisions, and which a target computes in: derived from its compute capability, never listed per file."""

from __future__ import annotations

import enum

from fdec.errors import InputError
from fdec.targets.messages import describe, did_you_mean, quote

__all__ = [
    "FALLBACKS",
    "MIN_CC",
    "PRECISION_BY_NAME",
    "PRECISION_LIST",
    "SPARSITY_MIN_CC",
    "Precision",
    "derive_precisions",
    "precision_names",
]


class Precision(enum.Enum):
    """A numeric format a target can compute or store in; the value is its file spelling."""

    FP32 = "fp32"
    TF32 = "tf32"
    FP16 = "fp16"
    BF16 = "bf16"
    FP8_E4M3 = "fp8"
    INT8 = "int8"
    INT4 = "int4"
    FP4 = "fp4"

    @classmethod
    def parse(cls, text: str | Precision) -> Precision:
        """The precision named `text` ("fp8", "FP16", "fp8_e4m3"); InputError for anything else."""
        if isinstance(text, Precision):
            return text
        if not isinstance(text, str):
            raise InputError(
                f"a precision must be a name such as 'fp8', got {describe(text)}",
                f"valid precisions: {PRECISION_LIST}",
            )
        key = text.strip().lower()
        found = PRECISION_BY_NAME.get(key)
        if found is None:
            hint = did_you_mean(key, PRECISION_BY_NAME)
            raise InputError(
                f"unknown precision {quote(text)}", f"{hint}valid precisions: {PRECISION_LIST}"
            )
        return found

    @property
    def label(self) -> str:
        """The name used in messages: "FP8", "BF16", "INT4"."""
        return "FP8" if self is Precision.FP8_E4M3 else self.name

    @property
    def bits(self) -> int:
        """Storage bits per element (TF32 is stored as 32-bit floats)."""
        return _BITS[self]


PRECISION_BY_NAME: dict[str, Precision] = {p.value: p for p in Precision}
PRECISION_BY_NAME["fp8_e4m3"] = Precision.FP8_E4M3
PRECISION_LIST = ", ".join(p.value for p in Precision)
_BITS = {
    Precision.FP32: 32,
    Precision.TF32: 32,
    Precision.FP16: 16,
    Precision.BF16: 16,
    Precision.FP8_E4M3: 8,
    Precision.INT8: 8,
    Precision.INT4: 4,
    Precision.FP4: 4,
}

# Every GPU computes these; the rest need at least the compute capability given.
_GPU_BASE = frozenset({Precision.FP32, Precision.FP16, Precision.INT8, Precision.INT4})
MIN_CC: dict[Precision, tuple[int, int]] = {
    Precision.TF32: (8, 0),
    Precision.BF16: (8, 0),
    Precision.FP8_E4M3: (8, 9),
    Precision.FP4: (10, 0),
}
_CPU_PRECISIONS = frozenset({Precision.FP32, Precision.INT8, Precision.INT4})
SPARSITY_MIN_CC = (8, 0)
# What to suggest instead of a precision a target lacks, best first.
FALLBACKS: dict[Precision, tuple[Precision, ...]] = {
    Precision.FP4: (Precision.INT4, Precision.FP8_E4M3, Precision.INT8),
    Precision.FP8_E4M3: (Precision.INT8, Precision.INT4),
    Precision.BF16: (Precision.FP16, Precision.FP32),
    Precision.FP16: (Precision.BF16, Precision.FP32),
    Precision.TF32: (Precision.FP32,),
    Precision.INT8: (Precision.INT4, Precision.FP32),
    Precision.INT4: (Precision.INT8, Precision.FP32),
    Precision.FP32: (Precision.FP16,),
}


def derive_precisions(cc: tuple[int, int] | None) -> frozenset[Precision]:
    if cc is None:
        return _CPU_PRECISIONS
    return _GPU_BASE | {p for p, need in MIN_CC.items() if cc >= need}


def precision_names(precisions: frozenset[Precision]) -> str:
    return ", ".join(p.value for p in Precision if p in precisions)
