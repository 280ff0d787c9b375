"""`fdec compile` as a Python API: import → pass pipeline → lowering → verification → build directory."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import logging
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

from fdec import passes as fdec_passes
from fdec.build import AtomicBuild, check_output_path, write_manifest
from fdec.cache import Cache, digest_of, fingerprint, source_inputs, tool_versions
from fdec.calibrate import calibration_batches, calibration_cache, load_calibration_texts
from fdec.errors import QualityGateError, UsageError, VerificationError
from fdec.frontend.export import import_model, load_hf_model, load_tokenizer
from fdec.frontend.source import default_cache_dir, resolve_source
from fdec.gates import GateTolerance, default_gate
from fdec.ir import FdecModel, GraphCounts, ModelSpec, release_freed_memory
from fdec.lower import MODEL_FILE, RUNTIME_CONFIG, lower_onnxruntime
from fdec.lower.engines import build_engines
from fdec.lower.genai import write_genai_config
from fdec.lower.hf_checkpoint import CHECKPOINT_DIR, check_quantize, write_hf_checkpoint
from fdec.lower.profiles import ShapeLimits
from fdec.passes.prune import parse_prune
from fdec.pipeline import (
    EXACT,
    DumpInstrument,
    NumericCheckInstrument,
    PassManager,
    PassRecord,
    StructureCheckInstrument,
    Tolerance,
)
from fdec.plan import check_capacity
from fdec.report import REPORT_FILE, SCHEMA_VERSION, environment
from fdec.report.html import HTML_FILE, render_html
from fdec.report.roofline import estimate
from fdec.runtime import OrtModel, open_session, session_for_model
from fdec.student import (
    DRAFT_DIR,
    STUDENT_DIR,
    distill_pruned,
    draft_prune,
    parse_draft,
    prune_source,
)
from fdec.targets import Precision, load_target
from fdec.verify import Reference

__all__ = [
    "FP32_TOLERANCE",
    "CompileOptions",
    "CompileResult",
    "Plan",
    "choose_backend",
    "compile_model",
    "default_quantize",
    "plan_pipeline",
]

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
    max_seq_len: int | None = None  # None: 2048, or the model's positions when fewer
    quantize: str | None = None  # "int4", "int4-rtn", "int8" (precision[-method])
    max_ppl_increase: float | None = None  # quality gate for lossy builds (0.2 = +20 %)
    emit: tuple[str, ...] = ()  # extra outputs: "hf-checkpoint"
    calibration: pathlib.Path | None = None  # .txt/.jsonl for static quantization; None = built-in
    keep_fp: int | None = None  # keep the N most sensitive layers (measured) in fp32
    cache: bool = True  # False (--no-cache): nothing read from or written to fdec's cache
    kv_dtype: str | None = None  # KV cache: fp32/fp16 (float) or int8/fp8 (quantize-kv-cache)
    kv_window: int | None = None  # keep the last W cache positions (kv-policy)
    kv_sink: int | None = None  # ... plus the first K (attention sink)
    # {pass name: {option: value}}: options of passes in the pipeline (config [pass_options])
    pass_options: dict[str, dict[str, Any]] | None = None
    sparsity: str | None = None  # "2:4": sparsify-2of4 before quantization (sm >= 8.0 targets)
    prune: str | None = None  # "heads=0.25,mlp=0.3,layers=4": build a pruned student (fdec.student)
    draft: str | None = None  # "layers=1/4": also build a layer-pruned draft in OUT/draft
    distill_steps: int = 0  # with prune: distill the pruned model this long before compiling it
    force: bool = False  # -o may replace a folder holding files fdec did not write (--force)


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
    options: CompileOptions,
    progress: Callable[[str], None] = lambda message: None,
    *,
    _extras: tuple[Callable[[pathlib.Path, dict[str, Any]], None], ...] | list = (),
) -> CompileResult:
    """Compile `options.model` into `options.out`; raises FdecError subclasses on failure.

    With `prune`, the source is pruned first (fdec.student) and the pruned checkpoint is
    compiled, the build carrying it in `student/`; with `draft`, a layer-pruned draft is
    compiled into the build's `draft/` (for `fdec run --speculative draft`)."""
    started = time.perf_counter()
    out = pathlib.Path(options.out)
    # Everything that can be checked without loading the model is checked first.
    target = load_target(options.target)
    backend = choose_backend(options.backend, target)
    limits = ShapeLimits(
        max_batch=options.max_batch, max_seq_len=options.max_seq_len or DEFAULT_MAX_SEQ_LEN
    )
    # Never replaced, even with --force: the model compiled and the cache (fdec.build).
    keep = (pathlib.Path(options.model), options.cache_dir or default_cache_dir())
    check_output_path(out, force=options.force, keep=keep)
    # Without --quantize the target's default recipe applies; it depends on the model's kind
    # (encoders quantize differently), known once the source resolves: plan for a decoder now
    # so a bad combination fails before any work, and re-plan below if the model is an encoder.
    # A serving checkpoint is written in full precision unless asked otherwise: its loaders
    # take only some quantized formats (fdec.lower.hf_checkpoint.SUPPORTED_QUANTIZE).
    recipe_default = not options.quantize and "hf-checkpoint" not in options.emit
    quantize = options.quantize or (
        default_quantize(target, "decoder") if recipe_default else "none"
    )

    def make_plan(quantize: str) -> Plan:
        _check_emit(options.emit, quantize)
        return plan_pipeline(
            target=target,
            backend=backend,
            passes=options.passes,
            quantize=quantize,
            max_ppl_increase=options.max_ppl_increase,
            calibration=options.calibration,
            emit=options.emit,
            keep_fp=options.keep_fp,
            kv_dtype=options.kv_dtype,
            kv_window=options.kv_window,
            kv_sink=options.kv_sink,
            pass_options=options.pass_options,
            sparsity=options.sparsity,
        )

    plan = make_plan(quantize)
    if options.prune:
        parse_prune(options.prune)
    parse_draft(options.draft)

    source = resolve_source(
        options.model,
        trust_pickle=options.trust_pickle,
        cache_dir=options.cache_dir or default_cache_dir(),
        progress=progress,
    )
    if "genai" in options.emit and source.family.kind != "decoder":
        raise UsageError(
            f"--emit genai is for decoder builds; {options.model} is an {source.family.kind}",
            "drop --emit genai",
        )
    if recipe_default and source.family.kind != "decoder":
        quantize = default_quantize(target, source.family.kind)
        plan = make_plan(quantize)
    extras = list(_extras)  # steps adding files and report entries to the build
    if options.draft:
        extras.append(_draft_step(options, source, progress))
    if options.prune:  # the compile proper builds the pruned checkpoint (fdec.student)
        pruned = prune_source(options, source, target, progress, prune=options.prune)
        if options.distill_steps:
            distill_pruned(pruned, options.distill_steps, options, progress)

        def add_student(staging: pathlib.Path, report: dict[str, Any]) -> None:
            # file by file: a full disk raises the OSError (ENOSPC) AtomicBuild reports in one
            # line, where copytree would gather it into a shutil.Error without an errno
            for path in sorted(pruned.folder.rglob("*")):
                copy = staging / STUDENT_DIR / path.relative_to(pruned.folder)
                copy.parent.mkdir(parents=True, exist_ok=True)
                if path.is_file():
                    shutil.copyfile(path, copy)
            report["prune"] = {**pruned.report, "directory": STUDENT_DIR}
            # The pruned checkpoint's temporary folder is gone once the build is written.
            report["source"].update(
                given=f"{source.given} --prune {options.prune}", folder=STUDENT_DIR,
                pruned_from=source.given,
            )  # fmt: skip

        try:
            return compile_model(
                dataclasses.replace(
                    options, model=str(pruned.folder), prune=None, draft=None, distill_steps=0
                ),
                progress,
                _extras=[*extras, add_student],
            )
        finally:
            pruned.cleanup()
    # Capacity from config.json alone: a --max-batch × --max-seq-len that cannot fit the
    # target's memory fails here (exit 4, CapacityError), before the model loads.
    capacity = check_capacity(
        source.config,
        target,
        model=source.given,
        weights=quantize,
        kv_dtype=getattr(options, "kv_dtype", None),
        batch=limits.max_batch,
        context=options.max_seq_len,
        default_context=DEFAULT_MAX_SEQ_LEN,
    )
    pipeline, pass_names, tolerance, optimization = (
        plan.pipeline,
        plan.pass_names,
        plan.tolerance,
        plan.optimization,
    )
    recipe = {
        "quantize": quantize,
        "chosen_by": f"target {target.name} default" if recipe_default else "options",
    }
    progress(f"recipe: --quantize {quantize} ({recipe['chosen_by']})")
    # The cache (fdec.cache) serves the export, the reference and the longest cached prefix
    # of the pipeline; PyTorch loads the model only for what it must compute.
    front = _CompileCache(options, source, plan, progress)
    fdec_model, cached_records = front.resume()
    if fdec_model is None:
        progress(f"loading {source.given} ({source.family.name}, {source.kind})")
        fdec_model = front.export()
    else:
        progress(f"passes 1-{front.resumed} of {len(pipeline)} taken from the cache")
    spec = fdec_model.spec
    if target.is_gpu and backend != "onnxruntime":
        if options.max_seq_len is None and spec.max_positions:
            limits = dataclasses.replace(
                limits, max_seq_len=min(DEFAULT_MAX_SEQ_LEN, spec.max_positions)
            )
        limits.check_against(spec)
    reference = front.reference(spec)
    front.release_hf_model()
    to_run = pipeline[front.resumed :]
    if any(index >= front.resumed for index in plan.calibrating):
        progress("tokenizing calibration text")
        plan.attach_calibration(front.tokenizer(), spec.vocab_size)
        to_run = plan.pipeline[front.resumed :]

    # Every pass starts from the graph's names as a saved and reloaded model has them, so a
    # pass resumed on a cached model names new nodes exactly as it does in a cold compile.
    instruments: list[Any] = [_FreshNames()]
    if options.verify_each:
        instruments.append(StructureCheckInstrument(full=True))
        instruments.append(
            NumericCheckInstrument(
                lambda model: reference.compare(session_for_model(model, optimization=optimization))
            )
        )
    if options.dump_dir:
        instruments.append(DumpInstrument(options.dump_dir))
    snapshot = _LossySnapshot()
    if tolerance.max_perplexity_increase is not None and spec.kind == "decoder":
        instruments.append(snapshot)
        lossy = [i for i, p in enumerate(pipeline[: front.resumed]) if p.tolerance != EXACT]
        if lossy:  # the first lossy pass came from the cache: its input model is there too
            snapshot.from_cache(pipeline[lossy[0]], front.input_model_of(lossy[0]))
    store = front.instrument()
    if store is not None:  # after the structure check: a broken model is never stored
        instruments += [StructureCheckInstrument(), store]
    manager = PassManager(
        to_run,
        instruments,
        target=target,
        on_pass=lambda i, n, p: progress(f"pass {front.resumed + i}/{len(pipeline)}: {p.name}"),
    )
    cache_dir = options.cache_dir or default_cache_dir()
    with calibration_cache(cache_dir / "calibration" if options.cache else None) as stats_cache:
        fdec_model, records = manager.run(fdec_model)
    for record in records:
        record.index += front.resumed
    records = cached_records + records
    front.cache.finish()

    with AtomicBuild(out, force=options.force, keep=keep) as staging:
        progress(f"writing the ONNX Runtime build to {out}")
        lower_onnxruntime(
            fdec_model,
            staging,
            source_folder=source.folder,
            target=target,
            optimization=optimization,
        )
        counts = records[-1].after if records else fdec_model.counts()
        gathered_bytes = _gathered_bytes(fdec_model)
        if "genai" in options.emit:  # onnxruntime-genai's generator config (fdec.lower.genai)
            write_genai_config(staging, fdec_model.spec)
        checkpoint = None
        if "hf-checkpoint" in options.emit:
            progress("writing the serving checkpoint (safetensors + quantization config)")
            checkpoint = write_hf_checkpoint(fdec_model, source.folder, staging / CHECKPOINT_DIR)
            checkpoint["directory"] = CHECKPOINT_DIR  # relative: the build moves into place
        # What is verified is the build as written: drop the in-memory graph first, so the
        # verifying session holds the only copy of the weights (peak RSS; issue 9).
        fdec_model = None
        release_freed_memory()
        progress("verifying the build against the source model")
        # Without prepacking the verifying session reads the weights from the mapped file
        # instead of holding a packed copy (peak RSS; issue 9).
        session = OrtModel(
            open_session(staging / MODEL_FILE, optimization=optimization, prepack=False)
        )
        verification = _verify(reference, session, tolerance)
        if verification.get("gate"):
            raise _quality_gate_error(
                verification, tolerance, records, snapshot, plan, front, progress
            )
        if not verification["ok"]:
            raise VerificationError(verification["failure"], _VERIFICATION_FIX)
        snapshot.close()
        # Engines build from their own strongly typed model (engines/tensorrt/model.onnx),
        # checked against the same reference (fdec.lower.engines / tensorrt_model).
        engines = build_engines(
            staging, spec=spec, target=target, backend=backend, limits=limits,
            reference=reference, tolerance=tolerance, progress=progress,
        )  # fmt: skip
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
            "recipe": recipe,
            "calibration_cache": stats_cache.to_dict()
            if stats_cache is not None and stats_cache.hits + stats_cache.misses
            else None,
            "export": front.export_info,
            "passes": _pass_rows(records, front.resumed),
            "cache": front.to_dict(),
            "verification": verification,
            "engines": engines,
            "checkpoint": checkpoint,
            "capacity": capacity.to_dict(),
            "kv_cache": json.loads((staging / RUNTIME_CONFIG).read_text()).get("kv_cache"),
            "estimate": estimate(
                spec,
                target,
                weight_bytes=counts.bytes,
                parameters=counts.parameters,
                gathered_bytes=gathered_bytes,
            ),
            "wall_s": round(time.perf_counter() - started, 2),
        }
        for extra in extras:
            extra(staging, report)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        (staging / HTML_FILE).write_text(render_html(report))  # hashed in the manifest below
        manifest = write_manifest(
            staging,
            {
                "schema_version": SCHEMA_VERSION,
                # Everything the build was made from: the same inputs, options and versions
                # give the same model files (fdec verify re-hashes the outputs below).
                "inputs": {
                    "model": report["source"]["given"],
                    "config_sha256": _config_digest(source.folder),
                    "files": front.inputs,
                    "calibration": front.calibration,
                },
                "target": target.name,
                "pipeline": pass_names,
                "passes": [{"name": r.name, "options": r.options} for r in records],
                "options": {
                    "verify_each": options.verify_each,
                    "backend": backend,
                    "quantize": quantize,
                    "limits": dataclasses.asdict(limits),
                    "max_ppl_increase": options.max_ppl_increase,
                    "keep_fp": options.keep_fp,
                    "emit": list(options.emit),
                    "sparsity": options.sparsity,
                    "draft": options.draft,
                },
                "packages": report["environment"]["packages"],
                "versions": front.versions,
                "cache_keys": {"export": front.export_key, "passes": front.pass_keys},
            },
        )
        report["outputs"] = json.loads(manifest.read_text())["outputs"]
    return CompileResult(out, report)


_BACKENDS = ("onnxruntime", "tensorrt", "tensorrt-rtx")
# Methods each precision has today; precisions not listed are checked against the target and
# then refused as not built yet.
_QUANTIZE_METHODS = {
    "int4": ("rtn", "awq", "awq-mixed"),
    "int8": ("dynamic", "smoothquant"),
    "fp8": ("static",),
    "fp32": ("none",),
}
# Units --quantize int4-awq-mixed keeps in 8 bits (the most sensitive, measured per build).
# SmolLM2-135M (quality.py, 128 held tokens, fp32 54.05): keep 8 (lm_head + 7 layers) 113.6 MB
# 0.21x, -0.9 %; keep 4 (lm_head, layers 11, 29, 2) 106.2 MB 0.197x, +7.1 %; int4-awq alone
# 87.2 MB 0.16x, +17.0 %. 4 is the most that keeps a tied-embedding model within 0.20x.
INT4_MIXED_KEEP = 4
# The lm_head (and a tied table shared with it) of int4 recipes in 8 bits: SmolLM2 int4-awq
# +17.5 % → +7.3 % perplexity at 86.8 → 100.9 MB (benchmarks/quality.py; docs/design-notes.md).
INT4_LM_HEAD_BITS = 8
# SmoothQuant migration strength fdec uses: on SmolLM2-135M, alpha 0.75-0.85 kept perplexity
# within +1-4 % (54.0 -> 53.5-56.3) where the paper's 0.5 gave +25 % (67.7).
SMOOTHQUANT_ALPHA = 0.8
# The same before dynamic int8 (CPU): SmolLM2-135M, tied table, 128 held tokens / 2,044 other
# tokens: alpha 0.7 +5.3 % / +5.2 %, 0.75 +3.2 % / +3.7 %, 0.8 +4.6 % / +6.8 %; none +55.7 %.
INT8_DYNAMIC_ALPHA = 0.75
# FP8 weight rounding ("nearest" or "gptq": error-compensating, on calibration activations).
FP8_WEIGHT_ROUNDING = "gptq"
# Quality gate of a lossy build when the user sets none: catches broken quantization (DESIGN.md
# measured +6e7 perplexity for an overflowing int8 kernel) while admitting the 25-70 % growth
# weight-only 4-bit and dynamic int8 give a 135M model. Tighten with --max-ppl-increase.
DEFAULT_MAX_PPL_INCREASE = 1.0


# --quantize values that mean "no quantization" (weights stay in the exported fp32).
_NO_QUANTIZATION = ("none", "fp32", "fp32-none")


def default_quantize(target: Any, kind: str) -> str:
    """The `--quantize` value a compile uses when none is given: the target's
    `[default_recipe]` weights (its `encoder_weights` for encoders); "none" for float weights,
    which fdec keeps in the exported fp32 (fp16/bf16 conversion is the engine builder's)."""
    recipe = target.default_recipe
    weights = recipe.get("encoder_weights", recipe["weights"]) if kind == "encoder" else None
    weights = weights or recipe["weights"]
    return "none" if weights.split("-", 1)[0] in ("fp32", "fp16", "bf16", "tf32") else weights


def _quantize_passes(
    asked: str | None,
    target: Any,
    backend: str,
    earlier: list[str],
    *,
    embedding: bool = True,
    keep_fp: int | None = None,
) -> list[Any]:
    """Passes for `--quantize PRECISION[-METHOD]`, after checking the target has the precision."""
    if not asked or asked.lower() in _NO_QUANTIZATION:
        if keep_fp is not None:
            raise UsageError(
                "--keep-fp needs a quantized build", "add --quantize int4, or drop --keep-fp"
            )
        return []
    precision_text, _, method = asked.lower().partition("-")
    precision = Precision.parse(precision_text)
    target.require(precision)  # e.g. FP8 on an a100: fails here, before any work
    methods = _QUANTIZE_METHODS.get(precision.value)
    if methods is None:
        built = ", ".join(f"{p}-{m[0]}" for p, m in _QUANTIZE_METHODS.items() if p != "fp32")
        raise UsageError(
            f"--quantize {asked}: {target.name} supports {precision.label}, but fdec has no "
            f"{precision.label} quantization pass yet",
            f"use one of: {built}",
        )
    if method and method not in methods:
        raise UsageError(
            f"--quantize {asked}: unknown method {method!r} for {precision.value}",
            f"methods for {precision.value}: {', '.join(methods)}",
        )
    if precision.value == "fp32":
        return []
    pass_backend = "onnxruntime" if backend == "onnxruntime" else "tensorrt"
    # int4 for ONNX Runtime keeps a tied embedding tied: the lm_head's MatMulNBits and the
    # embedding's GatherBlockQuantized read one packed int4 table (SmolLM2: 84 MB instead of
    # 113 MB with an untied int4 lm_head and an int8 embedding).
    # Dynamic int8 (the CPU's int8) does the same with one int8 table (SmolLM2: 140 MB, 0.26x).
    static_int8 = method == "smoothquant" or (not method and target.is_gpu)
    dynamic_int8 = precision.value == "int8" and not static_int8 and keep_fp is None
    share = (
        (precision.value in ("int4", "fp8") or dynamic_int8)
        and pass_backend == "onnxruntime"
        and embedding
    )
    untie = (
        []
        if share or "untie-embeddings" in earlier
        else [fdec_passes.make_pass("untie-embeddings")]
    )
    # The token embedding is the largest fp32 tensor left after weight quantization (113 MB of
    # SmolLM2's 202 MB int4 build); per-row int8 moved its perplexity by -0.1 % there. A table
    # the int4 pass shared (or a tied one quantize-mixed kept in float) is left as it is.
    embed_pass = fdec_passes.make_pass(
        "quantize-embedding", bits=8, backend=pass_backend, skip_shared=share
    )
    int4_options: dict[str, Any] = {"backend": pass_backend, "share_tied_embedding": share}
    if keep_fp is not None and not (precision.value == "int4" or method == "dynamic"):
        raise UsageError(
            f"--keep-fp works with --quantize int4 or int8-dynamic, not {asked}",
            "drop --keep-fp, or quantize weights only (int4)",
        )
    if precision.value == "int4" and (keep_fp is not None or method == "awq-mixed"):
        # awq-mixed: the most sensitive layers (measured) in 8-bit weight-only, the rest AWQ
        # int4; --keep-fp N alone keeps N layers in fp32 instead.
        weights = fdec_passes.make_pass(
            "quantize-mixed",
            method="int4-awq" if method.startswith("awq") else "int4",
            quantizer_options=int4_options,
            keep_fp=INT4_MIXED_KEEP if keep_fp is None else keep_fp,
            keep_bits=8 if method == "awq-mixed" else None,
            sensitivity_method="int4" if method == "awq-mixed" else None,
        )
    elif keep_fp is not None:
        weights = fdec_passes.make_pass(
            "quantize-mixed",
            method="int8",
            quantizer_options={"alpha": INT8_DYNAMIC_ALPHA},
            keep_fp=keep_fp,
        )
    elif precision.value == "int4":
        name = "quantize-int4-awq" if method == "awq" else "quantize-int4"
        # TensorRT(-RTX) takes blocked DequantizeLinear of INT4 only: its lm_head stays 4-bit.
        head_bits = INT4_LM_HEAD_BITS if pass_backend == "onnxruntime" else None
        weights = fdec_passes.make_pass(name, lm_head_bits=head_bits, **int4_options)
    elif precision.value == "fp8":
        # GPTQ rounding and one shared fp8 table (tied embedding = lm_head): SmolLM2 +11.5 %
        # at 0.31x with nearest rounding and two tables (docs/design-notes.md).
        weights = fdec_passes.make_pass(
            "quantize-fp8", share_tied_embedding=share, weight_rounding=FP8_WEIGHT_ROUNDING
        )
    # int8: static SmoothQuant QDQ for GPUs (or when asked), dynamic on the CPU.
    elif static_int8:
        weights = fdec_passes.make_pass("quantize-int8-static", alpha=SMOOTHQUANT_ALPHA)
    else:
        # SmoothQuant before the run-time per-tensor activation scales (calibrated).
        weights = fdec_passes.make_pass(
            "quantize-int8", alpha=INT8_DYNAMIC_ALPHA, share_tied_embedding=share
        )
    # A serving checkpoint keeps the embedding in float: its loaders quantize Linear layers only.
    return [*untie, weights, embed_pass] if embedding else [*untie, weights]


DEFAULT_MAX_SEQ_LEN = 2048
_VERIFICATION_FIX = (
    "the build was not written; rerun with --verify-each to find the pass that broke it"
)
EMITS = ("hf-checkpoint", "genai")


def _check_emit(emit: tuple[str, ...], quantize: str | None) -> None:
    for item in emit:
        if item not in EMITS:
            raise UsageError(f"unknown --emit {item!r}", f"use one of: {', '.join(EMITS)}")
    if "hf-checkpoint" in emit:
        check_quantize(quantize)


def _build_tolerance(pipeline: list[Any], max_ppl_increase: float | None) -> Tolerance:
    """The whole build's gate: exact for fp32 pipelines, else the loosest pass tolerance plus a
    perplexity bound, without requiring identical greedy tokens."""
    lossy = [p.tolerance for p in pipeline if p.tolerance != EXACT]
    if not lossy:
        if max_ppl_increase is not None:
            return dataclasses.replace(FP32_TOLERANCE, max_perplexity_increase=max_ppl_increase)
        return FP32_TOLERANCE
    gate = default_gate(pipeline)  # a measured recipe's gate (fdec.gates), else the generic one
    return GateTolerance(
        max_abs_error=gate.max_logit_error if gate else max(t.max_abs_error for t in lossy),
        min_top1_agreement=(
            gate.min_top1_agreement if gate else min(t.min_top1_agreement for t in lossy)
        ),
        max_perplexity_increase=max_ppl_increase
        if max_ppl_increase is not None
        else (gate.max_ppl_increase if gate else DEFAULT_MAX_PPL_INCREASE),
        greedy_identical=False,
        source=gate.source() if gate else "generic gate (no measured recipe: fdec.gates)",
    )


@dataclasses.dataclass
class Plan:
    """The passes a compile runs, the gate its build must meet, and how ORT runs it."""

    pipeline: list[Any]
    tolerance: Tolerance
    optimization: str  # ORT graph optimization the build is verified and run at
    calibration_texts: list[str] | None

    @property
    def pass_names(self) -> list[str]:
        return [p.name for p in self.pipeline]

    @property
    def calibrating(self) -> list[int]:
        return [i for i, p in enumerate(self.pipeline) if getattr(p, "needs_calibration", False)]

    def attach_calibration(self, tokenizer: Any, vocab_size: int) -> None:
        """Give every calibrating pass the tokenized calibration batches."""
        batches = tuple(calibration_batches(self.calibration_texts or [], tokenizer, vocab_size))
        for index in self.calibrating:
            self.pipeline[index] = dataclasses.replace(self.pipeline[index], batches=batches)


# Quantizers whose graphs fuse-attention is not yet verified on: no fusion by default.
_UNFUSED_QUANTIZERS = ("quantize-int8", "quantize-fp8", "quantize-int8-static")


def plan_pipeline(
    *,
    target: Any,
    backend: str,
    passes: str | None = None,
    quantize: str | None = None,
    max_ppl_increase: float | None = None,
    calibration: pathlib.Path | None = None,
    emit: tuple[str, ...] = (),
    keep_fp: int | None = None,
    kv_dtype: str | None = None,
    kv_window: int | None = None,
    kv_sink: int | None = None,
    pass_options: Mapping[str, Mapping[str, Any]] | None = None,
    sparsity: str | None = None,
) -> Plan:
    """Everything about the pipeline that can be decided (and refused) before loading a model.

    `pass_options` ({pass name: {option: value}}, the config file's [pass_options.NAME]) set
    options of passes the pipeline has; naming a pass it does not have is an error."""
    names = fdec_passes.parse_pass_list(passes)
    # --sparsity masks fp32 weights before any quantizer (symmetric codes keep the zeros).
    pipeline = (
        fdec_passes.make_pipeline(names)
        + _sparsity_passes(sparsity, names)
        + _quantize_passes(
            quantize, target, backend, names, embedding="hf-checkpoint" not in emit, keep_fp=keep_fp
        )
    )
    kv_passes = _kv_cache_passes(kv_dtype, kv_window, kv_sink)
    # fuse-attention runs last by default (after quantization: the quantizers and AWQ's norm
    # folding see the traced graph), for ONNX Runtime builds of fp32/int4 weights; a
    # --passes list places it where the user put it. The pass refuses other backends.
    pipeline = [
        dataclasses.replace(p, backend=backend) if p.name == "fuse-attention" else p
        for p in pipeline
    ]
    if any(p.name == "sparsify-2of4" for p in pipeline):
        # GPTQ's error feedback refills masked zeros (tested): FP8 rounds to nearest after 2:4.
        pipeline = [
            dataclasses.replace(p, weight_rounding="nearest") if p.name == "quantize-fp8" else p
            for p in pipeline
        ]
    if (
        passes is None
        and backend == "onnxruntime"
        and "hf-checkpoint" not in emit
        and not any(p.name in _UNFUSED_QUANTIZERS for p in pipeline)
        and not kv_sink  # GroupQueryAttention has no attention sinks: keep the plain graph
    ):
        pipeline.append(fdec_passes.make_pass("fuse-attention", backend=backend))
        # then q/k/v into one projection per layer (onnxruntime-genai's packed QKV)
        pipeline.append(fdec_passes.make_pass("pack-qkv"))
    # KV-cache passes go last: they rewrite the cache I/O of the final (possibly fused) graph.
    pipeline += kv_passes
    pipeline = _with_pass_options(pipeline, pass_options or {})
    PassManager(pipeline, target=target).check_requirements()
    needs = any(getattr(p, "needs_calibration", False) for p in pipeline)
    # ONNX Runtime runs FP8/INT8 QDQ graphs on the CPU only at optimization BASIC (DESIGN.md).
    qdq = any(p.name in ("quantize-fp8", "quantize-int8-static") for p in pipeline) or any(
        p.name == "quantize-kv-cache" and p.dtype == "fp8" for p in pipeline
    )
    return Plan(
        pipeline=pipeline,
        tolerance=_build_tolerance(pipeline, max_ppl_increase),
        optimization="basic" if qdq else "all",
        calibration_texts=load_calibration_texts(calibration) if needs else None,
    )


def _with_pass_options(
    pipeline: list[Any], pass_options: Mapping[str, Mapping[str, Any]]
) -> list[Any]:
    """The pipeline with each named pass rebuilt with its extra options (checked again by the
    pass's own __post_init__)."""
    names = [p.name for p in pipeline]
    for name in pass_options:
        if name not in names:
            near = difflib.get_close_matches(name, names, n=1)
            raise UsageError(
                f"pass_options names {name!r}, which this build's pipeline does not run",
                (f"did you mean {near[0]!r}? " if near else "") + f"its passes: {', '.join(names)}",
            )
    rebuilt = []
    for pass_ in pipeline:
        options = dict(pass_options.get(pass_.name, {}))
        if options:
            fields = {f.name for f in dataclasses.fields(pass_) if f.init}
            for option in options:
                if option not in fields:
                    near = difflib.get_close_matches(option, sorted(fields), n=1)
                    raise UsageError(
                        f"pass {pass_.name} has no option {option!r}",
                        (f"did you mean {near[0]!r}? " if near else "")
                        + f"its options: {', '.join(sorted(fields))} (fdec passes)",
                    )
            try:
                pass_ = dataclasses.replace(pass_, **options)
            except (TypeError, ValueError) as err:
                raise UsageError(
                    f"bad options for pass {pass_.name}: {err}", "see `fdec passes`"
                ) from None
        rebuilt.append(pass_)
    return rebuilt


_SPARSITY = ("none", "2:4")


def _sparsity_passes(sparsity: str | None, earlier: list[str]) -> list[Any]:
    """sparsify-2of4 for --sparsity 2:4 (unless --passes already runs it)."""
    if sparsity is None or sparsity == "none":
        return []
    if sparsity not in _SPARSITY:
        raise UsageError(f"unknown --sparsity {sparsity!r}", "use 2:4 (or none)")
    if "sparsify-2of4" in earlier:
        return []
    # Scores |w| · ‖x_k‖ on the calibration text (Wanda): SmolLM2-135M (MLP, 128 held tokens,
    # fp32 54.05) 165.1 (+205 %) where plain |w| gave 902.6; with skip_first=skip_last=2 98.9
    # (+83 %) against 156.6 (docs/design-notes.md). score=magnitude needs no data.
    return [fdec_passes.make_pass("sparsify-2of4", score="activation")]


_KV_DTYPES = ("fp32", "fp16", "int8", "fp8")


def _kv_cache_passes(kv_dtype: str | None, kv_window: int | None, kv_sink: int | None) -> list[Any]:
    """quantize-kv-cache for --kv-dtype int8/fp8, kv-policy for --kv-window/--kv-sink."""
    if kv_dtype is not None and kv_dtype not in _KV_DTYPES:
        raise UsageError(f"unknown --kv-dtype {kv_dtype!r}", f"use one of: {', '.join(_KV_DTYPES)}")
    if kv_sink and not kv_window:
        raise UsageError("--kv-sink needs --kv-window", "add --kv-window W (positions kept)")
    passes = []
    # fp16: a Cast at the cache I/O of the fp32 graph; fp32 (or none): the graph's own cache.
    if kv_dtype in ("fp16", "int8", "fp8"):
        passes.append(fdec_passes.make_pass("quantize-kv-cache", dtype=kv_dtype))
    if kv_window:
        passes.append(fdec_passes.make_pass("kv-policy", window=kv_window, sink=kv_sink or 0))
    return passes


def choose_backend(asked: str | None, target: Any) -> str:
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


def _verify(reference: Reference, session: OrtModel, tolerance: Tolerance) -> dict[str, Any]:
    numeric = reference.compare(session)
    result: dict[str, Any] = {
        "numeric": numeric,
        "tolerance": tolerance.to_dict(),
        "providers": session.providers,
        "reference": "PyTorch (transformers), fp32, CPU",
        "held_text": "tokenizer" if reference.used_tokenizer else "synthetic token ids",
    }
    broken = tolerance.judge(numeric)
    failure = f"build differs from the source model: {broken}" if broken else None
    if broken and not tolerance.greedy_identical:  # a lossy build missed its gate: exit 3
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
    result["ok"] = failure is None
    if failure:
        result["failure"] = failure
    return result


class _LossySnapshot:
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

    def after(self, pass_: Any, result: Any, record: Any) -> None:
        pass

    def close(self) -> None:
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


# Options through which a weight quantizer holds calibration data (not re-used when measuring).
_DATA_OPTIONS = ("batches", "stats", "activations")
# How many of the most sensitive layers a failed gate names.
_WORST_SHOWN = 3


def _sensitivity(
    records: list[Any], snapshot: _LossySnapshot, plan: Plan, front: Any, progress: Any
) -> list[dict[str, Any]]:
    """Per-layer sensitivity (largest KL first) of the build's weight quantizer: the table a
    quantize-mixed pass recorded, else measured now on the snapshot taken before that pass."""
    for record in records:
        if record.name == "quantize-mixed" and record.stats.get("sensitivity"):
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
        if field.init and field.name not in _DATA_OPTIONS
    }
    batches = getattr(quantizer, "batches", None) or tuple(
        calibration_batches(
            plan.calibration_texts or load_calibration_texts(None),
            front.tokenizer(),
            model.spec.vocab_size,
        )
    )
    mixed = fdec_passes.make_pass(
        "quantize-mixed", method=quantizer.name, quantizer_options=options, batches=batches,
        max_batches=2,
    )  # fmt: skip
    progress("quality gate failed: measuring each layer's sensitivity to name the worst")
    return list(mixed(model).stats.get("sensitivity", []))


def _quality_gate_error(
    verification: dict[str, Any],
    tolerance: Tolerance,
    records: list[Any],
    snapshot: _LossySnapshot,
    plan: Plan,
    front: Any,
    progress: Any,
) -> QualityGateError:
    numeric = verification["numeric"]
    source, build = numeric["perplexity_source"], numeric["perplexity_build"]
    limit = tolerance.max_perplexity_increase
    try:
        sensitivity = _sensitivity(records, snapshot, plan, front, progress)
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
    if "sparsify-2of4" in plan.pass_names:  # 2:4 masks are lossy too (docs/design-notes.md)
        fix = (
            "drop --sparsity, keep end layers dense (--pass-options sparsify-2of4.skip_first=2 "
            "--pass-options sparsify-2of4.skip_last=2), or " + fix
        )
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


# --- the cached front of a compile: export, reference and pass results (fdec.cache) -----------


def _pass_rows(records: list[PassRecord], cached: int) -> list[dict[str, Any]]:
    """The report's pass table: the first `cached` passes came from the cache (no time spent
    now; `cached_wall_s` is what they took when they ran)."""
    rows = []
    for number, record in enumerate(records):
        row = {**record.to_dict(), "cached": number < cached}
        if row["cached"]:
            row["cached_wall_s"], row["wall_s"] = row["wall_s"], 0.0
        rows.append(row)
    return rows


def _record_from_dict(data: dict[str, Any]) -> PassRecord:
    data = dict(data)
    for side in ("before", "after"):
        if data.get(side) is not None:
            data[side] = GraphCounts(**data[side])
    return PassRecord(**data)


class _CompileCache:
    """Everything before lowering that fdec's cache can serve: the export (ONNX + ModelSpec),
    the PyTorch reference outputs, and each pass's output model and record.

    Pass keys form a chain: key_i = digest(key_{i-1}, pass name, options, calibration text
    digest for calibrating passes, versions), key_0 the export's, so a compile resumes from the
    longest cached prefix and a changed option re-runs that pass and the ones after it. A pass
    that did not modify the model stores only its record, pointing at the previous model. The
    PyTorch model is loaded only when the export or the reference must be computed.
    """

    def __init__(self, options: CompileOptions, source: Any, plan: Plan, progress: Any):
        self.options, self.source, self.plan, self.progress = options, source, plan, progress
        self.cache = Cache(
            options.cache_dir or default_cache_dir(), enabled=options.cache, progress=progress
        )
        self.pass_caching = options.cache and not options.verify_each and not options.dump_dir
        self.versions = tool_versions()
        self.inputs = source_inputs(source, self.cache.index)
        self.calibration = _calibration_inputs(options.calibration, plan.calibration_texts)
        loading = {"trust_remote_code": options.trust_remote_code, "kind": source.family.kind}
        self.export_key = digest_of(
            "export", inputs=self.inputs, family=source.family.name, loading=loading,
            versions=self.versions,
        )  # fmt: skip
        self.reference_key = digest_of(
            "reference", inputs=self.inputs, loading=loading, versions=self.versions
        )
        self.pass_keys: list[str] = []
        previous = self.export_key
        for index, pass_ in enumerate(plan.pipeline):
            previous = digest_of(
                "pass",
                previous=previous,
                name=pass_.name,
                cls=f"{type(pass_).__module__}.{type(pass_).__qualname__}",
                options=fingerprint(pass_),
                calibration=self.calibration["sha256"] if index in plan.calibrating else None,
                versions=self.versions,
            )
            self.pass_keys.append(previous)
        self._hf_model: Any = None
        self._tokenizer: Any = _UNSET
        self.export_info: dict[str, Any] = {"exporter": "torch.onnx (dynamo)"}
        self.reference_cached = False
        self.resumed = 0  # passes taken from the cache
        self.model_key: str | None = None  # the model entry holding the current model

    # --- lazily loaded source pieces ---

    def hf_model(self) -> Any:
        if self._hf_model is None:
            self.progress(f"loading {self.source.given} with PyTorch")
            self._hf_model = load_hf_model(
                self.source, trust_remote_code=self.options.trust_remote_code
            )
        return self._hf_model

    def release_hf_model(self) -> None:
        """Drop the PyTorch model once the export and the reference exist: nothing later needs
        it, and the ONNX Runtime session that verifies the build would otherwise open while
        PyTorch's copy of the weights is still held (measured: peak RSS 2.18x fp32 on a
        1.1B-parameter model, the peak at that session's load)."""
        if self._hf_model is not None:
            self._hf_model = None
            release_freed_memory()

    def tokenizer(self) -> Any:
        if self._tokenizer is _UNSET:
            self._tokenizer = (
                load_tokenizer(self.source.folder) if self.source.has_tokenizer else None
            )
        return self._tokenizer

    # --- model entries ---

    def load_model(self, key: str | None) -> FdecModel | None:
        """The model stored under `key` (checked, read into memory), or None."""
        if key is None:
            return None
        entry = self.cache.get(key, "model")
        if entry is None:
            return None
        import onnx_ir as ir

        model = ir.load(entry.path / MODEL_FILE)
        # In memory: the entry may be evicted by another compile while this one runs.
        ir.external_data.load_to_model(model)
        spec = ModelSpec.from_dict(json.loads((entry.path / _SPEC_FILE).read_text()))
        return FdecModel(model, spec)

    def store_model(self, key: str, model: FdecModel, meta: dict[str, Any] | None = None) -> bool:
        def write(folder: pathlib.Path) -> None:
            model.save(folder / MODEL_FILE)
            # Not sorted: passes walk the spec's roles in order, so the order is part of it.
            (folder / _SPEC_FILE).write_text(json.dumps(model.spec.to_dict()))

        return self.cache.put(key, "model", write, meta)

    # --- the three cached steps ---

    def export(self) -> FdecModel:
        started = time.perf_counter()
        model = self.load_model(self.export_key)
        if model is not None:
            self.progress("ONNX export taken from the cache")
            self.export_info.update(cached=True, wall_s=round(time.perf_counter() - started, 2))
            self.model_key = self.export_key
            return model
        hf_model = self.hf_model()
        self.progress("exporting to ONNX (torch.onnx dynamo exporter)")
        started = time.perf_counter()
        imported = import_model(self.source, hf_model=hf_model)
        self.export_info.update(cached=False, wall_s=round(time.perf_counter() - started, 2))
        if self._tokenizer is _UNSET:
            self._tokenizer = imported.tokenizer
        if self.store_model(self.export_key, imported.fdec_model):
            self.model_key = self.export_key
        return imported.fdec_model

    def reference(self, spec: Any) -> Reference:
        entry = self.cache.get(self.reference_key, "reference")
        if entry is not None:
            self.progress("PyTorch reference outputs taken from the cache")
            self.reference_cached = True
            return Reference.load(entry.path / _REFERENCE_FILE)
        self.progress("computing the reference outputs with PyTorch")
        reference = Reference.from_hf(self.hf_model(), spec.kind, self.tokenizer(), spec.vocab_size)
        self.cache.put(
            self.reference_key, "reference", lambda folder: reference.save(folder / _REFERENCE_FILE)
        )
        return reference

    def resume(self) -> tuple[FdecModel | None, list[PassRecord]]:
        """The model after the longest cached prefix of the pipeline and that prefix's records
        (None, [] when no pass is cached)."""
        if not self.pass_caching:
            return None, []
        present = 0
        while present < len(self.pass_keys) and self.cache.exists(self.pass_keys[present]):
            present += 1
        while present > 0:
            entries = []
            for key in self.pass_keys[:present]:
                entry = self.cache.get(key, "pass")
                if entry is None:
                    break
                entries.append(entry)
            if len(entries) < present:  # a damaged record: resume before it
                present = len(entries)
                continue
            model = self.load_model(entries[-1].meta.get("model"))
            if model is None:
                present -= 1
                continue
            records = [
                _record_from_dict(json.loads((e.path / _RECORD_FILE).read_text())) for e in entries
            ]
            self.resumed, self.model_key = present, entries[-1].meta["model"]
            self.export_info.update(cached=True, wall_s=0.0)  # the chain starts from it
            self._entries = entries
            return model, records
        return None, []

    def input_model_of(self, index: int) -> Callable[[], FdecModel | None]:
        """A loader of the model entering pass `index` (0-based) of a resumed prefix."""
        key = self._entries[index - 1].meta.get("model") if index else self.export_key
        return lambda: self.load_model(key)

    def instrument(self) -> Any:
        """An instrument storing each pass's output (when modified) and record as it runs."""
        return _StoreInstrument(self) if self.pass_caching else None

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.cache.to_dict(),
            "export": bool(self.export_info.get("cached")),
            "reference": self.reference_cached,
            "passes_cached": self.resumed,
            "passes": len(self.pass_keys),
            "pass_caching": self.pass_caching,
        }


class _FreshNames:
    """Resets the graph's name authority before each pass to what loading the saved model
    gives (onnx-ir numbers new nodes and values from counters that remember every name the
    graph ever had; a reloaded graph starts them at 0 and knows only its current names).
    Without it a pass run on a model from the cache names its new nodes differently from the
    same pass run on the in-memory model, and the build's bytes would depend on the cache."""

    def before(self, pass_: Any, model: FdecModel, record: PassRecord) -> None:
        from onnx_ir._name_authority import NameAuthority  # no public way to reset it

        graph = model.graph
        if not hasattr(graph, "_name_authority"):
            return
        authority = NameAuthority()
        for value in [*graph.inputs, *graph.initializers.values()]:
            authority.register_or_name_value(value)
        for node in graph:
            authority.register_or_name_node(node)
            for value in node.outputs:
                authority.register_or_name_value(value)
        graph._name_authority = authority

    def after(self, pass_: Any, result: Any, record: PassRecord) -> None:
        pass


class _StoreInstrument:
    """Stores a pass's output model (only when it modified it) and its record in the cache."""

    def __init__(self, front: _CompileCache):
        self.front = front

    def before(self, pass_: Any, model: FdecModel, record: PassRecord) -> None:
        pass

    def after(self, pass_: Any, result: Any, record: PassRecord) -> None:
        front = self.front
        key = front.pass_keys[front.resumed + record.index - 1]
        if result.modified:
            model_key = digest_of("model", pass_key=key)
            front.model_key = model_key if front.store_model(model_key, result.model) else None
        if front.model_key is None:
            return  # nothing to resume from: the record alone would be of no use
        data = {**record.to_dict(), "index": front.resumed + record.index}
        front.cache.put(
            key,
            "pass",
            lambda folder: (folder / _RECORD_FILE).write_text(json.dumps(data, sort_keys=True)),
            {"model": front.model_key},
        )


def _calibration_inputs(path: pathlib.Path | None, texts: list[str] | None) -> dict[str, Any]:
    """What the calibration data is, for keys and the manifest: the file (or the built-in
    corpus) and a sha256 of the texts read from it (None when nothing calibrates)."""
    if texts is None:
        return {"source": None, "sha256": None}
    digest = hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()
    return {"source": str(path) if path else "built-in corpus", "sha256": digest}


_UNSET = object()
_SPEC_FILE = "spec.json"
_RECORD_FILE = "record.json"
_REFERENCE_FILE = "reference.npz"


def _draft_step(
    options: CompileOptions, source: Any, progress: Callable[[str], None]
) -> Callable[[pathlib.Path, dict[str, Any]], None]:
    """The build step compiling `--draft`: the source with most layers pruned, into draft/."""
    layers = _config_layers(source.config)
    plan = parse_draft(options.draft, layers)
    prune = draft_prune(plan, layers)

    def build_draft(staging: pathlib.Path, report: dict[str, Any]) -> None:
        progress(f"building the draft ({options.draft}: --prune {prune})")
        draft = compile_model(
            dataclasses.replace(
                options,
                out=staging / DRAFT_DIR,
                prune=prune,
                draft=None,
                max_ppl_increase=None,
                distill_steps=plan.distill,
                quantize=plan.quantize or options.quantize,
            ),
            lambda message: progress(f"draft: {message}"),
        )
        report["draft"] = {
            "directory": DRAFT_DIR,
            "option": options.draft,
            "prune": prune,
            "layers": draft.report["spec"]["num_layers"],
            "accuracy": draft.report["prune"]["accuracy"],
            "distill": draft.report["prune"].get("distill"),
            "quantize": draft.report["recipe"]["quantize"],
            "verification_ok": draft.report["verification"]["ok"],
        }

    return build_draft


def _config_layers(config: Mapping[str, Any]) -> int:
    return int(config.get("num_hidden_layers") or config.get("n_layer") or 0)
