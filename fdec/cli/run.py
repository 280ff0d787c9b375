"""The `fdec run` command: generate text with a build, plain or speculative."""

from __future__ import annotations

import json
import pathlib
import sys

import click

from fdec.cli.app import CUDA_GRAPH_HELP, cli, fail, quiet_libraries
from fdec.errors import FdecError, UsageError

__all__ = ["run_command"]


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
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
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
@click.option("--cuda-graph/--no-cuda-graph", default=None, help=CUDA_GRAPH_HELP)
def run_command(build: pathlib.Path, prompt: str, max_new_tokens: int, temperature: float,
                top_k: int, top_p: float, seed: int, no_chat_template: bool, as_json: bool,
                speculative: str | None, spec_k: int, draft_build: pathlib.Path | None,
                draft_min_prob: float, engine: str, cuda_graph: bool | None) -> None:  # fmt: skip
    """Generate text with a build, streaming tokens to the terminal."""
    quiet_libraries()
    from fdec.runner import load_build, run_prompt, run_prompt_genai

    try:
        if engine == "genai":
            if speculative or temperature > 0 or top_k or top_p < 1.0 or draft_build or cuda_graph:
                raise UsageError(
                    "--engine genai runs greedy decoding only",
                    "drop --temperature/--top-k/--top-p/--speculative/--cuda-graph or --engine "
                    "genai",
                )  # fmt: skip
            result = run_prompt_genai(
                build, prompt, max_new_tokens=max_new_tokens, chat_template=not no_chat_template,
                stream=None if as_json else lambda text: click.echo(text, nl=False),
            )  # fmt: skip
            fallback = None
        else:
            loaded = load_build(build, cuda_graph=cuda_graph)
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
        fail(err, as_json)
    result["provider_fallback"] = fallback
    if result.get("max_positions_reached") and not as_json:
        click.echo(
            f"\nnote: stopped at the model's {result['max_positions_reached']} positions "
            f"({result['prompt_tokens']} in the prompt)",
            err=True,
        )
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
    else:
        click.echo("")
        sys.stdout.flush()
        click.echo(
            f"[{result['new_tokens']} tokens, {result['decode_tokens_per_s']:.1f} tok/s decode, "
            f"providers: {', '.join(result['providers'])}"
            + (", CUDA graphs" if result.get("cuda_graph") else "")
            + "]",
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
