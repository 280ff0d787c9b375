"""The machinery both static Q/DQ quantizers (fp8, SmoothQuant int8) share: calibration, activation Q/DQ, weight DequantizeLinear, ModelSpec upkeep and stats.

See fdec.passes.quantize_static for the graph form they write.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from fdec.calibrate import (
    ActivationStats,
    checked_batches,
    collect_activation_stats,
)
from fdec.errors import UsageError
from fdec.ir import FdecModel
from fdec.passes.quantize_common import empty_stats, require_calibrated, require_untied
from fdec.passes.quantize_int8 import QuantizeInt8Pass, quantize_int8
from fdec.passes.smoothquant import (
    ActivationGroup,
    group_by_activation,
    role_of,
)
from fdec.passes.weights import (
    LAYER_ROLE,
    LINEAR_ROLES,
    Weight,
    add_initializer,
    collect_weights,
    fresh_name,
    raise_opset,
    replace_site,
    retire_weight,
)
from fdec.pipeline import Pass, PassResult
from fdec.targets import Precision

__all__ = [
    "StaticQuantizePass",
    "read_dequantized",
    "retire_quantized",
    "scalar_initializer",
    "zero_point",
]


def scalar_initializer(
    graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType, taken: set[str]
) -> ir.Value:
    return add_initializer(graph, fresh_name(graph, name, taken), ir.Tensor(array, dtype=dtype))


def zero_point(graph: ir.Graph, dtype: ir.DataType, taken: set[str]) -> ir.Value:
    """A scalar zero of `dtype` (it sets QuantizeLinear's output type), one per graph."""
    name = f"fdec_{dtype.name.lower()}zero_point"
    existing = graph.initializers.get(name)
    tensor = existing.const_value if existing is not None else None
    if (
        tensor is not None
        and tensor.dtype == dtype
        and tensor.shape.dims == ()
        and (float(tensor.numpy().astype(np.float32)) == 0.0)
    ):
        return existing
    zero = np.zeros((), dtype=dtype.numpy())
    return add_initializer(graph, fresh_name(graph, name, taken), ir.Tensor(zero, dtype=dtype))


def read_dequantized(
    model: FdecModel,
    weight: Weight,
    activation: ir.Value,
    suffix: str,
    dequantize: Callable[[str], list[ir.Node]],
) -> None:
    """Replace each site of `weight` by `dequantize(prefix)`'s nodes (the last one's output the
    dequantized [K, N] weight) → MatMul(activation, ·) (→ Add bias, for a Gemm)."""
    for site in weight.sites:
        prefix = site.node.name or weight.value.name
        nodes = dequantize(prefix)
        matmul = ir.node(
            "MatMul", [activation, nodes[-1].outputs[0]], name=f"{prefix}_MatMul_{suffix}"
        )
        nodes.append(matmul)
        if site.bias is not None:
            nodes.append(ir.node("Add", [matmul.outputs[0], site.bias], name=f"{prefix}_bias"))
        replace_site(model.graph, site, nodes)


def retire_quantized(model: FdecModel, weight: Weight, codes: ir.Value) -> None:
    """Remove `weight`'s float initializer and point its ModelSpec roles at `codes`."""
    old_name = weight.value.name
    retire_weight(model.graph, weight)
    weight.release()  # a weight read from the checkpoint: one float copy at a time
    model.spec.rename_weight(old_name, codes.name)


@dataclasses.dataclass(eq=False)
class StaticQuantizePass(Pass):
    """Shared machinery: calibration, activation Q/DQ, weight DQ, ModelSpec upkeep, stats."""

    stats: Mapping[str, ActivationStats] | None = dataclasses.field(default=None, kw_only=True)
    batches: Sequence[np.ndarray] | None = dataclasses.field(default=None, kw_only=True)
    include_lm_head: bool = dataclasses.field(default=True, kw_only=True)
    # A tied lm_head keeps sharing the embedding: its [H, V] codes are stored once and the
    # embedding's Gathers read their columns (fdec.passes.quantize.QuantizeInt8Pass's way).
    share_tied_embedding: bool = dataclasses.field(default=False, kw_only=True)
    # Layers kept W8A16: int8 weights per output channel read through DequantizeLinear, the
    # activation left in float (no Q/DQ). Each entry is a layer kind ("down", "o", "lm_head")
    # or one layer's ModelSpec role ("layers.0.o").
    weight_only: tuple[str, ...] = dataclasses.field(default=(), kw_only=True)
    # Decoder layers (indices; negative counts from the last) whose every linear layer is kept
    # W8A16 too, as the first and last layer often are. Applied only to a model with at least
    # `layers_per_wide_layer` times as many layers, so most of a small model stays W8A8.
    weight_only_layers: tuple[int, ...] = dataclasses.field(default=(), kw_only=True)
    # (0, -1) keeps the first and last layer W8A16 from 8 layers up (2-layer test models: none).
    layers_per_wide_layer: ClassVar[int] = 4

    # Set by subclasses: the precision the target must have, the fix offered to CPU targets,
    # and the lowest default-domain opset the rewritten graph needs.
    precision_of: ClassVar[Precision]
    _cpu_fix: ClassVar[str]
    _opset: ClassVar[int]

    def __post_init__(self) -> None:
        self.batches = checked_batches(self.name, self.batches)
        self.weight_only = tuple(self.weight_only)
        self.weight_only_layers = tuple(self.weight_only_layers)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.weight_only_layers):
            raise UsageError(
                f"{self.name} weight_only_layers {self.weight_only_layers!r} are not layer indices",
                "give integers: 0 is the first decoder layer, -1 the last",
            )

    def check_target(self, target: Any) -> None:
        if target is None or not hasattr(target, "require"):
            return
        if not target.is_gpu:
            raise UsageError(
                f"{self.name} writes static QDQ for GPU engines; {target.name} is a CPU",
                self._cpu_fix,
            )
        target.require(self.precision_of)

    @property
    def needs_calibration(self) -> bool:
        """True until the pass is given `stats` or `batches`."""
        return self.stats is None and self.batches is None

    def requires(self, model: FdecModel, target: Any = None) -> None:
        if not self.share_tied_embedding:
            require_untied(self.name, model, self.include_lm_head)
        if self.needs_calibration:
            raise UsageError(
                f"{self.name} needs calibration data and was given none",
                "pass batches=fdec.calibrate.calibration_batches(...) (or stats=...) to the pass",
            )

    def _calibrate(
        self, model: FdecModel, groups: list[ActivationGroup]
    ) -> Mapping[str, ActivationStats]:
        if self.stats is not None:
            return self.stats
        assert self.batches is not None
        names = [group.activation.name for group in groups]
        return collect_activation_stats(model, self.batches, names)

    def call(self, model: FdecModel) -> PassResult:
        weights, skipped = collect_weights(model, self.include_lm_head, self.share_tied_embedding)
        kept: list[Weight] = []
        for weight in weights:
            if weight.gathers and weight.dtype != ir.DataType.FLOAT:
                skipped["shared table is not float32"] += 1
            else:
                kept.append(weight)
        weights = kept
        stats: dict[str, Any] = {
            **empty_stats(),
            "activations_quantized": 0,
            "weight_only": [],
            "gathers_shared": sum(len(w.gathers) for w in weights),
        }
        groups = group_by_activation(weights, skipped)
        calibration = self._calibrate(model, groups) if groups else {}
        require_calibrated(self.name, groups, calibration, "quantize", "collect the stats")
        ready: list[tuple[ActivationGroup, ActivationStats]] = []
        for group in groups:
            found = calibration.get(group.activation.name)
            if found is None:
                skipped["no calibration statistics for its activation"] += len(group.weights)
            elif found.absmax <= 0 or not math.isfinite(found.absmax):
                skipped["activation was all zeros (or not finite) in calibration"] += len(
                    group.weights
                )
            elif found.channel_absmax.shape != (group.weights[0].shape[0],):
                skipped["calibration statistics do not match the weight's input size"] += len(
                    group.weights
                )
            else:
                ready.append((group, found))
        stats.update(self._extra_stats())
        self._prepare(model, [group for group, _ in ready], stats)
        if ready:
            stats["opset_raised"] = raise_opset(model, self._opset)
        taken: set[str] = set()
        for group, found in ready:
            if self._rewrite(model, group, found, taken, stats) is not False:
                stats["activations_quantized"] += 1
        stats["skipped"] = dict(skipped)
        return PassResult(model, modified=stats["weights_quantized"] > 0, stats=stats)

    # --- subclass hooks -----------------------------------------------------------------------

    def _extra_stats(self) -> dict[str, Any]:
        return {}

    def _prepare(
        self, model: FdecModel, groups: list[ActivationGroup], stats: dict[str, Any]
    ) -> None:
        """Run once before the rewrites, on the incoming model (e.g. to collect Hessians)."""

    def _rewrite(
        self,
        model: FdecModel,
        group: ActivationGroup,
        found: ActivationStats,
        taken: set[str],
        stats: dict[str, Any],
    ) -> None:
        raise NotImplementedError

    def _weight_only(self, model: FdecModel, group: ActivationGroup) -> bool:
        """Whether the group stays W8A16: every weight's kind ("o") or whole ModelSpec role
        ("layers.3.o") is in `weight_only`."""
        wide = set(self.weight_only) | self._wide_layer_roles(model.spec)
        if not wide:
            return False
        roles = {name: role for role, name in model.spec.weights.items()}
        return all(
            role_of(model.spec, w.value.name) in wide or roles.get(w.value.name) in wide
            for w in group.weights
        )

    def _wide_layer_roles(self, spec: Any) -> set[str]:
        """The ModelSpec roles of every linear layer in `weight_only_layers` (none when the
        model has fewer than `layers_per_wide_layer` layers per index given)."""
        count = spec.num_layers or 0
        indices = {i % count for i in self.weight_only_layers if -count <= i < count}
        if not indices or count < self.layers_per_wide_layer * len(indices):
            return set()
        return {
            role
            for role in spec.weights
            if (match := LAYER_ROLE.match(role)) is not None
            and match.group(1) in LINEAR_ROLES
            and int(role.split(".")[1]) in indices
        }

    def _rewrite_weight_only(
        self,
        model: FdecModel,
        group: ActivationGroup,
        taken: set[str],
        stats: dict[str, Any],
        listed_as: str = "weight_only",
    ) -> bool:
        """W8A16: per-channel int8 weights, DequantizeLinear → MatMul with the float activation,
        each weight's name listed under stats[`listed_as`]. False: no activation was quantized."""
        codes_of = self._weight_only_coder(group, stats)
        for weight in group.weights:
            codes, scales, suffix = codes_of(weight)
            stats["bytes_before"] += weight.value.const_value.nbytes
            stats["matmuls_quantized"] += len(weight.sites)
            stats["weights_quantized"] += 1
            stats[listed_as].append(weight.value.name)
            stats["bytes_after"] += self._quantized_weight(
                model, weight, codes, scales, group.activation, taken, suffix
            )
        return False

    def _weight_only_coder(
        self, group: ActivationGroup, stats: dict[str, Any]
    ) -> Callable[[Weight], tuple[ir.Tensor, np.ndarray, str]]:
        """How the W8A16 `group`'s weights are coded: each one's codes, per-channel scales and
        name suffix; int8 per output channel."""

        def int8(weight: Weight) -> tuple[ir.Tensor, np.ndarray, str]:
            codes, scales = quantize_int8(weight.array, 127)
            return ir.tensor(codes), scales, "Q8"

        return int8

    # --- shared rewriting ---------------------------------------------------------------------

    @staticmethod
    def _activation_qdq(
        graph: ir.Graph,
        source: ir.Value,
        scale: float,
        zero_point: ir.Value,
        dtype: ir.DataType,
        taken: set[str],
    ) -> tuple[list[ir.Node], ir.Value]:
        """QuantizeLinear → DequantizeLinear of `source` (per tensor); (nodes, dequantized)."""
        prefix = source.name
        scale_value = scalar_initializer(
            graph, f"{prefix}_scale", np.array(scale, dtype=dtype.numpy()), dtype, taken
        )
        quantize = ir.node(
            "QuantizeLinear", [source, scale_value, zero_point], name=f"{prefix}_QuantizeLinear"
        )
        dequantize = ir.node(
            "DequantizeLinear",
            [quantize.outputs[0], scale_value, zero_point],
            name=f"{prefix}_DequantizeLinear",
        )
        return [quantize, dequantize], dequantize.outputs[0]

    @staticmethod
    def _quantized_weight(
        model: FdecModel,
        weight: Weight,
        codes: ir.Tensor,
        scales: np.ndarray,
        activation: ir.Value,
        taken: set[str],
        suffix: str,
    ) -> int:
        """Replace each site of `weight` by DequantizeLinear(codes) → MatMul(activation, ·).

        Retires the float weight, points its roles at `codes`; returns the bytes added.
        """
        graph = model.graph
        old_name = weight.value.name
        assert old_name is not None
        b = add_initializer(graph, fresh_name(graph, f"{old_name}_{suffix}", taken), codes)
        w_scale = add_initializer(
            graph,
            fresh_name(graph, f"{old_name}_scales", taken),
            ir.tensor(scales.astype(weight.dtype.numpy())),
        )
        read_dequantized(
            model, weight, activation, suffix,
            lambda prefix: [
                ir.node("DequantizeLinear", [b, w_scale], {"axis": 1}, name=f"{prefix}_DQ_{suffix}")
            ],
        )  # fmt: skip
        added = int(b.const_value.nbytes + w_scale.const_value.nbytes)
        if weight.gathers:  # the tied embedding reads the same codes
            added += QuantizeInt8Pass.share_with_gathers(graph, weight, b, w_scale, False, taken)
        retire_quantized(model, weight, b)
        return added
