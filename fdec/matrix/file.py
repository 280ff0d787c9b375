"""The matrix file: a `[matrix]` table read and checked into a `Matrix`."""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
import re
from typing import Any

from fdec.errors import UsageError

__all__ = ["DEFAULT_RETRIES", "Matrix", "Recipe", "load_matrix"]

DEFAULT_RETRIES = 2
_MATRIX_KEYS = ("models", "targets", "recipes", "exclude", "retries", "cpus_per_cell", "memory_gb")
_CELL_KEYS = ("model", "target", "out")  # set by the matrix, not by a recipe
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One recipe of the matrix: a name and its fdec.compile keywords."""

    name: str
    options: dict[str, Any]


@dataclasses.dataclass
class Matrix:
    """A checked matrix file: what to build and where."""

    source: pathlib.Path
    models: dict[str, str]  # folder name -> MODEL as fdec compile takes it
    targets: list[str]
    recipes: list[Recipe]
    out: pathlib.Path
    base: dict[str, Any]  # fdec.compile keywords every cell gets (the file's other keys)
    exclude: list[dict[str, str]]
    retries: int = DEFAULT_RETRIES
    cpus_per_cell: float = 1.0
    memory_gb: float | None = None  # per cell, instead of compile_memory_bytes


def _wrong(where: str, what: str, example: str) -> UsageError:
    return UsageError(f"{where}: {what}", f"write e.g. {example} (README, Build matrices)")


def _strings(value: Any, where: str, key: str, example: str) -> list[str]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise _wrong(where, f"{key} must be a string or a list of strings", example)
    items = [item.strip() for item in items if item.strip()]
    if not items:
        raise _wrong(where, f"{key} is empty", example)
    return items


def _model_label(model: str) -> str:
    name = pathlib.Path(model.rstrip("/")).name
    name = name[: -len(".gguf")] if name.lower().endswith(".gguf") else name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def _models(value: Any, where: str, base_dir: pathlib.Path) -> dict[str, str]:
    example = 'models = ["smollm2-135m"] or models = { small = "models/small" }'
    if isinstance(value, dict):
        labelled = list(value.items())
        if not labelled or not all(isinstance(m, str) and m.strip() for _, m in labelled):
            raise _wrong(where, "matrix.models must name each model by a string", example)
    else:
        labelled = [(_model_label(m), m) for m in _strings(value, where, "matrix.models", example)]
    models: dict[str, str] = {}
    for label, model in labelled:
        if not _NAME.match(label):
            raise _wrong(where, f"model name {label!r} is not a folder name", example)
        if label in models:
            raise UsageError(
                f"{where}: two models would build into the folder {label!r}",
                'name them: models = { a = "...", b = "..." }',
            )
        # A path relative to the file, where it exists; else a bundled name or a hub id.
        path = pathlib.Path(model).expanduser()
        path = path if path.is_absolute() else base_dir / path
        models[label] = str(path.resolve()) if path.exists() else model
    return models


def _recipes(value: Any, source: pathlib.Path, where: str) -> list[Recipe]:
    from fdec.config import parse_config

    example = '[matrix.recipes.int8] recipe.quantize = "int8"'
    if value is None:
        return [Recipe("default", {})]  # each target's own recipe
    if not isinstance(value, dict) or not value:
        raise _wrong(where, "matrix.recipes must be a table of recipe tables", example)
    recipes = []
    for name, table in value.items():
        label = f"{where} [matrix.recipes.{name}]"
        if not _NAME.match(name):
            raise _wrong(where, f"recipe name {name!r} is not a folder name", example)
        if not isinstance(table, dict):
            raise _wrong(label, "a recipe must be a table of fdec.toml keys", example)
        for key in _CELL_KEYS:
            if key in table:
                raise UsageError(
                    f"{label}: {key} is set by the matrix, not by a recipe",
                    "list models and targets in [matrix]; set out at the top of the file",
                )
        recipes.append(Recipe(name, parse_config(table, source, where=label).values))
    return recipes


def load_matrix(path: pathlib.Path | None = None, *, out: pathlib.Path | None = None) -> Matrix:
    """Read and check a matrix file (default: ./fdec.toml, else ./pyproject.toml's
    [tool.fdec]); `out` overrides the file's `out`. UsageError/InputError (exit 2) otherwise."""
    from fdec.config import CONFIG_FILE, PYPROJECT_FILE, parse_config, read_config_table

    if path is None:
        path = pathlib.Path(CONFIG_FILE)
        if not path.is_file():
            path = pathlib.Path(PYPROJECT_FILE)
        if not path.is_file():
            raise UsageError(
                "no matrix file given and no fdec.toml or pyproject.toml here",
                "pass MATRIX.toml (README, Build matrices)",
            )
    source = pathlib.Path(path).absolute()
    table = read_config_table(source)
    where = str(source) + (" [tool.fdec]" if source.name == PYPROJECT_FILE else "")
    spec = table.get("matrix")
    if not isinstance(spec, dict):
        raise UsageError(
            f"{where} has no [matrix] table",
            "add [matrix] with models, targets and [matrix.recipes.NAME] (README, Build matrices)",
        )
    for key in spec:
        if key not in _MATRIX_KEYS:
            near = difflib.get_close_matches(key, _MATRIX_KEYS, n=1)
            raise UsageError(
                f"{where}: unknown key 'matrix.{key}'",
                f"did you mean 'matrix.{near[0]}'?" if near else f"keys: {', '.join(_MATRIX_KEYS)}",
            )
    base = dict(parse_config(table, source).values)  # [matrix] itself is skipped there
    model, target, file_out = (
        base.pop("model", None),
        base.pop("target", None),
        base.pop("out", None),
    )
    models_value = spec.get("models", [model] if model else None)
    if models_value is None:
        raise _wrong(where, "no models: set matrix.models (or model)", 'models = ["smollm2-135m"]')
    targets_value = spec.get("targets", target)
    if targets_value is None:
        raise _wrong(
            where, "no targets: set matrix.targets (or target)", 'targets = ["cpu", "h100"]'
        )
    out = out or file_out
    if out is None:
        raise UsageError(f"{where}: no output folder", 'pass -o DIR, or set out = "builds"')
    exclude = spec.get("exclude", [])
    if not isinstance(exclude, list) or not all(
        isinstance(e, dict) and e and set(e) <= {"model", "target", "recipe"}
        and all(isinstance(v, str) for v in e.values())
        for e in exclude
    ):  # fmt: skip
        raise _wrong(
            where, "matrix.exclude must be a list of {model, target, recipe} tables",
            'exclude = [{ target = "cpu", recipe = "fp8" }]',
        )  # fmt: skip
    retries = spec.get("retries", DEFAULT_RETRIES)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise _wrong(
            where, f"matrix.retries must be an integer >= 0, got {retries!r}", "retries = 2"
        )
    numbers = {}
    for key in ("cpus_per_cell", "memory_gb"):
        value = spec.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not value > 0):  # fmt: skip
            raise _wrong(where, f"matrix.{key} must be a number > 0, got {value!r}", f"{key} = 2")
        numbers[key] = value
    return Matrix(
        source=source,
        models=_models(models_value, where, source.parent),
        targets=_strings(targets_value, where, "matrix.targets", 'targets = ["cpu", "h100"]'),
        recipes=_recipes(spec.get("recipes"), source, where),
        out=pathlib.Path(out).absolute(),
        base=base,
        exclude=exclude,
        retries=retries,
        cpus_per_cell=float(numbers["cpus_per_cell"] or 1.0),
        memory_gb=numbers["memory_gb"],
    )
