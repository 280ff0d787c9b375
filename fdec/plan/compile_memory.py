"""The peak RSS of `fdec compile` itself on this machine, and the up-front refusal when it
cannot fit.

The prediction comes from the checkpoint's header and config.json (nothing loaded):

- **Today's front end** (the model loaded in fp32): overhead + 1.25× the fp32 weights for
  float builds, 1.5× for weight-only quantized ones and 3× for calibrating ones, plus 10 %
  (measured, benchmarks/large_weights.py: a 1.1B Llama fp32 5.15 GiB = overhead + 1.06×,
  bf16 to int4-rtn 6.5 GB = overhead + 1.37×; SmolLM2 int4-awq 2.01 GiB = overhead + 3.0×).
- **Streamed** (fdec.frontend.stream): the largest of the stages, each holding at most one
  layer's float weights: the reference (everything outside the layers, e.g. the embedding
  table, in fp32 plus one layer's fp32 weights and its copy being read), the passes (a few fp32
  copies of the largest tensor: the weights they make go to a spill file, fdec.ir.spill), and
  verification (the build's weights in an ONNX Runtime session, or one slice of its layers
  above fdec.runtime.sliced.WHOLE_SESSION_BYTES); plus the overhead and 10 %. A recipe that
  calibrates activations calibrates layer by layer (fdec.calibrate_layerwise): the reference's
  weights, the calibration tokens' hidden states and one batch's logits, plus what it keeps per
  Linear input (AWQ's and SmoothQuant's rows for every layer; GPTQ's XᵀX for one layer, which
  the pass factors in place while it rounds, and the weight being rounded in float64).

Memory available is /proc/meminfo's MemAvailable, or the cgroup's limit less its usage when
that is smaller.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any

from fdec.errors import CapacityError

__all__ = [
    "COMPILE_OVERHEAD_BYTES",
    "CompileMemory",
    "available_memory",
    "build_weight_bytes",
    "check_compile_memory",
    "predict_compile_memory",
]

_GIB = 2**30
COMPILE_OVERHEAD_BYTES = int(0.5 * _GIB)  # Python + torch + onnxruntime: a tiny model's peak
_MARGIN = 1.10
# today's path: x fp32 weights for float, weight-only quantized and calibrating recipes
_WHOLE_MODEL_FACTOR = {"float": 1.25, "weights": 1.5, "calibrating": 3.0}
# A pass's fp32 read of the largest tensor plus its work arrays: the 8B Llama's tied
# 128256 x 4096 table (1.96 GiB in fp32) quantized to int4 peaked at 3.6 GiB, streamed and
# spilled (benchmarks/large_weights.py's llama-8b, 2026-12-04).
_LARGEST_TENSOR_COPIES = 1.5
_SESSION_FACTOR = 1.25  # an ONNX Runtime session over its weights (arena, prepacking)
# A slice's session (fdec.runtime.sliced) over its weights: the 8B int4 build's 0.94 GiB slices
# peaked at 3.85 GiB in all (its data is copied in while the file pages it read stay mapped).
_SLICE_SESSION_FACTOR = 3.0
# Calibration as fdec.calibrate.calibration_batches makes it by default: 16 batches of 128.
_CALIBRATION_TOKENS, _CALIBRATION_BATCH = 16 * 128, 128
_CALIBRATION_ROWS = 512  # rows AWQ (max_rows) and SmoothQuant's search (search_rows) keep
# GPTQ's weight in float64 and its scaled copy while rounding; its factor of XᵀX is made in
# place (fdec.passes.gptq.inverse_factor), so no copy of the [K, K] matrix is added.
_GPTQ_WEIGHT_COPIES = 2
_LAYER = re.compile(r"(^|\.)(layers|h|layer|blocks)\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class CompileMemory:
    """A predicted compile peak and what it is made of (bytes)."""

    peak_bytes: int
    streamed: bool
    parts: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"peak_bytes": self.peak_bytes, "streamed": self.streamed, **self.parts}


def _gib(n: int) -> str:
    return f"{n / _GIB:.1f} GiB"


def _tensor_sizes(source: Any) -> tuple[int, int, int, int]:
    """(all, largest, outside the layers, largest layer) parameter counts of the checkpoint."""
    from fdec.frontend.stream import checkpoint_index

    index = checkpoint_index([p for p in source.weight_files if p.suffix == ".safetensors"])
    total = largest = outside = 0
    layers: dict[str, int] = {}
    for name, tensor in index.items():
        count = 1
        for dim in tensor.shape:
            count *= dim
        total += count
        largest = max(largest, count)
        match = _LAYER.search(name)
        if match:
            layers[match.group(3)] = layers.get(match.group(3), 0) + count
        else:
            outside += count
    return total, largest, outside, max(layers.values(), default=0)


def build_weight_bytes(source: Any, quantize: str, target: Any) -> int:
    """The build's weight bytes by fdec.plan's formulas (its precision, scales, embedding)."""
    from fdec.plan.capacity import float_bytes, precision_of
    from fdec.plan.shape import WEIGHT_FORMATS, shape_from_config

    shape = shape_from_config(source.config, source.given)
    precision = precision_of(quantize, "--quantize")
    return shape.weight_bytes(WEIGHT_FORMATS[precision], float_bytes(target))


def _layerwise_calibration_bytes(
    source: Any, outside: int, layer: int, calibration: tuple[str, ...]
) -> tuple[int, int]:
    """(the calibration stage's bytes, what GPTQ adds to the passes stage) for layer-by-layer
    calibration collecting `calibration` (fdec.calibrate_layerwise.KINDS)."""
    from fdec.plan.shape import shape_from_config

    shape = shape_from_config(source.config, source.given)
    hidden, inner = shape.hidden_size, shape.intermediate_size or 4 * shape.hidden_size
    # What is outside the layers (the embedding) while the first layer's inputs and the head
    # are computed, one layer's weights (and the copy being read) while the layers run.
    weights = max(4 * outside, 2 * 4 * layer)
    activations = 2 * 4 * _CALIBRATION_TOKENS * hidden + 2 * 4 * _CALIBRATION_BATCH * (
        shape.vocab_size + 3 * inner
    )
    kept = 0
    widths = 3 * hidden + inner  # a Llama layer's Linear inputs: q/k/v, o, gate/up, down
    for kind in ("sampled", "first"):
        if kind in calibration:
            kept += 4 * _CALIBRATION_ROWS * (widths * shape.num_layers + hidden)
    gptq = 0
    if "hessian" in calibration:
        # The walk for XᵀX holds one layer's weights (not the embedding: it is dropped while
        # the layers run) and that layer's XᵀX in float64, summed in place; the pass rounds one
        # weight at a time in float64.
        one_layer = 8 * (3 * hidden**2 + inner**2)  # q/k/v, o, gate/up and down inputs
        gptq = 2 * 4 * layer + one_layer + _GPTQ_WEIGHT_COPIES * 8 * hidden * inner
    return weights + activations + kept, gptq


def predict_compile_memory(
    source: Any, *, quantize: str, target: Any, streamed: bool, calibrates: bool,
    calibration: tuple[str, ...] = ("stats",),
) -> CompileMemory:  # fmt: skip
    """The peak RSS `fdec compile` is expected to reach for `source` with this recipe;
    `calibration`: what layer-by-layer calibration collects (its KINDS), when `calibrates`."""
    if source.pickle_weights or not source.weight_files:
        return CompileMemory(0, streamed, {})
    total, largest, outside, layer = _tensor_sizes(source)
    fp32 = 4 * total
    from fdec.plan.capacity import precision_of

    quantized = precision_of(quantize, "--quantize") != "fp32"
    if not streamed:
        kind = "calibrating" if calibrates else "weights" if quantized else "float"
        peak = COMPILE_OVERHEAD_BYTES + _WHOLE_MODEL_FACTOR[kind] * fp32
        return CompileMemory(int(peak * _MARGIN), False, {"fp32_weight_bytes": fp32})
    from fdec.runtime.sliced import DEFAULT_SLICE_BYTES, WHOLE_SESSION_BYTES

    build = build_weight_bytes(source, quantize, target)
    # A build above WHOLE_SESSION_BYTES is verified a slice of layers at a time.
    verify = (
        _SESSION_FACTOR * build
        if build <= WHOLE_SESSION_BYTES
        else _SLICE_SESSION_FACTOR * min(build, DEFAULT_SLICE_BYTES)
    )
    parts = {
        "reference_bytes": 4 * outside + 2 * 4 * layer,
        # The weights passes make are spilled to disk as they are made (fdec.ir.spill).
        "passes_bytes": int(_LARGEST_TENSOR_COPIES * 4 * largest),
        "verify_bytes": int(verify),
    }
    if calibrates:
        staged, gptq = _layerwise_calibration_bytes(source, outside, layer, tuple(calibration))
        parts["calibration_bytes"] = staged
        # GPTQ's rounding and the largest tensor's (a W8A16 lm_head, the embedding) come at
        # different times in the pass.
        parts["passes_bytes"] = max(parts["passes_bytes"], gptq)
    peak = COMPILE_OVERHEAD_BYTES + max(parts.values())
    return CompileMemory(int(peak * _MARGIN), True, {"fp32_weight_bytes": fp32, **parts})


def available_memory() -> tuple[int, str]:
    """(bytes, where from): MemAvailable, or the cgroup's room when that is smaller."""
    available, where = 0, "/proc/meminfo MemAvailable"
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        return 0, "unknown"
    cgroup = pathlib.Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            room = int(limit) - int((cgroup / "memory.current").read_text())
            if room < available:
                available, where = room, "the cgroup's memory.max less memory.current"
    except (OSError, ValueError):
        pass
    return available, where


def check_compile_memory(
    source: Any, *, quantize: str, target: Any, streamed: bool, calibrates: bool,
    calibration: tuple[str, ...] = ("stats",),
) -> CompileMemory:  # fmt: skip
    """The prediction, or a CapacityError (exit 4) naming it and the fix when this machine's
    available memory cannot hold it."""
    need = predict_compile_memory(
        source, quantize=quantize, target=target, streamed=streamed, calibrates=calibrates,
        calibration=calibration,
    )  # fmt: skip
    available, where = available_memory()
    if not available or need.peak_bytes <= available:
        return need
    if not streamed:
        fix = "compile with --stream (weights read from the checkpoint one tensor at a time)"
    elif calibrates and "hessian" in calibration:  # one layer's GPTQ XᵀX dominates
        fix = (
            "round fp8 weights to nearest (--pass-options quantize-fp8.weight_rounding="
            '"nearest"), use a weight-only recipe (--quantize int4-rtn) or a bigger machine'
        )
    elif calibrates:
        fix = "use a weight-only recipe (--quantize int4-rtn) or a machine with more memory"
    else:
        fix = f"free memory or use a machine with {_gib(need.peak_bytes)} available"
    raise CapacityError(
        f"compiling {source.given} needs about {_gib(need.peak_bytes)} of memory, "
        f"{_gib(available)} is available ({where})",
        fix,
    )
