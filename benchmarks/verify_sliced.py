"""Verify an existing fp8 decoder build slice by slice against the streamed PyTorch reference,
then type its TensorRT model and check that slice by slice too; peak RSS per stage (issue 19).

    python benchmarks/verify_sliced.py SOURCE_FOLDER BUILD_FOLDER

SOURCE_FOLDER is the checkpoint the build came from (e.g. benchmarks/large_weights.py's cached
llama-8b-verifiable); BUILD_FOLDER holds model.onnx and its data (a finished build, or the
staging folder a compile left). Prints the figures and `peaks_gib` as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import sys
import threading
import time

from large_weights import rss_bytes  # benchmarks/ is the script's folder: on sys.path


class StagePeaks:
    """Peak RSS (GiB) of this process per named stage, sampled every 0.5 s."""

    def __init__(self) -> None:
        self.started = time.time()
        self.stage = "start"
        self.peaks: dict[str, float] = {}
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while True:
            rss = rss_bytes(os.getpid()) / 2**30
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0.0), rss)
            time.sleep(0.5)

    def mark(self, stage: str) -> None:
        print(f"[{time.time() - self.started:7.1f}s] {stage}", file=sys.stderr, flush=True)
        self.stage = stage

    def to_dict(self) -> dict[str, float]:
        return {name: round(peak, 2) for name, peak in self.peaks.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="the checkpoint folder the build came from")
    parser.add_argument("build", type=pathlib.Path, help="the folder holding model.onnx")
    parser.add_argument("--target", default="h100")
    args = parser.parse_args(argv)

    from fdec.frontend.source import resolve_source
    from fdec.frontend.stream import import_streamed, streamed_reference_model
    from fdec.lower.tensorrt_model import prepare_tensorrt_model
    from fdec.passes.quantize_fp8 import QuantizeFp8Pass
    from fdec.runtime.sliced import SlicedModel
    from fdec.targets import load_target
    from fdec.verify import Reference

    peaks = StagePeaks()
    source = resolve_source(args.source)
    peaks.mark("import (graph only)")
    spec = import_streamed(source).fdec_model.spec
    peaks.mark("reference (streamed)")
    reference = Reference.from_hf(
        streamed_reference_model(source), "decoder", None, spec.vocab_size, greedy_steps=2
    )
    peaks.mark("verification slice by slice")
    sliced = SlicedModel(args.build / "model.onnx", optimization="basic")
    figures = reference.compare(sliced)
    result = {
        "numeric": {
            k: figures.get(k) for k in ("max_abs_error", "top1_agreement", "kl_divergence")
        },
        "greedy": reference.compare_greedy(sliced),
        "slices": len(sliced.slices),
    }
    print(json.dumps(result, default=str), flush=True)
    del sliced
    peaks.mark("TensorRT model: typing + sliced check")
    record = prepare_tensorrt_model(
        args.build, target=load_target(args.target), spec=spec, reference=reference,
        tolerance=QuantizeFp8Pass.tolerance,
    )  # fmt: skip
    numerics = record.get("numerics") or {}
    print(json.dumps({
        "typed": {k: numerics.get(k) for k in ("ok", "max_abs_error", "top1_agreement")},
        "dtype": record.get("dtype"), "slices": (numerics.get("sliced") or {}).get("slices"),
    }, default=str), flush=True)  # fmt: skip
    peaks.mark("done")
    print(json.dumps({
        "peaks_gib": peaks.to_dict(),
        "ru_maxrss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "wall_s": round(time.time() - peaks.started),
    }), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
