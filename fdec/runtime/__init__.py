"""Running builds: ONNX Runtime sessions and the generation loop with a KV cache."""

from fdec.runtime.generate import GenerationResult, KvPolicy, Sampling, generate
from fdec.runtime.session import OrtModel, open_session, session_for_model

__all__ = [
    "GenerationResult",
    "KvPolicy",
    "OrtModel",
    "Sampling",
    "generate",
    "open_session",
    "session_for_model",
]
