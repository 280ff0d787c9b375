"""Coupling: which projections a closing projection (o, down) reads from, found in the ONNX dataflow."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import networkx as nx
import onnx_ir as ir

from fdec.errors import CompileError
from fdec.ir import FdecModel
from fdec.passes.weights import find_weight

__all__ = ["LAYER_KEY", "Coupling", "coupled_groups", "weight_sites"]

_ATTENTION_OPENERS = ("q", "k", "v")
_MLP_OPENERS = ("gate", "up")
LAYER_KEY = re.compile(r"^layers\.(\d+)\.(\w+)$")


@dataclasses.dataclass(frozen=True)
class Coupling:
    """Weights cut together in one layer: the openers' output columns and the closer's rows."""

    layer: int
    kind: str  # "attention" | "mlp"
    openers: tuple[str, ...]  # roles, e.g. ("layers.3.q", "layers.3.k", "layers.3.v")
    closer: str  # role, e.g. "layers.3.o"


def weight_sites(model: FdecModel) -> dict[str, Any]:
    """Role → the weight found by quantize's finder (its MatMul sites, array, transposes)."""
    found = {}
    for role, name in model.spec.weights.items():
        match = LAYER_KEY.match(role)
        if not match:
            continue
        try:
            weight = find_weight(model.graph, name)
        except ValueError as reason:
            raise CompileError(
                f"prune: weight {role} ({name}) is not a plain float MatMul weight: {reason}",
                "run prune before quantization and fusion (first after cleanup)",
            ) from None
        if len(weight.sites) != 1:
            raise CompileError(
                f"prune: weight {role} is read by {len(weight.sites)} MatMuls, expected 1",
                "run prune before passes that share or pack weights",
            )
        found[role] = weight
    return found


def _dataflow(graph: ir.Graph) -> nx.DiGraph:
    flow = nx.DiGraph()
    for node in graph:
        flow.add_node(node)
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None:
                flow.add_edge(producer, node)
    return flow


def coupled_groups(model: FdecModel, weights: Mapping[str, Any] | None = None) -> list[Coupling]:
    """Each layer's attention and MLP couplings, found from the dataflow, checked against the
    roles the slicing rules expect; CompileError when the graph does not look like that."""
    weights = weights if weights is not None else weight_sites(model)
    flow = _dataflow(model.graph)
    node_role = {weight.sites[0].node: role for role, weight in weights.items()}
    couplings = []
    for layer in range(model.spec.num_layers):
        for kind, closer, expected in (
            ("attention", "o", _ATTENTION_OPENERS),
            ("mlp", "down", _MLP_OPENERS),
        ):
            closer_role = f"layers.{layer}.{closer}"
            if closer_role not in weights:
                raise CompileError(
                    f"prune: layer {layer} has no {closer} projection in the ModelSpec",
                    "prune supports llama-style families (q/k/v/o and gate/up/down weights)",
                )
            site = weights[closer_role].sites[0]
            above = _ancestors(flow, site.activation)
            inside = [node for node in above if node in node_role]
            below: set[ir.Node] = set()
            for node in inside:
                below |= _ancestors(flow, weights[node_role[node]].sites[0].activation)
            openers = sorted(node_role[node] for node in inside if node not in below)
            want = sorted(f"layers.{layer}.{role}" for role in expected)
            if openers != want:
                raise CompileError(
                    f"prune: layer {layer}'s {closer} projection is coupled to {openers}, "
                    f"not {want}",
                    "prune supports llama-style families (q/k/v/o and gate/up/down weights)",
                )
            couplings.append(Coupling(layer, kind, tuple(want), closer_role))
    return couplings


def _ancestors(flow: nx.DiGraph, value: ir.Value) -> set[ir.Node]:
    producer = value.producer()
    if producer is None:
        return set()
    return nx.ancestors(flow, producer) | {producer}
