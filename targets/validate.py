"""A target file's text checked field by field into a `Target`; every problem an InputError naming the fix."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from fdec.backends import backend_names, gpu_only_backends
from fdec.errors import InputError
from fdec.targets.messages import cc_text, describe, did_you_mean, quote, shorten
from fdec.targets.precision import (
    MIN_CC,
    PRECISION_BY_NAME,
    PRECISION_LIST,
    SPARSITY_MIN_CC,
    Precision,
    derive_precisions,
    precision_names,
)
from fdec.targets.target import Target

__all__ = ["BACKENDS", "parse_target"]

#: Backends a target may name as its default (the registry in fdec.backends).
BACKENDS: tuple[str, ...] = backend_names()

_REQUIRED = (
    "name",
    "display_name",
    "vendor",
    "memory_gb",
    "memory_bandwidth_gbs",
    "peak_tflops",
    "default_backend",
    "default_recipe",
    "sparse_tensor_cores",
)
_KEYS = (*_REQUIRED, "compute_capability", "sources", "node_launch_us")
_RECIPE_KEYS = ("weights", "activations", "kv_cache")
_RECIPE_OPTIONAL = ("encoder_weights",)  # an encoder's weights, where they differ (cpu: int8)
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_CC_RE = re.compile(r"(\d{1,2})\.(\d)")
_CC_RANGE = ((3, 0), (16, 0))  # 3.0 up to 15.x
_RECIPE_RE = re.compile(r"([a-z0-9_]+)(?:-([a-z][a-z0-9_]*))?")
_MAX_MEMORY_GB = 100_000.0
_MAX_BANDWIDTH_GBS = 1_000_000.0
_MAX_TFLOPS = 1_000_000.0
_EXAMPLE = "see targets/data/h100.toml for a complete example"


def parse_target(text: str, label: str) -> Target:
    try:
        data = tomllib.loads(text)
    except (ValueError, RecursionError) as error:  # TOMLDecodeError is a ValueError
        raise InputError(
            f"{label}: not valid TOML ({error})", f"fix the syntax; {_EXAMPLE}"
        ) from None

    _check_keys(data, _KEYS, label, where="")
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise InputError(
            f"{label}: missing {', '.join(missing)}",
            f"add {'it' if len(missing) == 1 else 'them'}; {_EXAMPLE}",
        )

    name = _string(data, "name", label)
    if not _NAME_RE.fullmatch(name):
        raise InputError(
            f"{label}: name {quote(name)} is not a valid target name",
            'use lowercase letters, digits, "-", "_" or ".", e.g. name = "my-gpu"',
        )
    display_name = _string(data, "display_name", label)
    vendor = _string(data, "vendor", label)
    cc = _compute_capability(data.get("compute_capability"), label)
    is_gpu = cc is not None

    memory_gb = _number(
        data["memory_gb"],
        label,
        "memory_gb",
        allow_zero=not is_gpu,
        upper=_MAX_MEMORY_GB,
        fix="give the device memory in GB, e.g. memory_gb = 80"
        + ("" if is_gpu else " (0 on a CPU means host memory, measured at run time)"),
    )
    bandwidth = _number(
        data["memory_bandwidth_gbs"],
        label,
        "memory_bandwidth_gbs",
        allow_zero=False,
        upper=_MAX_BANDWIDTH_GBS,
        fix="give the peak memory bandwidth in GB/s, e.g. memory_bandwidth_gbs = 3350",
    )

    backend = _string(data, "default_backend", label)
    if backend not in BACKENDS:
        hint = did_you_mean(backend, BACKENDS)
        raise InputError(
            f"{label}: default_backend {quote(backend)} is not a backend",
            f"{hint}use one of: {', '.join(BACKENDS)}",
        )
    if backend in gpu_only_backends() and not is_gpu:
        raise InputError(
            f"{label}: default_backend {quote(backend)} needs a GPU, but compute_capability "
            "is not set",
            'set compute_capability (e.g. "8.9") or use default_backend = "onnxruntime"',
        )

    precisions = derive_precisions(cc)
    tflops = _peak_tflops(data["peak_tflops"], label, name, cc, precisions)
    recipe = _recipe_table(data["default_recipe"], label)

    sparse = data["sparse_tensor_cores"]
    if not isinstance(sparse, bool):
        raise InputError(
            f"{label}: sparse_tensor_cores must be true or false, got {describe(sparse)}",
            "write sparse_tensor_cores = true (2:4 sparsity, compute capability ≥ 8.0) or false",
        )
    if sparse and (cc is None or cc < SPARSITY_MIN_CC):
        have = "a CPU" if cc is None else f"compute capability {cc_text(cc)}"
        raise InputError(
            f"{label}: sparse_tensor_cores = true, but 2:4 sparse tensor cores need compute "
            f"capability ≥ {cc_text(SPARSITY_MIN_CC)} and {name} is {have}",
            "set sparse_tensor_cores = false",
        )

    target = Target(
        name=name,
        display_name=display_name,
        vendor=vendor,
        compute_capability=cc,
        memory_gb=memory_gb,
        memory_bandwidth_gbs=bandwidth,
        peak_tflops=tflops,
        default_backend=backend,
        default_recipe=recipe,
        sparse_tensor_cores=sparse,
        sources=_sources(data.get("sources", []), label),
        path=label,
        node_launch_us=_number(
            data.get("node_launch_us", 0.0),
            label,
            "node_launch_us",
            allow_zero=True,
            upper=10_000.0,
            fix="give microseconds per graph node, e.g. node_launch_us = 4.0",
        ),
    )
    for key, value in recipe.items():
        try:
            target.require(value.split("-", 1)[0])
        except InputError as error:
            raise InputError(
                f"{label}: default_recipe.{key} = {quote(value)} cannot run on {name}: "
                f"{error.problem}",
                error.fix,
            ) from None
    return target


def _check_keys(table: Mapping[str, Any], valid: tuple[str, ...], label: str, where: str) -> None:
    for key in table:
        if key not in valid:
            hint = did_you_mean(key, valid)
            section = f" in [{where[:-1]}]" if where else ""
            raise InputError(
                f"{label}: unknown key {quote(where + key)}",
                f"{hint}valid keys{section}: {', '.join(valid)}",
            )


def _string(data: Mapping[str, Any], key: str, label: str) -> str:
    value = data[key]
    if not isinstance(value, str) or not value.strip():
        raise InputError(
            f"{label}: {key} must be a non-empty string, got {describe(value)}",
            f'write it in quotes, e.g. {key} = "..."',
        )
    return value.strip()


def _compute_capability(value: Any, label: str) -> tuple[int, int] | None:
    if value is None or value == "":
        return None
    fix = 'write it as a quoted major.minor string, e.g. compute_capability = "8.9"'
    if not isinstance(value, str):
        raise InputError(
            f'{label}: compute_capability must be a string like "8.9", got {describe(value)}',
            fix,
        )
    match = _CC_RE.fullmatch(value.strip())
    if match is None:
        raise InputError(
            f"{label}: compute_capability {quote(value)} is not of the form major.minor", fix
        )
    cc = (int(match.group(1)), int(match.group(2)))
    low, high = _CC_RANGE
    if not low <= cc < high:
        raise InputError(
            f"{label}: compute_capability {quote(value)} is outside 3.0–15.x, the range of "
            "CUDA GPUs",
            'use the value from https://developer.nvidia.com/cuda-gpus, e.g. "8.9"',
        )
    return cc


def _number(
    value: Any, label: str, field: str, *, allow_zero: bool, upper: float, fix: str
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{label}: {field} must be a number, got {describe(value)}", fix)
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{label}: {field} must be a finite number, got {value}", fix)
    if value < 0 or (value == 0 and not allow_zero):
        bound = "≥ 0" if allow_zero else "> 0"
        raise InputError(f"{label}: {field} must be {bound}, got {value}", fix)
    if value > upper:
        raise InputError(
            f"{label}: {field} = {shorten(repr(value))} is implausibly large (limit {upper:g})",
            fix,
        )
    return float(value)


def _peak_tflops(
    table: Any,
    label: str,
    name: str,
    cc: tuple[int, int] | None,
    precisions: frozenset[Precision],
) -> dict[Precision, float]:
    if not isinstance(table, dict):
        raise InputError(
            f"{label}: peak_tflops must be a table, got {describe(table)}",
            "write a [peak_tflops] section with lines such as fp16 = 989.5",
        )
    result: dict[Precision, float] = {}
    for key, value in table.items():
        try:
            precision = Precision.parse(key)
        except InputError:
            hint = did_you_mean(key.lower(), PRECISION_BY_NAME)
            raise InputError(
                f"{label}: unknown key {quote('peak_tflops.' + key)}",
                f"{hint}valid keys in [peak_tflops]: {PRECISION_LIST}",
            ) from None
        if precision in result:
            raise InputError(
                f"{label}: peak_tflops gives {precision.value} twice", "keep one of the entries"
            )
        if precision not in precisions:
            if cc is None:
                why = f"a CPU target supports only {precision_names(precisions)}"
            else:
                need = MIN_CC[precision]
                why = (
                    f"{precision.label} needs compute capability ≥ {cc_text(need)} and "
                    f"{name} is {cc_text(cc)}"
                )
            raise InputError(
                f"{label}: peak_tflops.{key} is given, but {why}",
                "remove the entry, or correct compute_capability",
            )
        result[precision] = _number(
            value,
            label,
            f"peak_tflops.{key}",
            allow_zero=False,
            upper=_MAX_TFLOPS,
            fix="give the dense peak in TFLOPS (TOPS for integers), or leave the entry out",
        )
    if cc is not None and Precision.FP32 not in result:
        raise InputError(
            f"{label}: peak_tflops.fp32 is missing", "add the GPU's FP32 peak, e.g. fp32 = 67.0"
        )
    return result


def _recipe_table(table: Any, label: str) -> dict[str, str]:
    example = 'e.g. weights = "int4-awq", activations = "fp16", kv_cache = "fp16"'
    if not isinstance(table, dict):
        raise InputError(
            f"{label}: default_recipe must be a table, got {describe(table)}",
            f"write a [default_recipe] section, {example}",
        )
    _check_keys(table, _RECIPE_KEYS + _RECIPE_OPTIONAL, label, where="default_recipe.")
    missing = [key for key in _RECIPE_KEYS if key not in table]
    if missing:
        raise InputError(
            f"{label}: default_recipe is missing {', '.join(missing)}", f"add it, {example}"
        )
    recipe: dict[str, str] = {}
    for key in (*_RECIPE_KEYS, *(k for k in _RECIPE_OPTIONAL if k in table)):
        value = table[key]
        if not isinstance(value, str) or not _RECIPE_RE.fullmatch(value):
            raise InputError(
                f"{label}: default_recipe.{key} must be a precision name with an optional "
                f"method, got {describe(value)}",
                f"valid precisions: {PRECISION_LIST}; {example}",
            )
        base = value.split("-", 1)[0]
        if base not in PRECISION_BY_NAME:
            hint = did_you_mean(base, PRECISION_BY_NAME)
            raise InputError(
                f"{label}: default_recipe.{key} = {quote(value)} names no known precision",
                f"{hint}valid precisions: {PRECISION_LIST}",
            )
        recipe[key] = value
    return recipe


def _sources(value: Any, label: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(s, str) and s.strip() for s in value):
        raise InputError(
            f"{label}: sources must be a list of non-empty strings, got {describe(value)}",
            'write sources = ["datasheet title — URL", ...]',
        )
    return tuple(s.strip() for s in value)
