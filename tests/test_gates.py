"""fdec's evaluation corpus: two splits with the same kinds of text, balanced, sharing nothing
with each other, with the held verification text or with the calibration corpus."""

from __future__ import annotations

import importlib.resources

import pytest

from fdec.gates import CORPUS_KINDS, SPLITS, corpus


def _words(documents):
    counts = dict.fromkeys(CORPUS_KINDS, 0)
    for kind, text in documents:
        counts[kind] += len(text.split())
    return counts


def test_both_splits_hold_every_kind_balanced():
    tune, held_out = (_words(corpus(split)) for split in SPLITS)
    for counts in (tune, held_out):
        assert set(counts) == set(CORPUS_KINDS) and len(CORPUS_KINDS) >= 6
        # ~420-480 SmolLM2 tokens per kind and split (benchmarks/quality.py prints the counts)
        assert min(counts.values()) >= 150, counts
        assert max(counts.values()) <= 2.2 * min(counts.values()), counts
    for kind in CORPUS_KINDS:
        assert 0.7 <= tune[kind] / held_out[kind] <= 1.4, kind
    # ≥ 5,000 SmolLM2 tokens in all: 5,358 measured; words are ~0.7 of them for this text
    assert sum(tune.values()) + sum(held_out.values()) >= 3500


def test_splits_share_no_text_with_each_other_or_the_held_and_calibration_text():
    data = importlib.resources.files("fdec").joinpath("data")
    others = [data.joinpath("held.txt").read_text()]
    others += [p.read_text() for p in data.joinpath("calib").iterdir() if p.name.endswith(".txt")]
    lines = {
        split: {line.strip() for _, text in corpus(split) for line in text.splitlines()}
        for split in SPLITS
    }
    long_lines = {
        split: {line for line in found if len(line) > 40} for split, found in lines.items()
    }
    assert not long_lines["tune"] & long_lines["eval"]
    for other in others:
        other_lines = {line.strip() for line in other.splitlines() if len(line.strip()) > 40}
        assert not (long_lines["tune"] | long_lines["eval"]) & other_lines


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="unknown corpus split"):
        corpus("test")
