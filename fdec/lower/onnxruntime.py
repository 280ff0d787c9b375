"""Lowering to ONNX Runtime: model.onnx + external data, session config, tokenizer and HF config beside it."""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
from typing import Any

from fdec.ir import FdecModel

__all__ = ["MODEL_FILE", "RUNTIME_CONFIG", "lower_onnxruntime", "providers_for"]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
RUNTIME_CONFIG = "fdec-runtime.json"
# Files copied from the source folder so a build runs (and tokenizes) on its own.
_SIDE_FILES = (
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


def providers_for(target: Any) -> list[list[Any]]:
    """ONNX Runtime execution providers (name, options) to ask for on `target`, best first.

    On GPUs: the TensorRT EP (engines cached inside the build, so the second start is fast),
    then CUDA, then the CPU. Paths in options are relative to the build folder.
    """
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
) -> list[pathlib.Path]:
    """Write the ONNX Runtime build into `out`; returns the files written."""
    files = model.save(out / MODEL_FILE)
    for name in _SIDE_FILES:
        path = source_folder / name
        if path.is_file():
            shutil.copyfile(path, out / name)
            files.append(out / name)
    spec = model.spec
    eos = _eos_tokens(source_folder)
    runtime = {
        "schema_version": 1,
        "backend": "onnxruntime",
        "model": MODEL_FILE,
        "kind": spec.kind,
        "family": spec.family,
        "providers": providers_for(target),
        "session_options": {"graph_optimization_level": optimization, "intra_op_num_threads": 0},
        "inputs": spec.inputs,
        "outputs": spec.outputs,
        "kv_cache": (
            {
                "layers": spec.num_layers,
                "kv_heads": spec.num_kv_heads,
                "head_dim": spec.head_dim,
                "layout": "BNSH",
                "dtype": "float32",
            }
            if spec.is_decoder
            else None
        ),
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
