"""Tests of batched generation: every row's tokens equal the prompt run alone."""

from __future__ import annotations

import numpy as np
import pytest
from exported import export_tiny, run_pass

from fdec.errors import UsageError
from fdec.lower import MODEL_FILE, lower_onnxruntime
from fdec.passes.fusion import FuseAttentionPass
from fdec.runtime import OrtModel, Sampling, generate, open_session
from fdec.runtime.batch import generate_batch, uses_fused_attention
from fdec.targets import load_target

_PROMPTS = [
    [5, 17, 99, 3, 250, 7, 8, 41, 120, 64, 2, 300],
    [11, 12],
    [200, 31, 9, 77, 150],
    [42],
]


@pytest.fixture(scope="module")
def builds(tiny_models, tmp_path_factory):
    """A plain (traced attention) and a fused (GroupQueryAttention) build of the tiny llama."""
    tiny = export_tiny(tiny_models, tmp_path_factory, "llama")
    fused, _ = run_pass(FuseAttentionPass(), tiny.cleaned())
    out = {}
    for name, model in (("plain", tiny.cleaned()), ("fused", fused)):
        folder = tmp_path_factory.mktemp(f"batch-{name}")
        lower_onnxruntime(
            model, folder, source_folder=tiny_models("llama"), target=load_target("cpu")
        )
        out[name] = OrtModel(open_session(folder / MODEL_FILE))
    return out


def _alone(model, prompts, n, sampling=None, stop=()):
    sampling = sampling or Sampling()
    return [
        generate(model, p, max_new_tokens=n, sampling=sampling, stop_tokens=stop).tokens
        for p in prompts
    ]


def test_padded_batch_gives_each_prompts_own_greedy_tokens(builds):
    model = builds["plain"]
    want = _alone(model, _PROMPTS, 24)
    result = generate_batch(model, _PROMPTS, max_new_tokens=24)
    assert result.padded and result.batch == 4
    assert result.tokens == want
    # Distinct rows really differ (a batch that copied one row would not pass).
    assert len({tuple(row) for row in want}) == 4
    assert result.decode_steps == 23 and result.decode_tokens == 4 * 23


def test_rows_stop_independently_on_a_stop_token(builds):
    model = builds["plain"]
    full = _alone(model, _PROMPTS, 16)
    stop = full[2][3]  # row 2 stops at its 4th token; others stop wherever it appears first
    want = _alone(model, _PROMPTS, 16, stop=(stop,))
    got = generate_batch(model, _PROMPTS, max_new_tokens=16, stop_tokens=(stop,)).tokens
    assert got == want
    assert len(got[2]) <= 4 and max(len(row) for row in got) == 16


def test_sampled_rows_match_a_lone_run_with_the_same_seed(builds):
    sampling = Sampling(temperature=0.9, top_k=30, seed=7)
    model = builds["plain"]
    want = _alone(model, _PROMPTS, 12, sampling)
    assert generate_batch(model, _PROMPTS, max_new_tokens=12, sampling=sampling).tokens == want


@pytest.mark.parametrize("build", ["plain", "fused"])
def test_equal_length_batch_matches_on_plain_and_fused_builds(builds, build):
    model = builds[build]
    prompts = [_PROMPTS[0], list(reversed(_PROMPTS[0])), [p + 1 for p in _PROMPTS[0]]]
    result = generate_batch(model, prompts, max_new_tokens=20)
    assert not result.padded
    assert result.tokens == _alone(model, prompts, 20)


def test_fused_build_refuses_prompts_of_different_lengths(builds):
    assert uses_fused_attention(builds["fused"]) and not uses_fused_attention(builds["plain"])
    with pytest.raises(UsageError, match="different lengths") as caught:
        generate_batch(builds["fused"], _PROMPTS, max_new_tokens=4)
    assert "--passes default" in caught.value.one_line()


def test_padded_logits_are_finite_and_close_to_lone_runs(builds):
    """Left padding changes nothing but float rounding in the rows' last logits."""
    from fdec.runtime.batch import _run

    model = builds["plain"]
    short, long = _PROMPTS[2], _PROMPTS[0]
    width = len(long)
    ids = np.zeros((2, width), np.int64)
    mask = np.zeros((2, width), np.int64)
    ids[0], mask[0] = long, 1
    ids[1, width - len(short) :], mask[1, width - len(short) :] = short, 1
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    logits, _ = _run(model, ids, mask, positions, model.empty_past(2))
    alone, _ = model.decode(np.asarray([short]), model.empty_past(1), 0)
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(logits[1, -1], alone[0, -1], atol=1e-4, rtol=0)


def test_bad_batches_are_usage_errors(builds):
    with pytest.raises(UsageError, match="no prompts"):
        generate_batch(builds["plain"], [], max_new_tokens=4)
    with pytest.raises(UsageError, match="empty prompt"):
        generate_batch(builds["plain"], [[1, 2], []], max_new_tokens=4)


def test_a_trimmed_cache_batches_prompts_of_one_length(builds):
    """A build whose runtime drops cache positions (sink 2 + window 6) batches equal-length
    prompts: each row's tokens equal its lone run, whose cache is trimmed the same way (the
    12-token prompts are prefilled in chunks and 24 steps outgrow the 8 kept positions)."""
    plain = builds["plain"]
    model = OrtModel(plain.session, kv_policy={"sink": 2, "window": 6})
    prompts = [_PROMPTS[0], list(reversed(_PROMPTS[0])), [p + 1 for p in _PROMPTS[0]]]
    want = _alone(model, prompts, 24)
    assert want != _alone(plain, prompts, 24)  # the trimming changes the tokens
    result = generate_batch(model, prompts, max_new_tokens=24)
    assert result.tokens == want and not result.padded and result.decode_steps == 23
    with pytest.raises(UsageError, match=r"different lengths.*trims"):
        generate_batch(model, _PROMPTS, max_new_tokens=4)
