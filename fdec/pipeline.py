"""The pass protocol and the PassManager that runs passes under instruments (timing, counts, checks, dumps).

Invariants every pass keeps (checked after each pass):
1. The graph stays a valid ONNX graph: inputs, outputs and their names are unchanged unless the
   pass exists to change them, and every node's inputs are produced before it.
2. The ModelSpec stays true: every role it names points at an initializer in the graph.
3. `PassResult.modified` is honest and `stats` count real work.
4. Numerics stay within the pass's declared `tolerance` against the source model.
Passes take keyword-only typed options, read hardware facts from the Target only, and never
read environment variables or globals.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from fdec.errors import CompileError, VerificationError
from fdec.ir import FdecModel, GraphCounts

__all__ = [
    "EXACT",
    "CountsInstrument",
    "DumpInstrument",
    "Instrument",
    "NumericCheckInstrument",
    "Pass",
    "PassManager",
    "PassRecord",
    "PassResult",
    "StructureCheckInstrument",
    "TimingInstrument",
    "Tolerance",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """How far a pass (or a whole build) may move the model's outputs from the source model's.

    `max_perplexity_increase` is relative (0.1 = perplexity may grow by 10 %); None: not checked.
    `greedy_identical`: greedy tokens must match the source's (exact builds only).
    """

    max_abs_error: float | None = 1e-3  # None: not checked (a pass that changes the model
    # on purpose, e.g. pruning: its figures are reported, the build gate is --max-ppl-increase)
    min_top1_agreement: float = 1.0
    max_perplexity_increase: float | None = None
    greedy_identical: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def and_then(self, later: Tolerance) -> Tolerance:
        """What two passes in a row may do to the outputs together: the looser limit of each
        figure (an unchecked error stays unchecked; a perplexity bound stays where either
        pass has one)."""
        bounds = [t.max_perplexity_increase for t in (self, later)]
        known = [bound for bound in bounds if bound is not None]
        return Tolerance(
            max_abs_error=None
            if None in (self.max_abs_error, later.max_abs_error)
            else max(self.max_abs_error, later.max_abs_error),
            min_top1_agreement=min(self.min_top1_agreement, later.min_top1_agreement),
            max_perplexity_increase=max(known) if known else None,
            greedy_identical=self.greedy_identical and later.greedy_identical,
        )

    def judge(self, figures: dict[str, Any]) -> str | None:
        """Why `figures` (from verify.Reference.compare) break this tolerance, or None."""
        if self.max_abs_error is not None and figures["max_abs_error"] > self.max_abs_error:
            return (
                f"{figures.get('worst_output', 'the outputs')} off by "
                f"{figures['max_abs_error']:.3g} (limit {self.max_abs_error:g})"
            )
        if figures["top1_agreement"] < self.min_top1_agreement:
            return (
                f"top-1 tokens agree on {figures['top1_agreement']:.1%} of positions "
                f"(needs {self.min_top1_agreement:.0%})"
            )
        if self.max_perplexity_increase is not None and "perplexity_build" in figures:
            growth = figures["perplexity_build"] / figures["perplexity_source"] - 1.0
            if growth > self.max_perplexity_increase:
                return (
                    f"perplexity grew {growth:.1%} ({figures['perplexity_source']:.2f} → "
                    f"{figures['perplexity_build']:.2f}; limit {self.max_perplexity_increase:.0%})"
                )
        return None


EXACT = Tolerance()


@dataclasses.dataclass
class PassResult:
    """What a pass did: the (possibly new) model, whether it changed, and counts of its work."""

    model: FdecModel
    modified: bool
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


# Pass fields holding calibration results (name → tensor): reported by their count.
_TENSOR_DATA_FIELDS = ("stats", "activations", "absmax")


class Pass(abc.ABC):
    """A transformation of an FdecModel.

    Subclasses are dataclasses with keyword-only options, set the class attributes below,
    check preconditions in `requires` and do their work in `call`.
    """

    name: ClassVar[str]
    family: ClassVar[str]
    summary: ClassVar[str]
    tolerance: ClassVar[Tolerance] = EXACT
    #: The pass changes the model it is given and returns it (onnx_ir.passes.InPlacePass);
    #: False: it returns a new model when it modifies anything (FunctionalPass).
    in_place: ClassVar[bool] = True
    #: Attention fusion may follow it by default (fuse-attention is not yet verified on the
    #: graphs of some quantizers).
    fusable: ClassVar[bool] = True
    #: The Q/DQ precision it puts on weights and activations ("fp8", "int8"); None for
    #: weight-only and float passes.
    qdq_precision: ClassVar[str | None] = None
    #: It zeroes weights (a sparsity mask) that later passes must keep zero.
    masks_weights: ClassVar[bool] = False
    #: Options it takes when it follows a pass that masks weights (error-compensating
    #: rounding would refill the masked zeros).
    options_after_masking: ClassVar[tuple[tuple[str, Any], ...]] = ()
    #: Fields through which it holds calibration data (left out when it is measured again).
    calibration_fields: ClassVar[tuple[str, ...]] = ("batches", "stats", "activations")
    #: What to try when the build's quality gate fails after it (the gate's fix text).
    gate_advice: ClassVar[str | None] = None
    #: The compile option that adds it, where a --passes list cannot (its options are the
    #: option's value, or it is a stage of its own).
    added_by: ClassVar[str | None] = None

    @property
    def writes_qdq(self) -> bool:
        """The graph gets QuantizeLinear/DequantizeLinear pairs, which ONNX Runtime runs on the
        CPU only at graph optimization "basic" (DESIGN.md)."""
        return self.qdq_precision is not None

    def check_target(self, target: Any) -> None:  # noqa: B027 - optional hook
        """Raise an FdecError naming the fix when the pass cannot serve `target` at all.

        Called for every pass before any work (before export), so a wrong plan fails fast.
        """

    def requires(self, model: FdecModel, target: Any = None) -> None:  # noqa: B027 - optional hook
        """Raise an FdecError naming the fix when the pass cannot run on `model` for `target`.

        Called just before the pass runs, on the model as the earlier passes left it.
        """

    @abc.abstractmethod
    def call(self, model: FdecModel) -> PassResult:
        """Run the pass; return the result with honest `modified` and `stats`."""

    def options(self) -> dict[str, Any]:
        """The pass's fields as the report shows them: calibration data is described, not
        listed (`batches` by fdec.calibrate.describe_batches, tensor mappings by their count)."""
        if not dataclasses.is_dataclass(self):
            return {}
        from fdec.calibrate import describe_batches

        options = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "batches":
                value = describe_batches(value)
            elif field.name in _TENSOR_DATA_FIELDS:
                value = None if value is None else f"{len(value)} tensors"
            options[field.name] = value
        return options

    def ensures(self, model: FdecModel) -> None:  # noqa: B027 - optional hook
        """Raise an FdecError when the pass left `model` (its result) broken; called after
        `call` (onnx_ir.passes.PassBase's postcondition)."""

    def __call__(self, model: FdecModel, target: Any = None) -> PassResult:
        """requires → call → ensures, with the declared in-place contract checked (as
        onnx_ir.passes.PassBase does); a direct call checks what PassManager.run checks."""
        self.requires(model, target)
        return self.apply(model)

    def apply(self, model: FdecModel) -> PassResult:
        """call → ensures and the in-place contract, for a model `requires` already accepted:
        an `in_place` pass returns the model it was given; one that is not returns another
        model whenever it reports `modified`."""
        result = self.call(model)
        if not isinstance(result, PassResult):
            raise CompileError(f"pass {self.name} returned {type(result).__name__}", "fix the pass")
        if self.in_place and result.model is not model:
            raise CompileError(
                f"pass {self.name} is declared in place but returned another model",
                "return the model it was given, or declare in_place = False",
            )
        if not self.in_place and result.modified and result.model is model:
            raise CompileError(
                f"pass {self.name} is declared not in place but returned its input modified",
                "return a new model, or declare in_place = True",
            )
        self.ensures(result.model)
        return result


@dataclasses.dataclass
class PassRecord:
    """One pass as it ran: filled in by instruments, read by the report."""

    index: int
    name: str
    family: str
    options: dict[str, Any]
    modified: bool = False
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    wall_s: float = 0.0
    before: GraphCounts | None = None
    after: GraphCounts | None = None
    checks: dict[str, Any] = dataclasses.field(default_factory=dict)
    dump: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["wall_s"] = round(self.wall_s, 4)
        return data


class Instrument:
    """Runs around every pass; records what it sees into the pass's record.

    Both hooks do nothing by default (as TVM's PassInstrument): an instrument overrides the
    ones it needs."""

    def before(self, pass_: Pass, model: FdecModel, record: PassRecord) -> None:
        """Called with the model entering `pass_`."""

    def after(self, pass_: Pass, result: PassResult, record: PassRecord) -> None:
        """Called with what `pass_` returned."""


class TimingInstrument(Instrument):
    """Wall time of each pass."""

    def before(self, pass_: Pass, model: FdecModel, record: PassRecord) -> None:
        record.wall_s = -time.perf_counter()

    def after(self, pass_: Pass, result: PassResult, record: PassRecord) -> None:
        record.wall_s += time.perf_counter()


class CountsInstrument(Instrument):
    """Nodes, initializers, parameters and bytes before and after each pass."""

    def before(self, pass_: Pass, model: FdecModel, record: PassRecord) -> None:
        record.before = model.counts()

    def after(self, pass_: Pass, result: PassResult, record: PassRecord) -> None:
        record.after = result.model.counts()


class StructureCheckInstrument(Instrument):
    """The ModelSpec is still true, and (with `full`) the ONNX checker accepts the graph."""

    def __init__(self, *, full: bool = False):
        self.full = full

    def after(self, pass_: Pass, result: PassResult, record: PassRecord) -> None:
        problems = result.model.spec_problems()
        if self.full:
            problems += _onnx_checker_problems(result.model)
        record.checks["structure"] = {"ok": not problems, "problems": problems}
        if problems:
            raise CompileError(
                f"pass {pass_.name} broke the model: {problems[0]}",
                "run with --passes to skip it, and report the model to the fdec developers",
            )


def _onnx_checker_problems(model: FdecModel) -> list[str]:
    import onnx
    import onnx_ir as ir

    proto = ir.serde.serialize_model(model.model)
    if proto.ByteSize() > 1_900_000_000:
        return []  # the checker cannot take protos over 2 GB in memory; checked at save time
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as err:
        return [f"ONNX checker: {str(err).splitlines()[0]}"]
    return []


class NumericCheckInstrument(Instrument):
    """Runs the model after each pass and compares it with the source model's outputs.

    `check` evaluates a model and returns a dict with at least `max_abs_error` and
    `top1_agreement` (see fdec.verify.Reference.compare). The model after a pass may be as
    far from the source as that pass and every pass before it allow together
    (`Tolerance.and_then`): an exact pass after int4 quantization carries int4's error, which
    its own 1e-3 failed every --verify-each compile of an int4 recipe with.
    """

    def __init__(self, check: Callable[[FdecModel], dict[str, Any]]):
        self.check = check
        self.allowed: Tolerance | None = None  # the passes so far, together

    def after(self, pass_: Pass, result: PassResult, record: PassRecord) -> None:
        figures = self.check(result.model)
        own = pass_.tolerance
        self.allowed = own if self.allowed is None else self.allowed.and_then(own)
        broken = self.allowed.judge(figures)
        record.checks["numeric"] = {
            **figures, "tolerance": self.allowed.to_dict(), "ok": not broken,
        }  # fmt: skip
        if broken:
            allow = "allows" if self.allowed == own else "and the passes before it allow"
            raise VerificationError(
                f"pass {pass_.name} moved the outputs beyond what it {allow}: {broken}",
                "drop the pass with --passes, or loosen its options",
            )


class DumpInstrument(Instrument):
    """Saves the IR after each pass as `NNN_PassName.onnx` (+ external data) in a folder."""

    def __init__(self, folder: str | pathlib.Path):
        self.folder = pathlib.Path(folder)

    def after(self, pass_: Pass, result: PassResult, record: PassRecord) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{record.index:03d}_{type(pass_).__name__}.onnx"
        result.model.save(path)
        record.dump = str(path)


class PassManager:
    """Runs passes in order, each wrapped by the instruments; returns one record per pass.

    onnx-ir's own PassManager rebuilds a plain PassResult and drops `stats`, so fdec runs
    the list itself.
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        instruments: Sequence[Instrument] = (),
        *,
        target: Any = None,
        on_pass: Callable[[int, int, Pass], None] | None = None,
    ):
        self.passes = list(passes)
        self.target = target
        self.instruments = [
            TimingInstrument(),
            CountsInstrument(),
            *instruments,
        ]
        if not any(isinstance(i, StructureCheckInstrument) for i in self.instruments):
            self.instruments.append(StructureCheckInstrument())
        self.on_pass = on_pass

    def check_requirements(self) -> None:
        """Run every pass's `check_target` before any work, so bad plans fail fast."""
        for pass_ in self.passes:
            pass_.check_target(self.target)

    def run(self, model: FdecModel) -> tuple[FdecModel, list[PassRecord]]:
        records: list[PassRecord] = []
        for index, pass_ in enumerate(self.passes, start=1):
            if self.on_pass:
                self.on_pass(index, len(self.passes), pass_)
            pass_.requires(model, self.target)
            record = PassRecord(index, pass_.name, pass_.family, _jsonable(pass_.options()))
            # Reversed, so timing (first in the list) starts last and stops first.
            for instrument in reversed(self.instruments):
                instrument.before(pass_, model, record)
            try:
                result = pass_.apply(model)
            except (CompileError, VerificationError):
                raise
            except Exception as err:
                raise CompileError(
                    f"pass {pass_.name} failed: {type(err).__name__}: {err}",
                    "run with --passes to skip it, and report the model to the fdec developers",
                ) from err
            record.modified = result.modified
            record.stats = _jsonable(result.stats)
            # Timing first out, so checks and dumps are not counted as the pass's time.
            for instrument in self.instruments:
                instrument.after(pass_, result, record)
            logger.info("%s: modified=%s %s", pass_.name, result.modified, record.stats)
            records.append(record)
            model = result.model
        return model, records


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
            value = value.item()  # numpy scalars
        if isinstance(value, (str, int, float, bool)) or value is None:
            out[key] = value
        elif isinstance(value, (list, tuple)):
            out[key] = [_jsonable({"v": v})["v"] for v in value]
        elif isinstance(value, dict):
            out[key] = _jsonable(value)
        else:
            out[key] = str(value)
    return out
