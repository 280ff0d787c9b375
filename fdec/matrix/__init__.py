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

from fdec.matrix.board import PAGE_FILE, RESULTS_FILE
from fdec.matrix.execute import execute_cell
from fdec.matrix.file import Matrix, load_matrix
from fdec.matrix.page import render_page
from fdec.matrix.plan import Cell, compile_memory_bytes, plan_matrix
from fdec.matrix.ray_executor import require_ray
from fdec.matrix.run import EXECUTORS, run_matrix

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
