"""KV-cache passes: int8 / fp8 cache quantization (per-head scales) and GroupQueryAttention's sliding window.

`quantize-kv-cache` changes the graph's cache I/O to a 1-byte type. Per layer and per K/V:

    past_key_values.{i}.key (int8|fp8) ─ DequantizeLinear(axis=1) ─▶ attention (Concat or GQA)
    attention ─▶ present (float) ─ QuantizeLinear(axis=1) ─▶ present.{i}.key (int8|fp8)

Scales are static, symmetric, one per KV head (axis 1 of the [batch, kv_heads, seq, head_dim]
cache): calibration batches run through the model with an empty cache, and the absmax of every
head of each `present.{i}.key|value` over batch, positions and head_dim maps to 127 (int8) or
448 (fp8 E4M3). Re-quantizing a dequantized past with the same scale gives back the same codes,
so the cache error does not accumulate over decode steps. The runtime then stores one byte per
element (four for fp32, two for fp16). The form is standard ONNX Q/DQ, which TensorRT takes
too. With a fused GroupQueryAttention the DequantizeLinear feeds its past inputs, so past and
present can no longer share one buffer: the lowering records `kv_cache.buffer = "concat"` and
the quantized dtype in fdec-runtime.json.

`kv-policy` records a compression policy (attention sink + sliding window) in the model's
metadata for the runtime, which drops cache positions beyond it (fdec.runtime.generate); in a
fused graph without sinks it sets GroupQueryAttention's `local_window_size`, ONNX Runtime's
native sliding window, instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from fdec.calibrate import capture_activations, checked_batches
from fdec.errors import CompileError, UsageError
from fdec.ir import FdecModel
from fdec.passes.weights import add_initializer, fresh_name, raise_opset
from fdec.pipeline import Pass, PassResult, Tolerance
from fdec.targets import Precision

__all__ = [
    "KV_DTYPES",
    "KV_POLICY_METADATA",
    "KvPolicyPass",
    "ModelWindow",
    "QuantizeKvCachePass",
    "kv_bytes_per_token",
    "kv_cache_names",
    "per_head_scales",
    "runtime_trim",
]

logger = logging.getLogger(__name__)

# Quantized cache dtypes: name → (ONNX type, largest code, bytes per element).
KV_DTYPES: dict[str, tuple[ir.DataType, float]] = {
    "int8": (ir.DataType.INT8, 127.0),
    "fp8": (ir.DataType.FLOAT8E4M3FN, 448.0),
}
_OPSET = {"int8": 13, "fp8": 19}  # per-axis Q/DQ; FLOAT8 types in Q/DQ
_STACK = 4  # calibration sequences run together (one session per distinct length)


def kv_cache_names(num_layers: int) -> list[tuple[str, str]]:
    """(past input, present output) names of every cache tensor, layer by layer, key then value."""
    return [
        (f"past_key_values.{i}.{kv}", f"present.{i}.{kv}")
        for i in range(num_layers)
        for kv in ("key", "value")
    ]


def kv_bytes_per_token(spec: Any, dtype_bytes: int) -> int:
    """Cache bytes one token adds: 2 (K, V) × layers × KV heads × head dim × dtype bytes."""
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * dtype_bytes


def per_head_scales(absmax: np.ndarray, dtype: str) -> np.ndarray:
    """Symmetric scales (float32) for per-head absmax values; an all-zero head gets scale 1."""
    peak = KV_DTYPES[dtype][1]
    absmax = np.asarray(absmax, dtype=np.float32)
    return np.where(absmax > 0, absmax / peak, 1.0).astype(np.float32)


def _stacks(batches: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Batches of one length stacked _STACK sequences at a time (fewer ORT sessions)."""
    rows: dict[int, list[np.ndarray]] = {}
    for ids in batches:
        for row in ids:
            rows.setdefault(int(row.shape[0]), []).append(row)
    return [
        np.stack(same[start : start + _STACK])
        for same in rows.values()
        for start in range(0, len(same), _STACK)
    ]


@dataclasses.dataclass(eq=False)
class QuantizeKvCachePass(Pass):
    """Store the KV cache as int8 or fp8 E4M3 with static per-head scales from calibration."""

    name: ClassVar[str] = "quantize-kv-cache"
    family: ClassVar[str] = "kv_cache"
    summary: ClassVar[str] = "int8/fp8 KV cache: per-head scales, Q/DQ at the cache I/O"
    # Lossy: the compile judges the build by perplexity through the cache (fdec.verify).
    tolerance: ClassVar[Tolerance] = Tolerance(
        max_abs_error=float("inf"), min_top1_agreement=0.9, greedy_identical=False
    )

    dtype: str = dataclasses.field(default="int8", kw_only=True)
    # Per-head absmax of each present name, given instead of batches (tests, a reused run).
    absmax: Mapping[str, Sequence[float]] | None = dataclasses.field(default=None, kw_only=True)
    batches: Sequence[np.ndarray] | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if self.dtype not in (*KV_DTYPES, "fp16"):
            raise UsageError(
                f"quantize-kv-cache dtype {self.dtype!r} is not one of int8, fp8, fp16",
                "use --kv-dtype int8, fp8 or fp16 (fp32 keeps the graph's cache)",
            )
        self.batches = checked_batches(self.name, self.batches)

    @property
    def needs_calibration(self) -> bool:
        return self.dtype != "fp16" and self.absmax is None and self.batches is None

    @property
    def writes_qdq(self) -> bool:
        # FP8 Q/DQ at the cache I/O; the int8 cache has always run at "all" (tested)
        return self.dtype == "fp8"

    def check_target(self, target: Any) -> None:
        # GPUs must compute in fp8; the cpu target runs the fp8 Q/DQ in ONNX Runtime (at
        # optimization "basic", DESIGN.md), which is how such a build is verified here.
        if self.dtype == "fp8" and target is not None and getattr(target, "is_gpu", False):
            target.require(Precision.FP8_E4M3)

    def requires(self, model: FdecModel, target: Any = None) -> None:
        spec = model.spec
        if not spec.is_decoder or not spec.num_layers:
            raise UsageError(
                f"{self.name} needs a decoder with a KV cache; {spec.family} has none",
                "drop --kv-dtype for encoders",
            )
        inputs = {value.name: value for value in model.graph.inputs}
        outputs = {value.name for value in model.graph.outputs}
        for past, present in kv_cache_names(spec.num_layers):
            value = inputs.get(past)
            if value is None or present not in outputs:
                raise CompileError(
                    f"{self.name}: the graph has no {past!r} input / {present!r} output",
                    "run it on a decoder exported by fdec (ecosystem KV-cache names)",
                )
            if value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
                raise UsageError(
                    f"{self.name}: the KV cache is already {value.dtype.name.lower()}",
                    "quantize the KV cache once (one quantize-kv-cache in the pipeline)",
                )
        if self.needs_calibration:
            raise UsageError(
                f"{self.name} needs calibration data and was given none",
                "pass batches=fdec.calibrate.calibration_batches(...) (or absmax=...) to the pass",
            )

    def _absmax(self, model: FdecModel, names: list[str]) -> dict[str, np.ndarray]:
        if self.absmax is not None:
            return {name: np.asarray(self.absmax[name], np.float32) for name in names}
        assert self.batches is not None
        found: dict[str, np.ndarray] = {}
        for ids in _stacks(self.batches):
            for name, array in capture_activations(model, ids, names).items():
                if array.size == 0:
                    continue
                # [batch, kv_heads, seq, head_dim] → one absmax per head
                head = np.abs(array.astype(np.float32)).max(axis=(0, 2, 3))
                found[name] = np.maximum(found[name], head) if name in found else head
        return found

    def call(self, model: FdecModel) -> PassResult:
        if self.dtype == "fp16":
            return self._cast(model)
        spec = model.spec
        graph = model.graph
        names = kv_cache_names(spec.num_layers)
        absmax = self._absmax(model, [present for _, present in names])
        missing = [present for _, present in names if present in absmax] != [
            present for _, present in names
        ]
        if missing:
            raise CompileError(
                f"{self.name}: calibration gave no values for some present.* outputs",
                "calibrate with non-empty token batches",
            )
        code_type, _ = KV_DTYPES[self.dtype]
        float_type = next(v for v in graph.inputs if v.name == names[0][0]).dtype
        opset_raised = raise_opset(model, _OPSET[self.dtype])
        taken: set[str] = set()
        ranges: list[dict[str, Any]] = []
        zero_points: dict[int, ir.Value] = {}
        for past_name, present_name in names:
            scales = per_head_scales(absmax[present_name], self.dtype)
            heads = int(scales.shape[0])
            if heads not in zero_points:
                zero = ir.Tensor(np.zeros(heads, dtype=code_type.numpy()), dtype=code_type)
                zero_points[heads] = add_initializer(
                    graph, fresh_name(graph, f"kv_{self.dtype}_zero_point_{heads}", taken), zero
                )
            scale = add_initializer(
                graph,
                fresh_name(graph, f"{present_name}_scale", taken),
                ir.tensor(scales.astype(float_type.numpy())),
            )
            _quantize_io(graph, past_name, present_name, scale, zero_points[heads], code_type)
            ranges.append(
                {
                    "tensor": present_name,
                    "scale_min": float(scales.min()),
                    "scale_max": float(scales.max()),
                    "absmax": float(np.max(absmax[present_name])),
                }
            )
        before = kv_bytes_per_token(spec, int(float_type.itemsize))
        stats = {
            "dtype": self.dtype,
            "tensors": len(names),
            "scales_per_tensor": spec.num_kv_heads,
            "scale_ranges": ranges,
            "bytes_per_token_before": before,
            "bytes_per_token_after": kv_bytes_per_token(spec, 1),
            "opset_raised": opset_raised,
        }
        return PassResult(model, modified=True, stats=stats)

    def _cast(self, model: FdecModel) -> PassResult:
        """An fp16 cache for an fp32 graph: Cast at the cache I/O, no scales."""
        spec, graph = model.spec, model.graph
        names = kv_cache_names(spec.num_layers)
        float_type = next(v for v in graph.inputs if v.name == names[0][0]).dtype
        if float_type == ir.DataType.FLOAT16:
            return PassResult(model, modified=False, stats={"dtype": "fp16", "tensors": 0})
        for past_name, present_name in names:
            _rewrite_io(
                graph,
                past_name,
                present_name,
                ir.DataType.FLOAT16,
                lambda value: ir.node("Cast", [value], {"to": float_type}),
                lambda value: ir.node("Cast", [value], {"to": ir.DataType.FLOAT16}),
            )
        stats = {
            "dtype": "fp16",
            "tensors": len(names),
            "bytes_per_token_before": kv_bytes_per_token(spec, int(float_type.itemsize)),
            "bytes_per_token_after": kv_bytes_per_token(spec, 2),
        }
        return PassResult(model, modified=True, stats=stats)


def _quantize_io(
    graph: ir.Graph,
    past_name: str,
    present_name: str,
    scale: ir.Value,
    zero_point: ir.Value,
    code_type: ir.DataType,
) -> None:
    """`past_name` becomes a `code_type` input dequantized right away; `present_name` the
    quantized float value that was the output (per-head scales on axis 1)."""
    _rewrite_io(
        graph,
        past_name,
        present_name,
        code_type,
        lambda value: ir.node("DequantizeLinear", [value, scale, zero_point], {"axis": 1}),
        lambda value: ir.node("QuantizeLinear", [value, scale, zero_point], {"axis": 1}),
    )


def _rewrite_io(
    graph: ir.Graph,
    past_name: str,
    present_name: str,
    code_type: ir.DataType,
    decode: Any,
    encode: Any,
) -> None:
    """Give the cache input and output `code_type`: `decode(new input)` replaces the float
    input for its readers, `encode(float present)` becomes the output of the same name."""
    index = next(i for i, v in enumerate(graph.inputs) if v.name == past_name)
    old_past = graph.inputs[index]
    new_past = ir.Value(name=past_name, shape=old_past.shape, type=ir.TensorType(code_type))
    decoder = decode(new_past)
    decoder.name = f"{past_name}_{decoder.op_type}"
    decoded = decoder.outputs[0]
    decoded.name, decoded.shape, decoded.type = f"{past_name}_float", old_past.shape, old_past.type
    old_past.name = None
    ir.convenience.replace_all_uses_with(old_past, decoded)
    graph.inputs[index] = new_past
    graph.insert_before(graph.node(0), decoder)

    index = next(i for i, v in enumerate(graph.outputs) if v.name == present_name)
    old_present = graph.outputs[index]
    old_present.name = f"{present_name}_float"
    encoder = encode(old_present)
    encoder.name = f"{present_name}_{encoder.op_type}"
    encoded = encoder.outputs[0]
    encoded.name, encoded.shape = present_name, old_present.shape
    encoded.type = ir.TensorType(code_type)
    graph.outputs[index] = encoded
    producer = old_present.producer()
    if producer is not None and producer.graph is graph:
        graph.insert_after(producer, encoder)
    else:
        graph.append(encoder)


# model.onnx metadata key holding the cache policy as JSON (read by fdec.runtime.OrtModel and
# copied into fdec-runtime.json's kv_cache.policy by the lowering).
KV_POLICY_METADATA = "fdec.kv_policy"


@dataclasses.dataclass(eq=False)
class KvPolicyPass(Pass):
    """Record a KV-cache compression policy (attention sink + sliding window) in the model.

    The runtime applies it: once the cache holds more than `sink + window` positions, the
    positions between the first `sink` and the last `window` are dropped from the past
    (fdec.runtime.generate). Positions keep counting (keys are cached after RoPE, so each kept
    key keeps its true position). In a fused graph without sinks, GroupQueryAttention's
    `local_window_size` (= window + 1: ONNX Runtime counts the query itself) is the same window
    natively (each query sees itself and the `window` positions before it); the cache buffer
    is then not trimmed. GroupQueryAttention has no sinks: a policy with `sink > 0` needs the
    unfused graph.

    A model with its own sliding window (Mistral's `sliding_window`) gets this pass without
    --kv-window (`model_window`, fdec.compile.resolve): GroupQueryAttention takes the window
    as above, and a graph without it keeps the window in its traced mask, so nothing is
    trimmed and the build attends exactly as the source does.
    """

    name: ClassVar[str] = "kv-policy"
    family: ClassVar[str] = "kv_cache"
    summary: ClassVar[str] = "KV-cache sliding window / attention sink (--kv-window, --kv-sink)"
    # Exact while sequences fit the window; beyond it the model attends to less on purpose.
    tolerance: ClassVar[Tolerance] = Tolerance()
    added_by: ClassVar[str | None] = "--kv-window W (and --kv-sink K)"

    window: int = dataclasses.field(default=0, kw_only=True)
    sink: int = dataclasses.field(default=0, kw_only=True)
    # the past positions the model's own sliding window keeps (0: the model has none)
    model_window: int = dataclasses.field(default=0, kw_only=True)
    # the layers that window is on, where the model windows some only (Gemma 2/3): the others
    # attend to every position (empty: the window is on every layer)
    model_window_layers: tuple[int, ...] = dataclasses.field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        if self.window < 1 or self.sink < 0:
            raise UsageError(
                f"kv-policy needs window ≥ 1 and sink ≥ 0, got window {self.window}, sink "
                f"{self.sink}",
                "pass --kv-window N (N ≥ 1) and optionally --kv-sink K (K ≥ 0)",
            )

    def requires(self, model: FdecModel, target: Any = None) -> None:
        if not model.spec.is_decoder or not model.spec.num_layers:
            raise UsageError(
                f"--kv-window applies to decoders with a KV cache; {model.spec.family} has none",
                "drop --kv-window / --kv-sink",
            )
        if self.sink and any(_is_gqa(node) for node in model.graph):
            raise UsageError(
                "attention sinks (--kv-sink) need the unfused graph: GroupQueryAttention "
                "has no sink positions",
                "drop fuse-attention from --passes, or drop --kv-sink (a plain window fuses)",
            )

    def call(self, model: FdecModel) -> PassResult:
        native = 0
        attention = [node for node in model.graph if _is_gqa(node)] if not self.sink else []
        layers = set(self.model_window_layers or range(len(attention)))
        if attention and self.model_window_layers and len(attention) != model.spec.num_layers:
            raise ValueError(
                f"kv-policy: {len(attention)} GroupQueryAttention nodes for "
                f"{model.spec.num_layers} layers; the window's layers cannot be placed"
            )
        # One GroupQueryAttention per layer, in layer order (each reads the layer before).
        for layer, node in enumerate(attention):
            if layer in layers:
                # ORT counts the query's own position in the window (measured):
                # the cached `window` positions plus the current one.
                node.attributes["local_window_size"] = ir.AttrInt64(
                    "local_window_size", self.window + 1
                )
                native += 1
        # The model's own window on a graph without GroupQueryAttention: the traced attention
        # masks it (fdec.frontend.export keeps the mask), so the runtime trims nothing.
        traced = not attention and self.model_window == self.window and not self.sink
        policy = {
            "sink": self.sink,
            "window": self.window,
            "native_window": bool(attention) or traced,
        }
        if self.model_window:
            policy["model_window"] = self.model_window
        if self.model_window_layers:
            policy["model_window_layers"] = list(self.model_window_layers)
        model.model.metadata_props[KV_POLICY_METADATA] = json.dumps(policy, sort_keys=True)
        stats = {**policy, "gqa_nodes": native, "max_cache_tokens": self.sink + self.window}
        return PassResult(model, modified=True, stats=stats)


_KV_DTYPES = ("fp32", "fp16", "int8", "fp8")


@dataclasses.dataclass(frozen=True)
class ModelWindow:
    """A model's own sliding window: the past positions each query sees (`past`, one less than
    transformers' `sliding_window`) on `layers` (None: every layer)."""

    past: int
    layers: tuple[int, ...] | None = None


def kv_cache_passes(
    kv_dtype: str | None,
    kv_window: int | None,
    kv_sink: int | None,
    *,
    model_window: ModelWindow | None = None,
) -> list[Pass]:
    """quantize-kv-cache for --kv-dtype fp16/int8/fp8; kv-policy for --kv-window/--kv-sink and
    for a model with its own sliding window, which --kv-window may narrow, not widen. A window
    the model has on some layers only stays on those layers; --kv-window narrows every layer
    (then the policy is that window alone)."""
    if kv_dtype is not None and kv_dtype not in _KV_DTYPES:
        raise UsageError(f"unknown --kv-dtype {kv_dtype!r}", f"use one of: {', '.join(_KV_DTYPES)}")
    if kv_sink and not kv_window:
        raise UsageError("--kv-sink needs --kv-window", "add --kv-window W (positions kept)")
    past = model_window.past if model_window else 0
    if past and kv_window and kv_window > past:
        raise UsageError(
            f"--kv-window {kv_window} is wider than the model's own sliding window (each "
            f"position sees the {past} before it)",
            f"give --kv-window {past} or less, or drop it (the model's window applies)",
        )
    passes: list[Pass] = []
    # fp16: a Cast at the cache I/O of the fp32 graph; fp32 (or none): the graph's own cache.
    if kv_dtype in ("fp16", "int8", "fp8"):
        passes.append(QuantizeKvCachePass(dtype=kv_dtype))
    layers = model_window.layers if model_window else None
    if kv_window:  # the user's window, on every layer: the model's own only where it is too
        own = past if layers is None else 0
        passes.append(KvPolicyPass(window=kv_window, sink=kv_sink or 0, model_window=own))
    elif past:
        passes.append(
            KvPolicyPass(window=past, model_window=past, model_window_layers=layers or ())
        )
    return passes


def _is_gqa(node: ir.Node) -> bool:
    return node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft"


def runtime_trim(pipeline: Sequence[Any]) -> str | None:
    """Why a build planned as `pipeline` gets a KV cache its runtime trims (None where it may
    not): a kv-policy with attention sinks always, and a window where no fuse-attention is
    planned before it (only GroupQueryAttention applies a window itself). A planned fusion
    may still keep a graph's traced attention (a head size GroupQueryAttention refuses);
    the written build's policy (`native_window`) then says so."""
    from fdec.passes.fusion import FuseAttentionPass

    fused = False
    for pass_ in pipeline:
        fused = fused or isinstance(pass_, FuseAttentionPass)
        if isinstance(pass_, KvPolicyPass):
            if pass_.window == pass_.model_window and not pass_.sink:
                return None  # the model's own window: in the traced mask or GQA's
            if pass_.sink:
                return f"--kv-sink {pass_.sink}: GroupQueryAttention has no sink positions"
            if not fused:
                return f"--kv-window {pass_.window} on a graph without fused attention"
    return None
