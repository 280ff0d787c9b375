"""Speculative decoding with prompt-lookup drafts: exactly the plain greedy tokens, in fewer steps."""

from __future__ import annotations

import json

import pytest

from fdec.cli import cli
from fdec.runner import load_build
from fdec.runtime import generate
from fdec.runtime.speculative import generate_speculative, prompt_lookup_draft

_PROMPTS = {
    "mixed": [5, 17, 99, 3, 250, 7, 8, 41, 120, 64, 2, 300],
    "short": [11, 12],
    # A phrase said three times: drafts copy its continuation.
    "repetitive": [40, 41, 42, 43, 44, 45, 46, 47] * 3 + [40, 41],
}


@pytest.fixture(scope="module")
def builds(tiny_models, tmp_path_factory):
    """A default-pipeline (fused attention, shared KV buffer) and a plain tiny llama build."""
    from click.testing import CliRunner

    out = {}
    for name, extra in (("fused", []), ("plain", ["--passes", "default"])):
        folder = tmp_path_factory.mktemp("spec") / name
        args = ["compile", str(tiny_models("llama")), "-o", str(folder), "-q", "--quantize", "none"]
        ran = CliRunner().invoke(cli, [*args, *extra])
        assert ran.exit_code == 0, ran.output
        out[name] = folder
    return out


def test_prompt_lookup_draft_copies_what_followed_the_last_ngram():
    assert prompt_lookup_draft([1, 2, 3, 9, 8, 1, 2, 3], k=4, ngram=3) == [9, 8, 1, 2]
    # The most recent occurrence wins; shorter n-grams are the fallback.
    assert prompt_lookup_draft([7, 1, 5, 7, 1, 6, 0, 1], k=2, ngram=3) == [6, 0]
    assert prompt_lookup_draft([1, 2, 3, 4], k=4, ngram=3) == []
    assert prompt_lookup_draft([4, 5, 4], k=1, ngram=2) == [5]


@pytest.mark.parametrize("build", ["fused", "plain"])
@pytest.mark.parametrize("k", [1, 4])
def test_speculative_gives_the_plain_greedy_tokens(builds, build, k):
    model = load_build(builds[build]).model
    if build == "fused":
        assert model.shares_kv_buffer  # the default pipeline's fused GQA build
    for name, prompt in _PROMPTS.items():
        want = generate(model, prompt, max_new_tokens=40).tokens
        assert want == generate(model, prompt, max_new_tokens=40, bound=False).tokens
        got = generate_speculative(model, prompt, max_new_tokens=40, k=k)
        assert got.tokens == want, name
        assert got.steps + 1 <= len(got.tokens)
        assert 0 <= got.accepted <= got.drafted
        if name == "repetitive":
            # Accepted drafts: fewer target calls than tokens.
            assert got.accepted > 0
            assert got.steps < len(got.tokens) - 1


def test_speculative_stops_at_stop_tokens_like_generate(builds):
    model = load_build(builds["plain"]).model
    prompt = _PROMPTS["repetitive"]
    plain = generate(model, prompt, max_new_tokens=30).tokens
    stop = plain[7]
    want = generate(model, prompt, max_new_tokens=30, stop_tokens=[stop]).tokens
    seen: list[int] = []
    got = generate_speculative(
        model, prompt, max_new_tokens=30, k=4, stop_tokens=[stop], on_token=seen.append
    )
    assert got.tokens == want == seen and want[-1] == stop


def test_run_speculative_prompt_lookup_gives_the_same_text(builds, cli_runner):
    prompt = "the cat sat on the mat. the cat sat on the mat. the cat sat on the mat. the cat"
    base = ["run", str(builds["fused"]), "-p", prompt, "-n", "30", "--json"]
    plain = json.loads(cli_runner.invoke(cli, base).stdout)
    ran = cli_runner.invoke(cli, [*base, "--speculative", "prompt-lookup", "--k", "3"])
    assert ran.exit_code == 0, ran.output
    spec = json.loads(ran.stdout)
    assert spec["text"] == plain["text"] and spec["tokens"] == plain["tokens"]
    assert spec["speculative"]["method"] == "prompt-lookup" and spec["speculative"]["k"] == 3
    assert 0.0 <= spec["speculative"]["acceptance_rate"] <= 1.0
    assert spec["speculative"]["steps"] >= 1 and spec["decode_tokens_per_s"] > 0
    # Streaming prints the text and, on stderr, the acceptance rate.
    streamed = cli_runner.invoke(cli, [*base[:-1], "--speculative", "prompt-lookup"])
    assert streamed.exit_code == 0 and plain["text"] in streamed.stdout
    assert "acceptance" in streamed.stderr


def test_run_speculative_draft_is_refused(builds, cli_runner):
    ran = cli_runner.invoke(
        cli, ["run", str(builds["plain"]), "-p", "hi", "--speculative", "draft"]
    )
    assert ran.exit_code == 2
    assert "draft models are not built yet" in ran.stderr and "prompt-lookup" in ran.stderr
