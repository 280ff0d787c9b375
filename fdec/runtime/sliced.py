"""Run a decoder build in slices of its layers, one ONNX Runtime session open at a time.

A session holds every weight of its graph (mapped or copied), so an 8B build's one session
needs its whole data file in memory next to everything else. `SlicedModel` cuts the build's
graph at layer boundaries instead: each node gets a *stage*, the largest layer index among the
weights it reads (ModelSpec roles `layers.N.*`, else an initializer name holding `layers.N.`)
and the KV-cache inputs it reads (`past_key_values.N.*`), and at least its producers' stage,
so every edge goes forward. Consecutive layers whose weights fit `max_slice_bytes` form a
slice (the embedding joins the first, the final norm and head the last). A slice's graph is
the build's own nodes and initializers (still pointing at the build's data file, nothing
copied) with the values crossing into it as inputs and the values later slices read as
outputs; ONNX Runtime opens it from memory with the build's folder as its external-data folder.

Decoding is sequential, but the tokens of every step are known in advance when verifying (the
held text; the source's greedy tokens, teacher-forced): `logits(phases)` runs each slice over
every phase (a chunk of tokens through the KV cache) before opening the next, keeping between
slices only the crossing values of each phase, so the whole build is read once and at most one
slice is in memory. Any recipe's build runs this way (int4, fp8 Q/DQ, fp32): nothing in it
depends on the graph's operators.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import re
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fdec.ir.model import SHAPE_ONLY_OPS
from fdec.runtime.check_forms import check_form, external_data_folder
from fdec.runtime.session import KV_POLICY_METADATA, open_session, require_onnxruntime

__all__ = [
    "DEFAULT_SLICE_BYTES",
    "WHOLE_SESSION_BYTES",
    "SlicedModel",
    "node_stages",
    "plan_slices",
    "resident_bytes",
    "too_large_for_one_session",
    "weight_bytes",
]

logger = logging.getLogger(__name__)

# A decoder build with more weight bytes than this is verified slice by slice
# (fdec.compile.gate): an 8B int4 build's one session took the compile past 7 GiB (issue 19).
WHOLE_SESSION_BYTES = 2 << 30
# Weight bytes per slice: an 8B int4 build (4.96 GB) opens as 5 sessions of ~1 GB, an 8B fp8
# build (~8 GB) as 8.
DEFAULT_SLICE_BYTES = 1 << 30
_LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")
_ONNX_FP8_E4M3FN = 17


def weight_bytes(model: str | pathlib.Path) -> int:
    """Bytes of a saved model's external weights (its .data files)."""
    model = pathlib.Path(model)
    return sum(path.stat().st_size for path in model.parent.glob(f"{model.name}*.data"))


def too_large_for_one_session(model: str | pathlib.Path, kind: str) -> bool:
    """Whether a saved `kind` ("decoder", "encoder") model is checked slice by slice: a decoder
    with more than `WHOLE_SESSION_BYTES` of weights."""
    return kind == "decoder" and weight_bytes(model) > WHOLE_SESSION_BYTES


def _layer_of_initializers(graph: Any, spec: Any) -> dict[str, int]:
    """Initializer name → the layer it belongs to (spec roles first, then names)."""
    layers: dict[str, int] = {}
    if spec is not None:
        for role, name in spec.weights.items():
            match = re.match(r"^layers\.(\d+)\.", role)
            if match:
                layers[name] = int(match.group(1))
    for name in graph.initializers:
        match = _LAYER_NAME.search(name)
        if match and name not in layers:
            layers[name] = int(match.group(1))
    return layers


def node_stages(graph: Any, spec: Any = None) -> list[int]:
    """Each node's stage (graph order): the largest layer of the weights and KV inputs it
    reads, at least its producers' (0 where it reads none). A Shape of a KV input does not
    count: exported graphs take the past length from one layer's cache (an unfused 8B Llama:
    layer 21's) for the mask every layer reads, which would put all of them in that slice;
    an earlier slice is fed a stand-in of the right shape (`_feeds`).

    A node that reads only weights (a DequantizeLinear of stored codes and the Casts after
    it) runs in the earliest stage that reads its output instead: in the first slice, an 8B
    lm_head's DequantizeLinear made a 2.1 GB fp32 table every slice then carried."""
    weight_layer = _layer_of_initializers(graph, spec)
    produced: dict[int, int] = {}  # id(value) → stage of its producer
    constant: set[int] = set()  # id(value) of outputs of nodes reading only weights
    nodes = list(graph)
    stages = []
    for node in nodes:
        stage = 0
        reads_data = False
        for value in node.inputs:
            if value is None:
                continue
            if id(value) in produced:
                stage = max(stage, produced[id(value)])
                reads_data |= id(value) not in constant
            elif value.name in weight_layer:
                stage = max(stage, weight_layer[value.name])
            elif value.is_graph_input():
                reads_data = True
                match = _PAST.match(value.name or "")
                if match and node.op_type not in SHAPE_ONLY_OPS:
                    stage = max(stage, int(match.group(1)))
            elif not value.is_initializer():
                reads_data = True  # a value of an enclosing scope
        for value in node.outputs:
            produced[id(value)] = stage
            if not reads_data:
                constant.add(id(value))
        stages.append(stage)
    graph_outputs = {id(v) for v in graph.outputs}
    readers: dict[int, int] = {}  # id(value) → the earliest stage reading it
    for index in range(len(nodes) - 1, -1, -1):
        node = nodes[index]
        outputs = [id(v) for v in node.outputs]
        if outputs and all(key in constant for key in outputs):
            read = [readers[key] for key in outputs if key in readers]
            if read and not any(key in graph_outputs for key in outputs):
                stages[index] = max(stages[index], min(read))
        for value in node.inputs:
            if value is not None:
                readers[id(value)] = min(readers.get(id(value), stages[index]), stages[index])
    return stages


def resident_bytes(value: Any) -> int:
    """Bytes a session holds for the initializer `value`: its own, plus the outputs of the
    DequantizeLinear reading it and the Casts after that (a typed model's emulated bf16).
    ONNX Runtime's CPU session runs such weight-only chains before anything else, so each
    output stays alive until its reader runs: an fp8 layer held 4× its bytes in fp32, its bf16
    TensorRT model's emulation 7×."""
    tensor = value.const_value
    if tensor is None:
        return 0
    total, elements = tensor.nbytes, math.prod(int(d) for d in tensor.shape)
    for user, index in value.uses():
        node = user if user.op_type == "DequantizeLinear" and index == 0 else None
        while node is not None:
            out = node.outputs[0]
            total += int(elements * (out.dtype.itemsize if out.dtype is not None else 4))
            casts = [reader for reader, _ in out.uses() if reader.op_type == "Cast"]
            node = casts[0] if len(casts) == 1 else None
    return total


def plan_slices(graph: Any, stages: Sequence[int], max_bytes: int) -> list[tuple[int, int]]:
    """Stage ranges [start, stop) whose nodes' weights hold at most `max_bytes` in a session
    (`resident_bytes`; a stage alone above it is a slice of its own)."""
    per_stage: dict[int, int] = {}
    seen: set[int] = set()
    for node, stage in zip(graph, stages):
        for value in node.inputs:
            if value is not None and value.is_initializer() and id(value) not in seen:
                seen.add(id(value))
                per_stage[stage] = per_stage.get(stage, 0) + resident_bytes(value)
    last = max(stages, default=0)
    slices: list[tuple[int, int]] = []
    start, size = 0, 0
    for stage in range(last + 1):
        weight = per_stage.get(stage, 0)
        if stage > start and size + weight > max_bytes:
            slices.append((start, stage))
            start, size = stage, 0
        size += weight
    slices.append((start, last + 1))
    return slices


@dataclasses.dataclass
class _Slice:
    stages: tuple[int, int]
    inputs: list[str]  # graph inputs and values of earlier slices
    outputs: list[str]  # values of later slices, graph outputs
    weight_bytes: int


class SlicedModel:
    """A decoder build run slice by slice (see the module docstring); quacks like `OrtModel`
    for `fdec.verify` (which asks `logits(phases)` instead of decoding step by step)."""

    def __init__(
        self,
        path: str | pathlib.Path,
        *,
        spec: Any = None,
        max_slice_bytes: int | None = None,
        optimization: str = "all",
        providers: list[Any] | None = None,
        emulate: bool = False,
    ):
        import onnx_ir as ir

        self.path = pathlib.Path(path)
        self.spec, self.optimization, self.providers_asked = spec, optimization, providers
        # A GPU graph on the CPU: each slice with its fp16/bf16 rounding emulated
        # (check_forms.emulate_low_precision), opened without constant folding.
        self.emulate = emulate
        if emulate:
            self.optimization = "disable"
        model = ir.load(self.path)  # weights stay in the data file
        graph = model.graph
        self.input_names = [v.name for v in graph.inputs]
        self.output_names = [v.name for v in graph.outputs]
        self.num_layers = sum(1 for n in self.input_names if n.endswith(".key") and _PAST.match(n))
        self.is_decoder = "logits" in self.output_names
        self.kv_policy = None
        metadata = model.metadata_props
        self.kv_dtype, self.kv_onnx_type = np.float32, None
        past = next((v for v in graph.inputs if _PAST.match(v.name or "")), None)
        if past is not None and past.dtype is not None:
            if past.dtype == ir.DataType.FLOAT8E4M3FN:
                self.kv_dtype, self.kv_onnx_type = np.uint8, _ONNX_FP8_E4M3FN
            elif emulate and past.dtype == ir.DataType.BFLOAT16:
                self.kv_dtype = np.float32  # the emulated graph's bf16 edges are fp32
            else:
                self.kv_dtype = past.dtype.numpy()
        if metadata.get(KV_POLICY_METADATA):
            self.kv_policy = json.loads(metadata[KV_POLICY_METADATA])
        stages = node_stages(graph, spec)
        budget = DEFAULT_SLICE_BYTES if max_slice_bytes is None else max_slice_bytes
        if emulate:  # each fp16/bf16 weight is also held as its fp32 copy while a slice runs
            budget //= 3
        self.slices = self._plan(graph, stages, plan_slices(graph, stages, budget))
        self.runs: list[dict[str, Any]] = []  # per slice and call: open and run seconds
        self._providers: list[str] = []
        self._fallback: str | None = None

    @staticmethod
    def _plan(graph: Any, stages: list[int], ranges: list[tuple[int, int]]) -> list[_Slice]:
        def slice_of(stage: int) -> int:
            return next(i for i, (a, b) in enumerate(ranges) if a <= stage < b)

        owner: dict[int, int] = {}  # id(value) → slice producing it
        readers: dict[int, set[int]] = {}  # id(value) → slices reading it
        names: dict[int, str] = {}
        for node, stage in zip(graph, stages):
            index = slice_of(stage)
            for value in node.outputs:
                owner[id(value)] = index
                names[id(value)] = value.name
            for value in node.inputs:
                if value is not None and not value.is_initializer():
                    readers.setdefault(id(value), set()).add(index)
                    names[id(value)] = value.name
        graph_inputs = {id(v) for v in graph.inputs}
        graph_outputs = [v for v in graph.outputs]
        slices = []
        for index, stage_range in enumerate(ranges):
            inputs = [
                names[key]
                for key, reading in readers.items()
                if index in reading and owner.get(key, -1) != index
                and (key in graph_inputs or key in owner)
            ]  # fmt: skip
            outputs = [
                names[key]
                for key, made in owner.items()
                if made == index and any(r > index for r in readers.get(key, ()))
            ]
            outputs += [v.name for v in graph_outputs if owner.get(id(v)) == index]
            weight = 0
            seen: set[int] = set()
            for node, stage in zip(graph, stages):
                if slice_of(stage) != index:
                    continue
                for value in node.inputs:
                    if value is not None and value.is_initializer() and id(value) not in seen:
                        seen.add(id(value))
                        weight += value.const_value.nbytes if value.const_value else 0
            slices.append(_Slice(stage_range, inputs, list(dict.fromkeys(outputs)), weight))
        return slices

    # --- OrtModel's surface that fdec.verify reads ---

    @property
    def providers(self) -> list[str]:
        return self._providers or ["CPUExecutionProvider"]

    @property
    def provider_fallback(self) -> str | None:
        return self._fallback

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return []

    def decode(self, input_ids: np.ndarray, past: list[np.ndarray], past_length: int) -> Any:
        """The logits of `input_ids` from an empty cache (the only decode fdec.verify asks)."""
        if past_length or past:
            raise ValueError("a sliced model decodes whole phases: use logits(phases)")
        return self.logits([input_ids])[0], []

    def to_dict(self) -> dict[str, Any]:
        return {
            "slices": len(self.slices),
            "stages": [list(s.stages) for s in self.slices],
            "max_slice_weight_bytes": max(s.weight_bytes for s in self.slices),
            "runs": self.runs,
            **({"emulated": True} if self.emulate else {}),
        }

    # --- running ---

    def _slice_model(self, part: _Slice, types: dict[str, tuple[Any, int]]) -> bytes:
        """The serialized graph of one slice; `types`: crossing value → (dtype, rank)."""
        import onnx_ir as ir

        model = ir.load(self.path)
        graph = model.graph
        stages = node_stages(graph, self.spec)
        start, stop = part.stages
        keep = [start <= stage < stop for stage in stages]
        nodes = list(graph)
        kept = {id(n) for n, k in zip(nodes, keep) if k}
        values: dict[str, Any] = {}
        for node in nodes:
            for value in [*node.inputs, *node.outputs]:
                if value is not None:
                    values.setdefault(value.name, value)
        for value in graph.inputs:
            values.setdefault(value.name, value)
        new_inputs = []
        for name in part.inputs:
            value = values[name]
            if value.is_graph_input():
                new_inputs.append(value)
                continue
            dtype, rank = types[name]
            crossing = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape([None] * rank))
            ir.convenience.replace_all_uses_with(value, crossing)
            new_inputs.append(crossing)
        outputs = [values[name] for name in part.outputs]
        graph.outputs.clear()
        dropped = [n for n in nodes if id(n) not in kept]
        for node in dropped:  # not its inputs' users any more: the other slices' weights go
            node.resize_inputs(0)
        graph.remove(dropped, safe=False)
        graph.inputs.clear()
        graph.inputs.extend(new_inputs)
        graph.outputs.extend(outputs)
        # the vocabulary tables' rows and columns, not all of them (and the FP4 form)
        check_form(model, emulate=self.emulate, edges=True)
        for name in [n for n, v in graph.initializers.items() if not v.uses()]:
            del graph.initializers[name]
        return ir.serde.serialize_model(model).SerializeToString()

    def _open(self, serialized: bytes) -> Any:
        """A session on a slice's graph whose external data is the build's own file."""
        return open_session(
            self.path, providers=self.providers_asked, optimization=self.optimization,
            prepack=False, model_bytes=serialized, config_entries=external_data_folder(self.path),
        )  # fmt: skip

    def logits(self, phases: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Logits [1, n, vocab] of each phase's token ids [1, n], the phases being one sequence
        fed in order through the KV cache (the first from an empty cache)."""
        ort = require_onnxruntime()
        lengths = [int(p.shape[1]) for p in phases]
        starts = np.cumsum([0, *lengths])
        carried: list[dict[str, Any]] = [{} for _ in phases]  # crossing values per phase
        logits: list[np.ndarray] = []
        for part in self.slices:
            types = {
                name: (_ir_dtype(carried[0][name]), len(carried[0][name].shape()))
                for name in part.inputs
                if name in carried[0]
            }
            started = time.perf_counter()
            session = self._open(self._slice_model(part, types))
            opened = time.perf_counter()
            self._providers = list(session.get_providers())
            self._fallback = getattr(session, "fdec_provider_fallback", None)
            past: dict[str, Any] = {}
            for index, ids in enumerate(phases):
                feeds = self._feeds(part, ids, int(starts[index]), past, carried[index], ort)
                ran = session.run_with_ort_values(part.outputs, feeds)
                named = dict(zip(part.outputs, ran))
                for name, value in named.items():
                    present = _PRESENT.match(name)
                    if present:
                        past[f"past_key_values.{present.group(1)}.{present.group(2)}"] = value
                    elif name == "logits":
                        logits.append(value.numpy())
                    else:
                        carried[index][name] = value
            later = {
                name for rest in self.slices[self.slices.index(part) + 1 :] for name in rest.inputs
            }
            for phase in carried:  # keep only what later slices read
                for name in [n for n in phase if n not in later]:
                    del phase[name]
            del session, past
            self.runs.append({"stages": list(part.stages), "phases": len(phases),
                              "open_s": round(opened - started, 2),
                              "run_s": round(time.perf_counter() - opened, 2)})  # fmt: skip
        return logits

    def _feeds(
        self, part: _Slice, ids: np.ndarray, start: int, past: dict[str, Any],
        carried: dict[str, Any], ort: Any,
    ) -> dict[str, Any]:  # fmt: skip
        batch, seq = ids.shape
        feeds: dict[str, Any] = {}
        for name in part.inputs:
            if name in carried:
                feeds[name] = carried[name]
            elif name == "input_ids":
                feeds[name] = ort.OrtValue.ortvalue_from_numpy(ids.astype(np.int64))
            elif name == "attention_mask":
                feeds[name] = ort.OrtValue.ortvalue_from_numpy(
                    np.ones((batch, start + seq), dtype=np.int64)
                )
            elif name == "position_ids":
                positions = np.arange(start, start + seq, dtype=np.int64)
                feeds[name] = ort.OrtValue.ortvalue_from_numpy(
                    np.ascontiguousarray(np.broadcast_to(positions, (batch, seq)))
                )
            elif _PAST.match(name):
                if name in past:  # this slice's own layer, from its previous phase
                    feeds[name] = past[name]
                elif self._presents(part, name):  # its first phase
                    feeds[name] = self._empty(batch, ort)
                else:  # read for its shape only (node_stages): zeros as long as the past
                    feeds[name] = self._empty(batch, ort, start)
            else:
                raise ValueError(f"the sliced build has an input fdec cannot feed: {name}")
        return feeds

    @staticmethod
    def _presents(part: _Slice, past_name: str) -> bool:
        """Whether the slice computes the layer of `past_name` (outputs its present)."""
        return past_name.replace("past_key_values.", "present.", 1) in part.outputs

    def _empty(self, batch: int, ort: Any, length: int = 0) -> Any:
        heads, head_dim = self._kv_shape
        array = np.zeros((batch, heads, length, head_dim), dtype=self.kv_dtype)
        if self.kv_onnx_type is not None:
            return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, self.kv_onnx_type)
        return ort.OrtValue.ortvalue_from_numpy(array)

    @property
    def _kv_shape(self) -> tuple[int, int]:
        import onnx_ir as ir

        if not hasattr(self, "_kv"):
            model = ir.load(self.path)
            past = next(v for v in model.graph.inputs if _PAST.match(v.name or ""))
            self._kv = (int(past.shape[1]), int(past.shape[3]))
        return self._kv


def _ir_dtype(value: Any) -> Any:
    """The onnx-ir dtype of an OrtValue ('tensor(float)' → FLOAT)."""
    import onnx_ir as ir

    name = value.data_type()  # "tensor(float)"
    kind = name[len("tensor(") : -1]
    table = {
        "float": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16,
        "bfloat16": ir.DataType.BFLOAT16, "double": ir.DataType.DOUBLE,
        "int64": ir.DataType.INT64, "int32": ir.DataType.INT32, "int8": ir.DataType.INT8,
        "uint8": ir.DataType.UINT8, "bool": ir.DataType.BOOL,
        "float8e4m3fn": ir.DataType.FLOAT8E4M3FN,
    }  # fmt: skip
    return table[kind]
