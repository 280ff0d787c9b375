"""The draft stage: `--draft layers=1/4[,distill=N][,quantize=R]` also builds a layer-pruned
draft model into the build's draft/ (for `fdec run --speculative draft`).

The draft is a compile of its own (the source with most layers pruned: the prune stage, then
the same optimize → lower → verify → write path), run by the driver when the main build is
written; `Draft.record` is the main report's "draft" entry.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fdec.compile.options import CompileOptions
from fdec.errors import UsageError
from fdec.passes.kv_cache import runtime_trim
from fdec.student import DRAFT_DIR, DraftSpec, draft_prune, parse_draft

__all__ = ["Draft", "plan_draft"]


@dataclasses.dataclass(frozen=True)
class Draft:
    """The draft a build carries: its --draft value resolved against the source's layers."""

    option: str  # the --draft value
    spec: DraftSpec
    prune: str  # the --prune value that leaves the draft's layers

    def options(self, main: CompileOptions, staging: pathlib.Path) -> CompileOptions:
        """The draft's compile options, from the main build's: into staging/draft/."""
        return dataclasses.replace(
            main,
            out=staging / DRAFT_DIR,
            prune=self.prune,
            draft=None,
            max_ppl_increase=None,
            distill_steps=self.spec.distill,
            quantize=self.spec.quantize or main.quantize,
        )

    def addition(
        self, main: CompileOptions, progress: Callable[[str], None],
        compile_draft: Callable[[CompileOptions, Callable[[str], None]], Any],
    ) -> Callable[[pathlib.Path, dict[str, Any]], None]:  # fmt: skip
        """The main build's step compiling this draft into its staging folder's draft/
        (`compile_draft`: the driver's compile, with no draft of its own) and recording it."""

        def build_draft(staging: pathlib.Path, report: dict[str, Any]) -> None:
            progress(f"building the draft ({self.option}: --prune {self.prune})")
            built = compile_draft(self.options(main, staging), lambda m: progress(f"draft: {m}"))
            report["draft"] = self.record(built.report)

        return build_draft

    def record(self, report: Mapping[str, Any]) -> dict[str, Any]:
        """The main report's "draft" entry, from the draft build's report."""
        return {
            "directory": DRAFT_DIR,
            "option": self.option,
            "prune": self.prune,
            "layers": report["spec"]["num_layers"],
            "accuracy": report["prune"]["accuracy"],
            "distill": report["prune"].get("distill"),
            "quantize": report["recipe"]["quantize"],
            "verification_ok": report["verification"]["ok"],
        }


def plan_draft(option: str, config: Mapping[str, Any], pipeline: Sequence[Any] = ()) -> Draft:
    """The draft `option` (--draft) asks for, for a source with `config` (its config.json),
    refused (UsageError) where the main build's planned `pipeline` gives a KV cache the
    runtime trims: speculative decoding does not run such a build, so its draft was built for
    nothing and `fdec run --speculative draft` refused it."""
    trimmed = runtime_trim(pipeline)
    if trimmed:
        raise UsageError(
            f"--draft: speculative decoding does not run a build whose runtime trims its KV "
            f"cache, and this one does ({trimmed})",
            "drop --draft, or --kv-window/--kv-sink",
        )
    layers = int(config.get("num_hidden_layers") or config.get("n_layer") or 0)
    spec = parse_draft(option, layers)
    return Draft(option, spec, draft_prune(spec, layers))
