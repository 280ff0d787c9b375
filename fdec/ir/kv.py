"""Graph queries about the KV cache that passes and lowering both ask."""

from __future__ import annotations

from typing import Any

__all__ = ["shared_kv_layers"]


def shared_kv_layers(model: Any) -> list[int]:
    """Layers whose KV cache past and present can share one preallocated buffer.

    A layer qualifies when `present.{i}.key|value` are outputs 1 and 2 of one com.microsoft
    GroupQueryAttention reading `past_key_values.{i}.key|value` (graph inputs) as inputs 3 and
    4: ONNX Runtime's kernel then writes the new positions in place when past and present are
    bound to the same memory (its past_present_share_buffer mode, chosen by pointer equality).
    """
    graph = model.graph
    inputs = {value.name: value for value in graph.inputs}
    layers = []
    for value in graph.outputs:
        name = value.name or ""
        if not (name.startswith("present.") and name.endswith(".key")):
            continue
        index = name[len("present.") : -len(".key")]
        node = value.producer()
        if (
            node is None
            or node.op_type != "GroupQueryAttention"
            or node.domain != "com.microsoft"
            or len(node.outputs) < 3
            or len(node.inputs) < 5
            or node.outputs[1] is not value
            or node.outputs[2].name != f"present.{index}.value"
            or not node.outputs[2].is_graph_output()
        ):
            continue
        past_key = inputs.get(f"past_key_values.{index}.key")
        past_value = inputs.get(f"past_key_values.{index}.value")
        if past_key is None or node.inputs[3] is not past_key or node.inputs[4] is not past_value:
            continue
        layers.append(int(index))
    return sorted(layers)
