"""A tiny real model exported once per test module: as imported (tied) and untied + cleaned."""

from __future__ import annotations

import collections
import copy
import dataclasses
from typing import Any

import onnx
import onnx_ir as ir
import pytest

from fdec.frontend.export import import_model
from fdec.frontend.source import resolve_source
from fdec.ir import FdecModel, ModelSpec
from fdec.passes.cleanup import (
    EliminateCommonSubexpressionsPass,
    FoldConstantsPass,
    RemoveDeadNodesPass,
    UntieEmbeddingsPass,
)
from fdec.pipeline import Pass, PassManager, PassRecord, StructureCheckInstrument
from fdec.verify import Reference

__all__ = [
    "TinyExport",
    "dump",
    "export_tiny",
    "load",
    "matmul_weights",
    "op_counts",
    "run_pass",
]


def load(data: bytes, spec: ModelSpec) -> FdecModel:
    return FdecModel(ir.serde.deserialize_model(onnx.load_from_string(data)), copy.deepcopy(spec))


def dump(model: FdecModel) -> bytes:
    return ir.serde.serialize_model(model.model).SerializeToString()


def matmul_weights(model: FdecModel) -> dict[str, Any]:
    """Role → a copy of the model's fp32 weight as MatMul reads it ([K, N]), embedding aside."""
    return {
        role: model.graph.initializers[name].const_value.numpy().copy()
        for role, name in model.spec.weights.items()
        if role != "embed"
    }


@dataclasses.dataclass
class TinyExport:
    """Serialized copies (each test gets a fresh model), the PyTorch reference and source."""

    tied_proto: bytes
    tied_spec: ModelSpec
    proto: bytes
    spec: ModelSpec
    reference: Reference
    tokenizer: Any
    hf_model: Any

    def tied(self) -> FdecModel:
        return load(self.tied_proto, self.tied_spec)

    def cleaned(self) -> FdecModel:
        return load(self.proto, self.spec)

    def weights(self) -> dict[str, Any]:
        return matmul_weights(self.cleaned())


def export_tiny(tiny_models, tmp_path_factory, family: str) -> TinyExport:
    """Import `family`'s tiny model, then untie + fold + cse + remove dead nodes."""
    cache = tmp_path_factory.mktemp(f"cache-{family}")
    with pytest.MonkeyPatch.context() as patch:  # module scope: the autouse fixture is not up
        patch.setenv("FDEC_CACHE_DIR", str(cache / "fdec"))
        patch.setenv("XDG_CACHE_HOME", str(cache))
        patch.setenv("HF_HUB_OFFLINE", "1")
        imported = import_model(resolve_source(str(tiny_models(family))))
        model = imported.fdec_model
        reference = Reference.from_hf(
            imported.hf_model, "decoder", imported.tokenizer, model.spec.vocab_size
        )
        tied_proto, tied_spec = dump(model), copy.deepcopy(model.spec)
        cleanup = [
            UntieEmbeddingsPass(),
            FoldConstantsPass(),
            EliminateCommonSubexpressionsPass(),
            RemoveDeadNodesPass(),
        ]
        model, _ = PassManager(cleanup).run(model)
    return TinyExport(
        tied_proto, tied_spec, dump(model), copy.deepcopy(model.spec), reference,
        imported.tokenizer, imported.hf_model,
    )  # fmt: skip


def run_pass(pass_: Pass, model: FdecModel) -> tuple[FdecModel, PassRecord]:
    """Run one pass under the PassManager with the full structure check (ONNX checker too)."""
    model, (record,) = PassManager([pass_], [StructureCheckInstrument(full=True)]).run(model)
    assert record.checks["structure"] == {"ok": True, "problems": []}
    return model, record


def op_counts(model: FdecModel) -> collections.Counter:
    return collections.Counter(
        (node.domain or "", node.op_type)
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
    )
