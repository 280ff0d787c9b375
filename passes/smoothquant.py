"""SmoothQuant, shared by the int8 and int4 quantizers: group weights by the activation they multiply, compute per-channel smoothing factors (α per group, searched on calibration rows), and divide that activation by them.

The division is folded into the norm that produces the activation, or a Mul is inserted after
its producer. `search_alpha` picks each group's α (and, for static scales, how far the
activation range is clipped) by the group's output error on captured calibration rows.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from fdec.passes.weights import (
    FLOAT_TYPES,
    LAYER_ROLE,
    Site,
    Weight,
    add_initializer,
    fresh_name,
)

__all__ = [
    "SMOOTHING_MUL",
    "ActivationGroup",
    "Searched",
    "capture_rows",
    "divide_activation",
    "dynamic_uint8",
    "foldable",
    "group_by_activation",
    "insert_after_producer",
    "role_of",
    "search_alpha",
    "smoothing_factors",
    "static_int8",
]

# SmoothQuant factors are kept within these bounds (never 0, never a huge multiplier).
_SMOOTH_MIN, _SMOOTH_MAX = 1e-5, 1e5
# Ops whose output 0 is `normalize(x) * scale (+ bias)` over the last axis: (domain, op) →
# the input indices of the per-channel scale and bias a smoothing factor can be folded into.
_NORM_OPS: dict[tuple[str, str], tuple[int, ...]] = {
    ("", "LayerNormalization"): (1, 2),
    ("", "RMSNormalization"): (1,),
    ("", "SimplifiedLayerNormalization"): (1,),
    ("com.microsoft", "SimplifiedLayerNormalization"): (1,),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): (2,),
    ("com.microsoft", "SkipLayerNormalization"): (2, 3),
}
_FOLD_DEPTH = 4  # Reshapes walked through on the way back to the norm


@dataclasses.dataclass
class ActivationGroup:
    """The weights multiplied by one activation, and the scale that activation will get."""

    activation: ir.Value
    weights: list[Weight]

    @property
    def sites(self) -> list[Site]:
        return [site for weight in self.weights for site in weight.sites]

    @property
    def dtype(self) -> ir.DataType:
        return self.activation.dtype or self.weights[0].dtype


def group_by_activation(
    weights: list[Weight], skipped: collections.Counter[str]
) -> list[ActivationGroup]:
    groups: dict[int, ActivationGroup] = {}
    for weight in weights:
        activations = {id(site.activation): site.activation for site in weight.sites}
        if len(activations) != 1:
            skipped["read by more than one activation"] += 1
            continue
        (activation,) = activations.values()
        if activation.dtype not in (None, *FLOAT_TYPES) or not activation.name:
            skipped["activation is not a named float tensor"] += 1
            continue
        groups.setdefault(id(activation), ActivationGroup(activation, [])).weights.append(weight)
    return list(groups.values())


def insert_after_producer(graph: ir.Graph, value: ir.Value, nodes: list[ir.Node]) -> None:
    producer = value.producer()
    if producer is not None and producer.graph is graph:
        graph.insert_after(producer, nodes)
    else:  # a graph input: available from the start
        graph.insert_before(graph.node(0), nodes)


def smoothing_factors(
    alpha: float, group_weights: Sequence[np.ndarray], channel_absmax: np.ndarray
) -> np.ndarray:
    """SmoothQuant's s [K] (float32): max|X_j|^α / max|W_j|^(1-α) over the [K, N] weights.

    s_j = 1 where either range is 0; clamped to [1e-5, 1e5]. Shared by the static QDQ pass and
    the dynamic int8 pass (fdec.passes.quantize.QuantizeInt8Pass).
    """
    alpha = float(alpha)
    x = np.asarray(channel_absmax, dtype=np.float64)
    w = np.max([np.abs(array).max(axis=1) for array in group_weights], axis=0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.power(x, alpha) / np.power(w, 1.0 - alpha)
    s = np.where((x > 0) & (w > 0) & np.isfinite(s), s, 1.0)
    return np.clip(s, _SMOOTH_MIN, _SMOOTH_MAX).astype(np.float32)


# --- α per group: the output error on calibration rows -----------------------------------------

_ROWS_PER_BATCH = 128  # rows of one calibration batch (the run-time quantizer's tensor)
_SEARCH_MACS = 4e8  # rows × K × N per trial; wider groups (an lm_head) are tried on fewer rows


def role_of(spec: Any, name: str | None) -> str | None:
    """The kind of linear layer (`q`, `down`, `lm_head`...) the ModelSpec gives initializer `name`."""
    for role, weight_name in spec.weights.items():
        if weight_name == name:
            match = LAYER_ROLE.match(role)
            return match.group(1) if match else role
    return None


def capture_rows(
    model: Any, batches: Sequence[np.ndarray], names: Sequence[str], *, max_rows: int
) -> dict[str, np.ndarray]:
    """Up to `max_rows` rows ([R, K] float32) of each named activation over the batches, taken
    evenly from the first batches (whole batches: a dynamic quantizer sees one per run)."""
    from fdec.calibrate import activations_per_batch, active_calibration_source

    names = list(dict.fromkeys(names))
    source = active_calibration_source(batches)
    if source is not None:  # a streamed compile: layer by layer (fdec.calibrate_layerwise)
        return source.first(model, names, max_rows)
    rows: dict[str, list[np.ndarray]] = {name: [] for name in names}
    taken = 0
    for found in activations_per_batch(model, batches, names):
        for name, array in found.items():
            rows[name].append(np.asarray(array, dtype=np.float32).reshape(-1, array.shape[-1]))
        taken += len(next(iter(rows.values()))[-1]) if names else 0
        if taken >= max_rows:
            break
    return {name: np.concatenate(parts)[:max_rows] for name, parts in rows.items() if parts}


def static_int8(peak: float) -> Callable[[np.ndarray], np.ndarray]:
    """Fake per-tensor symmetric int8 with a fixed range (static Q/DQ): x ↦ dequantized codes."""
    scale = peak / 127.0 if peak > 0 else 1.0

    def fake(x: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(x / scale), -127, 127) * scale

    return fake


def dynamic_uint8(x: np.ndarray) -> np.ndarray:
    """Fake DynamicQuantizeLinear (uint8, range [min(x,0), max(x,0)] per calibration batch)."""
    out = np.empty_like(x)
    for start in range(0, len(x), _ROWS_PER_BATCH):
        part = x[start : start + _ROWS_PER_BATCH]
        low, high = min(float(part.min()), 0.0), max(float(part.max()), 0.0)
        scale = (high - low) / 255.0 or 1.0
        zero = np.clip(np.rint(-low / scale), 0, 255)
        out[start : start + _ROWS_PER_BATCH] = (
            np.clip(np.rint(part / scale) + zero, 0, 255) - zero
        ) * scale
    return out


def _int8_weight(w: np.ndarray, qmax: int) -> np.ndarray:
    peak = np.abs(w).max(axis=0)
    scale = np.where(peak > 0, peak / qmax, 1.0)
    return np.clip(np.rint(w / scale), -qmax, qmax) * scale


@dataclasses.dataclass(frozen=True)
class Searched:
    """What `search_alpha` chose for one group, and the relative output errors behind it."""

    alpha: float
    clip: float  # activation range used: clip × the calibrated range of X / s
    error: float  # ‖XW − Q(X/s)·Q(sW)‖² / ‖XW‖² at the choice
    error_at_default: float  # the same at the default α and no clipping


def search_alpha(
    rows: np.ndarray,
    group_weights: Sequence[np.ndarray],
    channel_absmax: np.ndarray,
    *,
    alphas: Sequence[float],
    default: float,
    activation: str,
    clips: Sequence[float] = (1.0,),
    qmax: int = 127,
) -> Searched:
    """The α (from `alphas`) and activation clip (from `clips`, static scales only) that give
    the smallest relative output error of the group on `rows` ([R, K] calibration rows of X),
    with per-channel symmetric int8 weights (±`qmax`) and `activation` = "static" (per-tensor
    int8 at the calibrated range of X/s, times the clip) or "dynamic" (`dynamic_uint8`).
    α is chosen first (no clipping), then the clip at that α."""
    weights = [np.asarray(w, dtype=np.float32) for w in group_weights]
    width = sum(w.shape[0] * w.shape[1] for w in weights)
    keep = max(_ROWS_PER_BATCH // 2, min(len(rows), int(_SEARCH_MACS // width)))
    x = np.asarray(rows[:keep], dtype=np.float32)
    reference = [x @ w for w in weights]
    norm = sum(float(np.square(r).sum()) for r in reference) or 1.0
    absmax = np.asarray(channel_absmax, dtype=np.float64)

    def error(alpha: float, clip: float) -> float:
        s = smoothing_factors(alpha, weights, absmax)
        xs = x / s
        if activation == "static":
            xq = static_int8(clip * float(np.max(absmax / s)))(xs)
        else:
            xq = dynamic_uint8(xs)
        total = 0.0
        for w, r in zip(weights, reference):
            total += float(np.square(r - xq @ _int8_weight(w * s[:, None], qmax)).sum())
        return total / norm

    scored = {float(a): error(float(a), 1.0) for a in alphas}
    if default not in scored:
        scored[float(default)] = error(float(default), 1.0)
    alpha = min(scored, key=scored.__getitem__)
    best, clip = scored[alpha], 1.0
    if activation == "static":
        for candidate in clips:
            if candidate != 1.0 and (found := error(alpha, float(candidate))) < best:
                best, clip = found, float(candidate)
    return Searched(alpha, clip, best, scored[float(default)])


def _per_channel_constant(value: ir.Value | None, k: int) -> bool:
    """Whether `value` is a float initializer holding one value per channel of a last axis K."""
    tensor = value.const_value if value is not None else None
    if tensor is None or tensor.dtype not in FLOAT_TYPES or value.is_graph_input():
        return False
    shape = list(tensor.shape)
    return bool(shape) and shape[-1] == k and math.prod(shape) == k


def _last_dim(value: ir.Value) -> int | None:
    shape = value.shape
    if shape is None or len(shape) == 0:
        return None
    last = shape[-1]
    return last if isinstance(last, int) else None


def _fold_target(
    graph: ir.Graph, group: ActivationGroup, k: int
) -> tuple[ir.Node, list[int]] | None:
    """(node, input indices of its per-channel constants) to fold 1/s into, or None.

    Walks back from the activation through Reshapes that keep the last axis K; every value on
    the way must be read only by the next node (the last by this group's sites only).
    """
    value = group.activation
    readers = {id(site.node) for site in group.sites}
    for _ in range(_FOLD_DEPTH + 1):
        if value.is_graph_output() or value.is_graph_input():
            return None
        if any(id(use.node) not in readers for use in value.uses()):
            return None
        node = value.producer()
        if node is None or node.graph is not graph:
            return None
        key = (node.domain or "", node.op_type)
        if key == ("", "Reshape"):
            source = node.inputs[0]
            if source is None or _last_dim(value) != k or _last_dim(source) != k:
                return None
            value, readers = source, {id(node)}
            continue
        if key == ("", "Mul"):
            constants = [i for i, v in enumerate(node.inputs) if _per_channel_constant(v, k)]
            if len(constants) != 1 or node.inputs[1 - constants[0]].const_value is not None:
                return None
            return node, constants
        indices = _NORM_OPS.get(key)
        if indices is None or node.outputs[0] is not value:
            return None
        if key == ("", "LayerNormalization") or key == ("", "RMSNormalization"):
            axis = node.attributes.get("axis")
            if axis is not None and axis.as_int() != -1:
                return None
        present = [i for i in indices if i < len(node.inputs) and node.inputs[i] is not None]
        if not present or not all(_per_channel_constant(node.inputs[i], k) for i in present):
            return None
        return node, present
    return None


def divide_activation(
    graph: ir.Graph,
    group: ActivationGroup,
    s: np.ndarray,
    taken: set[str],
    *,
    label: str = "SmoothQuant",
) -> tuple[ir.Value, bool]:
    """Make the group's weights read X / s: (the value they must read now, folded or not).

    Folded (`_fold`): the op producing X now computes X / s, and X itself is returned.
    Otherwise a `Mul` by 1/s (named `<X>_<label>`) is inserted after X's producer and its
    output returned; the caller points the group's sites at it.
    """
    if _fold(graph, group, s, taken):
        return group.activation, True
    source = group.activation
    inverse = add_initializer(
        graph,
        fresh_name(graph, f"{source.name}_smooth", taken),
        ir.tensor((1.0 / s).astype(group.dtype.numpy())),
    )
    mul = ir.node("Mul", [source, inverse], name=f"{source.name}_{label}")
    mul.metadata_props[SMOOTHING_MUL] = label  # what a serving checkpoint cannot hold
    insert_after_producer(graph, source, [mul])
    divided = mul.outputs[0]
    divided.name = fresh_name(graph, f"{source.name}_smoothed", taken)
    return divided, False


# Metadata key of the Muls `divide_activation` inserts (value: the method's label).
SMOOTHING_MUL = "fdec.smoothing"


def foldable(graph: ir.Graph, group: ActivationGroup) -> bool:
    """Whether smoothing the group folds into constants the producing op alone reads (a norm's
    weight): the graph then holds no Mul and no copy, only a changed parameter."""
    found = _fold_target(graph, group, group.weights[0].shape[0])
    if found is None:
        return False
    node, indices = found
    return all(
        len(node.inputs[i].uses()) == 1 and not node.inputs[i].is_graph_output() for i in indices
    )


def _fold(graph: ir.Graph, group: ActivationGroup, s: np.ndarray, taken: set[str]) -> bool:
    """Divide the per-channel constants of the op producing the activation by s; True if done."""
    found = _fold_target(graph, group, s.shape[0])
    if found is None:
        return False
    node, indices = found
    for index in indices:
        value = node.inputs[index]
        assert value is not None and value.const_value is not None
        old = value.const_value.numpy()
        new = (old.astype(np.float32) / s.reshape(old.shape)).astype(old.dtype)
        if len(value.uses()) == 1 and not value.is_graph_output() and value.name:
            value.const_value = ir.tensor(new, name=value.name)
        else:  # shared with another reader: give this node its own copy
            copy = add_initializer(
                graph,
                fresh_name(graph, f"{value.name or node.name}_smoothed", taken),
                ir.tensor(new),
            )
            node.replace_input_with(index, copy)
    return True
