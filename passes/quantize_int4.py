"""Weight-only int4 and int8 (RTN, block-wise) for ONNX Runtime (MatMulNBits) and TensorRT (blocked Q/DQ), and the block codes the other int4 quantizers share.

QuantizeInt4Pass rewrites the MatMul/Gemm nodes that read a weight the ModelSpec names
(per-layer q/k/v/qkv/o/gate/up/down/fc_in/fc_out and, unless told otherwise, the lm_head).
Weights are expected in [in, out] = [K, N] layout as MatMul's B (FoldConstantsPass folds
transposes); a weight still read through `Transpose(perm=[1, 0])`, or by `Gemm(transB=1)`, is
handled too. Each rewritten weight's role in `ModelSpec.weights` is pointed at its new
quantized initializer, and the fp32 original is removed.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from fdec.backends import graph_forms
from fdec.errors import CompileError, UsageError
from fdec.ir import FdecModel
from fdec.passes.int4_codes import (
    Int4Weight,
    find_grid,
    quantize_int4,
    quantize_minmax,
)
from fdec.passes.quantize_common import empty_stats, require_untied
from fdec.passes.weights import (
    Site,
    Weight,
    add_initializer,
    collect_weights,
    fresh_name,
    raise_opset,
    replace_node,
    replace_site,
    retire_weight,
)
from fdec.pipeline import Pass, PassResult, Tolerance

__all__ = [
    "Int4Weight",
    "QuantizeInt4Pass",
    "QuantizeInt8WeightOnlyPass",
    "kept_wider",
    "quantize_int4",
]

logger = logging.getLogger(__name__)

_MS_DOMAIN = "com.microsoft"
_BLOCK_SIZES = (32, 64, 128)
_NBITS = (4, 8)  # MatMulNBits bits quantize-int4 writes (8: the higher precision of a mix)
_GRIDS = ("onnxruntime", "minmax")  # QuantizeInt4Pass.block_grid
_QDQ_OPSET = 21  # blocked DequantizeLinear (block_size attribute) and INT4/UINT4 tensors


def kept_wider(weights: list[Weight], bits_of: Callable[[Weight], int]) -> int:
    """How many of `weights` keep a source grid wider than their own bits (`bits_of`: the
    pass's, 8 for an 8-bit lm_head) (`source_grid_widths`)."""
    return sum(w.quantized is not None and w.quantized.bits > bits_of(w) for w in weights)


def _register_bias(graph: ir.Graph, site: Site) -> None:
    """Register a site's bias a quantizer made (a constant not in the graph yet: AWQ's bias
    correction) as an initializer, now that a node reads it."""
    bias = site.bias
    if bias is not None and bias.const_value is not None and bias.graph is None:
        if bias.producer() is None and bias.name not in graph.initializers:
            graph.register_initializer(bias)


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

    `bits` 8 writes the same forms with 8-bit codes (MatMulNBits bits=8; INT8/UINT8 blocked
    DequantizeLinear): the "higher precision" quantize-mixed keeps sensitive layers in.

    A tied lm_head shares the embedding (read by Gather). By default it cannot be quantized
    here: put `untie-embeddings` before this pass, or set `include_lm_head=False`. With
    `share_tied_embedding` ("onnxruntime" only) the shared table is quantized once and both
    readers use the same packed initializer: the lm_head's MatMulNBits reads it as B
    [V, k_blocks, block·bits/8], and each embedding Gather becomes a com.microsoft
    GatherBlockQuantized of it (quantize_axis 2, its scales reshaped to [V, k_blocks, 1]),
    reshaped back to [..., hidden] — the table is stored once, as in the tied source model.
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
    bits: int = dataclasses.field(default=4, kw_only=True)
    # The lm_head's bits (with a shared tied table, the embedding's too); None: `bits`. The
    # lm_head is the most sensitive unit (quantize-mixed's ranking): 8 bits there cost
    # 0.5 bytes per parameter of one matrix.
    lm_head_bits: int | None = dataclasses.field(default=None, kw_only=True)
    share_tied_embedding: bool = dataclasses.field(default=False, kw_only=True)
    # block_grid "onnxruntime": ONNX Runtime's RTN kernel (symmetric max/-8, asymmetric with
    # integer zero points). "minmax": `quantize_minmax`, the grid of GGUF's Q4_1 (asymmetric,
    # float zero points) and Q8_0 (symmetric); a shared tied table is then rounded symmetric.
    # MatMulNBits only ("onnxruntime" backend).
    block_grid: str = dataclasses.field(default="onnxruntime", kw_only=True)
    # Weights already on 4-bit blocks with integer zero points (dequantized from a GPTQ, AWQ or
    # compressed-tensors checkpoint: fdec.frontend.prequantized) keep those blocks exactly
    # instead of being rounded again ("onnxruntime" backend: MatMulNBits takes them as they
    # are). quantize-int4-awq also keeps GGUF's float-zero-point grids (`_source_grid`).
    keep_source_grid: bool = dataclasses.field(default=False, kw_only=True)
    # With keep_source_grid: wider widths a source stores some layers at (GPTQModel's `dynamic`
    # rules: 8-bit layers in a 4-bit checkpoint, SOURCE_KEY "widths"), whose integer-zero-point
    # blocks are kept at their own width (MatMulNBits bits 8 / an int8 DequantizeLinear)
    # instead of rounded to `bits`.
    source_grid_widths: tuple[int, ...] = dataclasses.field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        grid = self.block_grid
        if grid not in _GRIDS or (grid == "minmax" and self.backend != "onnxruntime"):
            raise UsageError(
                f"{self.name} block_grid {grid!r} is not supported for backend {self.backend}",
                f"use one of {', '.join(_GRIDS)} (minmax: backend onnxruntime only)",
            )
        if set(self.source_grid_widths) - set(_NBITS):
            raise UsageError(
                f"{self.name} source_grid_widths {self.source_grid_widths!r} are not supported",
                f"use widths of {' or '.join(map(str, _NBITS))} bits",
            )
        for option in ("bits", "lm_head_bits"):
            value = getattr(self, option)
            if value not in _NBITS and not (option == "lm_head_bits" and value is None):
                raise UsageError(
                    f"{self.name} {option} {value!r} is not supported",
                    f"use {option}=4 or {option}=8",
                )
        if self.share_tied_embedding and self.backend != "onnxruntime":
            raise UsageError(
                f"{self.name} shares a tied embedding only for backend onnxruntime "
                f"(GatherBlockQuantized), not {self.backend}",
                "run untie-embeddings first and drop share_tied_embedding",
            )
        if self.block_size not in _BLOCK_SIZES:
            raise UsageError(
                f"{self.name} block_size {self.block_size} is not supported",
                f"use one of {', '.join(map(str, _BLOCK_SIZES))}",
            )
        if self.backend not in graph_forms():
            raise UsageError(
                f"{self.name} backend {self.backend!r} is unknown",
                f"use one of {', '.join(graph_forms())}",
            )
        if self.accuracy_level not in range(5):
            raise UsageError(
                f"{self.name} accuracy_level {self.accuracy_level} is not 0–4",
                "use 4 (int8 activations on the CPU) or 0 (unset)",
            )

    def requires(self, model: FdecModel, target: Any = None) -> None:
        if not self.share_tied_embedding:
            require_untied(self.name, model, self.include_lm_head)

    def check_target(self, target: Any) -> None:
        if target is not None and hasattr(target, "require"):
            for bits in sorted(
                {self.bits, self.lm_head_bits or self.bits, *self.source_grid_widths}
            ):
                target.require(f"int{bits}")

    def call(self, model: FdecModel) -> PassResult:
        weights, skipped = collect_weights(model, self.include_lm_head, self.share_tied_embedding)
        kept = 0
        for weight in weights if self.keep_source_grid else ():
            weight.quantized = self._source_grid(weight, minmax=False)
            kept += weight.quantized is not None
            weight.release()
        wider = kept_wider(weights, self._bits_of)
        result = self._quantize_weights(model, weights, skipped)
        if self.keep_source_grid:
            result.stats["source_grid_kept"] = kept
        if wider:
            result.stats["source_grid_kept_wider"] = wider
        return result

    def _quantize_weights(
        self, model: FdecModel, weights: list[Weight], skipped: collections.Counter[str]
    ) -> PassResult:
        """Quantize `weights` (from `collect_weights`): each one's `array` is what gets quantized.

        Subclasses that transform the fp32 arrays first (AWQ's scaling) call this to emit the
        same MatMulNBits / DequantizeLinear form; `skipped` is reported as is.
        """
        if not weights:
            stats = empty_stats()
            stats["skipped"] = dict(skipped)
            return PassResult(model, modified=False, stats=stats)
        stats, taken = self._start_emitting(model), set()
        for weight in weights:
            self._emit(model, weight, stats, taken)
        stats["skipped"] = dict(skipped)
        return PassResult(model, modified=True, stats=stats)

    def _start_emitting(self, model: FdecModel) -> dict[str, Any]:
        """Ready `model` for this pass's quantized form (its opset or domain); empty stats."""
        stats = empty_stats()
        if self.backend == "tensorrt":
            stats["opset_raised"] = raise_opset(model, _QDQ_OPSET)
        else:
            model.model.opset_imports.setdefault(_MS_DOMAIN, 1)
        return stats

    def _emit(
        self, model: FdecModel, weight: Weight, stats: dict[str, Any], taken: set[str]
    ) -> None:
        """Rewrite one weight's sites to its codes (`weight.quantized`, else rounded now) and
        retire the float initializer; the codes go to the graph (the spill on a streamed
        compile), none kept on `weight`."""
        old_name = weight.value.name
        assert old_name is not None
        quantized = weight.quantized or self._round(weight)
        if self.backend == "tensorrt":
            new_name, added = self._rewrite_qdq(model.graph, weight, quantized, taken)
        else:
            new_name, added = self._rewrite_nbits(model.graph, weight, quantized, taken)
        stats["bytes_before"] += weight.value.const_value.nbytes
        stats["bytes_after"] += added
        stats["matmuls_quantized"] += len(weight.sites)
        stats["weights_quantized"] += 1
        if weight.gathers:
            stats["gathers_shared"] = stats.get("gathers_shared", 0) + len(weight.gathers)
            stats["shared_table_block_size"] = quantized.block_size
        retire_weight(model.graph, weight)
        weight.release()  # a weight read from the checkpoint: one float copy at a time
        weight.quantized = None
        model.spec.rename_weight(old_name, new_name)

    def _block_size_of(self, weight: Weight) -> int:
        """`block_size`, except for a tied table shared with the embedding's Gathers, which
        must be whole blocks along K: then the largest supported block ≤ `block_size` that
        divides K (SmolLM2's 576 at block 128: 64)."""
        k = weight.shape[0]
        if weight.gathers and k % self.block_size:
            fitting = [b for b in _BLOCK_SIZES if b <= self.block_size and not k % b]
            if fitting:
                return max(fitting)
        return self.block_size

    def _symmetric_of(self, weight: Weight) -> bool:
        """`symmetric`, except for a tied table shared with the embedding's Gathers, which is
        always symmetric (GatherBlockQuantized takes no zero points here)."""
        return self.symmetric or bool(weight.gathers)

    def _round(self, weight: Weight) -> Int4Weight:
        """The codes and scales of one weight, rounded to nearest."""
        symmetric, bits = self._symmetric_of(weight), self._bits_of(weight)
        # TensorRT takes negative scales in 4-bit blocks only: an int8 DequantizeLinear with
        # ONNX Runtime's max/-128 scales failed its parser ("Scale coefficients must all be
        # positive"), so 8-bit symmetric blocks for it are absmax/127
        if self.block_grid == "minmax" or (self.backend == "tensorrt" and bits == 8 and symmetric):
            return quantize_minmax(weight.array, self._block_size_of(weight), symmetric, bits)
        return quantize_int4(weight.array, self._block_size_of(weight), symmetric, bits)

    def _source_grid(self, weight: Weight, *, minmax: bool = True) -> Int4Weight | None:
        """The weight's codes on a block grid it already sits on, or None. Tried in order:
        blocks with integer zero points at the weight's bits (`integer_grid`: a weight
        dequantized from a GPTQ, AWQ or compressed-tensors checkpoint's groups; 4-bit ones, or
        any in an 8-bit pass, where a 4-bit grid is an 8-bit one too; the widest block that
        fits, whatever this pass's block size; for TensorRT symmetric ones only), then, with
        `minmax`, GGUF's grids at this pass's block size: Q4_1 (asymmetric, float zero points)
        or Q8_0 (symmetric), reproduced by `quantize_minmax` (SmolLM2's layers are Q4_1, its
        tied table Q8_0). A shared tied table is tried on the symmetric min/max grid only."""
        if weight.array.size == 0:
            return None
        block, bits = self._block_size_of(weight), self._bits_of(weight)
        integer = [("integer", b, False) for b in _BLOCK_SIZES[::-1] if not weight.shape[0] % b]
        rounders = []
        if (bits == 4 or self.bits == 8) and not weight.gathers:
            rounders += integer
        if minmax:
            rounders += [("minmax", block, s) for s in (True,) if weight.gathers]
            rounders += [("minmax", block, s) for s in (False, True) if not weight.gathers]
        found = find_grid(weight.array, rounders, bits)
        if found is None and not weight.gathers:
            for wider in sorted(w for w in self.source_grid_widths if w > bits):
                found = find_grid(weight.array, integer, wider)
                if found is not None:
                    break
        # TensorRT-RTX's parser refuses a blocked DequantizeLinear with uint4 zero points
        # (measured: "cannot take 1 node(s)"); symmetric blocks (int4, none) it builds
        if found is not None and found.zero_points is not None and self.backend == "tensorrt":
            return None
        return found

    def _bits_of(self, weight: Weight) -> int:
        return self.lm_head_bits if weight.head and self.lm_head_bits else self.bits

    def _rewrite_nbits(
        self, graph: ir.Graph, weight: Weight, q: Int4Weight, taken: set[str]
    ) -> tuple[str, int]:
        base = weight.value.name
        b = add_initializer(
            graph, fresh_name(graph, f"{base}_Q{q.bits}", taken), ir.tensor(q.packed)
        )
        scales = add_initializer(
            graph,
            fresh_name(graph, f"{base}_scales", taken),
            ir.tensor(q.scales.astype(weight.dtype.numpy())),
        )
        zero_points = None
        if q.zero_points is not None:
            zp = q.zero_points  # float zero points (grid "minmax") are stored as float16
            zp = zp.astype(np.float16) if zp.dtype.kind == "f" else zp
            zero_points = add_initializer(
                graph, fresh_name(graph, f"{base}_zero_points", taken), ir.tensor(zp)
            )
        attributes = {"K": q.k, "N": q.n, "bits": q.bits, "block_size": q.block_size}
        if self.accuracy_level:
            attributes["accuracy_level"] = self.accuracy_level
        for site in weight.sites:
            _register_bias(graph, site)
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
                name=f"{site.node.name or base}_Q{q.bits}",
            )
            replace_site(graph, site, [node])
        added = sum(v.const_value.nbytes for v in (b, scales, zero_points) if v is not None)
        if weight.gathers:
            added += self._share_with_gathers(graph, weight, q, b, scales, taken)
        return b.name, added

    def _share_with_gathers(
        self,
        graph: ir.Graph,
        weight: Weight,
        q: Int4Weight,
        b: ir.Value,
        scales: ir.Value,
        taken: set[str],
    ) -> int:
        """Rewrite the tied embedding's Gathers to GatherBlockQuantized of the lm_head's B.

        Returns the bytes added (the small shape constants and the 1/s of AWQ).
        """
        base = weight.value.name
        if q.zero_points is not None or q.k % q.block_size:
            raise CompileError(
                f"{self.name}: the tied table {base!r} can be shared only when symmetric and "
                f"its hidden size {q.k} is a multiple of block_size {q.block_size}",
                "run untie-embeddings before this pass (the table is then stored twice)",
            )

        def constant(suffix: str, array: np.ndarray) -> ir.Value:
            name = fresh_name(graph, f"{base}_{suffix}", taken)
            return add_initializer(graph, name, ir.tensor(array, name=name))

        blocks_shape = constant("scales_shape", np.array([q.n, q.k_blocks, 1], dtype=np.int64))
        hidden = constant("hidden", np.array([q.k], dtype=np.int64))
        added = blocks_shape.const_value.nbytes + hidden.const_value.nbytes
        inverse = None
        if weight.row_scales is not None:
            inverse = constant("inv_s", (1.0 / weight.row_scales).astype(weight.dtype.numpy()))
            added += inverse.const_value.nbytes
        block_scales = ir.node("Reshape", [scales, blocks_shape], name=f"{base}_scales_3d")
        graph.insert_before(graph.node(0), block_scales)  # reads initializers only
        attributes = {
            "gather_axis": 0,
            "quantize_axis": 2,
            "block_size": q.block_size,
            "bits": q.bits,
        }
        for gather in weight.gathers:
            ids = gather.inputs[1]
            prefix = gather.name or base
            rows = ir.node(
                "GatherBlockQuantized",
                [b, ids, block_scales.outputs[0]],
                attributes,
                domain=_MS_DOMAIN,
                name=f"{prefix}_Q{q.bits}",
            )
            ids_shape = ir.node("Shape", [ids], name=f"{prefix}_ids_shape")
            shape = ir.node(
                "Concat", [ids_shape.outputs[0], hidden], {"axis": 0}, name=f"{prefix}_shape"
            )
            flat = ir.node("Reshape", [rows.outputs[0], shape.outputs[0]], name=f"{prefix}_rows")
            nodes = [rows, ids_shape, shape, flat]
            # typed as the Gather was: the typing pass after (cast-float16) reads every type
            rows.outputs[0].dtype = flat.outputs[0].dtype = weight.dtype
            flat.outputs[0].shape = gather.outputs[0].shape
            ids_shape.outputs[0].dtype = shape.outputs[0].dtype = ir.DataType.INT64
            if inverse is not None:
                nodes.append(ir.node("Mul", [flat.outputs[0], inverse], name=f"{prefix}_inv_s"))
            replace_node(graph, gather, nodes)
        return added

    def _rewrite_qdq(
        self, graph: ir.Graph, weight: Weight, q: Int4Weight, taken: set[str]
    ) -> tuple[str, int]:
        base = weight.value.name
        codes = q.codes().T  # [K, N], 0..15 (8 bits: 0..255)
        zero_points = None
        signed, unsigned = (
            ((ml_dtypes.int4, ir.DataType.INT4), (ml_dtypes.uint4, ir.DataType.UINT4))
            if q.bits == 4
            else ((np.int8, ir.DataType.INT8), (np.uint8, ir.DataType.UINT8))
        )
        if q.zero_points is None:
            values = (codes.astype(np.int16) - (1 << (q.bits - 1))).astype(signed[0])
            tensor = ir.Tensor(values, dtype=signed[1])
        else:
            tensor = ir.Tensor(codes.astype(unsigned[0]), dtype=unsigned[1])
            zp = q.unpacked_zero_points().T.astype(unsigned[0])  # [k_blocks, N]
            zero_points = add_initializer(
                graph,
                fresh_name(graph, f"{base}_zero_points", taken),
                ir.Tensor(np.ascontiguousarray(zp), dtype=unsigned[1]),
            )
        b = add_initializer(graph, fresh_name(graph, f"{base}_Q{q.bits}", taken), tensor)
        scales = add_initializer(
            graph,
            fresh_name(graph, f"{base}_scales", taken),
            ir.tensor(np.ascontiguousarray(q.scales.T).astype(weight.dtype.numpy())),
        )
        for site in weight.sites:
            _register_bias(graph, site)
            prefix = site.node.name or base
            inputs = [b, scales] + ([zero_points] if zero_points is not None else [])
            dequantize = ir.node(
                "DequantizeLinear",
                inputs,
                {"axis": 0, "block_size": q.block_size},
                name=f"{prefix}_DQ_Q{q.bits}",
            )
            matmul = ir.node(
                "MatMul",
                [site.activation, dequantize.outputs[0]],
                name=f"{prefix}_MatMul_Q{q.bits}",
            )
            nodes = [dequantize, matmul]
            if site.bias is not None:
                nodes.append(ir.node("Add", [matmul.outputs[0], site.bias], name=f"{prefix}_bias"))
            replace_site(graph, site, nodes)
        added = sum(v.const_value.nbytes for v in (b, scales, zero_points) if v is not None)
        return b.name, added


@dataclasses.dataclass
class QuantizeInt8WeightOnlyPass(QuantizeInt4Pass):
    """Weight-only 8-bit block quantization (`--quantize int8-wo`): QuantizeInt4Pass's forms
    with 8-bit codes, the activations left in float.

    ONNX Runtime runs it as MatMulNBits bits=8 on both of its providers: the CPU kernel at
    accuracy_level 4 (int8 activations on the fly, as for int4), the CUDA kernel with fp16
    activations (a one-row GEMV for decode steps, dequantize + cuBLAS for long prefills). It is
    the ONNX Runtime CUDA model's int8: a static int8 Q/DQ graph the CUDA EP only emulates.
    With `keep_source_grid` a checkpoint already on 8-bit (or 4-bit) blocks with integer zero
    points (an 8-bit GPTQ or compressed-tensors one) keeps them exactly."""

    name = "quantize-int8-wo"
    summary = "weight-only 8-bit block quantization of linear weights (MatMulNBits bits=8)"
    # Catches a broken rewrite, not quality (the perplexity gate's): SmolLM2-135M 8-bit blocks
    # of 32 move logits by at most ~0.5 (measured in docs/design-notes.md).
    tolerance = Tolerance(max_abs_error=5.0, min_top1_agreement=0.8)

    bits: int = dataclasses.field(default=8, kw_only=True)

    def __post_init__(self) -> None:
        if self.bits != 8 or self.lm_head_bits not in (None, 8):
            raise UsageError(
                f"{self.name} writes 8-bit weights only, not bits={self.bits}",
                "use quantize-int4 (bits 4, lm_head_bits 8) for 4-bit weights",
            )
        super().__post_init__()
