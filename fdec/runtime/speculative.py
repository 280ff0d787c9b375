"""Speculative decoding, greedy: prompt-lookup (n-gram) drafts or a draft model's, verified k at a time.

Each step a drafter proposes up to k tokens: prompt-lookup copies what followed the most
recent earlier occurrence of the last n-gram of prompt + generated tokens; a draft model (a
smaller build of the same vocabulary, `fdec compile ... --draft`) decodes them greedily with
its own KV cache. The target runs the last accepted token and the draft in one decode call,
keeps the longest prefix its argmax agrees with plus its own next token, and rewinds its KV
cache to the accepted length (the draft's too): a shared-buffer build (fused GroupQueryAttention) runs through IOBinding and
rewinds the buffer's length; other builds pass the cache through numpy (`OrtModel.decode`) and
slice it along the sequence axis. Both drafters go through the same verification loop
(`generate_speculative`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from fdec.runtime.session import OrtModel

__all__ = [
    "DraftModelDrafter",
    "Drafter",
    "FirstDrafter",
    "PromptLookupDrafter",
    "SpeculativeResult",
    "check_draft_model",
    "generate_speculative",
    "prompt_lookup_draft",
]


@dataclasses.dataclass
class SpeculativeResult:
    tokens: list[int]
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    steps: int = 0  # target decode calls after the prefill
    drafted: int = 0  # draft tokens the target verified
    accepted: int = 0  # draft tokens the target agreed with
    draft_s: float = 0.0  # seconds the drafter took (a draft model's prefill included)
    target_s: float = 0.0  # seconds of target decode calls after the prefill

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first (the prefill's) per second of decoding, as GenerationResult."""
        made = max(len(self.tokens) - 1, 0)
        return made / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def tokens_per_step(self) -> float:
        made = max(len(self.tokens) - 1, 0)
        return made / self.steps if self.steps else 0.0


class Drafter(Protocol):
    """What proposes draft tokens: `prefill(prompt, max_length)` once (`max_length`: the
    longest context plus draft it will see), then `propose(context, k)` each step (`context`
    is prompt + every accepted token; at most k tokens back, [] for none)."""

    def prefill(self, prompt: Sequence[int], max_length: int) -> None: ...

    def propose(self, context: Sequence[int], k: int) -> list[int]: ...


def prompt_lookup_draft(tokens: Sequence[int], k: int, ngram: int) -> list[int]:
    """Up to k tokens following the most recent earlier occurrence of the last n-gram of
    `tokens` (n from `ngram` down to 1, longest first); [] when none occurs."""
    if k <= 0:
        return []
    seq = np.asarray(tokens, dtype=np.int64)
    total = len(seq)
    for n in range(min(ngram, total - 1), 0, -1):
        tail = seq[total - n :]
        # Windows starting at 0..total-n-1: every occurrence that ends before the last token.
        windows = np.lib.stride_tricks.sliding_window_view(seq[: total - 1], n)
        hits = np.flatnonzero((windows == tail).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            draft = seq[start : start + k].tolist()
            if draft:
                return draft
    return []


class PromptLookupDrafter:
    """Drafts copied from the context itself (`prompt_lookup_draft`); no model."""

    def __init__(self, ngram: int = 3):
        if ngram < 1:
            raise ValueError("ngram must be at least 1")
        self.ngram = ngram

    def prefill(self, prompt: Sequence[int], max_length: int) -> None:
        pass

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        return prompt_lookup_draft(context, k, self.ngram)


def _check_decoder(model: OrtModel, what: str) -> None:
    if not model.num_layers:
        raise ValueError(f"speculative decoding needs a {what} with a KV cache")
    policy = model.kv_policy
    if policy and policy.get("window") and not policy.get("native_window"):
        raise ValueError(
            f"speculative decoding does not run {what}s whose cache policy drops positions"
        )


def _vocab_size(model: OrtModel) -> int | None:
    outputs = model.session.get_outputs()
    size = outputs[model.output_names.index("logits")].shape[-1]
    return size if isinstance(size, int) else None


def check_draft_model(target: OrtModel, draft: OrtModel) -> None:
    """ValueError unless `draft` can draft for `target`: a decoder with a KV cache whose logits
    cover the same vocabulary (the tokenizers are the caller's to compare)."""
    _check_decoder(draft, "draft model")
    if not draft.is_decoder:
        raise ValueError("the draft model has no logits output")
    mine, theirs = _vocab_size(target), _vocab_size(draft)
    if mine is not None and theirs is not None and mine != theirs:
        raise ValueError(f"the draft model's vocabulary has {theirs} tokens, the target's {mine}")


class _Cache:
    """A model's KV cache that can be rewound: IOBinding with the length rewound on a
    shared-buffer build (fused GroupQueryAttention writes each step at the length the attention
    mask gives, so rewound positions are overwritten), else numpy sliced along the sequence."""

    def __init__(self, model: OrtModel, max_length: int, *, bound: bool):
        self.model = model
        self.length = 0
        self._decoder = model.bound_decoder(1, max_length) if bound else None
        self._past = [] if bound else model.empty_past(1)

    def run(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits [1, len(tokens), vocab] of `tokens` after the cached positions."""
        ids = np.asarray([tokens], dtype=np.int64)
        if self._decoder is not None:
            logits = self._decoder.step(ids)
        else:
            logits, self._past = self.model.decode(ids, self._past, self.length)
        self.length += len(tokens)
        return logits

    def rewind(self, keep: int) -> None:
        """Drop the positions from `keep` on."""
        if keep >= self.length:
            return
        self.length = keep
        if self._decoder is not None:
            self._decoder.length = keep
        else:
            self._past = [np.ascontiguousarray(t[:, :, :keep]) for t in self._past]


class DraftModelDrafter:
    """Greedy drafts from a smaller model with its own KV cache.

    The cache holds the draft's view of the context (`fed`). Each proposal first drops the
    positions the target rejected (the longest common prefix of `fed` and the context is
    kept), feeds what the draft has not seen (the target's correction, or the last accepted
    draft), then decodes one token per call. A shared-buffer build (fused GroupQueryAttention)
    runs through IOBinding and is trimmed by rewinding the buffer's length; other builds pass
    their cache through numpy and are trimmed by slicing.

    `min_probability`: the draft stops at the first token its own softmax gives less than
    this (a weak draft then costs fewer wasted calls); 0 always drafts k tokens.
    """

    def __init__(
        self,
        model: OrtModel,
        *,
        stop_tokens: Sequence[int] = (),
        bound: bool = True,
        min_probability: float = 0.0,
    ):
        _check_decoder(model, "draft model")
        self.model = model
        self.min_probability = min_probability
        self.stops = set(stop_tokens)
        self.bound = bound and model.shares_kv_buffer
        self.fed: list[int] = []  # the tokens in the draft's cache, in order
        self._cache: _Cache | None = None
        self.seconds = 0.0
        self.calls = 0  # draft decode calls

    def prefill(self, prompt: Sequence[int], max_length: int) -> None:
        start = time.perf_counter()
        self.fed = []
        self._cache = _Cache(self.model, max(max_length, len(prompt) + 1), bound=self.bound)
        self._feed(list(prompt))
        self.seconds += time.perf_counter() - start

    def _feed(self, tokens: list[int]) -> int | None:
        """Run `tokens` after the cache; the draft's greedy next token, None when the draft
        gives it less than `min_probability`."""
        logits = self._cache.run(tokens)[0, -1]
        self.calls += 1
        self.fed.extend(tokens)
        best = int(np.argmax(logits))
        if self.min_probability > 0:
            shifted = np.exp(logits.astype(np.float64) - logits[best])
            if 1.0 / shifted.sum() < self.min_probability:
                return None
        return best

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        if k <= 0:
            return []
        start = time.perf_counter()
        seen = min(len(self.fed), len(context) - 1)  # the last token is always fed again
        differs = np.flatnonzero(
            np.asarray(self.fed[:seen], dtype=np.int64) != np.asarray(context[:seen], np.int64)
        )
        keep = int(differs[0]) if differs.size else seen
        del self.fed[keep:]
        self._cache.rewind(keep)
        draft: list[int] = []
        token = self._feed(list(context[len(self.fed) :]))
        while token is not None:
            draft.append(token)
            if len(draft) == k or token in self.stops:
                break
            token = self._feed([token])
        self.seconds += time.perf_counter() - start
        return draft


class FirstDrafter:
    """The first non-empty proposal of several drafters, in order: e.g. prompt lookup, then a
    draft model where the context has no match (the draft model catches up on the tokens it
    skipped in one call when next asked)."""

    def __init__(self, *drafters: Drafter):
        self.drafters = drafters

    def prefill(self, prompt: Sequence[int], max_length: int) -> None:
        for drafter in self.drafters:
            drafter.prefill(prompt, max_length)

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        for drafter in self.drafters:
            proposal = drafter.propose(context, k)
            if proposal:
                return proposal
        return []


def generate_speculative(
    model: OrtModel,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    k: int = 4,
    ngram: int = 3,
    draft: OrtModel | Drafter | None = None,
    stop_tokens: Sequence[int] = (),
    on_token: Callable[[int], None] | None = None,
    bound: bool = True,
) -> SpeculativeResult:
    """Greedy generation with drafts verified k at a time; the tokens are those of
    `generate(model, prompt, max_new_tokens=...)` with greedy sampling.

    `draft`: None drafts by prompt lookup (n-grams up to `ngram`); an OrtModel (a draft build
    of the same vocabulary) drafts with `DraftModelDrafter`; or any `Drafter`. `bound` runs a
    shared-buffer target (and draft) through IOBinding, rewinding the buffer's length after a
    rejection; False (or another build) passes the cache through numpy and slices it.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    _check_decoder(model, "build")
    stops = set(stop_tokens)
    if draft is None:
        drafter: Drafter = PromptLookupDrafter(ngram)
    elif isinstance(draft, OrtModel):
        check_draft_model(model, draft)
        drafter = DraftModelDrafter(draft, stop_tokens=sorted(stops), bound=bound)
    else:
        drafter = draft
    longest = len(prompt) + max_new_tokens + k + 1
    if isinstance(drafter, DraftModelDrafter):
        drafted_before = drafter.seconds
    context = list(prompt)
    start = time.perf_counter()
    cache = _Cache(model, longest, bound=bound and model.shares_kv_buffer)
    token = int(np.argmax(cache.run(context)[0, -1]))
    drafter.prefill(context, longest)
    prefill_s = time.perf_counter() - start
    result = SpeculativeResult([token], len(context), prefill_s, 0.0)
    context.append(token)
    if on_token:
        on_token(token)
    start = time.perf_counter()
    while len(result.tokens) < max_new_tokens and token not in stops:
        # Never draft past max_new_tokens: the step also adds the target's own token.
        room = max_new_tokens - len(result.tokens) - 1
        began = time.perf_counter()
        proposal = drafter.propose(context, min(k, room))[: min(k, room)]
        verify = time.perf_counter()
        result.draft_s += verify - began
        cached = cache.length  # everything but the last token
        logits = cache.run([token, *proposal])
        result.target_s += time.perf_counter() - verify
        result.steps += 1
        predicted = np.argmax(logits[0], axis=-1)
        accepted = 0
        while accepted < len(proposal) and int(predicted[accepted]) == proposal[accepted]:
            accepted += 1
        result.drafted += len(proposal)
        result.accepted += accepted
        new = [*proposal[:accepted], int(predicted[accepted])]
        # Keep the last token and the accepted drafts; the target's own token is not cached.
        cache.rewind(cached + 1 + accepted)
        for token in new:
            result.tokens.append(token)
            context.append(token)
            if on_token:
                on_token(token)
            if token in stops or len(result.tokens) >= max_new_tokens:
                break
    result.decode_s = time.perf_counter() - start
    if isinstance(drafter, DraftModelDrafter):
        result.draft_s = drafter.seconds - drafted_before  # its prefill included
    return result
