"""Lowering to ONNX Runtime: model.onnx + external data, session config, tokenizer and HF config beside it."""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
from typing import Any

from fdec.ir import FdecModel, shared_kv_layers

__all__ = [
    "KV_BUFFER_METADATA",
    "MODEL_FILE",
    "ROTARY_RESTART_METADATA",
    "RUNTIME_CONFIG",
    "graph_precision",
    "kv_cache_config",
    "lower_onnxruntime",
    "providers_for",
    "shared_kv_layers",
]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
RUNTIME_CONFIG = "fdec-runtime.json"
# Files copied from the source folder so a build runs (and tokenizes) on its own.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


ORT_TRT_CACHE = "engines/ort-tensorrt-cache"
# model.onnx metadata key naming how the KV cache is passed ("shared" or "concat"), so a session
# opened on the file alone (fdec.runtime.OrtModel) finds it without the runtime config.
KV_BUFFER_METADATA = "fdec.kv_buffer"
# Positions after which generation recomputes the KV cache once (ModelSpec.rotary_restart).
ROTARY_RESTART_METADATA = "fdec.rotary_restart"


# The cache dtype as fdec-runtime.json names it, and its bytes per element.
_KV_DTYPE_NAMES = {
    "FLOAT": ("float32", 4),
    "FLOAT16": ("float16", 2),
    "BFLOAT16": ("bfloat16", 2),
    "INT8": ("int8", 1),
    "FLOAT8E4M3FN": ("float8_e4m3fn", 1),
}
KV_POLICY_METADATA = "fdec.kv_policy"  # fdec.passes.kv_cache.KV_POLICY_METADATA


def kv_cache_config(model: Any, spec: Any) -> dict[str, Any] | None:
    """The runtime config's `kv_cache` entry: shape, layout, dtype, how it is passed, the
    compression policy and the memory bound it gives."""
    if not spec.is_decoder:
        return None
    shared = len(shared_kv_layers(model)) == spec.num_layers > 0
    past = next((v for v in model.graph.inputs if v.name == "past_key_values.0.key"), None)
    dtype_name = past.dtype.name if past is not None and past.dtype is not None else "FLOAT"
    dtype, item = _KV_DTYPE_NAMES.get(dtype_name, (dtype_name.lower(), 4))
    per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * item
    policy_text = model.metadata_props.get(KV_POLICY_METADATA)
    policy = json.loads(policy_text) if policy_text else None
    # Positions one sequence's cache may hold: sink + window when the runtime trims it; a
    # native GroupQueryAttention window bounds attention, not the buffer.
    trims = policy is not None and not policy.get("native_window")
    max_tokens = policy["sink"] + policy["window"] if trims else spec.max_positions
    return {
        "layers": spec.num_layers,
        "kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "layout": "BNSH",
        "dtype": dtype,
        # int8/fp8 caches (fdec.passes.kv_cache): static per-head scales inside model.onnx.
        "scales": "per-head, in model.onnx" if item == 1 else None,
        "bytes_per_token": per_token,
        # "shared": one [batch, kv_heads, max_length, head_dim] buffer per tensor, bound as
        # both past and present (no per-step copy); "concat": present = past + new positions.
        "buffer": "shared" if shared else "concat",
        "max_length": spec.max_positions,
        "policy": policy,
        "memory_bound": {
            "max_cache_tokens": max_tokens,
            "bytes_per_sequence": per_token * max_tokens if max_tokens else None,
            "bounded_by": "policy" if trims else "max_positions",
        },
    }


def graph_precision(model: Any) -> dict[str, Any]:
    """What a graph computes in, in words for the report: the float type most node outputs
    have, how its weights are stored (MatMulNBits, weight-only DequantizeLinear, Q/DQ with
    activations quantized too, dynamic int8, float) and its KV cache
    type. `summary` is the one line ("fp16 compute, int4 weights (MatMulNBits), fp16 KV")."""
    import collections

    import onnx_ir as ir

    graph = model.graph
    floats: collections.Counter = collections.Counter()
    ops: collections.Counter = collections.Counter()
    qdq: set[str] = set()
    bits: set[int] = set()
    for node in ir.traversal.RecursiveGraphIterator(graph):
        ops[node.op_type] += 1
        for out in node.outputs:
            if out.dtype is not None and out.dtype.is_floating_point():
                floats[out.dtype] += 1
        if node.op_type == "DequantizeLinear" and node.inputs and node.inputs[0] is not None:
            if node.inputs[0].dtype is not None:
                qdq.add(node.inputs[0].dtype.name.lower())
        if node.op_type == "MatMulNBits":
            bits.add(node.attributes.get_int("bits", 4))
    names = {ir.DataType.FLOAT: "fp32", ir.DataType.FLOAT16: "fp16", ir.DataType.BFLOAT16: "bf16"}
    compute = names.get(max(floats, key=floats.get), "fp32") if floats else "fp32"
    if bits:
        weights = "/".join(f"int{b}" for b in sorted(bits)) + " weights (MatMulNBits)"
    elif qdq:  # weight-only when nothing is quantized at run time
        kinds = "/".join(sorted("fp8" if "float8" in q else q for q in qdq))
        quantizes = ops.get("QuantizeLinear")
        weights = f"{kinds} Q/DQ" if quantizes else f"{kinds} weights (DequantizeLinear)"
    elif ops.get("MatMulInteger") or ops.get("DynamicQuantizeLinear"):
        weights = "int8 dynamic (MatMulInteger)"
    else:
        weights = f"{compute} weights"
    past = next((v for v in graph.inputs if v.name == "past_key_values.0.key"), None)
    kv = names.get(past.dtype, past.dtype.name.lower()) if past is not None and past.dtype else None
    summary = f"{compute} compute, {weights}" + (f", {kv} KV cache" if kv else "")
    return {"compute": compute, "weights": weights, "kv_cache": kv, "summary": summary}


def providers_for(target: Any, backend: Any = None) -> list[list[Any]]:
    """ONNX Runtime execution providers (name, options) to ask for on `target`, best first.

    The ONNX Runtime CUDA backend: CUDA, then the CPU (its graph is built for the CUDA EP). Other
    builds on GPUs: the TensorRT EP (engines cached inside the build, so the second start is
    fast), then CUDA, then the CPU. Paths in options are relative to the build folder.
    """
    if backend is not None and tuple(backend.providers) == ("CUDAExecutionProvider",):
        return [["CUDAExecutionProvider", {}], ["CPUExecutionProvider", {}]]
    if target is not None and getattr(target, "is_gpu", False):
        return [
            [
                "TensorrtExecutionProvider",
                {
                    "trt_engine_cache_enable": "True",
                    "trt_engine_cache_path": ORT_TRT_CACHE,
                    "trt_timing_cache_enable": "True",
                    "trt_timing_cache_path": ORT_TRT_CACHE,
                },
            ],
            ["CUDAExecutionProvider", {}],
            ["CPUExecutionProvider", {}],
        ]
    return [["CPUExecutionProvider", {}]]


def lower_onnxruntime(
    model: FdecModel,
    out: pathlib.Path,
    *,
    source_folder: pathlib.Path,
    target: Any,
    optimization: str = "all",
    backend: Any = None,
) -> list[pathlib.Path]:
    """Write the ONNX Runtime build into `out`; returns the files written."""
    spec = model.spec
    kv_cache = kv_cache_config(model.model, spec)
    if kv_cache is not None:
        model.model.metadata_props[KV_BUFFER_METADATA] = kv_cache["buffer"]
    if spec.rotary_restart:
        model.model.metadata_props[ROTARY_RESTART_METADATA] = str(spec.rotary_restart)
    files = model.save(out / MODEL_FILE)
    for name in SIDE_FILES:
        path = source_folder / name
        if path.is_file():
            shutil.copyfile(path, out / name)
            files.append(out / name)
    eos = _eos_tokens(source_folder)
    runtime = {
        "schema_version": 1,
        "backend": "onnxruntime",
        "model": MODEL_FILE,
        "kind": spec.kind,
        "family": spec.family,
        "precision": graph_precision(model.model)["summary"],
        "providers": providers_for(target, backend),
        # intra_op_num_threads 0: fdec.runtime.auto_threads() when the session opens (cores
        # not kept busy by other work); allow_spinning "auto": spinning pool threads only
        # while each has a free core (fdec.runtime.session.auto_spinning).
        "session_options": {
            "graph_optimization_level": optimization,
            "intra_op_num_threads": 0,
            "allow_spinning": "auto",
        },
        "inputs": spec.inputs,
        "outputs": spec.outputs,
        "kv_cache": kv_cache,
        "eos_token_ids": eos,
        "max_positions": spec.max_positions,
    }
    (out / RUNTIME_CONFIG).write_text(json.dumps(runtime, indent=2, sort_keys=True) + "\n")
    files.append(out / RUNTIME_CONFIG)
    return files


def _eos_tokens(folder: pathlib.Path) -> list[int]:
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if not path.is_file():
            continue
        value = json.loads(path.read_text()).get("eos_token_id")
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, list):
            ids.extend(v for v in value if isinstance(v, int))
    return sorted(set(ids))
