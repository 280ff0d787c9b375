"""Default quality gates of lossy recipes, as data with their provenance, and the corpus they were measured on.

A gate is what a build must meet when the user sets none: the perplexity increase over the
source (`--max-ppl-increase`), the lowest top-1 agreement and the largest logit error. Each
default here is a figure measured by `benchmarks/quality.py` on the *evaluation* split of
fdec's own corpus (fdec/data/corpus/eval, never used to choose anything) plus a stated margin,
so that a recipe that regresses fails its build (exit code 3) instead of passing a +100 % gate.

The corpus (fdec/data/corpus/{tune,eval}/KIND.txt, written for fdec, same licence as fdec) has
the same kinds of text in both splits; documents are separated by a line holding only `---`.
Quantization defaults (block sizes, alphas, clipping, which layers stay wide) are chosen on the
*tuning* split; the evaluation split only reports.
"""

from __future__ import annotations

import importlib.resources

__all__ = [
    "CORPUS_KINDS",
    "SPLITS",
    "corpus",
]

# Kinds of text in each split (one file per kind and split).
CORPUS_KINDS = (
    "narrative",
    "dialogue",
    "technical",
    "instructions",
    "code",
    "lists",
)
SPLITS = ("tune", "eval")
_SEPARATOR = "---"


def corpus(split: str) -> list[tuple[str, str]]:
    """The documents of one split as (kind, text) pairs, kinds in CORPUS_KINDS order."""
    if split not in SPLITS:
        raise ValueError(f"unknown corpus split {split!r}; use one of {SPLITS}")
    folder = importlib.resources.files("fdec").joinpath("data", "corpus", split)
    documents = []
    for kind in CORPUS_KINDS:
        text = folder.joinpath(f"{kind}.txt").read_text(encoding="utf-8")
        pieces = [[]]  # type: list[list[str]]
        for line in text.splitlines():
            if line.strip() == _SEPARATOR:
                pieces.append([])
            else:
                pieces[-1].append(line)
        documents += [(kind, "\n".join(p).strip()) for p in pieces if "".join(p).strip()]
    return documents
