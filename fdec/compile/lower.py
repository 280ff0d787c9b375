"""Lower: the optimized model written as the build's files (ONNX Runtime layout, emits).

Every backend starts from the same files: model.onnx + external data, the runtime config, the
tokenizer and HF config beside it; --emit adds onnxruntime-genai's config and a serving
checkpoint. A backend's engines are built from model.onnx after verification
(`Backend.build_engines`).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Callable
from typing import Any

from fdec.compile.optimize import Optimized
from fdec.errors import CompileError
from fdec.ir import GraphCounts, release_freed_memory
from fdec.lower import MODEL_FILE, lower_onnxruntime
from fdec.lower.cuda_contracts import ContractBreach
from fdec.lower.cuda_placement import placement_summary
from fdec.lower.genai import write_genai_config
from fdec.lower.hf_checkpoint import CHECKPOINT_DIR, write_hf_checkpoint
from fdec.lower.onnxruntime import graph_precision

__all__ = ["Lowered", "write_files"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Lowered:
    """What lowering measured before the in-memory graph was dropped."""

    counts: GraphCounts
    gathered_bytes: int  # bytes of an untied embedding table (read a row per token)
    checkpoint: dict[str, Any] | None  # --emit hf-checkpoint's record
    # The models the build ships and the precision each runs in (report.json `models`).
    models: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # GPU targets: which nodes ONNX Runtime's CUDA EP has no kernel for (fdec.lower.cuda_kernels).
    cuda_placement: dict[str, Any] | None = None


def write_files(
    optimized: Optimized,
    staging: pathlib.Path,
    *,
    out: pathlib.Path,
    source: Any,
    target: Any,
    optimization: str,
    emit: tuple[str, ...],
    progress: Callable[[str], None],
    backend: Any = None,
) -> Lowered:
    """Write the build's files into `staging`; drops `optimized.model` afterwards, so what is
    verified next is the build as written, the verifying session holding the only copy of the
    weights (peak RSS; issue 9)."""
    model, optimized.model = optimized.model, None
    placement = _cuda_placement(model, target, backend)
    progress(f"writing the ONNX Runtime build to {out}")
    lower_onnxruntime(
        model, staging, source_folder=source.folder, target=target, optimization=optimization,
        backend=backend,
    )  # fmt: skip
    runs_on = ", ".join((backend.providers if backend is not None else ()) or ["ONNX Runtime"])
    models = [{"file": MODEL_FILE, "runs_on": f"ONNX Runtime {runs_on}",
               **graph_precision(model.model)}]  # fmt: skip
    if target.is_gpu and (
        "Q/DQ" in models[0]["weights"] or "DequantizeLinear" in models[0]["weights"]
    ):
        models[0]["note"] = (
            "ONNX Runtime's CUDA EP only emulates Q/DQ (fp8 Q/DQ ran slower than fp32 on an "
            "H200, issue 16): the TensorRT engine runs this precision; --backend onnxruntime "
            "gives the fp16 CUDA model"
        )
    records = optimized.records
    counts = records[-1].after if records else model.counts()
    gathered = _gathered_bytes(model)
    if "genai" in emit:  # onnxruntime-genai's generator config (fdec.lower.genai)
        write_genai_config(staging, model.spec)
    checkpoint = None
    if "hf-checkpoint" in emit:
        progress("writing the serving checkpoint (safetensors + quantization config)")
        checkpoint = write_hf_checkpoint(model, source.folder, staging / CHECKPOINT_DIR)
        checkpoint["directory"] = CHECKPOINT_DIR  # relative: the build moves into place
    del model
    release_freed_memory()
    return Lowered(counts, gathered, checkpoint, models, placement)


def _cuda_placement(model: Any, target: Any, backend: Any) -> dict[str, Any] | None:
    """GPU targets: the predicted CUDA placement of the graph ONNX Runtime will run (the
    report's `cuda_placement`, fdec.lower.cuda_placement). A build for the ONNX Runtime CUDA
    backend is refused when a node has no CUDA kernel (ONNX Runtime would run it on the CPU,
    next to a KV cache bound on the device: the garbage of issue 16), and when a CUDA kernel
    would refuse a node the CPU check passed (fdec.lower.cuda_contracts). A value copied between
    host and device (a Memcpy node: a sync every step, and no CUDA graph capture) gets a warning
    and the report says so: the fused graphs of Llama-style families have none, traced
    attention (GPT-2) still has one."""
    if target is None or not target.is_gpu:
        return None
    placement = placement_summary(model)
    if backend is not None and "CUDAExecutionProvider" in backend.providers[:1]:
        placement["required"] = True
        if placement["cpu_nodes"]:
            worst = ", ".join(
                f"{key} ×{group['count']}" for key, group in list(placement["by_op"].items())[:3]
            )
            raise CompileError(
                f"{placement['cpu_nodes']} node(s) of the {backend.name} graph have no CUDA "
                f"kernel for their types ({worst}); ONNX Runtime would run them on the CPU",
                _PLACEMENT_FIX,
            )
        if placement["contract_breaches"]:
            first = ContractBreach(**placement["contract_breaches"][0])
            raise CompileError(
                f"{len(placement['contract_breaches'])} node(s) of the {backend.name} graph "
                f"break what ONNX Runtime's CUDA kernels take; first: {first.describe()}",
                _CONTRACT_FIX,
            )
        if placement["memcpy_nodes"]:
            copy = placement["memcpy"][0]
            logger.warning(
                "the %s graph makes ONNX Runtime copy between host and device each step (%d "
                "Memcpy node(s); first: %s of %s for %s): slower, and no CUDA graph capture",
                backend.name, placement["memcpy_nodes"], copy["direction"], copy["value"],
                copy["readers"][0],
            )  # fmt: skip
    return placement


_CONTRACT_FIX = (
    "change the option that made it (e.g. --pass-options quantize-int4.block_size=32), or "
    "compile with --backend tensorrt or --target cpu"
)
_PLACEMENT_FIX = (
    "report it with the build's --dump-dir output; meanwhile compile with --backend tensorrt "
    "or --target cpu"
)


def _gathered_bytes(model: Any) -> int:
    """Bytes of an untied embedding table: read a row per token, not whole."""
    spec = model.spec
    name = spec.weights.get("embed")
    if not name or spec.weights.get("lm_head") == name or name not in model.graph.initializers:
        return 0
    tensor = model.graph.initializers[name].const_value
    return int(tensor.nbytes) if tensor is not None else 0
