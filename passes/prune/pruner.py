"""`PrunePass` and `parse_prune`: what to remove (--prune heads=,mlp=,layers=), chosen by importance."""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fdec.calibrate import checked_batches
from fdec.errors import UsageError
from fdec.ir import FdecModel
from fdec.passes.prune.coupling import coupled_groups, weight_sites
from fdec.passes.prune.importance import measure_importance
from fdec.passes.prune.slicing import drop_layers, reinfer_shapes, rewrite_repeat_kv, slice_weight
from fdec.pipeline import Pass, PassResult, Tolerance

__all__ = ["PRUNE_TOLERANCE", "PrunePass", "parse_prune"]

# Pruning changes the model on purpose: its accuracy change is measured and reported, and
# gated only by --max-ppl-increase when the user sets one.
PRUNE_TOLERANCE = Tolerance(
    max_abs_error=None, min_top1_agreement=0.0, max_perplexity_increase=None,
    greedy_identical=False,
)  # fmt: skip


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
    # a stage before the compile: the build is verified against the pruned model
    added_by = "--prune heads=F,mlp=F,layers=N"

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
        weights = weight_sites(model)
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
                slice_weight(weights[f"layers.{coupling.layer}.q"], cols, output=True)
                slice_weight(weights[coupling.closer], cols, output=False)
            if coupling.kind == "mlp" and coupling.layer in keep_channels:
                cols = np.asarray(keep_channels[coupling.layer])
                for role in coupling.openers:
                    slice_weight(weights[role], cols, output=True)
                slice_weight(weights[coupling.closer], cols, output=False)
        rewritten = 0
        if keep_heads:
            kept = len(next(iter(keep_heads.values())))
            rewritten = rewrite_repeat_kv(model.graph, spec.num_kv_heads, group, kept)
            spec.num_heads = kept
        if keep_channels:
            spec.intermediate_size = len(next(iter(keep_channels.values())))
        if drop:
            drop_layers(model, weights, drop)
        if keep_heads or keep_channels or drop:
            reinfer_shapes(model)
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
