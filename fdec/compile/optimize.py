"""Optimize: run the recipe's passes on the exported model, resuming from the cache.

The pipeline runs under the instruments a compile asks for: fresh names before every pass (so
a pass names new nodes the same whether its input came from the cache or from memory),
--verify-each's structure and numeric checks, --dump-dir, the snapshot a failed quality gate
measures on, and the cache store. Calibration statistics are shared through fdec's
calibration cache.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from fdec.calibrate import calibration_cache, calibration_source
from fdec.calibrate_layerwise import LayerwiseCalibration, layerwise_kinds
from fdec.compile.front import FreshNamesInstrument, Front
from fdec.compile.gate import LossySnapshot
from fdec.compile.options import CompileOptions
from fdec.compile.recipe import Recipe
from fdec.frontend.source import default_cache_dir
from fdec.ir import FdecModel
from fdec.ir.spill import spill_initializers
from fdec.pipeline import (
    EXACT,
    DumpInstrument,
    Instrument,
    NumericCheckInstrument,
    PassManager,
    PassRecord,
    StructureCheckInstrument,
)
from fdec.runtime import session_for_model
from fdec.verify import Reference

__all__ = ["LayerwiseInstrument", "Optimized", "SpillInstrument", "run_passes"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Optimized:
    """The model after the pipeline, every pass's record (cached ones first), the snapshot
    taken before the first lossy pass, and the calibration cache's counts."""

    model: FdecModel | None
    records: list[PassRecord]
    snapshot: LossySnapshot
    calibration_cache: Any


class SpillInstrument(Instrument):
    """After each pass, spills the in-memory initializers it registered without
    `add_initializer` (a folded constant, an untied head) to the graph's weight spill."""

    def after(self, pass_: Any, result: Any, record: PassRecord) -> None:
        spilled = spill_initializers(result.model.graph)
        if spilled:
            logger.info("%s: %d new initializers spilled to disk", pass_.name, spilled)


def run_passes(
    options: CompileOptions,
    recipe: Recipe,
    front: Front,
    model: FdecModel,
    cached_records: list[PassRecord],
    reference: Reference,
    *,
    target: Any,
    progress: Callable[[str], None],
) -> Optimized:
    """Run the passes of `recipe` after the `front.resumed` that came from the cache."""
    pipeline = recipe.pipeline
    spec = model.spec
    to_run = pipeline[front.resumed :]
    calibrating = [index for index in recipe.calibrating if index >= front.resumed]
    if calibrating:
        progress("tokenizing calibration text")
        recipe.attach_calibration(front.tokenizer(), spec)
        to_run = recipe.pipeline[front.resumed :]
    # A streamed compile never holds the float model: its calibrating passes get their
    # statistics from the PyTorch model run one layer at a time (fdec.calibrate_layerwise).
    layerwise = None
    if front.streamed and calibrating:
        passes = [recipe.pipeline[index] for index in calibrating]
        layerwise = LayerwiseCalibration(
            front.source, passes[0].batches, collect=layerwise_kinds(passes),
            trust_remote_code=options.trust_remote_code,
        )  # fmt: skip
        progress("calibrating layer by layer on the streamed model")

    # Every pass starts from the graph's names as a saved and reloaded model has them, so a
    # pass resumed on a cached model names new nodes exactly as it does in a cold compile.
    instruments: list[Any] = [FreshNamesInstrument()]
    if options.verify_each:
        optimization = recipe.optimization
        instruments.append(StructureCheckInstrument(full=True))
        instruments.append(
            NumericCheckInstrument(
                lambda model: reference.compare(session_for_model(model, optimization=optimization))
            )
        )
    if options.dump_dir:
        instruments.append(DumpInstrument(options.dump_dir))
    snapshot = LossySnapshot()
    # Not when streaming: the snapshot is the whole float model on disk (an 8B model: 30 GB),
    # and measuring sensitivity from it loads it whole; a failed gate then names no layers.
    if (
        recipe.tolerance.max_perplexity_increase is not None
        and spec.kind == "decoder"
        and not front.streamed
    ):
        instruments.append(snapshot)
        lossy = [i for i, p in enumerate(pipeline[: front.resumed]) if p.tolerance != EXACT]
        if lossy:  # the first lossy pass came from the cache: its input model is there too
            snapshot.from_cache(pipeline[lossy[0]], front.input_model_of(lossy[0]))
    if front.streamed:  # new weights to the spill file as they are made (fdec.ir.spill)
        instruments.append(SpillInstrument())
    store = front.instrument()
    if store is not None:  # after the structure check: a broken model is never stored
        instruments += [StructureCheckInstrument(), store]
    if layerwise is not None:
        instruments.append(LayerwiseInstrument(layerwise))
    manager = PassManager(
        to_run,
        instruments,
        target=target,
        on_pass=lambda i, n, p: progress(f"pass {front.resumed + i}/{len(pipeline)}: {p.name}"),
    )
    cache_dir = options.cache_dir or default_cache_dir()
    with (
        calibration_cache(cache_dir / "calibration" if options.cache else None) as stats_cache,
        calibration_source(layerwise),
    ):
        try:
            model, records = manager.run(model)
        finally:
            if layerwise is not None:
                layerwise.close()
    for record in records:
        record.index += front.resumed
    front.cache.finish()
    return Optimized(model, cached_records + records, snapshot, stats_cache)


class LayerwiseInstrument(Instrument):
    """Lets layer-by-layer calibration answer only passes whose input computes what the source
    model does: once a pass changed the numbers (a lossy pass that modified the model), later
    passes calibrate in ONNX Runtime on the model they receive. The pass's record gets the
    calibration's summary."""

    def __init__(self, calibration: LayerwiseCalibration):
        self.calibration = calibration
        self._runs = 0

    def before(self, pass_: Any, model: FdecModel, record: PassRecord) -> None:
        self._runs = len(self.calibration.runs)

    def after(self, pass_: Any, result: Any, record: PassRecord) -> None:
        if self.calibration.enabled and len(self.calibration.runs) > self._runs:
            record.stats["calibration"] = self.calibration.to_dict()
        if result.modified and pass_.tolerance != EXACT:
            self.calibration.enabled = False
