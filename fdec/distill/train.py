"""The trainer: the student against the teacher's logits (KL at T, × T²) plus hidden-state MSE on mapped layers."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

from fdec.distill.recipe import Recipe
from fdec.errors import CompileError, InputError

__all__ = ["default_threads", "held_figures", "model_dims", "train", "train_tokens"]


def model_dims(config: dict[str, Any]) -> tuple[int | None, int | None, int | None, int | None]:
    """(layers, hidden size, vocab size, max positions) of an HF config, Llama or GPT-2 names."""
    config = config.get("text_config") or config

    def first(*names: str) -> int | None:
        for name in names:
            if isinstance(config.get(name), int):
                return config[name]
        return None

    return (
        first("num_hidden_layers", "n_layer"),
        first("hidden_size", "n_embd"),
        first("vocab_size"),
        first("max_position_embeddings", "n_positions"),
    )


def _decoder_layers(model: Any, count: int) -> Any:
    """The ModuleList of decoder layers (model.layers for Llama, transformer.h for GPT-2)."""
    import torch

    for module in model.base_model.children():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise InputError(
        f"cannot find the {count} decoder layers of {type(model).__name__}",
        "set the hidden_mse weight to 0 for this architecture",
    )


class _LayerOutputs:
    """Forward hooks keeping each mapped decoder layer's output (the residual stream)."""

    def __init__(self, model: Any, count: int, indices: list[int]):
        self.outputs: dict[int, Any] = {}
        layers = _decoder_layers(model, count)
        self._handles = [layers[i].register_forward_hook(self._keep(i)) for i in indices]

    def _keep(self, index: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            self.outputs[index] = output[0] if isinstance(output, tuple) else output

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _kl(teacher_logits: Any, student_logits: Any, temperature: float) -> Any:
    """KL(teacher ‖ student) per token at `temperature`, averaged, times T² (Hinton et al.)."""
    import torch.nn.functional as F

    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


def held_figures(model: Any, ids: Any, teacher_logits: Any) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[0, :-1], ids[0, 1:])
        kl = _kl(teacher_logits, logits, 1.0)
    return {"perplexity": float(torch.exp(nll)), "kl_to_teacher": float(kl)}


def train_tokens(texts: list[str], tokenizer: Any, vocab: int) -> list[int]:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return [i for i in ids if 0 <= i < vocab]


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over the first 10 % of steps, then cosine decay to 10 % of the rate."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    done = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def train(
    s_model: Any,
    t_model: Any,
    s_source: Any,
    t_source: Any,
    recipe: Recipe,
    ids: list[int],
    steps: int,
    say: Callable[[str], None],
) -> list[dict[str, float]]:
    """AdamW on the student: KL on logits at T (× T²) + normalized MSE on mapped layers."""
    import numpy as np
    import torch

    tokens = torch.tensor(ids, dtype=torch.long)
    rng = np.random.default_rng(recipe.seed)
    s_model.train()
    optimizer = torch.optim.AdamW(
        [p for p in s_model.parameters() if p.requires_grad],
        lr=recipe.lr,
        weight_decay=recipe.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps))
    use_mse = recipe.hidden_mse_weight > 0
    pairs = sorted(recipe.layer_map.items())
    hooks: list[_LayerOutputs] = []
    if use_mse:
        hooks = [
            _LayerOutputs(s_model, model_dims(s_source.config)[0], [s for s, _ in pairs]),
            _LayerOutputs(t_model, model_dims(t_source.config)[0], sorted({t for _, t in pairs})),
        ]
    every = max(1, steps // 20)
    losses: list[dict[str, float]] = []
    started = time.perf_counter()
    try:
        for step in range(steps):
            starts = rng.integers(0, len(ids) - recipe.seq_len + 1, size=recipe.batch_size)
            batch = torch.stack([tokens[int(s) : int(s) + recipe.seq_len] for s in starts])
            with torch.no_grad():
                t_logits = t_model(input_ids=batch, use_cache=False).logits
            s_logits = s_model(input_ids=batch, use_cache=False).logits
            kl = _kl(t_logits, s_logits, recipe.temperature)
            loss = recipe.logit_kl_weight * kl
            mse = torch.zeros(())
            if use_mse:
                s_out, t_out = hooks[0].outputs, hooks[1].outputs
                parts = []
                for s_layer, t_layer in pairs:
                    target = t_out[t_layer].detach()
                    parts.append(
                        (s_out[s_layer] - target).pow(2).mean()
                        / target.pow(2).mean().clamp_min(1e-8)
                    )
                mse = torch.stack(parts).mean()
                loss = loss + recipe.hidden_mse_weight * mse
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(s_model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            row = {"loss": loss.item(), "kl": kl.item(), "mse": mse.item()}
            if not all(math.isfinite(v) for v in row.values()):
                raise CompileError(
                    f"distillation diverged at step {step + 1} (loss {row['loss']})",
                    "lower the learning rate (--lr)",
                )
            losses.append(row)
            if step == 0 or (step + 1) % every == 0 or step + 1 == steps:
                rate = (time.perf_counter() - started) / (step + 1)
                extra = f", mse {row['mse']:.4f}" if use_mse else ""
                say(
                    f"step {step + 1}/{steps}: loss {row['loss']:.4f} (kl {row['kl']:.4f}{extra}), "
                    f"lr {schedule.get_last_lr()[0]:.2e}, {rate:.2f} s/step, "
                    f"~{rate * (steps - step - 1):.0f} s left"
                )
    finally:
        for hook in hooks:
            hook.close()
    return losses
