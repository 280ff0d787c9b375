"""Quantization passes: weight-only int4 (RTN, block-wise) and dynamic int8 for the CPU.

Both passes rewrite the MatMul/Gemm nodes that read a weight the ModelSpec names (per-layer
q/k/v/qkv/o/gate/up/down/fc_in/fc_out and, unless told otherwise, the lm_head). Weights are
expected in [in, out] = [K, N] layout as MatMul's B (FoldConstantsPass folds transposes);
a weight still read through `Transpose(perm=[1, 0])`, or by `Gemm(transB=1)`, is handled too.
Each rewritten weight's role in `ModelSpec.weights` is pointed at its new quantized
initializer, and the fp32 original is removed.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import pathlib
import re
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from fdec.errors import CompileError, UsageError
from fdec.ir import FdecModel
from fdec.pipeline import Pass, PassResult, Tolerance

__all__ = ["QuantizeInt4Pass", "QuantizeInt8Pass"]

logger = logging.getLogger(__name__)

# Per-layer roles whose weight is a linear layer's [K, N] matrix (the embedding is a Gather).
_LINEAR_ROLES = frozenset({"q", "k", "v", "qkv", "o", "gate", "up", "down", "fc_in", "fc_out"})
_LAYER_ROLE = re.compile(r"^layers\.\d+\.(\w+)$")
_MS_DOMAIN = "com.microsoft"
_BLOCK_SIZES = (32, 64, 128)
_INT4_BACKENDS = ("onnxruntime", "tensorrt")
_QDQ_OPSET = 21  # blocked DequantizeLinear (block_size attribute) and INT4/UINT4 tensors
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})


# --- finding the weights and the nodes that read them -----------------------------------------


@dataclasses.dataclass
class _Site:
    """One node computing `A @ W` (+ bias) with W a quantizable weight."""

    node: ir.Node  # MatMul or Gemm
    activation: ir.Value
    bias: ir.Value | None = None


@dataclasses.dataclass
class _Weight:
    """A weight initializer, its [K, N] array and every site reading it."""

    value: ir.Value
    array: np.ndarray  # [K, N], float32
    dtype: ir.DataType  # the original dtype (scales keep it)
    sites: list[_Site]
    transposes: list[ir.Node]  # Transpose nodes between the weight and its sites


def _candidate_names(model: FdecModel, include_lm_head: bool) -> list[str]:
    """Initializer names (in spec order, no repeats) whose role is a quantizable linear layer."""
    names: list[str] = []
    for role, name in model.spec.weights.items():
        match = _LAYER_ROLE.match(role)
        wanted = (match is not None and match.group(1) in _LINEAR_ROLES) or (
            role == "lm_head" and include_lm_head
        )
        if wanted and name not in names:
            names.append(name)
    return names


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_float()


def _matmul_site(node: ir.Node, index: int, *, through_transpose: bool) -> tuple[_Site, bool]:
    """A site for `node` reading the weight at input `index`; (site, reads W transposed).

    Raises ValueError naming the reason when the node is not a plain `A @ W (+ bias)`.
    """
    if node.domain != "" or node.op_type not in ("MatMul", "Gemm") or index != 1:
        raise ValueError(f"read by {node.op_type or 'a node'} (input {index})")
    activation = node.inputs[0]
    if activation is None:
        raise ValueError(f"{node.op_type} without an activation")
    if node.op_type == "MatMul":
        return _Site(node, activation), through_transpose
    if _int_attr(node, "transA", 0) or _float_attr(node, "alpha", 1.0) != 1.0:
        raise ValueError("Gemm with transA or alpha")
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and _float_attr(node, "beta", 1.0) != 1.0:
        raise ValueError("Gemm with beta")
    transposed = bool(_int_attr(node, "transB", 0)) != through_transpose
    return _Site(node, activation, bias), transposed


def _find_weight(graph: ir.Graph, name: str) -> _Weight:
    """The weight `name` with every site reading it; ValueError names why it cannot be."""
    value = graph.initializers.get(name)
    tensor = value.const_value if value is not None else None
    if value is None or tensor is None:
        raise ValueError("not an initializer with data")
    if tensor.dtype not in _FLOAT_TYPES:
        raise ValueError("not a float weight")
    if len(tensor.shape) != 2:
        raise ValueError("not a 2-D weight")
    if value.is_graph_input() or value.is_graph_output():
        raise ValueError("a graph input or output")
    sites: list[_Site] = []
    transposes: list[ir.Node] = []
    layouts: set[bool] = set()
    for use in value.uses():
        node = use.node
        if node.graph is not graph:
            raise ValueError("read inside a subgraph")
        if node.op_type == "Transpose" and node.domain == "":
            perm = node.attributes.get("perm")
            if perm is not None and list(perm.as_ints()) != [1, 0]:
                raise ValueError("read by a Transpose that is not [1, 0]")
            if node.outputs[0].is_graph_output():
                raise ValueError("transposed into a graph output")
            transposes.append(node)
            for inner in node.outputs[0].uses():
                site, transposed = _matmul_site(inner.node, inner.idx, through_transpose=True)
                sites.append(site)
                layouts.add(transposed)
            continue
        site, transposed = _matmul_site(node, use.idx, through_transpose=False)
        sites.append(site)
        layouts.add(transposed)
    if not sites:
        raise ValueError("read by no MatMul")
    if len(layouts) != 1:
        raise ValueError("read in two layouts")
    array = tensor.numpy().astype(np.float32)
    if layouts.pop():
        array = array.T
    return _Weight(value, np.ascontiguousarray(array), tensor.dtype, sites, transposes)


def _collect(
    model: FdecModel, include_lm_head: bool
) -> tuple[list[_Weight], collections.Counter[str]]:
    """The quantizable weights of `model`, and why the others were skipped (reason → count)."""
    weights: list[_Weight] = []
    skipped: collections.Counter[str] = collections.Counter()
    embed = model.spec.weights.get("embed")
    for name in _candidate_names(model, include_lm_head):
        if name == embed:
            skipped["shared with the embedding"] += 1
            continue
        try:
            weights.append(_find_weight(model.graph, name))
        except ValueError as reason:
            logger.info("not quantizing %s: %s", name, reason)
            skipped[str(reason)] += 1
    return weights, skipped


def _fresh_name(graph: ir.Graph, wanted: str, taken: set[str]) -> str:
    name = wanted
    while name in graph.initializers or name in taken:
        name = "_" + name
    taken.add(name)
    return name


def _add_initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    value = ir.Value(
        name=name,
        shape=ir.Shape(tensor.shape),
        type=ir.TensorType(tensor.dtype),
        const_value=tensor,
    )
    graph.register_initializer(value)
    return value


def _replace(graph: ir.Graph, site: _Site, new_nodes: list[ir.Node]) -> None:
    """Put `new_nodes` where `site.node` was; the last one's output takes over its output."""
    ir.convenience.replace_nodes_and_values(
        graph,
        insertion_point=site.node,
        old_nodes=[site.node],
        new_nodes=new_nodes,
        old_values=[site.node.outputs[0]],
        new_values=[new_nodes[-1].outputs[0]],
    )


def _retire(graph: ir.Graph, weight: _Weight) -> None:
    """Remove the weight's Transposes and the weight itself (its sites are gone)."""
    for node in weight.transposes:
        graph.remove(node, safe=True)
    name = weight.value.name
    assert name is not None and not weight.value.uses()
    graph.initializers.pop(name)


# --- int4 -------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Int4Weight:
    """A [K, N] weight quantized in blocks of `block_size` along K, in MatMulNBits layout.

    `codes` are the 4-bit values 0..15 as [N, K]; the dequantized weight is
    `(codes - zero_points) * scales` block by block (symmetric: zero point 8).
    """

    packed: np.ndarray  # uint8 [N, k_blocks, block_size // 2], low nibble first along K
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(k_blocks / 2)], packed; None = symmetric
    k: int
    n: int
    block_size: int

    @property
    def k_blocks(self) -> int:
        return self.scales.shape[1]

    def codes(self) -> np.ndarray:
        """The 4-bit codes as uint8 [N, K] (the padding past K dropped)."""
        low, high = self.packed & 0x0F, self.packed >> 4
        codes = np.stack([low, high], axis=-1).reshape(self.n, -1)
        return codes[:, : self.k]

    def unpacked_zero_points(self) -> np.ndarray:
        """Zero points as uint8 [N, k_blocks] (8 everywhere when symmetric)."""
        if self.zero_points is None:
            return np.full((self.n, self.k_blocks), 8, dtype=np.uint8)
        low, high = self.zero_points & 0x0F, self.zero_points >> 4
        return np.stack([low, high], axis=-1).reshape(self.n, -1)[:, : self.k_blocks]


def _quantize_int4(array: np.ndarray, block_size: int, symmetric: bool) -> _Int4Weight:
    """RTN 4-bit quantization of a [K, N] float32 array with ONNX Runtime's own kernel.

    The kernel (the one `onnxruntime.quantization.matmul_nbits_quantizer` calls) writes into
    the arrays it is given, so they must be contiguous and of the exact dtypes. Symmetric
    scales are max/-8 of the value with the largest magnitude (its sign kept); asymmetric
    ranges include zero, scale (max - min)/15.
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    k, n = array.shape
    k_blocks = -(-k // block_size)
    packed = np.zeros((n, k_blocks, block_size // 2), dtype=np.uint8)
    scales = np.zeros((n, k_blocks), dtype=np.float32)
    zero_points = np.zeros((n, -(-k_blocks // 2)), dtype=np.uint8)
    weights = np.ascontiguousarray(array, dtype=np.float32)
    quantize_matmul_4bits(packed, weights, scales, zero_points, block_size, n, k, symmetric)
    return _Int4Weight(packed, scales, None if symmetric else zero_points, k, n, block_size)


def _raise_opset(model: FdecModel, version: int) -> bool:
    """Make the default-domain opset at least `version`; True when it changed.

    onnxscript's version converter upgrades every node whose meaning changed on the way (from
    20 to 21 only GroupNormalization does, and it has an adapter; the rest widen types).
    """
    current = model.model.opset_imports.get("", 1)
    if current >= version:
        return False
    from onnxscript import version_converter

    version_converter.convert_version(model.model, target_version=version)
    reached = model.model.opset_imports.get("", 1)
    if reached < version:
        raise CompileError(
            f"could not raise the model's opset from {current} to {version} (reached {reached})",
            "use quantize-int4 with backend=onnxruntime, or report the model",
        )
    return True


def _empty_stats() -> dict[str, Any]:
    return {
        "matmuls_quantized": 0,
        "weights_quantized": 0,
        "skipped": {},
        "bytes_before": 0,
        "bytes_after": 0,
    }


def _require_untied(pass_name: str, model: FdecModel, include_lm_head: bool) -> None:
    spec = model.spec
    if include_lm_head and spec.tie_word_embeddings and "lm_head" in spec.weights:
        raise UsageError(
            f"{pass_name} cannot quantize the lm_head: it is tied to the token embedding",
            f"run untie-embeddings before {pass_name}, or set include_lm_head=False",
        )


@dataclasses.dataclass
class QuantizeInt4Pass(Pass):
    """Weight-only 4-bit round-to-nearest quantization of the linear layers' weights.

    Each weight [K, N] is cut into blocks of `block_size` along K; each block gets a scale
    (and, when not `symmetric`, a 4-bit zero point). No calibration data is used.

    Backends:
    - "onnxruntime": com.microsoft `MatMulNBits` (packed uint8 B [N, k_blocks, block/2],
      scales [N, k_blocks], packed zero points), run by ONNX Runtime's CPU and GPU EPs;
      `accuracy_level` 4 lets the CPU kernel quantize activations to int8 on the fly.
    - "tensorrt": standard ONNX only: blocked `DequantizeLinear` (INT4 / UINT4 weights
      [K, N], scales [k_blocks, N], axis 0) feeding `MatMul`; the model's opset is raised
      to 21. Same quantized values as "onnxruntime".

    A tied lm_head shares the embedding (read by Gather) and cannot be quantized here:
    put `untie-embeddings` before this pass, or set `include_lm_head=False`.
    """

    name = "quantize-int4"
    family = "quantize"
    summary = "weight-only 4-bit RTN block quantization of linear weights (MatMulNBits or QDQ)"
    # int4 RTN is lossy, and the max logit error grows with the model's logit range, so these
    # bounds only catch a broken rewrite (wrong packing, overflow: errors in the hundreds,
    # top-1 near 0). Measured against PyTorch on 128 held tokens:
    #   tests' tiny random llama/gpt2: max error 0.47–0.78, top-1 0.62–0.77 (block 32/64/128,
    #   sym/asym); SmolLM2-135M: max error 12.5 (block 32 sym), 16.9 (asym), 19.4 (block 128),
    #   top-1 0.51–0.59, perplexity 54.0 → 70.9–77.8.
    # Quality is gated on perplexity by the pipeline, not here.
    tolerance = Tolerance(max_abs_error=25.0, min_top1_agreement=0.45)

    block_size: int = dataclasses.field(default=32, kw_only=True)
    symmetric: bool = dataclasses.field(default=True, kw_only=True)
    accuracy_level: int = dataclasses.field(default=4, kw_only=True)
    include_lm_head: bool = dataclasses.field(default=True, kw_only=True)
    backend: str = dataclasses.field(default="onnxruntime", kw_only=True)

    def __post_init__(self) -> None:
        if self.block_size not in _BLOCK_SIZES:
            raise UsageError(
                f"{self.name} block_size {self.block_size} is not supported",
                f"use one of {', '.join(map(str, _BLOCK_SIZES))}",
            )
        if self.backend not in _INT4_BACKENDS:
            raise UsageError(
                f"{self.name} backend {self.backend!r} is unknown",
                f"use one of {', '.join(_INT4_BACKENDS)}",
            )
        if self.accuracy_level not in range(5):
            raise UsageError(
                f"{self.name} accuracy_level {self.accuracy_level} is not 0–4",
                "use 4 (int8 activations on the CPU) or 0 (unset)",
            )

    def requires(self, model: FdecModel, target: Any = None) -> None:
        _require_untied(self.name, model, self.include_lm_head)

    def check_target(self, target: Any) -> None:
        if target is not None and hasattr(target, "require"):
            target.require("int4")

    def call(self, model: FdecModel) -> PassResult:
        weights, skipped = _collect(model, self.include_lm_head)
        return self._quantize_weights(model, weights, skipped)

    def _quantize_weights(
        self, model: FdecModel, weights: list[_Weight], skipped: collections.Counter[str]
    ) -> PassResult:
        """Quantize `weights` (from `_collect`): each one's `array` is what gets quantized.

        Subclasses that transform the fp32 arrays first (AWQ's scaling) call this to emit the
        same MatMulNBits / DequantizeLinear form; `skipped` is reported as is.
        """
        graph = model.graph
        taken: set[str] = set()
        stats = _empty_stats()
        if not weights:
            stats["skipped"] = dict(skipped)
            return PassResult(model, modified=False, stats=stats)
        if self.backend == "tensorrt":
            stats["opset_raised"] = _raise_opset(model, _QDQ_OPSET)
        else:
            model.model.opset_imports.setdefault(_MS_DOMAIN, 1)
        for weight in weights:
            old_name = weight.value.name
            assert old_name is not None
            quantized = _quantize_int4(weight.array, self.block_size, self.symmetric)
            if self.backend == "tensorrt":
                new_name, added = self._rewrite_qdq(graph, weight, quantized, taken)
            else:
                new_name, added = self._rewrite_nbits(graph, weight, quantized, taken)
            stats["bytes_before"] += weight.value.const_value.nbytes
            stats["bytes_after"] += added
            stats["matmuls_quantized"] += len(weight.sites)
            stats["weights_quantized"] += 1
            _retire(graph, weight)
            model.spec.rename_weight(old_name, new_name)
        stats["skipped"] = dict(skipped)
        return PassResult(model, modified=True, stats=stats)

    def _rewrite_nbits(
        self, graph: ir.Graph, weight: _Weight, q: _Int4Weight, taken: set[str]
    ) -> tuple[str, int]:
        base = weight.value.name
        b = _add_initializer(graph, _fresh_name(graph, f"{base}_Q4", taken), ir.tensor(q.packed))
        scales = _add_initializer(
            graph,
            _fresh_name(graph, f"{base}_scales", taken),
            ir.tensor(q.scales.astype(weight.dtype.numpy())),
        )
        zero_points = None
        if q.zero_points is not None:
            zero_points = _add_initializer(
                graph, _fresh_name(graph, f"{base}_zero_points", taken), ir.tensor(q.zero_points)
            )
        attributes = {"K": q.k, "N": q.n, "bits": 4, "block_size": q.block_size}
        if self.accuracy_level:
            attributes["accuracy_level"] = self.accuracy_level
        for site in weight.sites:
            inputs = [site.activation, b, scales, zero_points]
            if site.bias is not None:
                inputs += [None, site.bias]
            while inputs[-1] is None:
                inputs.pop()
            node = ir.node(
                "MatMulNBits",
                inputs,
                attributes,
                domain=_MS_DOMAIN,
                name=f"{site.node.name or base}_Q4",
            )
            _replace(graph, site, [node])
        added = sum(v.const_value.nbytes for v in (b, scales, zero_points) if v is not None)
        return b.name, added

    def _rewrite_qdq(
        self, graph: ir.Graph, weight: _Weight, q: _Int4Weight, taken: set[str]
    ) -> tuple[str, int]:
        base = weight.value.name
        codes = q.codes().T  # [K, N], 0..15
        zero_points = None
        if q.zero_points is None:
            values = (codes.astype(np.int8) - 8).astype(ml_dtypes.int4)
            tensor = ir.Tensor(values, dtype=ir.DataType.INT4)
        else:
            tensor = ir.Tensor(codes.astype(ml_dtypes.uint4), dtype=ir.DataType.UINT4)
            zp = q.unpacked_zero_points().T.astype(ml_dtypes.uint4)  # [k_blocks, N]
            zero_points = _add_initializer(
                graph,
                _fresh_name(graph, f"{base}_zero_points", taken),
                ir.Tensor(np.ascontiguousarray(zp), dtype=ir.DataType.UINT4),
            )
        b = _add_initializer(graph, _fresh_name(graph, f"{base}_Q4", taken), tensor)
        scales = _add_initializer(
            graph,
            _fresh_name(graph, f"{base}_scales", taken),
            ir.tensor(np.ascontiguousarray(q.scales.T).astype(weight.dtype.numpy())),
        )
        for site in weight.sites:
            prefix = site.node.name or base
            inputs = [b, scales] + ([zero_points] if zero_points is not None else [])
            dequantize = ir.node(
                "DequantizeLinear",
                inputs,
                {"axis": 0, "block_size": q.block_size},
                name=f"{prefix}_DQ_Q4",
            )
            matmul = ir.node(
                "MatMul", [site.activation, dequantize.outputs[0]], name=f"{prefix}_MatMul_Q4"
            )
            nodes = [dequantize, matmul]
            if site.bias is not None:
                nodes.append(ir.node("Add", [matmul.outputs[0], site.bias], name=f"{prefix}_bias"))
            _replace(graph, site, nodes)
        added = sum(v.const_value.nbytes for v in (b, scales, zero_points) if v is not None)
        return b.name, added


# --- int8 -------------------------------------------------------------------------------------


def _cpu_has_vnni(flags: str) -> bool:
    """Whether CPU flags text (a /proc/cpuinfo `flags` line, or all of /proc/cpuinfo) has VNNI.

    VNNI (AVX512_VNNI, AVX_VNNI) multiplies u8×s8 into int32 directly; without it, ONNX
    Runtime's x86 kernels add u8×s8 pairs in int16 (vpmaddubsw), which saturates for
    full-range int8 weights.
    """
    return not _VNNI_FLAGS.isdisjoint(re.split(r"[\s:]+", flags.lower()))


def _host_cpu_flags() -> str:
    """The `flags` line of this machine's /proc/cpuinfo ("" where there is none)."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith("flags"):
            return line
    return ""


def _quantize_int8(array: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric int8 of a [K, N] array: (int8 [K, N], float32 scales [N])."""
    peak = np.abs(array).max(axis=0)
    scales = np.where(peak > 0, peak / qmax, 1.0).astype(np.float32)
    codes = np.clip(np.rint(array / scales), -qmax, qmax).astype(np.int8)
    return codes, scales


@dataclasses.dataclass
class QuantizeInt8Pass(Pass):
    """Dynamic int8 for the CPU: int8 weights per output channel, activations at run time.

    Each `A @ W` becomes `DynamicQuantizeLinear(A)` (uint8, per tensor, once per activation
    shared by several weights) → `MatMulInteger` with symmetric per-channel int8 W →
    `Cast` → `Mul` by (activation scale × weight scales), all standard ONNX; ONNX Runtime
    fuses the chain into its DynamicQuantizeMatMul / MatMulIntegerToFloat kernels.

    `reduce_range` keeps weights in 7 bits (±63): x86 CPUs without VNNI add u8×s8 pairs in
    int16, which overflows with full-range weights (DESIGN.md: perplexity 6×10⁷). None picks
    it from this machine's CPU flags: reduce the range unless the CPU has VNNI.
    """

    name = "quantize-int8"
    family = "quantize"
    summary = "dynamic int8 (per-channel int8 weights, run-time uint8 activations) for the CPU"
    # Dynamic int8 is lossy (activations are quantized per tensor at run time); as for int4
    # the bounds only catch a broken rewrite (the AVX2 overflow gave perplexity 6×10⁷).
    # Measured against PyTorch on 128 held tokens: tests' tiny llama/gpt2: max error
    # 0.07–0.19, top-1 0.88–0.97 (full range and reduce_range); SmolLM2-135M: max error
    # 16.1–17.0, top-1 0.56–0.59, perplexity 54.0 → 84.6–86.2 (as DESIGN.md measured).
    tolerance = Tolerance(max_abs_error=25.0, min_top1_agreement=0.45)

    reduce_range: bool | None = dataclasses.field(default=None, kw_only=True)
    include_lm_head: bool = dataclasses.field(default=True, kw_only=True)

    def requires(self, model: FdecModel, target: Any = None) -> None:
        _require_untied(self.name, model, self.include_lm_head)

    def check_target(self, target: Any) -> None:
        if target is not None and getattr(target, "is_gpu", False):
            raise UsageError(
                f"quantize-int8 is dynamic int8 for the CPU; {target.name} is a GPU",
                "use quantize-int4 for GPU targets",
            )

    def _choose_reduce_range(self) -> tuple[bool, str]:
        if self.reduce_range is not None:
            return self.reduce_range, "option"
        if _cpu_has_vnni(_host_cpu_flags()):
            return False, "auto: this CPU has VNNI"
        return True, "auto: no VNNI on this CPU (u8×s8 pairs would overflow int16)"

    def call(self, model: FdecModel) -> PassResult:
        graph = model.graph
        reduce_range, reason = self._choose_reduce_range()
        qmax = 63 if reduce_range else 127
        weights, skipped = _collect(model, self.include_lm_head)
        stats = {
            **_empty_stats(),
            "activation_quantizers": 0,
            "reduce_range": reduce_range,
            "reduce_range_reason": reason,
        }
        taken: set[str] = set()
        quantizers: dict[int, ir.Node] = {}  # id(activation) → its DynamicQuantizeLinear
        for weight in weights:
            if any(site.activation.dtype not in (None, ir.DataType.FLOAT) for site in weight.sites):
                skipped["activation is not float32"] += 1
                continue
            old_name = weight.value.name
            assert old_name is not None
            codes, scales = _quantize_int8(weight.array, qmax)
            b = _add_initializer(
                graph, _fresh_name(graph, f"{old_name}_Q8", taken), ir.tensor(codes)
            )
            w_scale = _add_initializer(
                graph, _fresh_name(graph, f"{old_name}_scales", taken), ir.tensor(scales)
            )
            for site in weight.sites:
                quantizer = quantizers.get(id(site.activation))
                if quantizer is None:
                    quantizer = self._activation_quantizer(graph, site)
                    quantizers[id(site.activation)] = quantizer
                a_q, a_scale, a_zero = quantizer.outputs
                prefix = site.node.name or old_name
                matmul = ir.node("MatMulInteger", [a_q, b, a_zero], name=f"{prefix}_MatMulInteger")
                cast = ir.node(
                    "Cast", [matmul.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{prefix}_Cast"
                )
                scale = ir.node("Mul", [a_scale, w_scale], name=f"{prefix}_scale")
                output = ir.node("Mul", [cast.outputs[0], scale.outputs[0]], name=f"{prefix}_Mul")
                nodes = [matmul, cast, scale, output]
                if site.bias is not None:
                    nodes.append(
                        ir.node("Add", [output.outputs[0], site.bias], name=f"{prefix}_bias")
                    )
                _replace(graph, site, nodes)
            stats["bytes_before"] += weight.value.const_value.nbytes
            stats["bytes_after"] += int(codes.nbytes + scales.nbytes)
            stats["matmuls_quantized"] += len(weight.sites)
            stats["weights_quantized"] += 1
            _retire(graph, weight)
            model.spec.rename_weight(old_name, b.name)
        stats["activation_quantizers"] = len(quantizers)
        stats["skipped"] = dict(skipped)
        return PassResult(model, modified=stats["weights_quantized"] > 0, stats=stats)

    @staticmethod
    def _activation_quantizer(graph: ir.Graph, site: _Site) -> ir.Node:
        """A DynamicQuantizeLinear of the site's activation, placed right after its producer."""
        activation = site.activation
        name = f"{activation.name or site.node.name}_DynamicQuantizeLinear"
        node = ir.node("DynamicQuantizeLinear", [activation], num_outputs=3, name=name)
        producer = activation.producer()
        if producer is not None and producer.graph is graph:
            graph.insert_after(producer, node)
        else:  # a graph input or an initializer: available from the start
            graph.insert_before(graph.node(0), node)
        return node
