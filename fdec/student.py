"""Pruned students and drafts: `--prune` and `--draft` turn the source model into a smaller one
before the compile proper.

`prune_source` imports the source (export and PyTorch reference from the cache when there),
runs the cleanup passes and the `prune` pass (fdec.passes.prune, scored on the calibration
text) under the pass cache, measures what pruning did against the source (perplexity and
top-1 on held text), and writes the pruned model as a Hugging Face checkpoint with a
distillation recipe (`distill.json`: teacher, teacher→student layer map; see fdec.distill).
The compile then builds that checkpoint like any other model, so every later pass is checked
against the *pruned* model's own PyTorch reference, and the build carries the checkpoint
(`student/`) for `fdec distill`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import tempfile
from collections.abc import Callable
from typing import Any

from fdec import passes as fdec_passes
from fdec.calibrate import load_calibration_texts
from fdec.errors import UsageError
from fdec.passes.prune import parse_prune

__all__ = [
    "DRAFT_DIR",
    "STUDENT_DIR",
    "DraftPlan",
    "Pruned",
    "distill_pruned",
    "draft_prune",
    "parse_draft",
    "prune_source",
]

STUDENT_DIR = "student"
DRAFT_DIR = "draft"


@dataclasses.dataclass
class Pruned:
    """The pruned checkpoint (a temporary folder until the build copies it) and its report."""

    source: Any  # fdec.frontend.source.ModelSource of the checkpoint
    folder: pathlib.Path
    report: dict[str, Any]
    _tmp: tempfile.TemporaryDirectory

    def cleanup(self) -> None:
        self._tmp.cleanup()


@dataclasses.dataclass(frozen=True)
class DraftPlan:
    """`--draft layers=1/4[,distill=N][,quantize=R]`: layers kept, distillation steps, recipe."""

    layers: int  # kept; -1 until the model's layer count is known
    distill: int = 0
    quantize: str | None = None  # None: the main build's --quantize


_DRAFT_FIX = (
    "write --draft layers=1/4 (the share of layers the draft keeps, or layers=N), optionally "
    "with ,distill=STEPS and ,quantize=RECIPE"
)


def parse_draft(text: str | None, num_layers: int | None = None) -> DraftPlan | None:
    """The --draft value as a DraftPlan (None: no draft); `num_layers` resolves a share."""
    if not text:
        return None
    items = dict.fromkeys(("layers", "distill", "quantize"))
    for item in (part.strip() for part in text.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in items or items[key] is not None:
            raise UsageError(f"--draft {text!r}: {item!r} is not layers=, distill= or quantize=",
                             _DRAFT_FIX)  # fmt: skip
        items[key] = value.strip()
    if items["layers"] is None:
        raise UsageError(f"--draft {text!r} does not say how many layers to keep", _DRAFT_FIX)
    match = re.fullmatch(r"(\d+)\s*(?:/\s*(\d+))?", items["layers"])
    if not match:
        raise UsageError(f"--draft layers={items['layers']} is not a share or a count", _DRAFT_FIX)
    top, bottom = int(match.group(1)), match.group(2)
    if bottom is not None:
        if int(bottom) == 0 or not 0 < top < int(bottom):
            raise UsageError(f"--draft layers={top}/{bottom} is not a share below 1", _DRAFT_FIX)
        kept = -1 if num_layers is None else max(1, round(num_layers * top / int(bottom)))
    else:
        if top < 1 or (num_layers is not None and top >= num_layers):
            raise UsageError(
                f"--draft layers={top} must keep at least 1 layer and fewer than the model's "
                f"{num_layers}",
                _DRAFT_FIX,
            )
        kept = top
    steps = items["distill"] or "0"
    if not steps.isdigit():
        raise UsageError(f"--draft distill={steps} is not a number of steps", _DRAFT_FIX)
    return DraftPlan(kept, int(steps), items["quantize"] or None)


def draft_prune(plan: DraftPlan, num_layers: int) -> str:
    """The --prune value that leaves the draft's layers."""
    return f"layers={num_layers - plan.layers}"


def distill_pruned(
    pruned: Pruned, steps: int, options: Any, progress: Callable[[str], None]
) -> None:
    """Distill the pruned checkpoint against its teacher in place (fdec distill's recipe)."""
    from fdec.distill import distill

    out = pathlib.Path(pruned._tmp.name) / "distilled"
    progress(f"distilling the pruned model for {steps} steps (fdec distill)")
    result = distill(
        pruned.folder, steps=steps, out=out, cache_dir=options.cache_dir, progress=progress
    )
    pruned.folder = out
    pruned.report["distill"] = {
        k: v for k, v in result.to_dict().items() if k not in ("losses", "out", "recipe")
    }
    # the accuracy against the unpruned model is what the draft now has
    pruned.report["accuracy_before_distill"] = pruned.report["accuracy"]
    pruned.report["accuracy"] = {
        "perplexity_source": result.teacher_perplexity,
        "perplexity_build": result.after["perplexity"],
        "perplexity_increase": round(result.after["perplexity"] / result.teacher_perplexity - 1, 4),
        "kl_to_source": result.after.get("kl_to_teacher"),
        "held_tokens": result.held_tokens,
    }
    from fdec.frontend.source import resolve_source

    pruned.source = resolve_source(str(out), cache_dir=options.cache_dir)


def prune_source(
    options: Any,
    source: Any,
    target: Any,
    progress: Callable[[str], None],
    *,
    prune: str,
) -> Pruned:
    """Prune `source` as `prune` (the --prune syntax) says; see the module docstring."""
    from fdec.compile import Plan, _CompileCache, _FreshNames
    from fdec.distill import write_recipe
    from fdec.lower.hf_checkpoint import write_hf_checkpoint
    from fdec.pipeline import PassManager, StructureCheckInstrument
    from fdec.runtime import session_for_model

    if source.family.kind != "decoder":
        raise UsageError(
            f"--prune/--draft prune decoder LLMs; {source.given} is an {source.family.kind}",
            "drop --prune/--draft",
        )
    options = dataclasses.replace(options, verify_each=False, dump_dir=None)
    prune_pass = fdec_passes.make_pass("prune", **parse_prune(prune))
    pipeline = [*fdec_passes.make_pipeline(list(fdec_passes.DEFAULT_PIPELINE)), prune_pass]
    plan = Plan(
        pipeline=pipeline,
        tolerance=prune_pass.tolerance,
        optimization="all",
        calibration_texts=load_calibration_texts(options.calibration)
        if prune_pass.needs_calibration
        else None,
    )
    front = _CompileCache(options, source, plan, progress)
    model, records = front.resume()
    if model is None:
        progress(f"loading {source.given} to prune it")
        model = front.export()
    teacher_spec = dataclasses.replace(model.spec)
    reference = front.reference(model.spec)
    front.release_hf_model()
    if any(index >= front.resumed for index in plan.calibrating):
        progress("tokenizing calibration text for importance scores")
        plan.attach_calibration(front.tokenizer(), model.spec.vocab_size)
    instruments: list[Any] = [_FreshNames()]
    store = front.instrument()
    if store is not None:
        instruments += [StructureCheckInstrument(), store]
    manager = PassManager(
        plan.pipeline[front.resumed :],
        instruments,
        target=target,
        on_pass=lambda i, n, p: progress(
            f"prune stage {front.resumed + i}/{len(pipeline)}: {p.name}"
        ),
    )
    model, ran = manager.run(model)
    front.cache.finish()
    record = (records + ran)[-1]
    progress("measuring the pruned model against the source")
    figures = reference.compare(session_for_model(model))
    kept_layers = [
        i for i in range(teacher_spec.num_layers) if i not in record.stats.get("layers_removed", [])
    ]
    tmp = tempfile.TemporaryDirectory(prefix="fdec-student-")
    folder = pathlib.Path(tmp.name) / STUDENT_DIR
    progress("writing the pruned model as a Hugging Face checkpoint")
    checkpoint = write_hf_checkpoint(model, source.folder, folder)
    stats = {k: v for k, v in record.stats.items() if k != "importance"}
    write_recipe(
        folder,
        teacher=str(source.given),
        layer_map={new: old for new, old in enumerate(kept_layers)},
        pruned={"prune": prune, **stats},
    )
    report = {
        "prune": prune,
        "teacher": str(source.given),
        "stats": stats,
        "importance": record.stats.get("importance"),
        "accuracy": {
            key: figures.get(key)
            for key in ("perplexity_source", "perplexity_build", "top1_agreement", "max_abs_error")
        },
        "checkpoint_changes": checkpoint.get("config_changes", checkpoint.get("changes")),
        "cached": front.resumed == len(pipeline),
    }
    if figures.get("perplexity_source"):
        report["accuracy"]["perplexity_increase"] = round(
            figures["perplexity_build"] / figures["perplexity_source"] - 1.0, 4
        )
    del model
    from fdec.frontend.source import resolve_source

    pruned_source = resolve_source(str(folder), cache_dir=options.cache_dir)
    return Pruned(pruned_source, folder, report, tmp)
