"""ONNX Runtime sessions over fdec builds: I/O discovered from the graph, the KV cache as numpy arrays."""

from __future__ import annotations

import logging
import os
import pathlib
import tempfile
from typing import Any

import numpy as np

__all__ = ["OPT_LEVELS", "OrtModel", "open_session", "session_for_model"]

logger = logging.getLogger(__name__)

OPT_LEVELS = ("disable", "basic", "extended", "all")


def resolve_providers(
    requested: list[Any] | None, base: pathlib.Path | None = None
) -> tuple[list[str], list[dict[str, str]], list[str]]:
    """Split (name, options) pairs into ORT's two lists, keeping only providers this
    onnxruntime has; option values ending in `_path` are resolved against `base`.
    Returns (names, options, missing)."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    names: list[str] = []
    options: list[dict[str, str]] = []
    missing: list[str] = []
    for item in requested or ["CPUExecutionProvider"]:
        name, opts = (item, {}) if isinstance(item, str) else (item[0], dict(item[1]))
        if name not in available:
            missing.append(name)
            continue
        if base is not None:
            for key, value in opts.items():
                if key.endswith("_path") and not os.path.isabs(value):
                    opts[key] = str(base / value)
        names.append(name)
        options.append({k: str(v) for k, v in opts.items()})
    if "CPUExecutionProvider" not in names:
        names.append("CPUExecutionProvider")
        options.append({})
    return names, options, missing


def open_session(
    path: str | os.PathLike,
    *,
    providers: list[Any] | None = None,
    optimization: str = "all",
    threads: int = 0,
) -> Any:
    """An InferenceSession; `providers` are names or (name, options) pairs, best first."""
    import onnxruntime as ort

    names, provider_options, missing = resolve_providers(providers, pathlib.Path(path).parent)
    if missing:
        logger.info("providers not in this onnxruntime: %s", ", ".join(missing))

    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(
        str(path), sess_options=options, providers=names, provider_options=provider_options
    )


_NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


class OrtModel:
    """A model in an ONNX Runtime session, with helpers for decoder KV-cache I/O.

    The layout of the cache (layers, KV heads, head dim, dtype) is read from the graph's
    `past_key_values.{i}.key` inputs, so any build with ecosystem I/O names runs.
    """

    def __init__(self, session: Any):
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self._inputs = {i.name: i for i in session.get_inputs()}
        layers = 0
        while f"past_key_values.{layers}.key" in self._inputs:
            layers += 1
        self.num_layers = layers
        self.is_decoder = "logits" in self.output_names
        if layers:
            past = self._inputs["past_key_values.0.key"]
            self.kv_heads = past.shape[1] if isinstance(past.shape[1], int) else None
            self.head_dim = past.shape[3] if isinstance(past.shape[3], int) else None
            self.kv_dtype = _NP_TYPES.get(past.type, np.float32)

    @property
    def providers(self) -> list[str]:
        """The providers the session really got (onnxruntime-gpu falls back silently)."""
        return list(self.session.get_providers())

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=self.kv_dtype) for _ in range(2 * self.num_layers)]

    def decode(
        self, input_ids: np.ndarray, past: list[np.ndarray], past_length: int
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder step: logits for `input_ids` given `past_length` cached positions."""
        batch, seq = input_ids.shape
        feeds: dict[str, np.ndarray] = {
            "input_ids": input_ids.astype(np.int64, copy=False),
            "attention_mask": np.ones((batch, past_length + seq), dtype=np.int64),
        }
        if "position_ids" in self._inputs:
            positions = np.arange(past_length, past_length + seq, dtype=np.int64)
            feeds["position_ids"] = np.broadcast_to(positions, (batch, seq)).copy()
        for i in range(self.num_layers):
            feeds[f"past_key_values.{i}.key"] = past[2 * i]
            feeds[f"past_key_values.{i}.value"] = past[2 * i + 1]
        outputs = self.session.run(None, feeds)
        named = dict(zip(self.output_names, outputs))
        present = [
            named[f"present.{i}.{kv}"] for i in range(self.num_layers) for kv in ("key", "value")
        ]
        return named["logits"], present

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> dict:
        batch, seq = input_ids.shape
        feeds = {
            "input_ids": input_ids.astype(np.int64, copy=False),
            "attention_mask": (
                attention_mask if attention_mask is not None else np.ones((batch, seq), np.int64)
            ),
        }
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros((batch, seq), dtype=np.int64)
        return dict(zip(self.output_names, self.session.run(None, feeds)))


def session_for_model(model: Any, *, optimization: str = "all") -> OrtModel:
    """An ORT session on an in-memory FdecModel (saved to a temporary folder first)."""
    with tempfile.TemporaryDirectory(prefix="fdec-check-") as folder:
        path = pathlib.Path(folder) / "model.onnx"
        model.save(path)
        # ORT reads the external data while creating the session; the files can go after.
        return OrtModel(open_session(path, optimization=optimization))
