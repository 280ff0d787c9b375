"""ModelSpec: the semantic map of a model (family, sizes, which weight plays which role, KV-cache I/O)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import onnx_ir as ir

__all__ = ["WEIGHT_ROLES", "ModelSpec"]

# Linear layers' roles. Per-layer roles are keyed "layers.{i}.{role}" (gate_up: Phi-3's packed
# gate and up projections).
WEIGHT_ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "fc_in", "fc_out")
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(\w+)$")


@dataclasses.dataclass
class ModelSpec:
    """What import learned from the HF config and export; every pass keeps it true.

    `weights` maps a role ("embed", "lm_head", "layers.3.q", ...) to the name of the graph
    initializer holding it. Tied embeddings share one initializer for "embed" and "lm_head".
    """

    family: str
    architecture: str
    kind: str  # "decoder" | "encoder"
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    tie_word_embeddings: bool
    weights: dict[str, str] = dataclasses.field(default_factory=dict)
    task: str = ""  # HF task, as optimum's TasksManager names it ("text-generation", ...)
    inputs: list[str] = dataclasses.field(default_factory=list)
    outputs: list[str] = dataclasses.field(default_factory=list)
    # Positions after which generation recomputes the KV cache once (0: never); a longrope
    # Phi-3's original ones (fdec.frontend.families.rotary_restart).
    rotary_restart: int = 0

    @property
    def is_decoder(self) -> bool:
        return self.kind == "decoder"

    @property
    def past_inputs(self) -> list[tuple[str, str]]:
        """(key, value) input names of the KV cache, one pair per layer."""
        if not self.is_decoder:
            return []
        return [
            (f"past_key_values.{i}.key", f"past_key_values.{i}.value")
            for i in range(self.num_layers)
        ]

    def roles_of(self, initializer: str) -> list[str]:
        return [role for role, name in self.weights.items() if name == initializer]

    def rename_weight(self, old: str, new: str) -> int:
        """Point every role held by initializer `old` at `new`; returns how many changed."""
        changed = 0
        for role, name in self.weights.items():
            if name == old:
                self.weights[role] = new
                changed += 1
        return changed

    def problems(self, model: ir.Model) -> list[str]:
        """Ways in which this spec no longer describes `model` (empty when it is true)."""
        found: list[str] = []
        graph = model.graph
        initializers = graph.initializers
        for role, name in sorted(self.weights.items()):
            if name not in initializers:
                found.append(f"weight {role!r} names initializer {name!r}, which is gone")
            match = _LAYER_KEY.match(role)
            if match and not 0 <= int(match.group(1)) < self.num_layers:
                found.append(f"weight {role!r} is outside the model's {self.num_layers} layers")
        graph_inputs = {value.name for value in graph.inputs}
        graph_outputs = {value.name for value in graph.outputs}
        for name in self.inputs:
            if name not in graph_inputs:
                found.append(f"input {name!r} is missing from the graph")
        for name in self.outputs:
            if name not in graph_outputs:
                found.append(f"output {name!r} is missing from the graph")
        if self.tie_word_embeddings and self.weights.get("embed") != self.weights.get("lm_head"):
            found.append("spec says embeddings are tied but embed and lm_head differ")
        if self.num_heads % max(self.num_kv_heads, 1):
            found.append(f"{self.num_heads} heads do not group into {self.num_kv_heads} KV heads")
        return found

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(**data)
