"""Token generation with the KV cache over an OrtModel: greedy or sampled, streamed."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from fdec.runtime.session import OrtModel

__all__ = ["GenerationResult", "KvPolicy", "Sampling", "TrimmedDecoder", "generate"]


@dataclasses.dataclass(frozen=True)
class KvPolicy:
    """KV-cache compression: keep the first `sink` positions and the last `window` ones.

    Before each step, a past longer than `sink + window` loses the positions between them;
    positions keep counting, so every kept key (cached after RoPE) keeps its true position
    (StreamingLLM instead re-indexes positions within the cache, which needs keys cached
    before RoPE). `native_window`: the graph's GroupQueryAttention applies the window itself
    (local_window_size), so nothing is dropped here.
    """

    sink: int = 0
    window: int = 0
    native_window: bool = False

    @classmethod
    def of(cls, value: KvPolicy | Mapping[str, Any] | None) -> KvPolicy | None:
        if value is None or isinstance(value, KvPolicy):
            return value
        return cls(
            int(value.get("sink", 0)),
            int(value.get("window", 0)),
            bool(value.get("native_window", False)),
        )

    @property
    def trims(self) -> bool:
        """Whether generation drops cache positions (not done by the graph)."""
        return self.window > 0 and not self.native_window

    @property
    def max_cache_tokens(self) -> int:
        return self.sink + self.window

    def trim(self, past: list[np.ndarray]) -> list[np.ndarray]:
        """The past with the middle positions dropped when it holds more than sink + window."""
        length = past[0].shape[2] if past else 0
        if not self.trims or length <= self.max_cache_tokens:
            return past
        keep = np.r_[0 : self.sink, length - self.window : length]
        return [np.ascontiguousarray(tensor[:, :, keep]) for tensor in past]


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
        if 0 < self.top_k < len(scaled):  # a k past the vocabulary keeps every token
            kth = np.partition(scaled, -self.top_k)[-self.top_k]
            scaled = np.where(scaled < kth, -np.inf, scaled)
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if self.top_p < 1.0:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            # the most likely token always stays (top_p 0 cut every one: NaN probabilities)
            cut = order[1:][(cumulative - probs[order])[1:] >= self.top_p]
            probs[cut] = 0.0
            probs /= probs.sum()
        return int(rng.choice(len(probs), p=probs))


@dataclasses.dataclass
class GenerationResult:
    tokens: list[int]
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    max_past_length: int = 0  # the longest past any step was given (bounded by a KvPolicy)

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
    policy: KvPolicy | Mapping[str, Any] | None = None,
    static: bool | None = None,
) -> GenerationResult:
    """Prefill the prompt once, then decode one token per step reusing the KV cache.

    `bound` (default) runs the steps through IOBinding (`OrtModel.bound_decoder`): the cache
    stays in OrtValues, shared between past and present when the build allows it. False runs
    the plain loop that passes the cache through numpy each step (the reference in tests).
    `policy` (default: the build's, `model.kv_policy`) bounds the cache; when generation has
    to drop positions it runs the plain loop, and a prompt longer than sink + window is
    prefilled in window-sized chunks so that no past exceeds sink + window. `static` binds
    decode steps with fixed shapes (CUDA graphs; default: when the session captures them).
    """
    chosen = KvPolicy.of(policy if policy is not None else model.kv_policy)
    if chosen is not None and chosen.trims:
        return _generate_trimmed(
            model, prompt, chosen, max_new_tokens, sampling, stop_tokens, on_token
        )
    ids = np.asarray([list(prompt)], dtype=np.int64)
    state: dict = {"length": ids.shape[1], "fed": list(prompt)}
    restart = getattr(model, "rotary_restart", 0)

    def prefill(whole: np.ndarray = ids) -> np.ndarray:
        if bound:
            if "decoder" in state and model.shares_kv_buffer:  # a restart: the same buffers
                state["decoder"].reset()  # (a captured CUDA graph replays their addresses)
            else:
                state["decoder"] = model.bound_decoder(
                    1, ids.shape[1] + max(max_new_tokens, 1), static=static
                )
            return state["decoder"].step(whole)
        logits, state["past"] = model.decode(whole, model.empty_past(1), 0)
        return logits

    def step(token: int) -> np.ndarray:
        piece = np.asarray([[token]], dtype=np.int64)
        if restart:  # the tokens so far, kept only for the restart
            state["fed"].append(token)
        if restart_now(restart, state["length"]):
            logits = prefill(np.asarray([state["fed"]], dtype=np.int64))[:, -1:]
        elif bound:
            logits = state["decoder"].step(piece)
        else:
            logits, state["past"] = model.decode(piece, state["past"], state["length"])
        state["length"] += 1
        return logits

    tokens, prefill_s, decode_s = _sample(
        prefill, step, max_new_tokens, sampling, stop_tokens, on_token
    )
    longest = state["length"] - 1 if len(tokens) > 1 else 0
    return GenerationResult(tokens, len(prompt), prefill_s, decode_s, longest)


def restart_now(restart: int, cached: int) -> bool:
    """Whether the step after `cached` positions recomputes the whole cache instead: the
    first step past a longrope Phi-3's original positions (`OrtModel.rotary_restart`), where
    transformers' generate drops the cache its keys were rotated into with the short factors
    and runs the whole sequence again with the long ones."""
    return bool(restart) and cached == restart


def _sample(
    prefill: Callable[[], np.ndarray],
    step: Callable[[int], np.ndarray],
    max_new_tokens: int,
    sampling: Sampling,
    stop_tokens: Sequence[int],
    on_token: Callable[[int], None] | None,
) -> tuple[list[int], float, float]:
    """The token loop every decoding path shares: prefill, then one step per token until
    `max_new_tokens` or a stop token; returns the tokens and the prefill and decode seconds."""
    rng = np.random.default_rng(sampling.seed)
    start = time.perf_counter()
    token = sampling.choose(prefill()[0, -1], rng)
    prefill_s = time.perf_counter() - start
    tokens = [token]
    if on_token:
        on_token(token)
    start = time.perf_counter()
    while len(tokens) < max_new_tokens and token not in stop_tokens:
        token = sampling.choose(step(token)[0, -1], rng)
        tokens.append(token)
        if on_token:
            on_token(token)
    return tokens, prefill_s, time.perf_counter() - start


class TrimmedDecoder:
    """The plain numpy loop with a KvPolicy applied to the past before every step, for a batch
    of rows at the same positions (one trim keeps every row's sink and window). A prompt longer
    than sink + window is prefilled in window-sized chunks, so no past exceeds sink + window."""

    def __init__(self, model: OrtModel, policy: KvPolicy, batch: int) -> None:
        self.model, self.policy = model, policy
        self.past = model.empty_past(batch)
        self.position = 0
        self.longest = 0  # the longest past any step was given

    def step(self, ids: np.ndarray) -> np.ndarray:
        """Logits [batch, seq, vocab] for ids [batch, seq] after the kept positions."""
        self.past = self.policy.trim(self.past)
        cached = self.past[0].shape[2] if self.past else 0
        self.longest = max(self.longest, cached)
        logits, self.past = self.model.decode(ids, self.past, cached, position=self.position)
        self.position += ids.shape[1]
        return logits

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        width = ids.shape[1]
        chunk = width if width <= self.policy.max_cache_tokens else self.policy.window
        for offset in range(0, width, chunk):
            logits = self.step(ids[:, offset : offset + chunk])
        return logits


def _generate_trimmed(
    model: OrtModel,
    prompt: Sequence[int],
    policy: KvPolicy,
    max_new_tokens: int,
    sampling: Sampling,
    stop_tokens: Sequence[int],
    on_token: Callable[[int], None] | None,
) -> GenerationResult:
    """The trimmed loop (TrimmedDecoder) for one prompt."""
    decoder = TrimmedDecoder(model, policy, 1)
    tokens, prefill_s, decode_s = _sample(
        lambda: decoder.prefill(np.asarray([list(prompt)], dtype=np.int64)),
        lambda token: decoder.step(np.asarray([[token]], dtype=np.int64)),
        max_new_tokens,
        sampling,
        stop_tokens,
        on_token,
    )
    return GenerationResult(tokens, len(prompt), prefill_s, decode_s, decoder.longest)
