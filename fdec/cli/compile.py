"""The `fdec compile` command: settings from the command line and config file, one build or one per target."""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

import click
from click.core import ParameterSource

from fdec.backends import backend_names
from fdec.cli.app import FRACTION, Context, cli, exit_if_signalled, fail, quiet_libraries
from fdec.errors import FdecError, UsageError

__all__ = ["compile_command", "parse_pass_options"]


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
    help="none (fp32), int4 (weight-only RTN), int4-awq (activation-aware), int8 (weight-only "
    "for cpu decoders and the ONNX Runtime CUDA model, dynamic for cpu encoders, SmoothQuant "
    "for TensorRT), int8-wo (weight-only 8-bit blocks), int8-dynamic, int8-smoothquant, fp8 "
    "(static, GPUs with cc >= 8.9), fp4 (NVFP4 weights and activations for TensorRT, cc >= "
    "10.0: b200, rtx5090), fp4-wo (NVFP4 weights only). Default: the "
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
    type=FRACTION,
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

    A GPTQ, AWQ or compressed-tensors int4 checkpoint builds int4 on its own blocks.
    Settings come from the command line, then the config file, then the defaults shown."""
    ctx = Context(quiet, as_json)
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
        given["pass_options"] = parse_pass_options(pass_option_items)
    except FdecError as err:
        fail(err, as_json)
    typed = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.PROMPT)
    try:
        config = load_config(config_file) if config_file else discover_config()
        settings = resolve_settings(given, lambda name: source(name) in typed, config)
    except FdecError as err:
        fail(err, as_json)
    if config is not None:
        ctx.progress(f"config: {config.describe()}")
    targets, out = settings.pop("targets"), settings["out"]
    quiet_libraries()
    from fdec.compile import CompileOptions, compile_model
    from fdec.report import render_report

    options = CompileOptions(**settings, target=targets[0], dump_dir=dump_dir, cache=not no_cache,
                             force=force, stream=stream)  # fmt: skip
    try:  # every build carries an ONNX Runtime model and is verified in it: fail before work
        from fdec.runtime.session import require_onnxruntime

        require_onnxruntime()
    except FdecError as err:
        fail(err, as_json)
    if len(targets) > 1:
        _compile_targets(options, targets, ctx, wait=not no_wait)
        return
    from fdec.build import build_lock

    try:
        # One compile at a time per -o, held from the start: never two builds mixed (fdec.build).
        with build_lock(out, wait=not no_wait, progress=ctx.progress):
            result = compile_model(options, ctx.progress)
    except FdecError as err:
        fail(err, as_json)
    if as_json:
        click.echo(json.dumps(_summary(result.report, result.out, ok=True), sort_keys=True))
    elif not quiet:
        click.echo(render_report(result.report))
        click.echo(f"build written to {result.out}")


def _compile_targets(options: Any, targets: list[str], ctx: Context, *, wait: bool) -> None:
    """`fdec compile --target a,b`: one build per target under -o; exit code = the worst
    outcome (fdec.api.worst_exit_code); --json prints one object with every target's."""
    from fdec.api import compile_targets, worst_exit_code

    try:
        outcomes = compile_targets(options, targets, progress=ctx.progress, wait=wait)
    except FdecError as err:
        fail(err, ctx.as_json)
    exit_if_signalled()
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


def parse_pass_options(items: tuple[str, ...]) -> dict[str, dict[str, Any]] | None:
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
