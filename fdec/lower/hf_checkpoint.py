"""Lowering to a Hugging Face checkpoint (config.json + model.safetensors) for serving engines.

The graph's initializers are mapped back to the source model's parameter names: weights with
a role go through `ModelSpec.weights` (the family's parameter patterns name the role of each
HF parameter), every other parameter (norms, biases, position embeddings) kept its HF name in
the graph. The expected names, shapes and module types (`nn.Linear`, GPT-2's `Conv1D`, ...)
come from the HF model class built on the meta device from the written config, so the
checkpoint holds exactly the keys `from_pretrained` looks for. Linear weights read by MatMul
as [in, out] are transposed back to torch's [out, in]; Conv1D weights stay [in, out].

Weight-only int4 (`quantize-int4`, either backend) is written in compressed-tensors'
"pack-quantized" W4A16 format (what llm-compressor writes), which vLLM loads
(CompressedTensorsWNA16: Marlin/Machete kernels, zero points too), as does transformers with
the `compressed-tensors` package:

- `<module>.weight_packed`: int32 [out, ceil(in / 8)]; value i of a row sits in bits 4i..4i+3
  of the little-endian words, stored as `q + 8` for the signed code q in [-8, 7];
- `<module>.weight_scale`: [out, in / group_size] in the scales' float dtype;
- `<module>.weight_shape`: int64 [out, in];
- `<module>.weight_zero_point` (asymmetric only): int32 [ceil(out / 8), in / group_size],
  the signed zero points packed the same way along the output dimension;

dequantized as `(q - zero_point) * scale`, which equals MatMulNBits' `(code - zp) * scale`
and DequantizeLinear's `(x - zp) * scale` exactly (q = code - 8, zero_point = zp - 8).
Only `nn.Linear` modules can be packed: a quantized weight of another module (GPT-2's
Conv1D) is written dequantized, in float, and listed in the config's `ignore`. So is a
quantized lm_head unless `pack_lm_head=True`: vLLM before PR #37291 (2026) and SGLang load a
packed lm_head as an unquantized embedding (an error, or silently garbage logits), and
llm-compressor's own recipes leave it out. Dequantized weights hold exactly the values the
ONNX graph computes, so the checkpoint's numerics equal the ONNX build's either way.

Transformers + compressed-tensors 0.20 cannot load *asymmetric* pack-quantized checkpoints
with the default `from_pretrained` (it builds zero points unpacked on the meta device:
llm-compressor issue #1618); `quantization_config=CompressedTensorsConfig(dequantize=True)`
loads them, and vLLM reads the packed zero points.
Dynamic int8 (`quantize-int8`) has no format serving engines load with the same numerics and
is refused with a UsageError.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import shutil
from typing import Any

import numpy as np
import onnx_ir as ir

from fdec.errors import CompileError, UsageError
from fdec.frontend.families import family_for_config
from fdec.ir import FdecModel

__all__ = [
    "CHECKPOINT_DIR",
    "SAFETENSORS_FILE",
    "SUPPORTED_QUANTIZE",
    "check_quantize",
    "write_hf_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "hf-checkpoint"
SAFETENSORS_FILE = "model.safetensors"
# `--quantize` values whose builds this lowering writes (None: full precision).
SUPPORTED_QUANTIZE = ("int4", "int4-rtn")
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
_MS_DOMAIN = "com.microsoft"
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)
_INT4_TYPES = (ir.DataType.INT4, ir.DataType.UINT4)
_PACK_FORMAT = "pack-quantized"


def check_quantize(asked: str | None) -> None:
    """Refuse, before any work, a `--quantize` value whose build this lowering cannot write."""
    if not asked or asked.lower() in ("none", "fp32", "fp32-none", *SUPPORTED_QUANTIZE):
        return
    raise UsageError(
        f"--emit hf-checkpoint cannot write a --quantize {asked} build: serving engines load "
        "no checkpoint format with its numerics",
        f"use --quantize {' or '.join(SUPPORTED_QUANTIZE)} (compressed-tensors pack-quantized), "
        "or --quantize none for a full-precision checkpoint",
    )


# --- what the HF model class expects ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Parameter:
    """One tensor of the HF state dict: its name, shape and the kind of module owning it."""

    name: str
    shape: tuple[int, ...]
    module: str  # owning module's name
    kind: str  # "linear" (torch [out, in]) | "conv1d" ([in, out]) | "other"
    buffer: bool = False


def _expected_parameters(config: dict[str, Any], kind: str) -> tuple[list[_Parameter], list[str]]:
    """The state dict the HF class of `config` loads, tied aliases left out; and those aliases.

    The model is built on the meta device (no memory, no weights), from the config written.
    """
    import torch
    import transformers
    from transformers.pytorch_utils import Conv1D

    hf_config = transformers.AutoConfig.for_model(**config)
    auto = transformers.AutoModelForCausalLM if kind == "decoder" else transformers.AutoModel
    try:
        with torch.device("meta"):
            hf_model = auto.from_config(hf_config)
    except (ValueError, KeyError, TypeError) as err:
        raise CompileError(
            f"transformers cannot build the model class of this config: {err}",
            "report the model to the fdec developers",
        ) from err
    modules = dict(hf_model.named_modules())
    parameters: list[_Parameter] = []
    aliases: list[str] = []
    seen: set[int] = set()
    for name, tensor in hf_model.named_parameters(remove_duplicate=False):
        if id(tensor) in seen:
            aliases.append(name)
            continue
        seen.add(id(tensor))
        owner = name.rpartition(".")[0]
        module = modules.get(owner)
        kind_of = (
            "linear"
            if isinstance(module, torch.nn.Linear)
            else "conv1d"
            if isinstance(module, Conv1D)
            else "other"
        )
        parameters.append(_Parameter(name, tuple(tensor.shape), owner, kind_of))
    state = hf_model.state_dict()
    names = {p.name for p in parameters} | set(aliases)
    for name, tensor in state.items():
        if name not in names:  # a persistent buffer
            parameters.append(
                _Parameter(name, tuple(tensor.shape), name.rpartition(".")[0], "other", True)
            )
    return parameters, aliases


# --- reading weights back from the graph --------------------------------------------------------


def _direct_layout(node: ir.Node, index: int) -> str | None:
    """How a node reads a 2-D input: "kn" (as MatMul's B, [in, out]), "nk" ([out, in]) or None."""
    if node.domain != "" or index != 1:
        return None
    if node.op_type == "MatMul":
        return "kn"
    if node.op_type == "Gemm":
        attr = node.attributes.get("transB")
        return "nk" if attr is not None and attr.as_int() else "kn"
    return None


def _read_layout(value: ir.Value) -> str | None:
    """The layout every matmul reading `value` sees it in; None when none or ambiguous."""
    layouts: set[str | None] = set()
    flip = {"kn": "nk", "nk": "kn", None: None}
    for use in value.uses():
        node = use.node
        if node.op_type == "Transpose" and node.domain == "":
            perm = node.attributes.get("perm")
            if perm is not None and list(perm.as_ints()) != [1, 0]:
                return None
            for inner in node.outputs[0].uses():
                layouts.add(flip[_direct_layout(inner.node, inner.idx)])
            continue
        layouts.add(_direct_layout(node, use.idx))
    layouts.discard(None)
    return layouts.pop() if len(layouts) == 1 else None


def _float_tensor(value: ir.Value, parameter: _Parameter) -> np.ndarray:
    """The float initializer `value` in the HF layout of `parameter`."""
    array = value.const_value.numpy()
    want = parameter.shape
    if array.ndim == 2 and parameter.kind in ("linear", "conv1d"):
        hf_layout = "nk" if parameter.kind == "linear" else "kn"
        layout = _read_layout(value)
        if layout is not None and layout != hf_layout:
            array = array.T
        elif layout is None and array.shape != want and array.T.shape == want:
            array = array.T
    if array.shape != want:
        if array.size == math.prod(want) and len(want) <= 1:
            array = array.reshape(want)
        else:
            raise CompileError(
                f"graph weight {value.name!r} is {list(array.shape)}, but the HF parameter "
                f"{parameter.name!r} is {list(want)}",
                "report the model to the fdec developers",
            )
    return np.ascontiguousarray(array)


@dataclasses.dataclass
class _Int4:
    """A 4-bit weight in one canonical form, whichever graph operator reads it.

    `codes` are uint8 [N, K] in 0..15 and `zero_points` uint8 [N, k_blocks] in 0..15 (8 for
    symmetric); the weight is `(codes - zero_points) * scales`, block by block along K.
    """

    codes: np.ndarray
    scales: np.ndarray  # [N, k_blocks], the graph's float dtype
    zero_points: np.ndarray
    block_size: int
    operator: str  # "MatMulNBits" | "DequantizeLinear"

    @property
    def shape(self) -> tuple[int, int]:  # [N, K] = [out, in]
        return self.codes.shape

    @property
    def symmetric(self) -> bool:
        return bool(np.all(self.zero_points == 8))

    def dequantized(self) -> np.ndarray:
        """The float [N, K] weight, computed as ONNX Runtime does: (code - zp) * scale."""
        k = self.shape[1]
        dtype = self.scales.dtype
        scales = np.repeat(self.scales, self.block_size, axis=1)[:, :k]
        zero = np.repeat(self.zero_points, self.block_size, axis=1)[:, :k]
        return (self.codes.astype(dtype) - zero.astype(dtype)) * scales


def _nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    """uint8 [..., m] → uint8 [..., count], low nibble first."""
    values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    return values[..., :count]


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _const(value: ir.Value | None, what: str, weight: str) -> np.ndarray:
    if value is None or value.const_value is None:
        raise CompileError(
            f"the {what} of quantized weight {weight!r} is not a constant",
            "report the model to the fdec developers",
        )
    return value.const_value.numpy()


def _from_matmulnbits(node: ir.Node, name: str) -> _Int4:
    bits, k, n = _int_attr(node, "bits", 4), _int_attr(node, "K", 0), _int_attr(node, "N", 0)
    block = _int_attr(node, "block_size", 0)
    if bits != 4:
        raise CompileError(f"MatMulNBits weight {name!r} has {bits} bits; only 4 are written")
    if len(node.inputs) > 4 and node.inputs[4] is not None:
        raise CompileError(
            f"MatMulNBits weight {name!r} has g_idx (act-order)", "quantize without act-order"
        )
    packed = _const(node.inputs[1], "packed weight", name)
    k_blocks = -(-k // block)
    codes = _nibbles(packed.reshape(n, -1), k_blocks * block)[:, :k]
    scales = _const(node.inputs[2], "scales", name).reshape(n, k_blocks)
    zp_value = node.inputs[3] if len(node.inputs) > 3 else None
    if zp_value is None:
        zero_points = np.full((n, k_blocks), 8, dtype=np.uint8)
    else:
        zp = _const(zp_value, "zero points", name)
        if zp.dtype != np.uint8:
            raise CompileError(
                f"MatMulNBits weight {name!r} has {zp.dtype} zero points; only packed uint8 "
                "zero points are written",
                "quantize with fdec's quantize-int4",
            )
        zero_points = _nibbles(zp.reshape(n, -1), k_blocks)
    return _Int4(codes, scales, zero_points.astype(np.uint8), block, "MatMulNBits")


def _from_dequantize(node: ir.Node, value: ir.Value, name: str) -> _Int4:
    if _int_attr(node, "axis", 1) != 0 or not node.attributes.get("block_size"):
        raise CompileError(
            f"int4 weight {name!r} is not dequantized in blocks along its input axis",
            "quantize with fdec's quantize-int4",
        )
    for use in node.outputs[0].uses():
        if _direct_layout(use.node, use.idx) != "kn":
            raise CompileError(
                f"dequantized int4 weight {name!r} is read by {use.node.op_type}, not as "
                "MatMul's B",
                "quantize with fdec's quantize-int4",
            )
    block = _int_attr(node, "block_size", 0)
    signed = value.const_value.dtype == ir.DataType.INT4
    offset = 8 if signed else 0
    x = value.const_value.numpy().astype(np.int16)  # [K, N]
    codes = (x + offset).T.astype(np.uint8)
    scales = _const(node.inputs[1], "scales", name).T  # [k_blocks, N] → [N, k_blocks]
    zp_value = node.inputs[2] if len(node.inputs) > 2 else None
    if zp_value is None:
        zero_points = np.full(scales.shape, offset, dtype=np.uint8)
    else:
        zero_points = (_const(zp_value, "zero points", name).astype(np.int16) + offset).T
    return _Int4(
        np.ascontiguousarray(codes),
        np.ascontiguousarray(scales),
        np.ascontiguousarray(zero_points.astype(np.uint8)),
        block,
        "DequantizeLinear",
    )


def _int4_of(value: ir.Value) -> _Int4 | None:
    """The int4 weight stored in `value` (MatMulNBits or blocked DequantizeLinear), or None.

    Raises UsageError for int8 (MatMulInteger) weights, CompileError for other encodings.
    """
    name = value.name or "?"
    readers = [(use.node, use.idx) for use in value.uses()]
    for node, index in readers:
        if node.domain == _MS_DOMAIN and node.op_type == "MatMulNBits" and index == 1:
            return _from_matmulnbits(node, name)
        if node.domain == "" and node.op_type == "DequantizeLinear" and index == 0:
            if value.const_value.dtype in _INT4_TYPES:
                return _from_dequantize(node, value, name)
        if node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"):
            raise UsageError(
                f"--emit hf-checkpoint cannot write int8 weights ({name!r} is read by "
                f"{node.op_type}): serving engines load no checkpoint format with dynamic int8's "
                "per-tensor run-time activations",
                f"use --quantize {' or '.join(SUPPORTED_QUANTIZE)} (compressed-tensors "
                "pack-quantized), or --quantize none for a full-precision checkpoint",
            )
    ops = ", ".join(sorted({node.op_type for node, _ in readers})) or "nothing"
    raise CompileError(
        f"weight {name!r} is {value.const_value.dtype} read by {ops}; the HF checkpoint writes float and "
        "int4 (MatMulNBits, blocked DequantizeLinear) weights only",
        "drop the pass that produced it, or emit the ONNX build only",
    )


# --- compressed-tensors pack-quantized -----------------------------------------------------------


def _pack_int32(unsigned: np.ndarray) -> np.ndarray:
    """uint8 [rows, cols] of 0..15 → int32 [rows, ceil(cols / 8)], value i at bits 4i..4i+3."""
    rows, cols = unsigned.shape
    padded = np.zeros((rows, -(-cols // 8) * 8), dtype=np.uint8)
    padded[:, :cols] = unsigned
    pairs = padded.reshape(rows, -1, 2)
    packed = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
    return np.ascontiguousarray(packed).view("<i4").astype(np.int32)


def _regroup(blocks: np.ndarray, block_size: int, group_size: int, k: int) -> np.ndarray:
    """Per-block values [N, k_blocks] as per-group values [N, k / group_size]."""
    return np.repeat(blocks, block_size // group_size, axis=1)[:, : k // group_size]


def _pack_weight(module: str, weight: _Int4, group_size: int, symmetric: bool) -> dict:
    n, k = weight.shape
    tensors = {
        f"{module}.weight_packed": _pack_int32(weight.codes),
        f"{module}.weight_scale": np.ascontiguousarray(
            _regroup(weight.scales, weight.block_size, group_size, k)
        ),
        f"{module}.weight_shape": np.array([n, k], dtype=np.int64),
    }
    if not symmetric:
        zero_points = _regroup(weight.zero_points, weight.block_size, group_size, k)
        tensors[f"{module}.weight_zero_point"] = np.ascontiguousarray(
            _pack_int32(np.ascontiguousarray(zero_points.T)).T
        )
    return tensors


def _quantization_config(group_size: int, symmetric: bool, ignore: list[str]) -> dict[str, Any]:
    """compressed-tensors' QuantizationConfig of a W4A16 group-quantized checkpoint."""
    return {
        "quant_method": "compressed-tensors",
        "format": _PACK_FORMAT,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": symmetric,
                    "group_size": group_size,
                    "strategy": "group",
                    "dynamic": False,
                    "actorder": None,
                    "block_structure": None,
                },
                "input_activations": None,
                "output_activations": None,
                "format": _PACK_FORMAT,
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


# --- the lowering ---------------------------------------------------------------------------------


def _output_config(source: dict[str, Any], model: FdecModel) -> tuple[dict[str, Any], list[str]]:
    """The source config as the written weights need it, and what was changed."""
    config = dict(source)
    changes: list[str] = []
    if config.pop("quantization_config", None) is not None:
        changes.append("dropped the source's quantization_config")
    spec = model.spec
    untied = not spec.tie_word_embeddings and spec.weights.get("lm_head") not in (
        None,
        spec.weights.get("embed"),
    )
    if untied and config.get("tie_word_embeddings", True):
        config["tie_word_embeddings"] = False
        changes.append("tie_word_embeddings=false (the lm_head has its own weight)")
    changes += _pruned_sizes(config, spec)
    return config, changes


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


def _graph_value(model: FdecModel, parameter: _Parameter, family: Any) -> ir.Value | None:
    """The initializer holding `parameter`: through its role when it has one, else its name."""
    role = family.role_of(parameter.name)
    name = model.spec.weights.get(role) if role else None
    return model.graph.initializers.get(name or parameter.name)


@dataclasses.dataclass
class _Collected:
    """The checkpoint's tensors before packing: float ones, and int4 ones to pack per module."""

    floats: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    quantized: dict[str, _Int4] = dataclasses.field(default_factory=dict)  # module → weight
    dequantized: list[str] = dataclasses.field(default_factory=list)
    buffers_skipped: list[str] = dataclasses.field(default_factory=list)


def _collect(
    model: FdecModel, parameters: list[_Parameter], family: Any, pack_lm_head: bool
) -> _Collected:
    """Every expected HF tensor read back from the graph, in HF layout or as int4 to pack."""
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
        if value.const_value.dtype in _FLOAT_TYPES:
            found.floats[parameter.name] = _float_tensor(value, parameter)
            continue
        weight = _int4_of(value)
        is_lm_head = family.role_of(parameter.name) == "lm_head"
        if (
            parameter.kind == "linear"
            and weight.shape == parameter.shape
            and (pack_lm_head or not is_lm_head)
        ):
            found.quantized[parameter.module] = weight
            continue
        # Not an nn.Linear (GPT-2's Conv1D), or an lm_head engines would not read packed:
        # write it in float, with the values the graph computes.
        array = weight.dequantized()  # [out, in]
        if parameter.kind == "conv1d":
            array = array.T
        if array.shape != parameter.shape:
            raise CompileError(
                f"int4 weight {value.name!r} is {list(weight.shape)} [out, in], but the HF "
                f"parameter {parameter.name!r} is {list(parameter.shape)}",
                "report the model to the fdec developers",
            )
        found.floats[parameter.name] = np.ascontiguousarray(array)
        found.dequantized.append(parameter.name)
        log = logger.info if is_lm_head else logger.warning
        log("int4 weight %s written dequantized (float): no packed format loads it", value.name)
    return found


def _pack_all(
    found: _Collected, parameters: list[_Parameter]
) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]]:
    """Packed tensors of every int4 module, the config's quantization_config, the report's."""
    weights = list(found.quantized.values())
    # One scheme for the whole checkpoint: a group size dividing every block and input size
    # (blocks past a layer's input size only pad it: K=64 in blocks of 128 is one group of 64).
    group_size = math.gcd(*(w.block_size for w in weights), *(w.shape[1] for w in weights))
    symmetric = all(w.symmetric for w in weights)
    tensors: dict[str, np.ndarray] = {}
    for module, weight in found.quantized.items():
        tensors.update(_pack_weight(module, weight, group_size, symmetric))
    linear = {p.module for p in parameters if p.kind == "linear"}
    ignore = sorted(linear - set(found.quantized))
    # Quantized weights written in float belong to modules the scheme must skip too.
    ignore += sorted({name.rpartition(".")[0] for name in found.dequantized} - set(ignore))
    report = {
        "method": "compressed-tensors",
        "format": _PACK_FORMAT,
        "num_bits": 4,
        "group_size": group_size,
        "block_sizes": sorted({w.block_size for w in weights}),
        "symmetric": symmetric,
        "graph_operators": sorted({w.operator for w in weights}),
        "ignore": ignore,
    }
    if group_size < min(w.block_size for w in weights):
        logger.info(
            "int4 blocks %s are wider than some layer's input; scales written per %d",
            report["block_sizes"],
            group_size,
        )
    return tensors, _quantization_config(group_size, symmetric, ignore), report


def write_hf_checkpoint(
    model: FdecModel,
    source_folder: pathlib.Path,
    out_dir: pathlib.Path,
    *,
    pack_lm_head: bool = False,
) -> dict[str, Any]:
    """Write `model` as a Hugging Face checkpoint into `out_dir`; returns a report.

    Float weights are written in the graph's dtype under their HF names and layouts; int4
    weights of `nn.Linear` modules in compressed-tensors pack-quantized format (the lm_head
    only with `pack_lm_head`), others dequantized. Raises UsageError for int8 builds,
    CompileError when a parameter the HF class expects is missing from the graph.
    """
    from safetensors.numpy import save_file

    source_folder, out_dir = pathlib.Path(source_folder), pathlib.Path(out_dir)
    source_config = json.loads((source_folder / _CONFIG_FILE).read_text())
    family = family_for_config(source_config, str(source_folder / _CONFIG_FILE))
    config, changes = _output_config(source_config, model)
    parameters, aliases = _expected_parameters(config, model.spec.kind)
    found = _collect(model, parameters, family, pack_lm_head)

    tensors: dict[str, np.ndarray] = dict(found.floats)
    quantization: dict[str, Any] | None = None
    if found.quantized:
        packed, config["quantization_config"], quantization = _pack_all(found, parameters)
        tensors.update(packed)
    elif found.dequantized:
        quantization = {"method": "int4 written dequantized", "format": "dense"}

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / _CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out_dir / SAFETENSORS_FILE), metadata={"format": "pt"})
    files = [_CONFIG_FILE, SAFETENSORS_FILE]
    for name in _SIDE_FILES:
        path = source_folder / name
        if path.is_file():
            shutil.copyfile(path, out_dir / name)
            files.append(name)
    return {
        "format": f"compressed-tensors {_PACK_FORMAT}" if found.quantized else "safetensors",
        "directory": str(out_dir),
        "files": files,
        "bytes": sum((out_dir / name).stat().st_size for name in files),
        "quantization": quantization,
        "tensors": len(tensors),
        "packed": sorted(found.quantized),
        "dequantized": found.dequantized,
        "kept": len(found.floats) - len(found.dequantized),
        "tied_aliases": aliases,
        "buffers_skipped": found.buffers_skipped,
        "config_changes": changes,
    }
