"""Pruned students and drafts: the --draft syntax, the pruned checkpoint, its distillation.

The compile's prune stage (fdec.compile.prune) writes the pruned model as a `Pruned`
checkpoint; `distill_pruned` distills it in place; `parse_draft` reads `--draft`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import tempfile
from collections.abc import Callable
from typing import Any

from fdec.errors import UsageError

__all__ = [
    "DRAFT_DIR",
    "STUDENT_DIR",
    "DraftSpec",
    "Pruned",
    "distill_pruned",
    "draft_prune",
    "parse_draft",
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
class DraftSpec:
    """`--draft layers=1/4[,distill=N][,quantize=R]`: layers kept, distillation steps, recipe."""

    layers: int  # kept; -1 until the model's layer count is known
    distill: int = 0
    quantize: str | None = None  # None: the main build's --quantize


_DRAFT_FIX = (
    "write --draft layers=1/4 (the share of layers the draft keeps, or layers=N), optionally "
    "with ,distill=STEPS and ,quantize=RECIPE"
)


def parse_draft(text: str | None, num_layers: int | None = None) -> DraftSpec | None:
    """The --draft value as a DraftSpec (None: no draft); `num_layers` resolves a share."""
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
    return DraftSpec(kept, int(steps), items["quantize"] or None)


def draft_prune(draft: DraftSpec, num_layers: int) -> str:
    """The --prune value that leaves the draft's layers."""
    return f"layers={num_layers - draft.layers}"


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
