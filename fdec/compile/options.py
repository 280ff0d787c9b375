"""What a compile is asked (`CompileOptions`) and what it gives back (`CompileResult`)."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

__all__ = ["CompileOptions", "CompileResult"]


@dataclasses.dataclass
class CompileOptions:
    model: str
    out: pathlib.Path
    target: str = "cpu"
    passes: str | None = None  # comma-separated; None = the default pipeline
    verify_each: bool = False
    dump_dir: pathlib.Path | None = None
    trust_pickle: bool = False
    trust_remote_code: bool = False
    cache_dir: pathlib.Path | None = None
    backend: str | None = None  # None = the target's default backend
    max_batch: int = 1
    max_seq_len: int | None = None  # None: 2048, or the model's positions when fewer
    quantize: str | None = None  # "int4", "int4-rtn", "int8" (precision[-method])
    max_ppl_increase: float | None = None  # quality gate for lossy builds (0.2 = +20 %)
    emit: tuple[str, ...] = ()  # extra outputs: "hf-checkpoint"
    calibration: pathlib.Path | None = None  # .txt/.jsonl for static quantization; None = built-in
    keep_fp: int | None = None  # keep the N most sensitive layers (measured) in fp32
    cache: bool = True  # False (--no-cache): nothing read from or written to fdec's cache
    kv_dtype: str | None = None  # KV cache: fp32/fp16 (float) or int8/fp8 (quantize-kv-cache)
    kv_window: int | None = None  # keep the last W cache positions (kv-policy)
    kv_sink: int | None = None  # ... plus the first K (attention sink)
    # {pass name: {option: value}}: options of passes in the pipeline (config [pass_options])
    pass_options: dict[str, dict[str, Any]] | None = None
    sparsity: str | None = None  # "2:4": sparsify-2of4 before quantization (sm >= 8.0 targets)
    prune: str | None = None  # "heads=0.25,mlp=0.3,layers=4": build a pruned student (fdec.student)
    draft: str | None = None  # "layers=1/4": also build a layer-pruned draft in OUT/draft
    distill_steps: int = 0  # with prune: distill the pruned model this long before compiling it
    force: bool = False  # -o may replace a folder holding files fdec did not write (--force)
    # Streamed front end (fdec.frontend.stream): export bound to the checkpoint's bytes and a
    # layer-by-layer reference; None = on for sources above STREAM_PARAMETERS parameters.
    stream: bool | None = None


@dataclasses.dataclass
class CompileResult:
    out: pathlib.Path
    report: dict[str, Any]

    @property
    def ok(self) -> bool:
        return bool(self.report["verification"]["ok"])
