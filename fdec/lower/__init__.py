"""Lowering: one module per backend turns the optimized graph into files that backend runs."""

from fdec.lower.onnxruntime import MODEL_FILE, RUNTIME_CONFIG, lower_onnxruntime, providers_for

__all__ = ["MODEL_FILE", "RUNTIME_CONFIG", "lower_onnxruntime", "providers_for"]
