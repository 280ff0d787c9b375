"""What the weight quantizers share: their stats skeleton, the tied lm_head precondition, the
SmoothQuant alpha check and the error when calibration reached none of their activations."""

from __future__ import annotations

from typing import Any

from fdec.errors import CompileError, UsageError
from fdec.ir import FdecModel

__all__ = [
    "check_alpha",
    "check_choice",
    "check_margin",
    "empty_stats",
    "require_calibrated",
    "require_untied",
]


def empty_stats() -> dict[str, Any]:
    return {
        "matmuls_quantized": 0,
        "weights_quantized": 0,
        "skipped": {},
        "bytes_before": 0,
        "bytes_after": 0,
    }


def require_untied(pass_name: str, model: FdecModel, include_lm_head: bool) -> None:
    spec = model.spec
    if include_lm_head and spec.tie_word_embeddings and "lm_head" in spec.weights:
        raise UsageError(
            f"{pass_name} cannot quantize the lm_head: it is tied to the token embedding",
            f"run untie-embeddings before {pass_name}, or set include_lm_head=False",
        )


def check_choice(pass_name: str, option: str, value: Any, choices: tuple[str, ...]) -> None:
    """An option that takes one of `choices`: refused by name otherwise."""
    if value not in choices:
        raise UsageError(
            f"{pass_name} {option} {value!r} is unknown", f"use one of: {', '.join(choices)}"
        )


def check_margin(pass_name: str, margin: Any) -> None:
    """A static activation range's headroom factor: a number ≥ 1."""
    if isinstance(margin, bool) or not (isinstance(margin, (int, float)) and margin >= 1):
        raise UsageError(
            f"{pass_name} activation_margin {margin!r} is not a number ≥ 1",
            "use 1 (the calibrated range) or more (headroom above it)",
        )


def check_alpha(pass_name: str, alpha: Any, fix: str) -> None:
    """A SmoothQuant migration strength is None (no smoothing) or a number from 0 to 1."""
    if alpha is not None and (
        isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0
    ):
        raise UsageError(f"{pass_name} alpha {alpha!r} is not a number from 0 to 1", fix)


def require_calibrated(
    pass_name: str, groups: list[Any], calibration: Any, what: str, fix: str
) -> None:
    """Refuse when calibration reached none of the `groups`' activations (the model was changed
    after it was calibrated): a pass would otherwise skip every layer and report success."""
    if groups and not any(group.activation.name in calibration for group in groups):
        raise CompileError(
            f"{pass_name}: none of the {len(groups)} activations to {what} has calibration "
            f"data (first: {groups[0].activation.name!r})",
            f"{fix} on the model exactly as this pass receives it, or pass batches=... so the "
            "pass calibrates it itself",
        )
