"""`fdec compile` as a Python API: import → pass pipeline → lowering → verification → build directory."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib
import time
from collections.abc import Callable
from typing import Any

from fdec import passes as fdec_passes
from fdec.build import AtomicBuild, check_output_path, write_manifest
from fdec.errors import UsageError, VerificationError
from fdec.frontend.export import import_model, load_hf_model
from fdec.frontend.source import default_cache_dir, resolve_source
from fdec.lower import MODEL_FILE, lower_onnxruntime
from fdec.lower.engines import build_engines
from fdec.lower.profiles import ShapeLimits
from fdec.pipeline import (
    DumpInstrument,
    NumericCheckInstrument,
    PassManager,
    StructureCheckInstrument,
    Tolerance,
)
from fdec.report import REPORT_FILE, SCHEMA_VERSION, environment
from fdec.report.roofline import estimate
from fdec.runtime import OrtModel, open_session, session_for_model
from fdec.targets import load_target
from fdec.verify import Reference

__all__ = ["FP32_TOLERANCE", "CompileOptions", "CompileResult", "compile_model"]

logger = logging.getLogger(__name__)

# What an fp32 build must meet against the source model (the contract).
FP32_TOLERANCE = Tolerance(max_abs_error=1e-3, min_top1_agreement=1.0)


@dataclasses.dataclass
class CompileOptions:
    model: str
    out: pathlib.Path
    target: str = "cpu"
    passes: str | None = None  # comma-separated; None = the default pipeline
    verify_each: bool = False
    dump_dir: pathlib.Path | None = None
    trust_pickle: bool = False
    trust_remote_code: bool = False
    cache_dir: pathlib.Path | None = None
    backend: str | None = None  # None = the target's default backend
    max_batch: int = 1
    max_seq_len: int = 2048


@dataclasses.dataclass
class CompileResult:
    out: pathlib.Path
    report: dict[str, Any]

    @property
    def ok(self) -> bool:
        return bool(self.report["verification"]["ok"])


def _config_digest(folder: pathlib.Path) -> str:
    path = folder / "config.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


def compile_model(
    options: CompileOptions, progress: Callable[[str], None] = lambda message: None
) -> CompileResult:
    """Compile `options.model` into `options.out`; raises FdecError subclasses on failure."""
    started = time.perf_counter()
    out = pathlib.Path(options.out)
    # Everything that can be checked without loading the model is checked first.
    target = load_target(options.target)
    backend = _choose_backend(options.backend, target)
    limits = ShapeLimits(max_batch=options.max_batch, max_seq_len=options.max_seq_len)
    check_output_path(out)
    pass_names = fdec_passes.parse_pass_list(options.passes)
    pipeline = fdec_passes.make_pipeline(pass_names)

    source = resolve_source(
        options.model,
        trust_pickle=options.trust_pickle,
        cache_dir=options.cache_dir or default_cache_dir(),
        progress=progress,
    )
    progress(f"loading {source.given} ({source.family.name}, {source.kind})")
    hf_model = load_hf_model(source, trust_remote_code=options.trust_remote_code)
    progress("exporting to ONNX (torch.onnx dynamo exporter)")
    export_started = time.perf_counter()
    imported = import_model(source, hf_model=hf_model)
    export_s = time.perf_counter() - export_started
    fdec_model = imported.fdec_model
    spec = fdec_model.spec
    if target.is_gpu and backend != "onnxruntime":
        limits.check_against(spec)
    progress("computing the reference outputs with PyTorch")
    reference = Reference.from_hf(hf_model, spec.kind, imported.tokenizer, spec.vocab_size)

    instruments: list[Any] = []
    if options.verify_each:
        instruments.append(StructureCheckInstrument(full=True))
        instruments.append(
            NumericCheckInstrument(lambda model: reference.compare(session_for_model(model)))
        )
    if options.dump_dir:
        instruments.append(DumpInstrument(options.dump_dir))
    manager = PassManager(
        pipeline,
        instruments,
        on_pass=lambda i, n, p: progress(f"pass {i}/{n}: {p.name}"),
    )
    manager.check_requirements(fdec_model, target)
    fdec_model, records = manager.run(fdec_model)

    with AtomicBuild(out) as staging:
        progress(f"writing the ONNX Runtime build to {out}")
        lower_onnxruntime(fdec_model, staging, source_folder=source.folder, target=target)
        progress("verifying the build against the source model")
        session = OrtModel(open_session(staging / MODEL_FILE))
        verification = _verify(reference, session, FP32_TOLERANCE)
        if not verification["ok"]:
            raise VerificationError(verification["failure"], _verification_fix(verification))
        engines = build_engines(
            staging, spec=spec, target=target, backend=backend, limits=limits, progress=progress
        )
        counts = fdec_model.counts()
        report = {
            "schema_version": SCHEMA_VERSION,
            "source": {
                "given": source.given,
                "kind": source.kind,
                "folder": str(source.folder),
                "family": spec.family,
                "architecture": spec.architecture,
                "config_sha256": _config_digest(source.folder),
            },
            "target": target.to_dict(),
            "backend": backend,
            "limits": dataclasses.asdict(limits),
            "spec": spec.to_dict(),
            "environment": environment(),
            "pipeline": pass_names,
            "export": {"exporter": "torch.onnx (dynamo)", "wall_s": round(export_s, 2)},
            "passes": [record.to_dict() for record in records],
            "verification": verification,
            "engines": engines,
            "estimate": estimate(
                spec,
                target,
                weight_bytes=counts.bytes,
                parameters=counts.parameters,
                gathered_bytes=_gathered_bytes(fdec_model),
            ),
            "wall_s": round(time.perf_counter() - started, 2),
        }
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        manifest = write_manifest(
            staging,
            {
                "schema_version": SCHEMA_VERSION,
                "inputs": {"model": source.given, "config_sha256": _config_digest(source.folder)},
                "target": target.name,
                "pipeline": pass_names,
                "options": {
                    "verify_each": options.verify_each,
                    "backend": backend,
                    "limits": dataclasses.asdict(limits),
                },
                "packages": report["environment"]["packages"],
            },
        )
        report["outputs"] = json.loads(manifest.read_text())["outputs"]
    return CompileResult(out, report)


_BACKENDS = ("onnxruntime", "tensorrt", "tensorrt-rtx")


def _choose_backend(asked: str | None, target: Any) -> str:
    backend = asked or target.default_backend
    if backend not in _BACKENDS:
        raise UsageError(f"unknown backend {backend!r}", f"use one of: {', '.join(_BACKENDS)}")
    if backend != "onnxruntime" and not target.is_gpu:
        raise UsageError(
            f"backend {backend} needs a GPU target; {target.name} is a CPU",
            "pass --target with a GPU (fdec targets lists them) or --backend onnxruntime",
        )
    return backend


def _gathered_bytes(model: Any) -> int:
    """Bytes of an untied embedding table: read a row per token, not whole."""
    spec = model.spec
    name = spec.weights.get("embed")
    if not name or spec.weights.get("lm_head") == name or name not in model.graph.initializers:
        return 0
    tensor = model.graph.initializers[name].const_value
    return int(tensor.nbytes) if tensor is not None else 0


def _verification_fix(verification: dict[str, Any]) -> str:
    return "the build was not written; rerun with --verify-each to find the pass that broke it"


def _verify(reference: Reference, session: OrtModel, tolerance: Tolerance) -> dict[str, Any]:
    numeric = reference.compare(session)
    result: dict[str, Any] = {
        "numeric": numeric,
        "tolerance": tolerance.to_dict(),
        "providers": session.providers,
        "reference": "PyTorch (transformers), fp32, CPU",
        "held_text": "tokenizer" if reference.used_tokenizer else "synthetic token ids",
    }
    failure = None
    if numeric["max_abs_error"] > tolerance.max_abs_error:
        failure = (
            f"build differs from the source model: {numeric['worst_output']} off by "
            f"{numeric['max_abs_error']:.3g} (limit {tolerance.max_abs_error:g})"
        )
    elif numeric["top1_agreement"] < tolerance.min_top1_agreement:
        failure = f"build's top-1 tokens agree on only {numeric['top1_agreement']:.1%} of positions"
    if reference.kind == "decoder":
        greedy = reference.compare_greedy(session)
        result["greedy"] = greedy
        if failure is None and not greedy["identical"]:
            margin = greedy.get("source_margin_at_divergence", 0.0)
            if margin > tolerance.max_abs_error:
                failure = (
                    f"greedy tokens diverge from the source model at step "
                    f"{greedy['first_divergence']} of {greedy['steps']}"
                )
            else:
                greedy["near_tie"] = True  # source's top two logits within float noise
    result["ok"] = failure is None
    if failure:
        result["failure"] = failure
    return result
