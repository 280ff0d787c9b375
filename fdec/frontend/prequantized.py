"""Checkpoints another tool quantized to 4 or 8 bits (GPTQ, AWQ, compressed-tensors), read as the
float weights their groups stand for.

Such a folder's linear layers hold packed 4- or 8-bit codes, a scale per group of inputs and (mostly) an
integer zero point per group instead of a weight. fdec turns the folder once into a float folder
(cached like a GGUF conversion: fdec.frontend.source): each quantized layer's weight becomes
(code − zero point) · scale in float32, which is exact, and every other tensor and file is kept.
PyTorch then loads it as any model (the reference fdec verifies against is the quantized model
itself), and the int4 quantizers find each layer's blocks again in those values
(fdec.passes.int4_codes.integer_grid) and keep them instead of rounding again: the build's int4
(int8-wo for an 8-bit checkpoint) weights are the checkpoint's, bit for bit.

Formats (config.json `quantization_config`):
- GPTQ (`quant_method` "gptq", AutoGPTQ / GPTQModel; `bits` 4 or 8): `qweight` int32
  [K·bits/32, N] packed along the inputs, `qzeros` int32 [groups, N·bits/32] packed along the
  outputs and stored minus one (`checkpoint_format` "gptq"; "gptq_v2" stores them as they are),
  `scales` [groups, N], `g_idx` [K].
- AWQ (`quant_method` "awq", AutoAWQ's GEMM layout): `qweight` [K, N/8] and `qzeros`
  [groups, N/8], both packed along the outputs in the order 0 2 4 6 1 3 5 7, `scales` [groups, N].
- compressed-tensors `pack-quantized` (llm-compressor's W4A16 / W8A16): `weight_packed` int32
  [N, K·bits/32] holding code + 2^(bits−1), `weight_scale` [N, groups], `weight_zero_point` int32
  [N·bits/32, groups] (asymmetric only, offset the same way), `weight_shape`, and `weight_g_idx`
  where groups follow activation order.
- compressed-tensors `nvfp4-pack-quantized` (NVFP4: llm-compressor, ModelOpt's models converted,
  fdec's own `--emit hf-checkpoint`; method "nvfp4" here): `weight_packed` uint8 [N, K/2], two
  E2M1 codes a byte (low nibble first), `weight_scale` float8_e4m3fn [N, K/16],
  `weight_global_scale` [1]; the weight is E2M1 · weight_scale / weight_global_scale, as
  compressed-tensors computes it. A W4A4 checkpoint's `input_global_scale` is not read: the
  build calibrates its own activations. On a target and backend that run FP4 (Blackwell,
  TensorRT) such a source builds `fp4-wo` by default: re-quantizing its float values gives
  its codes back where each block holds a ±6 code (round-to-nearest checkpoints: ModelOpt's
  and llm-compressor's NVFP4 without GPTQ), and quantize-fp4 keeps such weights' codes
  instead of rounding them by GPTQ again; elsewhere the target's own recipe applies.

- FP8 (compressed-tensors `float-quantized`, transformers' `fp8`, `fbgemm_fp8`, ModelOpt's
  FP8 algorithms; method "fp8" here): `weight` float8_e4m3fn [N, K] times a scale per tensor,
  channel or block (fdec.frontend.fp8_checkpoint). On a target and backend that run FP8 such
  a source builds `fp8`, whose quantizer keeps the codes of tensor- and channel-scaled weights.

Per-layer formats (GPTQModel's `dynamic`: regex → overrides, the first rule matching a layer's
name from its start wins): "-:" rules leave their layers in float (the checkpoint holds their
`weight`), the others override `bits` (4 or 8), `group_size` and `sym` for their layers, which
are read at their own width. The widths a checkpoint uses are kept in the float folder's record
(SOURCE_KEY "widths"): an int4 build keeps its 8-bit layers' blocks at 8 bits.

Activation order (GPTQ `desc_act`, compressed-tensors `actorder` "group"): a layer's groups are
not consecutive inputs; its `g_idx` names each input's group. The float weight is exact all the
same; the inputs sorted by group make consecutive blocks again, and that order is kept beside the
weights (INPUT_ORDER_FILE) for the import to re-lay each such layer's inputs in it
(fdec.frontend.input_order): the int4 blocks are then found and kept like any others.
Refused, with the reason: other bit widths (AWQ: 4 only), groups of unequal sizes, AWQ's GEMV
layouts, and any other method.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np

from fdec.errors import InputError
from fdec.frontend.fp8_checkpoint import (
    DROPPED_SCALES,
    Fp8Scheme,
    float_method,
    fp8_scheme,
    fp8_weight,
    modelopt_nvfp4,
    with_modelopt,
)

__all__ = [
    "INPUT_ORDER_FILE",
    "METHODS",
    "SOURCE_KEY",
    "SOURCE_QUANTIZE",
    "QuantizedCheckpoint",
    "dequantize_folder",
    "quantized_checkpoint",
    "source_quantization",
    "source_recipe",
    "source_widths",
]

_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds output column 8c + order[i]
_NAMES = {"gptq": "GPTQ", "awq": "AWQ"}  # methods whose config has bits / group_size
METHODS = (
    *_NAMES,
    "compressed-tensors",
    "nvfp4",
    "fp8",
)  # read here ("nvfp4": compressed-tensors')
_BITS = {"gptq": (4, 8), "awq": (4,), "compressed-tensors": (4, 8), "nvfp4": (4,), "fp8": (8,)}
# Float formats: the --quantize keeping their codes where the target and backend run the
# precision (fdec's fp4-wo quantizer keeps NVFP4 codes, fp8's the FP8 ones).
_FLOAT_RECIPES = {"nvfp4": ("fp4", "fp4-wo"), "fp8": ("fp8", "fp8")}
_NVFP4_FORMAT = "nvfp4-pack-quantized"
_NVFP4_BLOCK = 16
# The --quantize a source of each width builds without one: the recipe that keeps its blocks.
SOURCE_QUANTIZE = {4: "int4-awq", 8: "int8-wo"}
# config.json key recording, in the float folder, what the checkpoint was
SOURCE_KEY = "fdec_source_quantization"
# Written beside the float weights: each activation-ordered layer's input order (weight name →
# the inputs sorted by group), in safetensors' format (no pickles, the same bytes every time),
# named so that nothing takes it for the model's weights.
INPUT_ORDER_FILE = "fdec-input-order.tensors"
_FLOAT_FIX = "give fdec the original float checkpoint; it quantizes it itself (--quantize int4-awq)"


@dataclasses.dataclass(frozen=True)
class QuantizedCheckpoint:
    """How a checkpoint's linear layers are stored (see the module's docstring)."""

    method: str  # "gptq" | "awq" | "compressed-tensors" | "nvfp4" | "fp8"
    group_size: int  # -1: one group over all inputs
    symmetric: bool
    zeros_minus_one: bool = False  # GPTQ's v1 checkpoints
    bits: int = 4
    # GPTQModel's `dynamic` rules, in order: (pattern with its "-:"/"+:" prefix, overrides)
    dynamic: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    fp8: Fp8Scheme | None = None  # an FP8 checkpoint's layout
    modelopt: bool = False  # NVFP4 in ModelOpt's own names (`weight`, `weight_scale_2`)

    def for_layer(self, name: str) -> QuantizedCheckpoint | None:
        """The format of the layer `name` (its prefix, "model.layers.0.mlp.down_proj"): the
        first `dynamic` rule matching it decides, "-:" ones leaving it float (None), the others
        overriding bits / group_size / sym; this format where none matches."""
        for pattern, overrides in self.dynamic:
            if re.match(pattern.removeprefix("-:").removeprefix("+:"), name):
                if pattern.startswith("-:"):
                    return None
                given = dict(overrides)
                return dataclasses.replace(
                    self,
                    bits=int(given.get("bits", self.bits)),
                    group_size=int(given.get("group_size", self.group_size)),
                    symmetric=bool(given.get("sym", self.symmetric)),
                    dynamic=(),
                )
        return self

    @property
    def packed(self) -> str:
        """The name of a quantized layer's packed codes."""
        if self.fp8 or self.modelopt:
            return "weight"
        return "weight_packed" if self.method in ("compressed-tensors", "nvfp4") else "qweight"

    @property
    def marker(self) -> str:
        """The tensor only a quantized layer holds (an FP8 or ModelOpt layer's `weight` is a
        float's name)."""
        return self.fp8.scale if self.fp8 else "weight_scale_2" if self.modelopt else self.packed

    @property
    def tensors(self) -> str:
        """The key of its layers' tensors in _REQUIRED and _LAYER_TENSORS."""
        return "nvfp4-modelopt" if self.modelopt else self.method

    def describe(self) -> str:
        if self.method == "nvfp4":
            tool = "ModelOpt" if self.modelopt else "compressed-tensors"
            return f"{tool} NVFP4 (E2M1, FP8 scales per 16)"
        if self.fp8:
            return self.fp8.describe()
        group = "per channel" if self.group_size == -1 else f"group {self.group_size}"
        kind = "symmetric" if self.symmetric else "asymmetric"
        rules = f", {len(self.dynamic)} dynamic rules" if self.dynamic else ""
        return f"{self.method} int{self.bits}, {group}, {kind}{rules}"


def source_quantization(config: dict) -> tuple[str, int] | None:
    """(method, bits) of a checkpoint quantized by a method fdec reads ("gptq", "awq",
    "compressed-tensors"; 4 or 8 bits) that a config.json names: a checkpoint's
    `quantization_config`, or the float folder fdec converted it into (SOURCE_KEY); None for
    anything else (a float model, or one `quantized_checkpoint` refuses)."""
    quantization = config.get("quantization_config") or config.get(SOURCE_KEY)
    if not isinstance(quantization, dict):
        return None
    method, bits = float_method(quantization) or (
        quantization.get("quant_method", quantization.get("method")),
        quantization.get("bits"),
    )
    if method not in METHODS:
        return None
    return (method, bits) if bits in _BITS[method] else None


def source_recipe(
    found: tuple[str, int] | None, target: Any = None, backend: Any = None
) -> str | None:
    """The --quantize that keeps the blocks of a quantized source (`source_quantization`'s
    (method, bits)): SOURCE_QUANTIZE by width; for an NVFP4 one fp4-wo and for an FP8 one fp8
    (their quantizers keep the codes they find in its float values) where `target` and
    `backend` run that precision, else None (the target's own recipe). None for a float
    source."""
    if not found:
        return None
    if found[0] in _FLOAT_RECIPES:
        precision, recipe = _FLOAT_RECIPES[found[0]]
        runs = target is not None and target.supports(precision)
        return recipe if runs and (backend is None or precision in backend.precisions) else None
    return SOURCE_QUANTIZE[found[1]]


def source_widths(config: dict) -> tuple[int, ...]:
    """The bit widths of a converted checkpoint's layers (fdec's float folder, SOURCE_KEY;
    several where GPTQModel's `dynamic` stored some layers at another width), () for others."""
    found = config.get(SOURCE_KEY)
    if not isinstance(found, dict):
        return ()
    return tuple(found.get("widths") or ([found["bits"]] if "bits" in found else []))


def _refuse(folder: pathlib.Path, what: str, why: str, fix: str = _FLOAT_FIX) -> InputError:
    return InputError(f"{folder} holds a {what} checkpoint {why}", fix)


def quantized_checkpoint(config: dict, folder: pathlib.Path) -> QuantizedCheckpoint | None:
    """The format of a checkpoint quantized by another tool that fdec reads, None for a float
    checkpoint; InputError (naming what is not supported) for any other quantized one."""
    quantization = with_modelopt(config, folder).get("quantization_config")
    if not isinstance(quantization, dict) or not quantization:
        return None
    found = (float_method(quantization) or ("",))[0]
    if found == "fp8":
        return QuantizedCheckpoint("fp8", -1, symmetric=True, bits=8,
                                   fp8=fp8_scheme(quantization, folder))  # fmt: skip
    if found == "nvfp4" and str(quantization.get("quant_method")).startswith("modelopt"):
        modelopt_nvfp4(quantization, folder)  # refuses other group sizes, AWQ's pre-scales
        return QuantizedCheckpoint("nvfp4", _NVFP4_BLOCK, symmetric=True, bits=4, modelopt=True)
    method = str(quantization.get("quant_method") or "unknown method")
    if method in _NAMES:
        bits, group = quantization.get("bits"), quantization.get("group_size", 128)
        if bits not in _BITS[method]:
            widths = " and ".join(map(str, _BITS[method]))
            raise _refuse(folder, f"{_NAMES[method]} {bits}-bit", f"(fdec reads {widths}-bit ones)")
        if method == "awq" and str(quantization.get("version", "gemm")).lower() != "gemm":
            raise _refuse(
                folder, f"AWQ {quantization.get('version')}", "(fdec reads AWQ's GEMM layout)"
            )
        if method == "awq" and quantization.get("zero_point") is False:
            raise _refuse(folder, "AWQ", "without zero points (fdec reads zero_point=true)")
        return QuantizedCheckpoint(
            method,
            int(group),
            symmetric=bool(quantization.get("sym", False)) if method == "gptq" else False,
            zeros_minus_one=method == "gptq"
            and quantization.get("checkpoint_format", "gptq") != "gptq_v2",
            bits=bits,
            dynamic=_dynamic_rules(quantization.get("dynamic"), folder) if method == "gptq" else (),
        )
    if method == "compressed-tensors":
        return _compressed_tensors(quantization, folder)
    bits = quantization.get("bits")
    what = f"{method}, {bits}-bit" if isinstance(bits, int) else method
    raise InputError(
        f"{folder} holds an already quantized checkpoint (config.json quantization_config: "
        f"{what}); fdec reads GPTQ, AWQ, compressed-tensors int4 (and int8), NVFP4 and FP8 ones",
        "give fdec the original float checkpoint it was made from; fdec quantizes it itself "
        "(--quantize int4-awq, int8, fp8, ...)",
    )


def _dynamic_rules(rules: Any, folder: pathlib.Path) -> tuple:
    """GPTQModel's `dynamic` (pattern → overrides) as QuantizedCheckpoint.dynamic, refusing
    what fdec cannot read (a width other than 4 or 8, a pattern that is no regex)."""
    if not rules:
        return ()
    if not isinstance(rules, dict):
        raise _refuse(folder, "GPTQ", "whose `dynamic` is not a mapping of patterns to overrides")
    found = []
    for pattern, overrides in rules.items():
        try:
            re.compile(pattern.removeprefix("-:").removeprefix("+:"))
        except re.error as err:
            what = f"whose dynamic rule {pattern!r} is no regex ({err})"
            raise _refuse(folder, "GPTQ", what) from None
        overrides = overrides if isinstance(overrides, dict) else {}
        if not pattern.startswith("-:") and overrides.get("bits", 4) not in _BITS["gptq"]:
            raise _refuse(
                folder, "GPTQ", f"whose dynamic rule {pattern!r} stores {overrides['bits']}-bit "
                "layers (fdec reads 4- and 8-bit ones)",
            )  # fmt: skip
        kept = ("bits", "group_size", "sym")
        found.append((pattern, tuple((k, overrides[k]) for k in kept if k in overrides)))
    return tuple(found)


def _compressed_tensors(quantization: dict, folder: pathlib.Path) -> QuantizedCheckpoint:
    groups = [g for g in (quantization.get("config_groups") or {}).values() if isinstance(g, dict)]
    formats = {g.get("format") or quantization.get("format") for g in groups}
    if formats == {_NVFP4_FORMAT}:  # W4A4 and W4A16 groups alike: the weights are read
        for group in groups:
            weights = group.get("weights") or {}
            if (weights.get("num_bits"), weights.get("type"), weights.get("group_size")) != (
                4, "float", _NVFP4_BLOCK,
            ):  # fmt: skip
                raise _refuse(
                    folder, "compressed-tensors NVFP4", "whose weights are not FP4 in groups of "
                    f"{_NVFP4_BLOCK} (fdec reads NVFP4)",
                )  # fmt: skip
        return QuantizedCheckpoint("nvfp4", _NVFP4_BLOCK, symmetric=True, bits=4)
    if formats != {"pack-quantized"} or len(groups) != 1:
        raise _refuse(
            folder, "compressed-tensors", f"in format {sorted(map(str, formats))} "
            "(fdec reads one pack-quantized group, llm-compressor's W4A16, or NVFP4)",
        )  # fmt: skip
    weights, scheme = groups[0].get("weights") or {}, groups[0]
    if scheme.get("input_activations") or scheme.get("output_activations"):
        raise _refuse(
            folder, "compressed-tensors", "that quantizes activations (fdec reads W4A16 / W8A16)"
        )
    strategy, bits = weights.get("strategy"), weights.get("num_bits")
    if bits not in _BITS["compressed-tensors"] or weights.get("type", "int") != "int":
        raise _refuse(folder, "compressed-tensors", "whose weights are not 4- or 8-bit integers")
    if strategy not in ("group", "channel"):
        raise _refuse(
            folder, "compressed-tensors", f"with strategy {strategy!r} (fdec reads groups of "
            "inputs, or channels)",
        )  # fmt: skip
    group = int(weights.get("group_size") or -1) if strategy == "group" else -1
    return QuantizedCheckpoint(
        "compressed-tensors", group, symmetric=bool(weights.get("symmetric")), bits=bits
    )


def _unpack(words: np.ndarray, axis: int, bits: int) -> np.ndarray:
    """int32 words as their 32/bits values (lowest first), unpacked along `axis`."""
    values = words.astype(np.int64) & 0xFFFFFFFF
    shifts = np.arange(0, 32, bits, dtype=np.int64)
    parts = (np.expand_dims(values, -1) >> shifts) & ((1 << bits) - 1)  # [..., 32/bits]
    if axis == 0:  # [R, C, P] → [R, P, C] → [PR, C]
        return np.moveaxis(parts, -1, 1).reshape(-1, words.shape[1])
    return parts.reshape(words.shape[0], -1)


def _weight(
    layer: dict[str, np.ndarray], fmt: QuantizedCheckpoint, name: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """One quantized linear layer as its float32 weight [N, K] (torch's Linear layout), and the
    order of its inputs that makes its groups consecutive (None: they already are)."""
    bits, offset = fmt.bits, 1 << (fmt.bits - 1)
    if fmt.method == "nvfp4":
        return _nvfp4_weight(layer, fmt, name), None
    if fmt.fp8:
        return fp8_weight(layer["weight"], layer[fmt.fp8.scale], fmt.fp8, name), None
    if fmt.method == "compressed-tensors":
        n, k = (int(d) for d in layer["weight_shape"])
        codes = _unpack(layer["weight_packed"], 1, bits)[:, :k] - offset  # [N, K]
        scales = layer["weight_scale"].astype(np.float32)  # [N, groups]
        zeros = np.zeros_like(scales)
        if "weight_zero_point" in layer:
            zeros = _unpack(layer["weight_zero_point"], 0, bits)[:n].astype(np.float32) - offset
        groups, order = _groups(k, fmt.group_size, scales.shape[1], layer.get("weight_g_idx"), name)
        return ((codes - zeros[:, groups]) * scales[:, groups]).astype(np.float32), order
    if fmt.method == "gptq":
        codes = _unpack(layer["qweight"], 0, bits)  # [K, N]
        zeros = _unpack(layer["qzeros"], 1, bits)  # [groups, N]
        if fmt.zeros_minus_one:
            zeros = (zeros + 1) & ((1 << bits) - 1)
    else:  # AWQ (4 bits): columns within each word in _AWQ_ORDER
        order = np.argsort(_AWQ_ORDER)
        codes = _reorder(_unpack(layer["qweight"], 1, bits), order)
        zeros = _reorder(_unpack(layer["qzeros"], 1, bits), order)
    k, scales = codes.shape[0], layer["scales"].astype(np.float32)  # [groups, N]
    zeros = zeros[:, : codes.shape[1]]
    groups, order = _groups(k, fmt.group_size, scales.shape[0], layer.get("g_idx"), name)
    return ((codes - zeros[groups]) * scales[groups]).T.astype(np.float32), order


def _nvfp4_weight(layer: dict[str, np.ndarray], fmt: QuantizedCheckpoint, name: str) -> np.ndarray:
    """An NVFP4 layer's float32 weight [N, K]: E2M1 · (weight_scale / weight_global_scale), as
    compressed-tensors computes it; ModelOpt's, E2M1 · weight_scale · weight_scale_2 (its
    tensor scale stored the other way up, multiplied as vLLM's ModelOpt kernels do)."""
    import ml_dtypes

    packed = layer[fmt.packed]  # uint8 [N, K/2]
    scales = layer["weight_scale"].astype(np.float32)  # [N, K/16], FP8 values
    if packed.dtype != np.uint8 or scales.shape[1] * _NVFP4_BLOCK != 2 * packed.shape[1]:
        raise InputError(
            f"{name}: {fmt.packed} {packed.dtype} {list(packed.shape)} and weight_scale "
            f"{list(scales.shape)} are not NVFP4 (uint8 [N, K/2], [N, K/16])",
            "the checkpoint does not match its quantization_config; re-download it",
        )
    # 8 codes a little-endian word, low nibble first (K/2 bytes are whole words: K = 16·groups)
    codes = _unpack(np.ascontiguousarray(packed).view("<i4"), 1, 4).astype(np.uint8)
    values = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    if fmt.modelopt:
        steps = scales * np.float32(layer["weight_scale_2"].reshape(-1)[0])
    else:
        steps = scales / np.float32(layer["weight_global_scale"].reshape(-1)[0])
    return values * np.repeat(steps, _NVFP4_BLOCK, axis=1)


def _reorder(nibbles: np.ndarray, order: np.ndarray) -> np.ndarray:
    """[R, 8C] values whose every 8 columns are permuted by AWQ's packing, in column order."""
    rows, columns = nibbles.shape
    return nibbles.reshape(rows, columns // 8, 8)[:, :, order].reshape(rows, columns)


def _groups(
    k: int, group_size: int, groups: int, g_idx: np.ndarray | None, name: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Each input's group, and (activation order) the input order that makes groups
    consecutive: `g_idx` where the checkpoint has one, else consecutive groups of
    `group_size` (-1: one group)."""
    size = k if group_size == -1 else group_size
    consecutive = np.arange(k) // size
    if consecutive[-1] + 1 != groups:
        raise InputError(
            f"{name}: {groups} groups of scales for {k} inputs in groups of {size}",
            "the checkpoint does not match its quantization_config; re-download it",
        )
    if g_idx is None:
        return consecutive, None
    g_idx = np.asarray(g_idx).astype(np.int64).reshape(-1)
    if g_idx.shape != (k,) or np.array_equal(g_idx, consecutive):
        if g_idx.shape != (k,):
            raise InputError(
                f"{name}: g_idx has {g_idx.size} entries for {k} inputs",
                "the checkpoint is damaged; re-download it",
            )
        return consecutive, None
    order = np.argsort(g_idx, kind="stable")
    if not np.array_equal(g_idx[order], consecutive):
        raise InputError(
            f"{name}: its g_idx makes groups of other sizes than {size} inputs, which "
            "MatMulNBits' equal blocks cannot hold",
            "use the checkpoint's static-groups or desc_act=false variant, or its float original",
        )
    return g_idx, order


_SHARD_BYTES = 2 << 30  # float32 written per output file (an 8B's layers: ~16 files)


class _ShardWriter:
    """Tensors written to model-NNNNN.safetensors files of about `_SHARD_BYTES` each (one
    file: model.safetensors), with the index transformers reads when there are several."""

    def __init__(self, folder: pathlib.Path, save: Callable[..., None]):
        self.folder, self.save = folder, save
        self.pending: dict[str, Any] = {}
        self.bytes = 0
        self.files: list[dict[str, Any]] = []

    def add(self, name: str, tensor: Any) -> None:
        import torch

        tensor = torch.from_numpy(tensor) if isinstance(tensor, np.ndarray) else tensor
        self.pending[name] = tensor.contiguous()
        self.bytes += tensor.numel() * tensor.element_size()
        if self.bytes >= _SHARD_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            path = self.folder / f"model-{len(self.files) + 1:05d}.safetensors"
            self.save(self.pending, str(path), metadata={"format": "pt"})
            self.files.append(dict.fromkeys(self.pending, path.name))
            self.pending, self.bytes = {}, 0

    def close(self) -> None:
        self._flush()
        if len(self.files) == 1:
            (self.folder / "model-00001.safetensors").rename(self.folder / "model.safetensors")
            return
        weight_map = {name: file for names in self.files for name, file in names.items()}
        (self.folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
        )


_REQUIRED = {
    "gptq": ("qzeros", "scales"),
    "awq": ("qzeros", "scales"),
    "compressed-tensors": ("weight_scale", "weight_shape"),
    "nvfp4": ("weight_scale", "weight_global_scale"),
    "nvfp4-modelopt": ("weight_scale",),  # and its marker, weight_scale_2
    "fp8": (),  # the scale is the layer's marker
}
_LAYER_TENSORS = {  # a quantized layer's tensors besides its packed codes (and bias)
    "gptq": ("qzeros", "scales", "g_idx"),
    "awq": ("qzeros", "scales"),
    "compressed-tensors": ("weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"),
    "nvfp4": ("weight_scale", "weight_global_scale", "input_global_scale"),
    "nvfp4-modelopt": ("weight_scale", "weight_scale_2", "input_scale"),
    "fp8": ("weight_scale", "weight_scale_inv"),
}


def dequantize_folder(
    folder: pathlib.Path,
    fmt: QuantizedCheckpoint,
    staging: pathlib.Path,
    progress: Callable[[str], None] = lambda _: None,
) -> int:
    """Write `folder` as a float checkpoint into `staging`: every quantized layer's tensors
    replaced by its float32 `weight`, every other tensor as it is, in files of at most
    `_SHARD_BYTES` (with model.safetensors.index.json where there are several); config.json
    without `quantization_config` (what it was kept as `fdec_source_quantization`); the other
    files (tokenizer, generation config, chat template) copied. Tensors are read one at a time
    from wherever they are (a layer's may span two files), so memory holds one output file's
    worth. Returns the layers dequantized."""
    import safetensors.numpy
    import safetensors.torch
    from safetensors import safe_open

    handles = [
        safe_open(str(path), framework="pt") for path in sorted(folder.glob("*.safetensors"))
    ]
    where = {name: handle for handle in handles for name in handle.keys()}
    suffix = "." + fmt.marker
    quantized = [name[: -len(suffix)] for name in where if name.endswith(suffix)]
    if not quantized:
        raise InputError(
            f"{folder}: config.json says {fmt.describe()}, but no layer holds {fmt.marker}",
            "check the folder holds the quantized checkpoint's weights",
        )
    parts = {
        f"{prefix}.{part}"
        for prefix in quantized
        for part in (fmt.packed, *_LAYER_TENSORS[fmt.tensors])
    }
    dropped = tuple("." + name for name in DROPPED_SCALES) if fmt.fp8 or fmt.modelopt else ()
    writer = _ShardWriter(staging, safetensors.torch.save_file)
    orders: dict[str, np.ndarray] = {}
    widths: set[int] = set()
    for number, prefix in enumerate(quantized, 1):
        if number == 1 or number % 50 == 0:
            progress(f"dequantizing {fmt.describe()} layers ({number}/{len(quantized)})")
        layer = {}
        for part in (fmt.packed, *_LAYER_TENSORS[fmt.tensors]):
            handle = where.get(f"{prefix}.{part}")
            if handle is not None:
                tensor = handle.get_tensor(f"{prefix}.{part}")
                if fmt.fp8 and part == fmt.packed and str(tensor.dtype) != "torch.float8_e4m3fn":
                    raise InputError(
                        f"{folder}: {prefix}.weight is {tensor.dtype}, not float8_e4m3fn",
                        "fdec reads FP8 E4M3 weights; give it the model's float checkpoint",
                    )
                layer[part] = tensor.float().numpy() if tensor.is_floating_point() else (
                    tensor.numpy()
                )  # fmt: skip
        missing = [p for p in _REQUIRED[fmt.tensors] if p not in layer]
        if missing:
            raise InputError(
                f"{folder}: {prefix} has {fmt.packed} but no {missing[0]}",
                "the checkpoint is incomplete; re-download it",
            )
        own = fmt.for_layer(prefix) or fmt  # a "-:" rule's layer holding codes: as stored
        if not fmt.fp8:  # integer grids' widths (int4 builds keep 8-bit blocks at 8 bits)
            widths.add(own.bits)
        weight, order = _weight(layer, own, prefix)
        writer.add(f"{prefix}.weight", np.ascontiguousarray(weight))
        if order is not None:
            orders[f"{prefix}.weight"] = order.astype(np.int64)
    for name, handle in where.items():
        if name not in parts and not name.endswith(dropped):
            writer.add(name, handle.get_tensor(name))
    writer.close()
    layers = len(quantized)
    config = json.loads((folder / "config.json").read_text())
    config[SOURCE_KEY] = {"method": fmt.method, "bits": fmt.bits, "group_size": fmt.group_size,
                          "symmetric": fmt.symmetric, "widths": sorted(widths)}  # fmt: skip
    if fmt.fp8:
        config[SOURCE_KEY]["fp8"] = dataclasses.asdict(fmt.fp8)
    if fmt.modelopt:
        config[SOURCE_KEY]["tool"] = "ModelOpt"
    if orders:  # config.json carries the file's digest: what the build depends on
        data = safetensors.numpy.save(orders)
        (staging / INPUT_ORDER_FILE).write_bytes(data)
        config[SOURCE_KEY]["input_order"] = {
            "file": INPUT_ORDER_FILE, "layers": len(orders),
            "sha256": hashlib.sha256(data).hexdigest(),
        }  # fmt: skip
    config.pop("quantization_config", None)
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for path in folder.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name not in (
            "config.json", "model.safetensors.index.json", "quantize_config.json",
            "hf_quant_config.json",
        ):  # fmt: skip
            shutil.copyfile(path, staging / path.name)
    return layers
