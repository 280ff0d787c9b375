"""Roofline estimates: decode tok/s and prefill time of a build on a target, from bytes and FLOPs."""

from __future__ import annotations

from typing import Any

from fdec.ir import ModelSpec

__all__ = ["estimate"]

_COMPUTE_FOR_WEIGHTS = {4: "fp32", 2: "fp16", 1: "fp8"}  # bytes per weight -> math precision


def _peak_tflops(target: Any, bytes_per_weight: float) -> tuple[str | None, float | None]:
    """Peak of the math the build's weights run in; fp32 builds use TF32 where the GPU has it."""
    from fdec.targets import Precision

    peaks = target.peak_tflops
    wanted = _COMPUTE_FOR_WEIGHTS.get(round(bytes_per_weight), "fp16")
    order = {"fp32": ["tf32", "fp32"], "fp16": ["fp16", "bf16"], "fp8": ["fp8", "int8", "fp16"]}
    for name in order[wanted]:
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
) -> dict[str, Any]:
    """Batch-1 estimates, labelled as such: decode is bound by reading every weight and the KV
    cache once per token, or by 2 FLOPs per parameter; prefill by FLOPs at the target's peak.
    `gathered_bytes` are weights read a row at a time (an untied embedding table), not whole.
    """
    bandwidth = target.memory_bandwidth_gbs * 1e9
    result: dict[str, Any] = {
        "label": "estimate (roofline from bytes moved and FLOPs; not measured)",
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
    math_name, peak = _peak_tflops(target, bytes_per_weight) if target.is_gpu else (None, None)
    flops_per_token = 2 * parameters
    attention_flops = 4 * spec.num_layers * spec.num_heads * spec.head_dim * context
    compute_s = (flops_per_token + attention_flops) / (peak * 1e12) if peak else 0.0
    decode_s = max(memory_s, compute_s)
    result.update(
        {
            "kv_bytes_per_token": kv_per_token,
            "decode_bound": "memory" if memory_s >= compute_s else "compute",
            "decode_tokens_per_s": round(1.0 / decode_s, 1),
            "math_precision": math_name,
        }
    )
    if peak:
        prefill_flops = prompt * flops_per_token + 2 * spec.num_layers * spec.num_heads * (
            spec.head_dim * prompt * prompt
        )
        prefill_s = max(prefill_flops / (peak * 1e12), weight_bytes / bandwidth)
        result["prefill_ms"] = float(f"{prefill_s * 1e3:.4g}")
    return result
