"""Facts about the machine fdec runs on that a build depends on (a probe, beside the target data).

The cpu target's file describes a class of machines; what this host's CPU can do (its VNNI
instructions) is read here, once, and only passes that tune kernels to it ask.
"""

from __future__ import annotations

import pathlib
import re

__all__ = ["cpu_flags", "has_vnni"]

_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})


def has_vnni(flags: str) -> bool:
    """Whether CPU flags text (a /proc/cpuinfo `flags` line, or all of /proc/cpuinfo) has VNNI.

    VNNI (AVX512_VNNI, AVX_VNNI) multiplies u8×s8 into int32 directly; without it, ONNX
    Runtime's x86 kernels add u8×s8 pairs in int16 (vpmaddubsw), which saturates for
    full-range int8 weights.
    """
    return not _VNNI_FLAGS.isdisjoint(re.split(r"[\s:]+", flags.lower()))


def cpu_flags() -> str:
    """The `flags` line of this machine's /proc/cpuinfo ("" where there is none)."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith("flags"):
            return line
    return ""
