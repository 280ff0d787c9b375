"""The `fdec distill` command: train a pruned student from its teacher into an HF checkpoint."""

from __future__ import annotations

import json
import pathlib

import click

from fdec.cli.app import Context, cli, fail, quiet_libraries
from fdec.errors import FdecError

__all__ = ["distill_command"]


@cli.command("distill")
@click.argument("student")
@click.option("--teacher", help="Teacher model [default: the student's distill.json teacher].")
@click.option("--data", type=click.Path(path_type=pathlib.Path),
              help="Training text (.txt or .jsonl) [default: the built-in calibration corpus].")  # fmt: skip
@click.option("--steps", default=100, show_default=True, type=int, help="Optimizer steps.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=pathlib.Path),
              help="Folder for the distilled HF checkpoint.")  # fmt: skip
@click.option("--lr", type=float, help="Learning rate [default: the recipe's, 1e-4].")
@click.option("--cache-dir", type=click.Path(path_type=pathlib.Path), help="fdec's cache.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option("--force", is_flag=True,
              help="Let -o replace a folder holding files fdec did not write.")  # fmt: skip
def distill_command(student: str, teacher: str | None, data: pathlib.Path | None, steps: int,
                    out: pathlib.Path, lr: float | None, cache_dir: pathlib.Path | None,
                    as_json: bool, quiet: bool, force: bool) -> None:  # fmt: skip
    """Distill STUDENT (a pruned model folder with distill.json) from its teacher with PyTorch
    and write an HF checkpoint to --out that `fdec compile` takes."""
    ctx = Context(quiet, as_json)
    quiet_libraries()
    from fdec.distill import distill

    try:
        result = distill(student, teacher, data, steps=steps, out=out, lr=lr,
                         cache_dir=cache_dir, progress=ctx.progress, force=force)  # fmt: skip
    except FdecError as err:
        fail(err, as_json)
    if as_json:
        click.echo(json.dumps({"ok": True, **result.to_dict()}, sort_keys=True))
    elif not quiet:
        b, a = result.before, result.after
        click.echo(f"loss {result.first_loss:.4f} -> {result.last_loss:.4f} over {result.steps} "
                   f"steps; held perplexity {b['perplexity']:.2f} -> {a['perplexity']:.2f} "
                   f"(teacher {result.teacher_perplexity:.2f}); KL to teacher "
                   f"{b['kl_to_teacher']:.4f} -> {a['kl_to_teacher']:.4f}")  # fmt: skip
        click.echo(f"checkpoint written to {result.out}")
