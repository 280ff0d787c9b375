"""Capacity of a target: weights + KV cache + workspace against its memory, and what fits."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

from fdec.errors import CapacityError, InputError, UsageError
from fdec.frontend.prequantized import source_recipe
from fdec.plan.shape import (
    INT8_WEIGHT_ONLY,
    KV_DTYPES,
    WEIGHT_FORMATS,
    ModelShape,
    shape_from_config,
)

__all__ = [
    "DEFAULT_CONTEXT_CAP",
    "DEFAULT_HEADROOM",
    "PREFILL_CHUNK",
    "CapacityPlan",
    "check_capacity",
    "float_bytes",
    "plan_capacity",
    "precision_of",
    "target_memory",
    "workspace_bytes",
]

DEFAULT_HEADROOM = 0.10  # share of memory kept back for the runtime and fragmentation
PREFILL_CHUNK = 512  # prompt tokens processed at once (chunked prefill)
DEFAULT_CONTEXT_CAP = 8192  # `fdec plan` default context: the model's positions, at most this
_GB = 1e9
_MB = 1e6
_SEARCH_LIMIT = 1 << 40  # upper bound for the sequence / context searches


# ---------------------------------------------------------------------------------------------
# Targets' memory and recipes


def target_memory(target: Any) -> tuple[int, str]:
    """(bytes, where the figure comes from): the target's memory_gb, or this host's RAM."""
    if target.memory_gb:
        return int(target.memory_gb * _GB), f"{target.name} memory_gb = {target.memory_gb:g}"
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX
        total = 0
    if total <= 0:  # pragma: no cover
        raise InputError(
            f"target {target.name} declares no memory and this host's RAM cannot be read",
            "give a target file with memory_gb set",
        )
    return total, "the target declares no memory_gb: this host's total RAM"


def precision_of(text: str, what: str) -> str:
    from fdec.targets import Precision

    base = text.strip().lower().split("-", 1)[0]
    if base in ("none", ""):
        return "fp32"
    try:
        precision = Precision.parse(base)
    except InputError as err:
        raise UsageError(f"{what} {text!r}: {err.problem}", err.fix) from None
    return "fp32" if precision.value == "tf32" else precision.value


def float_bytes(target: Any) -> int:
    return 2 if target.is_gpu else 4


def _activation_bytes(target: Any) -> int:
    return 4 if precision_of(target.default_recipe["activations"], "activations") == "fp32" else 2


# ---------------------------------------------------------------------------------------------
# The plan


@dataclasses.dataclass(frozen=True)
class CapacityPlan:
    """What `shape` needs on `target` at batch × context, and the limits that fit."""

    model: str
    target: str
    memory_bytes: int
    memory_source: str
    headroom: float
    weight_precision: str
    weight_precision_from: str
    kv_dtype: str
    kv_dtype_from: str
    activation_bytes: int
    parameters: int
    weight_bytes: int
    kv_bytes_per_token: int
    context: int
    batch: int
    kv_bytes_per_sequence: int
    workspace_bytes: int
    needed_bytes: int
    fits: bool
    max_sequences: int  # at `context`
    max_context: int  # at `batch`, by memory alone
    max_positions: int
    notes: tuple[str, ...] = ()

    @property
    def usable_bytes(self) -> int:
        return int(self.memory_bytes * (1.0 - self.headroom))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["usable_bytes"] = self.usable_bytes
        data["notes"] = list(self.notes)
        data["formulas"] = "see fdec/plan.py and docs/design-notes.md (Capacity planner)"
        return data


def workspace_bytes(shape: ModelShape, batch: int, context: int, activation_bytes: int) -> int:
    """Activation workspace for `batch` sequences at `context` (see the module's formulas)."""
    width = 2 * shape.hidden_size + shape.q_dim + 2 * shape.kv_dim + 2 * shape.intermediate_size
    if not shape.is_decoder:
        scores = batch * shape.num_heads * context * context * activation_bytes
        return batch * context * width * activation_bytes + scores
    tokens = max(batch, min(PREFILL_CHUNK, context))
    return tokens * width * activation_bytes + batch * shape.vocab_size * 4


def _largest(fits: Callable[[int], bool]) -> int:
    """The largest n ≥ 1 with fits(n) (fits is monotone decreasing), 0 if none."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while high < _SEARCH_LIMIT and fits(high):
        low, high = high, high * 2
    if high >= _SEARCH_LIMIT and fits(high):
        return high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def plan_capacity(
    shape: ModelShape,
    target: Any,
    *,
    weights: str | None = None,
    kv_dtype: str | None = None,
    context: int | None = None,
    batch: int = 1,
    headroom: float = DEFAULT_HEADROOM,
) -> CapacityPlan:
    """Plan `shape` on `target`. `weights` and `kv_dtype` default to the target's
    [default_recipe]; `context` to the model's positions (at most DEFAULT_CONTEXT_CAP)."""
    if batch < 1:
        raise UsageError(f"--batch must be at least 1, got {batch}", "pass --batch 1 or more")
    if not 0.0 <= headroom < 1.0:
        raise UsageError(
            f"--headroom must be at least 0 and below 1, got {headroom:g}", "pass e.g. 10%"
        )
    if context is None:
        context = min(shape.max_positions or DEFAULT_CONTEXT_CAP, DEFAULT_CONTEXT_CAP)
    if context < 1:
        raise UsageError(f"--context must be at least 1, got {context}", "pass --context 1 or more")
    recipe = target.default_recipe
    weight_from = "--quantize" if weights else f"{target.name} default_recipe.weights"
    found = (shape.source_method, shape.source_bits) if shape.source_method else None
    kept = source_recipe(found, target)
    if not weights and kept:  # compiles on the checkpoint's own blocks
        weights = kept
        weight_from = f"the source ({shape.source_quantization})"
    weight_name = precision_of(weights or recipe["weights"], "weight precision")
    if shape.kind == "encoder" and not weights and "encoder_weights" in recipe:
        weight_from = f"{target.name} default_recipe.encoder_weights"
        weight_name = precision_of(recipe["encoder_weights"], "weight precision")
    kv_from = "--kv-dtype" if kv_dtype else f"{target.name} default_recipe.kv_cache"
    kv_name = precision_of(kv_dtype or recipe["kv_cache"], "KV-cache dtype")
    if kv_name not in KV_DTYPES:
        raise UsageError(
            f"KV-cache dtype {kv_name} is not supported", f"use one of: {', '.join(KV_DTYPES)}"
        )
    target.require(weight_name)  # e.g. fp8 on an a100: InputError naming the alternatives
    if shape.is_decoder and target.is_gpu:  # the cpu target runs an fp8 cache's Q/DQ in ONNX
        target.require(kv_name)  # Runtime, as quantize-kv-cache allows (--kv-dtype's help)
    # int8-wo, or a plain int8 that means it (a cpu decoder's)
    method = (weights or "").lower().partition("-")[2]
    if weight_name == "int8" and not method:
        from fdec.backends import get_backend
        from fdec.compile.recipe import bare_method  # fdec.compile imports fdec.plan

        method = bare_method("int8", target, get_backend(target.default_backend), shape.kind)
    weight_only_int8 = weight_name == "int8" and method == "wo"
    fmt = INT8_WEIGHT_ONLY if weight_only_int8 else WEIGHT_FORMATS[weight_name]
    memory, memory_source = target_memory(target)
    usable = int(memory * (1.0 - headroom))
    act = _activation_bytes(target)
    # fdec's int4 for ONNX Runtime keeps a tied table tied (MatMulNBits + GatherBlockQuantized).
    share = (weight_name == "int4" or weight_only_int8) and target.default_backend == "onnxruntime"
    weight_total = shape.weight_bytes(fmt, float_bytes(target), share_tied=share)
    kv_token = shape.kv_values_per_token() * KV_DTYPES[kv_name]

    def need(b: int, s: int) -> int:
        return weight_total + b * s * kv_token + workspace_bytes(shape, b, s, act)

    notes = list(shape.notes)
    if not shape.is_decoder:
        notes.append("no KV cache (encoder): limits come from weights and activations")
    if fmt.quantized and shape.is_decoder and shape.tie_word_embeddings:
        notes.append(
            f"tied embedding: one {weight_name} table for lm_head and embedding (ONNX Runtime "
            f"{weight_name})"
            if share
            else "tied lm_head stored separately, quantized (fdec unties it to quantize)"
        )
    if shape.max_positions and context > shape.max_positions:
        notes.append(f"context {context} exceeds the model's {shape.max_positions} positions")
    max_context = _largest(lambda s: need(batch, s) <= usable)
    needed = need(batch, context)
    return CapacityPlan(
        model=shape.name,
        target=target.name,
        memory_bytes=memory,
        memory_source=memory_source,
        headroom=headroom,
        weight_precision=weight_name,
        weight_precision_from=weight_from,
        kv_dtype=kv_name if shape.is_decoder else "none",
        kv_dtype_from=kv_from if shape.is_decoder else "encoder: no KV cache",
        activation_bytes=act,
        parameters=shape.parameters(),
        weight_bytes=weight_total,
        kv_bytes_per_token=kv_token,
        context=context,
        batch=batch,
        kv_bytes_per_sequence=kv_token * context,
        workspace_bytes=workspace_bytes(shape, batch, context, act),
        needed_bytes=needed,
        fits=needed <= usable,
        max_sequences=_largest(lambda b: need(b, context) <= usable),
        max_context=max_context,
        max_positions=shape.max_positions,
        notes=tuple(notes),
    )


def check_capacity(
    config: dict[str, Any],
    target: Any,
    *,
    model: str,
    weights: str | None,
    kv_dtype: str | None = None,
    batch: int,
    context: int | None,
    default_context: int,
) -> CapacityPlan:
    """`fdec compile`'s early check: the plan for --max-batch × --max-seq-len, or a
    CapacityError (exit 4) with the numbers when it cannot fit the target's memory."""
    shape = shape_from_config(config, model)
    if context is None:
        context = min(default_context, shape.max_positions or default_context)
    plan = plan_capacity(
        shape, target, weights=weights, kv_dtype=kv_dtype, context=context, batch=batch
    )
    if plan.fits:
        return plan
    limits = []
    if plan.max_sequences:
        limits.append(f"--max-batch {plan.max_sequences}")
    if plan.max_context:
        limits.append(f"--max-seq-len {plan.max_context}")
    fix = (
        f"lower to {' or '.join(limits)}" if limits else "quantize further (--quantize int4)"
    ) + f", or use a larger target (fdec plan {model} --target all)"
    raise CapacityError(
        f"{model} at --max-batch {batch} × --max-seq-len {context} does not fit {target.name}: "
        f"needs {_gb(plan.needed_bytes)} (weights {_gb(plan.weight_bytes)} "
        f"{plan.weight_precision} + KV {_gb(batch * plan.kv_bytes_per_sequence)} "
        f"{plan.kv_dtype} + workspace {_gb(plan.workspace_bytes)}), "
        f"{_gb(plan.usable_bytes)} available ({_gb(plan.memory_bytes)} less "
        f"{plan.headroom:.0%} headroom)",
        fix,
    )


def _gb(n: int) -> str:
    """A byte count for a message: GB, MB or KB (decimal), three significant digits or more."""
    for unit, size in (("GB", _GB), ("MB", _MB), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:,.{max(0, 2 - int(math.log10(n / size)))}f} {unit}"
    return f"{n} bytes"
