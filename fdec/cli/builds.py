"""Commands on a finished build: report, diff, verify, build-engine, bench."""

from __future__ import annotations

import json
import pathlib
import sys

import click

from fdec.cli.app import CUDA_GRAPH_HELP, Context, cli, fail, quiet_libraries
from fdec.errors import EXIT_FAILURE, EXIT_QUALITY_GATE, EXIT_USAGE, FdecError, InputError

__all__ = [
    "bench_command",
    "build_engine_command",
    "diff_command",
    "report_command",
    "verify_command",
]


@cli.command("report")
@click.argument("build", type=click.Path(path_type=pathlib.Path))
@click.option(
    "--json", "as_json", is_flag=True, help="Print report.json with the files of fdec-build.json."
)
@click.option("--html", "html", is_flag=True, help="Print the path of the build's report.html.")
@click.option(
    "--html-out",
    type=click.Path(dir_okay=False, path_type=pathlib.Path),
    help="Write report.html, rendered again from report.json, to this file.",
)
def report_command(build: pathlib.Path, as_json: bool, html: bool,
                   html_out: pathlib.Path | None) -> None:  # fmt: skip
    """Print a build's pass table and verification results (colored on a terminal)."""
    from fdec.report import render_report
    from fdec.report.diff import load_build
    from fdec.report.html import HTML_FILE, render_html

    try:
        report = load_build(build)
        if html_out:
            try:
                html_out.write_text(render_html(report))
            except OSError as err:
                raise InputError(f"cannot write {html_out}: {err.strerror or err}",
                                 "give --html-out a file you can write") from None  # fmt: skip
            click.echo(str(html_out))
            return
        if html:
            from fdec.bench import BENCH_HTML

            page = build / HTML_FILE
            if "bench" in report and (build / BENCH_HTML).is_file():
                page = build / BENCH_HTML  # report.html with fdec bench's "Measured speed"
            if not page.is_file():
                raise InputError(f"{build} has no {HTML_FILE} (built by an older fdec)",
                                 f"render one: fdec report {build} --html-out report.html")  # fmt: skip
            click.echo(str(page))
            return
    except FdecError as err:
        fail(err, as_json)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(render_report(report, style=sys.stdout.isatty()))


@cli.command("diff")
@click.argument("build_a", type=click.Path(path_type=pathlib.Path))
@click.argument("build_b", type=click.Path(path_type=pathlib.Path))
@click.option("--json", "as_json", is_flag=True, help="Print the differences as one JSON object.")
def diff_command(build_a: pathlib.Path, build_b: pathlib.Path, as_json: bool) -> None:
    """What changed from BUILD_A to BUILD_B: pipeline, options, versions, per-pass figures,
    size and accuracy deltas. Exits 0 whenever both are builds (a diff is information)."""
    from fdec.report import colored
    from fdec.report.diff import diff_builds, render_diff

    try:
        diff = diff_builds(build_a, build_b)
    except FdecError as err:
        fail(err, as_json)
    if as_json:
        click.echo(json.dumps(diff, indent=2, sort_keys=True))
    else:
        click.echo(render_diff(diff, style=colored if sys.stdout.isatty() else None))


@cli.command("verify")
@click.argument("build", type=click.Path(path_type=pathlib.Path))
@click.option(
    "--numerics", is_flag=True,
    help="Also run the build against its source model again (PyTorch reference, the tolerance "
    "its report recorded) on the build's providers where this machine has them: a GPU build "
    "copied to a GPU machine is checked on the GPU.",
)  # fmt: skip
@click.option(
    "--source", default=None, help="The source model, where the report's path is not here."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as one JSON object.")
def verify_command(
    build: pathlib.Path, numerics: bool, source: str | None, quiet: bool, as_json: bool
) -> None:
    """Re-hash BUILD's files against its fdec-build.json: exit 0 when all match, 1 naming the
    first file that is missing, changed or extra. With --numerics, then compare its outputs
    with the source model's where it runs here: exit 1 when they differ, 3 when a lossy build
    misses its perplexity gate, 2 when this machine cannot run the build's graph."""
    from fdec.build import verify_build

    try:
        outcome = verify_build(build)
    except FdecError as err:
        fail(err, as_json)
    first = outcome["problems"][0] if outcome["problems"] else None
    if first is None and numerics:
        quiet_libraries()
        from fdec.compile.gate import verify_build_numerics

        try:
            outcome["numerics"] = verify_build_numerics(
                build, source=source, progress=Context(quiet, as_json).progress
            )
        except FdecError as err:
            fail(err, as_json)
    if as_json:
        click.echo(json.dumps({"build": str(build), **outcome}, sort_keys=True))
    elif first is None:
        click.echo(f"OK {build}: {outcome['checked']} files match fdec-build.json")
        if numerics:
            click.echo(_numerics_line(outcome["numerics"]))
    if first is not None:
        more = len(outcome["problems"]) - 1
        click.echo(
            f"error: {build}: {first['file']} {first['problem']} ({first['detail']})"
            + (f"; {more} more" if more else ""),
            err=True,
        )
        sys.exit(EXIT_FAILURE)
    if numerics:
        checked = outcome["numerics"]
        if checked["ok"] is None:
            sys.exit(EXIT_USAGE)
        if not checked["ok"]:
            sys.exit(EXIT_QUALITY_GATE if checked.get("gate") else EXIT_FAILURE)


def _numerics_line(checked: dict) -> str:
    """One line: where the check ran and what it found (or why it could not run here)."""
    if checked["ok"] is None:
        return (
            f"numerics NOT RUN: {checked['not_run']}; run `fdec verify --numerics` where "
            f"{checked['made_for']} is available"
        )
    figures = checked["numeric"]
    where = f"{', '.join(checked['providers'][:1])} ({checked.get('device')})"
    parts = [f"max abs error {figures['max_abs_error']:.3g}",
             f"top-1 {figures['top1_agreement']:.3f}"]  # fmt: skip
    if "perplexity_build" in figures:
        parts.append(
            f"perplexity {figures['perplexity_source']:.2f} → {figures['perplexity_build']:.2f}"
        )
    greedy = checked.get("greedy")
    if greedy:
        same = "identical" if greedy["identical"] else f"differ at {greedy['first_divergence']}"
        parts.append(f"{greedy['steps']} greedy tokens {same}")
    verdict = "PASS" if checked["ok"] else f"FAIL ({checked.get('failure')})"
    line = f"numerics {verdict} on {where} against {checked['source']}: {', '.join(parts)}"
    made_for = checked.get("made_for")
    if made_for and made_for not in checked["providers"][:1]:
        emulated = (checked.get("emulated") or {}).get("dtype")
        line += f"; made for {made_for}, not available here" + (
            f": checked with its {emulated} rounding emulated" if emulated else ""
        )
    return line


@cli.command("build-engine")
@click.argument("build", type=click.Path(path_type=pathlib.Path))
@click.option("--json", "as_json", is_flag=True)
def build_engine_command(build: pathlib.Path, as_json: bool) -> None:
    """Build a build's deferred TensorRT / TensorRT-RTX engines (TensorRT needs its GPU)."""
    from fdec.build import MANIFEST, read_build_json, refresh_manifest
    from fdec.lower.engines import finish_deferred_engines

    ctx = Context(False, as_json)
    try:
        read_build_json(build / MANIFEST)  # it rewrites the manifest: whole fdec builds only
        built = finish_deferred_engines(build, progress=ctx.progress)
    except FdecError as err:
        fail(err, as_json)
    refresh_manifest(build)
    lines = [f"{r['backend']} engine {r['status']}: {build}" for r in built]
    click.echo(json.dumps(built, indent=2) if as_json else "\n".join(lines))


@cli.command("bench")
@click.argument("build", type=click.Path(path_type=pathlib.Path))
@click.option("--batch", "batch_text", default="1,4,16", show_default=True,
              help="Batch sizes, comma-separated.")  # fmt: skip
@click.option("--prompt-len", type=int,
              help="Prompt tokens [default: 40; with --gen-len's 64, shrunk to fit a model "
                   "with fewer positions].")  # fmt: skip
@click.option("--gen-len", type=int, help="Generated tokens [default: 64].")
@click.option("--rounds", default=3, show_default=True, type=int, help="Rounds (medians).")
@click.option("--threads", default=0, show_default=True, type=int, help="0: ONNX Runtime's choice.")
@click.option("--cuda-graph/--no-cuda-graph", default=None, help=CUDA_GRAPH_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench_command(build: pathlib.Path, batch_text: str, prompt_len: int | None,
                  gen_len: int | None, rounds: int, threads: int, cuda_graph: bool | None,
                  as_json: bool) -> None:  # fmt: skip
    """Measure BUILD: prefill ms and decode tok/s per batch size, peak RSS, and the fraction
    of this machine's memory-bandwidth bound. The results are written to BUILD/bench.json (and
    BUILD/bench.html), which `fdec report` shows; they are not build outputs, so `fdec verify`
    still passes."""
    quiet_libraries()
    from fdec.bench import parse_batches, render_bench, run_bench, write_bench

    try:
        batches = parse_batches(batch_text)
        result = run_bench(build, batches=batches, prompt_len=prompt_len, gen_len=gen_len,
                           rounds=rounds, threads=threads, cuda_graph=cuda_graph)  # fmt: skip
        write_bench(build, result)
    except FdecError as err:
        fail(err, as_json)
    click.echo(json.dumps(result, indent=2) if as_json else render_bench(result))
