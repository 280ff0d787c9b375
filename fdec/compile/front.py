"""The front of a compile: source model → ONNX export, PyTorch reference, cached pass results.

`Front` is everything before lowering that fdec's cache (fdec.cache) can serve: the export
(ONNX + ModelSpec), the PyTorch reference outputs, and each pass's output model and record.
The PyTorch model loads only when the export or the reference must be computed.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import time
from collections.abc import Callable
from typing import Any

from fdec.cache import Cache, digest_of, fingerprint, source_inputs, tool_versions
from fdec.compile.footprint import check_footprint, streams_by_default
from fdec.frontend.export import import_model, load_hf_model, load_tokenizer
from fdec.frontend.source import default_cache_dir
from fdec.frontend.stream import (
    STREAM_PARAMETERS,
    checkpoint_parameters,
    import_streamed,
    streamed_reference_model,
)
from fdec.ir import FdecModel, GraphCounts, ModelSpec, release_freed_memory
from fdec.lower import MODEL_FILE
from fdec.pipeline import Instrument, PassRecord
from fdec.verify import GREEDY_STEPS, Reference

__all__ = ["STREAMED_GREEDY_STEPS", "FreshNamesInstrument", "Front"]

STREAMED_GREEDY_STEPS = 2  # greedy steps of the reference above STREAM_PARAMETERS


def _record_from_dict(data: dict[str, Any]) -> PassRecord:
    data = dict(data)
    for side in ("before", "after"):
        if data.get(side) is not None:
            data[side] = GraphCounts(**data[side])
    return PassRecord(**data)


class Front:
    """Everything before lowering that fdec's cache can serve: the export (ONNX + ModelSpec),
    the PyTorch reference outputs, and each pass's output model and record.

    Pass keys form a chain: key_i = digest(key_{i-1}, pass name, options, calibration text
    digest for calibrating passes, versions), key_0 the export's, so a compile resumes from the
    longest cached prefix and a changed option re-runs that pass and the ones after it. A pass
    that did not modify the model stores only its record, pointing at the previous model. The
    PyTorch model is loaded only when the export or the reference must be computed.
    """

    def __init__(
        self, options: Any, source: Any, recipe: Any, progress: Any, *, settings: Any = None,
    ):  # fmt: skip
        self.options, self.source, self.recipe, self.progress = options, source, recipe, progress
        self.cache = Cache(
            options.cache_dir or default_cache_dir(), enabled=options.cache, progress=progress
        )
        self.parameters = checkpoint_parameters(source)
        self.memory, self.streamed = None, streams_by_default(self.parameters, options.stream)
        if settings is not None:  # refuses up front (exit 4) when memory or disk cannot fit
            self.memory, self.streamed = check_footprint(
                source, settings, parameters=self.parameters, progress=progress
            )
        # A streamed compile stores neither the export nor the passes' models: each entry
        # would copy every weight (an 8B model: 32 GB in fp32) and load them back into memory.
        self.pass_caching = (
            options.cache and not options.verify_each and not options.dump_dir and not self.streamed
        )
        self.versions = tool_versions()
        self.inputs = source_inputs(source, self.cache.index)
        self.calibration = _calibration_inputs(options.calibration, recipe.calibration_texts)
        loading = {"trust_remote_code": options.trust_remote_code, "kind": source.family.kind}
        self.export_key = digest_of(
            "export", inputs=self.inputs, family=source.family.name, loading=loading,
            versions=self.versions,
        )  # fmt: skip
        # Above the streaming threshold the reference decodes fewer greedy steps: each step
        # streams every layer's weights from the checkpoint.
        self.greedy_steps = (
            STREAMED_GREEDY_STEPS
            if self.streamed and self.parameters > STREAM_PARAMETERS
            else GREEDY_STEPS
        )
        self.reference_key = digest_of(
            "reference", inputs=self.inputs, loading=loading, versions=self.versions,
            greedy_steps=self.greedy_steps,
        )  # fmt: skip
        self.pass_keys: list[str] = []
        previous = self.export_key
        for index, pass_ in enumerate(recipe.pipeline):
            previous = digest_of(
                "pass",
                previous=previous,
                name=pass_.name,
                cls=f"{type(pass_).__module__}.{type(pass_).__qualname__}",
                options=fingerprint(pass_),
                calibration=self.calibration["sha256"] if index in recipe.calibrating else None,
                versions=self.versions,
            )
            self.pass_keys.append(previous)
        self._hf_model: Any = None
        self._tokenizer: Any = _UNSET
        self.export_info: dict[str, Any] = {"exporter": "torch.onnx (dynamo)"}
        if self.streamed:
            self.export_info["streamed"] = True
        self.reference_cached = False
        self.resumed = 0  # passes taken from the cache
        self.model_key: str | None = None  # the model entry holding the current model

    # --- lazily loaded source pieces ---

    def hf_model(self) -> Any:
        """The source model in PyTorch; when streaming, one holding a layer at a time."""
        if self._hf_model is None:
            trust = self.options.trust_remote_code
            if self.streamed:
                self.progress(f"opening {self.source.given} layer by layer (streamed)")
                self._hf_model = streamed_reference_model(self.source, trust_remote_code=trust)
            else:
                self.progress(f"loading {self.source.given} with PyTorch")
                self._hf_model = load_hf_model(self.source, trust_remote_code=trust)
        return self._hf_model

    def release_hf_model(self) -> None:
        """Drop the PyTorch model once the export and the reference exist: nothing later needs
        it, and the ONNX Runtime session that verifies the build would otherwise open while
        PyTorch's copy of the weights is still held (measured: peak RSS 2.18x fp32 on a
        1.1B-parameter model, the peak at that session's load)."""
        if self._hf_model is not None:
            self._hf_model = None
            release_freed_memory()

    def tokenizer(self) -> Any:
        if self._tokenizer is _UNSET:
            self._tokenizer = (
                load_tokenizer(self.source.folder) if self.source.has_tokenizer else None
            )
        return self._tokenizer

    # --- model entries ---

    def load_model(self, key: str | None) -> FdecModel | None:
        """The model stored under `key` (checked, read into memory), or None."""
        if key is None:
            return None
        entry = self.cache.get(key, "model")
        if entry is None:
            return None
        import onnx_ir as ir

        model = ir.load(entry.path / MODEL_FILE)
        # In memory: the entry may be evicted by another compile while this one runs.
        ir.external_data.load_to_model(model)
        spec = ModelSpec.from_dict(json.loads((entry.path / _SPEC_FILE).read_text()))
        return FdecModel(model, spec)

    def store_model(self, key: str, model: FdecModel, meta: dict[str, Any] | None = None) -> bool:
        def write(folder: pathlib.Path) -> None:
            model.save(folder / MODEL_FILE)
            # Not sorted: passes walk the spec's roles in order, so the order is part of it.
            (folder / _SPEC_FILE).write_text(json.dumps(model.spec.to_dict()))

        return self.cache.put(key, "model", write, meta)

    # --- the three cached steps ---

    def export(self) -> FdecModel:
        started = time.perf_counter()
        model = None if self.streamed else self.load_model(self.export_key)
        if model is not None:
            self.progress("ONNX export taken from the cache")
            self.export_info.update(cached=True, wall_s=round(time.perf_counter() - started, 2))
            self.model_key = self.export_key
            return model
        if self.streamed:
            self.progress(
                "exporting to ONNX without weights (initializers bound to the checkpoint)"
            )
            imported = import_streamed(
                self.source, trust_remote_code=self.options.trust_remote_code
            )
            self.export_info.update(cached=False, wall_s=round(time.perf_counter() - started, 2))
            return imported.fdec_model
        hf_model = self.hf_model()
        self.progress("exporting to ONNX (torch.onnx dynamo exporter)")
        started = time.perf_counter()
        imported = import_model(self.source, hf_model=hf_model)
        self.export_info.update(cached=False, wall_s=round(time.perf_counter() - started, 2))
        if self._tokenizer is _UNSET:
            self._tokenizer = imported.tokenizer
        if self.store_model(self.export_key, imported.fdec_model):
            self.model_key = self.export_key
        return imported.fdec_model

    def reference(self, spec: Any) -> Reference:
        entry = self.cache.get(self.reference_key, "reference")
        if entry is not None:
            self.progress("PyTorch reference outputs taken from the cache")
            self.reference_cached = True
            return Reference.load(entry.path / _REFERENCE_FILE)
        self.progress("computing the reference outputs with PyTorch")
        reference = Reference.from_hf(
            self.hf_model(), spec.kind, self.tokenizer(), spec.vocab_size,
            greedy_steps=self.greedy_steps,
        )  # fmt: skip
        self.cache.put(
            self.reference_key, "reference", lambda folder: reference.save(folder / _REFERENCE_FILE)
        )
        return reference

    def resume(self) -> tuple[FdecModel | None, list[PassRecord]]:
        """The model after the longest cached prefix of the pipeline and that prefix's records
        (None, [] when no pass is cached)."""
        if not self.pass_caching:
            return None, []
        present = 0
        while present < len(self.pass_keys) and self.cache.exists(self.pass_keys[present]):
            present += 1
        while present > 0:
            entries = []
            for key in self.pass_keys[:present]:
                entry = self.cache.get(key, "pass")
                if entry is None:
                    break
                entries.append(entry)
            if len(entries) < present:  # a damaged record: resume before it
                present = len(entries)
                continue
            model = self.load_model(entries[-1].meta.get("model"))
            if model is None:
                present -= 1
                continue
            records = [
                _record_from_dict(json.loads((e.path / _RECORD_FILE).read_text())) for e in entries
            ]
            self.resumed, self.model_key = present, entries[-1].meta["model"]
            self.export_info.update(cached=True, wall_s=0.0)  # the chain starts from it
            self._entries = entries
            return model, records
        return None, []

    def input_model_of(self, index: int) -> Callable[[], FdecModel | None]:
        """A loader of the model entering pass `index` (0-based) of a resumed prefix."""
        key = self._entries[index - 1].meta.get("model") if index else self.export_key
        return lambda: self.load_model(key)

    def instrument(self) -> Any:
        """An instrument storing each pass's output (when modified) and record as it runs."""
        return _StoreInstrument(self) if self.pass_caching else None

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.cache.to_dict(),
            "export": bool(self.export_info.get("cached")),
            "reference": self.reference_cached,
            "passes_cached": self.resumed,
            "passes": len(self.pass_keys),
            "pass_caching": self.pass_caching,
            "streamed": self.streamed,
            "reference_greedy_steps": self.greedy_steps,
            "predicted_peak_rss_bytes": self.memory.peak_bytes if self.memory else None,
        }


class FreshNamesInstrument(Instrument):
    """Resets the graph's name authority before each pass to what loading the saved model
    gives (onnx-ir numbers new nodes and values from counters that remember every name the
    graph ever had; a reloaded graph starts them at 0 and knows only its current names).
    Without it a pass run on a model from the cache names its new nodes differently from the
    same pass run on the in-memory model, and the build's bytes would depend on the cache."""

    def before(self, pass_: Any, model: FdecModel, record: PassRecord) -> None:
        from onnx_ir._name_authority import NameAuthority  # no public way to reset it

        graph = model.graph
        if not hasattr(graph, "_name_authority"):
            return
        authority = NameAuthority()
        for value in [*graph.inputs, *graph.initializers.values()]:
            authority.register_or_name_value(value)
        for node in graph:
            authority.register_or_name_node(node)
            for value in node.outputs:
                authority.register_or_name_value(value)
        graph._name_authority = authority


class _StoreInstrument(Instrument):
    """Stores a pass's output model (only when it modified it) and its record in the cache."""

    def __init__(self, front: Front):
        self.front = front

    def after(self, pass_: Any, result: Any, record: PassRecord) -> None:
        front = self.front
        key = front.pass_keys[front.resumed + record.index - 1]
        if result.modified:
            model_key = digest_of("model", pass_key=key)
            front.model_key = model_key if front.store_model(model_key, result.model) else None
        if front.model_key is None:
            return  # nothing to resume from: the record alone would be of no use
        data = {**record.to_dict(), "index": front.resumed + record.index}
        front.cache.put(
            key,
            "pass",
            lambda folder: (folder / _RECORD_FILE).write_text(json.dumps(data, sort_keys=True)),
            {"model": front.model_key},
        )


def _calibration_inputs(path: pathlib.Path | None, texts: list[str] | None) -> dict[str, Any]:
    """What the calibration data is, for keys and the manifest: the file (or the built-in
    corpus) and a sha256 of the texts read from it (None when nothing calibrates)."""
    if texts is None:
        return {"source": None, "sha256": None}
    digest = hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()
    return {"source": str(path) if path else "built-in corpus", "sha256": digest}


_UNSET = object()
_SPEC_FILE = "spec.json"
_RECORD_FILE = "record.json"
_REFERENCE_FILE = "reference.npz"
