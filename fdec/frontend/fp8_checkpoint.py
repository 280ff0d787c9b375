"""FP8 checkpoints (E4M3 weights with float scales) read as the float weights they stand for,
and ModelOpt's quantization configs (its FP8 ones, and its NVFP4 ones: `modelopt_nvfp4`).

The FP8 models people ship for Hopper and Ada GPUs come in four layouts; in each a quantized
linear layer holds `weight` as float8_e4m3fn [N, K] and a scale that multiplies it:
- compressed-tensors `float-quantized` (llm-compressor's FP8 and FP8_DYNAMIC, RedHatAI's
  *-FP8 models; `naive-quantized` in older ones): `weight_scale` [1] (strategy "tensor"),
  [N, 1] ("channel") or [⌈N/bn⌉, ⌈K/bk⌉] ("block", `block_structure` [bn, bk]).
- transformers' `fp8` (FineGrainedFP8: Qwen3-*-FP8, DeepSeek-V3): `weight_scale_inv` over
  blocks of `weight_block_size` [bn, bk] (one scale when that is null), a multiplier despite
  its name (transformers' own dequantization multiplies by it).
- `fbgemm_fp8` (Meta's Llama 3.1 405B FP8): `weight_scale` [N, 1].
- NVIDIA ModelOpt (config.json `quant_method` "modelopt", or hf_quant_config.json beside a
  config without one): quant_algo FP8 (one `weight_scale`), FP8_PER_CHANNEL_PER_TOKEN (one per
  output channel), FP8_PB_WO (blocks).
The weight is E4M3 · scale in fp32, each scale broadcast over its block (one product per
weight: exact to fp32's rounding of it). Activation scales (`input_scale`, `activation_scale`)
and KV-cache scales (`k_scale`, `v_scale`) are not read: the build calibrates its own, as for
an NVFP4 W4A4 source. fdec's fp8 quantizer finds channel and tensor scales again in those
values and keeps the codes (passes/quantize_fp8.py, `source_grid_kept`); block scales have no
per-channel form and are rounded again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import numpy as np

from fdec.errors import InputError

__all__ = [
    "DROPPED_SCALES",
    "Fp8Scheme",
    "float_method",
    "fp8_scheme",
    "fp8_weight",
    "modelopt_nvfp4",
    "modelopt_quantization",
    "with_modelopt",
]

# Tensors of an FP8 or ModelOpt checkpoint the float folder drops: activation and KV-cache
# scales.
DROPPED_SCALES = ("input_scale", "activation_scale", "output_scale", "k_scale", "v_scale")
_CT_FORMATS = ("float-quantized", "naive-quantized")
_MODELOPT_FP8 = {"FP8": "tensor", "FP8_PER_CHANNEL_PER_TOKEN": "channel", "FP8_PB_WO": "block"}
_MODELOPT_NVFP4 = ("NVFP4", "W4A16_NVFP4")  # W4A4 and weight-only: the weights read alike
_FIX = "the checkpoint does not match its quantization_config; re-download it"


@dataclasses.dataclass(frozen=True)
class Fp8Scheme:
    """How an FP8 checkpoint stores its layers."""

    scale: str  # the scale's tensor name beside `weight`
    strategy: str  # what the config names: "tensor", "channel" or "block"
    block: tuple[int, ...]  # [bn, bk] where the config names one
    tool: str  # what wrote it

    def describe(self) -> str:
        what = {"tensor": "per tensor", "channel": "per channel"}.get(self.strategy)
        what = what or ("×".join(map(str, self.block)) + " blocks" if self.block else "blocks")
        return f"{self.tool} FP8 E4M3 ({what})"


def modelopt_quantization(folder: pathlib.Path) -> dict | None:
    """ModelOpt's hf_quant_config.json in `folder` as a quantization_config ({"quant_method":
    "modelopt", "quant_algo": ...}), None when there is none (a folder whose config.json
    names no quantization: ModelOpt's older exports keep it there only)."""
    path = folder / "hf_quant_config.json"
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text()).get("quantization")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        found = None
    if not isinstance(found, dict):
        raise InputError(
            f"{path} holds no `quantization` mapping", "re-export the checkpoint with ModelOpt"
        )
    return {"quant_method": "modelopt", **found}


def with_modelopt(config: dict, folder: pathlib.Path) -> dict:
    """`config` (a folder's config.json) with ModelOpt's hf_quant_config.json as its
    quantization_config where it names none (`modelopt_quantization`)."""
    if config.get("quantization_config"):
        return config
    found = modelopt_quantization(folder)
    return {**config, "quantization_config": found} if found else config


def _modelopt_fields(quantization: dict) -> dict:
    """A ModelOpt quantization_config's fields: nested under "quantization" (as in
    hf_quant_config.json) or at the top (config.json's compressed-tensors-like form)."""
    nested = quantization.get("quantization")
    return nested if isinstance(nested, dict) else quantization


def _modelopt_algo(quantization: dict) -> str:
    return str(_modelopt_fields(quantization).get("quant_algo") or "").upper()


def float_method(quantization: dict) -> tuple[str, int | None] | None:
    """("fp8", 8) or ("nvfp4", 4) for a checkpoint quantized to a float format fdec reads,
    (method, bits) of any other compressed-tensors / ModelOpt one, None for the rest."""
    method = str(quantization.get("quant_method", quantization.get("method")) or "")
    if method in ("fp8", "fbgemm_fp8"):
        return "fp8", 8
    if method.lower().startswith("modelopt"):
        algo = _modelopt_algo(quantization)
        if algo in _MODELOPT_NVFP4:
            return "nvfp4", 4
        return ("fp8", 8) if algo in _MODELOPT_FP8 else ("modelopt", None)
    if method == "compressed-tensors" and "config_groups" in quantization:
        groups = [g for g in quantization["config_groups"].values() if isinstance(g, dict)]
        weights = (groups[0].get("weights") or {}) if groups else {}
        bits = weights.get("num_bits")
        if weights.get("type") == "float":
            return ("nvfp4" if bits == 4 else "fp8"), bits
        return method, bits
    return None


def _refuse(folder: pathlib.Path, what: str, fix: str) -> InputError:
    return InputError(f"{folder} holds an FP8 checkpoint {what}", fix)


def fp8_scheme(quantization: dict, folder: pathlib.Path) -> Fp8Scheme:
    """The Fp8Scheme of an FP8 checkpoint's quantization_config (`float_method` "fp8");
    InputError for FP8 fdec does not read (E5M2 weights, dynamic weight scales, other
    ModelOpt algorithms)."""
    method = str(quantization.get("quant_method", quantization.get("method")))
    if method == "fp8":
        block = quantization.get("weight_block_size")
        block = tuple(int(b) for b in block) if block else ()
        return Fp8Scheme("weight_scale_inv", "block" if block else "tensor", block, "transformers")
    if method == "fbgemm_fp8":
        return Fp8Scheme("weight_scale", "channel", (), "fbgemm")
    if method.lower().startswith("modelopt"):
        strategy = _MODELOPT_FP8[_modelopt_algo(quantization)]
        return Fp8Scheme("weight_scale", strategy, (128, 128) if strategy == "block" else (),
                         "ModelOpt")  # fmt: skip
    groups = [g for g in quantization["config_groups"].values() if isinstance(g, dict)]
    formats = {g.get("format") or quantization.get("format") for g in groups}
    if not formats <= set(_CT_FORMATS):
        raise _refuse(
            folder, f"in compressed-tensors format {sorted(map(str, formats))}",
            "fdec reads float-quantized FP8 (llm-compressor's FP8 and FP8_DYNAMIC schemes)",
        )  # fmt: skip
    strategies = set()
    for group in groups:
        weights = group.get("weights") or {}
        if weights.get("dynamic"):
            raise _refuse(folder, "with dynamic weight scales", "use a static FP8 checkpoint")
        if (weights.get("num_bits"), weights.get("type")) != (8, "float"):
            raise _refuse(
                folder, "with groups that are not 8-bit float weights",
                "use a checkpoint quantized to FP8 alone (llm-compressor's FP8 schemes)",
            )  # fmt: skip
        block = tuple(int(b) for b in weights.get("block_structure") or ())
        strategies.add((weights.get("strategy"), block))
    if len(strategies) != 1 or next(iter(strategies))[0] not in ("tensor", "channel", "block"):
        raise _refuse(
            folder, f"with weight strategies {sorted(map(str, strategies))}",
            "fdec reads one of tensor, channel and block scales per checkpoint",
        )  # fmt: skip
    strategy, block = next(iter(strategies))
    return Fp8Scheme("weight_scale", strategy, block, "compressed-tensors")


def modelopt_nvfp4(quantization: dict, folder: pathlib.Path) -> None:
    """Refuse a ModelOpt NVFP4 checkpoint fdec cannot read as NVFP4 weights: another group
    size (NVFP4 is 16). Its tensors: `weight` uint8 [N, K/2] (compressed-tensors' packing),
    `weight_scale` FP8 [N, K/16], `weight_scale_2` = compressed-tensors' 1 / weight_global_scale,
    and `input_scale`, which is not read (compressed-tensors' ModelOptNvfp4Converter maps them
    so)."""
    group = _modelopt_fields(quantization).get("group_size") or 16
    if int(group) != 16:
        raise InputError(
            f"{folder} holds a ModelOpt NVFP4 checkpoint in groups of {group}",
            "NVFP4 blocks are 16 inputs; re-export it with ModelOpt's NVFP4 config",
        )


def _block_of(n: int, k: int, grid: tuple[int, int], given: tuple[int, ...]) -> tuple[int, int]:
    """The [bn, bk] block a [N, K] weight's `grid` of scales stands for: the config's, else
    the whole-division one, else 128 × 128 (DeepSeek's, with partial edge blocks)."""
    candidates = [tuple(given)] if given else []
    if n % grid[0] == 0 and k % grid[1] == 0:
        candidates.append((n // grid[0], k // grid[1]))
    candidates.append((128, 128))
    for bn, bk in candidates:
        if (math.ceil(n / bn), math.ceil(k / bk)) == grid:
            return bn, bk
    return 0, 0


def fp8_weight(values: np.ndarray, scale: np.ndarray, scheme: Fp8Scheme, name: str) -> np.ndarray:
    """A layer's float32 weight [N, K]: its E4M3 `values` (read as float32) times `scale`,
    one scale, one per output channel, or one per block (broadcast, edge blocks cut)."""
    n, k = values.shape
    scale = np.asarray(scale, dtype=np.float32)
    if scale.size == 1:
        return values * scale.reshape(())
    if scale.size == n and scale.ndim <= 2 and scale.shape[0] == n:
        return values * scale.reshape(n, 1)
    bn, bk = _block_of(n, k, scale.shape, scheme.block) if scale.ndim == 2 else (0, 0)
    if not bn:
        raise InputError(
            f"{name}: {scheme.scale} {list(scale.shape)} is neither one scale, one per output "
            f"channel nor one per block of its [{n}, {k}] weight", _FIX,
        )  # fmt: skip
    steps = np.repeat(np.repeat(scale, bn, axis=0), bk, axis=1)[:n, :k]
    return values * steps
