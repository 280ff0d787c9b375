"""Structured pruning: whole query heads (GQA-aware), MLP channels and whole layers.

Only whole units give real speed, so this pass removes them from the weights (smaller
matmuls, fewer layers, a smaller KV cache when layers go) instead of zeroing them.

1. **Coupling** (`coupled_groups`): a networkx graph of the ONNX dataflow names, for each
   "closing" projection (o, down: the ones writing back to the residual stream), the
   projections opened inside the same block: the weighted MatMuls among the ancestors of
   the closer's input that are not ancestors of those projections' own inputs. For a llama
   layer that is {q, k, v} → o and {gate, up} → down; anything else is refused, so a family
   the slicing rules below do not describe is never cut.
2. **Importance** (`measure_importance`), from calibration batches run through ONNX Runtime:
   a query head's score is the mean norm of what it writes to the residual stream
   (‖A_h · W_o[h]‖ per token), an MLP channel's is mean |a_c| · ‖W_down[c]‖, a layer's is
   the mean of 1 − cos(x_in, x_out) of the residual stream across it (how much it changes
   the hidden state; ShortGPT's block influence).
3. **Slicing**: per layer, the lowest-scoring query heads of *each KV group* go (the same
   number per group and per layer, so KV heads, the cache and the Hugging Face config stay
   expressible), q's columns and o's rows with them, and the repeat-KV Expand/Reshape
   constants are rewritten for the new group size; the lowest-scoring MLP channels go from
   gate/up columns and down rows (the kept count rounded to a multiple of 64, or 8 for small
   models, which block quantizers need); the lowest-scoring layers are bypassed (their
   output's users read their input), their cache inputs/outputs dropped, and the remaining
   layers renumbered so the build looks like a smaller model of the same family.

The ModelSpec is updated (heads, intermediate size, layers, weight roles, cache I/O), so
`fdec.lower.hf_checkpoint.write_hf_checkpoint` writes the pruned model as a Hugging Face
checkpoint transformers loads (the student for `fdec distill`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import networkx as nx
import numpy as np
import onnx_ir as ir

from fdec.calibrate import activations_per_batch, checked_batches
from fdec.errors import CompileError, UsageError
from fdec.ir import FdecModel
from fdec.passes.cleanup import InferShapesPass, RemoveDeadNodesPass
from fdec.passes.weights import find_weight
from fdec.pipeline import Pass, PassResult, Tolerance

__all__ = [
    "Coupling",
    "Importance",
    "PrunePass",
    "coupled_groups",
    "measure_importance",
    "parse_prune",
]

logger = logging.getLogger(__name__)

# Pruning changes the model on purpose: its accuracy change is measured and reported, and
# gated only by --max-ppl-increase when the user sets one.
PRUNE_TOLERANCE = Tolerance(
    max_abs_error=None, min_top1_agreement=0.0, max_perplexity_increase=None,
    greedy_identical=False,
)  # fmt: skip
_ATTENTION_OPENERS = ("q", "k", "v")
_MLP_OPENERS = ("gate", "up")
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(\w+)$")
_CACHE_NAME = re.compile(r"^(past_key_values|present)\.(\d+)\.(key|value)$")


def parse_prune(text: str | None) -> dict[str, Any]:
    """`--prune heads=0.25,mlp=0.3,layers=4` → {"heads": 0.25, "mlp": 0.3, "layers": 4}."""
    if not text:
        return {}
    fix = "write --prune heads=F,mlp=F,layers=N (fractions in [0, 1), N a whole number of layers)"
    found: dict[str, Any] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in ("heads", "mlp", "layers"):
            raise UsageError(f"--prune {item!r} is not heads=, mlp= or layers=", fix)
        try:
            value: Any = int(raw) if key == "layers" else float(raw)
        except ValueError:
            raise UsageError(f"--prune {key}={raw!r} is not a number", fix) from None
        found[key] = value
    PrunePass(**found)  # validates the values
    return found


@dataclasses.dataclass(frozen=True)
class Coupling:
    """Weights cut together in one layer: the openers' output columns and the closer's rows."""

    layer: int
    kind: str  # "attention" | "mlp"
    openers: tuple[str, ...]  # roles, e.g. ("layers.3.q", "layers.3.k", "layers.3.v")
    closer: str  # role, e.g. "layers.3.o"


def _sites(model: FdecModel) -> dict[str, Any]:
    """Role → the weight found by quantize's finder (its MatMul sites, array, transposes)."""
    found = {}
    for role, name in model.spec.weights.items():
        match = _LAYER_KEY.match(role)
        if not match:
            continue
        try:
            weight = find_weight(model.graph, name)
        except ValueError as reason:
            raise CompileError(
                f"prune: weight {role} ({name}) is not a plain float MatMul weight: {reason}",
                "run prune before quantization and fusion (first after cleanup)",
            ) from None
        if len(weight.sites) != 1:
            raise CompileError(
                f"prune: weight {role} is read by {len(weight.sites)} MatMuls, expected 1",
                "run prune before passes that share or pack weights",
            )
        found[role] = weight
    return found


def _dataflow(graph: ir.Graph) -> nx.DiGraph:
    flow = nx.DiGraph()
    for node in graph:
        flow.add_node(node)
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None:
                flow.add_edge(producer, node)
    return flow


def coupled_groups(model: FdecModel, weights: Mapping[str, Any] | None = None) -> list[Coupling]:
    """Each layer's attention and MLP couplings, found from the dataflow, checked against the
    roles the slicing rules expect; CompileError when the graph does not look like that."""
    weights = weights if weights is not None else _sites(model)
    flow = _dataflow(model.graph)
    node_role = {weight.sites[0].node: role for role, weight in weights.items()}
    couplings = []
    for layer in range(model.spec.num_layers):
        for kind, closer, expected in (
            ("attention", "o", _ATTENTION_OPENERS),
            ("mlp", "down", _MLP_OPENERS),
        ):
            closer_role = f"layers.{layer}.{closer}"
            if closer_role not in weights:
                raise CompileError(
                    f"prune: layer {layer} has no {closer} projection in the ModelSpec",
                    "prune supports llama-style families (q/k/v/o and gate/up/down weights)",
                )
            site = weights[closer_role].sites[0]
            above = _ancestors(flow, site.activation)
            inside = [node for node in above if node in node_role]
            below: set[ir.Node] = set()
            for node in inside:
                below |= _ancestors(flow, weights[node_role[node]].sites[0].activation)
            openers = sorted(node_role[node] for node in inside if node not in below)
            want = sorted(f"layers.{layer}.{role}" for role in expected)
            if openers != want:
                raise CompileError(
                    f"prune: layer {layer}'s {closer} projection is coupled to {openers}, "
                    f"not {want}",
                    "prune supports llama-style families (q/k/v/o and gate/up/down weights)",
                )
            couplings.append(Coupling(layer, kind, tuple(want), closer_role))
    return couplings


def _ancestors(flow: nx.DiGraph, value: ir.Value) -> set[ir.Node]:
    producer = value.producer()
    if producer is None:
        return set()
    return nx.ancestors(flow, producer) | {producer}


# --- importance ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Importance:
    """Scores from calibration data (higher = more important)."""

    heads: np.ndarray  # [layers, query heads]
    channels: np.ndarray  # [layers, intermediate]
    layers: np.ndarray  # [layers]
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "layers": [round(float(x), 6) for x in self.layers],
            "heads": [[round(float(x), 5) for x in row] for row in self.heads],
            "channels_summary": [
                {"min": float(row.min()), "median": float(np.median(row)), "max": float(row.max())}
                for row in self.channels
            ],
        }


def _residuals(
    model: FdecModel, weights: Mapping[str, Any], layer: int
) -> tuple[ir.Value, ir.Value]:
    """(x_in, x_out): the residual stream entering and leaving `layer`.

    x_mid = Add(x_in, o(...)) and x_out = Add(x_mid, down(...)) in a pre-norm block."""

    def residual_add(role: str) -> tuple[ir.Node, ir.Value]:
        out = weights[role].sites[0].node.outputs[0]
        users = [use.node for use in out.uses()]
        if len(users) != 1 or users[0].op_type != "Add":
            raise CompileError(
                f"prune: {role}'s output is not added to the residual stream "
                f"(read by {[u.op_type for u in users]})",
                "layer pruning supports pre-norm llama-style blocks",
            )
        add = users[0]
        other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        return add, other

    attention_add, x_in = residual_add(f"layers.{layer}.o")
    mlp_add, x_mid = residual_add(f"layers.{layer}.down")
    if x_mid is not attention_add.outputs[0]:
        raise CompileError(
            f"prune: layer {layer}'s MLP does not read the attention's residual output",
            "layer pruning supports sequential pre-norm blocks",
        )
    return x_in, mlp_add.outputs[0]


def measure_importance(
    model: FdecModel, batches: Sequence[np.ndarray], weights: Mapping[str, Any] | None = None
) -> Importance:
    """Head, channel and layer scores of `model` on `batches` (see the module docstring)."""
    weights = weights if weights is not None else _sites(model)
    spec = model.spec
    layers, heads, dim = spec.num_layers, spec.num_heads, spec.head_dim
    names: dict[str, str] = {}
    for layer in range(layers):
        names[f"{layer}.o"] = weights[f"layers.{layer}.o"].sites[0].activation.name
        names[f"{layer}.down"] = weights[f"layers.{layer}.down"].sites[0].activation.name
        x_in, x_out = _residuals(model, weights, layer)
        names[f"{layer}.in"], names[f"{layer}.out"] = x_in.name, x_out.name
    head_scores = np.zeros((layers, heads))
    channel_scores = np.zeros((layers, spec.intermediate_size))
    layer_scores = np.zeros(layers)
    down_rows = [np.linalg.norm(weights[f"layers.{i}.down"].array, axis=1) for i in range(layers)]
    o_heads = [  # [heads, dim, hidden]: what each head's output is multiplied by
        weights[f"layers.{i}.o"].array.astype(np.float64).reshape(heads, dim, -1)
        for i in range(layers)
    ]
    tokens = 0
    for captured in activations_per_batch(model, batches, list(dict.fromkeys(names.values()))):
        count = None
        for layer in range(layers):
            attn = captured[names[f"{layer}.o"]].astype(np.float64)
            attn = attn.reshape(-1, heads, dim)
            count = attn.shape[0]
            written = np.einsum("thd,hdn->thn", attn, o_heads[layer])
            head_scores[layer] += np.linalg.norm(written, axis=2).sum(axis=0)
            act = captured[names[f"{layer}.down"]].astype(np.float64).reshape(count, -1)
            channel_scores[layer] += np.abs(act).sum(axis=0) * down_rows[layer]
            x_in = captured[names[f"{layer}.in"]].astype(np.float64).reshape(count, -1)
            x_out = captured[names[f"{layer}.out"]].astype(np.float64).reshape(count, -1)
            cos = (x_in * x_out).sum(axis=1) / (
                np.linalg.norm(x_in, axis=1) * np.linalg.norm(x_out, axis=1) + 1e-12
            )
            layer_scores[layer] += (1.0 - cos).sum()
        tokens += count or 0
    if not tokens:
        raise CompileError("prune: calibration saw no tokens", "give non-empty calibration text")
    return Importance(head_scores / tokens, channel_scores / tokens, layer_scores / tokens, tokens)


# --- the pass -------------------------------------------------------------------------------------


def _kept_channels(size: int, fraction: float) -> int:
    """Channels kept of `size` when `fraction` goes: a multiple of 64 (8 below 256)."""
    step = 64 if size >= 256 else 8
    kept = round(size * (1.0 - fraction) / step) * step
    return max(step, min(size, kept))


@dataclasses.dataclass
class PrunePass(Pass):
    """Remove whole query heads, MLP channels and layers chosen by importance on calibration data."""

    name = "prune"
    family = "prune"
    summary = "structured pruning of heads (GQA-aware), MLP channels and layers by importance"
    tolerance = PRUNE_TOLERANCE

    heads: float = dataclasses.field(default=0.0, kw_only=True)
    mlp: float = dataclasses.field(default=0.0, kw_only=True)
    layers: int = dataclasses.field(default=0, kw_only=True)
    # Explicit choices instead of scores (tests, reproducing a study): layer → kept query
    # heads / kept channels, and layers removed.
    keep_heads: Mapping[int, Sequence[int]] | None = dataclasses.field(default=None, kw_only=True)
    keep_channels: Mapping[int, Sequence[int]] | None = dataclasses.field(
        default=None, kw_only=True
    )
    drop_layers: Sequence[int] | None = dataclasses.field(default=None, kw_only=True)
    batches: Sequence[np.ndarray] | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        for option in ("heads", "mlp"):
            value = getattr(self, option)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (0.0 <= value < 1.0)
            ):
                raise UsageError(
                    f"prune {option}={value!r} is not a fraction in [0, 1)",
                    f"give the share of {option} to remove, e.g. {option}=0.25",
                )
        if isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 0:
            raise UsageError(
                f"prune layers={self.layers!r} is not a whole number ≥ 0",
                "give how many layers to remove, e.g. layers=4",
            )
        self.batches = checked_batches(self.name, self.batches)

    @property
    def explicit(self) -> bool:
        return any(x is not None for x in (self.keep_heads, self.keep_channels, self.drop_layers))

    @property
    def needs_calibration(self) -> bool:
        scored = self.heads or self.mlp or self.layers
        return bool(scored) and not self.explicit and self.batches is None

    def requires(self, model: FdecModel, target: Any = None) -> None:
        spec = model.spec
        if not spec.is_decoder:
            raise UsageError(
                f"prune supports decoder LLMs; this model is a {spec.kind}",
                "drop --prune for encoders",
            )
        if self.layers >= spec.num_layers:
            raise UsageError(
                f"prune layers={self.layers} would remove all {spec.num_layers} layers",
                f"remove at most {spec.num_layers - 1}",
            )
        if self.heads and spec.num_heads == spec.num_kv_heads:
            raise UsageError(
                "prune heads= removes query heads within KV groups; this model has one query "
                "head per KV head",
                "prune mlp= and layers= only",
            )
        if self.needs_calibration:
            raise UsageError(
                "prune needs calibration data and was given none",
                "pass batches=fdec.calibrate.calibration_batches(...) or explicit keep_* choices",
            )

    # -- choosing ----------------------------------------------------------------------------

    def _choose(self, model: FdecModel, weights: Mapping[str, Any]) -> tuple[dict, dict, list, Any]:
        spec = model.spec
        group = spec.num_heads // spec.num_kv_heads
        importance = None
        if not self.explicit and (self.heads or self.mlp or self.layers):
            importance = measure_importance(model, self.batches or (), weights)
        keep_heads = {int(k): sorted(int(h) for h in v) for k, v in (self.keep_heads or {}).items()}
        keep_channels = {
            int(k): sorted(int(c) for c in v) for k, v in (self.keep_channels or {}).items()
        }
        drop = sorted(int(i) for i in (self.drop_layers or ()))
        if importance is not None:
            if self.heads:
                per_group = min(group - 1, max(1, round(self.heads * group)))
                for layer in range(spec.num_layers):
                    scores = importance.heads[layer].reshape(spec.num_kv_heads, group)
                    kept = []
                    for g, row in enumerate(scores):
                        best = np.argsort(-row, kind="stable")[: group - per_group]
                        kept += [g * group + int(h) for h in best]
                    keep_heads[layer] = sorted(kept)
            if self.mlp:
                kept_count = _kept_channels(spec.intermediate_size, self.mlp)
                for layer in range(spec.num_layers):
                    best = np.argsort(-importance.channels[layer], kind="stable")[:kept_count]
                    keep_channels[layer] = sorted(int(c) for c in best)
            if self.layers:
                drop = sorted(
                    int(i) for i in np.argsort(importance.layers, kind="stable")[: self.layers]
                )
        self._check_uniform(spec, keep_heads, keep_channels, drop)
        return keep_heads, keep_channels, drop, importance

    @staticmethod
    def _check_uniform(spec: Any, keep_heads: dict, keep_channels: dict, drop: list) -> None:
        group = spec.num_heads // spec.num_kv_heads
        counts = set()
        for layer, heads in keep_heads.items():
            if not 0 <= layer < spec.num_layers:
                raise UsageError(f"prune keep_heads names layer {layer}", "use layers in range")
            per = collections.Counter(h // group for h in heads)
            if len(set(heads)) != len(heads) or any(not 0 <= h < spec.num_heads for h in heads):
                raise UsageError(
                    f"prune keep_heads[{layer}] = {heads} is not a set of heads", "fix it"
                )
            if set(per) != set(range(spec.num_kv_heads)) or len(set(per.values())) != 1:
                raise UsageError(
                    f"prune keep_heads[{layer}] keeps {dict(per)} heads per KV group",
                    "keep the same number of query heads in every KV group",
                )
            counts.add(len(heads))
        if len(keep_heads) not in (0, spec.num_layers) or len(counts) > 1:
            raise UsageError(
                "prune keeps different head counts across layers",
                "keep the same number of heads in every layer (a Hugging Face config has one)",
            )
        channel_counts = {len(v) for v in keep_channels.values()}
        if len(keep_channels) not in (0, spec.num_layers) or len(channel_counts) > 1:
            raise UsageError(
                "prune keeps different MLP widths across layers",
                "keep the same number of channels in every layer",
            )
        if len(set(drop)) != len(drop) or any(not 0 <= i < spec.num_layers for i in drop):
            raise UsageError(f"prune drop_layers {drop} is not a set of layers", "fix it")

    # -- cutting -----------------------------------------------------------------------------

    def call(self, model: FdecModel) -> PassResult:
        weights = _sites(model)
        couplings = coupled_groups(model, weights)
        spec = model.spec
        params_before = _parameters(model)
        keep_heads, keep_channels, drop, importance = self._choose(model, weights)
        group = spec.num_heads // spec.num_kv_heads
        heads_before, channels_before, layers_before = (
            spec.num_heads, spec.intermediate_size, spec.num_layers
        )  # fmt: skip
        for coupling in couplings:
            if coupling.kind == "attention" and coupling.layer in keep_heads:
                dim = spec.head_dim
                cols = np.concatenate(
                    [np.arange(h * dim, (h + 1) * dim) for h in keep_heads[coupling.layer]]
                )
                _slice(weights[f"layers.{coupling.layer}.q"], cols, output=True)
                _slice(weights[coupling.closer], cols, output=False)
            if coupling.kind == "mlp" and coupling.layer in keep_channels:
                cols = np.asarray(keep_channels[coupling.layer])
                for role in coupling.openers:
                    _slice(weights[role], cols, output=True)
                _slice(weights[coupling.closer], cols, output=False)
        rewritten = 0
        if keep_heads:
            kept = len(next(iter(keep_heads.values())))
            rewritten = _rewrite_repeat_kv(model.graph, spec.num_kv_heads, group, kept)
            spec.num_heads = kept
        if keep_channels:
            spec.intermediate_size = len(next(iter(keep_channels.values())))
        if drop:
            _drop_layers(model, weights, drop)
        if keep_heads or keep_channels or drop:
            _reinfer_shapes(model)
        params_after = _parameters(model)
        stats: dict[str, Any] = {
            "heads": f"{heads_before} → {spec.num_heads} query heads per layer "
            f"({spec.num_kv_heads} KV heads kept)",
            "mlp": f"{channels_before} → {spec.intermediate_size} channels per layer",
            "layers": f"{layers_before} → {spec.num_layers}",
            "layers_removed": drop,
            "heads_removed_fraction": round(1 - spec.num_heads / heads_before, 4),
            "mlp_removed_fraction": round(1 - spec.intermediate_size / channels_before, 4),
            "parameters_before": params_before,
            "parameters_after": params_after,
            "parameters_ratio": round(params_after / params_before, 4),
            "repeat_kv_constants_rewritten": rewritten,
            "couplings": len(couplings),
        }
        if importance is not None:
            stats["importance"] = importance.to_dict()
        return PassResult(model, modified=params_after != params_before, stats=stats)


def _parameters(model: FdecModel) -> int:
    return int(
        sum(
            math.prod(value.const_value.shape)
            for value in model.graph.initializers.values()
            if value.const_value is not None and value.const_value.dtype.is_floating_point()
        )
    )


def _slice(weight: Any, index: np.ndarray, *, output: bool) -> None:
    """Keep `index` along the weight's output (N) or input (K) axis, in its stored layout."""
    value: ir.Value = weight.value
    stored = value.const_value.numpy()
    # MatMul reads [K, N]; a Transpose between the weight and its MatMul means it is stored [N, K].
    axis = (1 if output else 0) if not weight.transposes else (0 if output else 1)
    value.const_value = ir.tensor(
        np.ascontiguousarray(np.take(stored, index, axis=axis)), name=value.name
    )
    value.shape = ir.Shape(value.const_value.shape)
    if output:
        for site in weight.sites:
            bias = site.bias or _added_bias(site.node.outputs[0], stored.shape[axis])
            if bias is not None and bias.const_value is not None:
                bias.const_value = ir.tensor(
                    np.ascontiguousarray(np.take(bias.const_value.numpy(), index, axis=-1)),
                    name=bias.name,
                )
                bias.shape = ir.Shape(bias.const_value.shape)


def _added_bias(out: ir.Value, width: int) -> ir.Value | None:
    """The bias a traced linear adds after its MatMul (Add with a [N] initializer), if any."""
    for use in out.uses():
        node = use.node
        if node.op_type != "Add":
            continue
        other = node.inputs[1 - use.idx]
        tensor = other.const_value if other is not None else None
        if tensor is not None and other.is_initializer() and tuple(tensor.shape) == (width,):
            return other
    return None


def _int_constant(value: ir.Value | None) -> int | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.size != 1:
        return None
    array = tensor.numpy()
    return int(array.reshape(-1)[0]) if array.dtype.kind == "i" else None


def _rewrite_repeat_kv(graph: ir.Graph, kv_heads: int, group: int, kept: int) -> int:
    """Point repeat_kv's Expand ([b, kv, group, s, d]) and Reshape ([b, heads, s, d]) shape
    constants at the new group size; returns how many constants were replaced."""
    new_group = kept // kv_heads
    replaced = 0
    made: dict[int, ir.Value] = {}

    def constant(number: int) -> ir.Value:
        if number not in made:
            name = f"prune_const_{number}"
            while name in graph.initializers:
                name += "_"
            made[number] = ir.Value(
                name=name, const_value=ir.tensor(np.array([number], np.int64), name=name)
            )
            graph.register_initializer(made[number])
        return made[number]

    for node in list(graph):
        if node.op_type != "Expand" or len(node.inputs) != 2:
            continue
        shape = node.inputs[1].producer() if node.inputs[1] is not None else None
        if shape is None or shape.op_type != "Concat" or len(shape.inputs) != 5:
            continue
        if _int_constant(shape.inputs[1]) != kv_heads or _int_constant(shape.inputs[2]) != group:
            continue
        shape.replace_input_with(2, constant(new_group))
        replaced += 1
        for use in node.outputs[0].uses():
            reshape = use.node
            if reshape.op_type != "Reshape":
                continue
            target = reshape.inputs[1].producer()
            if (
                target is not None
                and target.op_type == "Concat"
                and _int_constant(target.inputs[1]) == kv_heads * group
            ):
                target.replace_input_with(1, constant(kv_heads * new_group))
                replaced += 1
    if group != new_group and not replaced:
        raise CompileError(
            "prune: found no repeat-KV Expand/Reshape to resize for fewer query heads",
            "prune heads= supports graphs exported from transformers' llama-style attention",
        )
    return replaced


def _drop_layers(model: FdecModel, weights: Mapping[str, Any], drop: list[int]) -> None:
    """Bypass the layers in `drop`, remove their cache I/O, renumber the rest."""
    graph, spec = model.graph, model.spec
    bypass = {layer: _residuals(model, weights, layer) for layer in drop}
    # Later layers first, so a bypassed layer's input is already the real value.
    for layer in sorted(drop, reverse=True):
        x_in, x_out = bypass[layer]
        ir.convenience.replace_all_uses_with(x_out, x_in)
    drop_set = set(drop)
    graph.outputs[:] = [
        v for v in graph.outputs
        if not ((m := _CACHE_NAME.match(v.name or "")) and int(m.group(2)) in drop_set)
    ]  # fmt: skip
    RemoveDeadNodesPass()(model)
    kept_inputs = {
        (int(m.group(2)), m.group(3)): value
        for value in graph.inputs
        if (m := _CACHE_NAME.match(value.name or "")) and int(m.group(2)) not in drop_set
    }
    for value in list(graph.inputs):
        match = _CACHE_NAME.match(value.name or "")
        if match and int(match.group(2)) in drop_set:
            if value.uses():
                # Shape-only readers (the attention mask takes the past length from a cache
                # input): every layer's cache has the same shape, so a kept layer's serves.
                keep = min((k for k in kept_inputs if k[1] == match.group(3)), default=None)
                ir.convenience.replace_all_uses_with(value, kept_inputs[keep])
            graph.inputs.remove(value)
    renumber = {
        old: new for new, old in enumerate(i for i in range(spec.num_layers) if i not in drop_set)
    }
    prefix = _layer_prefix(spec)
    for value in [*graph.inputs, *graph.outputs]:
        match = _CACHE_NAME.match(value.name or "")
        if match:
            value.name = f"{match.group(1)}.{renumber[int(match.group(2))]}.{match.group(3)}"
    # Initializers of later layers take their new index, so names stay HF parameter names.
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    moves = []
    for name in list(graph.initializers):
        match = pattern.match(name)
        if (
            match
            and int(match.group(1)) in renumber
            and renumber[int(match.group(1))] != int(match.group(1))
        ):
            moves.append((name, f"{prefix}{renumber[int(match.group(1))]}.{name[match.end() :]}"))
    for name, new in sorted(moves, key=lambda m: int(pattern.match(m[0]).group(1))):
        graph.initializers[name].name = new
    weights_new = {}
    for role, name in spec.weights.items():
        match = _LAYER_KEY.match(role)
        if match:
            old = int(match.group(1))
            if old in drop_set:
                continue
            role = f"layers.{renumber[old]}.{match.group(2)}"
            name = dict(moves).get(name, name)
        weights_new[role] = name
    spec.weights = weights_new
    spec.num_layers -= len(drop)
    spec.inputs = [v.name for v in graph.inputs]
    spec.outputs = [v.name for v in graph.outputs]


def _layer_prefix(spec: Any) -> str:
    """ "model.layers." from the q weight's name "model.layers.0.self_attn.q_proj.weight"."""
    name = spec.weights.get("layers.0.q", "")
    match = re.match(r"^(.*?\.)0\.", name)
    if not match:
        raise CompileError(
            f"prune: cannot tell the layer prefix of weight {name!r}",
            "layer pruning needs HF parameter names (model.layers.N....)",
        )
    return match.group(1)


def _reinfer_shapes(model: FdecModel) -> None:
    """Forget the shapes pruning made stale (every intermediate value's) and infer them again."""
    io = {id(v) for v in (*model.graph.inputs, *model.graph.outputs)}
    for node in model.graph:
        for value in node.outputs:
            if id(value) not in io:
                value.shape = None
    InferShapesPass()(model)
