"""Calibration layer by layer on the streamed PyTorch model: what calibrating passes need, with one decoder layer's weights in memory at a time.

A streamed compile (fdec.frontend.stream) never holds the float model, so calibration cannot
run it whole in ONNX Runtime (fdec.calibrate.ActivationRunner). Instead, as sequential
calibration pipelines do (llm-compressor, AutoAWQ), the calibration tokens go through the
model one layer at a time:

1. the embeddings run on every batch and the first layer's inputs are captured (its call is
   stopped there);
2. for each layer: its weights are read from the checkpoint, it runs on every batch's hidden
   states while hooks on its `nn.Linear` modules record their inputs, its outputs become the
   next layer's inputs, and its weights are dropped;
3. the final norm and the head run on the last hidden states (the head's input recorded).

What is recorded per Linear input, batch by batch in the order ONNX Runtime calibration sees
them (so the figures are the same up to PyTorch vs ONNX Runtime float rounding):
`ActivationStats` (fdec.calibrate), and on request AWQ's sampled rows and per-channel mean |x|
(fdec.passes.quantize_awq), SmoothQuant's first rows (fdec.passes.smoothquant.capture_rows),
or XᵀX (float64, GPTQ: fdec.passes.gptq.hessians; spilled to disk layer by layer).

Each ONNX activation is mapped to the Linear whose weight the MatMul reading it multiplies:
the initializer's name is the parameter's (or a tied alias's, fdec.frontend.export
.parameter_aliases), so `LayerwiseCalibration` answers the calibration functions' requests
(model, tensor names) while it is active (`fdec.calibrate.calibration_source`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import resource
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from fdec.calibrate import ActivationStats, add_xtx
from fdec.errors import CompileError
from fdec.ir import FdecModel, release_freed_memory

__all__ = ["KINDS", "LayerwiseCalibration", "layerwise_kinds", "linear_activations"]

logger = logging.getLogger(__name__)

# What can be collected per Linear input: statistics, AWQ's sampled rows (with mean |x|),
# SmoothQuant's first rows, XᵀX in float64 (GPTQ) and in float32 (AWQ's GPTQ rounding).
KINDS = ("stats", "sampled", "first", "hessian", "gram")


class _Stop(Exception):
    """Raised by the hook that captures the first layer's inputs, ending that forward."""


@dataclasses.dataclass
class _Seen:
    """What calibration keeps of one Linear's input."""

    stats: ActivationStats | None = None
    abs_sum: np.ndarray | None = None
    sampled: list[np.ndarray] = dataclasses.field(default_factory=list)
    first: list[np.ndarray] = dataclasses.field(default_factory=list)
    first_taken: int = 0
    hessian: np.ndarray | None = None
    gram: np.ndarray | None = None


def layerwise_kinds(passes: list[Any]) -> tuple[str, ...]:
    """What layer-by-layer calibration collects in its first run for these calibrating passes
    (fdec.calibrate_layerwise.KINDS); anything else asked later costs another run."""
    from fdec.passes.quantize_awq import QuantizeInt4AwqPass
    from fdec.passes.quantize_fp8 import QuantizeFp8Pass
    from fdec.passes.quantize_static import QuantizeInt8StaticPass

    kinds: list[str] = []
    for pass_ in passes:
        if isinstance(pass_, QuantizeInt4AwqPass):
            kinds.append("sampled")
            if pass_.rounding == "gptq" and pass_.gptq_hessian == "all":
                kinds.append("gram")
            continue
        kinds.append("stats")
        if isinstance(pass_, QuantizeFp8Pass) and pass_.weight_rounding == "gptq":
            kinds.append("hessian")
        if isinstance(pass_, QuantizeInt8StaticPass) and (pass_.alpha_search or pass_.clip_search):
            kinds.append("first")
    return tuple(dict.fromkeys(kinds))


class _LayerHessians(Mapping):
    """XᵀX by activation name, computed by a pass over the layers that advances to the layer
    of the name asked and keeps only that layer's (asked out of layer order, it starts over)."""

    def __init__(self, calibration: LayerwiseCalibration, found: dict[str, _Seen]):
        self._calibration = calibration
        self._owner = {name: calibration._owners[name] for name in found}
        self._walk: Iterator[list[str]] | None = None
        self._current: list[str] = []
        self._done: set[str] = set()  # Linear modules whose layer has been passed

    def __getitem__(self, name: str) -> np.ndarray:
        owner = self._owner[name]
        seen = self._calibration._seen
        if owner not in self._current and owner in self._done:
            logger.info("XᵀX of %s asked out of layer order: running the layers again", name)
            self._walk, self._done = None, set()
        while owner not in self._current:
            for module in self._current:  # the previous layer's are no longer needed
                if module in seen:
                    seen[module].hessian = None
            self._done.update(self._current)
            if self._walk is None:
                # Only the asked activations' XᵀX: a layer's others (a W8A16 down_proj: 1.6 GB
                # for an 8B) would cost their memory and time for nothing.
                self._walk = self._calibration._walk(("hessian",), set(self._owner.values()))
            try:
                self._current = next(self._walk)
            except StopIteration:
                raise KeyError(name) from None
        found = seen[owner].hessian
        if found is None:
            raise KeyError(name)
        return found

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner)

    def __len__(self) -> int:
        return len(self._owner)


def linear_activations(model: FdecModel, weight_names: Mapping[str, str]) -> dict[str, str]:
    """ONNX activation name → the Linear (module name) whose weight the MatMul reading that
    activation multiplies. `weight_names` maps each initializer name a Linear's weight may have
    (its parameter name and tied aliases) to that Linear's module name."""
    from fdec.passes.weights import find_weight

    found: dict[str, str] = {}
    for name, module in weight_names.items():
        if name not in model.graph.initializers:
            continue
        try:
            weight = find_weight(model.graph, name, gathers=True)
        except ValueError as reason:
            logger.debug("%s: no MatMul site (%s)", name, reason)
            continue
        for site in weight.sites:
            if site.activation is not None and site.activation.name:
                found.setdefault(site.activation.name, module)
    return found


class LayerwiseCalibration:
    """Calibration of a streamed source over `batches`, one layer's weights at a time.

    `collect`: the KINDS gathered by the first run (a request for another kind runs the layers
    again for it). `sampled_rows`: how many evenly spaced rows AWQ keeps (its `max_rows`);
    `first_rows`: how many leading rows SmoothQuant's search keeps (its `search_rows`).
    Results are kept per Linear; requests name ONNX tensors of the model as a pass sees it.
    """

    def __init__(
        self,
        source: Any,
        batches: Sequence[np.ndarray],
        *,
        collect: Sequence[str] = ("stats",),
        sampled_rows: int = 512,
        first_rows: int = 512,
        trust_remote_code: bool = False,
    ):
        unknown = set(collect) - set(KINDS)
        if unknown:
            raise CompileError(
                f"layer-by-layer calibration cannot collect {sorted(unknown)}",
                f"collect any of {', '.join(KINDS)}",
            )
        self.source = source
        self.batches = [np.asarray(ids, dtype=np.int64) for ids in batches]
        self.collect = tuple(dict.fromkeys(collect))
        self.sampled_rows, self.first_rows = sampled_rows, first_rows
        self.trust_remote_code = trust_remote_code
        self._seen: dict[str, _Seen] = {}
        self._owner: dict[str, str] = {}  # Linear → the Linear that saw the same input first
        self._weights: dict[str, str] = {}  # initializer name → Linear module name
        self._head_module: str | None = None  # the output embedding's module (the lm_head role)
        self._collected: set[str] = set()
        self._owners: dict[str, str] = {}  # activation name → the Linear recording it
        self.enabled = True  # fdec.calibrate's functions consult it only while True
        self.runs: list[dict[str, Any]] = []  # one per pass over the layers: kinds, time, RSS

    # --- requests (fdec.calibrate.calibration_source routes the calibration functions here) ---

    def run(self, kinds: Sequence[str] | None = None) -> dict[str, Any]:
        """Collect `kinds` (default: `collect`) now, in one pass over the layers; its record."""
        self._run(tuple(kinds or self.collect))
        return self.runs[-1]

    def check_batches(self, batches: Sequence[np.ndarray]) -> None:
        given = [np.asarray(ids) for ids in batches]
        if len(given) != len(self.batches) or not all(
            a.shape == b.shape and np.array_equal(a, b) for a, b in zip(given, self.batches)
        ):
            raise CompileError(
                "a pass asked layer-by-layer calibration for other token batches than it ran",
                "give every calibrating pass the compile's calibration batches",
            )

    def stats(self, model: FdecModel, names: Sequence[str]) -> dict[str, ActivationStats]:
        """ActivationStats of the named activations (those a Linear reads)."""
        return {
            name: seen.stats
            for name, seen in self._resolve(model, names, "stats").items()
            if seen.stats is not None
        }

    def sampled(
        self, model: FdecModel, names: Sequence[str], max_rows: int, grams: bool = False
    ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """(mean |x| per channel over every token, the evenly spaced rows AWQ searches, XᵀX in
        float32 when `grams`) of each named activation."""
        if max_rows != self.sampled_rows:
            self.sampled_rows = max_rows
            self._collected.discard("sampled")
        kinds = ("sampled", "gram") if grams else ("sampled",)
        total = sum(ids.size for ids in self.batches)
        found = {}
        for name, seen in self._resolve(model, names, *kinds).items():
            if seen.abs_sum is None:
                continue
            rows = np.ascontiguousarray(np.concatenate(seen.sampled), dtype=np.float32)
            found[name] = (seen.abs_sum / total, rows, seen.gram if grams else None)
        return found

    def first(self, model: FdecModel, names: Sequence[str], max_rows: int) -> dict[str, np.ndarray]:
        """The first `max_rows` rows of each named activation (in batch order)."""
        if max_rows != self.first_rows:
            self.first_rows = max_rows
            self._collected.discard("first")
        return {
            name: np.concatenate(seen.first)[:max_rows]
            for name, seen in self._resolve(model, names, "first").items()
            if seen.first
        }

    def hessians(self, model: FdecModel, names: Sequence[str]) -> Mapping[str, np.ndarray]:
        """XᵀX (float64) of each named activation, computed when asked by another pass over
        the layers that holds one layer's at a time (all of an 8B Llama's: 66 GB)."""
        return _LayerHessians(self, self._resolve(model, names))

    def close(self) -> None:
        """Drop what calibration holds."""
        self._seen.clear()

    def _resolve(self, model: FdecModel, names: Sequence[str], *kinds: str) -> dict[str, _Seen]:
        missing = [kind for kind in kinds if kind not in self._collected]
        if missing:
            first = [kind for kind in self.collect if kind != "hessian"] if not self.runs else []
            self._run(tuple(dict.fromkeys([*first, *missing])))
        if not self._weights:
            from fdec.frontend.export import parameter_aliases
            from fdec.frontend.stream import skeleton_model

            skeleton = skeleton_model(self.source, trust_remote_code=self.trust_remote_code)
            self._names_from(skeleton, parameter_aliases(skeleton))
        weights = dict(self._weights)
        head = model.spec.weights.get("lm_head")
        if head is not None and self._head_module is not None:  # renamed by untie-embeddings
            weights.setdefault(head, self._head_module)
        by_activation = linear_activations(model, weights)
        found: dict[str, _Seen] = {}
        for name in dict.fromkeys(names):
            module = by_activation.get(name)
            if module is None:
                logger.info("layer-by-layer calibration: %s is read by no Linear", name)
                continue
            owner = self._owner.get(module, module)
            found[name] = self._seen.setdefault(owner, _Seen())
            self._owners[name] = owner
        return found

    # --- the pass over the layers ----------------------------------------------------------------

    def _run(self, kinds: Sequence[str]) -> None:
        """One pass over every layer collecting `kinds`."""
        for _ in self._walk(kinds):
            pass
        self._collected.update(kinds)

    def _walk(self, kinds: Sequence[str], only: set[str] | None = None) -> Iterator[list[str]]:
        """Run the layers one by one collecting `kinds` (for the Linear modules in `only`, when
        given); after each layer (and after the head) yields the Linear modules it saw."""
        import torch

        from fdec.frontend.stream import open_streamed

        started = time.perf_counter()
        kinds = tuple(kinds)
        for seen in self._seen.values():  # a new run replaces what these kinds hold
            _reset(seen, kinds)
        streamed = open_streamed(self.source, trust_remote_code=self.trust_remote_code)
        model, layers = streamed.model, streamed.layers
        self._names_from(model, streamed.aliases)
        counts = [int(ids.size) for ids in self.batches]
        total = sum(counts)
        chosen = (
            np.unique(np.linspace(0, total - 1, num=self.sampled_rows).round().astype(np.int64))
            if total > self.sampled_rows
            else np.arange(total)
        )
        recorder = _Recorder(self, model, kinds, chosen, counts, only)

        with torch.no_grad():
            inputs = self._first_layer_inputs(model, layers)
            streamed.unload_outside()  # the layers need only their own weights
            returned_tuple = False
            for number, layer in enumerate(layers):
                streamed.load(layer)
                handles = [
                    module.register_forward_pre_hook(recorder, with_kwargs=True)
                    for module in layer.modules()
                    if isinstance(module, torch.nn.Linear)
                ]
                recorder.observed = []
                try:
                    for batch, (args, kwargs) in enumerate(inputs):
                        with recorder.batch(batch):
                            out = layer(*args, **kwargs)
                        returned_tuple = isinstance(out, tuple)
                        hidden = out[0] if returned_tuple else out
                        inputs[batch] = _with_hidden(args, kwargs, hidden)
                finally:
                    for handle in handles:
                        handle.remove()
                    streamed.unload(layer)
                release_freed_memory()
                logger.debug("layer-by-layer calibration: layer %s done", number)
                yield recorder.observed
            recorder.observed = []
            streamed.load_outside()
            self._head(model, layers, inputs, returned_tuple, recorder)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.runs.append(
                {
                    "kinds": list(kinds),
                    "layers": len(layers),
                    "tokens": total,
                    "wall_s": round(time.perf_counter() - started, 2),
                    "process_peak_rss_bytes": int(peak),
                }
            )
            logger.info("layer-by-layer calibration: %s", self.runs[-1])
            yield recorder.observed

    def _names_from(self, model: Any, aliases: dict[str, list[str]]) -> None:
        self._weights = _linear_weight_names(model, aliases)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self._head_module = next((n for n, m in model.named_modules() if m is head), None)

    def _first_layer_inputs(self, model: Any, layers: Any) -> list[tuple[tuple, dict]]:
        """Each batch's (args, kwargs) of the first layer's call, from the embeddings."""
        import torch

        captured: list[tuple[tuple, dict]] = []

        def stop(_module: Any, args: tuple, kwargs: dict) -> None:
            captured.append((tuple(args), dict(kwargs)))
            raise _Stop

        handle = layers[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            for ids in self.batches:
                try:
                    model(input_ids=torch.from_numpy(ids), use_cache=False)
                except _Stop:
                    continue
                raise CompileError(
                    "layer-by-layer calibration: the model ran without calling its first layer",
                    "compile this model with --no-stream",
                )
        finally:
            handle.remove()
        return captured

    def _head(
        self, model: Any, layers: Any, inputs: list, returned_tuple: bool, recorder: _Recorder
    ) -> None:
        """Run what follows the layers (final norm, head) on the last hidden states, with the
        Linear modules outside the layers (the head) recorded: the layer list is swapped for
        one module replaying those hidden states."""
        import torch

        outside = [
            module
            for module in model.modules()
            if isinstance(module, torch.nn.Linear)
            and not any(module is m for m in layers.modules())
        ]
        if not outside:
            return
        parent_name, _, attribute = _name_of(model, layers).rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        hidden = [_hidden_of(args, kwargs) for args, kwargs in inputs]
        current = {"batch": 0}

        class _Replay(torch.nn.Module):
            def forward(self, *args: Any, **kwargs: Any) -> Any:
                out = hidden[current["batch"]]
                return (out,) if returned_tuple else out

        handles = [m.register_forward_pre_hook(recorder, with_kwargs=True) for m in outside]
        setattr(parent, attribute, torch.nn.ModuleList([_Replay()]))
        try:
            for batch, ids in enumerate(self.batches):
                current["batch"] = batch
                with recorder.batch(batch):
                    model(input_ids=torch.from_numpy(ids), use_cache=False)
        finally:
            setattr(parent, attribute, layers)
            for handle in handles:
                handle.remove()

    # --- accumulation ------------------------------------------------------------------------------

    def _observe(
        self, name: str, array: np.ndarray, kinds: Sequence[str], chosen: np.ndarray,
        start: int, count: int,
    ) -> None:  # fmt: skip
        seen = self._seen.setdefault(name, _Seen())
        flat = array.reshape(-1, array.shape[-1])
        if "stats" in kinds:
            if seen.stats is None:
                seen.stats = ActivationStats.of(array)
            else:
                seen.stats.update(array)
        if "sampled" in kinds:
            total = np.abs(flat).sum(axis=0, dtype=np.float64)
            seen.abs_sum = total if seen.abs_sum is None else seen.abs_sum + total
            local = chosen[(chosen >= start) & (chosen < start + count)] - start
            seen.sampled.append(np.asarray(flat[local], dtype=np.float32).copy())
        if "first" in kinds and seen.first_taken < self.first_rows:
            seen.first.append(np.asarray(flat, dtype=np.float32).copy())
            seen.first_taken += flat.shape[0]
        # Sums in place (an 8B down_proj's XᵀX is 1.6 GB in float64: `a + b` would hold three).
        if "gram" in kinds:
            gram = flat.T @ flat
            if seen.gram is None:
                seen.gram = gram
            else:
                seen.gram += gram
        if "hessian" in kinds:
            seen.hessian = add_xtx(seen.hessian, flat)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "layer by layer (PyTorch, streamed weights)",
            "batches": len(self.batches),
            "tokens": int(sum(ids.size for ids in self.batches)),
            "linear_inputs": len(self._seen),
            "runs": self.runs,
        }


class _Recorder:
    """The forward pre-hook on Linear modules: hands each input to `_observe` once per batch
    (q/k/v, gate/up read one tensor: the later ones are noted as sharing the first's)."""

    def __init__(
        self, calibration: LayerwiseCalibration, model: Any, kinds: Sequence[str],
        chosen: np.ndarray, counts: list[int], only: set[str] | None = None,
    ):  # fmt: skip
        self.calibration, self.kinds, self.chosen, self.counts = calibration, kinds, chosen, counts
        self.only = only
        self.names = {id(module): name for name, module in model.named_modules()}
        self.index = 0
        self.inputs: list[tuple[Any, str]] = []  # held for the call: ids stay unique
        self.observed: list[str] = []  # Linear modules recorded in the current layer

    @contextlib.contextmanager
    def batch(self, index: int) -> Iterator[None]:
        self.index, self.inputs = index, []
        try:
            yield
        finally:
            self.inputs = []

    def __call__(self, module: Any, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        name = self.names[id(module)]
        for other, owner in self.inputs:
            if other is x:
                self.calibration._owner[name] = owner
                return
        self.inputs.append((x, name))
        if name not in self.observed:
            self.observed.append(name)
        if self.only is not None and name not in self.only:
            return
        start = sum(self.counts[: self.index])
        self.calibration._observe(
            name, x.detach().numpy(), self.kinds, self.chosen, start, self.counts[self.index]
        )


# --- helpers -----------------------------------------------------------------------------------


def _reset(seen: _Seen, kinds: Sequence[str]) -> None:
    if "stats" in kinds:
        seen.stats = None
    if "sampled" in kinds:
        seen.abs_sum, seen.sampled = None, []
    if "first" in kinds:
        seen.first, seen.first_taken = [], 0
    if "gram" in kinds:
        seen.gram = None
    if "hessian" in kinds:
        seen.hessian = None


def _linear_weight_names(model: Any, aliases: dict[str, list[str]]) -> dict[str, str]:
    """Every name a Linear's weight may have as an initializer → that Linear's module name."""
    import torch

    names: dict[str, str] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            weight = f"{module_name}.weight"
            for name in [weight, *aliases.get(weight, [])]:
                names.setdefault(name, module_name)
    return names


def _name_of(model: Any, target: Any) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise CompileError(
        "layer-by-layer calibration cannot find the model's layer list",
        "compile this model with --no-stream",
    )


def _hidden_of(args: tuple, kwargs: dict) -> Any:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: Any) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}
