"""Batched generation: several prompts decoded together, each row's tokens as if run alone.

Prompts of one length run as one batch through IOBinding (`OrtModel.bound_decoder`), on plain
and fused builds alike: no padding, every row at the same positions. Prompts of different
lengths are left-padded into one batch with an attention mask and per-row position ids
(position = cumsum(mask) - 1), which the plain traced graph honours. A fused build's
GroupQueryAttention ignores the mask's zeros: it takes each row's length from
`seqlens_k = ReduceSum(attention_mask) - 1` and places the new tokens (and their rotary
angles) at the end of that length, i.e. it assumes right padding. Left-padded rows would get
wrong positions and attend to pad keys, so generate_batch refuses that case rather than
return wrong tokens (see docs/design-notes.md, "Batched generation and fdec bench").
Rows stop independently: a finished row keeps being fed `pad_token` and its output ignored.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fdec.errors import UsageError
from fdec.runtime.generate import KvPolicy, Sampling, TrimmedDecoder, restart_now
from fdec.runtime.session import OrtModel

__all__ = ["BatchResult", "generate_batch", "uses_fused_attention"]

logger = logging.getLogger(__name__)

_FUSED_OPS = ("GroupQueryAttention", "MultiHeadAttention", "Attention")
_fused_cache: dict[str, bool] = {}
_GREEDY = Sampling()


@dataclasses.dataclass
class BatchResult:
    """Each row's new tokens, with the timings of the whole batch."""

    tokens: list[list[int]]
    prompt_tokens: list[int]
    prefill_s: float
    decode_s: float
    decode_steps: int  # batched steps after the prefill
    padded: bool  # whether prompts were left-padded (different lengths)

    @property
    def batch(self) -> int:
        return len(self.tokens)

    @property
    def decode_tokens(self) -> int:
        """Tokens produced by decode steps (after each row's first), over all rows."""
        return sum(max(len(row) - 1, 0) for row in self.tokens)

    @property
    def decode_tokens_per_s(self) -> float:
        """Throughput of the decode steps: tokens of all rows per second."""
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


def uses_fused_attention(model: OrtModel) -> bool:
    """Whether the model's graph runs com.microsoft fused attention (GroupQueryAttention, ...)."""
    if model.shares_kv_buffer:
        return True
    path = getattr(model.session, "_model_path", None)
    if not path:
        return False
    if path not in _fused_cache:
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        _fused_cache[path] = any(
            node.op_type in _FUSED_OPS and node.domain == "com.microsoft" for node in graph.node
        )
    return _fused_cache[path]


def generate_batch(
    model: OrtModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = _GREEDY,
    stop_tokens: Sequence[int] = (),
    pad_token: int = 0,
) -> BatchResult:
    """Decode all prompts together; row i's tokens equal `generate(model, prompts[i], ...)`.

    Sampling uses one generator per row seeded with `sampling.seed`, as a lone run would.
    Raises UsageError for an empty batch, an empty prompt, and prompts of different lengths
    on a fused-attention build or on one whose KV policy drops positions at run time.
    """
    rows = [list(map(int, prompt)) for prompt in prompts]
    if not rows:
        raise UsageError("generate_batch got no prompts", "pass at least one prompt")
    if any(not row for row in rows):
        raise UsageError("generate_batch got an empty prompt", "give every prompt a token")
    if not model.num_layers:
        raise UsageError("generate_batch needs a decoder build", "compile a causal LM")
    policy = KvPolicy.of(model.kv_policy)
    lengths = {len(row) for row in rows}
    trims = policy is not None and policy.trims
    if trims and len(lengths) > 1:
        raise UsageError(
            "prompts of different lengths cannot share a batch on a build whose KV cache the "
            f"runtime trims (--kv-window {policy.window}): left padding would fill the sink "
            "and the window with pad positions",
            "batch prompts of equal length, or run them one at a time",
        )
    if len(lengths) > 1 and uses_fused_attention(model):
        raise UsageError(
            "prompts of different lengths cannot share a batch on a fused-attention build "
            "(GroupQueryAttention derives positions from sequence lengths, not the padding mask)",
            "batch prompts of equal length, run them one at a time, or use a plain build "
            "(fdec compile --passes default)",
        )
    rngs = [np.random.default_rng(sampling.seed) for _ in rows]
    if len(lengths) == 1:
        return _generate_equal(model, rows, max_new_tokens, sampling, stop_tokens, pad_token, rngs,
                               policy if trims else None)  # fmt: skip
    return _generate_padded(model, rows, max_new_tokens, sampling, stop_tokens, pad_token, rngs)


class _Rows:
    """Per-row bookkeeping: chosen tokens, which rows are done."""

    def __init__(self, count: int, max_new_tokens: int, sampling: Sampling, stop_tokens, rngs):
        self.tokens: list[list[int]] = [[] for _ in range(count)]
        self.done = [False] * count
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.stop = set(int(t) for t in stop_tokens)
        self.rngs = rngs

    def take(self, logits: np.ndarray) -> None:
        """Choose each unfinished row's next token from logits [batch, vocab]."""
        for index, row in enumerate(self.tokens):
            if self.done[index]:
                continue
            token = self.sampling.choose(logits[index], self.rngs[index])
            row.append(token)
            if len(row) >= self.max_new_tokens or token in self.stop:
                self.done[index] = True

    def next_ids(self, pad_token: int) -> np.ndarray:
        return np.asarray(
            [[pad_token if self.done[i] else row[-1]] for i, row in enumerate(self.tokens)],
            dtype=np.int64,
        )

    @property
    def finished(self) -> bool:
        return all(self.done)


def _generate_equal(model, rows, max_new_tokens, sampling, stop_tokens, pad_token, rngs,
                    trimmed=None):  # fmt: skip
    """Prompts of one length: one decoder over the batch (no padding). IOBinding, or where the
    runtime trims the cache (`trimmed`, the build's KvPolicy) generate's trimmed loop
    (fdec.runtime.generate.TrimmedDecoder): every row holds the same positions."""
    state = _Rows(len(rows), max(max_new_tokens, 1), sampling, stop_tokens, rngs)
    ids = np.asarray(rows, dtype=np.int64)
    start = time.perf_counter()
    if trimmed is not None:
        decoder = TrimmedDecoder(model, trimmed, len(rows))
        prefill = decoder.prefill
    else:
        capacity = ids.shape[1] + max(max_new_tokens, 1)
        decoder = model.bound_decoder(len(rows), capacity)
        prefill = decoder.step
    state.take(prefill(ids)[:, -1])
    prefill_s = time.perf_counter() - start
    steps = 0
    start = time.perf_counter()
    restart = 0 if trimmed is not None else model.rotary_restart
    while not state.finished:
        fed = state.next_ids(pad_token)
        if restart:  # the tokens so far, kept only for generate's restart
            ids = np.concatenate([ids, fed], axis=1)
            if restart_now(restart, ids.shape[1] - 1):  # the whole batch again
                if model.shares_kv_buffer:
                    decoder.reset()
                else:
                    decoder = model.bound_decoder(len(rows), capacity)
                fed = ids
        state.take(decoder.step(fed)[:, -1])
        steps += 1
    decode_s = time.perf_counter() - start
    return BatchResult(state.tokens, [len(r) for r in rows], prefill_s, decode_s, steps, False)


def _generate_padded(model, rows, max_new_tokens, sampling, stop_tokens, pad_token, rngs):
    """Prompts of different lengths, left-padded: mask and positions per row, the KV cache
    passed through the graph's concatenation (plain builds)."""
    state = _Rows(len(rows), max(max_new_tokens, 1), sampling, stop_tokens, rngs)
    width = max(len(row) for row in rows)
    batch = len(rows)
    ids = np.full((batch, width), pad_token, dtype=np.int64)
    mask = np.zeros((batch, width), dtype=np.int64)
    for index, row in enumerate(rows):
        ids[index, width - len(row) :] = row
        mask[index, width - len(row) :] = 1
    positions = positions_so_far(mask)
    start = time.perf_counter()
    logits, past = _run(model, ids, mask, positions, model.empty_past(batch))
    state.take(logits[:, -1])
    prefill_s = time.perf_counter() - start
    next_position = positions[:, -1:] + 1
    steps = 0
    start = time.perf_counter()
    while not state.finished:
        fed, positions = state.next_ids(pad_token), next_position
        if model.rotary_restart:  # the tokens so far, kept only for generate's restart
            ids = np.concatenate([ids, fed], axis=1)
            if restart_now(model.rotary_restart, mask.shape[1]):  # by the padded width
                fed = ids
                positions = np.concatenate([positions_so_far(mask), next_position], axis=1)
                past = model.empty_past(batch)
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        logits, past = _run(model, fed, mask, positions, past)
        state.take(logits[:, -1])
        next_position = next_position + 1
        steps += 1
    decode_s = time.perf_counter() - start
    return BatchResult(state.tokens, [len(r) for r in rows], prefill_s, decode_s, steps, True)


def positions_so_far(mask: np.ndarray) -> np.ndarray:
    """Each left-padded row's positions (pads at 0) from its mask."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def _run(
    model: OrtModel,
    input_ids: np.ndarray,
    mask: np.ndarray,
    positions: np.ndarray,
    past: list[Any],
) -> tuple[np.ndarray, list[Any]]:
    """One step with an explicit mask and positions; returns logits and the presents."""
    return model.decode(input_ids, past, 0, attention_mask=mask, position_ids=positions)
