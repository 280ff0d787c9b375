"""The prune stage: `--prune` turns the source model into a smaller checkpoint before the build.

`prune_model` imports the source (export and PyTorch reference from the cache when there),
runs the cleanup passes and the `prune` pass (fdec.passes.prune, scored on the calibration
text) under the pass cache, measures what pruning did against the source (perplexity and
top-1 on held text), and writes the pruned model as a Hugging Face checkpoint with a
distillation recipe (`distill.json`: teacher, teacher→student layer map; see fdec.distill).
The compile then builds that checkpoint like any other model, so every later pass is checked
against the *pruned* model's own PyTorch reference, and the build carries the checkpoint
(`student/`, `add_student`) for `fdec distill`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from fdec.compile.front import FreshNamesInstrument, Front
from fdec.compile.recipe import prune_recipe
from fdec.compile.write import Addition
from fdec.distill import write_recipe
from fdec.errors import UsageError
from fdec.frontend.families import prunable_model_types
from fdec.frontend.source import resolve_source
from fdec.lower.hf_checkpoint import write_hf_checkpoint
from fdec.pipeline import PassManager, StructureCheckInstrument
from fdec.runtime import session_for_model
from fdec.student import STUDENT_DIR, Pruned

__all__ = ["add_student", "check_prunable", "prune_model"]


def check_prunable(source: Any) -> None:
    """--prune/--draft refused before any work where the prune pass cannot slice the source:
    an encoder, or a family without llama-style layers (GPT-2 packs q/k/v into one weight and
    has no gate), which the pass's coupling check stopped after the export (with --draft,
    after the whole main build)."""
    family = source.family
    if family.kind != "decoder":
        raise UsageError(
            f"--prune/--draft prune decoder LLMs; {source.given} is an {family.kind}",
            "drop --prune/--draft",
        )
    if not family.prunable:
        raise UsageError(
            "--prune/--draft slice llama-style layers (their own q, k, v, o, gate, up and down "
            f"weights, norms before them); {source.given}'s "
            f"{source.config.get('model_type')} layers are not",
            f"drop --prune/--draft ({', '.join(prunable_model_types())} models prune)",
        )


def prune_model(
    options: Any,
    source: Any,
    target: Any,
    progress: Callable[[str], None],
    *,
    prune: str,
) -> Pruned:
    """Prune `source` as `prune` (the --prune syntax) says; see the module docstring."""
    check_prunable(source)
    options = dataclasses.replace(options, verify_each=False, dump_dir=None)
    recipe = prune_recipe(prune, options.calibration)
    pipeline = recipe.pipeline
    front = Front(options, source, recipe, progress)
    model, records = front.resume()
    if model is None:
        progress(f"loading {source.given} to prune it")
        model = front.export()
    teacher_spec = dataclasses.replace(model.spec)
    reference = front.reference(model.spec)
    front.release_hf_model()
    if any(index >= front.resumed for index in recipe.calibrating):
        progress("tokenizing calibration text for importance scores")
        recipe.attach_calibration(front.tokenizer(), model.spec)
    instruments: list[Any] = [FreshNamesInstrument()]
    store = front.instrument()
    if store is not None:
        instruments += [StructureCheckInstrument(), store]
    manager = PassManager(
        recipe.pipeline[front.resumed :],
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
    pruned_source = resolve_source(str(folder), cache_dir=options.cache_dir)
    return Pruned(pruned_source, folder, report, tmp)


def add_student(pruned: Pruned, source: Any, prune: str) -> Addition:
    """The build step copying the pruned checkpoint into the build's student/ and naming the
    unpruned source in the report."""

    def add(staging: pathlib.Path, report: dict[str, Any]) -> None:
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
            given=f"{source.given} --prune {prune}", folder=STUDENT_DIR, pruned_from=source.given
        )

    return add
