"""2:4 semi-structured sparsity: magnitude masks on chosen linear weights, for sparse tensor cores.

NVIDIA GPUs of compute capability 8.0 and newer (targets with ``sparse_tensor_cores``) multiply
a weight that has at most 2 nonzeros in every group of 4 consecutive elements along the
reduction dimension at up to twice the dense rate, storing half the values plus 2-bit indices.
`Sparsify2of4Pass` writes such weights: in each [K, N] MatMul weight (K the reduction axis, as
MatMul's B reads it), every column's K elements are cut into groups of 4 and the 2 of largest
magnitude are kept; the other 2 become exact zeros. The graph's ops and dtypes do not change:
the weights stay dense tensors that happen to hold the pattern, which ONNX Runtime runs as
before and TensorRT's builder (``BuilderFlag.SPARSE_WEIGHTS``) picks sparse kernels for.

The pass records what it masked in the model's metadata (`SPARSITY_METADATA`, JSON with the
pattern, the roles and the initializer names); the TensorRT lowerings read it, check the
weights still hold the pattern and turn the sparse-weights flag on. Round-to-nearest symmetric
quantization after this pass keeps the zeros (zero maps to code zero: quantize-int4, -int4-awq,
-int8-static, -fp8 nearest); GPTQ rounding (quantize-fp8 weight_rounding="gptq") refills them,
so a compile with --sparsity rounds FP8 to nearest.

Magnitude 2:4 without retraining is lossy: the pass's tolerance only catches a broken rewrite,
the build's perplexity gate judges quality, and the report states the change.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from fdec.calibrate import activations_per_batch, checked_batches
from fdec.errors import UsageError
from fdec.ir import FdecModel
from fdec.passes.weights import Weight, find_weight, int_attr
from fdec.pipeline import Pass, PassResult, Tolerance

__all__ = ["SPARSITY_METADATA", "Sparsify2of4Pass", "mask_2of4", "sparse_groups_ok"]

logger = logging.getLogger(__name__)

#: Model metadata key holding JSON {"pattern": "2:4", "axis": "K", "roles": [...],
#: "weights": [...]}; read by fdec.lower.tensorrt.graph_sparsity.
SPARSITY_METADATA = "fdec.sparsity"

_GROUP, _KEEP = 4, 2
_LAYER_ROLE = re.compile(r"^layers\.(\d+)\.(\w+)$")
_MLP_ROLES = ("gate", "up", "gate_up", "down", "fc_in", "fc_out")
_ALL_ROLES = ("q", "k", "v", "qkv", "o", *_MLP_ROLES)
_ROLE_SETS = {"mlp": _MLP_ROLES, "all": _ALL_ROLES}
_SCORES = ("magnitude", "activation")


def _activation_norms(
    model: FdecModel, weights: dict[str, Weight], batches: Sequence[np.ndarray]
) -> dict[str, np.ndarray]:
    """Per weight: ‖X_k‖₂ over every calibration token of the activation its sites multiply
    (float64 [K]), from one ONNX Runtime session. Weights read by two activations get none."""
    activation_of: dict[str, str] = {}
    for name, weight in weights.items():
        names = {site.activation.name for site in weight.sites}
        if len(names) == 1 and None not in names:
            activation_of[name] = names.pop()  # type: ignore[assignment]
    sums: dict[str, np.ndarray] = {}
    for values in activations_per_batch(model, batches, sorted(set(activation_of.values()))):
        for tensor, array in values.items():
            x = np.asarray(array, dtype=np.float64).reshape(-1, array.shape[-1])
            squares = np.einsum("tk,tk->k", x, x)
            sums[tensor] = sums[tensor] + squares if tensor in sums else squares
    return {name: np.sqrt(sums[tensor]) for name, tensor in activation_of.items() if tensor in sums}


def mask_2of4(array: np.ndarray, row_scale: np.ndarray | None = None) -> np.ndarray:
    """The boolean keep-mask of a [K, N] array (K divisible by 4): per column, the 2 largest
    |w| (times `row_scale[k]`, when given) of every 4 consecutive rows. Ties keep the earlier
    row."""
    k, n = array.shape
    if k % _GROUP:
        raise ValueError(f"K={k} is not divisible by {_GROUP}")
    score = np.abs(array.astype(np.float64))
    if row_scale is not None:
        score *= np.asarray(row_scale, dtype=np.float64)[:, None]
    groups = score.reshape(k // _GROUP, _GROUP, n)
    order = np.argsort(-groups, axis=1, kind="stable")[:, :_KEEP, :]
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order, True, axis=1)
    return keep.reshape(k, n)


def sparse_groups_ok(array: np.ndarray) -> bool:
    """Whether a [K, N] array has at most 2 nonzeros in every group of 4 along K."""
    k, n = array.shape
    if k % _GROUP:
        return False
    nonzero = (array.reshape(k // _GROUP, _GROUP, n) != 0).sum(axis=1)
    return bool((nonzero <= _KEEP).all())


def _parse_roles(roles: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    items = roles.split(",") if isinstance(roles, str) else list(roles)
    chosen: list[str] = []
    for item in (str(part).strip().lower() for part in items):
        if not item:
            continue
        expanded = _ROLE_SETS.get(item, (item,))
        for role in expanded:
            if role not in _ALL_ROLES:
                raise UsageError(
                    f"sparsify-2of4 roles: unknown role {item!r}",
                    f"use mlp (default), all (every linear but the lm_head), or a list of "
                    f"{', '.join(_ALL_ROLES)}",
                )
            if role not in chosen:
                chosen.append(role)
    if not chosen:
        raise UsageError("sparsify-2of4 roles is empty", "use mlp, all, or e.g. gate,up,down")
    return tuple(chosen)


def _stored_transposed(weight: Weight) -> bool:
    """Whether the initializer is stored [N, K] (its sites read it transposed)."""
    site = weight.sites[0]
    through_transpose = site.node.inputs[1] is not weight.value
    trans_b = site.node.op_type == "Gemm" and bool(int_attr(site.node, "transB", 0))
    return trans_b != through_transpose


def _sparse_targets() -> str:
    from fdec.targets import list_targets

    names = [t.name for t in list_targets() if t.is_gpu and t.sparse_tensor_cores]
    return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")


@dataclasses.dataclass
class Sparsify2of4Pass(Pass):
    """Magnitude 2:4 semi-structured sparsity on the chosen linear weights (per-layer roles).

    `roles`: "mlp" (gate/up/down, or fc_in/fc_out; the default), "all" (every per-layer
    linear: q/k/v/o and the MLP; never the lm_head or the embedding) or a comma-separated list
    of roles. `skip_first` / `skip_last` leave that many layers at each end dense.
    `score`: "magnitude" (|w|, the default, no data) or "activation" (|w| · ‖x_k‖₂ over
    calibration tokens, as Wanda (Sun et al., 2023) scores weights: an input channel that
    carries large activations keeps its weights); "activation" needs `batches` (token id
    arrays, fdec.calibrate.calibration_batches), which a compile attaches. A weight
    whose K (reduction size) is not a multiple of 4, or that is not a plain MatMul/Gemm weight,
    is left dense and named in the stats' `skipped`.

    Refused (`check_target`) for targets without 2:4 sparse tensor cores: the CPU and GPUs
    below compute capability 8.0 (T4).
    """

    name = "sparsify-2of4"
    masks_weights = True
    # 2:4 masks are lossy too (docs/design-notes.md): what a failed quality gate suggests.
    gate_advice = (
        "drop --sparsity, keep end layers dense (--pass-options sparsify-2of4.skip_first=2 "
        "--pass-options sparsify-2of4.skip_last=2), or "
    )
    family = "prune"
    summary = "magnitude 2:4 semi-structured sparsity on chosen linear weights (sm >= 8.0)"
    # Half of each masked weight becomes zero without retraining: the outputs move far. These
    # bounds only catch a broken rewrite (a mask along the wrong axis or on every weight);
    # quality is judged by the build's perplexity gate and shown in the report. Measured
    # against PyTorch on 128 held tokens (roles mlp): tests' tiny llama max error 0.36, top-1
    # 0.75; SmolLM2-135M in docs/design-notes.md.
    tolerance = Tolerance(max_abs_error=100.0, min_top1_agreement=0.1)

    roles: str = dataclasses.field(default="mlp", kw_only=True)
    skip_first: int = dataclasses.field(default=0, kw_only=True)
    skip_last: int = dataclasses.field(default=0, kw_only=True)
    score: str = dataclasses.field(default="magnitude", kw_only=True)
    batches: Sequence[np.ndarray] | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        self._roles = _parse_roles(self.roles)
        if self.score not in _SCORES:
            raise UsageError(
                f"sparsify-2of4 score {self.score!r} is unknown",
                "use magnitude (|w|) or activation (|w| · activation norm, calibrated)",
            )
        self.batches = checked_batches(self.name, self.batches)
        for option in ("skip_first", "skip_last"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UsageError(
                    f"sparsify-2of4 {option} {value!r} is not a whole number ≥ 0",
                    f"use e.g. {option}=1 (layers left dense at that end) or 0",
                )

    @property
    def needs_calibration(self) -> bool:
        """True while score "activation" has no `batches` (a compile attaches them)."""
        return self.score == "activation" and self.batches is None

    def requires(self, model: FdecModel, target: Any = None) -> None:
        if self.needs_calibration:
            raise UsageError(
                f"{self.name} score=activation needs calibration data and was given none",
                "pass batches=fdec.calibrate.calibration_batches(...) to the pass, or use "
                "score=magnitude",
            )

    def check_target(self, target: Any) -> None:
        if target is None:
            return
        if not target.is_gpu:
            raise UsageError(
                f"2:4 sparsity needs a GPU with sparse tensor cores; {target.name} "
                f"({target.display_name}) is a CPU and gains nothing from 2:4 zeros",
                f"choose a target with sparse tensor cores ({_sparse_targets()}), or drop "
                "--sparsity / sparsify-2of4",
            )
        if not target.sparse_tensor_cores:
            cc = ".".join(map(str, target.compute_capability))
            raise UsageError(
                f"2:4 sparsity needs sparse tensor cores (compute capability ≥ 8.0); "
                f"{target.name} ({target.display_name}) is compute capability {cc} without them",
                f"choose a target with sparse tensor cores ({_sparse_targets()}), or drop "
                "--sparsity / sparsify-2of4",
            )

    def call(self, model: FdecModel) -> PassResult:
        graph = model.graph
        layers = model.spec.num_layers
        chosen: dict[str, list[str]] = {}  # initializer name -> roles
        for role, name in model.spec.weights.items():
            match = _LAYER_ROLE.match(role)
            if match is None or match.group(2) not in self._roles:
                continue
            layer = int(match.group(1))
            if layer < self.skip_first or layer >= layers - self.skip_last:
                continue
            chosen.setdefault(name, []).append(role)

        skipped: dict[str, str] = {}
        found: dict[str, Weight] = {}
        for name in chosen:
            try:
                found[name] = find_weight(graph, name)
            except ValueError as reason:
                skipped[name] = str(reason)
        norms: dict[str, np.ndarray] = {}
        if self.score == "activation" and found:
            assert self.batches is not None
            norms = _activation_norms(model, found, self.batches)
        masked_names: list[str] = []
        masked_roles: list[str] = []
        sites = elements = zeros = zeroed = dense_bytes = compressed_bytes = 0
        energy_kept = energy_total = 0.0
        by_role: collections.Counter[str] = collections.Counter()
        for name, weight in found.items():
            roles = chosen[name]
            k = weight.shape[0]
            if k % _GROUP:
                skipped[name] = f"K={k} is not divisible by {_GROUP}"
                logger.info("not sparsifying %s: K=%d", name, k)
                continue
            if self.score == "activation" and name not in norms:
                skipped[name] = "read by more than one activation (no activation norm)"
                continue
            keep = mask_2of4(weight.array, norms.get(name))
            tensor = weight.value.const_value
            assert tensor is not None
            stored = tensor.numpy()
            stored_keep = keep.T if _stored_transposed(weight) else keep
            new = np.where(stored_keep, stored, np.zeros((), dtype=stored.dtype))
            zeroed += int(np.count_nonzero(stored) - np.count_nonzero(new))
            squares = np.square(weight.array, dtype=np.float64)
            energy_total += float(squares.sum())
            energy_kept += float(squares[keep].sum())
            weight.value.const_value = ir.Tensor(new, name=name)
            masked_names.append(name)
            masked_roles.extend(roles)
            by_role.update(_LAYER_ROLE.match(role).group(2) for role in roles)  # type: ignore[union-attr]
            sites += len(weight.sites)
            elements += new.size
            zeros += int(new.size - np.count_nonzero(new))
            itemsize = new.dtype.itemsize
            dense_bytes += new.nbytes
            # Sparse tensor cores store the 2 kept values of each group plus a 2-bit index each.
            compressed_bytes += new.size // _GROUP * (_KEEP * itemsize) + new.size // _GROUP // 2

        previous = model.model.metadata_props.get(SPARSITY_METADATA)
        if masked_names:
            record = json.loads(previous) if previous else {"weights": [], "roles": []}
            record.update(pattern="2:4", axis="K")
            record["weights"] = list(dict.fromkeys([*record["weights"], *masked_names]))
            record["roles"] = list(dict.fromkeys([*record["roles"], *masked_roles]))
            model.model.metadata_props[SPARSITY_METADATA] = json.dumps(record, sort_keys=True)
        recorded = model.model.metadata_props.get(SPARSITY_METADATA) != previous
        stats = {
            "weights_masked": len(masked_names),
            "matmuls": sites,
            "by_role": dict(sorted(by_role.items())),
            "score": self.score,
            "layers_dense": {"first": self.skip_first, "last": self.skip_last},
            "elements": elements,
            "zeros": zeros,
            "values_zeroed": zeroed,
            "zero_fraction": round(zeros / elements, 4) if elements else 0.0,
            "magnitude_kept": round((energy_kept / energy_total) ** 0.5, 4)
            if energy_total
            else 1.0,
            "dense_bytes": dense_bytes,
            "bytes_saved_when_compressed": dense_bytes - compressed_bytes,
            "skipped": skipped,
        }
        return PassResult(model, modified=zeroed > 0 or recorded, stats=stats)
