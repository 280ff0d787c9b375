"""Calibration for static quantization: a built-in text corpus, token batches, and activation statistics.

Static quantization fixes each activation's range ahead of time, so it needs to see the model
run on representative input. This module provides the three steps:

1. `load_calibration_texts` (fdec.calibration_text, re-exported here) — the built-in corpus (fdec/data/calib: prose, chat dialogue, code,
   numbers) or the user's own `.txt` (paragraphs split on blank lines) or `.jsonl` (one
   object with a "text" field per line).
2. `calibration_batches` — the texts tokenized into `[1, seq_len]` int64 id arrays (fixed
   pseudo-random ids when there is no tokenizer, as fdec.verify does for held text).
3. `collect_activation_stats` — runs ONNX Runtime over the batches with the named
   intermediate values exposed as extra outputs of a copy of the model, and accumulates
   their absmax, per-channel absmax and 99.9th percentile, batch by batch. Inside
   `calibration_cache(folder)` the statistics are cached, keyed by a digest of the model
   graph, the token batches and the tensor names, so a rebuild reuses them.

`matmul_activation_inputs` names the activation each linear weight (a ModelSpec role) is
multiplied with, i.e. the tensors worth calibrating.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import io
import logging
import os
import pathlib
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from fdec.calibration_text import (
    CORPUS_DOMAINS,
    calibration_batches,
    checked_batches,
    describe_batches,
    load_calibration_texts,
)
from fdec.errors import CompileError
from fdec.ir import FdecModel

__all__ = [
    "CORPUS_DOMAINS",
    "ActivationRunner",
    "ActivationStats",
    "StatsCache",
    "active_calibration_source",
    "add_xtx",
    "calibration_batches",
    "calibration_cache",
    "calibration_source",
    "capture_activations",
    "checked_batches",
    "collect_activation_stats",
    "describe_batches",
    "load_calibration_texts",
    "matmul_activation_inputs",
    "model_digest",
]

logger = logging.getLogger(__name__)


_PERCENTILE = 99.9
_NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


# --- statistics -------------------------------------------------------------------------------


_XTX_CHUNK_BYTES = 64 << 20  # columns of XᵀX added per product


def add_xtx(total: np.ndarray | None, x: np.ndarray) -> np.ndarray:
    """`total` + XᵀX of `x` ([rows, K], read as float64), added in place a block of columns at
    a time: an 8B down_proj's [14336, 14336] float64 product would be a second 1.6 GB matrix.
    The first call (`total` None) makes the [K, K] sum."""
    x = np.asarray(x, dtype=np.float64)
    k = x.shape[1]
    if total is None:
        total = np.zeros((k, k), dtype=np.float64)
    step = max(1, _XTX_CHUNK_BYTES // (8 * k))
    for start in range(0, k, step):
        total[:, start : start + step] += x.T @ x[:, start : start + step]
    return total


@dataclasses.dataclass
class ActivationStats:
    """What calibration saw of one tensor.

    `absmax`: the largest |x|. `channel_absmax`: the largest |x| per index of the last axis
    (SmoothQuant's per-input-channel range). `percentile_99_9`: the 99.9th percentile of |x|,
    per batch, averaged over batches weighted by their size (a range that ignores rare
    outliers). `count`: how many vectors along the last axis were seen (tokens, for a
    [batch, seq, hidden] activation).
    """

    absmax: float
    channel_absmax: np.ndarray
    percentile_99_9: float
    count: int

    @classmethod
    def of(cls, array: np.ndarray) -> ActivationStats:
        """Statistics of one array (at least one element)."""
        magnitude = np.abs(np.asarray(array, dtype=np.float32))
        flat = (
            magnitude.reshape(-1, magnitude.shape[-1]) if magnitude.ndim else magnitude[None, None]
        )
        return cls(
            absmax=float(flat.max()),
            channel_absmax=flat.max(axis=0),
            percentile_99_9=float(np.percentile(flat, _PERCENTILE)),
            count=int(flat.shape[0]),
        )

    def update(self, array: np.ndarray) -> None:
        """Merge the statistics of another batch of the same tensor."""
        other = ActivationStats.of(array)
        if other.channel_absmax.shape != self.channel_absmax.shape:
            raise CompileError(
                f"calibration saw {other.channel_absmax.shape[0]} channels where it saw "
                f"{self.channel_absmax.shape[0]} before",
                "calibrate with batches of one shape per tensor's last axis",
            )
        total = self.count + other.count
        self.percentile_99_9 = (
            self.percentile_99_9 * self.count + other.percentile_99_9 * other.count
        ) / total
        self.absmax = max(self.absmax, other.absmax)
        self.channel_absmax = np.maximum(self.channel_absmax, other.channel_absmax)
        self.count = total

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary (the per-channel array as its size and largest entry)."""
        return {
            "absmax": self.absmax,
            "percentile_99_9": self.percentile_99_9,
            "channels": int(self.channel_absmax.size),
            "count": self.count,
        }


_IN_MEMORY_MIN_BYTES = 1 << 20


def _in_memory_weights(graph: Any) -> dict[str, np.ndarray]:
    """The graph's float32 initializers of 1 MB or more whose arrays are already in memory and
    contiguous (numpy views of the IR's tensors: no copy is made for the session)."""
    found = {}
    for name, value in graph.initializers.items():
        tensor = value.const_value
        if tensor is None or tensor.nbytes < _IN_MEMORY_MIN_BYTES:
            continue
        if tensor.dtype != ir.DataType.FLOAT or isinstance(tensor, ir.ExternalTensor):
            continue  # a conversion would copy; a mapped file is read as pages anyway
        array = tensor.numpy()
        if array.flags.c_contiguous:
            found[name] = array
    return found


class ActivationRunner:
    """An ORT session over a copy of `model` with `names` exposed as outputs.

    The model is saved to a temporary folder (weights as external data), the saved proto is
    reloaded without its weights, the outputs are appended to it and it is written back, so
    neither the caller's model nor a second in-memory copy of the weights is involved.
    Optimizations are disabled so the exposed names survive.
    """

    def __init__(self, model: FdecModel, names: Sequence[str]):
        import onnx

        from fdec.runtime.session import open_session

        self.spec = model.spec
        graph = model.graph
        graph_inputs = {value.name: value for value in graph.inputs}
        graph_outputs = {value.name for value in graph.outputs}
        values = _values_by_name(graph)
        self.from_feeds = [name for name in names if name in graph_inputs]
        exposed: list[tuple[str, int | None]] = []
        for name in names:
            if name in graph_inputs:
                continue
            value = values.get(name)
            if value is None:
                raise CompileError(
                    f"cannot calibrate {name!r}: the graph has no value of that name",
                    "calibrate the model as it is right before quantization",
                )
            if name not in graph_outputs:
                exposed.append((name, None if value.dtype is None else int(value.dtype)))
        self.names = list(names)
        self._folder = tempfile.TemporaryDirectory(prefix="fdec-calib-")
        path = pathlib.Path(self._folder.name) / "model.onnx"
        model.save(path)
        proto = onnx.load(str(path), load_external_data=False)
        for name, elem_type in exposed:
            if elem_type is None:  # ORT infers the type of an untyped output
                proto.graph.output.append(onnx.ValueInfoProto(name=name))
            else:
                proto.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
        onnx.save(proto, str(path))
        # A few runs: no packed copy of the weights, and ORT reads the large float weights from
        # the model's own arrays rather than from pages of the file (SmolLM2's 0.5 GB were a
        # second copy in the compile's peak RSS).
        self.session = open_session(
            path, optimization="disable", prepack=False, initializers=_in_memory_weights(graph)
        )
        self.outputs = [name for name in self.names if name not in self.from_feeds]

    def close(self) -> None:
        self.session = None
        self._folder.cleanup()

    def feeds(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Inputs for one forward pass over `ids` ([batch, seq]) with an empty KV cache."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2:
            raise CompileError(
                f"calibration batches must be [batch, seq] token ids, got shape {ids.shape}",
                "use fdec.calibrate.calibration_batches",
            )
        batch, seq = ids.shape
        feeds: dict[str, np.ndarray] = {}
        for info in self.session.get_inputs():
            name = info.name
            if name == "input_ids":
                feeds[name] = ids
            elif name == "attention_mask":
                feeds[name] = np.ones((batch, seq), dtype=np.int64)
            elif name == "position_ids":
                feeds[name] = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
            elif name == "token_type_ids":
                feeds[name] = np.zeros((batch, seq), dtype=np.int64)
            elif name.startswith("past_key_values."):
                feeds[name] = self._empty_past(info, batch)
            else:
                raise CompileError(
                    f"cannot calibrate: the model has an input {name!r} fdec does not know how to feed",
                    "calibrate with collect_activation_stats on a model with ecosystem input names",
                )
        return feeds

    def _empty_past(self, info: Any, batch: int) -> np.ndarray:
        fallback = (batch, self.spec.num_kv_heads, 0, self.spec.head_dim)
        shape = [d if isinstance(d, int) else fallback[i] for i, d in enumerate(info.shape)]
        shape[0], shape[2] = batch, 0
        return np.zeros(shape, dtype=_NP_TYPES.get(info.type, np.float32))

    def run(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        feeds = self.feeds(ids)
        got = dict(zip(self.outputs, self.session.run(self.outputs, feeds))) if self.outputs else {}
        for name in self.from_feeds:
            got[name] = feeds[name]
        return got


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values: dict[str, ir.Value] = {}
    for node in graph:
        for value in node.outputs:
            if value.name:
                values[value.name] = value
    return values


def capture_activations(
    model: FdecModel, ids: np.ndarray, names: Sequence[str]
) -> dict[str, np.ndarray]:
    """The values of the named tensors when `model` runs on token ids `ids` ([batch, seq])."""
    runner = ActivationRunner(model, list(dict.fromkeys(names)))
    try:
        return runner.run(ids)
    finally:
        runner.close()


def activations_per_batch(
    model: FdecModel, batches: Iterable[np.ndarray], names: Sequence[str]
) -> Iterator[dict[str, np.ndarray]]:
    """The named tensors' values for each batch in turn, from one ONNX Runtime session."""
    runner = ActivationRunner(model, list(dict.fromkeys(names)))
    try:
        for ids in batches:
            yield runner.run(ids)
    finally:
        runner.close()


def collect_activation_stats(
    model: FdecModel, batches: Iterable[np.ndarray], tensor_names: Sequence[str]
) -> dict[str, ActivationStats]:
    """Statistics of the named tensors over `batches` (token id arrays, [batch, seq]).

    Runs a CPU ONNX Runtime session on a copy of `model` (the caller's model is not touched)
    with optimizations disabled, one batch at a time; decoders get an empty KV cache. Inside
    `calibration_cache(...)`, a cached result for the same graph, batches and names is used.
    """
    names = list(dict.fromkeys(tensor_names))
    if not names:
        return {}
    source = active_calibration_source(batches)
    if source is not None:
        return source.stats(model, names)
    cache = _ACTIVE_CACHE.get()
    if cache is None:
        return _collect(model, batches, names)
    batches = list(batches)
    key = cache.key(model, batches, names)
    stats = cache.load(key)
    if stats is None:
        stats = _collect(model, batches, names)
        cache.store(key, stats)
    return stats


def _collect(
    model: FdecModel, batches: Iterable[np.ndarray], names: list[str]
) -> dict[str, ActivationStats]:
    stats: dict[str, ActivationStats] = {}
    runner = ActivationRunner(model, names)
    try:
        for index, ids in enumerate(batches):
            for name, array in runner.run(ids).items():
                if array.size == 0:
                    continue
                if name in stats:
                    stats[name].update(array)
                else:
                    stats[name] = ActivationStats.of(array)
            logger.debug("calibration batch %s done", index)
    finally:
        runner.close()
    if not stats and names:
        raise CompileError(
            "calibration saw no data", "give at least one non-empty batch of token ids"
        )
    return stats


# --- the statistics cache ------------------------------------------------------------------------


def model_digest(model: ir.Model) -> str:
    """sha256 of what a model computes: every node (op, attributes, value names), the graph's
    inputs and outputs, and every initializer's name, type, shape and bytes."""
    digest = hashlib.sha256()
    graph = model.graph
    for value in [*graph.inputs, *graph.outputs]:
        digest.update(f"io|{value.name}|{value.dtype}|{value.shape}\n".encode())
    for node in graph:
        digest.update(ir.serde.serialize_node(node).SerializeToString(deterministic=True))
    for name in sorted(graph.initializers):
        tensor = graph.initializers[name].const_value
        if tensor is None:
            digest.update(f"init|{name}|none\n".encode())
            continue
        digest.update(f"init|{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.tobytes())
    return digest.hexdigest()


# Bump when ActivationStats or the way they are collected changes: old entries are then unused.
_STATS_FORMAT = 1


class StatsCache:
    """Activation statistics on disk, one `.npz` per key plus its own sha256 (`.sha256`): an
    entry whose bytes do not match is reported, deleted and recomputed, never used. Entries are
    written to a temporary name and renamed, so concurrent compiles never read half a file."""

    def __init__(self, folder: pathlib.Path):
        self.folder = pathlib.Path(folder)
        self.hits = self.misses = self.corrupt = 0

    def key(self, model: FdecModel, batches: Sequence[np.ndarray], names: Sequence[str]) -> str:
        digest = hashlib.sha256(f"stats-v{_STATS_FORMAT}|{model_digest(model.model)}".encode())
        for ids in batches:
            array = np.ascontiguousarray(ids, dtype=np.int64)
            digest.update(f"|batch{array.shape}".encode())
            digest.update(array.tobytes())
        digest.update("|".join(names).encode())
        return digest.hexdigest()

    def _paths(self, key: str) -> tuple[pathlib.Path, pathlib.Path]:
        return self.folder / f"{key}.npz", self.folder / f"{key}.sha256"

    def load(self, key: str) -> dict[str, ActivationStats] | None:
        data_path, sum_path = self._paths(key)
        try:
            data, want = data_path.read_bytes(), sum_path.read_text().strip()
        except OSError:
            self.misses += 1
            return None
        if hashlib.sha256(data).hexdigest() != want:
            logger.warning("calibration cache entry %s is corrupt; recomputing it", data_path)
            self.corrupt += 1
            self.misses += 1
            for path in (data_path, sum_path):
                path.unlink(missing_ok=True)
            return None
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            names = [str(n) for n in archive["names"]]
            stats = {
                name: ActivationStats(
                    absmax=float(archive["absmax"][i]),
                    channel_absmax=archive[f"channel_{i}"],
                    percentile_99_9=float(archive["percentile"][i]),
                    count=int(archive["count"][i]),
                )
                for i, name in enumerate(names)
            }
        self.hits += 1
        return stats

    def store(self, key: str, stats: dict[str, ActivationStats]) -> None:
        names = list(stats)
        buffer = io.BytesIO()
        np.savez(
            buffer,
            names=np.asarray(names),
            absmax=np.asarray([stats[n].absmax for n in names], dtype=np.float64),
            percentile=np.asarray([stats[n].percentile_99_9 for n in names], dtype=np.float64),
            count=np.asarray([stats[n].count for n in names], dtype=np.int64),
            **{f"channel_{i}": stats[n].channel_absmax for i, n in enumerate(names)},
        )
        data = buffer.getvalue()
        data_path, sum_path = self._paths(key)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for path, payload in (
                (data_path, data),
                (sum_path, (hashlib.sha256(data).hexdigest() + "\n").encode()),
            ):
                partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
                partial.write_bytes(payload)
                os.replace(partial, path)
        except OSError as err:  # a cache that cannot be written costs time, not the build
            logger.warning("calibration cache not written (%s): %s", self.folder, err)

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "hits": self.hits,
            "misses": self.misses,
            "corrupt": self.corrupt,
        }


_ACTIVE_CACHE: contextvars.ContextVar[StatsCache | None] = contextvars.ContextVar(
    "fdec_calibration_cache", default=None
)


@contextlib.contextmanager
def calibration_cache(folder: pathlib.Path | None) -> Iterator[StatsCache | None]:
    """Cache activation statistics under `folder` while the block runs (None: no cache)."""
    if folder is None:
        yield None
        return
    cache = StatsCache(folder)
    token = _ACTIVE_CACHE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE_CACHE.reset(token)


# --- another source of calibration data -------------------------------------------------------

_ACTIVE_SOURCE: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "fdec_calibration_source", default=None
)


@contextlib.contextmanager
def calibration_source(source: Any) -> Iterator[Any]:
    """While the block runs, calibration requests (collect_activation_stats, and the passes'
    row and XᵀX captures) are answered by `source` instead of an ONNX Runtime session over the
    whole model, whenever `source.enabled` (fdec.calibrate_layerwise.LayerwiseCalibration: the
    streamed model run layer by layer). None: no other source."""
    token = _ACTIVE_SOURCE.set(source)
    try:
        yield source
    finally:
        _ACTIVE_SOURCE.reset(token)


def active_calibration_source(batches: Iterable[np.ndarray] | None = None) -> Any:
    """The calibration source in effect (None: calibrate with ONNX Runtime); `batches` are
    checked to be the ones it calibrated."""
    source = _ACTIVE_SOURCE.get()
    if source is None or not source.enabled:
        return None
    if batches is not None:
        source.check_batches(list(batches))
    return source


# --- which tensors to calibrate ---------------------------------------------------------------


def matmul_activation_inputs(
    model: FdecModel, roles: Iterable[str] | None = None
) -> dict[str, str]:
    """Role → the name of the activation A in `A @ W` for each weight role read by MatMul/Gemm.

    `roles` defaults to every linear layer role and the lm_head. Roles whose weight is not a
    float matrix multiplied by exactly one activation (the embedding's Gather, an already
    quantized weight, a weight read by two different activations) are left out.
    """
    from fdec.passes.weights import LAYER_ROLE, LINEAR_ROLES, find_weight

    spec = model.spec
    if roles is None:
        roles = [
            role
            for role in spec.weights
            if role == "lm_head"
            or ((match := LAYER_ROLE.match(role)) is not None and match.group(1) in LINEAR_ROLES)
        ]
    found: dict[str, str] = {}
    for role in roles:
        name = spec.weights.get(role)
        if name is None:
            continue
        try:
            weight = find_weight(model.graph, name)
        except ValueError as reason:
            logger.debug("no activation for %s: %s", role, reason)
            continue
        activations = {site.activation.name for site in weight.sites}
        if len(activations) == 1 and None not in activations:
            found[role] = activations.pop()
    return found
