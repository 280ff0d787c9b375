"""Speculative decoding with prompt-lookup (n-gram) drafting: greedy, no draft model.

Each step drafts up to k tokens by copying what followed the most recent earlier occurrence
of the last n-gram of prompt + generated tokens, runs the last accepted token and the draft
through the target in one decode call, keeps the longest prefix the target's argmax agrees
with plus the target's own next token, and slices the KV cache back to the accepted length.
The cache goes through numpy (`OrtModel.decode`), so trimming is a slice along the sequence
axis; a shared-buffer build is run the same way (its GroupQueryAttention concatenates when
past and present are not one buffer).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np

from fdec.runtime.session import OrtModel

__all__ = ["SpeculativeResult", "generate_speculative", "prompt_lookup_draft"]


@dataclasses.dataclass
class SpeculativeResult:
    tokens: list[int]
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    steps: int = 0  # target decode calls after the prefill
    drafted: int = 0  # draft tokens the target verified
    accepted: int = 0  # draft tokens the target agreed with

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


def generate_speculative(
    model: OrtModel,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    k: int = 4,
    ngram: int = 3,
    stop_tokens: Sequence[int] = (),
    on_token: Callable[[int], None] | None = None,
) -> SpeculativeResult:
    """Greedy generation with prompt-lookup drafts verified k at a time; the tokens are those
    of `generate(model, prompt, max_new_tokens=...)` with greedy sampling."""
    if k < 1 or ngram < 1:
        raise ValueError("k and ngram must be at least 1")
    if not model.num_layers:
        raise ValueError("speculative decoding needs a decoder with a KV cache")
    if (
        model.kv_policy
        and model.kv_policy.get("window")
        and not model.kv_policy.get("native_window")
    ):
        raise ValueError(
            "speculative decoding does not run builds whose cache policy drops positions"
        )
    stops = set(stop_tokens)
    context = list(prompt)
    ids = np.asarray([context], dtype=np.int64)
    start = time.perf_counter()
    logits, past = model.decode(ids, model.empty_past(1), 0)
    token = int(np.argmax(logits[0, -1]))
    prefill_s = time.perf_counter() - start
    result = SpeculativeResult([token], len(context), prefill_s, 0.0)
    context.append(token)
    if on_token:
        on_token(token)
    cached = len(prompt)  # positions in `past`: everything but the last token
    start = time.perf_counter()
    while len(result.tokens) < max_new_tokens and token not in stops:
        # Never draft past max_new_tokens: the step also adds the target's own token.
        room = max_new_tokens - len(result.tokens) - 1
        draft = prompt_lookup_draft(context, min(k, room), ngram)
        step = np.asarray([[token, *draft]], dtype=np.int64)
        logits, present = model.decode(step, past, cached)
        result.steps += 1
        predicted = np.argmax(logits[0], axis=-1)
        accepted = 0
        while accepted < len(draft) and int(predicted[accepted]) == draft[accepted]:
            accepted += 1
        result.drafted += len(draft)
        result.accepted += accepted
        new = [*draft[:accepted], int(predicted[accepted])]
        # Keep the last token and the accepted drafts; the target's own token is not cached.
        cached += 1 + accepted
        past = (
            present
            if accepted == len(draft)
            else [np.ascontiguousarray(t[:, :, :cached]) for t in present]
        )
        for token in new:
            result.tokens.append(token)
            context.append(token)
            if on_token:
                on_token(token)
            if token in stops or len(result.tokens) >= max_new_tokens:
                break
    result.decode_s = time.perf_counter() - start
    return result
