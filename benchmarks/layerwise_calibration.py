"""Peak memory and time of calibration layer by layer (fdec.calibrate_layerwise) alone, on a streamed checkpoint: what a streamed calibrated compile (fp8 for --target h100, int4-awq) spends before its passes.

    python benchmarks/layerwise_calibration.py --model llama-8b --kinds stats
    python benchmarks/layerwise_calibration.py --model smollm2-135m --kinds stats,sampled

--model: a model folder, smollm2-135m, or a cached benchmark model of large_weights.py
(llama-8b: the verifiable Llama-3.1-8B-shaped bf16 checkpoint). The process's own peak RSS
(getrusage) is the figure; a watchdog stops it above --max-rss-gb.
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

sys.path.insert(0, str(pathlib.Path(__file__).parent))

GIB = 2**30


def _watchdog(cap_bytes: int) -> None:
    def watch() -> None:
        while True:
            with open("/proc/self/status") as handle:
                rss = next(
                    int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS:")
                )
            if rss > cap_bytes:
                print(f"RSS {rss / GIB:.2f} GiB above the cap: stopped", file=sys.stderr)
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-8b")
    parser.add_argument("--kinds", default="stats", help="of fdec.calibrate_layerwise.KINDS")
    parser.add_argument("--max-rss-gb", type=float, default=8.0, help="watchdog: stop above")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    _watchdog(int(args.max_rss_gb * GIB))

    from fdec.calibrate import calibration_batches, load_calibration_texts
    from fdec.calibrate_layerwise import LayerwiseCalibration
    from fdec.frontend.export import load_tokenizer
    from fdec.frontend.source import resolve_source

    model = args.model
    if model == "llama-8b":
        from large_weights import cached_llama

        model = str(cached_llama("llama-8b"))
    source = resolve_source(model)
    tokenizer = load_tokenizer(source.folder) if source.has_tokenizer else None
    vocab = (
        source.config["vocab_size"] if isinstance(source.config, dict) else source.config.vocab_size
    )
    batches = calibration_batches(load_calibration_texts(None), tokenizer, vocab)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    calibration = LayerwiseCalibration(source, batches, collect=args.kinds.split(","))
    run = calibration.run()
    row = {
        "model": args.model,
        "kinds": run["kinds"],
        "layers": run["layers"],
        "tokens": run["tokens"],
        "linear_inputs": calibration.to_dict()["linear_inputs"],
        "wall_s": round(time.perf_counter() - started, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2),
        "rss_before_gib": round(before / GIB, 2),
        "command": "python benchmarks/layerwise_calibration.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(row) if args.json else "\n".join(f"{k}: {v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
