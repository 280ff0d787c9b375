"""Speculative decoding with prompt-lookup and draft-model drafts: exactly the plain greedy tokens."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fdec.cli import cli
from fdec.runner import load_build
from fdec.runtime import generate
from fdec.runtime.speculative import (
    DraftModelDrafter,
    FirstDrafter,
    PromptLookupDrafter,
    generate_speculative,
    prompt_lookup_draft,
)

_PROMPTS = {
    "mixed": [5, 17, 99, 3, 250, 7, 8, 41, 120, 64, 2, 300],
    "short": [11, 12],
    # A phrase said three times: drafts copy its continuation.
    "repetitive": [40, 41, 42, 43, 44, 45, 46, 47] * 3 + [40, 41],
}


def _compile(source, folder, cache, *extra) -> None:
    """Compile with fdec's and ORT's caches in `cache` (module fixtures run before the autouse
    fixture that keeps them out of the home folder)."""
    from click.testing import CliRunner

    args = ["compile", str(source), "-o", str(folder), "-q", "--quantize", "none", *extra]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FDEC_CACHE_DIR", str(cache / "fdec"))
        patch.setenv("XDG_CACHE_HOME", str(cache))
        patch.setenv("HF_HUB_OFFLINE", "1")
        ran = CliRunner().invoke(cli, args)
    assert ran.exit_code == 0, ran.output


@pytest.fixture(scope="module")
def builds(tiny_models, tmp_path_factory):
    """Tiny llama builds: default pipeline (fused attention, shared KV buffer) and plain; and
    drafts of the same vocabulary: another random llama with one layer (another seed), fused
    and plain."""
    from models import make_tiny_model

    other = make_tiny_model(tmp_path_factory.mktemp("tiny-draft"), "llama", seed=1,
                            num_hidden_layers=1)  # fmt: skip
    out = {}
    for name, source, extra in (
        ("fused", tiny_models("llama"), []),
        ("plain", tiny_models("llama"), ["--passes", "default"]),
        ("draft_fused", other, []),
        ("draft_plain", other, ["--passes", "default"]),
    ):
        folder = tmp_path_factory.mktemp("spec") / name
        _compile(source, folder, tmp_path_factory.getbasetemp() / "cache", *extra)
        out[name] = folder
    return out


def test_prompt_lookup_draft_copies_what_followed_the_last_ngram():
    assert prompt_lookup_draft([1, 2, 3, 9, 8, 1, 2, 3], k=4, ngram=3) == [9, 8, 1, 2]
    # The most recent occurrence wins; shorter n-grams are the fallback.
    assert prompt_lookup_draft([7, 1, 5, 7, 1, 6, 0, 1], k=2, ngram=3) == [6, 0]
    assert prompt_lookup_draft([1, 2, 3, 4], k=4, ngram=3) == []
    assert prompt_lookup_draft([4, 5, 4], k=1, ngram=2) == [5]


@pytest.mark.parametrize(("build", "bound"), [("fused", True), ("fused", False), ("plain", True)])
@pytest.mark.parametrize("k", [1, 4])
def test_speculative_gives_the_plain_greedy_tokens(builds, build, bound, k):
    """Fused + bound: the shared buffer's length is rewound; otherwise numpy slices."""
    model = load_build(builds[build]).model
    if build == "fused":
        assert model.shares_kv_buffer  # the default pipeline's fused GQA build
    for name, prompt in _PROMPTS.items():
        want = generate(model, prompt, max_new_tokens=40).tokens
        assert want == generate(model, prompt, max_new_tokens=40, bound=False).tokens
        got = generate_speculative(model, prompt, max_new_tokens=40, k=k, bound=bound)
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


@pytest.mark.parametrize(("build", "draft"), [("fused", "draft_plain"), ("plain", "draft_fused")])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_draft_model_gives_the_plain_greedy_tokens(builds, build, draft, k):
    """Another random model drafts (most drafts rejected): its cache is trimmed every step,
    and the tokens are still the target's greedy ones."""
    model = load_build(builds[build]).model
    drafter_model = load_build(builds[draft]).model
    assert drafter_model.num_layers == 1 and model.num_layers == 2
    for name, prompt in _PROMPTS.items():
        want = generate(model, prompt, max_new_tokens=40).tokens
        got = generate_speculative(model, prompt, max_new_tokens=40, k=k, draft=drafter_model)
        assert got.tokens == want, name
        assert got.drafted > 0 and 0 <= got.accepted <= got.drafted
        assert got.steps <= len(want) - 1 and got.draft_s > 0 and got.target_s > 0
        # The draft's own greedy continuation is not the target's: some drafts are rejected.
        if k > 1:
            assert got.accepted < got.drafted


class _Recording(DraftModelDrafter):
    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.proposals: list[tuple[list[int], list[int]]] = []

    def propose(self, context, k):
        proposal = super().propose(context, k)
        self.proposals.append((list(context), proposal))
        return proposal


@pytest.mark.parametrize("draft", ["draft_fused", "draft_plain"])
def test_draft_proposals_are_the_drafts_own_greedy_continuation(builds, draft):
    """After rejections (its cache rewound, the target's correction fed), every proposal is
    what the draft model alone generates greedily from the context."""
    model = load_build(builds["fused"]).model
    drafter_model = load_build(builds[draft]).model
    drafter = _Recording(drafter_model)
    assert drafter.bound == (draft == "draft_fused")
    got = generate_speculative(model, _PROMPTS["mixed"], max_new_tokens=30, k=3, draft=drafter)
    assert got.accepted < got.drafted and len(drafter.proposals) == got.steps
    for context, proposal in drafter.proposals:
        if not proposal:  # the last step: no room left to draft
            continue
        alone = generate(drafter_model, context, max_new_tokens=len(proposal), bound=False)
        assert proposal == alone.tokens


@pytest.mark.parametrize("build", ["fused", "plain"])
@pytest.mark.parametrize("bound", [True, False])
def test_target_as_its_own_draft_accepts_every_draft(builds, build, bound):
    """A draft equal to the target proposes the target's tokens: 100 % acceptance, k + 1
    tokens per target step. Fails if the draft's cache falls out of step with the context
    (rewound too little or too much after the target's correction)."""
    model = load_build(builds[build]).model
    draft = load_build(builds[build]).model  # its own session and cache
    k, n = 4, 41
    for name, prompt in _PROMPTS.items():
        want = generate(model, prompt, max_new_tokens=n).tokens
        drafter = DraftModelDrafter(draft, bound=bound)
        assert drafter.bound == (bound and build == "fused")
        got = generate_speculative(model, prompt, max_new_tokens=n, k=k, draft=drafter)
        assert got.tokens == want, name
        assert got.steps == (n - 1) // (k + 1) and got.tokens_per_step == k + 1
        assert got.accepted == got.drafted == got.steps * k and got.acceptance_rate == 1.0
        # Prefill, then per step: the unseen tokens (the last draft + the target's token) and
        # k - 1 single-token calls.
        assert drafter.calls == 1 + got.steps * k


@pytest.mark.parametrize("drafter", ["prompt-lookup", "draft"])
def test_speculative_respects_stops_and_max_new_tokens(builds, drafter):
    model = load_build(builds["fused"]).model
    draft = load_build(builds["fused"]).model if drafter == "draft" else None
    prompt = _PROMPTS["repetitive"]
    plain = generate(model, prompt, max_new_tokens=30).tokens
    stop = plain[9]
    want = generate(model, prompt, max_new_tokens=30, stop_tokens=[stop]).tokens
    assert want[-1] == stop and len(want) <= 10
    got = generate_speculative(model, prompt, max_new_tokens=30, k=4, stop_tokens=[stop],
                               draft=draft)  # fmt: skip
    assert got.tokens == want
    for n in (1, 2, 7):
        got = generate_speculative(model, prompt, max_new_tokens=n, k=4, draft=draft)
        assert got.tokens == plain[:n]


def test_draft_min_probability_stops_at_unsure_tokens(builds):
    """The draft proposes only while its own softmax is sure enough: never above 1, always at
    0; in between, its greedy continuation cut at the first unsure token."""
    model = load_build(builds["fused"]).model
    drafter_model = load_build(builds["draft_fused"]).model
    prompt = _PROMPTS["mixed"]
    want = generate(model, prompt, max_new_tokens=30).tokens
    never = DraftModelDrafter(drafter_model, min_probability=1.01)
    got = generate_speculative(model, prompt, max_new_tokens=30, k=4, draft=never)
    assert got.tokens == want and got.drafted == 0 and got.steps == len(want) - 1
    # A threshold in the middle of the draft's own top probabilities on this context.
    logits = drafter_model.decode(np.asarray([prompt]), drafter_model.empty_past(1), 0)[0][0]
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    threshold = float(np.median(1.0 / shifted.sum(axis=-1)))
    gated = _Recording(drafter_model, min_probability=threshold)
    got = generate_speculative(model, prompt, max_new_tokens=30, k=4, draft=gated)
    assert got.tokens == want and 0 < got.drafted < 4 * got.steps
    for context, proposal in gated.proposals[:-1]:
        alone = generate(drafter_model, context, max_new_tokens=4, bound=False).tokens
        assert proposal == alone[: len(proposal)]


def test_prompt_lookup_then_draft_model(builds):
    """FirstDrafter: the draft model is asked only where prompt lookup finds nothing, and its
    cache catches up on the tokens it skipped."""
    model = load_build(builds["fused"]).model
    drafter_model = load_build(builds["draft_fused"]).model
    for name, prompt in _PROMPTS.items():
        want = generate(model, prompt, max_new_tokens=40).tokens
        second = _Recording(drafter_model)
        both = FirstDrafter(PromptLookupDrafter(3), second)
        got = generate_speculative(model, prompt, max_new_tokens=40, k=3, draft=both)
        assert got.tokens == want, name
        assert len(second.proposals) < got.steps  # prompt lookup answered some steps
        for context, proposal in second.proposals:
            if proposal:  # (not the last step, which has no room to draft)
                assert prompt_lookup_draft(context, 3, 3) == []
                alone = generate(drafter_model, context, max_new_tokens=len(proposal), bound=False)
                assert proposal == alone.tokens


@pytest.fixture(scope="module")
def with_draft(builds, tmp_path_factory):
    """The fused target build with the fused draft build in its draft/ folder."""
    folder = tmp_path_factory.mktemp("with-draft") / "build"
    shutil.copytree(builds["fused"], folder)
    shutil.copytree(builds["draft_fused"], folder / "draft")
    return folder


def test_run_speculative_draft_gives_the_same_text(builds, with_draft, cli_runner):
    prompt = "the quick brown fox jumps over the lazy dog"
    base = ["run", str(with_draft), "-p", prompt, "-n", "30", "--json"]
    plain = json.loads(cli_runner.invoke(cli, base).stdout)
    for extra in ([], ["--draft-build", str(builds["draft_plain"])]):
        ran = cli_runner.invoke(cli, [*base, "--speculative", "draft", "--k", "3", *extra])
        assert ran.exit_code == 0, ran.output
        spec = json.loads(ran.stdout)
        assert spec["text"] == plain["text"] and spec["tokens"] == plain["tokens"]
        figures = spec["speculative"]
        assert figures["method"] == "draft" and figures["k"] == 3
        want = extra[-1] if extra else str(with_draft / "draft")
        assert figures["draft_build"] == want
        assert figures["drafted"] > 0 and figures["draft_s"] > 0 and figures["target_s"] > 0
    # The build itself as draft: every draft accepted.
    ran = cli_runner.invoke(cli, [*base, "--speculative", "draft", "--draft-build",
                                  str(builds["fused"])])  # fmt: skip
    spec = json.loads(ran.stdout)
    assert spec["tokens"] == plain["tokens"] and spec["speculative"]["acceptance_rate"] == 1.0
    # A draft never sure enough drafts nothing: one target step per token, same tokens.
    ran = cli_runner.invoke(cli, [*base, "--speculative", "draft", "--draft-min-prob", "1"])
    spec = json.loads(ran.stdout)
    assert spec["tokens"] == plain["tokens"] and spec["speculative"]["drafted"] == 0
    assert spec["speculative"]["steps"] == len(plain["tokens"]) - 1
    assert spec["speculative"]["draft_min_probability"] == 1.0
    streamed = cli_runner.invoke(cli, [*base[:-1], "--speculative", "draft"])
    assert streamed.exit_code == 0 and plain["text"] in streamed.stdout
    assert "acceptance" in streamed.stderr and "draft" in streamed.stderr


def test_run_speculative_draft_refusals(builds, with_draft, cli_runner, tmp_path):
    # No draft beside the build: the fix is to compile one.
    ran = cli_runner.invoke(
        cli, ["run", str(builds["plain"]), "-p", "hi", "--speculative", "draft"]
    )
    assert ran.exit_code == 2
    assert "no draft build" in ran.stderr and "--draft layers=1/4" in ran.stderr
    # A draft whose tokenizer numbers tokens differently.
    other = tmp_path / "other-tokenizer"
    shutil.copytree(builds["draft_fused"], other)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(data))
    ran = cli_runner.invoke(cli, ["run", str(with_draft), "-p", "hi", "--speculative", "draft",
                                  "--draft-build", str(other)])  # fmt: skip
    assert ran.exit_code == 2 and "tokenizer" in ran.stderr, ran.output
    # --draft-build without --speculative draft; sampling.
    ran = cli_runner.invoke(cli, ["run", str(with_draft), "-p", "hi", "--draft-build",
                                  str(builds["fused"])])  # fmt: skip
    assert ran.exit_code == 2 and "--speculative draft" in ran.stderr
    ran = cli_runner.invoke(cli, ["run", str(with_draft), "-p", "hi", "--speculative",
                                  "prompt-lookup", "--draft-min-prob", "0.5"])  # fmt: skip
    assert ran.exit_code == 2 and "--speculative draft" in ran.stderr
    ran = cli_runner.invoke(cli, ["run", str(with_draft), "-p", "hi", "--speculative", "draft",
                                  "--temperature", "0.7"])  # fmt: skip
    assert ran.exit_code == 2 and "greedy only" in ran.stderr


def test_api_run_speculative_draft(with_draft):
    import fdec

    build = fdec.load(with_draft)
    plain = build.run("the lighthouse keeper", max_new_tokens=20)
    spec = build.run("the lighthouse keeper", max_new_tokens=20, speculative="draft", k=2)
    assert spec["tokens"] == plain["tokens"]
    assert spec["speculative"]["draft_build"] == str(with_draft / "draft")
    again = build.run("the lighthouse keeper", max_new_tokens=20, speculative="draft", k=2)
    assert again["tokens"] == plain["tokens"]  # the kept draft session starts a fresh cache


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M (the bundled real model) in the cheapest build: fp32, no passes (~3 min on
    2 busy cores with an empty cache: GGUF conversion and export). It is also its own draft
    (its own session) until a test compiles `--draft` (a second export and pruning)."""
    folder = tmp_path_factory.mktemp("smollm2") / "build"
    _compile("smollm2-135m", folder, tmp_path_factory.getbasetemp() / "cache", "--passes", "none")
    return folder


def test_smollm2_speculative_gives_the_plain_greedy_tokens(smollm2):
    from fdec.runner import run_prompt

    smollm2 = load_build(smollm2)

    text = (
        "Repeat this sentence exactly: The keeper climbed the hundred and twelve steps to light "
        "the lamp every night."
    )
    plain = run_prompt(smollm2, text, max_new_tokens=24)
    assert plain["new_tokens"] >= 8 and "keeper" in plain["text"]
    lookup = run_prompt(smollm2, text, max_new_tokens=24, speculative="prompt-lookup", k=4)
    assert lookup["tokens"] == plain["tokens"]
    # An input-grounded answer: copied n-grams are accepted.
    assert lookup["speculative"]["accepted"] > 0
    assert lookup["speculative"]["steps"] < len(plain["tokens"]) - 1
    draft = run_prompt(smollm2, text, max_new_tokens=24, speculative="draft", k=3,
                       draft_build=smollm2.folder)  # fmt: skip
    assert draft["tokens"] == plain["tokens"]
    assert draft["speculative"]["acceptance_rate"] == 1.0
