"""ONNX Runtime sessions over fdec builds: I/O discovered from the graph, the KV cache in bound OrtValues."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from fdec.runtime.bound import BoundDecoder
from fdec.runtime.ort import CUDA_PROVIDER, GPU_PROVIDERS, INSTALL_LINES, require_onnxruntime

__all__ = [
    "INSTALL_LINES",
    "KV_BUFFERS",
    "KV_POLICY_METADATA",
    "OPT_LEVELS",
    "BoundDecoder",
    "OrtModel",
    "auto_threads",
    "check_session",
    "open_session",
    "require_onnxruntime",
    "session_for_model",
]

logger = logging.getLogger(__name__)

OPT_LEVELS = ("disable", "basic", "extended", "all")
# How a build takes its KV cache (fdec-runtime.json `kv_cache.buffer`, model metadata
# `fdec.kv_buffer`): "shared" past and present are one preallocated max-length buffer;
# "concat": present is past plus the new positions (a new tensor every step).
KV_BUFFERS = ("shared", "concat")
_KV_BUFFER_METADATA = "fdec.kv_buffer"  # fdec.lower.onnxruntime.KV_BUFFER_METADATA
_ROTARY_RESTART_METADATA = "fdec.rotary_restart"  # fdec.lower.onnxruntime's
KV_POLICY_METADATA = "fdec.kv_policy"  # fdec.passes.kv_cache.KV_POLICY_METADATA (JSON)


def resolve_providers(
    requested: list[Any] | None, base: pathlib.Path | None = None
) -> tuple[list[str], list[dict[str, str]], list[str]]:
    """Split (name, options) pairs into ORT's two lists, keeping only providers this
    onnxruntime has; option values ending in `_path` are resolved against `base`.
    Returns (names, options, missing)."""
    ort = require_onnxruntime()

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


def auto_threads() -> int:
    """Intra-op threads for this machine now: its cores less those other work keeps busy.

    Cores: physical cores when psutil knows them (ORT's own default), else the CPUs this
    process may use. Busy: the 1-minute load average less one (this process itself), rounded.
    At least 1. Measured on a 2-core machine shared by other jobs: a second thread that is not
    free makes every op wait for it (decode 0.5-0.8x of one thread); onnxruntime-genai's
    generator takes half of `hardware_concurrency` for the same reason.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    try:
        import psutil

        cores = min(cores or 1 << 16, psutil.cpu_count(logical=False) or 1 << 16)
    except ImportError:
        pass
    cores = cores or os.cpu_count() or 1
    try:
        busy = max(0.0, os.getloadavg()[0] - 1.0)
    except OSError:
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def auto_spinning(threads: int, available: int | None = None) -> bool:
    """Whether a session of `threads` intra-op threads should let idle pool threads spin.

    Spinning saves the wake-up of the pool before every op (SmolLM2 int4 decode on this idle
    2-core machine: 2 threads 149 tok/s spinning, 114 without, 98 on one thread), but a
    spinning thread that shares its core with other work makes every op wait (0.4-0.6x of
    one thread at load 6-11). So: only with more than one thread, and only while
    `auto_threads()` (or `available`, its value when the caller has it) still finds a free
    core for each of them.
    """
    return threads > 1 and threads <= (auto_threads() if available is None else available)


def _build_session_options(path: pathlib.Path) -> dict[str, Any]:
    """`session_options` of the fdec-runtime.json beside a build's model, or {}."""
    config = path.parent / "fdec-runtime.json"  # fdec.lower.onnxruntime.RUNTIME_CONFIG
    try:
        return dict(json.loads(config.read_text()).get("session_options") or {})
    except (OSError, ValueError, AttributeError):
        return {}


def open_session(
    path: str | os.PathLike,
    *,
    providers: list[Any] | None = None,
    optimization: str = "all",
    threads: int | None = None,
    spinning: bool | str | None = None,
    prepack: bool = True,
    initializers: Mapping[str, Any] | None = None,
    cuda_graph: bool = False,
    model_bytes: bytes | None = None,
    config_entries: Mapping[str, str] | None = None,
) -> Any:
    """An InferenceSession; `providers` are names or (name, options) pairs, best first.

    `cuda_graph` asks the CUDA provider to capture decode steps as CUDA graphs
    (`enable_cuda_graph`; BoundDecoder's static steps replay them). Where ONNX Runtime refuses
    it for this graph, the session opens without it and says so once; `session.fdec_cuda_graph`
    tells which happened.

    `initializers` (name → contiguous numpy array or OrtValue) are used in place of the
    model's initializers of those names, without a copy: the caller keeps them alive as long
    as the session (a calibration session over weights already in memory reads no file pages).

    `prepack=False` keeps ONNX Runtime from copying MatMul weights into its packed layout:
    the weights stay in the memory-mapped external data file (SmolLM2-135M fp32: session RSS
    0.28 GiB instead of 0.68 GiB), at some speed; for sessions that run a few passes. Such
    sessions also run without ORT's memory arena, which keeps what each run allocated.

    `model_bytes`: the graph to open instead of the file at `path` (which still names the
    build for its fdec-runtime.json); `config_entries`: extra session config entries (a graph
    from memory finds its external data through
    `session.model_external_initializers_file_folder_path`, fdec.runtime.sliced).

    `threads` (intra-op) and `spinning` (whether idle pool threads busy-wait) default to the
    build's fdec-runtime.json `session_options` (`intra_op_num_threads`, `allow_spinning`),
    then to 0 and "auto"; 0 threads means `auto_threads()`, "auto" spinning
    `auto_spinning(threads)`.
    """
    ort = require_onnxruntime()

    configured = _build_session_options(pathlib.Path(path))
    if threads is None:
        threads = int(configured.get("intra_op_num_threads") or 0)
    if spinning is None:
        spinning = configured.get("allow_spinning", "auto")

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
    available = auto_threads() if threads <= 0 or spinning == "auto" else None
    options.intra_op_num_threads = threads if threads > 0 else available
    if spinning == "auto":
        spinning = auto_spinning(options.intra_op_num_threads, available)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
        # Nor an arena that keeps every run's intermediates: a calibration session of
        # SmolLM2's traced graph grew ~0.4 GB a run with it.
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
    for key, entry in (config_entries or {}).items():
        options.add_session_config_entry(key, entry)
    pinned = {
        name: value if isinstance(value, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(value)
        for name, value in (initializers or {}).items()
    }
    for name, value in pinned.items():
        options.add_initializer(name, value)
    options.log_severity_level = 3
    # onnxruntime-gpu lists its GPU providers whether or not they can start: without a usable
    # GPU the CUDA provider raises "CUDA failure 100: no CUDA-capable device is detected",
    # without TensorRT's libraries the TensorRT provider fails to load. ONNX Runtime's own
    # retry (enable_fallback) prints four lines to stdout and retries once; instead, drop the
    # failing provider and try the rest, then say once what happened.
    failed: dict[str, list[str]] = {}  # reason → providers that failed with it
    graphed = cuda_graph and CUDA_PROVIDER in names
    if graphed:
        provider_options[names.index(CUDA_PROVIDER)]["enable_cuda_graph"] = "1"
    while True:
        try:
            session = ort.InferenceSession(
                model_bytes if model_bytes is not None else str(path), sess_options=options,
                providers=names, provider_options=provider_options, enable_fallback=0,
            )  # fmt: skip
            break
        except Exception as err:  # onnxruntime's own error types (Fail, RuntimeException, ...)
            gpu = next((name for name in names if name in GPU_PROVIDERS), None)
            if gpu is None:
                raise
            if graphed and CUDA_PROVIDER in names:  # first, the same providers without CUDA graphs
                provider_options[names.index(CUDA_PROVIDER)].pop("enable_cuda_graph", None)
                graphed = False
                failed.setdefault(_first_line(err), []).append("CUDA graphs")
                continue
            failed.setdefault(_first_line(err), []).append(gpu)
            index = names.index(gpu)
            names, provider_options = (
                names[:index] + names[index + 1 :],
                (provider_options[:index] + provider_options[index + 1 :]),
            )
    fallback = None
    if failed:
        fallback = (
            ", ".join(
                f"{' and '.join(providers)} could not start ({reason})"
                for reason, providers in failed.items()
            )
            + f"; running on {', '.join(session.get_providers())}"
        )
        logger.warning(fallback)
    session.fdec_initializers = pinned  # ORT reads their memory for the session's life
    session.fdec_provider_fallback = fallback  # the warning above, or None
    session.fdec_cuda_graph = graphed and CUDA_PROVIDER in session.get_providers()
    return session


def _first_line(err: BaseException, limit: int = 160) -> str:
    """ONNX Runtime's message without its '[ONNXRuntimeError] : 1 : FAIL : ' prefix and the
    '; GPU=… ; hostname=… ; file=…' details: 'CUDA failure 100: no CUDA-capable device …'."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : [A-Z_]+ : ", "", text)
    for marker in (" ; GPU=", " ; hostname="):
        text = text.split(marker)[0]
    return text if len(text) <= limit else text[: limit - 1] + "…"


_NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    # numpy has no fp8: an fp8 KV cache (fdec.passes.kv_cache) is held as its raw bytes and
    # handed to ONNX Runtime as OrtValues typed FLOAT8E4M3FN (OrtModel.kv_ortvalue).
    "tensor(float8e4m3fn)": np.uint8,
}
_ONNX_FP8_E4M3FN = 17  # onnx.TensorProto.FLOAT8E4M3FN


class OrtModel:
    """A model in an ONNX Runtime session, with helpers for decoder KV-cache I/O.

    The layout of the cache (layers, KV heads, head dim, dtype) is read from the graph's
    `past_key_values.{i}.key` inputs, so any build with ecosystem I/O names runs. `kv_buffer`
    (one of KV_BUFFERS) says whether past and present may share one buffer; None reads it from
    the model's metadata (written by fdec's lowering), "concat" when absent. `kv_policy`
    ({"sink": K, "window": W, "native_window": bool}, fdec.passes.kv_cache.KvPolicyPass) is
    the cache compression generation applies; None reads it from the metadata.
    """

    def __init__(
        self,
        session: Any,
        *,
        kv_buffer: str | None = None,
        kv_policy: dict[str, Any] | None = None,
    ):
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self._inputs = {i.name: i for i in session.get_inputs()}
        layers = 0
        while f"past_key_values.{layers}.key" in self._inputs:
            layers += 1
        self.num_layers = layers
        self.is_decoder = "logits" in self.output_names
        self.kv_onnx_type: int | None = None
        if layers:
            past = self._inputs["past_key_values.0.key"]
            self.kv_heads = past.shape[1] if isinstance(past.shape[1], int) else None
            self.head_dim = past.shape[3] if isinstance(past.shape[3], int) else None
            self.kv_dtype = _NP_TYPES.get(past.type, np.float32)
            # Set when numpy cannot name the cache's type (fp8): the ONNX type of the bytes.
            self.kv_onnx_type = _ONNX_FP8_E4M3FN if past.type == "tensor(float8e4m3fn)" else None
        metadata = session.get_modelmeta().custom_metadata_map or {}
        if kv_policy is None and metadata.get(KV_POLICY_METADATA):
            kv_policy = json.loads(metadata[KV_POLICY_METADATA])
        self.kv_policy = kv_policy if layers else None
        # Positions after which generation recomputes the cache once (a longrope Phi-3's
        # original ones: fdec.frontend.families.rotary_restart); 0: never.
        self.rotary_restart = int(metadata.get(_ROTARY_RESTART_METADATA) or 0) if layers else 0
        if kv_buffer is None:
            kv_buffer = metadata.get(_KV_BUFFER_METADATA, "concat")
        if kv_buffer not in KV_BUFFERS:
            raise ValueError(f"kv_buffer {kv_buffer!r} is not one of {', '.join(KV_BUFFERS)}")
        self.kv_buffer = kv_buffer if layers else "concat"

    @property
    def shares_kv_buffer(self) -> bool:
        """Past and present can be bound to the same preallocated buffer (no per-step copy)."""
        return self.kv_buffer == "shared"

    @property
    def cuda_graph(self) -> bool:
        """The session captures CUDA graphs (open_session(cuda_graph=True) and it was allowed)."""
        return bool(getattr(self.session, "fdec_cuda_graph", False))

    def bound_decoder(
        self, batch: int, max_length: int, *, static: bool | None = None
    ) -> BoundDecoder:
        """A decode loop over IOBinding for sequences of at most `max_length` positions;
        `static` (default: when the session captures CUDA graphs) binds decode steps with
        fixed shapes and addresses (BoundDecoder)."""
        static = self.cuda_graph if static is None else static
        if not (static and self.shares_kv_buffer):
            return BoundDecoder(self, batch, max_length)
        # A CUDA graph replays the addresses it captured: one static decoder per shape, kept
        # with its buffers and its own graph id, reset for each new sequence.
        cache = self.__dict__.setdefault("_static_decoders", {})
        decoder = cache.get((batch, max_length))
        if decoder is None:
            decoder = BoundDecoder(self, batch, max_length, static=True, graph_id=len(cache) + 1)
            cache[(batch, max_length)] = decoder
        decoder.reset()
        return decoder

    @property
    def providers(self) -> list[str]:
        """The providers the session really got (onnxruntime-gpu falls back silently)."""
        return list(self.session.get_providers())

    @property
    def provider_fallback(self) -> str | None:
        """The warning `open_session` gave when a GPU provider failed to start, else None."""
        return getattr(self.session, "fdec_provider_fallback", None)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=self.kv_dtype) for _ in range(2 * self.num_layers)]

    def kv_ortvalue(self, array: np.ndarray, device: str = "cpu") -> Any:
        """An OrtValue of a cache tensor in the graph's cache type (fp8 from its raw bytes)."""
        ort = require_onnxruntime()

        if self.kv_onnx_type is not None:
            return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                np.ascontiguousarray(array).view(np.uint8), self.kv_onnx_type
            )
        return ort.OrtValue.ortvalue_from_numpy(array, device, 0)

    def decode(
        self,
        input_ids: np.ndarray,
        past: list[np.ndarray],
        past_length: int,
        *,
        position: int | None = None,
        attention_mask: np.ndarray | None = None,
        position_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder step: logits for `input_ids` given `past_length` cached positions.

        `position` is the position of input_ids[:, 0] (default `past_length`); it differs when
        a cache policy dropped positions (fdec.runtime.generate.KvPolicy). Padded batches give
        their own `attention_mask` ([batch, past + seq]) and `position_ids` ([batch, seq]).
        """
        batch, seq = input_ids.shape
        start = past_length if position is None else position
        feeds: dict[str, Any] = {
            "input_ids": input_ids.astype(np.int64, copy=False),
            "attention_mask": attention_mask
            if attention_mask is not None
            else np.ones((batch, past_length + seq), dtype=np.int64),
        }
        if "position_ids" in self._inputs:
            if position_ids is None:
                positions = np.arange(start, start + seq, dtype=np.int64)
                position_ids = np.broadcast_to(positions, (batch, seq))
            feeds["position_ids"] = np.ascontiguousarray(position_ids, dtype=np.int64)
        for i in range(self.num_layers):
            feeds[f"past_key_values.{i}.key"] = past[2 * i]
            feeds[f"past_key_values.{i}.value"] = past[2 * i + 1]
        if self.kv_onnx_type is not None:
            ort = require_onnxruntime()

            values = {
                name: self.kv_ortvalue(array)
                if name.startswith("past_key_values.")
                else ort.OrtValue.ortvalue_from_numpy(array)
                for name, array in feeds.items()
            }
            ran = self.session.run_with_ort_values(None, values)
            outputs = [value.numpy() for value in ran]
        else:
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
    """An ORT session on an in-memory FdecModel (saved to a temporary folder first). A graph
    holding fp16/bf16 tensors (a GPU graph, once typed) runs with that rounding emulated
    (fdec.runtime.check_forms.emulate_low_precision): the CPU has no bf16 kernels, and its
    own fp16 run skips the rounding between nodes."""
    with tempfile.TemporaryDirectory(prefix="fdec-check-") as folder:
        path = pathlib.Path(folder) / "model.onnx"
        model.save(path)
        # ORT reads the external data while creating the session; the files can go after.
        return check_session(path, optimization=optimization)


def check_session(path: str | pathlib.Path, *, optimization: str = "all") -> OrtModel:
    """An ORT session on the saved model at `path` for checking its numbers here: a graph that
    holds fp16/bf16 runs with that rounding emulated (as `session_for_model`), an fp32 one as
    it is (not re-loaded and rewritten)."""
    from fdec.runtime.check_forms import forms_needed, lighter_session_args

    args: dict[str, Any] = {"optimization": optimization}
    low, fp4 = forms_needed(path)
    if low or fp4:  # an NVFP4 graph runs here in its FP4 form only
        args.update(lighter_session_args(path, emulate=low is not None))
    return OrtModel(open_session(path, **args))
