"""Mixed-precision weight quantization: measure each layer's sensitivity, keep the worst in fp32 or 8 bits.

`QuantizeMixedPass` wraps a weight quantizer of the registry (quantize-int4, quantize-int8,
quantize-int4-awq, ...), looked up by name when the pass runs. It splits the quantizable
weights into units — "layer": every linear weight of transformer layer i is unit
`layers.{i}` and the lm_head is unit `lm_head`; "matmul": each role (`layers.3.q`, ...) alone —
and measures each unit's sensitivity: on a copy of the model only that unit is quantized, the
copy runs in ONNX Runtime on calibration token batches, and its logits are scored against the
incoming fp32 model's (mean KL divergence, top-1 agreement, perplexity). Units are ranked by KL,
largest first. Then the real model is quantized except the most sensitive units, which stay in
fp32: `keep_fp` of them, or, with `max_ppl_increase`, the fewest (in sensitivity order) such
that the whole mixed model's perplexity on the calibration tokens grows at most that much.
With `keep_bits=8` (int4 quantizers only) the kept units are not left in fp32 but stored as
8-bit weight-only blocks (quantize-int4 bits=8: MatMulNBits bits=8), which costs 1.8× the bytes
of int4 instead of 6.4× (block 32, float32 scales) and is close to lossless.

Sensitivity is measured on calibration batches (`batches`, as the static quantizers take them),
never on the held text the build is verified with, so the final verification stays independent.

Only some weights are quantized by hiding the others from the wrapped quantizer: it quantizes
the roles the ModelSpec names, so the roles to keep are removed from `spec.weights` while it
runs and put back afterwards (their initializers are untouched, so the spec stays true).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from fdec.calibrate import checked_batches
from fdec.errors import EXIT_QUALITY_GATE, UsageError, VerificationError
from fdec.ir import FdecModel
from fdec.passes.weights import collect_weights
from fdec.pipeline import Pass, PassResult, Tolerance
from fdec.runtime.session import session_for_model
from fdec.verify import log_softmax

__all__ = ["QuantizeMixedPass"]

logger = logging.getLogger(__name__)

# `method` short names → the registry name of the wrapped quantizer; a registry name of the
# "quantize" family is accepted as it is.
_METHODS = {
    "int4": "quantize-int4",
    "int4-rtn": "quantize-int4",
    "int8": "quantize-int8",
    "int4-awq": "quantize-int4-awq",
}
_GRANULARITIES = ("layer", "matmul")
_LAYER_ROLE = re.compile(r"^(layers\.\d+)\.\w+$")
# Options through which a wrapped quantizer can be given calibration data already.
_CALIBRATION_OPTIONS = ("batches", "stats", "activations")
# Precisions kept units can have: None = the incoming fp32; 8 = quantize-int4 with bits=8.
_KEEP_BITS = (None, 8)
# Options of an int4 quantizer that the 8-bit quantizer of the kept units copies.
_SHARED_INT4_OPTIONS = ("block_size", "backend", "accuracy_level", "include_lm_head")
# ONNX Runtime runs every quantized form fdec writes (MatMulNBits, dynamic int8, and the QDQ of
# the static quantizers, which the CPU runs only at "basic": DESIGN.md) at this level.
_ORT_LEVEL = "basic"
# Exit code of a budget no mix can meet: the quantized build does not fit the quality budget.
_EXIT_OVER_BUDGET = EXIT_QUALITY_GATE  # 3: a missed perplexity budget is a quality gate
# The bounds every weight quantizer of fdec declares; the class-level answer of `tolerance`.
_WEIGHT_QUANTIZER_TOLERANCE = Tolerance(max_abs_error=25.0, min_top1_agreement=0.45)


class _WrappedTolerance:
    """`tolerance`: the wrapped quantizer's on an instance; fdec's weight-quantizer bounds on
    the class (the quantizer is only known once options are)."""

    def __get__(self, instance: Any, owner: type) -> Tolerance:
        if instance is None:
            return _WEIGHT_QUANTIZER_TOLERANCE
        return instance.quantizer_class().tolerance


@dataclasses.dataclass
class _Unit:
    """Weights quantized or kept together: a name ("layers.3", "lm_head", "layers.3.q")."""

    name: str
    roles: list[str]


@dataclasses.dataclass
class _Reference:
    """The incoming model's log-probabilities on the measuring batches, and its perplexity."""

    batches: tuple[np.ndarray, ...]
    log_probs: list[np.ndarray]  # float64 [batch, seq, vocab] per batch
    perplexity: float

    @classmethod
    def of(cls, model: FdecModel, batches: tuple[np.ndarray, ...]) -> _Reference:
        log_probs = [log_softmax(logits) for logits in _logits(model, batches)]
        return cls(batches, log_probs, _perplexity(log_probs, batches))

    def score(self, model: FdecModel) -> dict[str, float]:
        """Mean KL(reference ‖ model) per position, top-1 agreement and perplexity of `model`."""
        kl_sum = agree = positions = 0.0
        got_log_probs = []
        for want, logits in zip(self.log_probs, _logits(model, self.batches)):
            got = log_softmax(logits)
            kl_sum += float((np.exp(want) * (want - got)).sum(-1).sum())
            agree += float((want.argmax(-1) == got.argmax(-1)).sum())
            positions += want.shape[0] * want.shape[1]
            got_log_probs.append(got)
        return {
            "kl": max(kl_sum / positions, 0.0),  # ≥ 0 up to rounding
            "top1": agree / positions,
            "ppl": _perplexity(got_log_probs, self.batches),
        }


def _logits(model: FdecModel, batches: Sequence[np.ndarray]) -> Iterator[np.ndarray]:
    """The decoder's logits on each batch (empty KV cache), from a CPU ORT session."""
    session = session_for_model(model, optimization=_ORT_LEVEL)
    for ids in batches:
        logits, _ = session.decode(ids, session.empty_past(ids.shape[0]), 0)
        yield logits


def _perplexity(log_probs: Sequence[np.ndarray], batches: Sequence[np.ndarray]) -> float:
    """exp(mean NLL) of ids[:, 1:] under log_probs[:, :-1], over every batch."""
    nll = count = 0.0
    for logp, ids in zip(log_probs, batches):
        picked = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)
        nll -= float(picked.sum())
        count += picked.size
    return float(math.exp(nll / count))


def _copy(model: FdecModel) -> FdecModel:
    """A trial copy: new graph objects sharing the tensors (quantizers give a weight they
    change a new tensor). A serialized copy lost the base folder of a streamed compile's
    external tensors ('model.safetensors', the spill file), and copied every weight."""
    return FdecModel(model.model.clone(), copy.deepcopy(model.spec))


@contextlib.contextmanager
def _hidden(model: FdecModel, roles: Mapping[str, str]) -> Iterator[None]:
    """Remove `roles` (role → initializer) from the spec while the block runs, then restore them
    in their old places; the block must leave their initializers alone."""
    spec = model.spec
    original = list(spec.weights)
    spec.weights = {role: name for role, name in spec.weights.items() if role not in roles}
    try:
        yield
    finally:
        now = spec.weights
        order = [*original, *(role for role in now if role not in original)]
        spec.weights = {
            role: roles[role] if role in roles else now[role]
            for role in order
            if role in roles or role in now
        }


@dataclasses.dataclass(eq=False)
class QuantizeMixedPass(Pass):
    """Quantize the weights with a wrapped quantizer, keeping the most sensitive units in fp32.

    Options:
    - `method`: the wrapped quantizer: "int4" (quantize-int4), "int8" (quantize-int8),
      "int4-awq" (quantize-int4-awq), or any registry name of the "quantize" family; it is
      looked up in fdec.passes.REGISTRY when the pass runs, built with `quantizer_options`
      (and given `batches` too when it takes calibration batches and has none of its own).
    - `keep_fp`: keep this many of the most sensitive units in fp32 (more than there are
      units: all of them, and nothing is quantized).
    - `max_ppl_increase`: instead, keep the fewest most-sensitive units in fp32 such that the
      mixed model's perplexity on the measuring tokens grows at most this much (relative:
      0.1 = +10 %). Units are added in sensitivity order until it holds. When it holds only
      with every unit in fp32 (nothing quantized), the pass raises VerificationError (exit
      code 3) naming the most sensitive units. Neither option: every unit is quantized, and
      the sensitivity is only reported.
    - `granularity`: "layer" (units `layers.{i}` and `lm_head`) or "matmul" (each role).
    - `batches`: calibration token batches ([batch, seq] ids, fdec.calibrate.calibration_batches);
      without them the pass `needs_calibration`. At most `max_batches` of them (evenly spaced),
      each cut to `max_tokens` tokens, are what every measurement runs on: each unit costs a
      model copy, an ONNX Runtime session and a forward pass over them.

    Stats: the wrapped quantizer's own (weights_quantized, bytes, skipped, ...), plus
    `sensitivity` (one {unit, kl, top1, ppl} per unit, largest KL first), `kept_fp32` and
    `quantized_units` (unit names), `ppl_fp32` / `ppl_mixed` / `ppl_increase` on the measuring
    tokens, `evaluations` (ORT sessions run) and wall times.
    """

    name = "quantize-mixed"
    family = "quantize"
    summary = "mixed precision: measure each layer's sensitivity, keep the worst in fp32"
    # The wrapped quantizer's bounds apply: fp32 units only shrink its error. Measured with
    # int4 (block 32) on SmolLM2-135M, calibrated on 4 × 128 tokens of the built-in corpus, on
    # 128 held tokens against PyTorch (perplexity 54.0): keep_fp 0: 70.9, top-1 0.57, max
    # error 12.5; keep_fp 2 (lm_head, layers.11): 66.6, 0.66, 10.7; keep_fp 4: 62.5, 0.73,
    # 10.8; keep_fp 8: 58.2, 0.74, 11.8; max_ppl_increase 0.15 kept 3 (+13.4 % on the
    # calibration tokens): 64.1, 0.72, 12.6. 31 units took 190–325 s on 2 CPU cores.
    tolerance = _WrappedTolerance()  # type: ignore[assignment]

    method: str = dataclasses.field(default="int4", kw_only=True)
    quantizer_options: Mapping[str, Any] = dataclasses.field(default_factory=dict, kw_only=True)
    keep_fp: int | None = dataclasses.field(default=None, kw_only=True)
    max_ppl_increase: float | None = dataclasses.field(default=None, kw_only=True)
    granularity: str = dataclasses.field(default="layer", kw_only=True)
    keep_bits: int | None = dataclasses.field(default=None, kw_only=True)
    # The quantizer each unit's sensitivity is measured with (a `method` name); None: `method`.
    # "int4" ranks by plain RTN, which costs one rounding per unit where AWQ costs a
    # calibration run and a search per unit.
    sensitivity_method: str | None = dataclasses.field(default=None, kw_only=True)
    batches: Sequence[np.ndarray] | None = dataclasses.field(default=None, kw_only=True)
    max_batches: int = dataclasses.field(default=4, kw_only=True)
    max_tokens: int = dataclasses.field(default=128, kw_only=True)

    def __post_init__(self) -> None:
        if self.granularity not in _GRANULARITIES:
            raise UsageError(
                f"{self.name} granularity {self.granularity!r} is unknown",
                f"use one of {', '.join(_GRANULARITIES)}",
            )
        if self.keep_fp is not None and self.max_ppl_increase is not None:
            raise UsageError(
                f"{self.name} got both keep_fp and max_ppl_increase",
                "give keep_fp (a count of fp32 units) or max_ppl_increase (a budget), not both",
            )
        if self.keep_fp is not None and (
            isinstance(self.keep_fp, bool) or not isinstance(self.keep_fp, int) or self.keep_fp < 0
        ):
            raise UsageError(
                f"{self.name} keep_fp {self.keep_fp!r} is not a whole number ≥ 0",
                "use 0 (quantize everything), or the count of layers to keep in fp32",
            )
        budget = self.max_ppl_increase
        if budget is not None and (
            isinstance(budget, bool)
            or not isinstance(budget, (int, float))
            or not math.isfinite(budget)
            or budget < 0
        ):
            raise UsageError(
                f"{self.name} max_ppl_increase {budget!r} is not a number ≥ 0",
                "give the allowed relative growth of perplexity: 0.05 = +5 %",
            )
        for option in ("max_batches", "max_tokens"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(
                    f"{self.name} {option} {value!r} is not a positive integer",
                    "use the default (max_batches=4, max_tokens=128) or another whole number ≥ 1",
                )
        if self.max_tokens < 2:
            raise UsageError(
                f"{self.name} max_tokens {self.max_tokens} scores no token",
                "use at least 2 tokens per batch (perplexity predicts token t from t-1)",
            )
        self.quantizer_options = dict(self.quantizer_options)
        self.batches = checked_batches(self.name, self.batches, min_seq=2)
        self.quantizer()  # an unknown method or bad quantizer options fail now
        if self.keep_bits not in _KEEP_BITS:
            raise UsageError(
                f"{self.name} keep_bits {self.keep_bits!r} is not supported",
                "use keep_bits=8 (8-bit weight-only) or leave it unset (fp32)",
            )
        self.keeper()  # keep_bits with a quantizer that has no 8-bit form fails now

    @property
    def needs_calibration(self) -> bool:
        """True until the pass is given `batches`."""
        return self.batches is None

    # --- the wrapped quantizer ----------------------------------------------------------------

    def quantizer_name(self) -> str:
        return _METHODS.get(self.method, self.method)

    def quantizer_class(self) -> type[Pass]:
        """The wrapped quantizer's class, from fdec.passes.REGISTRY (looked up now)."""
        from fdec.passes import REGISTRY

        name = self.quantizer_name()
        cls = REGISTRY.get(name)
        if cls is None or cls.family != "quantize" or cls is type(self):
            known = [short for short, full in _METHODS.items() if full in REGISTRY] + sorted(
                n for n, c in REGISTRY.items() if c.family == "quantize" and n != self.name
            )
            raise UsageError(
                f"{self.name} method {self.method!r} is not a registered weight quantizer",
                f"use one of {', '.join(known)}",
            )
        return cls

    def quantizer(self) -> Pass:
        """The wrapped quantizer, with `quantizer_options` (and `batches` when it takes them)."""
        from fdec.passes import make_pass

        cls = self.quantizer_class()
        options = dict(self.quantizer_options)
        fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else ()
        given = any(options.get(name) is not None for name in _CALIBRATION_OPTIONS)
        if "batches" in fields and not given and self.batches is not None:
            options["batches"] = self.batches
        return make_pass(self.quantizer_name(), **options)

    def keeper(self) -> Pass | None:
        """The quantizer of the kept units: None (they stay fp32), or quantize-int4 bits=8
        with the wrapped int4 quantizer's block size, backend and tied-table sharing."""
        if self.keep_bits is None:
            return None
        from fdec.passes import make_pass
        from fdec.passes.quantize import QuantizeInt4Pass

        quantizer = self.quantizer()
        if not isinstance(quantizer, QuantizeInt4Pass):
            raise UsageError(
                f"{self.name} keep_bits {self.keep_bits} needs an int4 method, not {self.method!r}",
                "use method int4 or int4-awq, or leave keep_bits unset (fp32)",
            )
        options = {name: getattr(quantizer, name) for name in _SHARED_INT4_OPTIONS}
        options["share_tied_embedding"] = quantizer.share_tied_embedding
        return make_pass("quantize-int4", bits=self.keep_bits, **options)

    def check_target(self, target: Any) -> None:
        self.quantizer().check_target(target)
        keeper = self.keeper()
        if keeper is not None:
            keeper.check_target(target)

    def requires(self, model: FdecModel, target: Any = None) -> None:
        if self.needs_calibration:
            raise UsageError(
                f"{self.name} measures each layer on calibration data and was given none",
                "pass batches=fdec.calibrate.calibration_batches(...) to the pass",
            )
        if not model.spec.is_decoder:
            raise UsageError(
                f"{self.name} ranks layers by their effect on the logits; "
                f"{model.spec.architecture} is an encoder",
                f"use {self.quantizer_name()} for encoders",
            )
        self.quantizer().requires(model, target)

    # --- the pass -----------------------------------------------------------------------------

    def measuring_batches(self) -> tuple[np.ndarray, ...]:
        """At most `max_batches` of the batches (evenly spaced), each cut to `max_tokens`."""
        assert self.batches is not None
        count = len(self.batches)
        chosen = np.unique(np.linspace(0, count - 1, num=min(count, self.max_batches)).round())
        return tuple(self.batches[int(i)][:, : self.max_tokens] for i in chosen)

    def units(self, model: FdecModel, quantizer: Pass) -> list[_Unit]:
        """The units of `model` the wrapped quantizer would quantize, in spec order.

        Roles naming one initializer (a tied embedding and lm_head) are one unit, named after
        the first of them that is not the embedding.
        """
        weights, _ = collect_weights(
            model,
            bool(getattr(quantizer, "include_lm_head", True)),
            bool(getattr(quantizer, "share_tied_embedding", False)),
        )
        quantizable = {weight.value.name for weight in weights}
        units: dict[str, _Unit] = {}
        unit_of_name: dict[str, str] = {}
        roles = sorted(model.spec.weights.items(), key=lambda item: item[0] == "embed")
        for role, name in roles:
            if name not in quantizable:
                continue
            match = _LAYER_ROLE.match(role)
            if name in unit_of_name:
                key = unit_of_name[name]
            elif self.granularity == "matmul" or match is None:
                key = role
            else:
                key = match.group(1)
            unit_of_name.setdefault(name, key)
            units.setdefault(key, _Unit(key, [])).roles.append(role)
        order = {role: index for index, role in enumerate(model.spec.weights)}
        return sorted(units.values(), key=lambda unit: min(order[r] for r in unit.roles))

    def call(self, model: FdecModel) -> PassResult:
        started = time.perf_counter()
        quantizer = self.quantizer()
        units = self.units(model, quantizer)
        if not units:
            stats = {"quantizer": quantizer.name, "units": 0, "weights_quantized": 0}
            return PassResult(model, modified=False, stats=stats)
        batches = self.measuring_batches()
        reference = _Reference.of(model, batches)
        evaluations = 1
        sensitivity: list[dict[str, Any]] = []
        measurer = quantizer
        if self.sensitivity_method is not None:
            from fdec.passes import REGISTRY, make_pass

            name = _METHODS.get(self.sensitivity_method, self.sensitivity_method)
            # the options the measuring quantizer has (RTN: no calibration, no source grid)
            fields = {f.name for f in dataclasses.fields(REGISTRY[name])}
            options = {k: v for k, v in self.quantizer_options.items() if k in fields}
            measurer = make_pass(name, **options)
        for unit in units:
            trial = _copy(model)
            self._quantize_only(trial, measurer, units, {unit.name})
            figures = reference.score(trial)
            evaluations += 1
            logger.info("sensitivity of %s: %s", unit.name, figures)
            sensitivity.append({"unit": unit.name, **figures})
        sensitivity.sort(key=lambda row: -row["kl"])
        ranked = [row["unit"] for row in sensitivity]
        measured_s = time.perf_counter() - started

        mixed: dict[str, float] | None = None
        if self.max_ppl_increase is not None:
            keep, mixed, tried = self._search(model, quantizer, units, ranked, reference)
            evaluations += tried
        else:
            keep = min(self.keep_fp or 0, len(units))
        kept = ranked[:keep]
        quantize = set(ranked[keep:])
        if quantize:
            result = self._quantize_only(model, quantizer, units, quantize)
            stats = dict(result.stats)
        else:
            stats = {"weights_quantized": 0, "matmuls_quantized": 0}
        keeper = self.keeper()
        if keeper is not None and kept:
            kept_stats = self._quantize_only(model, keeper, units, set(kept)).stats
            for key in ("weights_quantized", "matmuls_quantized", "bytes_before", "bytes_after"):
                stats[key] = stats.get(key, 0) + kept_stats[key]
            stats["kept_bytes_after"] = kept_stats["bytes_after"]
            quantize = quantize | set(kept)  # scored below as the mixed model
        if mixed is None:
            mixed = reference.score(model) if quantize else {"ppl": reference.perplexity}
            evaluations += bool(quantize)
        roles = {role for unit in units if unit.name in kept for role in unit.roles}
        stats.update(
            quantizer=quantizer.name,
            granularity=self.granularity,
            units=len(units),
            sensitivity=sensitivity,
            kept=kept,
            kept_precision="fp32" if keeper is None else f"int{self.keep_bits} weight-only",
            kept_fp32=kept if keeper is None else [],
            quantized_units=[unit for unit in ranked if unit in quantize and unit not in kept],
            kept_fp32_weights=len({model.spec.weights[role] for role in roles}) * (keeper is None),
            tokens_measured=int(sum(ids.size for ids in batches)),
            ppl_fp32=reference.perplexity,
            ppl_mixed=mixed["ppl"],
            ppl_increase=mixed["ppl"] / reference.perplexity - 1.0,
            evaluations=evaluations,
            sensitivity_wall_s=round(measured_s, 2),
            wall_s=round(time.perf_counter() - started, 2),
        )
        if self.max_ppl_increase is not None:
            stats["max_ppl_increase"] = self.max_ppl_increase
        return PassResult(model, modified=stats["weights_quantized"] > 0, stats=stats)

    def _quantize_only(
        self, model: FdecModel, quantizer: Pass, units: list[_Unit], chosen: set[str]
    ) -> PassResult:
        """Quantize the `chosen` units of `model` in place (the other units stay fp32)."""
        spec = model.spec
        chosen_roles = {role for unit in units if unit.name in chosen for role in unit.roles}
        chosen_names = {spec.weights[role] for role in chosen_roles}
        hide = {
            role: spec.weights[role]
            for unit in units
            if unit.name not in chosen
            for role in unit.roles
            if spec.weights[role] not in chosen_names  # a shared weight goes with the chosen
        }
        with _hidden(model, hide):
            result = quantizer(model)
        if result.model is not model:
            raise AssertionError(f"{quantizer.name} did not quantize in place")
        return result

    def _search(
        self,
        model: FdecModel,
        quantizer: Pass,
        units: list[_Unit],
        ranked: list[str],
        reference: _Reference,
    ) -> tuple[int, dict[str, float], int]:
        """Fewest units (from the top of `ranked`) to keep so perplexity grows ≤ the budget.

        Returns (count, the mixed model's figures, evaluations run); raises VerificationError
        when only keeping every unit meets the budget.
        """
        assert self.max_ppl_increase is not None
        budget = self.max_ppl_increase
        figures: dict[str, float] = {}
        for keep in range(len(ranked)):
            trial = _copy(model)
            self._quantize_only(trial, quantizer, units, set(ranked[keep:]))
            keeper = self.keeper()
            if keeper is not None and keep:
                self._quantize_only(trial, keeper, units, set(ranked[:keep]))
            figures = reference.score(trial)
            growth = figures["ppl"] / reference.perplexity - 1.0
            logger.info("keeping %s units in fp32: perplexity %+.2f%%", keep, 100 * growth)
            if growth <= budget:
                return keep, figures, keep + 1
        worst = ", ".join(ranked[:3])
        growth = figures["ppl"] / reference.perplexity - 1.0 if figures else math.inf
        raise VerificationError(
            f"{self.name}: no mix meets the perplexity budget of +{budget:.1%}: with every unit "
            f"in fp32 but {ranked[-1] if ranked else 'none'}, perplexity on the calibration "
            f"tokens still grows {growth:+.1%} ({reference.perplexity:.2f} → "
            f"{figures.get('ppl', math.nan):.2f}); most sensitive: {worst}",
            "raise --max-ppl-increase, or use a gentler method (int8, int4-awq)",
            exit_code=_EXIT_OVER_BUDGET,
        )
