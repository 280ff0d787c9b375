"""Helpers for tests on tiny hand-written graphs: ONNX text → FdecModel, a minimal spec, ORT runs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_ir as ir
import onnxruntime as ort

from fdec.ir import ModelSpec

__all__ = ["ir_model", "random_array", "run_ort", "tiny_spec"]


def tiny_spec(**overrides) -> ModelSpec:
    """A minimal, self-consistent llama decoder spec; tests override what their graph needs."""
    fields = dict(
        family="llama",
        architecture="LlamaForCausalLM",
        kind="decoder",
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=2,
        hidden_size=4,
        intermediate_size=8,
        vocab_size=8,
        max_positions=16,
        tie_word_embeddings=False,
        weights={},
        inputs=["x"],
        outputs=["y"],
    )
    fields.update(overrides)
    return ModelSpec(**fields)


def ir_model(text: str, initializers: dict[str, np.ndarray]) -> ir.Model:
    """An onnx-ir model from ONNX text plus named numpy initializers (checked by onnx first)."""
    proto = onnx.parser.parse_model(text)
    for name, array in initializers.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def random_array(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def run_ort(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of `model` in a CPU ONNX Runtime session (in memory)."""
    data = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)
