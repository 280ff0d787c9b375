"""The `fdec plan` command: a model's memory on targets, from its config alone."""

from __future__ import annotations

import json
import pathlib

import click

from fdec.cli.app import FRACTION, Context, cli, fail
from fdec.errors import FdecError

__all__ = ["plan_command"]


@cli.command("plan")
@click.argument("model")
@click.option(
    "--target", "-t", default="all", show_default=True, help="Target name, .toml file or 'all'."
)
@click.option("--quantize", help="Weight precision: fp32, fp16, bf16, fp8, int8, int4, fp4 "
              "[default: the target's recipe].")  # fmt: skip
@click.option("--kv-dtype", help="KV-cache dtype: fp32, fp16, bf16, fp8, int8 [default: recipe].")
@click.option(
    "--context",
    type=click.IntRange(min=1),
    help="Tokens per sequence [default: the model's positions, at most 8192].",
)
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--headroom", default="10%", show_default=True, type=FRACTION, help="Memory kept back."
)
@click.option("--cache-dir", type=click.Path(path_type=pathlib.Path), help="fdec's cache.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def plan_command(model: str, target: str, quantize: str | None, kv_dtype: str | None,
                 context: int | None, batch: int, headroom: float, cache_dir: pathlib.Path | None,
                 as_json: bool) -> None:  # fmt: skip
    """Plan MODEL's memory on targets: weights, KV cache per token, workspace, what fits;
    and, where MODEL's safetensors weights are here, what `fdec compile` would take on this
    machine (peak RSS, streamed or not, and disk beside ./build).

    MODEL is a folder with config.json (no weights needed), a config.json path, or a bundled
    name such as smollm2-135m. Nothing is loaded but the config and the weights' headers.
    """
    from fdec.plan import load_shape, plan_capacity, plan_targets, render_table
    from fdec.targets import list_targets, load_target

    ctx = Context(False, as_json)
    options = dict(weights=quantize, kv_dtype=kv_dtype, context=context, batch=batch,
                   headroom=headroom)  # fmt: skip
    try:
        shape = load_shape(model, cache_dir=cache_dir, progress=ctx.progress)
        if target.strip().lower() == "all":
            rows = plan_targets(shape, list_targets(), **options)
        else:
            rows = [plan_capacity(shape, load_target(target), **options).to_dict()]
        # What compiling it takes on this machine, where the checkpoint's headers are here.
        from fdec.compile.footprint import compile_footprints

        planned = [row for row in rows if "error" not in row]
        figures = compile_footprints(
            model, [row["target"] for row in planned], quantize=quantize, cache_dir=cache_dir
        )
        for row, compiling in zip(planned, figures):
            row["compile"] = compiling
    except FdecError as err:
        fail(err, as_json)
    if as_json:
        click.echo(json.dumps({"model": shape.to_dict(), "plans": rows}, indent=2))
    else:
        click.echo(render_table(shape, rows))
