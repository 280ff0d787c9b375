"""A matrix's cells: expanded, each checked as `fdec compile` checks it before it loads the model."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

from fdec.errors import FdecError, UsageError
from fdec.matrix.file import Matrix

__all__ = ["GIB", "LOG_DIR", "Cell", "compile_memory_bytes", "plan_matrix"]

LOG_DIR = "matrix-logs"  # per cell: its progress lines and one line per attempt

GIB = 2**30
# Peak RSS of `fdec compile` measured here (README "Measured here", /usr/bin/time -v and
# benchmarks/large_weights.py): a tiny model 0.48 GiB (the fixed overhead: Python, torch,
# onnxruntime); SmolLM2-135M fp32 1.44 GiB = overhead + 1.9× its 0.50 GiB of fp32 weights,
# int4-awq 2.01 GiB = overhead + 3.0×; Llama 1.1B fp32 5.15 GiB = overhead + 1.1×. A cell asks
# overhead + 2× (unquantized) or 3× (quantized: calibration and the quantized copy) the fp32
# weights, plus 10 %.
_COMPILE_OVERHEAD_BYTES = int(0.5 * GIB)
_COMPILE_WEIGHT_FACTOR = {False: 2.0, True: 3.0}
_COMPILE_MARGIN = 1.10

_UNQUANTIZED = ("none", "fp32", "fp32-none")


@dataclasses.dataclass
class Cell:
    """One build of the matrix, checked: what `fdec.compile` gets and what it asks of a node."""

    model_label: str
    model: str
    target: str  # as given (a name or a target file)
    target_name: str
    recipe: str
    options: dict[str, Any]  # fdec.compile keywords (JSON-able)
    out: pathlib.Path
    quantize: str
    backend: str
    memory_bytes: int
    digest: str = ""  # inputs, options and versions: an unchanged cell has the same digest
    inputs: dict[str, str] = dataclasses.field(default_factory=dict)  # model file -> sha256
    gpu_name: str | None = None  # the target's GPU, where this cell builds a TensorRT engine

    @property
    def id(self) -> str:
        return f"{self.model_label}/{self.target_name}/{self.recipe}"

    def task(self, root: pathlib.Path) -> dict[str, Any]:
        """What a worker needs to build the cell (plain data: it travels to Ray workers)."""
        logs = root / LOG_DIR / self.id.replace("/", "--")
        return {
            "id": self.id, "model": self.model, "target": self.target, "out": str(self.out),
            "options": self.options, "log": f"{logs}.log", "attempts": f"{logs}.attempts",
        }  # fmt: skip


def compile_memory_bytes(shape: Any, quantize: str) -> int:
    """The peak RSS a compile of `shape` (fdec.plan.ModelShape) is expected to reach: see
    _COMPILE_* above for the measurements behind the formula."""
    from fdec.plan import WEIGHT_FORMATS

    fp32 = shape.weight_bytes(WEIGHT_FORMATS["fp32"], 4)
    quantized = quantize.lower() not in _UNQUANTIZED
    need = _COMPILE_OVERHEAD_BYTES + _COMPILE_WEIGHT_FACTOR[quantized] * fp32
    return int(need * _COMPILE_MARGIN)


def _plain(value: Any) -> Any:
    """Config values as fdec.compile keywords take them (paths as strings)."""
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _excluded(matrix: Matrix, label: str, target: str, recipe: str) -> dict[str, str] | None:
    values = {"model": label, "target": target, "recipe": recipe}
    for rule in matrix.exclude:
        if all(values[key] == value for key, value in rule.items()):
            return rule
    return None


def plan_matrix(
    matrix: Matrix, *, progress: Callable[[str], None] = lambda message: None
) -> list[Cell]:
    """Every cell of `matrix`, each checked against its target as `fdec compile` checks it.
    Refused cells raise one FdecError naming them all (exit code: the worst of theirs), before
    any build; an exclude rule that matches no cell is an error too."""
    from fdec.api import compile_options
    from fdec.cache import DigestIndex, digest_of, source_inputs, tool_versions
    from fdec.compile.resolve import check_before_load
    from fdec.frontend.source import default_cache_dir, resolve_source
    from fdec.plan import shape_from_config
    from fdec.targets import load_target

    targets = []
    seen: dict[str, str] = {}
    for given in matrix.targets:
        target = load_target(given)  # an unknown target: InputError naming the nearest
        if target.name in seen:
            raise UsageError(
                f"target {target.name} is given twice ({seen[target.name]!r} and {given!r})",
                "list each target once",
            )
        seen[target.name] = given
        targets.append((given, target))
    cache_dir = pathlib.Path(matrix.base.get("cache_dir") or default_cache_dir()).absolute()
    index = DigestIndex(cache_dir)
    versions = tool_versions()
    used_rules: set[int] = set()
    cells: list[Cell] = []
    refused: list[tuple[str, FdecError]] = []
    for label, model in matrix.models.items():
        trust_pickle = bool(matrix.base.get("trust_pickle"))
        source = resolve_source(
            model, trust_pickle=trust_pickle, cache_dir=cache_dir, progress=progress
        )
        shape = shape_from_config(source.config, model)
        inputs = source_inputs(source, index)
        for recipe in matrix.recipes:
            options = {name: _plain(value) for name, value in matrix.base.items()}
            options.update({name: _plain(value) for name, value in recipe.options.items()})
            options["cache_dir"] = str(cache_dir)  # one cache, seen by every worker
            calibration = options.get("calibration")
            for given, target in targets:
                rule = _excluded(matrix, label, target.name, recipe.name)
                if rule is not None:
                    used_rules.add(matrix.exclude.index(rule))
                    continue
                cell_id = f"{label}/{target.name}/{recipe.name}"
                out = matrix.out / label / target.name / recipe.name
                try:  # what `fdec compile` checks before it loads the model
                    asked, _ = compile_options(model, given, out, **options)
                    settings = check_before_load(asked, source)
                except FdecError as err:
                    refused.append((cell_id, err))
                    continue
                backend = settings.backend.name
                memory = (
                    int(matrix.memory_gb * GIB)
                    if matrix.memory_gb
                    else compile_memory_bytes(shape, settings.quantize)
                )
                cell = Cell(
                    model_label=label, model=model, target=given, target_name=target.name,
                    recipe=recipe.name, options=dict(options), out=out,
                    quantize=settings.quantize, backend=backend, memory_bytes=memory,
                    inputs=inputs, gpu_name=target.name if backend == "tensorrt" else None,
                )  # fmt: skip
                cell.digest = digest_of(
                    "matrix-cell",
                    model=model, target=target.to_dict(), inputs=inputs,
                    options={k: v for k, v in options.items() if k != "cache_dir"},
                    calibration=index.sha256(pathlib.Path(calibration)) if calibration else None,
                    versions=versions,
                )  # fmt: skip
                cells.append(cell)
    index.save()
    unused = [rule for i, rule in enumerate(matrix.exclude) if i not in used_rules]
    if unused:
        raise UsageError(
            f"{matrix.source}: matrix.exclude rule {unused[0]} matches no cell",
            "check its model, target and recipe names (models are named by their folder)",
        )
    if refused:
        from fdec.api import worst_exit_code

        code = worst_exit_code([err.exit_code for _, err in refused])
        listed = "; ".join(f"{cell_id}: {err.problem}" for cell_id, err in refused)
        first = refused[0][0].split("/")
        raise FdecError(
            f"{len(refused)} of {len(refused) + len(cells)} cells refused before any build: "
            f"{listed}",
            "change those recipes, or leave the cells out with [matrix] exclude = "
            f'[{{ target = "{first[1]}", recipe = "{first[2]}" }}]',
            exit_code=code,
        )
    if not cells:
        raise UsageError(f"{matrix.source}: the matrix has no cells", "check matrix.exclude")
    return cells
