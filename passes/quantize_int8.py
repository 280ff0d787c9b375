"""Dynamic int8 for the CPU (QuantizeInt8Pass: per-channel 8-bit weights, run-time activations), and the per-channel int8 codes the static quantizers share.

The pass rewrites the MatMul/Gemm nodes that read a weight the ModelSpec names, as
fdec.passes.quantize_int4 does; see QuantizeInt8Pass.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from fdec.errors import UsageError
from fdec.ir import FdecModel
from fdec.passes.quantize_common import check_alpha, empty_stats, require_untied
from fdec.passes.smoothquant import (
    ActivationGroup,
    capture_rows,
    divide_activation,
    role_of,
    search_alpha,
    smoothing_factors,
)
from fdec.passes.weights import (
    Site,
    Weight,
    add_initializer,
    collect_weights,
    fresh_name,
    per_channel_quantize,
    replace_node,
    replace_site,
    retire_weight,
)
from fdec.pipeline import Pass, PassResult, Tolerance
from fdec.targets.host import cpu_flags, has_vnni

__all__ = ["QuantizeInt8Pass", "quantize_int8"]

logger = logging.getLogger(__name__)


def quantize_int8(array: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric int8 of a [K, N] array: (int8 [K, N], float32 scales [N])."""
    return per_channel_quantize(array, qmax, np.int8)


_INT8_WEIGHT_TYPES = ("int8", "uint8")
_UINT8_ZERO_POINT = 128  # uint8 weights are symmetric int8 codes shifted by 128


def _named_node(prefix: str, op: str, inputs: list, suffix: str, **attributes: Any) -> ir.Node:
    return ir.node(op, inputs, attributes, name=f"{prefix}_{suffix}")


@dataclasses.dataclass(eq=False)
class QuantizeInt8Pass(Pass):
    """Dynamic int8 for the CPU: 8-bit weights per output channel, activations at run time.

    Each `A @ W` becomes `DynamicQuantizeLinear(A)` (uint8, per tensor, once per activation
    shared by several weights) → `MatMulInteger` with per-channel symmetric 8-bit W →
    `Cast` → `Mul` by (activation scale × weight scales), all standard ONNX; ONNX Runtime
    fuses the chain into its DynamicQuantizeMatMul / MatMulIntegerToFloat kernels.

    Weight format. x86 CPUs without VNNI add u8×s8 pairs in int16 (vpmaddubsw), which
    overflows with full-range int8 weights (DESIGN.md: perplexity 6×10⁷). Two ways out:
    `reduce_range` (int8 weights in 7 bits, ±63) or `weight_type="uint8"` (codes + 128 with
    zero point 128: ONNX Runtime's u8×u8 kernels widen to int16 before multiplying, so they
    cannot overflow, and the weights keep 8 bits). `weight_type=None` and `reduce_range=None`
    pick from this machine's CPU flags: full-range int8 where the CPU has VNNI, else uint8.

    SmoothQuant. With `alpha` (0–1), each activation X is divided per channel by
    s = max|X_j|^α / max|W_j|^(1-α) and W's rows multiplied by s, as in
    fdec.passes.quantize_static's QuantizeInt8StaticPass (same factors, same folding of 1/s
    into the preceding norm, or an inserted Mul). This moves LLM activation outlier channels
    into the weights, so the per-tensor run-time activation scale stops being set by a few
    channels. It needs calibration ranges: `stats` (fdec.calibrate.collect_activation_stats
    on the model as this pass sees it) or `batches` (token id arrays); `alpha=None` (the
    default) is plain dynamic int8 and needs neither.

    A tied lm_head shares the embedding (read by Gather). By default it cannot be quantized
    here: put `untie-embeddings` before this pass, or set `include_lm_head=False`. With
    `share_tied_embedding` the table is quantized once, as the lm_head's [H, V] MatMulInteger
    weight, and each embedding Gather reads its columns: `Gather(axis=1)` → `Transpose` →
    `Cast` (→ `Sub` 128 for uint8) → `Mul` by the gathered per-token scales (→ `Mul` by 1/s
    where SmoothQuant scaled the table) — stored once, as in the tied source model.
    """

    name = "quantize-int8"
    fusable = False  # fuse-attention is not yet verified on its graphs
    family = "quantize"
    summary = "dynamic int8 (per-channel 8-bit weights, run-time uint8 activations) for the CPU"
    # Dynamic int8 is lossy (activations are quantized per tensor at run time); as for int4
    # the bounds only catch a broken rewrite (the AVX2 overflow gave perplexity 6×10⁷).
    # Measured against PyTorch on 128 held tokens: tests' tiny llama/gpt2: max error
    # 0.07–0.19, top-1 0.88–0.97 (full range and reduce_range); SmolLM2-135M: max error
    # 16.1–17.0, top-1 0.56–0.59, perplexity 54.0 → 84.6–86.2 (as DESIGN.md measured);
    # with SmoothQuant α 0.75 and the shared tied table: max error 7.3, top-1 0.89, 55.8.
    tolerance = Tolerance(max_abs_error=25.0, min_top1_agreement=0.45)

    reduce_range: bool | None = dataclasses.field(default=None, kw_only=True)
    weight_type: str | None = dataclasses.field(default=None, kw_only=True)
    alpha: float | None = dataclasses.field(default=None, kw_only=True)
    stats: Mapping[str, Any] | None = dataclasses.field(default=None, kw_only=True)
    batches: Sequence[np.ndarray] | None = dataclasses.field(default=None, kw_only=True)
    include_lm_head: bool = dataclasses.field(default=True, kw_only=True)
    share_tied_embedding: bool = dataclasses.field(default=False, kw_only=True)
    # α per activation, chosen from these by the group's output error on calibration rows
    # (fdec.passes.smoothquant.search_alpha, with run-time uint8 activations); empty: `alpha`.
    alpha_search: tuple[float, ...] = dataclasses.field(default=(), kw_only=True)
    search_rows: int = dataclasses.field(default=512, kw_only=True)
    # Layer kinds (ModelSpec roles: "down", "o"...) kept W8A16: int8 weights read through
    # DequantizeLinear by a float MatMul, the activation not quantized. A shared tied table
    # stays MatMulInteger.
    weight_only: tuple[str, ...] = dataclasses.field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        from fdec.calibrate import checked_batches

        self.alpha_search = tuple(float(a) for a in self.alpha_search)
        self.weight_only = tuple(self.weight_only)

        if self.weight_type is not None and self.weight_type not in _INT8_WEIGHT_TYPES:
            raise UsageError(
                f"{self.name} weight_type {self.weight_type!r} is unknown",
                f"use one of {', '.join(_INT8_WEIGHT_TYPES)}, or None to pick from the CPU",
            )
        if self.weight_type == "uint8" and self.reduce_range:
            raise UsageError(
                f"{self.name}: reduce_range applies to int8 weights, not uint8",
                "drop reduce_range (uint8 weights cannot overflow) or use weight_type='int8'",
            )
        check_alpha(self.name, self.alpha, "use 0.8 (SmolLM2's best), or None for no smoothing")
        self.batches = checked_batches(self.name, self.batches)

    @property
    def needs_calibration(self) -> bool:
        """True while smoothing is asked for and neither `stats` nor `batches` is given."""
        return self.alpha is not None and self.stats is None and self.batches is None

    def requires(self, model: FdecModel, target: Any = None) -> None:
        if not self.share_tied_embedding:
            require_untied(self.name, model, self.include_lm_head)
        if self.needs_calibration:
            raise UsageError(
                f"{self.name} with alpha (SmoothQuant) needs calibration data and was given none",
                "pass batches=fdec.calibrate.calibration_batches(...) (or stats=...), "
                "or alpha=None",
            )

    def check_target(self, target: Any) -> None:
        if target is not None and getattr(target, "is_gpu", False):
            raise UsageError(
                f"quantize-int8 is dynamic int8 for the CPU; {target.name} is a GPU",
                "use quantize-int4 for GPU targets",
            )

    def _choose_reduce_range(self) -> tuple[bool, str]:
        """(reduce_range, why) for int8 weights: the option, else reduce unless VNNI."""
        if self.reduce_range is not None:
            return self.reduce_range, "option"
        if has_vnni(cpu_flags()):
            return False, "auto: this CPU has VNNI"
        return True, "auto: no VNNI on this CPU (u8×s8 pairs would overflow int16)"

    def _choose_weight_format(self) -> tuple[str, bool, str]:
        """(weight type, reduce_range, why): the options, else what this CPU runs exactly."""
        if self.weight_type == "uint8":
            return "uint8", False, "option: uint8 weights (u8×u8 kernels cannot overflow)"
        if self.weight_type == "int8" or self.reduce_range is not None:
            reduce_range, why = self._choose_reduce_range()
            return "int8", reduce_range, why
        if has_vnni(cpu_flags()):
            return "int8", False, "auto: this CPU has VNNI"
        return "uint8", False, "auto: no VNNI on this CPU (u8×s8 pairs would overflow int16)"

    def call(self, model: FdecModel) -> PassResult:
        graph = model.graph
        weight_type, reduce_range, reason = self._choose_weight_format()
        qmax = 63 if reduce_range else 127
        weights, skipped = collect_weights(model, self.include_lm_head, self.share_tied_embedding)
        stats: dict[str, Any] = {
            **empty_stats(),
            "activation_quantizers": 0,
            "weight_type": weight_type,
            "reduce_range": reduce_range,
            "reduce_range_reason": reason,
            "alpha": self.alpha,
            "smoothing_folded": 0,
            "smoothing_inserted": 0,
            "gathers_shared": 0,
        }
        float32, wide = [], []
        for weight in weights:
            if any(site.activation.dtype not in (None, ir.DataType.FLOAT) for site in weight.sites):
                skipped["activation is not float32"] += 1
            elif not weight.gathers and role_of(model.spec, weight.value.name) in self.weight_only:
                wide.append(weight)
            else:
                float32.append(weight)
        taken: set[str] = set()
        stats["weight_only"] = [w.value.name for w in wide]
        for weight in wide:
            self._weight_only_site(model, weight, taken, stats)
        if self.alpha is not None:
            self._smooth(model, float32, taken, stats, skipped)
        zero_point = None
        if weight_type == "uint8":
            zero_point = add_initializer(
                graph,
                fresh_name(graph, "fdec_uint8_weight_zero_point", taken),
                ir.tensor(np.array(_UINT8_ZERO_POINT, dtype=np.uint8)),
            )
        quantizers: dict[int, ir.Node] = {}  # id(activation) → its DynamicQuantizeLinear
        for weight in float32:
            old_name = weight.value.name
            assert old_name is not None
            codes, scales = quantize_int8(weight.array, qmax)
            if weight_type == "uint8":
                codes = (codes.astype(np.int16) + _UINT8_ZERO_POINT).astype(np.uint8)
            b = add_initializer(graph, fresh_name(graph, f"{old_name}_Q8", taken), ir.tensor(codes))
            w_scale = add_initializer(
                graph, fresh_name(graph, f"{old_name}_scales", taken), ir.tensor(scales)
            )
            for site in weight.sites:
                quantizer = quantizers.get(id(site.activation))
                if quantizer is None:
                    quantizer = self._activation_quantizer(graph, site)
                    quantizers[id(site.activation)] = quantizer
                a_q, a_scale, a_zero = quantizer.outputs
                prefix = site.node.name or old_name
                inputs = [a_q, b, a_zero] if zero_point is None else [a_q, b, a_zero, zero_point]
                matmul = ir.node("MatMulInteger", inputs, name=f"{prefix}_MatMulInteger")
                cast = ir.node(
                    "Cast", [matmul.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{prefix}_Cast"
                )
                scale = ir.node("Mul", [a_scale, w_scale], name=f"{prefix}_scale")
                output = ir.node("Mul", [cast.outputs[0], scale.outputs[0]], name=f"{prefix}_Mul")
                nodes = [matmul, cast, scale, output]
                if site.bias is not None:
                    nodes.append(
                        ir.node("Add", [output.outputs[0], site.bias], name=f"{prefix}_bias")
                    )
                replace_site(graph, site, nodes)
            stats["bytes_before"] += weight.value.const_value.nbytes
            stats["bytes_after"] += int(codes.nbytes + scales.nbytes)
            if weight.gathers:
                stats["bytes_after"] += self.share_with_gathers(
                    graph, weight, b, w_scale, weight_type == "uint8", taken
                )
                stats["gathers_shared"] += len(weight.gathers)
            stats["matmuls_quantized"] += len(weight.sites)
            stats["weights_quantized"] += 1
            retire_weight(graph, weight)
            model.spec.rename_weight(old_name, b.name)
        stats["activation_quantizers"] = len(quantizers)
        stats["skipped"] = dict(skipped)
        return PassResult(model, modified=stats["weights_quantized"] > 0, stats=stats)

    @staticmethod
    def _weight_only_site(
        model: FdecModel, weight: Weight, taken: set[str], stats: dict[str, Any]
    ) -> None:
        """W8A16: `DequantizeLinear(int8 codes, scales, axis=1)` → float MatMul."""
        graph = model.graph
        old_name = weight.value.name
        assert old_name is not None
        codes, scales = quantize_int8(weight.array, 127)
        b = add_initializer(graph, fresh_name(graph, f"{old_name}_Q8", taken), ir.tensor(codes))
        w_scale = add_initializer(
            graph, fresh_name(graph, f"{old_name}_scales", taken), ir.tensor(scales)
        )
        for site in weight.sites:
            prefix = site.node.name or old_name
            dequantize = ir.node(
                "DequantizeLinear", [b, w_scale], {"axis": 1}, name=f"{prefix}_DQ_Q8"
            )
            matmul = ir.node(
                "MatMul", [site.activation, dequantize.outputs[0]], name=f"{prefix}_MatMul_Q8"
            )
            nodes = [dequantize, matmul]
            if site.bias is not None:
                nodes.append(ir.node("Add", [matmul.outputs[0], site.bias], name=f"{prefix}_bias"))
            replace_site(graph, site, nodes)
        stats["bytes_before"] += weight.value.const_value.nbytes
        stats["bytes_after"] += int(codes.nbytes + scales.nbytes)
        stats["matmuls_quantized"] += len(weight.sites)
        stats["weights_quantized"] += 1
        retire_weight(graph, weight)
        model.spec.rename_weight(old_name, b.name)

    def _smooth(
        self,
        model: FdecModel,
        weights: list[Weight],
        taken: set[str],
        stats: dict[str, Any],
        skipped: collections.Counter[str],
    ) -> None:
        """SmoothQuant: divide each activation by s (folded or a Mul), multiply W's rows by s.

        Weights whose sites read more than one activation, or whose activation calibration
        did not see, are left unsmoothed (still quantized) and counted in the stats.
        """
        from fdec.calibrate import collect_activation_stats

        assert self.alpha is not None
        groups: dict[int, ActivationGroup] = {}
        for weight in weights:
            activations = {id(site.activation): site.activation for site in weight.sites}
            activation = next(iter(activations.values())) if len(activations) == 1 else None
            if activation is None or not activation.name:
                skipped["not smoothed: read by several or unnamed activations"] += 1
                continue
            groups.setdefault(id(activation), ActivationGroup(activation, [])).weights.append(
                weight
            )
        if self.stats is not None:
            calibration = self.stats
        else:
            assert self.batches is not None
            names = [group.activation.name for group in groups.values()]
            calibration = collect_activation_stats(model, self.batches, names)
        rows: dict[str, np.ndarray] = {}
        if self.alpha_search and self.batches is not None:
            names = [group.activation.name for group in groups.values()]
            rows = capture_rows(model, self.batches, names, max_rows=self.search_rows)
        stats["searched"] = {}
        for group in groups.values():
            found = calibration.get(group.activation.name)
            k = group.weights[0].shape[0]
            if found is None or found.channel_absmax.shape != (k,) or found.absmax <= 0:
                skipped["not smoothed: no usable calibration range"] += len(group.weights)
                continue
            alpha = self.alpha
            if group.activation.name in rows:
                searched = search_alpha(
                    rows[group.activation.name], [w.array for w in group.weights],
                    found.channel_absmax, alphas=self.alpha_search, default=self.alpha,
                    activation="dynamic",
                )  # fmt: skip
                alpha = searched.alpha
                stats["searched"][group.activation.name] = [alpha, round(searched.error, 6)]
            s = smoothing_factors(alpha, [w.array for w in group.weights], found.channel_absmax)
            source, folded = divide_activation(model.graph, group, s, taken)
            stats["smoothing_folded" if folded else "smoothing_inserted"] += 1
            for weight in group.weights:
                weight.array = weight.array * s[:, None]
                if weight.gathers:  # a shared table's gathered rows are divided by s again
                    previous = weight.row_scales
                    weight.row_scales = s if previous is None else previous * s
                for site in weight.sites:
                    site.activation = source

    @staticmethod
    def share_with_gathers(
        graph: ir.Graph,
        weight: Weight,
        b: ir.Value,
        w_scale: ir.Value,
        unsigned: bool,
        taken: set[str],
    ) -> int:
        """Rewrite the tied embedding's Gathers to read columns of the lm_head's [H, V] codes.

        Returns the bytes added (shape constants, the uint8 offset and SmoothQuant's 1/s).
        """
        base = weight.value.name
        hidden_size = weight.shape[0]

        def constant(suffix: str, array: np.ndarray) -> ir.Value:
            name = fresh_name(graph, f"{base}_{suffix}", taken)
            return add_initializer(graph, name, ir.tensor(array, name=name))

        flat = constant("flat", np.array([-1], dtype=np.int64))
        hidden = constant("hidden", np.array([hidden_size], dtype=np.int64))
        last = constant("last_axis", np.array([1], dtype=np.int64))
        extra = [flat, hidden, last]
        offset = (
            constant("zero_point", np.array(_UINT8_ZERO_POINT, np.float32)) if unsigned else None
        )
        inverse = None
        if weight.row_scales is not None:
            inverse = constant("inv_s", (1.0 / weight.row_scales).astype(np.float32))
        extra += [v for v in (offset, inverse) if v is not None]
        for gather in weight.gathers:
            ids = gather.inputs[1]
            node = functools.partial(_named_node, gather.name or base)
            ids_flat = node("Reshape", [ids, flat], "ids_flat")
            columns = node("Gather", [b, ids_flat.outputs[0]], "Q8_columns", axis=1)  # [H, T]
            rows = node("Transpose", [columns.outputs[0]], "Q8_rows", perm=[1, 0])  # [T, H]
            values = node("Cast", [rows.outputs[0]], "Cast", to=ir.DataType.FLOAT)
            nodes = [ids_flat, columns, rows, values]
            if offset is not None:
                nodes.append(node("Sub", [nodes[-1].outputs[0], offset], "zero_point"))
            row_scale = node("Gather", [w_scale, ids_flat.outputs[0]], "scales", axis=0)
            row_scale_2d = node("Unsqueeze", [row_scale.outputs[0], last], "scales_2d")
            dequantized = node("Mul", [nodes[-1].outputs[0], row_scale_2d.outputs[0]], "dequantize")
            nodes += [row_scale, row_scale_2d, dequantized]
            if inverse is not None:
                nodes.append(node("Mul", [nodes[-1].outputs[0], inverse], "inv_s"))
            ids_shape = node("Shape", [ids], "ids_shape")
            shape = node("Concat", [ids_shape.outputs[0], hidden], "shape", axis=0)
            nodes += [
                ids_shape,
                shape,
                node("Reshape", [nodes[-1].outputs[0], shape.outputs[0]], "rows"),
            ]
            replace_node(graph, gather, nodes)
        return int(sum(value.const_value.nbytes for value in extra))

    @staticmethod
    def _activation_quantizer(graph: ir.Graph, site: Site) -> ir.Node:
        """A DynamicQuantizeLinear of the site's activation, placed right after its producer."""
        activation = site.activation
        name = f"{activation.name or site.node.name}_DynamicQuantizeLinear"
        node = ir.node("DynamicQuantizeLinear", [activation], num_outputs=3, name=name)
        producer = activation.producer()
        if producer is not None and producer.graph is graph:
            graph.insert_after(producer, node)
        else:  # a graph input or an initializer: available from the start
            graph.insert_before(graph.node(0), node)
        return node
