"""The `fdec` command line: compile, run, report, passes, targets. Heavy imports happen inside commands."""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import sys
import time
import warnings
from typing import Any

import click
from click.core import ParameterSource

from fdec.backends import backend_names
from fdec.errors import EXIT_FAILURE, EXIT_USAGE, FdecError, InputError, UsageError

__all__ = ["cli", "main"]

logger = logging.getLogger("fdec")


class _Context:
    def __init__(self, quiet: bool, as_json: bool):
        self.quiet = quiet
        self.as_json = as_json
        self.started = time.perf_counter()

    def progress(self, message: str) -> None:
        """One line per step on stderr, with the seconds since the command started."""
        if not self.quiet and not self.as_json:
            elapsed = time.perf_counter() - self.started
            click.echo(f"[fdec {elapsed:6.1f}s] {message}", err=True)


def _quiet_libraries() -> None:
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


class _Fraction(click.ParamType):
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


_FRACTION = _Fraction()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="fdec")
def cli(verbose: int) -> None:
    """fdec: compile Hugging Face models into verified ONNX Runtime / TensorRT builds."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@cli.command("compile")
@click.argument("model", required=False)
@click.option(
    "--target",
    "-t",
    default="cpu",
    show_default=True,
    help="Target name or .toml file; several (h100,a100,l4) build -o/<target> each.",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=pathlib.Path),
    help="Build folder (required here or as `out` in the config file).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=pathlib.Path),
    help="Config file (default: ./fdec.toml, else [tool.fdec] in ./pyproject.toml; "
    "docs/config.md). Options given here override it.",
)
@click.option(
    "--passes", default=None, help="Comma-separated passes ('default' = the default pipeline)."
)
@click.option("--verify-each", is_flag=True, help="Check structure and numerics after every pass.")
@click.option(
    "--dump-dir", type=click.Path(path_type=pathlib.Path), help="Save the IR after each pass."
)
@click.option(
    "--trust-pickle", is_flag=True, help="Allow .bin (pickle) weights, loaded weights-only."
)
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the model folder.")
@click.option(
    "--cache-dir", type=click.Path(path_type=pathlib.Path), help="Cache (default ~/.cache/fdec)."
)
@click.option(
    "--backend",
    type=click.Choice(backend_names()),
    help="Engine backend (default: the target's).",
)
@click.option(
    "--max-batch", default=1, show_default=True, type=int, help="Largest batch engines serve."
)
@click.option(
    "--max-seq-len",
    type=int,
    help="Longest context (prompt + generated) engines serve [default: 2048, or the model's "
    "positions when fewer].",
)
@click.option(
    "--quantize",
    help="none (fp32), int4 (weight-only RTN), int4-awq (activation-aware), int8 (dynamic on cpu, "
    "SmoothQuant on GPUs), int8-smoothquant, fp8 (static, GPUs with cc >= 8.9). Default: the "
    "target's recipe (fdec targets): cpu int4-awq (int8 for encoders), h100/l4/rtx40xx fp8, ...",
)
@click.option(
    "--calibration",
    "--calib",
    type=click.Path(path_type=pathlib.Path),
    help="Calibration text (.txt or .jsonl) for static quantization; default: built-in corpus.",
)
@click.option(
    "--keep-fp",
    type=click.IntRange(min=0),
    help="With --quantize int4/int8-dynamic: keep the N layers most sensitive (measured on "
    "calibration text) in fp32.",
)
@click.option(
    "--max-ppl-increase",
    type=_FRACTION,
    help="Fail when perplexity grows more than this: 3%% or 0.03.",
)
@click.option(
    "--kv-dtype",
    type=click.Choice(["fp32", "fp16", "int8", "fp8"]),
    help="KV-cache storage: int8/fp8 with per-head scales from calibration (fp8 needs a GPU "
    "with fp8, or the cpu target), fp16, or fp32 (the graph's own; default).",
)
@click.option(
    "--kv-window",
    type=click.IntRange(min=1),
    help="Bound the KV cache: keep the last W positions (sliding window) at run time.",
)
@click.option(
    "--kv-sink",
    type=click.IntRange(min=0),
    help="With --kv-window: also keep the first K positions (attention sink).",
)
@click.option(
    "--pass-options",
    "pass_option_items",
    multiple=True,
    metavar="PASS.OPTION=VALUE",
    help="An option of a pass in the pipeline, e.g. quantize-int4-awq.block_size=64 (a TOML "
    "value; repeatable). fdec passes lists the passes.",
)
@click.option(
    "--sparsity",
    type=click.Choice(["none", "2:4"]),
    help="2:4: semi-structured sparsity on the MLP weights (sparsify-2of4: of every 4 weights "
    "along K the 2 with the largest |w| x activation norm on calibration text stay; before "
    "quantization; lossy, the report gives the perplexity change) for targets with sparse "
    "tensor cores (a100, h100, ...); TensorRT engines then build with sparse weights.",
)
@click.option(
    "--prune",
    metavar="heads=F,mlp=F,layers=N",
    help="Structured pruning before the compile: remove that share of query heads (per KV "
    "group) and MLP channels and N layers, chosen by importance on the calibration text. The "
    "build carries the pruned model as a Hugging Face checkpoint in student/ (fdec distill).",
)
@click.option(
    "--draft",
    metavar="layers=1/4",
    help="Also build a draft model (the source keeping that share, or N, of its layers) in "
    "OUT/draft for fdec run --speculative draft.",
)
@click.option(
    "--emit",
    multiple=True,
    type=click.Choice(["hf-checkpoint", "genai"]),
    help="Extra outputs: hf-checkpoint (safetensors + quantization config for vLLM-style "
    "servers); genai (genai_config.json, for fdec run --engine genai / onnxruntime-genai).",
)
@click.option(
    "--no-wait",
    is_flag=True,
    help="Fail at once when another compile is writing the same -o (default: wait for it).",
)
@click.option(
    "--no-cache",
    is_flag=True,
    help="Neither read nor write fdec's cache (export, reference, pass results, calibration).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option(
    "--force",
    is_flag=True,
    help="Let -o replace a folder holding files fdec did not write (they are listed first).",
)
@click.option(
    "--stream/--no-stream",
    default=None,
    help="Export without loading the weights (bound to the checkpoint) and a layer-by-layer "
    "reference; default: on for checkpoints above 2e9 parameters.",
)
def compile_command(model: str, target: str, out: pathlib.Path, passes: str | None, verify_each: bool,
                    dump_dir: pathlib.Path | None, trust_pickle: bool, trust_remote_code: bool,
                    cache_dir: pathlib.Path | None, backend: str | None, max_batch: int,
                    max_seq_len: int | None, quantize: str | None, keep_fp: int | None, max_ppl_increase: float | None,
                    calibration: pathlib.Path | None, emit: tuple[str, ...], as_json: bool,
                    quiet: bool, no_wait: bool = False, no_cache: bool = False,
                    kv_dtype: str | None = None, kv_window: int | None = None,
                    kv_sink: int | None = None, sparsity: str | None = None,
                    prune: str | None = None, draft: str | None = None,
                    config_file: pathlib.Path | None = None,
                    pass_option_items: tuple[str, ...] = (), force: bool = False,
                    stream: bool | None = None) -> None:  # fmt: skip
    """Compile MODEL (folder, .gguf, hub id or bundled name such as smollm2-135m) into --out.

    Settings come from the command line, then the config file, then the defaults shown."""
    ctx = _Context(quiet, as_json)
    from fdec.api import resolve_settings
    from fdec.config import discover_config, load_config

    given = dict(
        model=model, out=out, target=target, passes=passes, verify_each=verify_each,
        trust_pickle=trust_pickle, trust_remote_code=trust_remote_code, cache_dir=cache_dir,
        backend=backend, max_batch=max_batch, max_seq_len=max_seq_len, quantize=quantize,
        max_ppl_increase=max_ppl_increase, emit=tuple(emit), calibration=calibration,
        keep_fp=keep_fp, kv_dtype=kv_dtype, kv_window=kv_window, kv_sink=kv_sink,
        sparsity=sparsity, prune=prune, draft=draft,
    )  # fmt: skip
    source = click.get_current_context().get_parameter_source
    try:
        given["pass_options"] = _parse_pass_options(pass_option_items)
    except FdecError as err:
        _fail(err, as_json)
    typed = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.PROMPT)
    try:
        config = load_config(config_file) if config_file else discover_config()
        settings = resolve_settings(given, lambda name: source(name) in typed, config)
    except FdecError as err:
        _fail(err, as_json)
    if config is not None:
        ctx.progress(f"config: {config.describe()}")
    targets, out = settings.pop("targets"), settings["out"]
    _quiet_libraries()
    from fdec.compile import CompileOptions, compile_model
    from fdec.report import render_report

    options = CompileOptions(**settings, target=targets[0], dump_dir=dump_dir, cache=not no_cache,
                             force=force, stream=stream)  # fmt: skip
    try:  # every build carries an ONNX Runtime model and is verified in it: fail before work
        from fdec.runtime.session import require_onnxruntime

        require_onnxruntime()
    except FdecError as err:
        _fail(err, as_json)
    if len(targets) > 1:
        _compile_targets(options, targets, ctx, wait=not no_wait)
        return
    from fdec.build import build_lock

    try:
        # One compile at a time per -o, held from the start: never two builds mixed (fdec.build).
        with build_lock(out, wait=not no_wait, progress=ctx.progress):
            result = compile_model(options, ctx.progress)
    except FdecError as err:
        _fail(err, as_json)
    if as_json:
        click.echo(json.dumps(_summary(result.report, result.out, ok=True), sort_keys=True))
    elif not quiet:
        click.echo(render_report(result.report))
        click.echo(f"build written to {result.out}")


def _compile_targets(options: Any, targets: list[str], ctx: _Context, *, wait: bool) -> None:
    """`fdec compile --target a,b`: one build per target under -o; exit code = the worst
    outcome (fdec.api.worst_exit_code); --json prints one object with every target's."""
    from fdec.api import compile_targets, worst_exit_code

    try:
        outcomes = compile_targets(options, targets, progress=ctx.progress, wait=wait)
    except FdecError as err:
        _fail(err, ctx.as_json)
    if _SIGNALLED:
        _exit_signalled(_SIGNALLED[-1] == "terminated")
    code = worst_exit_code([o.exit_code for o in outcomes])
    rows = []
    for o in outcomes:
        if o.error is None:
            rows.append({**_summary(o.report or {}, o.out, ok=True), "exit_code": 0})
        else:
            row = {"ok": False, "target": o.target, "out": str(o.out),
                   "error": o.error.one_line(), "exit_code": o.exit_code}  # fmt: skip
            if getattr(o.error, "details", None):
                row["gate"] = o.error.details
            rows.append(row)
    if ctx.as_json:
        outcome = {"ok": code == 0, "exit_code": code, "out": str(options.out), "targets": rows}
        click.echo(json.dumps(outcome, sort_keys=True))
    for row in rows:
        if row["ok"]:
            if not ctx.as_json and not ctx.quiet:
                size = row["bytes"] / 1e6
                click.echo(f"{row['target']}: ok, {size:.1f} MB, --quantize "
                           f"{(row['recipe'] or {}).get('quantize')} -> {row['out']}")  # fmt: skip
        else:
            click.echo(f"error: [{row['target']}] {row['error']} (exit {row['exit_code']})",
                       err=True)  # fmt: skip
    if code:
        sys.exit(code)


def _parse_pass_options(items: tuple[str, ...]) -> dict[str, dict[str, Any]] | None:
    """`--pass-options PASS.OPTION=VALUE` items as {pass: {option: value}}, checked like the
    config file's [pass_options]; VALUE is read as TOML (64, true, "text"), else as text."""
    import tomllib

    from fdec.config import SCHEMA, convert

    if not items:
        return None
    table: dict[str, dict[str, Any]] = {}
    for item in items:
        name_option, equals, text = item.partition("=")
        name, dot, option = name_option.strip().rpartition(".")
        if not equals or not dot or not name or not option:
            raise UsageError(
                f"--pass-options {item!r} is not PASS.OPTION=VALUE",
                "write e.g. --pass-options quantize-int4-awq.block_size=64",
            )
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        table.setdefault(name, {})[option] = value
    key = next(key for key in SCHEMA if key.option == "pass_options")
    return convert(key, table, pathlib.Path.cwd(), "--pass-options")


def _summary(report: dict[str, Any], out: pathlib.Path, *, ok: bool) -> dict[str, Any]:
    verification = report.get("verification", {})
    return {
        "ok": ok,
        "out": str(out),
        "target": report.get("target", {}).get("name"),
        "source": report.get("source", {}).get("given"),
        "recipe": report.get("recipe"),
        "passes": [
            {
                "name": r["name"],
                "modified": r["modified"],
                "cached": r.get("cached", False),
                "stats": r["stats"],
            }
            for r in report.get("passes", [])
        ],
        "verification": {
            "ok": verification.get("ok"),
            **{
                k: verification.get("numeric", {}).get(k)
                for k in (
                    "max_abs_error",
                    "top1_agreement",
                    "perplexity_source",
                    "perplexity_build",
                )
            },
            "greedy_identical": (verification.get("greedy") or {}).get("identical"),
        },
        "bytes": sum(item["bytes"] for item in (report.get("outputs") or {}).values()),
        "backend": report.get("backend"),
        "engines": [
            {k: e.get(k) for k in ("backend", "status", "purpose", "engine", "reason")}
            for e in report.get("engines") or []
        ],
    }


def _fail(err: FdecError, as_json: bool) -> None:
    if _SIGNALLED:  # an interrupt that a library turned into an error fdec then reported
        _exit_signalled(_SIGNALLED[-1] == "terminated")
    if as_json:
        outcome = {"ok": False, "error": err.one_line(), "exit_code": err.exit_code}
        if getattr(err, "details", None):
            outcome["gate"] = err.details  # a failed quality gate: its figures, for CI
        click.echo(json.dumps(outcome))
    click.echo(f"error: {err.one_line()}", err=True)
    sys.exit(err.exit_code)


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
    ctx = _Context(quiet, as_json)
    from fdec.matrix import load_matrix, plan_matrix, require_ray, run_matrix

    try:
        if executor == "ray" and not dry_run:
            require_ray()
        matrix = load_matrix(matrix_file, out=out)
        _quiet_libraries()
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
        _fail(err, as_json)
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


@cli.command("run")
@click.argument("build", type=click.Path(path_type=pathlib.Path))
@click.option("--prompt", "-p", required=True, help="Prompt text.")
@click.option(
    "--max-new-tokens", "-n", default=128, show_default=True, type=click.IntRange(1, 100000)
)
@click.option(
    "--temperature", default=0.0, show_default=True, type=click.FloatRange(0.0), help="0 = greedy."
)
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(0))
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--no-chat-template", is_flag=True, help="Feed the prompt as raw text.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the result as JSON instead of streaming."
)
@click.option(
    "--engine",
    type=click.Choice(["fdec", "genai"]),
    default="fdec",
    show_default=True,
    help="genai: greedy generation with onnxruntime-genai's generator (a build compiled with "
    "--emit genai; pip install onnxruntime-genai).",
)
@click.option(
    "--speculative",
    type=click.Choice(["prompt-lookup", "draft"]),
    help="Speculative decoding (greedy, same tokens): prompt-lookup drafts from n-grams of the "
    "context, draft from a draft build (fdec compile --draft); the target verifies them in one "
    "step.",
)
@click.option(
    "--k",
    "spec_k",
    default=4,
    show_default=True,
    type=click.IntRange(1, 64),
    help="With --speculative: tokens drafted per target step.",
)
@click.option(
    "--draft-build",
    type=click.Path(path_type=pathlib.Path),
    help="With --speculative draft: the draft build [default: BUILD/draft].",
)
@click.option(
    "--draft-min-prob", default=0.0, show_default=True, type=click.FloatRange(0.0, 1.0),
    help="With --speculative draft: stop drafting at a token the draft gives less than this "
    "probability (0.5 helped on SmolLM2; 0 always drafts --k).",
)  # fmt: skip
def run_command(build: pathlib.Path, prompt: str, max_new_tokens: int, temperature: float,
                top_k: int, top_p: float, seed: int, no_chat_template: bool, as_json: bool,
                speculative: str | None, spec_k: int, draft_build: pathlib.Path | None,
                draft_min_prob: float, engine: str) -> None:  # fmt: skip
    """Generate text with a build, streaming tokens to the terminal."""
    _quiet_libraries()
    from fdec.runner import load_build, run_prompt, run_prompt_genai

    try:
        if engine == "genai":
            if speculative or temperature > 0 or top_k or top_p < 1.0 or draft_build:
                raise UsageError(
                    "--engine genai runs greedy decoding only",
                    "drop --temperature/--top-k/--top-p/--speculative or --engine genai",
                )  # fmt: skip
            result = run_prompt_genai(
                build, prompt, max_new_tokens=max_new_tokens, chat_template=not no_chat_template,
                stream=None if as_json else lambda text: click.echo(text, nl=False),
            )  # fmt: skip
            fallback = None
        else:
            loaded = load_build(build)
            fallback = loaded.provider_fallback()
            if fallback and not loaded.model.provider_fallback:  # else open_session warned
                click.echo(f"warning: {fallback}", err=True)
            result = run_prompt(
                loaded, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                top_k=top_k, top_p=top_p, seed=seed, chat_template=not no_chat_template,
                stream=None if as_json else lambda text: click.echo(text, nl=False),
                speculative=speculative, k=spec_k, draft_build=draft_build,
                draft_min_probability=draft_min_prob,
            )  # fmt: skip
    except FdecError as err:
        _fail(err, as_json)
    result["provider_fallback"] = fallback
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
    else:
        click.echo("")
        sys.stdout.flush()
        click.echo(
            f"[{result['new_tokens']} tokens, {result['decode_tokens_per_s']:.1f} tok/s decode, "
            f"providers: {', '.join(result['providers'])}]",
            err=True,
        )
        spec = result.get("speculative")
        if spec:
            click.echo(
                f"[speculative {spec['method']}, k={spec['k']}: acceptance "
                f"{spec['acceptance_rate']:.0%} ({spec['accepted']}/{spec['drafted']} drafted), "
                f"{spec['tokens_per_step']:.2f} tokens per target step"
                + (
                    f"; draft {spec['draft_s']:.2f} s, target {spec['target_s']:.2f} s]"
                    if spec.get("draft_build")
                    else "]"
                ),
                err=True,
            )


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
        _fail(err, as_json)
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
        _fail(err, as_json)
    if as_json:
        click.echo(json.dumps(diff, indent=2, sort_keys=True))
    else:
        click.echo(render_diff(diff, style=colored if sys.stdout.isatty() else None))


@cli.command("verify")
@click.argument("build", type=click.Path(path_type=pathlib.Path))
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as one JSON object.")
def verify_command(build: pathlib.Path, as_json: bool) -> None:
    """Re-hash BUILD's files against its fdec-build.json: exit 0 when all match, 1 naming the
    first file that is missing, changed or extra."""
    from fdec.build import verify_build

    try:
        outcome = verify_build(build)
    except FdecError as err:
        _fail(err, as_json)
    first = outcome["problems"][0] if outcome["problems"] else None
    if as_json:
        click.echo(json.dumps({"build": str(build), **outcome}, sort_keys=True))
    elif first is None:
        click.echo(f"OK {build}: {outcome['checked']} files match fdec-build.json")
    if first is not None:
        more = len(outcome["problems"]) - 1
        click.echo(
            f"error: {build}: {first['file']} {first['problem']} ({first['detail']})"
            + (f"; {more} more" if more else ""),
            err=True,
        )
        sys.exit(EXIT_FAILURE)


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
        _fail(err, as_json)
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
    "--all", "everything", is_flag=True, help="Also converted GGUF models and hub downloads."
)
def cache_clear_command(cache_dir: pathlib.Path | None, everything: bool) -> None:
    """Delete cached results (and with --all, converted and downloaded models too)."""
    from fdec.cache import clear_cache
    from fdec.frontend.source import default_cache_dir

    folder = cache_dir or default_cache_dir()
    try:
        freed = clear_cache(folder, everything=everything)
    except FdecError as err:
        _fail(err, False)
    click.echo(f"cleared {folder}: {freed / 1e6:.1f} MB freed")


@cli.command("build-engine")
@click.argument("build", type=click.Path(path_type=pathlib.Path))
@click.option("--json", "as_json", is_flag=True)
def build_engine_command(build: pathlib.Path, as_json: bool) -> None:
    """Build a build's deferred TensorRT / TensorRT-RTX engines (TensorRT needs its GPU)."""
    from fdec.build import MANIFEST, refresh_manifest
    from fdec.lower.engines import finish_deferred_engines

    ctx = _Context(False, as_json)
    try:
        if not (build / MANIFEST).is_file():  # it rewrites the manifest: fdec builds only
            raise InputError(f"{build} is not an fdec build (no {MANIFEST})",
                             "give the folder fdec compile wrote")  # fmt: skip
        built = finish_deferred_engines(build, progress=ctx.progress)
    except FdecError as err:
        _fail(err, as_json)
    refresh_manifest(build)
    lines = [f"{r['backend']} engine {r['status']}: {build}" for r in built]
    click.echo(json.dumps(built, indent=2) if as_json else "\n".join(lines))


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
        _fail(err, as_json)
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


@cli.command("bench")
@click.argument("build", type=click.Path(path_type=pathlib.Path))
@click.option("--batch", "batch_text", default="1,4,16", show_default=True,
              help="Batch sizes, comma-separated.")  # fmt: skip
@click.option("--prompt-len", default=40, show_default=True, type=int, help="Prompt tokens.")
@click.option("--gen-len", default=64, show_default=True, type=int, help="Generated tokens.")
@click.option("--rounds", default=3, show_default=True, type=int, help="Rounds (medians).")
@click.option("--threads", default=0, show_default=True, type=int, help="0: ONNX Runtime's choice.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench_command(build: pathlib.Path, batch_text: str, prompt_len: int, gen_len: int,
                  rounds: int, threads: int, as_json: bool) -> None:  # fmt: skip
    """Measure BUILD: prefill ms and decode tok/s per batch size, peak RSS, and the fraction
    of this machine's memory-bandwidth bound. The results are written to BUILD/bench.json (and
    BUILD/bench.html), which `fdec report` shows; they are not build outputs, so `fdec verify`
    still passes."""
    _quiet_libraries()
    from fdec.bench import parse_batches, render_bench, run_bench, write_bench

    try:
        batches = parse_batches(batch_text)
        result = run_bench(build, batches=batches, prompt_len=prompt_len, gen_len=gen_len,
                           rounds=rounds, threads=threads)  # fmt: skip
        write_bench(build, result)
    except FdecError as err:
        _fail(err, as_json)
    click.echo(json.dumps(result, indent=2) if as_json else render_bench(result))


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
    ctx = _Context(quiet, as_json)
    _quiet_libraries()
    from fdec.distill import distill

    try:
        result = distill(student, teacher, data, steps=steps, out=out, lr=lr,
                         cache_dir=cache_dir, progress=ctx.progress, force=force)  # fmt: skip
    except FdecError as err:
        _fail(err, as_json)
    if as_json:
        click.echo(json.dumps({"ok": True, **result.to_dict()}, sort_keys=True))
    elif not quiet:
        b, a = result.before, result.after
        click.echo(f"loss {result.first_loss:.4f} -> {result.last_loss:.4f} over {result.steps} "
                   f"steps; held perplexity {b['perplexity']:.2f} -> {a['perplexity']:.2f} "
                   f"(teacher {result.teacher_perplexity:.2f}); KL to teacher "
                   f"{b['kl_to_teacher']:.4f} -> {a['kl_to_teacher']:.4f}")  # fmt: skip
        click.echo(f"checkpoint written to {result.out}")


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
    "--headroom", default="10%", show_default=True, type=_FRACTION, help="Memory kept back."
)
@click.option("--cache-dir", type=click.Path(path_type=pathlib.Path), help="fdec's cache.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def plan_command(model: str, target: str, quantize: str | None, kv_dtype: str | None,
                 context: int | None, batch: int, headroom: float, cache_dir: pathlib.Path | None,
                 as_json: bool) -> None:  # fmt: skip
    """Plan MODEL's memory on targets: weights, KV cache per token, workspace, what fits.

    MODEL is a folder with config.json (no weights needed), a config.json path, or a bundled
    name such as smollm2-135m. Nothing is loaded but the config.
    """
    from fdec.plan import load_shape, plan_capacity, plan_targets, render_table
    from fdec.targets import list_targets, load_target

    ctx = _Context(False, as_json)
    options = dict(weights=quantize, kv_dtype=kv_dtype, context=context, batch=batch,
                   headroom=headroom)  # fmt: skip
    try:
        shape = load_shape(model, cache_dir=cache_dir, progress=ctx.progress)
        if target.strip().lower() == "all":
            rows = plan_targets(shape, list_targets(), **options)
        else:
            rows = [plan_capacity(shape, load_target(target), **options).to_dict()]
    except FdecError as err:
        _fail(err, as_json)
    if as_json:
        click.echo(json.dumps({"model": shape.to_dict(), "plans": rows}, indent=2))
    else:
        click.echo(render_table(shape, rows))


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


def _exit_signalled(terminated: bool) -> None:
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
        if _SIGNALLED:  # the interrupt surfaced as another error
            _exit_signalled(_SIGNALLED[-1] == "terminated")
        if isinstance(err, FdecError):  # raised outside a command's own handler
            click.echo(f"error: {err.one_line()}", err=True)
            sys.exit(err.exit_code)
        if logger.isEnabledFor(logging.DEBUG):
            raise
        click.echo(f"error: internal error {type(err).__name__}: {err} (rerun with -vv)", err=True)
        sys.exit(EXIT_FAILURE)


if __name__ == "__main__":
    main()
