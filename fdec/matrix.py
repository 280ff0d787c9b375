"""Build matrices: models × targets × recipes, checked before any work, then built one cell at a time or as Ray tasks.

A matrix is a `[matrix]` table in an fdec.toml-style file (or `[tool.fdec.matrix]`)::

    cache_dir = "/shared/fdec-cache"     # fdec.toml keys outside [matrix] apply to every cell
    out = "builds"                       # OUT/<model>/<target>/<recipe>/ is one build
    [matrix]
    models = ["smollm2-135m"]            # or a table: { small = "models/small" }
    targets = ["cpu", "h100", "rtx4090"]
    [matrix.recipes.int8]
    recipe.quantize = "int8"             # any fdec.toml key but model / target / out
    [matrix.recipes.int4-awq]
    recipe.quantize = "int4-awq"
    gates.max_ppl_increase = "10%"

`load_matrix` reads and checks the file; `plan_matrix` expands the cells and checks each one
against its target the way `fdec compile` does before it loads a model (target, backend,
recipe, pass options, output folder, capacity), so a refused cell stops the matrix before any
build; `run_matrix` builds the cells through `fdec.compile` with an executor:

- `local`: one cell after another in this process (what `fdec compile --target a,b` does).
- `ray`: each cell a Ray task declaring its CPUs, the memory its compile needs
  (`compile_memory_bytes`) and, where the cluster has the target's GPU and the cell builds a
  TensorRT engine, that GPU. The cluster is a local one started for the run, or the one at
  `address` / $RAY_ADDRESS (the output and cache folders must then be on storage every node
  sees). A task whose worker dies (killed, out of memory) is retried up to `retries` times;
  a build is written through fdec.build.AtomicBuild, so a killed worker leaves no half build.

The shared front (export, PyTorch reference, calibration statistics) is computed once per model:
the model's first cell runs alone and fills fdec's content-addressed cache (fdec.cache), and its
other cells start when it ends and read the front from there. A re-run skips a cell whose build
is whole (its manifest's output hashes check) and whose inputs are unchanged: the same options,
fdec and library versions (the cell's digest in matrix.json) and the same model files as its
manifest records. Results go to OUT/matrix.json (one row per cell) and OUT/matrix.html (the
matrix, each cell linking its build's report.html); the exit code is the worst cell's
(fdec.api.worst_exit_code).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import html
import importlib.util
import json
import logging
import os
import pathlib
import re
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from fdec.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, FdecError, UsageError

__all__ = [
    "EXECUTORS",
    "PAGE_FILE",
    "RESULTS_FILE",
    "Cell",
    "Matrix",
    "compile_memory_bytes",
    "execute_cell",
    "load_matrix",
    "plan_matrix",
    "render_page",
    "require_ray",
    "run_matrix",
]

logger = logging.getLogger(__name__)

RESULTS_FILE = "matrix.json"
PAGE_FILE = "matrix.html"
LOG_DIR = "matrix-logs"  # per cell: its progress lines and one line per attempt
EXECUTORS = ("local", "ray")
DEFAULT_RETRIES = 2
_MATRIX_KEYS = ("models", "targets", "recipes", "exclude", "retries", "cpus_per_cell", "memory_gb")
_CELL_KEYS = ("model", "target", "out")  # set by the matrix, not by a recipe
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_GIB = 2**30
# Peak RSS of `fdec compile` measured here (README "Measured here", /usr/bin/time -v and
# benchmarks/large_weights.py): a tiny model 0.48 GiB (the fixed overhead: Python, torch,
# onnxruntime); SmolLM2-135M fp32 1.44 GiB = overhead + 1.9× its 0.50 GiB of fp32 weights,
# int4-awq 2.01 GiB = overhead + 3.0×; Llama 1.1B fp32 5.15 GiB = overhead + 1.1×. A cell asks
# overhead + 2× (unquantized) or 3× (quantized: calibration and the quantized copy) the fp32
# weights, plus 10 %.
_COMPILE_OVERHEAD_BYTES = int(0.5 * _GIB)
_COMPILE_WEIGHT_FACTOR = {False: 2.0, True: 3.0}
_COMPILE_MARGIN = 1.10
# Cells return a small dict; builds travel through shared storage, never the object store.
_OBJECT_STORE_BYTES = 100 * 2**20
_UNQUANTIZED = ("none", "fp32", "fp32-none")


# ---------------------------------------------------------------------------------------------
# The matrix file


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


def require_ray() -> None:
    """A UsageError (exit 2) saying how to install Ray when it is missing."""
    try:
        found = importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise UsageError(
            "--executor ray needs Ray, which is not installed",
            "pip install 'fdec[ray]' (or use --executor local)",
        )


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


# ---------------------------------------------------------------------------------------------
# Cells


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
                    int(matrix.memory_gb * _GIB)
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


# ---------------------------------------------------------------------------------------------
# Building one cell (in this process, or on a Ray worker)


def _row_from_build(folder: pathlib.Path) -> dict[str, Any]:
    """A build's figures for its matrix row: size, perplexity, speed, engines."""
    from fdec.build import MANIFEST, sha256_file

    report = json.loads((folder / "report.json").read_text())
    manifest_path = folder / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    numeric = (report.get("verification") or {}).get("numeric") or {}
    before, after = numeric.get("perplexity_source"), numeric.get("perplexity_build")
    measured = None
    bench_path = folder / "bench.json"
    if bench_path.is_file():
        try:
            rows = json.loads(bench_path.read_text()).get("rows") or []
            measured = next((r["decode_tok_s"] for r in rows if r.get("batch") == 1), None)
        except (OSError, ValueError, KeyError, TypeError):
            measured = None
    return {
        "quantize": (report.get("recipe") or {}).get("quantize"),
        "backend": report.get("backend"),
        "bytes": sum(int(item["bytes"]) for item in manifest.get("outputs", {}).values()),
        "perplexity_source": before,
        "perplexity_build": after,
        "ppl_increase": after / before - 1.0 if before and after else None,
        "top1_agreement": numeric.get("top1_agreement"),
        "estimated_decode_tok_s": (report.get("estimate") or {}).get("decode_tokens_per_s"),
        "measured_decode_tok_s": measured,
        "engines": [  # "check": built to prove the graph compiles there, not shipped
            {"backend": e.get("backend"), "status": e.get("status"), "purpose": e.get("purpose")}
            for e in report.get("engines") or []
            if e.get("status") != "not-applicable"
        ],
        "export_cached": (report.get("export") or {}).get("cached"),
        "build_wall_s": report.get("wall_s"),
        "manifest_sha256": sha256_file(manifest_path),
        "manifest_inputs": (manifest.get("inputs") or {}).get("files"),
    }


def execute_cell(task: Mapping[str, Any]) -> dict[str, Any]:
    """Build one cell (a `Cell.task`) with `fdec.compile`; never raises for a failed build:
    the row says what happened. Runs in the driver (local) or in a Ray worker."""
    from fdec.api import compile as fdec_compile

    started = time.perf_counter()
    log_path = pathlib.Path(task["log"])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    worker: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # a Ray worker: which node built the cell
        worker["node"] = ray.get_runtime_context().get_node_id()
    with open(task["attempts"], "a") as attempts:  # one line per attempt (a retry adds one)
        attempts.write(json.dumps({**worker, "started": time.time()}) + "\n")
    row: dict[str, Any] = {"worker": worker}
    with log_path.open("a") as log:
        log.write(f"--- {task['id']}: attempt by pid {worker['pid']} on {worker['host']}\n")

        def progress(message: str) -> None:
            log.write(f"[{time.perf_counter() - started:7.1f}s] {message}\n")
            log.flush()

        try:
            build = fdec_compile(
                task["model"], task["target"], task["out"], progress=progress, **task["options"]
            )
            figures = _row_from_build(build.path)
            figures.pop("manifest_inputs")
            row.update(status="ok", exit_code=EXIT_OK, error=None, **figures)
        except FdecError as err:
            row.update(status="failed", exit_code=err.exit_code, error=err.one_line())
        except Exception as err:  # a bug: the row says so, the other cells go on
            logger.exception("cell %s", task["id"])
            row.update(
                status="failed", exit_code=EXIT_FAILURE,
                error=f"internal error {type(err).__name__}: {err}",
            )  # fmt: skip
        progress(f"{row['status']}" + (f": {row['error']}" if row.get("error") else ""))
    row["wall_s"] = round(time.perf_counter() - started, 2)
    return row


def _up_to_date(cell: Cell, previous: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The build's row when the cell's build is whole and its inputs unchanged, else None."""
    from fdec.build import MANIFEST, verify_build

    if not previous or previous.get("status") not in ("ok", "up-to-date"):
        return None
    if previous.get("digest") != cell.digest or not (cell.out / MANIFEST).is_file():
        return None
    try:
        row = _row_from_build(cell.out)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if row["manifest_sha256"] != previous.get("manifest_sha256"):
        return None  # rebuilt or edited since the matrix recorded it
    if row.pop("manifest_inputs") != cell.inputs:
        return None  # the model's files changed
    if not verify_build(cell.out)["ok"]:
        return None  # a missing or changed output
    return row


# ---------------------------------------------------------------------------------------------
# Running the matrix


class _Board:
    """The rows of a run: cells done, running and failed, written to OUT after each change."""

    def __init__(self, matrix: Matrix, cells: list[Cell], executor: str, address: str | None):
        self.matrix = matrix
        self.cells = cells
        self.started = time.perf_counter()
        self.rows: dict[str, dict[str, Any]] = {
            cell.id: {
                "cell": cell.id, "model": cell.model_label, "target": cell.target_name,
                "recipe": cell.recipe, "out": str(cell.out.relative_to(matrix.out)),
                "status": "pending", "exit_code": None, "digest": cell.digest,
                "resources": {"memory_bytes": cell.memory_bytes},
            }
            for cell in cells
        }  # fmt: skip
        self.meta = {
            "matrix": str(matrix.source), "out": str(matrix.out), "executor": executor,
            "address": address, "models": list(matrix.models),
            "targets": list(dict.fromkeys(cell.target_name for cell in cells)),
            "recipes": [recipe.name for recipe in matrix.recipes],
        }  # fmt: skip
        self.running = 0
        self.active = "running"  # Ray: submitted tasks may wait for a free CPU

    def counts(self) -> dict[str, int]:
        statuses = [row["status"] for row in self.rows.values()]
        return {s: statuses.count(s) for s in ("ok", "up-to-date", "failed", "pending")}

    def line(self) -> str:
        c = self.counts()
        done = c["ok"] + c["up-to-date"] + c["failed"]
        return f"{done}/{len(self.rows)} done, {self.running} {self.active}, {c['failed']} failed"

    def results(self) -> dict[str, Any]:
        from fdec.api import worst_exit_code

        codes = [row["exit_code"] for row in self.rows.values() if row["exit_code"] is not None]
        code = worst_exit_code(codes)
        return {
            **self.meta,
            "ok": code == EXIT_OK and all(r["status"] != "pending" for r in self.rows.values()),
            "exit_code": code,
            "wall_s": round(time.perf_counter() - self.started, 2),
            "counts": self.counts(),
            "cells": list(self.rows.values()),
        }

    def save(self) -> dict[str, Any]:
        results = self.results()
        out = self.matrix.out
        out.mkdir(parents=True, exist_ok=True)
        for name, text in (
            (RESULTS_FILE, json.dumps(results, indent=2) + "\n"),
            (PAGE_FILE, render_page(results)),
        ):
            partial = out / f".{name}.{os.getpid()}.partial"
            partial.write_text(text)
            os.replace(partial, out / name)
        return results


def _previous_rows(out: pathlib.Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads((out / RESULTS_FILE).read_text())
        return {row["cell"]: row for row in data.get("cells", []) if isinstance(row, dict)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _attempts(task: Mapping[str, Any]) -> int:
    try:
        return len(pathlib.Path(task["attempts"]).read_text().splitlines())
    except OSError:
        return 0


def run_matrix(
    matrix: Matrix,
    cells: list[Cell],
    *,
    executor: str = "local",
    address: str | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Build `cells` (from plan_matrix) with `executor`; returns the results (matrix.json's
    content) after writing them to matrix.out. Cells already built with unchanged inputs are
    not built again; failed cells do not stop the others."""
    if executor not in EXECUTORS:
        raise UsageError(f"unknown executor {executor!r}", f"use one of: {', '.join(EXECUTORS)}")
    if executor == "ray":
        require_ray()
    previous = _previous_rows(matrix.out)
    board = _Board(matrix, cells, executor, address)
    to_build = []
    for cell in cells:
        row = _up_to_date(cell, previous.get(cell.id))
        if row is None:
            to_build.append(cell)
            continue
        kept = previous[cell.id]
        board.rows[cell.id].update(
            row, status="up-to-date", exit_code=EXIT_OK, error=None,
            wall_s=0.0, attempts=0, built_wall_s=kept.get("built_wall_s", kept.get("wall_s")),
        )  # fmt: skip
    skipped = len(cells) - len(to_build)
    if skipped:
        progress(f"{skipped} of {len(cells)} cells up to date (whole builds, inputs unchanged)")
    if not to_build:
        board.meta["executor"] = f"{executor} (not started: nothing to build)"
        return board.save()
    board.save()
    if executor == "local":
        _run_local(matrix, to_build, board, progress)
    else:
        _run_ray(matrix, to_build, board, address, progress)
    return board.save()


def _record(board: _Board, cell: Cell, row: dict[str, Any], attempts: int, progress) -> None:
    board.rows[cell.id].update(row, attempts=attempts)
    board.save()
    status = row["status"]
    detail = f" ({row['error']})" if row.get("error") else ""
    progress(f"{cell.id}: {status} in {row.get('wall_s', 0):.1f} s{detail} [{board.line()}]")


def _run_local(matrix: Matrix, cells: list[Cell], board: _Board, progress) -> None:
    for cell in cells:
        board.running = 1
        progress(f"{cell.id}: building [{board.line()}]")
        task = cell.task(matrix.out)
        row = execute_cell(task)
        board.running = 0
        _record(board, cell, row, _attempts(task), progress)


def _is_loopback(address: str | None) -> bool:
    if not address:
        return True
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def _gpu_options(cell: Cell, resources: Mapping[str, float]) -> dict[str, Any]:
    """A GPU for a cell that builds a TensorRT engine, when the cluster has the target's GPU
    (Ray names nodes' GPUs `accelerator_type:H100`, ...); elsewhere the cell runs on CPUs and
    its engine is planned and marked deferred, as fdec compile does without that GPU."""
    if cell.gpu_name is None or not resources.get("GPU"):
        return {}
    want = cell.gpu_name.lower().replace("-", "")
    for name in resources:
        kind = name.partition("accelerator_type:")[2]
        if kind and kind.lower().replace("-", "").startswith(want):
            return {"num_gpus": 1, "resources": {name: 0.001}}
    return {}


def _start_ray(address: str | None, progress) -> Any:
    """Connect to the cluster at `address` ($RAY_ADDRESS when None), or start a local one."""
    if _is_loopback(address or os.environ.get("RAY_ADDRESS")):
        # Ray binds a node to the host's outward address unless it runs as a single-machine
        # cluster; this keeps a local cluster (and a driver joining one) on loopback.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        progress(f"connecting to the Ray cluster at {target}")
        ray.init(address=target, logging_level=logging.WARNING, log_to_driver=False)
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        progress(f"starting a local Ray cluster ({os.cpu_count()} CPUs, no dashboard)")
        ray.init(
            num_cpus=os.cpu_count(),
            object_store_memory=_OBJECT_STORE_BYTES,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    return ray


def _run_ray(
    matrix: Matrix, cells: list[Cell], board: _Board, address: str | None, progress
) -> None:
    # Ray's driver prints the cluster's messages (a worker died, ...) on stdout, which is
    # fdec's own (--json): they go to stderr with the progress lines.
    with contextlib.redirect_stdout(sys.stderr):
        ray = _start_ray(address, progress)
        board.active = "running or queued"
        try:
            _schedule(ray, matrix, cells, board, progress)
        finally:
            ray.shutdown()


def _schedule(ray: Any, matrix: Matrix, cells: list[Cell], board: _Board, progress) -> None:
    """Submit each model's first cell, and its other cells once it ends; gather the rows."""
    resources = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    largest = {
        key: max((n["Resources"].get(key, 0.0) for n in nodes), default=0.0)
        for key in ("CPU", "memory")
    }
    progress(
        f"Ray cluster: {len(nodes)} nodes, {resources.get('CPU', 0):g} CPUs, "
        f"{resources.get('GPU', 0):g} GPUs"
    )
    # Each cell in a fresh worker process (max_calls=1): a compile's memory is returned to
    # the node when it ends, and no state outlives a cell (like one `fdec compile` each).
    remote = ray.remote(max_calls=1)(execute_cell)
    pending: dict[Any, Cell] = {}
    waiting: dict[str, list[Cell]] = {}  # model -> cells that start after its first cell
    leaders: set[str] = set()

    def submit(cell: Cell) -> None:
        too_big = [
            f"{need:.1f} {unit} of {key}" for key, need, unit, scale in (
                ("memory", cell.memory_bytes / _GIB, "GiB", _GIB),
                ("CPU", matrix.cpus_per_cell, "CPUs", 1),
            ) if need * scale > largest[key]
        ]  # fmt: skip
        if too_big:
            row = {
                "status": "failed", "exit_code": EXIT_USAGE, "wall_s": 0.0,
                "error": f"the cell needs {' and '.join(too_big)}, more than any node of "
                f"the Ray cluster offers; add a larger node, or set [matrix] memory_gb / "
                f"cpus_per_cell",
            }  # fmt: skip
            _record(board, cell, row, 0, progress)
            return
        options = {
            "num_cpus": matrix.cpus_per_cell, "memory": cell.memory_bytes,
            "max_retries": matrix.retries, "retry_exceptions": False,
            **_gpu_options(cell, resources),
        }  # fmt: skip
        board.rows[cell.id]["resources"] = {
            k: options[k] for k in ("num_cpus", "memory", "num_gpus") if k in options
        }
        task = cell.task(matrix.out)
        pending[remote.options(**options).remote(task)] = cell
        board.running = len(pending)
        progress(f"{cell.id}: submitted [{board.line()}]")

    for cell in cells:
        if cell.model_label in leaders:
            waiting.setdefault(cell.model_label, []).append(cell)
        else:
            leaders.add(cell.model_label)
            submit(cell)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            cell = pending.pop(ref)
            board.running = len(pending)
            task = cell.task(matrix.out)
            try:
                row = ray.get(ref)
            except ray.exceptions.RayError as err:  # the worker died on every attempt
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                row = {
                    "status": "failed", "exit_code": EXIT_FAILURE, "wall_s": None,
                    "error": f"{type(err).__name__} after {_attempts(task)} attempts: "
                    f"{first[:200]}",
                }  # fmt: skip
            _record(board, cell, row, _attempts(task), progress)
            for follower in waiting.pop(cell.model_label, []):
                submit(follower)  # the front is in the cache now


# ---------------------------------------------------------------------------------------------
# The matrix page


def _figure(value: Any, text: str) -> str:
    return text if value is not None else "–"


def render_page(results: Mapping[str, Any]) -> str:
    """OUT/matrix.html: per model, recipes × targets; each cell its status, size, perplexity
    increase, estimated and measured decode speed, and a link to its build's report.html."""
    esc = html.escape
    rows = results["cells"]
    counts = results.get("counts", {})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>fdec matrix</title><style>",
        "body{font:14px system-ui,sans-serif;margin:2em}table{border-collapse:collapse;"
        "margin-bottom:2em}th,td{border:1px solid #ccc;padding:.4em .6em;vertical-align:top}"
        "th{background:#f4f4f4}.ok{background:#eaf7ea}.up-to-date{background:#eef3fb}"
        ".failed{background:#fbeaea}.pending{background:#f7f7f7}small{color:#555}",
        "</style></head><body>",
        f"<h1>fdec matrix</h1><p>{esc(str(results.get('matrix')))} · executor "
        f"{esc(str(results.get('executor')))} · wall {results.get('wall_s', 0):.1f} s · exit "
        f"code {results.get('exit_code')} · ok {counts.get('ok', 0)}, up to date "
        f"{counts.get('up-to-date', 0)}, failed {counts.get('failed', 0)}, pending "
        f"{counts.get('pending', 0)}</p>",
    ]
    targets = list(dict.fromkeys(row["target"] for row in rows))
    for model in dict.fromkeys(row["model"] for row in rows):
        parts.append(f"<h2>{esc(model)}</h2><table><tr><th>recipe</th>")
        parts += [f"<th>{esc(t)}</th>" for t in targets]
        parts.append("</tr>")
        for recipe in dict.fromkeys(row["recipe"] for row in rows if row["model"] == model):
            parts.append(f"<tr><th>{esc(recipe)}</th>")
            for target in targets:
                row = next(
                    (r for r in rows if (r["model"], r["recipe"], r["target"]) ==
                     (model, recipe, target)), None,
                )  # fmt: skip
                if row is None:
                    parts.append("<td><small>excluded</small></td>")
                    continue
                parts.append(_page_cell(row))
            parts.append("</tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "".join(parts)


def _page_cell(row: Mapping[str, Any]) -> str:
    esc = html.escape
    status = row["status"]
    lines = [f"<b>{esc(status)}</b>"]
    if row.get("exit_code"):
        lines[0] += f" (exit {row['exit_code']})"
    if row.get("error"):
        lines.append(f"<small>{esc(row['error'])}</small>")
    if row.get("bytes") is not None:
        ppl = row.get("ppl_increase")
        est, measured = row.get("estimated_decode_tok_s"), row.get("measured_decode_tok_s")
        lines += [
            f"{esc(str(row.get('quantize')))} · {row['bytes'] / 1e6:.1f} MB",
            "perplexity " + _figure(ppl, f"{(ppl or 0) * 100:+.1f} %"),
            "decode est. " + _figure(est, f"{est or 0:,.0f} tok/s")
            + " · measured " + _figure(measured, f"{measured or 0:,.1f} tok/s"),
        ]  # fmt: skip
        engines = ", ".join(
            f"{e['backend']} {e['status']}" + (" (check)" if e.get("purpose") == "check" else "")
            for e in row.get("engines") or []
        )
        if engines:
            lines.append(f"<small>{esc(engines)}</small>")
        lines.append(f"<a href='{esc(row['out'])}/report.html'>report</a>")
    if row.get("wall_s") is not None and status != "up-to-date":
        attempts = row.get("attempts") or 0
        lines.append(
            f"<small>{row['wall_s']:.1f} s"
            + (f", {attempts} attempts" if attempts > 1 else "") + "</small>"
        )  # fmt: skip
    return f"<td class='{esc(status)}'>" + "<br>".join(lines) + "</td>"
