"""Numeric verification: the build against the source model on held text (logits, top-1, perplexity, greedy tokens)."""

from __future__ import annotations

import dataclasses
import importlib.resources
import logging
import pathlib
from typing import Any

import numpy as np

from fdec.runtime.generate import generate
from fdec.runtime.session import OrtModel
from fdec.runtime.sliced import SlicedModel

__all__ = [
    "Reference",
    "held_text",
    "held_token_ids",
    "log_softmax",
    "logits_through_cache",
    "perplexity",
    "perplexity_through_cache",
]

logger = logging.getLogger(__name__)

HELD_TOKENS = 128  # tokens of held text scored
GREEDY_PROMPT = 16  # tokens of held text used as the greedy prompt
GREEDY_STEPS = 32


def held_text() -> str:
    return importlib.resources.files("fdec").joinpath("data/held.txt").read_text()


def held_token_ids(tokenizer: Any, vocab_size: int, limit: int = HELD_TOKENS) -> np.ndarray:
    """Token ids of the held text; without a tokenizer, a fixed pseudo-random sequence."""
    if tokenizer is not None:
        ids = tokenizer(held_text(), add_special_tokens=False)["input_ids"][:limit]
        ids = [i for i in ids if i < vocab_size]
        if len(ids) >= 8:
            return np.asarray([ids], dtype=np.int64)
    rng = np.random.default_rng(1234)
    return rng.integers(0, vocab_size, size=(1, limit), dtype=np.int64)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """Perplexity of ids[1:] under logits[:-1] (one sequence)."""
    logp = log_softmax(logits[0, :-1])
    nll = -logp[np.arange(ids.shape[1] - 1), ids[0, 1:]]
    return float(np.exp(nll.mean()))


def logits_through_cache(
    model: OrtModel, ids: np.ndarray, prefill: int, *, chunk: int = 1
) -> np.ndarray:
    """Logits [1, n, vocab] of `ids` [1, n]: the first `prefill` tokens in one pass, the rest
    `chunk` tokens at a time through the KV cache the build stores (its dtype, its scales).

    A single forward pass with an empty cache never reads the cache, so a quantized cache
    (fdec.passes.kv_cache) only shows in positions computed from a stored past.
    """
    prefill = max(1, min(prefill, ids.shape[1]))
    if isinstance(model, SlicedModel):  # every chunk known: one pass over the slices
        chunks = [ids[:, :prefill]]
        chunks += [ids[:, s : s + chunk] for s in range(prefill, ids.shape[1], chunk)]
        return np.concatenate(model.logits(chunks), axis=1)
    logits, past = model.decode(ids[:, :prefill], model.empty_past(ids.shape[0]), 0)
    pieces = [logits]
    for start in range(prefill, ids.shape[1], chunk):
        piece = ids[:, start : start + chunk]
        logits, past = model.decode(piece, past, start)
        pieces.append(logits)
    return np.concatenate(pieces, axis=1)


def perplexity_through_cache(
    model: OrtModel, ids: np.ndarray, prefill: int, *, chunk: int = 1
) -> float:
    """Perplexity of ids[prefill:] when every one of them is predicted from a cached past
    (`logits_through_cache`): the figure a KV-cache dtype changes."""
    logits = logits_through_cache(model, ids, prefill, chunk=chunk)
    return perplexity(logits[:, prefill - 1 :], ids[:, prefill - 1 :])


def _float_cache(model: OrtModel) -> bool:
    return np.dtype(getattr(model, "kv_dtype", np.float32)) == np.float32


def _policy_positions(model: OrtModel) -> int | None:
    """Positions a build with a cache policy (--kv-window/--kv-sink) attends to exactly as the
    source does (sink + window + the current one); None without a policy, or with the
    model's own sliding window (the source attends to no more). Beyond them the build attends
    to less on purpose, so verification compares only that many."""
    policy = getattr(model, "kv_policy", None)
    if not policy or not policy.get("window"):
        return None
    if not policy.get("sink") and policy["window"] == policy.get("model_window"):
        return None
    return int(policy.get("sink", 0)) + int(policy["window"]) + 1


@dataclasses.dataclass
class Reference:
    """The source model's outputs on held input, computed once with PyTorch."""

    kind: str
    ids: np.ndarray
    outputs: dict[str, np.ndarray]
    greedy_tokens: list[int] = dataclasses.field(default_factory=list)
    greedy_margins: list[float] = dataclasses.field(default_factory=list)
    used_tokenizer: bool = True

    @classmethod
    def from_hf(
        cls,
        hf_model: Any,
        kind: str,
        tokenizer: Any,
        vocab_size: int,
        *,
        greedy_steps: int = GREEDY_STEPS,
    ) -> Reference:
        import torch

        # A model with fewer positions than the held text is scored on as many as it has.
        config = hf_model.config
        positions = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        ids = held_token_ids(
            tokenizer, vocab_size, limit=min(HELD_TOKENS, positions or HELD_TOKENS)
        )
        if positions:
            greedy_steps = max(0, min(greedy_steps, positions - GREEDY_PROMPT))
        with torch.no_grad():
            if kind == "encoder":
                out = hf_model(
                    input_ids=torch.from_numpy(ids),
                    attention_mask=torch.ones_like(torch.from_numpy(ids)),
                )
                outputs = {"last_hidden_state": out.last_hidden_state.numpy()}
                if getattr(out, "pooler_output", None) is not None:
                    outputs["pooler_output"] = out.pooler_output.numpy()
                return cls(kind, ids, outputs, used_tokenizer=tokenizer is not None)
            logits = hf_model(input_ids=torch.from_numpy(ids)).logits.numpy()
            tokens, margins = _torch_greedy(hf_model, ids[:, :GREEDY_PROMPT], greedy_steps)
        return cls(kind, ids, {"logits": logits}, tokens, margins, tokenizer is not None)

    def save(self, path: pathlib.Path) -> None:
        """Write the reference as one `.npz` (no pickles), for fdec's cache."""
        np.savez(
            path,
            kind=np.asarray(self.kind),
            ids=self.ids,
            output_names=np.asarray(list(self.outputs)),
            greedy_tokens=np.asarray(self.greedy_tokens, dtype=np.int64),
            greedy_margins=np.asarray(self.greedy_margins, dtype=np.float64),
            used_tokenizer=np.asarray(self.used_tokenizer),
            **{f"output_{i}": array for i, array in enumerate(self.outputs.values())},
        )

    @classmethod
    def load(cls, path: pathlib.Path) -> Reference:
        """A reference written by `save`, equal to the one saved, array for array."""
        with np.load(path, allow_pickle=False) as data:
            names = [str(name) for name in data["output_names"]]
            return cls(
                kind=str(data["kind"]),
                ids=data["ids"],
                outputs={name: data[f"output_{i}"] for i, name in enumerate(names)},
                greedy_tokens=[int(t) for t in data["greedy_tokens"]],
                greedy_margins=[float(m) for m in data["greedy_margins"]],
                used_tokenizer=bool(data["used_tokenizer"]),
            )

    def compare(self, model: OrtModel) -> dict[str, Any]:
        """Figures of `model` against this reference; `ok` is judged by the caller."""
        if self.kind == "encoder":
            got = model.encode(self.ids)
            errors = {
                name: float(np.abs(got[name] - want).max()) for name, want in self.outputs.items()
            }
            worst = max(errors, key=errors.get)
            return {
                "max_abs_error": errors[worst],
                "worst_output": worst,
                "errors": errors,
                "top1_agreement": 1.0,
                **_nonfinite(*got.values()),
            }
        ids, want = self.ids, self.outputs["logits"]
        limit = _policy_positions(model)
        if limit is not None and limit < ids.shape[1]:
            ids, want = ids[:, :limit], want[:, :limit]
        through_cache = None
        if model.num_layers and not _float_cache(model) and ids.shape[1] >= 2:
            # A quantized/fp16 cache: the second half of the tokens is computed one at a time
            # from the stored past, so the figures below include the cache's error.
            through_cache = ids.shape[1] // 2
            logits = logits_through_cache(model, ids, through_cache)
        else:
            logits, _ = model.decode(ids, model.empty_past(1), 0)
        diff = np.abs(logits - want)
        worst_position = int(np.unravel_index(diff.argmax(), diff.shape)[1])
        agreement = float((logits.argmax(-1) == want.argmax(-1)).mean())
        return {
            "max_abs_error": float(diff.max()),
            "worst_output": f"logits at position {worst_position}",
            "top1_agreement": agreement,
            "kl_divergence": _mean_kl(want, logits),
            "perplexity_source": perplexity(want, ids),
            "perplexity_build": perplexity(logits, ids),
            "tokens_scored": int(ids.shape[1]),
            **_nonfinite(logits),
            **(
                {
                    "kv_cache": {
                        "dtype": np.dtype(model.kv_dtype).name
                        if model.kv_onnx_type is None
                        else "float8_e4m3fn",
                        "prefill_tokens": through_cache,
                        "tokens_through_cache": int(ids.shape[1]) - through_cache,
                        "perplexity_source": perplexity(
                            want[:, through_cache - 1 :], ids[:, through_cache - 1 :]
                        ),
                        "perplexity_build": perplexity(
                            logits[:, through_cache - 1 :], ids[:, through_cache - 1 :]
                        ),
                    }
                }
                if through_cache
                else {}
            ),
        }

    def compare_greedy(self, model: OrtModel) -> dict[str, Any]:
        """Greedy decoding through the KV cache must give the source model's tokens."""
        steps = GREEDY_STEPS
        limit = _policy_positions(model)
        if limit is not None:  # only the steps the cache policy keeps exact
            steps = max(0, min(steps, limit - GREEDY_PROMPT))
        if steps == 0:
            return {"steps": 0, "identical": True, "first_divergence": None, "policy": True}
        method = "decoded through the KV cache"
        if isinstance(model, SlicedModel):
            got = _teacher_forced_greedy(
                model, self.ids[:, :GREEDY_PROMPT], self.greedy_tokens[:steps]
            )
            method = "teacher-forced through the KV cache, slice by slice"
        else:
            prompt = self.ids[0, :GREEDY_PROMPT].tolist()
            got = generate(model, prompt, max_new_tokens=steps).tokens
        first_diff = next(
            (i for i, (a, b) in enumerate(zip(got, self.greedy_tokens)) if a != b), None
        )
        figures: dict[str, Any] = {
            "steps": min(steps, len(self.greedy_tokens)),
            "identical": first_diff is None,
            "first_divergence": first_diff,
            "method": method,
        }
        if first_diff is not None:
            # A divergence where the source's top two logits were within float noise is a tie,
            # not an error; report it as such.
            figures["source_margin_at_divergence"] = self.greedy_margins[first_diff]
        return figures


def _teacher_forced_greedy(model: SlicedModel, prompt: np.ndarray, tokens: list[int]) -> list[int]:
    """The build's greedy choice at each step when fed the source's greedy tokens: the prompt,
    then each token through the KV cache. Up to the first step where the choice differs from
    the source's token, these are the tokens the build's own greedy decoding gives; the
    steps' inputs being known, the sliced model reads its weights once for all of them."""
    phases = [prompt] + [np.asarray([[token]], dtype=np.int64) for token in tokens[:-1]]
    return [int(logits[0, -1].argmax()) for logits in model.logits(phases)]


def _nonfinite(*arrays: np.ndarray) -> dict[str, int]:
    """{"nonfinite_outputs": n} when the build's outputs hold n inf/NaN values, else {}: NaN
    passes every `>` comparison of a tolerance, so it is counted and judged on its own."""
    count = sum(int(a.size - np.isfinite(a).sum()) for a in arrays)
    return {"nonfinite_outputs": count} if count else {}


def _mean_kl(want: np.ndarray, got: np.ndarray) -> float:
    p_log = log_softmax(want)
    q_log = log_softmax(got)
    return float((np.exp(p_log) * (p_log - q_log)).sum(-1).mean())


def _torch_greedy(hf_model: Any, prompt: np.ndarray, steps: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and the top-1/top-2 logit margin of each step, with the HF KV cache."""
    import torch

    from fdec.frontend.export import cache_argument, output_cache
    from fdec.frontend.families import rotary_restart
    from fdec.runtime.generate import restart_now

    cache_kw = cache_argument(hf_model)
    restart = rotary_restart(hf_model.config)
    ids = torch.from_numpy(prompt)
    out = hf_model(input_ids=ids, use_cache=True)
    tokens: list[int] = []
    margins: list[float] = []
    for _ in range(steps):
        last = out.logits[0, -1]
        top = torch.topk(last, 2).values
        token = int(last.argmax())
        tokens.append(token)
        margins.append(float(top[0] - top[1]))
        if restart_now(restart, prompt.shape[1] + len(tokens) - 1):  # as Phi-3's generate
            whole = np.concatenate([prompt[0], tokens])[None]
            out = hf_model(input_ids=torch.from_numpy(whole), use_cache=True)
            continue
        out = hf_model(
            input_ids=torch.tensor([[token]]), use_cache=True, **{cache_kw: output_cache(out)}
        )
    return tokens, margins
