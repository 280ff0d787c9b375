"""What fdec knows without a model: `fdec passes` and `fdec targets`."""

from __future__ import annotations

import json

import click

from fdec.cli.app import cli, fail
from fdec.errors import FdecError

__all__ = ["passes_command", "targets_command"]


@cli.command("passes")
@click.option("--json", "as_json", is_flag=True)
def passes_command(as_json: bool) -> None:
    """List the registered passes: name, family and purpose."""
    from fdec.passes import DEFAULT_PIPELINE, REGISTRY

    rows = [
        {
            "name": name,
            "family": cls.family,
            "summary": cls.summary,
            "default": name in DEFAULT_PIPELINE,
            "added_by": cls.added_by,  # an option, where --passes cannot list it
        }
        for name, cls in sorted(REGISTRY.items(), key=lambda item: (item[1].family, item[0]))
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max(len(row["name"]) for row in rows)
    for row in rows:
        mark = "*" if row["default"] else " "
        click.echo(f"{mark} {row['name'].ljust(width)}  {row['family']:<8}  {row['summary']}")
    click.echo("\n* = in the default pipeline (" + ", ".join(DEFAULT_PIPELINE) + ")")


@cli.command("targets")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True)
def targets_command(name: str | None, as_json: bool) -> None:
    """List target GPUs (or show one: fdec targets h100 --json)."""
    from fdec.targets import list_targets, load_target

    try:
        targets = [load_target(name)] if name else list_targets()
    except FdecError as err:
        fail(err, as_json)
    if as_json:
        data = [t.to_dict() for t in targets]
        click.echo(json.dumps(data[0] if name else data, indent=2, sort_keys=True))
        return
    header = ("name", "gpu", "cc", "memory", "bandwidth", "precisions", "backend")
    rows = [header] + [
        (
            t.name,
            t.display_name,
            ".".join(map(str, t.compute_capability)) if t.compute_capability else "-",
            f"{t.memory_gb:g} GB" if t.memory_gb else "host",
            f"{t.memory_bandwidth_gbs:g} GB/s",
            ",".join(sorted(p.value for p in t.precisions)),
            t.default_backend,
        )
        for t in targets
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
