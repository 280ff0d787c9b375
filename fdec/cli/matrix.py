"""The `fdec matrix` command: models × targets × recipes from a matrix file, checked then built."""

from __future__ import annotations

import json
import pathlib
import sys

import click

from fdec.cli.app import Context, cli, fail, quiet_libraries
from fdec.errors import FdecError

__all__ = ["matrix_command"]


@cli.command("matrix")
@click.argument("matrix_file", required=False, type=click.Path(path_type=pathlib.Path))
@click.option("-o", "--out", type=click.Path(path_type=pathlib.Path),
              help="Parent folder of the builds (default: the file's out).")  # fmt: skip
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local",
              show_default=True, help="local: one build at a time; ray: cells as Ray tasks.")  # fmt: skip
@click.option("--address", help="Ray cluster (ray://HOST:PORT or HOST:PORT; default "
              "$RAY_ADDRESS, else a local cluster started for the run).")  # fmt: skip
@click.option("--dry-run", is_flag=True, help="Expand and check the cells; build nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def matrix_command(matrix_file: pathlib.Path | None, out: pathlib.Path | None, executor: str,
                   address: str | None, dry_run: bool, as_json: bool, quiet: bool) -> None:  # fmt: skip
    """Build models × targets × recipes from MATRIX_FILE's [matrix] table (default: ./fdec.toml
    or pyproject.toml's [tool.fdec]): every cell checked first, results in OUT/matrix.json and
    OUT/matrix.html; the exit code is the worst cell's."""
    ctx = Context(quiet, as_json)
    from fdec.matrix import load_matrix, plan_matrix, require_ray, run_matrix

    try:
        if executor == "ray" and not dry_run:
            require_ray()
        matrix = load_matrix(matrix_file, out=out)
        quiet_libraries()
        cells = plan_matrix(matrix, progress=ctx.progress)
        if dry_run:
            planned = [{"cell": c.id, "out": str(c.out), "quantize": c.quantize,
                        "backend": c.backend, "memory_bytes": c.memory_bytes} for c in cells]  # fmt: skip
            if as_json:
                click.echo(json.dumps({"ok": True, "cells": planned}, sort_keys=True))
            elif not quiet:
                for row in planned:
                    click.echo(f"{row['cell']}: --quantize {row['quantize']}, {row['backend']}, "
                               f"compile memory {row['memory_bytes'] / 2**30:.1f} GiB")  # fmt: skip
            return
        ctx.progress(f"{len(cells)} cells checked; building with --executor {executor}")
        results = run_matrix(matrix, cells, executor=executor, address=address,
                             progress=ctx.progress)  # fmt: skip
    except FdecError as err:
        fail(err, as_json)
    if as_json:
        click.echo(json.dumps(results, sort_keys=True))
    elif not quiet:
        for row in results["cells"]:
            figures = ""
            if row.get("bytes") is not None:
                ppl = row.get("ppl_increase")
                figures = f", {row['bytes'] / 1e6:.1f} MB" + (
                    f", perplexity {ppl * 100:+.1f} %" if ppl is not None else "")  # fmt: skip
            error = f": {row['error']}" if row.get("error") else ""
            click.echo(f"{row['cell']}: {row['status']}{figures}{error}")
        click.echo(f"matrix page: {matrix.out / 'matrix.html'}")
    if results["exit_code"]:
        sys.exit(results["exit_code"])
