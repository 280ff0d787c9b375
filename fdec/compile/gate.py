"""Verify and gate: the written build against the source model, and a failed gate explained.

`verify_build` compares the build's session with the PyTorch reference under the recipe's
tolerance; when only the perplexity bound fails, `quality_gate_error` names the layers the
lossy pass hurt most (measured on the model `LossySnapshot` kept from before that pass).
`verify_build_numerics` does it again for a written build (`fdec verify BUILD --numerics`),
on the providers the build runs on where this machine has them.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import pathlib
import tempfile
from collections.abc import Callable
from typing import Any

from fdec.build import read_build_json
from fdec.calibrate import calibration_batches, load_calibration_texts
from fdec.compile.recipe import sensitivity_pass
from fdec.compile.write import config_digest
from fdec.errors import QualityGateError, UsageError, VerificationError
from fdec.frontend.export import load_hf_model, load_tokenizer
from fdec.frontend.source import resolve_source
from fdec.frontend.stream import STREAM_PARAMETERS, checkpoint_parameters
from fdec.ir import FdecModel, ModelSpec
from fdec.lower import MODEL_FILE
from fdec.lower.cuda_kernels import cpu_run_check, cpu_unrunnable
from fdec.pipeline import EXACT, Instrument, Tolerance
from fdec.runtime import OrtModel, open_session
from fdec.runtime import sliced as sliced_runs
from fdec.runtime.check_forms import lighter_session_args, low_dtype
from fdec.runtime.ort import device_name
from fdec.verify import GREEDY_STEPS, Reference

__all__ = [
    "VERIFICATION_FIX",
    "Fp16OverflowError",
    "LossySnapshot",
    "quality_gate_error",
    "verify_build",
    "verify_build_numerics",
    "verify_model",
    "verify_written",
]

VERIFICATION_FIX = (
    "the build was not written; rerun with --verify-each to find the pass that broke it"
)


def verify_build(reference: Reference, session: OrtModel, tolerance: Tolerance) -> dict[str, Any]:
    numeric = reference.compare(session)
    result: dict[str, Any] = {
        "numeric": numeric,
        "tolerance": tolerance.to_dict(),
        "providers": session.providers,
        "device": device_name(session.providers[0]) if session.providers else None,
        "reference": "PyTorch (transformers), fp32, CPU",
        "held_text": "tokenizer" if reference.used_tokenizer else "synthetic token ids",
    }
    broken = tolerance.judge(numeric)
    failure = f"build differs from the source model: {broken}" if broken else None
    if numeric.get("nonfinite_outputs"):  # not a quality trade-off: a broken graph
        failure = (
            f"the build's outputs hold {numeric['nonfinite_outputs']} inf/NaN values on held "
            "text where the source model's are finite"
        )
    elif broken and not tolerance.greedy_identical:  # a lossy build missed its gate: exit 3
        result["gate"], result["gate_failure"] = "max_perplexity_increase", broken
    if reference.kind == "decoder":
        greedy = reference.compare_greedy(session)
        result["greedy"] = greedy
        if failure is None and tolerance.greedy_identical and not greedy["identical"]:
            margin = greedy.get("source_margin_at_divergence", 0.0)
            if margin > tolerance.max_abs_error:
                failure = (
                    f"greedy tokens diverge from the source model at step "
                    f"{greedy['first_divergence']} of {greedy['steps']}"
                )
            else:
                greedy["near_tie"] = True  # source's top two logits within float noise
    result["checks"] = _checks(result, reference)
    result["ok"] = failure is None
    if failure:
        result["failure"] = failure
    return result


def _checks(result: dict[str, Any], reference: Reference) -> list[dict[str, Any]]:
    """Which checks ran, at what length (the report says it for every build; a large one
    runs fewer reference greedy steps, fdec.compile.front.STREAMED_GREEDY_STEPS)."""
    numeric = result["numeric"]
    checks = [{"check": "outputs on held text", "tokens": int(reference.ids.shape[1]),
               "figures": "max logit error, top-1, KL, perplexity" if reference.kind ==
               "decoder" else "max output error"}]  # fmt: skip
    if numeric.get("kv_cache"):
        checks[0]["tokens_through_cache"] = numeric["kv_cache"]["tokens_through_cache"]
    greedy = result.get("greedy")
    if greedy is not None:
        checks.append({"check": "greedy tokens", "steps": greedy["steps"],
                       "reference_steps": len(reference.greedy_tokens),
                       "method": greedy.get("method")})  # fmt: skip
    return checks


class LossySnapshot(Instrument):
    """An instrument that saves the model as it enters the first lossy pass (to a temporary
    folder), so that a failed quality gate can measure which layers that pass hurt most. It is
    read only then; `close` deletes it. When that pass's result came from the cache, its input
    model is loaded from the cache instead (`from_cache`)."""

    def __init__(self) -> None:
        self.pass_: Any = None
        self.spec: Any = None
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        self._loader: Callable[[], FdecModel | None] | None = None

    def from_cache(self, pass_: Any, loader: Callable[[], FdecModel | None]) -> None:
        self.pass_, self._loader = pass_, loader

    def model(self) -> FdecModel | None:
        """The model as it entered the first lossy pass (None when there was none)."""
        if self._loader is not None:
            return self._loader()
        if self.path is None:
            return None
        import onnx_ir as ir

        return FdecModel(ir.external_data.load_to_model(ir.load(self.path)), self.spec)

    @property
    def path(self) -> pathlib.Path | None:
        return pathlib.Path(self._folder.name) / "model.onnx" if self._folder else None

    def before(self, pass_: Any, model: FdecModel, record: Any) -> None:
        if self.pass_ is None and pass_.tolerance != EXACT:
            self._folder = tempfile.TemporaryDirectory(prefix="fdec-snapshot-")
            model.save(self.path)
            self.pass_, self.spec = pass_, copy.deepcopy(model.spec)

    def close(self) -> None:
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


# How many of the most sensitive layers a failed gate names.
_WORST_SHOWN = 3


def _sensitivity(
    records: list[Any], snapshot: LossySnapshot, recipe: Any, front: Any, progress: Any
) -> list[dict[str, Any]]:
    """Per-layer sensitivity (largest KL first) of the build's weight quantizer: the table a
    quantize-mixed pass recorded, else measured now on the snapshot taken before that pass."""
    for record in records:  # a mixed-precision pass measured it already
        if record.stats.get("sensitivity"):
            return list(record.stats["sensitivity"])
    quantizer = snapshot.pass_
    if quantizer is None or quantizer.family != "quantize":
        return []
    model = snapshot.model()
    if model is None:
        return []
    options = {
        field.name: getattr(quantizer, field.name)
        for field in dataclasses.fields(quantizer)
        if field.init and field.name not in quantizer.calibration_fields
    }
    batches = getattr(quantizer, "batches", None) or tuple(
        calibration_batches(
            recipe.calibration_texts or load_calibration_texts(None),
            front.tokenizer(),
            model.spec.vocab_size,
            max_positions=model.spec.max_positions or 0,
        )
    )
    mixed = sensitivity_pass(quantizer.name, options, batches)
    progress("quality gate failed: measuring each layer's sensitivity to name the worst")
    return list(mixed(model).stats.get("sensitivity", []))


def quality_gate_error(
    verification: dict[str, Any],
    tolerance: Tolerance,
    records: list[Any],
    snapshot: LossySnapshot,
    recipe: Any,
    front: Any,
    progress: Any,
) -> QualityGateError:
    numeric = verification["numeric"]
    source, build = numeric["perplexity_source"], numeric["perplexity_build"]
    limit = tolerance.max_perplexity_increase
    try:
        sensitivity = _sensitivity(records, snapshot, recipe, front, progress)
    finally:
        snapshot.close()
    worst = sensitivity[:_WORST_SHOWN]
    named = ", ".join(f"{row['unit']} (KL {row['kl']:.3g})" for row in worst)
    problem = (
        f"quality gate failed on held text: {verification['gate_failure']}"
        f" (perplexity {build / source - 1:+.1%}, --max-ppl-increase {limit:.1%})"
        + (f"; most sensitive layers: {named}" if named else "")
    )
    fix = (
        f"keep them in fp32 with --keep-fp {len(worst)} (int4, int8 dynamic), " if worst else ""
    ) + "choose a gentler --quantize (int4-awq, int8), or raise --max-ppl-increase"
    advice = [p.gate_advice for p in recipe.pipeline if p.gate_advice]
    fix = "".join(advice) + fix
    details = {
        "gate": "max_ppl_increase",
        "limit": limit,
        "perplexity_source": source,
        "perplexity_build": build,
        "increase": build / source - 1,
        "worst_layers": worst,
        "sensitivity_measured_on": "calibration text (KL against the model before quantization)",
    }
    return QualityGateError(problem, fix, details=details)


def _not_run(reason: str, device_graph: str, tolerance: Tolerance, progress: Any) -> dict[str, Any]:
    """A GPU graph the CPU cannot run: said plainly, never passed (`fdec verify BUILD
    --numerics` on the GPU runs it there)."""
    progress(f"verification {reason}")
    return {"ok": None, "not_run": reason, "made_for": device_graph, "providers": [],
            "tolerance": tolerance.to_dict()}  # fmt: skip


def _available_providers() -> list[str]:
    from fdec.runtime.session import require_onnxruntime

    return list(require_onnxruntime().get_available_providers())


def verify_written(
    staging: pathlib.Path,
    reference: Reference,
    recipe: Any,
    optimized: Any,
    front: Any,
    progress: Callable[[str], None],
    *,
    spec: Any = None,
) -> dict[str, Any]:
    """Verify the build as written in `staging`; raise the quality gate's error (exit 3) or a
    VerificationError when it fails. The verification record for the report."""
    progress("verifying the build against the source model")
    device_graph = getattr(recipe, "device_graph", None)
    verification, session = verify_model(
        staging / MODEL_FILE, reference, recipe.tolerance, device_graph=device_graph,
        optimization=recipe.optimization, spec=spec, progress=progress,
    )  # fmt: skip
    if session is None:
        return verification
    return _judged(verification, recipe, optimized, front, progress)


def verify_model(
    path: pathlib.Path,
    reference: Reference,
    tolerance: Tolerance,
    *,
    device_graph: str | None,
    optimization: str,
    spec: Any = None,
    progress: Callable[[str], None] = lambda message: None,
) -> tuple[dict[str, Any], Any]:
    """(verification record, the session it ran on) for the model at `path`; the session is
    None when this machine cannot run the graph (the record then
    says "not run here"). A graph made for a GPU provider is verified on it where this
    onnxruntime has it (a compile or `fdec verify --numerics` on the GPU machine), else on the
    CPU with its fp16/bf16 rounding emulated, after checking that the graph as written
    resolves its types on the CPU."""
    on_device = device_graph is not None and device_graph in _available_providers()
    # A GPU graph checked on this CPU runs with its fp16/bf16 storage emulated: ORT's CPU
    # would run fp16 nodes in fp32 between casts it drops, skipping the rounding (and the
    # overflow) the GPU computes (fdec.runtime.check_forms.emulate_low_precision).
    low = low_dtype(path) if device_graph else None
    emulate = low is not None and not on_device
    as_built = cpu_run_check(path) if emulate else None  # types resolve as written
    # Without prepacking the verifying session reads the weights from the mapped file
    # instead of holding a packed copy (peak RSS; issue 9).
    providers = [device_graph, "CPUExecutionProvider"] if on_device else None
    if sliced_runs.too_large_for_one_session(path, reference.kind):
        # Too large for one session beside the rest of the compile: one slice of layers at
        # a time (fdec.runtime.sliced), the same figures within float noise.
        weights = sliced_runs.weight_bytes(path)
        progress(f"verifying slice by slice ({weights / 2**30:.2f} GiB of weights)")
        sliced = sliced_runs.SlicedModel(
            path, spec=spec, optimization=optimization, providers=providers,
            emulate=emulate,
        )  # fmt: skip
        verification = verify_build(reference, sliced, tolerance)
        verification["sliced"] = sliced.to_dict()
        return _where(verification, sliced, device_graph, low, as_built), sliced
    # On the CPU, tables dequantized whole for TensorRT are read by rows and column blocks
    # (fdec.runtime.check_forms: the same values, a fraction of the memory).
    lighter = {} if on_device else lighter_session_args(path, emulate=emulate)
    try:
        session = OrtModel(
            open_session(
                path, providers=providers, prepack=False,
                **{"optimization": optimization, **lighter},
            )
        )  # fmt: skip
    except Exception as err:  # a fused op the CPU has no fp32 kernel for
        reason = cpu_unrunnable(err, "fp32") if emulate else None  # the emulated graph's
        if reason is None:
            raise
        return _not_run(reason, device_graph, tolerance, progress), None
    verification = verify_build(reference, session, tolerance)
    return _where(verification, session, device_graph, low, as_built), session


def _where(
    verification: dict[str, Any], session: Any, device_graph: str | None, low: str | None,
    as_built: dict[str, Any] | None,
) -> dict[str, Any]:  # fmt: skip
    """A GPU graph's record says what it was made for, its float type, and what happened on
    the way: the GPU provider that failed to start, the low precision the CPU emulated (the
    graph as built was load-checked, `as_built`, exactly when the check ran emulated)."""
    if device_graph:
        verification["made_for"] = device_graph
        verification["dtype"] = low or "fp32"
        if session.provider_fallback:
            verification["provider_fallback"] = session.provider_fallback
    if as_built is not None:
        verification["emulated"] = {
            "dtype": low,
            "how": f"every {low} tensor rounded to {low} after the node computing it, "
            "the arithmetic inside each node in fp32 (as the GPU kernels accumulate); fused ops "
            "run by ONNX Runtime's CPU kernels",
            "as_built_on_cpu": as_built,
        }
    return verification


class Fp16OverflowError(VerificationError):
    """An fp16 graph whose outputs on held text hold inf/NaN where the source's are finite:
    its values leave fp16's range. A compile whose fp16 was the backend's default types the
    graph bf16 instead where the target has it (fdec.compile)."""

    def __init__(self, problem: str, fix: str, *, nonfinite: int):
        super().__init__(problem, fix)
        self.nonfinite = nonfinite


def _failed(verification: dict[str, Any]) -> VerificationError:
    """The error of a failed verification; an fp16 graph whose outputs overflowed is told of
    bf16, which has fp32's exponent range."""
    if verification["numeric"].get("nonfinite_outputs") and verification.get("dtype") == "fp16":
        return Fp16OverflowError(
            verification["failure"],
            "the fp16 graph leaves fp16's range (±65504) where the fp32 model does not: compile "
            "with --quantize bf16 (fp32's range) for a target with bf16; the build was not "
            "written",
            nonfinite=verification["numeric"]["nonfinite_outputs"],
        )
    return VerificationError(verification["failure"], VERIFICATION_FIX)


def _judged(
    verification: dict[str, Any], recipe: Any, optimized: Any, front: Any,
    progress: Callable[[str], None],
) -> dict[str, Any]:  # fmt: skip
    """The verification record, or the gate's / verification's error when it failed."""
    if verification.get("gate"):
        raise quality_gate_error(
            verification, recipe.tolerance, optimized.records, optimized.snapshot, recipe, front,
            progress,
        )  # fmt: skip
    if not verification["ok"]:
        raise _failed(verification)
    optimized.snapshot.close()
    return verification


def verify_build_numerics(
    build: pathlib.Path,
    *,
    source: str | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """A written build's outputs against its source model again, under the tolerance its
    report recorded, on the build's providers where this onnxruntime has them (a GPU build
    copied to the GPU machine runs on the GPU): the verification record, with the providers
    and the device it ran on. `source` overrides the report's source (a build made elsewhere).
    Models above the streaming threshold are not re-verified here: the whole PyTorch model is
    loaded for the reference."""
    build = pathlib.Path(build)
    report = read_build_json(build / "report.json")
    runtime = read_build_json(build / "fdec-runtime.json")
    recorded = report.get("source") or {}
    given = source or (
        recorded["folder"] if recorded.get("kind") == "folder" else recorded.get("given")
    )
    if not given:
        raise UsageError(f"{build}'s report names no source model", "pass --source MODEL")
    if not source and recorded.get("kind") == "folder" and not pathlib.Path(given).is_absolute():
        given = build / given  # a folder the build carries: a pruned build's student/
    resolved = resolve_source(str(given), progress=progress)
    if (
        recorded.get("config_sha256")
        and config_digest(resolved.folder) != recorded["config_sha256"]
    ):
        raise UsageError(
            f"{given}'s config.json is not the one {build} was compiled from",
            "pass --source with the model the build was made from",
        )
    parameters = checkpoint_parameters(resolved)
    if parameters > STREAM_PARAMETERS:
        raise UsageError(
            f"{given} has {parameters / 1e9:.1f}B parameters: `fdec verify "
            "--numerics` loads the whole PyTorch model for its reference",
            "read the verification in the build's report.json (made layer by layer at compile)",
        )
    recorded_verification = report.get("verification") or {}
    fields = {f.name for f in dataclasses.fields(Tolerance)}
    tolerance = Tolerance(
        **{k: v for k, v in (recorded_verification.get("tolerance") or {}).items() if k in fields}
    )
    spec = ModelSpec.from_dict(report["spec"])
    steps = (recorded_verification.get("greedy") or {}).get("steps") or GREEDY_STEPS
    progress("computing the reference outputs with PyTorch")
    hf_model = load_hf_model(resolved)
    tokenizer = load_tokenizer(resolved.folder) if resolved.has_tokenizer else None
    reference = Reference.from_hf(
        hf_model, spec.kind, tokenizer, spec.vocab_size, greedy_steps=steps
    )
    del hf_model
    gc.collect()
    device_graph = recorded_verification.get("made_for")
    optimization = (runtime.get("session_options") or {}).get("graph_optimization_level", "all")
    progress(f"verifying {build} against {given}")
    verification, _ = verify_model(
        build / MODEL_FILE, reference, tolerance, device_graph=device_graph,
        optimization=optimization, spec=spec, progress=progress,
    )  # fmt: skip
    verification["source"] = str(given)
    return verification
