"""Shape profiles (min / opt / max per dynamic input) for engine builders, from --max-batch and --max-seq-len."""

from __future__ import annotations

import dataclasses
from typing import Any

from fdec.errors import UsageError
from fdec.ir import ModelSpec

__all__ = ["Profile", "ShapeLimits", "decoder_profiles", "profiles_for"]


@dataclasses.dataclass(frozen=True)
class ShapeLimits:
    """What a user asks an engine to serve: batch size and total context (prompt + generated)."""

    max_batch: int = 1
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise UsageError(
                f"--max-batch must be at least 1, got {self.max_batch}",
                "pass --max-batch 1 or more",
            )
        if self.max_seq_len < 2:
            raise UsageError(
                f"--max-seq-len must be at least 2, got {self.max_seq_len}",
                "pass --max-seq-len 2 or more",
            )

    def check_against(self, spec: ModelSpec) -> None:
        if spec.max_positions and self.max_seq_len > spec.max_positions:
            raise UsageError(
                f"--max-seq-len {self.max_seq_len} exceeds the model's {spec.max_positions} positions",
                f"pass --max-seq-len {spec.max_positions} or less",
            )


@dataclasses.dataclass(frozen=True)
class Profile:
    """One optimization profile: for each input, its min / opt / max shape."""

    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shapes": {
                k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])}
                for k, v in self.shapes.items()
            },
        }

    def polygraphy_args(self) -> list[str]:
        """`--trt-min-shapes ... --trt-opt-shapes ... --trt-max-shapes ...` for polygraphy."""
        args: list[str] = []
        for flag, index in (
            ("--trt-min-shapes", 0),
            ("--trt-opt-shapes", 1),
            ("--trt-max-shapes", 2),
        ):
            args.append(flag)
            args.extend(
                f"{name}:[{','.join(map(str, dims[index]))}]" for name, dims in self.shapes.items()
            )
        return args

    def trtexec_args(self) -> list[str]:
        """`--minShapes=... --optShapes=... --maxShapes=...` for trtexec."""
        args = []
        for flag, index in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            value = ",".join(
                f"{name}:{'x'.join(map(str, dims[index]))}" for name, dims in self.shapes.items()
            )
            args.append(f"{flag}={value}")
        return args


def decoder_profiles(spec: ModelSpec, limits: ShapeLimits) -> list[Profile]:
    """Two profiles for a decoder with a KV cache, as LLM engines are built:

    - `context` (prefill): up to max_seq_len new tokens, empty past (length 0);
    - `generation` (decode): one new token, past of 1 .. max_seq_len - 1 positions.
    Batch runs 1 .. max_batch in both, optimal at half of it.
    """
    batch, seq = limits.max_batch, limits.max_seq_len
    b = (1, max(1, batch // 2), batch)
    kv, dim = spec.num_kv_heads, spec.head_dim

    def shapes(new: tuple[int, int, int], past: tuple[int, int, int]):
        total = tuple(n + p for n, p in zip(new, past))
        out = {
            "input_ids": tuple((b[i], new[i]) for i in range(3)),
            "attention_mask": tuple((b[i], total[i]) for i in range(3)),
            "position_ids": tuple((b[i], new[i]) for i in range(3)),
        }
        for key, value in spec.past_inputs:
            out[key] = out[value] = tuple((b[i], kv, past[i], dim) for i in range(3))
        return {k: v for k, v in out.items() if k in spec.inputs}

    return [
        Profile("context", shapes((1, min(128, seq), seq), (0, 0, 0))),
        Profile("generation", shapes((1, 1, 1), (1, min(512, seq - 1), seq - 1))),
    ]


def profiles_for(spec: ModelSpec, limits: ShapeLimits) -> list[Profile]:
    """Optimization profiles for the model's dynamic inputs."""
    limits.check_against(spec)
    if spec.is_decoder:
        return decoder_profiles(spec, limits)
    batch, seq = limits.max_batch, limits.max_seq_len
    opt = (max(1, batch // 2), min(128, seq))
    shapes = {
        name: ((1, 1), opt, (batch, seq))
        for name in ("input_ids", "attention_mask", "token_type_ids")
        if name in spec.inputs
    }
    return [Profile("encoder", shapes)]
