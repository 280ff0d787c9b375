"""fdec's passes (installed as fdec.passes): an explicit registry of pass families.

Every pass is a `fdec.pipeline.Pass`; the invariants each keeps are listed at the top of
fdec/pipeline.py. Register new passes in `REGISTRY` below: no import-time magic.
"""

from __future__ import annotations

from typing import Any

from fdec.errors import UsageError
from fdec.passes.cleanup import (
    EliminateCommonSubexpressionsPass,
    FoldConstantsPass,
    InferShapesPass,
    RemoveDeadNodesPass,
    StripMetadataPass,
    UntieEmbeddingsPass,
)
from fdec.passes.fusion import FuseAttentionPass, HostShapesPass
from fdec.passes.kv_cache import KvPolicyPass, QuantizeKvCachePass
from fdec.passes.pack import PackQkvPass
from fdec.passes.prune import PrunePass
from fdec.passes.quantize import QuantizeInt4Pass, QuantizeInt8Pass, QuantizeInt8WeightOnlyPass
from fdec.passes.quantize_awq import QuantizeInt4AwqPass
from fdec.passes.quantize_embedding import QuantizeEmbeddingPass
from fdec.passes.quantize_fp4 import QuantizeFp4Pass
from fdec.passes.quantize_mixed import QuantizeMixedPass
from fdec.passes.quantize_static import QuantizeFp8Pass, QuantizeInt8StaticPass
from fdec.passes.sparsity import Sparsify2of4Pass
from fdec.passes.typing import CastFloat16Pass
from fdec.pipeline import Pass

__all__ = [
    "DEFAULT_PIPELINE",
    "REGISTRY",
    "make_pass",
    "make_pipeline",
    "parse_pass_list",
    "weight_quantizers",
]

REGISTRY: dict[str, type[Pass]] = {
    cls.name: cls
    for cls in (
        FoldConstantsPass,
        RemoveDeadNodesPass,
        EliminateCommonSubexpressionsPass,
        InferShapesPass,
        StripMetadataPass,
        UntieEmbeddingsPass,
        QuantizeInt4Pass,
        QuantizeInt4AwqPass,
        QuantizeInt8Pass,
        QuantizeInt8WeightOnlyPass,
        QuantizeFp8Pass,
        QuantizeFp4Pass,
        QuantizeInt8StaticPass,
        QuantizeEmbeddingPass,
        QuantizeMixedPass,
        FuseAttentionPass,
        HostShapesPass,
        PackQkvPass,
        QuantizeKvCachePass,
        KvPolicyPass,
        PrunePass,
        Sparsify2of4Pass,
        CastFloat16Pass,
    )
}

DEFAULT_PIPELINE: tuple[str, ...] = (
    "strip-metadata",
    "fold-constants",
    "cse",
    "remove-dead-nodes",
    "infer-shapes",
)


def make_pass(name: str, **options: Any) -> Pass:
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise UsageError(
            f"unknown pass {name!r}", f"known passes: {', '.join(sorted(REGISTRY))} (fdec passes)"
        ) from None
    try:
        return cls(**options)
    except TypeError as err:
        raise UsageError(f"bad options for pass {name!r}: {err}", "see `fdec passes`") from None


def parse_pass_list(text: str | None) -> list[str]:
    """`--passes` value: comma-separated names; "default" expands to the default pipeline."""
    if text is None:
        return list(DEFAULT_PIPELINE)
    names: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item or item == "none":
            continue
        names.extend(DEFAULT_PIPELINE if item == "default" else [item])
    for name in names:
        if name not in REGISTRY:
            make_pass(name)  # raises the UsageError naming the known passes
        option = REGISTRY[name].added_by
        if option:
            raise UsageError(
                f"--passes {name}: {option} adds this pass", f"drop {name} and give {option}"
            )
    return names


def make_pipeline(names: list[str]) -> list[Pass]:
    return [make_pass(name) for name in names]


def weight_quantizers(names: list[str]) -> list[str]:
    """The passes of `names` that quantize the linear weights (what --quantize chooses);
    quantize-embedding, which the recipes add beside them for the token table, is not one."""
    return [
        name
        for name in names
        if REGISTRY[name].family == "quantize" and REGISTRY[name] is not QuantizeEmbeddingPass
    ]
