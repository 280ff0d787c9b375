"""The `fdec cache` commands: what fdec's cache holds, and clearing it."""

from __future__ import annotations

import json
import pathlib

import click

from fdec.cli.app import cli, fail
from fdec.errors import FdecError

__all__ = ["cache_clear_command", "cache_group", "cache_info_command"]


@cli.group("cache")
def cache_group() -> None:
    """fdec's cache of exports, references and pass results: info, clear."""


@cache_group.command("info")
@click.option("--cache-dir", type=click.Path(path_type=pathlib.Path), help="fdec's cache.")
@click.option("--json", "as_json", is_flag=True)
def cache_info_command(cache_dir: pathlib.Path | None, as_json: bool) -> None:
    """What the cache holds, by kind, and its size cap (FDEC_CACHE_MAX_GB)."""
    from fdec.cache import cache_info
    from fdec.frontend.source import default_cache_dir

    try:
        info = cache_info(cache_dir or default_cache_dir())
    except FdecError as err:
        fail(err, as_json)
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    click.echo(f"cache {info['folder']}: {info['entry_bytes'] / 1e9:.2f} GB of entries "
               f"(cap {info['max_bytes'] / 1e9:.1f} GB)")  # fmt: skip
    for kind, row in sorted(info["entries"].items()):
        click.echo(f"  {kind:<10} {row['entries']:>5} entries  {row['bytes'] / 1e6:>10.1f} MB")
    for name, size in sorted(info["other_bytes"].items()):
        click.echo(f"  {name:<10} {size / 1e6:>24.1f} MB")


@cache_group.command("clear")
@click.option("--cache-dir", type=click.Path(path_type=pathlib.Path), help="fdec's cache.")
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="Also converted GGUF and int4 checkpoints and hub downloads.",
)
def cache_clear_command(cache_dir: pathlib.Path | None, everything: bool) -> None:
    """Delete cached results (and with --all, converted and downloaded models too)."""
    from fdec.cache import clear_cache
    from fdec.frontend.source import default_cache_dir

    folder = cache_dir or default_cache_dir()
    try:
        freed = clear_cache(folder, everything=everything)
    except FdecError as err:
        fail(err, False)
    click.echo(f"cleared {folder}: {freed / 1e6:.1f} MB freed")
