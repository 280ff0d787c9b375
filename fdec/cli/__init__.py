"""The `fdec` command line: one module per command group; heavy imports happen inside commands.

Where each command lives: compile (fdec.cli.compile), matrix (fdec.cli.matrix), run
(fdec.cli.run), report, diff, verify, build-engine and bench (fdec.cli.builds), cache
(fdec.cli.cache), passes and targets (fdec.cli.catalog), plan (fdec.cli.plan), distill
(fdec.cli.distill); the group, `main` and the shared helpers are in fdec.cli.app.
"""

from __future__ import annotations

# Importing the command modules registers their commands on the group.
from fdec.cli import builds, cache, catalog, compile, distill, matrix, plan, run  # noqa: F401
from fdec.cli.app import FRACTION, cli, main
from fdec.cli.compile import parse_pass_options

__all__ = ["FRACTION", "cli", "main", "parse_pass_options"]
