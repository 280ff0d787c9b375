"""Roofline estimates: decode tok/s and prefill time of a build on a target, from bytes and FLOPs.

With a per-step floor: every decode step costs at least the host work of running the graph's
nodes (ONNX Runtime's executor and one kernel launch each), `target.node_launch_us` per node.
On an H200 that floor, not bandwidth, bounds a 135M model: the bytes alone said 26,254 tok/s
where fdec builds measured 79-198 (issue 16).
"""

from __future__ import annotations

from typing import Any

from fdec.ir import ModelSpec

__all__ = ["FUSED_NODES_PER_LAYER", "estimate"]

_COMPUTE_FOR_WEIGHTS = {4: "fp32", 2: "fp16", 1: "fp8"}  # bytes per weight -> math precision
# Nodes per decoder layer of fdec's fused ONNX Runtime graph (GroupQueryAttention with rotary,
# SkipSimplifiedLayerNormalization, packed QKV): 344 nodes for 30 layers of SmolLM2's structure
# (`fdec compile` of a 30-layer tiny Llama, --target cpu --quantize none). The launches of a good
# GPU build, used when the caller does not give the graph's own node count.
FUSED_NODES_PER_LAYER = 344 / 30


def _peak_tflops(
    target: Any, bytes_per_weight: float, math: str | None = None
) -> tuple[str | None, float | None]:
    """Peak of the math the build's products run in: `math` where known (an engine's own
    listing: "fp8", "bf16 (int4 weights)" computes bf16), else guessed from the bytes per weight;
    fp32 builds use TF32 where the GPU has it."""
    from fdec.targets import Precision

    peaks = target.peak_tflops
    wanted = (math or "").split(" ")[0] or _COMPUTE_FOR_WEIGHTS.get(round(bytes_per_weight))
    order = {"fp32": ["tf32", "fp32"], "fp16": ["fp16", "bf16"], "bf16": ["bf16", "fp16"],
             "fp8": ["fp8", "int8", "fp16"], "int8": ["int8", "fp16"],
             "fp4": ["fp4", "fp8", "fp16"]}  # fmt: skip
    for name in order.get(wanted or "fp16", order["fp16"]):
        precision = Precision.parse(name)
        if precision in peaks and target.supports(precision):
            return name, float(peaks[precision])
    return None, None


def estimate(
    spec: ModelSpec,
    target: Any,
    *,
    weight_bytes: int,
    parameters: int,
    context: int = 1024,
    prompt: int = 512,
    kv_bytes_per_value: int = 4,
    gathered_bytes: int = 0,
    nodes: int | None = None,
    nodes_from: str = "graph",
    math: str | None = None,
) -> dict[str, Any]:
    """Batch-1 estimates, labelled as such: decode is bound by reading every weight and the KV
    cache once per token, by 2 FLOPs per parameter, or by the per-step floor (`nodes` of the
    graph × the target's `node_launch_us`; without `nodes`, the fused graph's nodes per layer);
    prefill by FLOPs at the target's peak. `gathered_bytes` are weights read a row at a time
    (an untied embedding table), not whole. `nodes_from` says what `nodes` counted (the graph's
    nodes, or an engine's decode-profile kernels); `math` is the precision the products run in
    where the caller knows it (an engine's listing).
    """
    bandwidth = target.memory_bandwidth_gbs * 1e9
    result: dict[str, Any] = {
        "label": "estimate (roofline from bytes moved and FLOPs, with a per-step floor; "
        "not measured)",
        "target": target.name,
        "context_tokens": context,
        "prompt_tokens": prompt,
        "weight_bytes": weight_bytes,
    }
    if not bandwidth:
        result["note"] = "target has no memory bandwidth figure"
        return result
    kv_per_token = 0
    if spec.is_decoder:
        kv_per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * kv_bytes_per_value
    kv_read = kv_per_token * context
    memory_s = (weight_bytes - gathered_bytes + kv_read) / bandwidth
    bytes_per_weight = weight_bytes / max(parameters, 1)
    math_name, peak = (
        _peak_tflops(target, bytes_per_weight, math) if target.is_gpu else (None, None)
    )
    flops_per_token = 2 * parameters
    attention_flops = 4 * spec.num_layers * spec.num_heads * spec.head_dim * context
    compute_s = (flops_per_token + attention_flops) / (peak * 1e12) if peak else 0.0
    launch_us = float(getattr(target, "node_launch_us", 0.0) or 0.0)
    launches = nodes if nodes is not None else round(spec.num_layers * FUSED_NODES_PER_LAYER)
    floor_s = launches * launch_us * 1e-6
    bounds = {"memory": memory_s, "compute": compute_s, "launch": floor_s}
    decode_s = max(bounds.values())
    result.update(
        {
            "kv_bytes_per_token": kv_per_token,
            "decode_bound": max(bounds, key=bounds.get),
            "decode_tokens_per_s": round(1.0 / decode_s, 1),
            "math_precision": math_name,
            "bounds_ms": {k: float(f"{v * 1e3:.4g}") for k, v in bounds.items()},
        }
    )
    if launch_us:
        result["step_floor"] = {
            "nodes": launches,
            "nodes_from": nodes_from if nodes is not None else "fused graph, nodes per layer",
            "node_launch_us": launch_us,
            "ms": float(f"{floor_s * 1e3:.4g}"),
            "source": f"targets/data/{target.name}.toml node_launch_us",
        }
    if peak:
        prefill_flops = prompt * flops_per_token + 2 * spec.num_layers * spec.num_heads * (
            spec.head_dim * prompt * prompt
        )
        prefill_s = max(prefill_flops / (peak * 1e12), weight_bytes / bandwidth, floor_s)
        result["prefill_ms"] = float(f"{prefill_s * 1e3:.4g}")
    return result
