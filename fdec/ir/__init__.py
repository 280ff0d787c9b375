"""The graph IR: onnx-ir models paired with the ModelSpec import derives from the HF config."""

from fdec.ir.kv import shared_kv_layers
from fdec.ir.model import (
    SHAPE_ONLY_OPS,
    FdecModel,
    GraphCounts,
    count_graph,
    release_freed_memory,
    save_model,
)
from fdec.ir.spec import WEIGHT_ROLES, ModelSpec

__all__ = [
    "SHAPE_ONLY_OPS",
    "WEIGHT_ROLES",
    "FdecModel",
    "GraphCounts",
    "ModelSpec",
    "count_graph",
    "release_freed_memory",
    "save_model",
    "shared_kv_layers",
]
