"""The `fdec` command group, its entry point `main`, and what every command shares: progress
lines, failures as one line with the exit code, interrupts that leave builds unchanged."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from typing import Any, NoReturn

import click

from fdec.errors import EXIT_FAILURE, EXIT_USAGE, FdecError

__all__ = ["CUDA_GRAPH_HELP", "FRACTION", "Context", "Fraction", "cli", "exit_if_signalled",
           "fail", "main", "quiet_libraries"]  # fmt: skip

logger = logging.getLogger("fdec")

CUDA_GRAPH_HELP = (
    "Capture decode steps as CUDA graphs on the CUDA provider (replayed at fixed shapes and "
    "addresses) [default: the build's session_options.cuda_graph, off]. No effect on the CPU; "
    "the output says whether the session really captured them."
)


class Context:
    """One command's output settings and clock."""

    def __init__(self, quiet: bool, as_json: bool):
        self.quiet = quiet
        self.as_json = as_json
        self.started = time.perf_counter()

    def progress(self, message: str) -> None:
        """One line per step on stderr, with the seconds since the command started."""
        if not self.quiet and not self.as_json:
            elapsed = time.perf_counter() - self.started
            click.echo(f"[fdec {elapsed:6.1f}s] {message}", err=True)


def quiet_libraries() -> None:
    """Silence the libraries' own warnings and progress bars before a command imports them."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Deprecation notices from torch/transformers are for fdec's developers, not its users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        # fdec reports its own progress, one line per step; library bars would interleave.
        transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


class Fraction(click.ParamType):
    """A non-negative fraction written as `3%` or `0.03`."""

    name = "fraction"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        if isinstance(value, float):
            return value
        text = str(value).strip()
        try:
            number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            self.fail(f"{value!r} is not a fraction; write 3% or 0.03", param, ctx)
        if number < 0:
            self.fail(f"{value!r} is negative", param, ctx)
        if not math.isfinite(number):  # nan would make every comparison pass: no gate at all
            self.fail(f"{value!r} is not a finite number; write 3% or 0.03", param, ctx)
        return number


FRACTION = Fraction()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="fdec")
def cli(verbose: int) -> None:
    """fdec: compile Hugging Face models into verified ONNX Runtime / TensorRT builds."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def fail(err: FdecError, as_json: bool) -> NoReturn:
    """Report a command's error in one line (and as JSON with --json) and exit with its code."""
    exit_if_signalled()  # an interrupt that a library turned into an error fdec then reported
    if as_json:
        outcome = {"ok": False, "error": err.one_line(), "exit_code": err.exit_code}
        if getattr(err, "details", None):
            outcome["gate"] = err.details  # a failed quality gate: its figures, for CI
        click.echo(json.dumps(outcome))
    click.echo(f"error: {err.one_line()}", err=True)
    sys.exit(err.exit_code)


# Signals received by `main` ("interrupted" for SIGINT, "terminated" for SIGTERM): a
# KeyboardInterrupt that lands inside a C extension's import can surface as another exception
# (ImportError "initialization failed"); the exit still reports the interruption.
_SIGNALLED: list[str] = []


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the same cleanup runs (the build folder's staging)."""


def _on_signal(signum: int, frame: Any) -> None:
    import signal

    terminated = signum == signal.SIGTERM
    _SIGNALLED.append("terminated" if terminated else "interrupted")
    raise _Terminated if terminated else KeyboardInterrupt


def exit_if_signalled() -> None:
    """Exit 130 (interrupted) or 143 (terminated) when `main` received a signal; else return."""
    if _SIGNALLED:
        _exit_signalled(_SIGNALLED[-1] == "terminated")


def _exit_signalled(terminated: bool) -> NoReturn:
    import signal

    # Once reported, further signals are ignored: a second interrupt arriving while the
    # interpreter shuts down would otherwise end the process by the signal (exit -2), not 130.
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)
    click.echo(
        f"{'terminated' if terminated else 'interrupted'}; any previous build is unchanged",
        err=True,
    )
    # The staging folder and the lock were released while the interrupt unwound. Leave now:
    # CPython remembers a KeyboardInterrupt that ended any code it ran (a flag only the next
    # run resets) and then kills itself with SIGINT at exit (-2), whatever sys.exit said
    # (seen once in ~4 CI runs with Ctrl-C during the export).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(143 if terminated else 130)


def main() -> None:
    """The `fdec` program: run the command line, exit with the outcome's code."""
    import signal

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        cli.main(standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt) as err:
        terminated = isinstance(err, _Terminated) or isinstance(err.__cause__, _Terminated)
        _exit_signalled(terminated)
    except click.ClickException as err:
        err.show()
        sys.exit(EXIT_USAGE if err.exit_code == 2 else err.exit_code)
    except SystemExit:
        raise
    except ModuleNotFoundError as err:
        if err.name != "onnxruntime" and not (err.name or "").startswith("onnxruntime."):
            raise
        # onnxruntime is an extra (cpu or gpu), imported where a command first needs it
        from fdec.runtime.session import INSTALL_LINES

        click.echo(f"error: ONNX Runtime is not installed; install one: {INSTALL_LINES}", err=True)
        sys.exit(EXIT_USAGE)
    except Exception as err:
        exit_if_signalled()  # the interrupt surfaced as another error
        if isinstance(err, FdecError):  # raised outside a command's own handler
            click.echo(f"error: {err.one_line()}", err=True)
            sys.exit(err.exit_code)
        if logger.isEnabledFor(logging.DEBUG):
            raise
        click.echo(f"error: internal error {type(err).__name__}: {err} (rerun with -vv)", err=True)
        sys.exit(EXIT_FAILURE)
