"""Token generation with the KV cache over an OrtModel: greedy or sampled, streamed."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np

from fdec.runtime.session import OrtModel

__all__ = ["GenerationResult", "Sampling", "generate"]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Greedy when temperature is 0; otherwise temperature, then top-k, then top-p."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def choose(self, logits: np.ndarray, rng: np.random.Generator) -> int:
        if self.temperature <= 0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / self.temperature
        if self.top_k > 0:
            kth = np.partition(scaled, -self.top_k)[-self.top_k]
            scaled = np.where(scaled < kth, -np.inf, scaled)
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if self.top_p < 1.0:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            cut = order[cumulative - probs[order] >= self.top_p]
            probs[cut] = 0.0
            probs /= probs.sum()
        return int(rng.choice(len(probs), p=probs))


@dataclasses.dataclass
class GenerationResult:
    tokens: list[int]
    prompt_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(len(self.tokens) - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0


def generate(
    model: OrtModel,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop_tokens: Sequence[int] = (),
    on_token: Callable[[int], None] | None = None,
    bound: bool = True,
) -> GenerationResult:
    """Prefill the prompt once, then decode one token per step reusing the KV cache.

    `bound` (default) runs the steps through IOBinding (`OrtModel.bound_decoder`): the cache
    stays in OrtValues, shared between past and present when the build allows it. False runs
    the plain loop that passes the cache through numpy each step (the reference in tests).
    """
    rng = np.random.default_rng(sampling.seed)
    ids = np.asarray([list(prompt)], dtype=np.int64)
    start = time.perf_counter()
    if bound:
        decoder = model.bound_decoder(1, ids.shape[1] + max(max_new_tokens, 1))
        logits = decoder.step(ids)
    else:
        logits, past = model.decode(ids, model.empty_past(1), 0)
    length = ids.shape[1]
    token = sampling.choose(logits[0, -1], rng)
    prefill_s = time.perf_counter() - start
    tokens = [token]
    if on_token:
        on_token(token)
    start = time.perf_counter()
    while len(tokens) < max_new_tokens and token not in stop_tokens:
        step = np.asarray([[token]], dtype=np.int64)
        if bound:
            logits = decoder.step(step)
        else:
            logits, past = model.decode(step, past, length)
        length += 1
        token = sampling.choose(logits[0, -1], rng)
        tokens.append(token)
        if on_token:
            on_token(token)
    return GenerationResult(tokens, len(prompt), prefill_s, time.perf_counter() - start)
