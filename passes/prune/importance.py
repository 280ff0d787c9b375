"""Importance: per query head, MLP channel and layer, measured on calibration batches in ONNX Runtime."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from fdec.calibrate import activations_per_batch
from fdec.errors import CompileError
from fdec.ir import FdecModel
from fdec.passes.prune.coupling import weight_sites

__all__ = ["Importance", "measure_importance", "residuals"]


@dataclasses.dataclass
class Importance:
    """Scores from calibration data (higher = more important)."""

    heads: np.ndarray  # [layers, query heads]
    channels: np.ndarray  # [layers, intermediate]
    layers: np.ndarray  # [layers]
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "layers": [round(float(x), 6) for x in self.layers],
            "heads": [[round(float(x), 5) for x in row] for row in self.heads],
            "channels_summary": [
                {"min": float(row.min()), "median": float(np.median(row)), "max": float(row.max())}
                for row in self.channels
            ],
        }


def residuals(
    model: FdecModel, weights: Mapping[str, Any], layer: int
) -> tuple[ir.Value, ir.Value]:
    """(x_in, x_out): the residual stream entering and leaving `layer`.

    x_mid = Add(x_in, o(...)) and x_out = Add(x_mid, down(...)) in a pre-norm block."""

    def residual_add(role: str) -> tuple[ir.Node, ir.Value]:
        out = weights[role].sites[0].node.outputs[0]
        users = [use.node for use in out.uses()]
        if len(users) != 1 or users[0].op_type != "Add":
            raise CompileError(
                f"prune: {role}'s output is not added to the residual stream "
                f"(read by {[u.op_type for u in users]})",
                "layer pruning supports pre-norm llama-style blocks",
            )
        add = users[0]
        other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        return add, other

    attention_add, x_in = residual_add(f"layers.{layer}.o")
    mlp_add, x_mid = residual_add(f"layers.{layer}.down")
    if x_mid is not attention_add.outputs[0]:
        raise CompileError(
            f"prune: layer {layer}'s MLP does not read the attention's residual output",
            "layer pruning supports sequential pre-norm blocks",
        )
    return x_in, mlp_add.outputs[0]


def measure_importance(
    model: FdecModel, batches: Sequence[np.ndarray], weights: Mapping[str, Any] | None = None
) -> Importance:
    """Head, channel and layer scores of `model` on `batches` (see the module docstring)."""
    weights = weights if weights is not None else weight_sites(model)
    spec = model.spec
    layers, heads, dim = spec.num_layers, spec.num_heads, spec.head_dim
    names: dict[str, str] = {}
    for layer in range(layers):
        names[f"{layer}.o"] = weights[f"layers.{layer}.o"].sites[0].activation.name
        names[f"{layer}.down"] = weights[f"layers.{layer}.down"].sites[0].activation.name
        x_in, x_out = residuals(model, weights, layer)
        names[f"{layer}.in"], names[f"{layer}.out"] = x_in.name, x_out.name
    head_scores = np.zeros((layers, heads))
    channel_scores = np.zeros((layers, spec.intermediate_size))
    layer_scores = np.zeros(layers)
    down_rows = [np.linalg.norm(weights[f"layers.{i}.down"].array, axis=1) for i in range(layers)]
    o_heads = [  # [heads, dim, hidden]: what each head's output is multiplied by
        weights[f"layers.{i}.o"].array.astype(np.float64).reshape(heads, dim, -1)
        for i in range(layers)
    ]
    tokens = 0
    for captured in activations_per_batch(model, batches, list(dict.fromkeys(names.values()))):
        count = None
        for layer in range(layers):
            attn = captured[names[f"{layer}.o"]].astype(np.float64)
            attn = attn.reshape(-1, heads, dim)
            count = attn.shape[0]
            written = np.einsum("thd,hdn->thn", attn, o_heads[layer])
            head_scores[layer] += np.linalg.norm(written, axis=2).sum(axis=0)
            act = captured[names[f"{layer}.down"]].astype(np.float64).reshape(count, -1)
            channel_scores[layer] += np.abs(act).sum(axis=0) * down_rows[layer]
            x_in = captured[names[f"{layer}.in"]].astype(np.float64).reshape(count, -1)
            x_out = captured[names[f"{layer}.out"]].astype(np.float64).reshape(count, -1)
            cos = (x_in * x_out).sum(axis=1) / (
                np.linalg.norm(x_in, axis=1) * np.linalg.norm(x_out, axis=1) + 1e-12
            )
            layer_scores[layer] += (1.0 - cos).sum()
        tokens += count or 0
    if not tokens:
        raise CompileError("prune: calibration saw no tokens", "give non-empty calibration text")
    return Importance(head_scores / tokens, channel_scores / tokens, layer_scores / tokens, tokens)
