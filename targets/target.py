"""The `Target` class: one deployment target's hardware facts, frozen."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

from fdec.errors import InputError
from fdec.targets.messages import cc_text
from fdec.targets.precision import FALLBACKS, MIN_CC, Precision, derive_precisions, precision_names

__all__ = ["FrozenMap", "Target"]


class FrozenMap(Mapping[Any, Any]):
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
        object.__setattr__(self, "peak_tflops", FrozenMap(ordered))
        recipe = {str(k): str(v) for k, v in self.default_recipe.items()}
        object.__setattr__(self, "default_recipe", FrozenMap(recipe))
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
        return derive_precisions(self.compute_capability)

    def supports(self, precision: Precision | str) -> bool:
        """Whether this target computes in `precision` (a Precision or a name like "fp8")."""
        return Precision.parse(precision) in self.precisions

    def require(self, precision: Precision | str) -> Precision:
        """Return `precision` parsed; raise InputError naming the need and the alternatives."""
        wanted = Precision.parse(precision)
        have = self.precisions
        if wanted in have:
            return wanted
        alternatives = [p.value for p in FALLBACKS[wanted] if p in have][:2]
        fix = f"use {' or '.join(alternatives)}" if alternatives else f"use {precision_names(have)}"
        if self.compute_capability is None:
            problem = f"{wanted.label} needs a GPU; {self.name} supports {precision_names(have)}"
        else:
            need = MIN_CC[wanted]
            problem = (
                f"{wanted.label} needs compute capability ≥ {cc_text(need)}; "
                f"{self.name} is {cc_text(self.compute_capability)}"
            )
        raise InputError(problem, fix)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view: precisions as sorted names, compute capability as "9.0"."""
        cc = self.compute_capability
        return {
            "name": self.name,
            "display_name": self.display_name,
            "vendor": self.vendor,
            "compute_capability": cc_text(cc) if cc is not None else None,
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
