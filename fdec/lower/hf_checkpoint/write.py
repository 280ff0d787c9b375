"""The lowering: the checkpoint's config, tensors and side files, written by `write_hf_checkpoint`."""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import pathlib
import shutil
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from fdec.errors import CompileError
from fdec.frontend.families import family_for_config
from fdec.frontend.prequantized import SOURCE_KEY
from fdec.ir import FdecModel
from fdec.lower.hf_checkpoint.expected import Parameter, expected_parameters
from fdec.lower.hf_checkpoint.fp8 import FP8_FORMAT, fp8_checkpoint
from fdec.lower.hf_checkpoint.nvfp4 import NVFP4_FORMAT, nvfp4_checkpoint
from fdec.lower.hf_checkpoint.pack import PACK_FORMAT, pack_weight, quantization_config
from fdec.lower.hf_checkpoint.read import (
    FLOAT_TYPES,
    Blocked,
    Fp8,
    Nvfp4,
    blocked_of,
    float_tensor,
    input_order,
)

__all__ = ["CHECKPOINT_DIR", "SAFETENSORS_FILE", "write_hf_checkpoint"]

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "hf-checkpoint"
SAFETENSORS_FILE = "model.safetensors"

_CONFIG_FILE = "config.json"
# Files copied from the source folder so the checkpoint tokenizes and generates on its own.
_SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def _output_config(source: dict[str, Any], model: FdecModel) -> tuple[dict[str, Any], list[str]]:
    """The source config as the written weights need it, and what was changed."""
    config = dict(source)
    changes: list[str] = []
    if config.pop("quantization_config", None) is not None:
        changes.append("dropped the source's quantization_config")
    source_quantization = config.get(SOURCE_KEY)
    if isinstance(source_quantization, dict) and "input_order" in source_quantization:
        # the weights are written in their inputs' own order (fdec.frontend.input_order)
        config[SOURCE_KEY] = {k: v for k, v in source_quantization.items() if k != "input_order"}
        changes.append("dropped the source's input order (the weights are written in it)")
    spec = model.spec
    untied = not spec.tie_word_embeddings and spec.weights.get("lm_head") not in (
        None,
        spec.weights.get("embed"),
    )
    if untied and _copied_table(model):  # untied by a pass, left as it was: tied again
        untied = False
    if untied and config.get("tie_word_embeddings", True):
        config["tie_word_embeddings"] = False
        changes.append("tie_word_embeddings=false (the lm_head has its own weight)")
    changes += _pruned_sizes(config, spec)
    return config, changes


def _copied_table(model: FdecModel) -> bool:
    """Whether the lm_head weight holds the float embedding's values ([V, H] or [H, V]): a
    copy `untie-embeddings` made that no pass changed (NVFP4 builds leave the lm_head out)."""
    tables = [
        model.graph.initializers.get(model.spec.weights.get(r) or "") for r in ("lm_head", "embed")
    ]
    if any(
        t is None or t.const_value is None or t.const_value.dtype not in FLOAT_TYPES for t in tables
    ):
        return False
    head, embed = (t.const_value.numpy() for t in tables)
    return any(head.shape == e.shape and np.array_equal(head, e) for e in (embed, embed.T))


# ModelSpec size → the config keys holding it (first one present wins; the first is written).
_SIZE_KEYS = {
    "num_layers": ("num_hidden_layers", "n_layer"),
    "num_heads": ("num_attention_heads", "n_head"),
    "num_kv_heads": ("num_key_value_heads",),
    "intermediate_size": ("intermediate_size", "n_inner"),
}


def _pruned_sizes(config: dict[str, Any], spec: Any) -> list[str]:
    """Write the sizes a structurally pruned model has (fewer layers, heads, MLP channels)."""
    changes = []
    heads_key = next((k for k in _SIZE_KEYS["num_heads"] if k in config), None)
    if heads_key and config[heads_key] != spec.num_heads and "head_dim" not in config:
        # head_dim defaults to hidden / heads: keep it what it was once heads are removed.
        config["head_dim"] = spec.head_dim
        changes.append(f"head_dim={spec.head_dim} (explicit: fewer heads than hidden / head_dim)")
    for field, keys in _SIZE_KEYS.items():
        key = next((k for k in keys if k in config), None)
        value = getattr(spec, field)
        if key is not None and config[key] is not None and config[key] != value:
            changes.append(f"{key}={value} (was {config[key]}: pruned)")
            config[key] = value
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) != spec.num_layers:
        if len(set(layer_types)) > 1:
            raise CompileError(
                "the pruned model's layers have different types in config.json layer_types",
                "prune heads/mlp only for models mixing layer types",
            )
        config["layer_types"] = layer_types[: spec.num_layers]
    return changes


def _graph_value(model: FdecModel, parameter: Parameter, family: Any) -> ir.Value | None:
    """The initializer holding `parameter`: through its role when it has one, else its name."""
    role = family.role_of(parameter.name)
    name = model.spec.weights.get(role) if role else None
    return model.graph.initializers.get(name or parameter.name)


@dataclasses.dataclass
class _Collected:
    """The checkpoint's tensors before packing: float ones, and int4 / int8 / NVFP4 ones to pack
    per module."""

    floats: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    quantized: dict[str, Blocked | Nvfp4 | Fp8] = dataclasses.field(
        default_factory=dict
    )  # by module
    dequantized: list[str] = dataclasses.field(default_factory=list)
    buffers_skipped: list[str] = dataclasses.field(default_factory=list)


def _collect(
    model: FdecModel, parameters: list[Parameter], family: Any, pack_lm_head: bool
) -> _Collected:
    """Every expected HF tensor read back from the graph, in HF layout or as blocks to pack."""
    found = _Collected()
    for parameter in parameters:
        value = _graph_value(model, parameter, family)
        if value is None or value.const_value is None:
            if parameter.buffer:
                found.buffers_skipped.append(parameter.name)
                continue
            raise CompileError(
                f"the graph holds no weight for HF parameter {parameter.name!r}",
                "a pass removed or folded it; emit the ONNX build only, or report the model",
            )
        order = input_order(value)
        if value.const_value.dtype in FLOAT_TYPES:
            found.floats[parameter.name] = _in_input_order(
                float_tensor(value, parameter), order, parameter
            )
            continue
        weight = blocked_of(value)
        is_lm_head = family.role_of(parameter.name) == "lm_head"
        if (
            order is None
            and parameter.kind == "linear"
            and weight.shape == parameter.shape
            and (pack_lm_head or not is_lm_head)
        ):
            found.quantized[parameter.module] = weight
            continue
        # Not an nn.Linear (GPT-2's Conv1D), an lm_head engines would not read packed, or
        # blocks of inputs in another order (an activation-ordered source: compressed-tensors
        # reads consecutive groups only): write it in float, with the values the graph computes.
        why = (
            "its blocks follow the source's activation order, which compressed-tensors does "
            "not read"
            if order is not None
            else "no packed format loads it"
        )
        _write_float(found, parameter, weight, order, why, is_lm_head)
    _one_width(found, parameters, family)
    return found


def _format_of(weight: Blocked | Nvfp4 | Fp8) -> str:
    """The packed format a weight is written in: W4A16 / W8A16 pack-quantized, NVFP4 or FP8
    (whose W4A4 / W8A8 and weight-only layers are two groups of one format)."""
    if isinstance(weight, Nvfp4):
        return NVFP4_FORMAT
    return FP8_FORMAT if isinstance(weight, Fp8) else weight.scheme


def _one_width(found: _Collected, parameters: list[Parameter], family: Any) -> None:
    """The checkpoint has one format (W4A16, W8A16 or NVFP4): weights of another (an int4
    recipe's 8-bit lm_head, quantize-mixed's 8-bit layers) are written in float."""
    formats = collections.Counter(_format_of(w) for w in found.quantized.values())
    if len(formats) < 2:
        return
    kept = min(formats, key=lambda f: (-formats[f], f))  # the most modules' format
    by_module = {p.module: p for p in parameters if p.kind == "linear"}
    for module, weight in list(found.quantized.items()):
        if _format_of(weight) != kept:
            parameter = by_module[module]
            del found.quantized[module]
            is_lm_head = family.role_of(parameter.name) == "lm_head"
            why = f"the checkpoint's one format is {kept}"
            _write_float(found, parameter, weight, None, why, is_lm_head)


def _write_float(
    found: _Collected,
    parameter: Parameter,
    weight: Blocked | Nvfp4 | Fp8,
    order: np.ndarray | None,
    why: str,
    is_lm_head: bool,
) -> None:
    """A quantized weight written as float [out, in] (Conv1D: [in, out]), the graph's values.
    A W4A4 / W8A8 layer cannot be: in float its activations would no longer be quantized."""
    if isinstance(weight, (Nvfp4, Fp8)) and weight.input_scale is not None:
        nvfp4 = isinstance(weight, Nvfp4)
        raise CompileError(
            f"the {'NVFP4 W4A4' if nvfp4 else 'FP8 W8A8'} weight {parameter.name!r} cannot be "
            f"written packed ({why}), and in float its quantized activations would be lost",
            ("use --quantize fp4-wo for this model's checkpoint (weight-only: written "
             "dequantized, the same numbers), or " if nvfp4 else "")
            + "emit the ONNX build only",
        )  # fmt: skip
    array = _in_input_order(weight.dequantized(), order, parameter)  # [out, in]
    if parameter.kind == "conv1d":
        array = array.T
    if array.shape != parameter.shape:
        raise CompileError(
            f"{weight.bits}-bit weight of {parameter.name!r} is {list(weight.shape)} [out, in], "
            f"but the HF parameter is {list(parameter.shape)}",
            "report the model to the fdec developers",
        )
    found.floats[parameter.name] = np.ascontiguousarray(array)
    found.dequantized.append(parameter.name)
    log = logger.info if is_lm_head else logger.warning
    log("%d-bit weight %s written dequantized (float): %s", weight.bits, parameter.name, why)


def _in_input_order(array: np.ndarray, order: np.ndarray | None, parameter: Parameter):
    """A [out, in] weight whose inputs the graph gathers in `order`, in the inputs' order."""
    if order is None:
        return array
    if parameter.kind != "linear" or sorted(order) != list(range(array.shape[1])):
        raise CompileError(
            f"the graph gathers the inputs of {parameter.name!r} in an order the HF checkpoint "
            "cannot hold",
            "emit the ONNX build only, or report the model to the fdec developers",
        )
    natural = np.empty_like(array)
    natural[:, order] = array
    return natural


def _pack_all(
    found: _Collected, linear: list[Parameter]
) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]]:
    """Packed tensors of every quantized module, the config's quantization_config, the
    report's. `linear`: every nn.Linear weight (tied aliases too): those not packed are
    ignored by the scheme."""
    ignore = sorted({p.module for p in linear} - set(found.quantized))
    # Quantized weights written in float belong to modules the scheme must skip too.
    ignore += sorted({name.rpartition(".")[0] for name in found.dequantized} - set(ignore))
    first = next(iter(found.quantized.values()))  # one format (_one_width)
    if isinstance(first, Nvfp4):
        return nvfp4_checkpoint(found.quantized, ignore)
    if isinstance(first, Fp8):
        return fp8_checkpoint(found.quantized, ignore)
    weights = list(found.quantized.values())
    # One scheme for the whole checkpoint: a group size dividing every block and input size
    # (blocks past a layer's input size only pad it: K=64 in blocks of 128 is one group of 64).
    group_size = math.gcd(*(w.block_size for w in weights), *(w.shape[1] for w in weights))
    symmetric = all(w.symmetric for w in weights)
    bits = weights[0].bits  # one width (_one_width)
    tensors: dict[str, np.ndarray] = {}
    for module, weight in found.quantized.items():
        tensors.update(pack_weight(module, weight, group_size, symmetric))
    report = {
        "method": "compressed-tensors",
        "format": PACK_FORMAT,
        "num_bits": bits,
        "group_size": group_size,
        "block_sizes": sorted({w.block_size for w in weights}),
        "symmetric": symmetric,
        "graph_operators": sorted({w.operator for w in weights}),
        "ignore": ignore,
    }
    if group_size < min(w.block_size for w in weights):
        logger.info(
            "blocks %s are wider than some layer's input; scales written per %d",
            report["block_sizes"],
            group_size,
        )
    return tensors, quantization_config(group_size, symmetric, ignore, bits), report


# The source config's dtype names (config.json "dtype", "torch_dtype" before transformers 5).
_SOURCE_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def _in_source_dtype(
    floats: dict[str, np.ndarray], source_config: dict[str, Any]
) -> tuple[dict[str, np.ndarray], list[str]]:
    """The float tensors, each in the source's narrower dtype where that is exact (an untouched
    parameter of a bf16 source: half the bytes, same values), and the names so narrowed."""
    narrow = _SOURCE_DTYPES.get(source_config.get("dtype") or source_config.get("torch_dtype"))
    tensors, narrowed = dict(floats), []
    if narrow is None:
        return tensors, narrowed
    for name, array in floats.items():
        if array.dtype != np.float32:
            continue
        cast = array.astype(narrow)
        if np.array_equal(cast.astype(np.float32), array):
            tensors[name] = cast
            narrowed.append(name)
    return tensors, narrowed


def _check_no_graph_scaling(model: FdecModel) -> None:
    """Refuse a graph whose weights read activations scaled by an inserted Mul (SmoothQuant /
    AWQ scales that did not fold into a norm): the checkpoint has parameters only, and its
    weights, scaled by s, would be read unscaled."""
    from fdec.passes.smoothquant import SMOOTHING_MUL

    scaled = [node for node in model.graph if SMOOTHING_MUL in node.metadata_props]
    if scaled:
        raise CompileError(
            f"{len(scaled)} activations of this build are scaled by an inserted Mul "
            f"({scaled[0].metadata_props[SMOOTHING_MUL]}, e.g. {scaled[0].name!r}); the HF "
            "checkpoint holds parameters only",
            "smooth only where the scales fold into a norm (quantize-fp4 "
            "smoothing_folded_only=true, what --emit hf-checkpoint sets), or emit the ONNX "
            "build only",
        )


def _save(tensors: dict[str, np.ndarray], path: pathlib.Path) -> None:
    """safetensors through torch, which has FP8 (NVFP4's block scales: F8_E4M3) and bf16."""
    import torch
    from safetensors.torch import save_file

    def as_torch(array: np.ndarray) -> torch.Tensor:
        if array.dtype == ml_dtypes.float8_e4m3fn:
            return torch.from_numpy(array.view(np.uint8)).view(torch.float8_e4m3fn)
        if array.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        array = np.ascontiguousarray(array)  # torch wants writable memory
        return torch.from_numpy(array if array.flags.writeable else array.copy())

    save_file({k: as_torch(v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def write_hf_checkpoint(
    model: FdecModel,
    source_folder: pathlib.Path,
    out_dir: pathlib.Path,
    *,
    pack_lm_head: bool = False,
) -> dict[str, Any]:
    """Write `model` as a Hugging Face checkpoint into `out_dir`; returns a report.

    Float weights are written under their HF names and layouts, in the source's dtype (bf16,
    fp16) where that holds their values exactly (the source's own weights), else in the
    graph's (smoothed norms, dequantized weights: the values the graph computes); block
    quantized (int4 / int8-wo) weights of `nn.Linear` modules in compressed-tensors
    pack-quantized format (the lm_head only with `pack_lm_head`; one width, the most modules'),
    others dequantized. Raises CompileError when a parameter the HF class expects is missing
    from the graph.
    """
    source_folder, out_dir = pathlib.Path(source_folder), pathlib.Path(out_dir)
    source_config = json.loads((source_folder / _CONFIG_FILE).read_text())
    family = family_for_config(source_config, str(source_folder / _CONFIG_FILE))
    _check_no_graph_scaling(model)
    config, changes = _output_config(source_config, model)
    parameters, aliases = expected_parameters(config, model.spec.kind)
    found = _collect(model, parameters, family, pack_lm_head)

    tensors, narrowed = _in_source_dtype(found.floats, source_config)
    quantization: dict[str, Any] | None = None
    if found.quantized:
        linear = [p for p in parameters + aliases if p.kind == "linear"]
        packed, config["quantization_config"], quantization = _pack_all(found, linear)
        tensors.update(packed)
    elif found.dequantized:
        quantization = {"method": "quantized weights written dequantized", "format": "dense"}

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / _CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _save(tensors, out_dir / SAFETENSORS_FILE)
    files = [_CONFIG_FILE, SAFETENSORS_FILE]
    for name in _SIDE_FILES:
        path = source_folder / name
        if path.is_file():
            shutil.copyfile(path, out_dir / name)
            files.append(name)
    return {
        "format": (
            f"compressed-tensors {quantization['format']}" if found.quantized else "safetensors"
        ),
        "directory": str(out_dir),
        "files": files,
        "bytes": sum((out_dir / name).stat().st_size for name in files),
        "quantization": quantization,
        "tensors": len(tensors),
        "packed": sorted(found.quantized),
        "dequantized": found.dequantized,
        "kept": len(found.floats) - len(found.dequantized),
        "in_source_dtype": narrowed,
        "tied_aliases": [alias.name for alias in aliases],
        "buffers_skipped": found.buffers_skipped,
        "config_changes": changes,
    }
