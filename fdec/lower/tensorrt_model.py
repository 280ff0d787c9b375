"""The strongly typed model TensorRT and TensorRT-RTX build from: engines/tensorrt/model.onnx.

TensorRT 11 and TensorRT-RTX take a network's precision from the ONNX graph alone (no FP16/FP8/
INT8 builder flags), so engines need a model of their own: the verified build's graph (Q/DQ
and blocked DequantizeLinear already in it for fp8, int8 SmoothQuant and int4 recipes) typed by
`fdec.passes.typing.CastFloat16Pass` to fp16 or bf16, with its I/O types unchanged.

`prepare_tensorrt_model` writes it and checks its numerics against the source model in ONNX
Runtime on the CPU (optimization level basic, where ORT's CPU kernels take Q/DQ and fp16). ORT
has no bf16 CPU kernels and skips fp16 rounding between fp16 nodes, so the graph is checked
through `emulate_low_precision`: every fp16/bf16 tensor becomes an fp32 tensor rounded to its
type (Cast to it and back), which is what the engine stores; arithmetic inside an op runs in
fp32, as TensorRT's accumulators do. bf16 is
chosen where the target computes it (compute capability 8.0+) and kept only when it holds the
tolerance; otherwise the model is written in fp16 and the report says why.
"""

from __future__ import annotations

import logging
import pathlib
import tempfile
from collections.abc import Callable
from typing import Any

import onnx_ir as ir

from fdec.errors import CompileError
from fdec.gates import GATES, GateTolerance
from fdec.ir import FdecModel, ModelSpec, release_freed_memory
from fdec.passes.typing import CastFloat16Pass, choose_float_dtype, float_types, untyped_values
from fdec.pipeline import Tolerance

__all__ = [
    "MODEL_DIR",
    "TYPED_MODEL",
    "graph_precisions",
    "prepare_tensorrt_model",
    "typed_tolerance",
    "typing_tolerance",
]

logger = logging.getLogger(__name__)

MODEL_DIR = "engines/tensorrt"  # relative to the build folder
TYPED_MODEL = f"{MODEL_DIR}/model.onnx"
_DATA_FILE = "model.onnx.data"


def typing_tolerance(dtype: str) -> GateTolerance:
    """What typing a float graph bf16 or fp16 for TensorRT may do: its measured gate
    ("tensorrt bf16" / "tensorrt fp16" in fdec.gates, SmolLM2 and the tests' tiny models)."""
    return GATES[f"tensorrt {dtype}"].tolerance()


def typed_tolerance(recipe: Tolerance, typing: Tolerance) -> GateTolerance:
    """The gate of a typed graph against the source: the recipe's error plus the typing's, the
    lower top-1 bound, the recipe's perplexity bound (the typing's for a float recipe)."""

    def add(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a + b

    sources = [getattr(t, "source", "") for t in (recipe, typing)]
    return GateTolerance(
        max_abs_error=add(recipe.max_abs_error, typing.max_abs_error),
        min_top1_agreement=min(recipe.min_top1_agreement, typing.min_top1_agreement),
        max_perplexity_increase=recipe.max_perplexity_increase
        if recipe.max_perplexity_increase is not None
        else typing.max_perplexity_increase,
        greedy_identical=False,
        source=" + ".join(source for source in sources if source),
    )


def graph_precisions(graph: ir.Graph) -> list[str]:
    """The precisions the graph's own types and Q/DQ put in it, e.g. ["bf16", "fp16", "fp8"]:
    its float types, most values first (a bf16 graph's fp16 logits after bf16), then the
    quantized ones."""
    names = {"FLOAT16": "fp16", "BFLOAT16": "bf16"}
    counts = float_types(graph)
    found = [names[name] for name in sorted(names, key=lambda n: -counts[n]) if counts[name]]
    quantized = {
        "FLOAT8E4M3FN": "fp8",
        "FLOAT4E2M1": "fp4",
        "INT8": "int8",
        "UINT8": "int8",
        "INT4": "int4",
        "UINT4": "int4",
    }
    for node in graph:
        if node.op_type == "DequantizeLinear" and node.inputs[0] is not None:
            dtype = node.inputs[0].dtype
            name = quantized.get(dtype.name if dtype is not None else "")
            if name and name not in found:
                found.append(name)
    return found


def _check_numerics(
    typed: pathlib.Path, reference: Any, tolerance: Tolerance, spec: ModelSpec | None = None
) -> dict[str, Any]:
    """Figures of the typed model against the source on ONNX Runtime's CPU (basic), with its
    fp16/bf16 storage emulated (`emulate_low_precision`); slice by slice where one session
    would hold too much (fdec.runtime.sliced: an 8B fp8 model)."""
    from fdec.runtime import OrtModel, open_session
    from fdec.runtime.check_forms import check_form
    from fdec.runtime.sliced import SlicedModel, too_large_for_one_session

    with tempfile.TemporaryDirectory(prefix="fdec-typed-") as scratch:
        model = ir.load(str(typed))
        # fp16/bf16 rounding emulated, vocabulary tables read by rows and columns, FP4 form
        check_form(model, emulate=True)
        path = pathlib.Path(scratch) / "emulated.onnx"
        ir.save(model, str(path), external_data="emulated.onnx.data")
        del model
        if too_large_for_one_session(path, reference.kind):
            sliced = SlicedModel(path, spec=spec, optimization="basic")
            figures = {**reference.compare(sliced), "sliced": sliced.to_dict()}
            del sliced
        else:
            session = OrtModel(open_session(path, optimization="basic", prepack=False))
            figures = reference.compare(session)
            del session
    figures["emulated"] = True
    failure = tolerance.judge(figures)
    figures["ok"], figures["failure"] = failure is None, failure
    return figures


def prepare_tensorrt_model(
    build_dir: str | pathlib.Path,
    *,
    target: Any,
    spec: ModelSpec,
    reference: Any = None,
    tolerance: Tolerance | None = None,
    dtype: str | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Write build_dir/engines/tensorrt/model.onnx (+ .data), the strongly typed model.

    `dtype` None picks by the target (`choose_float_dtype`); with a `reference` (fdec.verify)
    the typed model is checked against the source within `tolerance` (the recipe's, widened
    by the typing's) and a bf16 model that fails it is retyped in fp16. Returns the report
    record: path, dtype, precisions in the graph, the pass's stats, numerics and, when bf16
    was given up, why. Raises CompileError when no typing holds the tolerance.
    """
    build_dir = pathlib.Path(build_dir)
    source = build_dir / "model.onnx"
    folder = build_dir / MODEL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    candidates = [dtype] if dtype else [choose_float_dtype(target)]
    if candidates[0] == "bf16" and not dtype:
        candidates.append("fp16")
    record: dict[str, Any] = {"model": TYPED_MODEL, "fallback": None}
    for candidate in candidates:
        progress(f"typing the TensorRT model in {candidate} (norms, softmax in fp32, logits fp16)")
        model = FdecModel(ir.load(str(source)), spec)
        pass_ = CastFloat16Pass(dtype=candidate, logits="fp16")
        pass_.requires(model, target)
        result = pass_(model)
        missing = untyped_values(model.graph)
        precisions = graph_precisions(model.graph)
        (folder / _DATA_FILE).unlink(missing_ok=True)
        ir.save(model.model, str(folder / "model.onnx"), external_data=_DATA_FILE)
        del model, result.model
        release_freed_memory()
        record.update(
            dtype=candidate,
            precisions=precisions,
            untyped_tensors=len(missing),
            stats=result.stats,
        )
        if reference is None:
            return record
        gate = typed_tolerance(tolerance or Tolerance(), typing_tolerance(candidate))
        progress(f"checking the {candidate} TensorRT model against the source model")
        figures = _check_numerics(folder / "model.onnx", reference, gate, spec)
        record["numerics"] = figures
        record["tolerance"] = gate.to_dict()
        if figures["ok"]:
            return record
        logger.warning("the %s TensorRT model fails its gate: %s", candidate, figures["failure"])
        record["fallback"] = f"{candidate}: {figures['failure']}"
    raise CompileError(
        f"the strongly typed TensorRT model misses its tolerance: {record['fallback']}",
        "compile with --backend onnxruntime, or report the model: the fp32 build was verified "
        "but its fp16/bf16 typing was not",
    )
