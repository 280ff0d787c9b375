"""KV-cache dtypes on one build: bytes per token and perplexity measured through the cache.

    python benchmarks/kv_cache.py [--model smollm2-135m] [--build DIR] [--prefill 32]

Compiles (or reuses, with --build) an fp32 ONNX Runtime build of MODEL for the cpu target,
then for each cache dtype (fp32, fp16, int8, fp8 E4M3) applies fdec's `quantize-kv-cache`
pass (per-head scales from the built-in calibration corpus) to that same graph and scores the
held text with `fdec.verify.perplexity_through_cache`: the first --prefill tokens in one pass,
every later token predicted from the stored (quantized) past, one token a step. A single
forward pass with an empty cache would not read the cache at all. fp8 runs as Q/DQ in ONNX
Runtime at optimization "basic" on the CPU (DESIGN.md); on GPUs it needs fp8 support.

Goals (issue 5): int8/fp8 bytes per token ≤ half of fp16's, perplexity increase ≤ 2 % against
the fp32 cache of the same build, measured in this run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import onnx_ir as ir
from transformers import AutoTokenizer

from fdec.calibrate import calibration_batches, load_calibration_texts
from fdec.compile import CompileOptions, compile_model
from fdec.ir import FdecModel, ModelSpec
from fdec.lower import MODEL_FILE
from fdec.passes.kv_cache import QuantizeKvCachePass, kv_bytes_per_token
from fdec.runtime import session_for_model
from fdec.verify import held_text, perplexity_through_cache

DTYPES = (("fp32", 4), ("fp16", 2), ("int8", 1), ("fp8", 1))
MAX_PPL_INCREASE = 0.02


def _load(build: pathlib.Path) -> FdecModel:
    report = json.loads((build / "report.json").read_text())
    model = ir.load(build / MODEL_FILE)  # external weights memory-mapped
    return FdecModel(model, ModelSpec.from_dict(report["spec"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--build", type=pathlib.Path, help="an existing fp32 cpu build to reuse")
    parser.add_argument("--prefill", type=int, default=32, help="tokens prefilled in one pass")
    parser.add_argument("--tokens", type=int, default=512, help="held tokens scored at most")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fdec-kvbench-") as folder:
        build = args.build
        if build is None:
            build = pathlib.Path(folder) / "fp32"
            started = time.perf_counter()
            compile_model(CompileOptions(model=args.model, out=build, quantize="none"))
            print(f"compiled {args.model} fp32 in {time.perf_counter() - started:.0f} s",
                  file=sys.stderr)  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(build)
        spec = _load(build).spec
        ids = tokenizer(held_text(), add_special_tokens=False)["input_ids"][: args.tokens]
        ids = [[i for i in ids if i < spec.vocab_size]]
        import numpy as np

        ids = np.asarray(ids, dtype=np.int64)
        batches = calibration_batches(load_calibration_texts(None), tokenizer, spec.vocab_size)
        rows = []
        for dtype, item in DTYPES:
            model = _load(build)
            stats: dict = {}
            if dtype != "fp32":
                result = QuantizeKvCachePass(dtype=dtype, batches=batches)(model)
                stats = result.stats
            session = session_for_model(model, optimization="basic" if dtype == "fp8" else "all")
            started = time.perf_counter()
            ppl = perplexity_through_cache(session, ids, args.prefill)
            rows.append(
                {
                    "dtype": dtype,
                    "bytes_per_token": kv_bytes_per_token(spec, item),
                    "perplexity": ppl,
                    "seconds": time.perf_counter() - started,
                    "scale_range": [
                        min(r["scale_min"] for r in stats["scale_ranges"]),
                        max(r["scale_max"] for r in stats["scale_ranges"]),
                    ]
                    if "scale_ranges" in stats
                    else None,
                }
            )
            del session, model

    base = rows[0]["perplexity"]
    fp16_bytes = next(r["bytes_per_token"] for r in rows if r["dtype"] == "fp16")
    ok = True
    for row in rows:
        row["vs_fp16_bytes"] = row["bytes_per_token"] / fp16_bytes
        row["ppl_increase"] = row["perplexity"] / base - 1.0
        if row["dtype"] in ("int8", "fp8"):
            row["meets_goal"] = (
                row["vs_fp16_bytes"] <= 0.5 and row["ppl_increase"] <= MAX_PPL_INCREASE
            )
            ok = ok and row["meets_goal"]
    scored = ids.shape[1] - args.prefill
    if args.json:
        print(json.dumps({"model": args.model, "tokens_through_cache": scored, "rows": rows}))
    else:
        print(f"{args.model}: {ids.shape[1]} held tokens, {args.prefill} prefilled, {scored} "
              "predicted through the KV cache one step at a time")  # fmt: skip
        print(f"{'kv dtype':<8} {'bytes/token':>11} {'vs fp16':>8} {'perplexity':>11} "
              f"{'vs fp32':>8}  goal")  # fmt: skip
        for row in rows:
            goal = {True: "ok", False: "MISSED"}.get(row.get("meets_goal"), "")
            print(f"{row['dtype']:<8} {row['bytes_per_token']:>11,} {row['vs_fp16_bytes']:>7.2f}x "
                  f"{row['perplexity']:>11.3f} {row['ppl_increase']:>+8.2%}  {goal}")  # fmt: skip
        print("goal: int8/fp8 bytes/token <= 0.5x fp16 and perplexity <= +2 % vs the fp32 cache")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
