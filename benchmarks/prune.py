"""Structured pruning end to end: parameters, decode speed and perplexity before pruning, right
after it, and after a short `fdec distill`, all measured in one run.

    python benchmarks/prune.py                                   # SmolLM2-135M, heads 25 % + MLP 30 %
    python benchmarks/prune.py --prune heads=0.25,mlp=0.3 --steps 200 --work /tmp/prune-bench

Every step is the real command line (fdec compile / fdec distill, each in a subprocess):
1. the fp32 build of the model;
2. `--prune P`: the pruned build, carrying the student checkpoint (student/);
3. `fdec distill student --steps N` (teacher = the recipe's, the unpruned model);
4. the fp32 build of the distilled student.
Each build is scored on the held text (fdec/data/held.txt, never calibrated or trained on) with
ONNX Runtime, and decodes the same prompt greedily (best of --rounds) for tokens/s; ratios are
against the unpruned build measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time
import warnings


def _fdec(*args: str) -> float:
    started = time.perf_counter()
    command = [str(pathlib.Path(sys.executable).parent / "fdec"), *args]
    print("$ fdec " + " ".join(args), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"fdec {args[0]} failed with exit code {done.returncode}")
    return time.perf_counter() - started


def _measure(folder: pathlib.Path, held: int, new_tokens: int, rounds: int) -> dict:
    import numpy as np

    from fdec.runner import load_build
    from fdec.runtime import generate
    from fdec.verify import held_token_ids, perplexity

    build = load_build(folder)
    model, tokenizer = build.model, build.tokenizer
    report = json.loads((folder / "report.json").read_text())
    vocab = report["spec"]["vocab_size"]
    ids = held_token_ids(tokenizer, vocab, limit=held)
    logits, _ = model.decode(ids, model.empty_past(1), 0)
    prompt = tokenizer("The history of the printing press", add_special_tokens=False)["input_ids"]
    speeds = [
        generate(model, prompt, max_new_tokens=new_tokens).decode_tokens_per_s
        for _ in range(rounds)
    ]
    last = report["passes"][-1]["after"]
    weights = sum(p.stat().st_size for p in folder.glob("model.onnx*"))
    return {
        "parameters": last["parameters"],
        "weights_mb": weights / 1e6,
        "perplexity": perplexity(logits, ids),
        "held_tokens": int(ids.shape[1]),
        "decode_tok_s": float(np.max(speeds)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prune", default="heads=0.25,mlp=0.3")
    parser.add_argument("--steps", type=int, default=200, help="fdec distill steps")
    parser.add_argument("--held", type=int, default=512, help="held-out tokens scored")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/fdec-prune-bench"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    common = ("--target", "cpu", "--quantize", "none", "--quiet")
    times = {
        "compile": _fdec("compile", args.model, *common, "-o", str(work / "base")),
        "compile --prune": _fdec(
            "compile", args.model, *common, "--prune", args.prune, "-o", str(work / "pruned")
        ),
        "distill": _fdec(
            "distill",
            str(work / "pruned" / "student"),
            "--steps",
            str(args.steps),
            "-o",
            str(work / "distilled"),
            "--quiet",
        ),
    }
    times["compile distilled"] = _fdec(
        "compile", str(work / "distilled"), *common, "-o", str(work / "distilled-build")
    )
    rows = {
        "unpruned": _measure(work / "base", args.held, args.new_tokens, args.rounds),
        f"pruned ({args.prune})": _measure(
            work / "pruned", args.held, args.new_tokens, args.rounds
        ),
        f"+ distill {args.steps} steps": _measure(
            work / "distilled-build", args.held, args.new_tokens, args.rounds
        ),
    }
    base = rows["unpruned"]
    if args.json:
        print(json.dumps({"rows": rows, "times_s": times}, indent=2))
        return 0
    print(f"\n{args.model}: structured pruning {args.prune}, fp32 CPU builds, "
          f"perplexity on {base['held_tokens']} held tokens")  # fmt: skip
    print(f"{'build':32} {'params':>12} {'x':>6} {'MB':>8} {'decode tok/s':>13} {'x':>6} "
          f"{'ppl':>9} {'Δppl':>8}")  # fmt: skip
    for name, row in rows.items():
        print(
            f"{name:32} {row['parameters']:>12,} {row['parameters'] / base['parameters']:>5.2f}x "
            f"{row['weights_mb']:>8.1f} {row['decode_tok_s']:>13.1f} "
            f"{row['decode_tok_s'] / base['decode_tok_s']:>5.2f}x {row['perplexity']:>9.2f} "
            f"{row['perplexity'] / base['perplexity'] - 1:>+8.1%}"
        )
    print("wall: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
