"""What the weight quantizers share: their stats skeleton and the tied lm_head precondition."""

from __future__ import annotations

from typing import Any

from fdec.errors import UsageError
from fdec.ir import FdecModel

__all__ = ["empty_stats", "require_untied"]


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
