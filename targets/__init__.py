"""Deployment targets: hardware facts as TOML data files, loaded into frozen `Target` objects.

Hardware facts live only here. Passes ask ``target.supports(Precision.FP8_E4M3)`` or call
``target.require(...)``; they never compare target names.

A target file (``targets/data/<name>.toml``, or a user's own file given by path) holds:

==========================  ========================================================  ========
key                         meaning                                                   required
==========================  ========================================================  ========
``name``                    short lowercase id, e.g. ``"h100"``                       yes
``display_name``            human name, e.g. ``"NVIDIA H100 SXM5 80GB"``               yes
``vendor``                  e.g. ``"nvidia"``                                          yes
``compute_capability``      CUDA compute capability as a string, e.g. ``"9.0"``;       GPUs
                            absent or ``""`` makes the target a CPU
``memory_gb``               device memory in GB; ``0`` on a CPU means "host memory,    yes
                            measured at run time"
``memory_bandwidth_gbs``    peak memory bandwidth in GB/s                              yes
``[peak_tflops]``           dense (no sparsity) peak per precision: fp32, tf32, fp16,  yes
                            bf16, fp8, int8, int4, fp4 (TOPS for integers); leave an
                            entry out when the figure is unknown
``default_backend``         a backend of fdec.backends: ``onnxruntime``,              yes
                            ``tensorrt`` or ``tensorrt-rtx``
``[default_recipe]``        ``weights``, ``activations``, ``kv_cache``: a precision    yes
                            name, optionally with a method suffix (``"int4-awq"``);
                            optional ``encoder_weights`` for encoder models (BERT)
``sparse_tensor_cores``     2:4 structured sparsity in hardware (needs cc >= 8.0)      yes
``sources``                 where each figure comes from (title and URL)               no
``node_launch_us``          host cost per graph node of one decode step under ONNX     no
                            Runtime's CUDA provider, in µs (the roofline's per-step
                            floor); 0 or absent: no floor
==========================  ========================================================  ========

Which precisions a target supports is derived from its compute capability, never listed per
file: fp32, fp16, int8 and int4 on every GPU; tf32 and bf16 from 8.0; fp8 from 8.9; fp4 from
10.0. A CPU target supports fp32, int8 and int4.

Every problem with a name or a file is reported as `fdec.errors.InputError` naming the file,
the field and the fix; nothing else escapes.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import importlib.resources
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from fdec.backends import backend_names, gpu_only_backends
from fdec.errors import InputError

__all__ = [
    "BACKENDS",
    "Precision",
    "Target",
    "list_targets",
    "load_target",
    "target_names",
]

_log = logging.getLogger(__name__)

#: Backends a target may name as its default (the registry in fdec.backends).
BACKENDS: tuple[str, ...] = backend_names()


class Precision(enum.Enum):
    """A numeric format a target can compute or store in; the value is its file spelling."""

    FP32 = "fp32"
    TF32 = "tf32"
    FP16 = "fp16"
    BF16 = "bf16"
    FP8_E4M3 = "fp8"
    INT8 = "int8"
    INT4 = "int4"
    FP4 = "fp4"

    @classmethod
    def parse(cls, text: str | Precision) -> Precision:
        """The precision named `text` ("fp8", "FP16", "fp8_e4m3"); InputError for anything else."""
        if isinstance(text, Precision):
            return text
        if not isinstance(text, str):
            raise InputError(
                f"a precision must be a name such as 'fp8', got {_describe(text)}",
                f"valid precisions: {_PRECISION_LIST}",
            )
        key = text.strip().lower()
        found = _PRECISION_BY_NAME.get(key)
        if found is None:
            hint = _did_you_mean(key, _PRECISION_BY_NAME)
            raise InputError(
                f"unknown precision {_quote(text)}", f"{hint}valid precisions: {_PRECISION_LIST}"
            )
        return found

    @property
    def label(self) -> str:
        """The name used in messages: "FP8", "BF16", "INT4"."""
        return "FP8" if self is Precision.FP8_E4M3 else self.name

    @property
    def bits(self) -> int:
        """Storage bits per element (TF32 is stored as 32-bit floats)."""
        return _BITS[self]


_PRECISION_BY_NAME: dict[str, Precision] = {p.value: p for p in Precision}
_PRECISION_BY_NAME["fp8_e4m3"] = Precision.FP8_E4M3
_PRECISION_LIST = ", ".join(p.value for p in Precision)
_BITS = {
    Precision.FP32: 32,
    Precision.TF32: 32,
    Precision.FP16: 16,
    Precision.BF16: 16,
    Precision.FP8_E4M3: 8,
    Precision.INT8: 8,
    Precision.INT4: 4,
    Precision.FP4: 4,
}

# Every GPU computes these; the rest need at least the compute capability given.
_GPU_BASE = frozenset({Precision.FP32, Precision.FP16, Precision.INT8, Precision.INT4})
_MIN_CC: dict[Precision, tuple[int, int]] = {
    Precision.TF32: (8, 0),
    Precision.BF16: (8, 0),
    Precision.FP8_E4M3: (8, 9),
    Precision.FP4: (10, 0),
}
_CPU_PRECISIONS = frozenset({Precision.FP32, Precision.INT8, Precision.INT4})
_SPARSITY_MIN_CC = (8, 0)
# What to suggest instead of a precision a target lacks, best first.
_FALLBACKS: dict[Precision, tuple[Precision, ...]] = {
    Precision.FP4: (Precision.INT4, Precision.FP8_E4M3, Precision.INT8),
    Precision.FP8_E4M3: (Precision.INT8, Precision.INT4),
    Precision.BF16: (Precision.FP16, Precision.FP32),
    Precision.FP16: (Precision.BF16, Precision.FP32),
    Precision.TF32: (Precision.FP32,),
    Precision.INT8: (Precision.INT4, Precision.FP32),
    Precision.INT4: (Precision.INT8, Precision.FP32),
    Precision.FP32: (Precision.FP16,),
}


def _derive_precisions(cc: tuple[int, int] | None) -> frozenset[Precision]:
    if cc is None:
        return _CPU_PRECISIONS
    return _GPU_BASE | {p for p, need in _MIN_CC.items() if cc >= need}


class _FrozenMap(Mapping[Any, Any]):
    """A read-only, hashable mapping that keeps insertion order."""

    def __init__(self, items: Mapping[Any, Any]):
        self._data = dict(items)

    def __getitem__(self, key: Any) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return f"{{{', '.join(f'{k!r}: {v!r}' for k, v in self._data.items())}}}"


@dataclasses.dataclass(frozen=True)
class Target:
    """One deployment target. Build it with `load_target`; every field is read-only."""

    name: str
    display_name: str
    vendor: str
    compute_capability: tuple[int, int] | None
    memory_gb: float
    memory_bandwidth_gbs: float
    peak_tflops: Mapping[Precision, float]
    default_backend: str
    default_recipe: Mapping[str, str]
    sparse_tensor_cores: bool
    sources: tuple[str, ...] = ()
    path: str = ""
    node_launch_us: float = 0.0  # per-node step cost (fdec.report.roofline's floor)

    def __post_init__(self) -> None:
        # Freeze the containers, so a Target built by hand (tests, dataclasses.replace) is as
        # immutable and hashable as a loaded one.
        tflops = {Precision.parse(k): float(v) for k, v in self.peak_tflops.items()}
        ordered = {p: tflops[p] for p in Precision if p in tflops}
        object.__setattr__(self, "peak_tflops", _FrozenMap(ordered))
        recipe = {str(k): str(v) for k, v in self.default_recipe.items()}
        object.__setattr__(self, "default_recipe", _FrozenMap(recipe))
        object.__setattr__(self, "sources", tuple(self.sources))
        if self.compute_capability is not None:
            major, minor = self.compute_capability
            object.__setattr__(self, "compute_capability", (int(major), int(minor)))

    @property
    def is_gpu(self) -> bool:
        """True for a GPU (it has a compute capability), False for the CPU target."""
        return self.compute_capability is not None

    @property
    def precisions(self) -> frozenset[Precision]:
        """The precisions this target computes in, derived from its compute capability."""
        return _derive_precisions(self.compute_capability)

    def supports(self, precision: Precision | str) -> bool:
        """Whether this target computes in `precision` (a Precision or a name like "fp8")."""
        return Precision.parse(precision) in self.precisions

    def require(self, precision: Precision | str) -> Precision:
        """Return `precision` parsed; raise InputError naming the need and the alternatives."""
        wanted = Precision.parse(precision)
        have = self.precisions
        if wanted in have:
            return wanted
        alternatives = [p.value for p in _FALLBACKS[wanted] if p in have][:2]
        fix = f"use {' or '.join(alternatives)}" if alternatives else f"use {_names(have)}"
        if self.compute_capability is None:
            problem = f"{wanted.label} needs a GPU; {self.name} supports {_names(have)}"
        else:
            need = _MIN_CC[wanted]
            problem = (
                f"{wanted.label} needs compute capability ≥ {_cc_text(need)}; "
                f"{self.name} is {_cc_text(self.compute_capability)}"
            )
        raise InputError(problem, fix)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view: precisions as sorted names, compute capability as "9.0"."""
        cc = self.compute_capability
        return {
            "name": self.name,
            "display_name": self.display_name,
            "vendor": self.vendor,
            "compute_capability": _cc_text(cc) if cc is not None else None,
            "is_gpu": self.is_gpu,
            "memory_gb": self.memory_gb,
            "memory_bandwidth_gbs": self.memory_bandwidth_gbs,
            "peak_tflops": {p.value: v for p, v in self.peak_tflops.items()},
            "precisions": sorted(p.value for p in self.precisions),
            "default_backend": self.default_backend,
            "default_recipe": dict(self.default_recipe),
            "sparse_tensor_cores": self.sparse_tensor_cores,
            "sources": list(self.sources),
            "path": self.path,
            "node_launch_us": self.node_launch_us,
        }


# ---------------------------------------------------------------------------------------------
# Finding targets


def load_target(name_or_path: str | os.PathLike[str]) -> Target:
    """A bundled target by name (case-insensitive) or a user's target file by path."""
    if isinstance(name_or_path, os.PathLike):
        return _load_user_file(Path(name_or_path))
    if not isinstance(name_or_path, str):
        raise InputError(
            f"a target must be a name or a path, got {_describe(name_or_path)}", _known_fix()
        )
    text = name_or_path.strip()
    if not text:
        raise InputError("no target given", _known_fix())
    bundled = _bundled_files()
    if not _looks_like_path(text):
        if text.lower() in bundled:
            return _load_bundled(text.lower())
        if not _is_file(text):
            hint = _did_you_mean(text.lower(), bundled)
            raise InputError(f"unknown target {_quote(text)}", hint + _known_fix())
    return _load_user_file(Path(text).expanduser())


def list_targets() -> list[Target]:
    """Every bundled target, sorted by name."""
    return [_load_bundled(name) for name in target_names()]


def target_names() -> list[str]:
    """The names of the bundled targets, sorted."""
    return sorted(_bundled_files())


def _known_fix() -> str:
    return f"known targets: {', '.join(target_names())}; or give a path to a .toml target file"


def _looks_like_path(text: str) -> bool:
    separators = [os.sep, "/"] + ([os.altsep] if os.altsep else [])
    return text.lower().endswith(".toml") or any(s in text for s in separators)


def _is_file(text: str) -> bool:
    try:
        return Path(text).expanduser().is_file()
    except (OSError, ValueError):
        return False


@functools.cache
def _bundled_files() -> dict[str, Any]:
    data = importlib.resources.files(__package__ or __name__) / "data"
    return {
        entry.name[: -len(".toml")]: entry
        for entry in data.iterdir()
        if entry.name.endswith(".toml") and entry.is_file()
    }


@functools.cache
def _load_bundled(name: str) -> Target:
    entry = _bundled_files()[name]
    label = str(entry)
    target = _parse(entry.read_text(encoding="utf-8"), label)
    if target.name != name:
        raise InputError(
            f"{label}: name is {_quote(target.name)} but the file is {name}.toml",
            f'set name = "{name}" or rename the file',
        )
    return target


_MAX_FILE_BYTES = 1 << 20


def _load_user_file(path: Path) -> Target:
    label = str(path)
    try:
        if path.is_dir():
            raise InputError(
                f"{_quote(label)} is a folder, not a target file",
                "give the path of a .toml target file",
            )
        if path.exists() and not path.is_file():
            raise InputError(
                f"{_quote(label)} is not a regular file", "give the path of a .toml target file"
            )
        size = path.stat().st_size
        if size > _MAX_FILE_BYTES:
            raise InputError(
                f"{label}: {size} bytes is far too large for a target file",
                "give the path of a .toml target file (see targets/data/h100.toml)",
            )
        raw = path.read_bytes()
    except FileNotFoundError:
        stem = path.stem.lower()
        hint = f"use the built-in target '{stem}', or " if stem in _bundled_files() else ""
        raise InputError(
            f"target file {_quote(label)} does not exist", f"{hint}check the path"
        ) from None
    except (OSError, ValueError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise InputError(
            f"cannot read target file {_quote(label)}: {reason}",
            "check the path and its permissions",
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(
            f"{label}: not UTF-8 text", "a target file is TOML saved as UTF-8"
        ) from None
    _log.debug("loading target file %s", label)
    return _parse(text, label)


# ---------------------------------------------------------------------------------------------
# Parsing and validating a target file

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


def _parse(text: str, label: str) -> Target:
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
            f"{label}: name {_quote(name)} is not a valid target name",
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
        hint = _did_you_mean(backend, BACKENDS)
        raise InputError(
            f"{label}: default_backend {_quote(backend)} is not a backend",
            f"{hint}use one of: {', '.join(BACKENDS)}",
        )
    if backend in gpu_only_backends() and not is_gpu:
        raise InputError(
            f"{label}: default_backend {_quote(backend)} needs a GPU, but compute_capability "
            "is not set",
            'set compute_capability (e.g. "8.9") or use default_backend = "onnxruntime"',
        )

    precisions = _derive_precisions(cc)
    tflops = _peak_tflops(data["peak_tflops"], label, name, cc, precisions)
    recipe = _recipe_table(data["default_recipe"], label)

    sparse = data["sparse_tensor_cores"]
    if not isinstance(sparse, bool):
        raise InputError(
            f"{label}: sparse_tensor_cores must be true or false, got {_describe(sparse)}",
            "write sparse_tensor_cores = true (2:4 sparsity, compute capability ≥ 8.0) or false",
        )
    if sparse and (cc is None or cc < _SPARSITY_MIN_CC):
        have = "a CPU" if cc is None else f"compute capability {_cc_text(cc)}"
        raise InputError(
            f"{label}: sparse_tensor_cores = true, but 2:4 sparse tensor cores need compute "
            f"capability ≥ {_cc_text(_SPARSITY_MIN_CC)} and {name} is {have}",
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
                f"{label}: default_recipe.{key} = {_quote(value)} cannot run on {name}: "
                f"{error.problem}",
                error.fix,
            ) from None
    return target


def _check_keys(table: Mapping[str, Any], valid: tuple[str, ...], label: str, where: str) -> None:
    for key in table:
        if key not in valid:
            hint = _did_you_mean(key, valid)
            section = f" in [{where[:-1]}]" if where else ""
            raise InputError(
                f"{label}: unknown key {_quote(where + key)}",
                f"{hint}valid keys{section}: {', '.join(valid)}",
            )


def _string(data: Mapping[str, Any], key: str, label: str) -> str:
    value = data[key]
    if not isinstance(value, str) or not value.strip():
        raise InputError(
            f"{label}: {key} must be a non-empty string, got {_describe(value)}",
            f'write it in quotes, e.g. {key} = "..."',
        )
    return value.strip()


def _compute_capability(value: Any, label: str) -> tuple[int, int] | None:
    if value is None or value == "":
        return None
    fix = 'write it as a quoted major.minor string, e.g. compute_capability = "8.9"'
    if not isinstance(value, str):
        raise InputError(
            f'{label}: compute_capability must be a string like "8.9", got {_describe(value)}',
            fix,
        )
    match = _CC_RE.fullmatch(value.strip())
    if match is None:
        raise InputError(
            f"{label}: compute_capability {_quote(value)} is not of the form major.minor", fix
        )
    cc = (int(match.group(1)), int(match.group(2)))
    low, high = _CC_RANGE
    if not low <= cc < high:
        raise InputError(
            f"{label}: compute_capability {_quote(value)} is outside 3.0–15.x, the range of "
            "CUDA GPUs",
            'use the value from https://developer.nvidia.com/cuda-gpus, e.g. "8.9"',
        )
    return cc


def _number(
    value: Any, label: str, field: str, *, allow_zero: bool, upper: float, fix: str
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{label}: {field} must be a number, got {_describe(value)}", fix)
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{label}: {field} must be a finite number, got {value}", fix)
    if value < 0 or (value == 0 and not allow_zero):
        bound = "≥ 0" if allow_zero else "> 0"
        raise InputError(f"{label}: {field} must be {bound}, got {value}", fix)
    if value > upper:
        raise InputError(
            f"{label}: {field} = {_short(repr(value))} is implausibly large (limit {upper:g})",
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
            f"{label}: peak_tflops must be a table, got {_describe(table)}",
            "write a [peak_tflops] section with lines such as fp16 = 989.5",
        )
    result: dict[Precision, float] = {}
    for key, value in table.items():
        try:
            precision = Precision.parse(key)
        except InputError:
            hint = _did_you_mean(key.lower(), _PRECISION_BY_NAME)
            raise InputError(
                f"{label}: unknown key {_quote('peak_tflops.' + key)}",
                f"{hint}valid keys in [peak_tflops]: {_PRECISION_LIST}",
            ) from None
        if precision in result:
            raise InputError(
                f"{label}: peak_tflops gives {precision.value} twice", "keep one of the entries"
            )
        if precision not in precisions:
            if cc is None:
                why = f"a CPU target supports only {_names(precisions)}"
            else:
                need = _MIN_CC[precision]
                why = (
                    f"{precision.label} needs compute capability ≥ {_cc_text(need)} and "
                    f"{name} is {_cc_text(cc)}"
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
            f"{label}: default_recipe must be a table, got {_describe(table)}",
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
                f"method, got {_describe(value)}",
                f"valid precisions: {_PRECISION_LIST}; {example}",
            )
        base = value.split("-", 1)[0]
        if base not in _PRECISION_BY_NAME:
            hint = _did_you_mean(base, _PRECISION_BY_NAME)
            raise InputError(
                f"{label}: default_recipe.{key} = {_quote(value)} names no known precision",
                f"{hint}valid precisions: {_PRECISION_LIST}",
            )
        recipe[key] = value
    return recipe


def _sources(value: Any, label: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(s, str) and s.strip() for s in value):
        raise InputError(
            f"{label}: sources must be a list of non-empty strings, got {_describe(value)}",
            'write sources = ["datasheet title — URL", ...]',
        )
    return tuple(s.strip() for s in value)


# ---------------------------------------------------------------------------------------------
# Message helpers


def _cc_text(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


def _names(precisions: frozenset[Precision]) -> str:
    return ", ".join(p.value for p in Precision if p in precisions)


def _did_you_mean(word: str, choices: Mapping[str, Any] | tuple[str, ...]) -> str:
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {_quote(matches[0])}? " if matches else ""


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _quote(text: str) -> str:
    return repr(_short(text))


def _describe(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    kind = kinds.get(type(value))
    if kind is None:
        kind = {list: "an array", dict: "a table"}.get(type(value), type(value).__name__)
        return kind
    return f"{kind} ({_short(repr(value))})"
