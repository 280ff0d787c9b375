"""The benchmark suite: fdec's cpu builds against what users would otherwise run, in one run.

    python benchmarks/run.py                  # SmolLM2-135M, builds into build/bench if missing
    python benchmarks/run.py --quick          # one measured round
    python benchmarks/run.py --work DIR --rounds 5 --json

Variants: PyTorch eager (transformers `generate` with its KV cache), ONNX Runtime on a plain
traced export (fdec compile --quantize none --passes default: no fusion), onnxruntime-genai's
model builder int4 build with its native generator (when installed; built with
benchmarks/decode.py's code; once at its own thread count, once pinned to --threads), and
fdec's fp32 / int8 / int4-awq cpu builds (default pipeline).

Each variant lives in its own worker subprocess (so peak RSS is its own), loaded once; rounds
are interleaved: round r asks every worker for one measurement in turn. Reported: median
decode tok/s after a 40-token prompt (prefill excluded), median prefill ms, the worker's peak
RSS, model MB and perplexity on fdec's held text, with ratios against the best peer.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
import warnings

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# onnxruntime-genai as its users get it (its own thread count: half the cores, 1 on 2 CPUs)
# and pinned to --threads like every other variant.
GENAI_PINNED = "genai int4 pinned"
PEERS = ("pytorch eager", "ort plain fp32", "genai int4", GENAI_PINNED)
# name -> (folder under --work, --quantize, --passes); None folder: not an fdec build
FDEC_BUILDS = {
    "ort plain fp32": ("plain-fp32", "none", "default"),
    "fdec fp32": ("fdec-fp32", "none", None),
    "fdec int8": ("fdec-int8", "int8", None),
    "fdec int4": ("fdec-int4", "int4-awq", None),
}


def _prompt_and_text(model_name: str, prompt_tokens: int) -> tuple[list[int], list[int], object]:
    from fdec.frontend.export import load_tokenizer
    from fdec.frontend.source import resolve_source
    from fdec.verify import held_text

    source = resolve_source(model_name)
    tokenizer = load_tokenizer(source.folder)
    text_ids = tokenizer(held_text(), add_special_tokens=False)["input_ids"]
    return (text_ids * 4)[:prompt_tokens], text_ids, source


# --- workers: one variant each, commands on stdin, one JSON line per answer ------------------


def _worker(args) -> int:
    import numpy as np

    from fdec.bench import peak_rss_mb

    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library chatter goes to stderr; answers go to `out`
    warnings.filterwarnings("ignore")
    prompt, text_ids, source = _prompt_and_text(args.model, args.prompt_tokens)
    scored = np.asarray([text_ids], dtype=np.int64)
    name, work = args.worker, pathlib.Path(args.work)
    if name == "pytorch eager":
        measure, score = _torch_variant(source, prompt, scored, args.threads)
    elif name in ("genai int4", GENAI_PINNED):
        pinned = args.threads if name == GENAI_PINNED else 0
        measure, score = _genai_variant(work / "genai-int4", prompt, scored, args.threads, pinned)
    else:
        measure, score = _fdec_variant(work / FDEC_BUILDS[name][0], prompt, scored, args.threads)
    measure(4)  # warm-up
    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        command = line.strip()
        if command == "run":
            prefill_ms, tok_s = measure(args.new_tokens)
            answer = {
                "prefill_ms": prefill_ms,
                "decode_tok_s": tok_s,
                "peak_rss_mb": peak_rss_mb(),
            }
        elif command == "ppl":
            try:
                answer = {"perplexity": score()}
            except Exception as err:
                answer = {"perplexity": None, "perplexity_note": f"{type(err).__name__}: {err}"}
        else:
            break
        out.write(json.dumps(answer) + "\n")
    return 0


def _torch_variant(source, prompt, scored, threads):
    import torch
    import transformers

    from fdec.frontend.export import load_hf_model
    from fdec.verify import perplexity

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    model = load_hf_model(source)
    ids = torch.tensor([prompt])

    def timed(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - start

    def measure(n: int) -> tuple[float, float]:
        one = timed(1)  # prefill + first token
        full = timed(n)
        return one * 1e3, (n - 1) / max(full - one, 1e-9)

    def score() -> float:
        with torch.no_grad():
            logits = model(torch.from_numpy(scored)).logits.numpy()
        return perplexity(logits, scored)

    return measure, score


def _fdec_variant(folder: pathlib.Path, prompt, scored, threads):
    from fdec.lower import MODEL_FILE
    from fdec.runner import load_build
    from fdec.runtime import OrtModel, generate, open_session
    from fdec.verify import perplexity

    loaded = load_build(folder)
    level = (loaded.config.get("session_options") or {}).get("graph_optimization_level", "all")
    model = OrtModel(
        open_session(folder / MODEL_FILE, threads=threads, optimization=level),
        kv_buffer=loaded.model.kv_buffer,
        kv_policy=loaded.model.kv_policy,
    )

    def measure(n: int) -> tuple[float, float]:
        result = generate(model, prompt, max_new_tokens=n)
        return result.prefill_s * 1e3, result.decode_tokens_per_s

    def score() -> float:
        logits, _ = model.decode(scored, model.empty_past(1), 0)
        return perplexity(logits, scored)

    return measure, score


def _genai_variant(folder: pathlib.Path, prompt, scored, threads, pinned=0):
    """onnxruntime-genai's own generator on its build (at `pinned` intra-op threads, 0: its
    default); perplexity through onnxruntime."""
    import onnxruntime_genai as og

    from fdec.lower.genai import open_genai_model
    from fdec.runtime import OrtModel, open_session
    from fdec.verify import perplexity

    model = open_genai_model(folder, pinned)

    def measure(n: int) -> tuple[float, float]:
        params = og.GeneratorParams(model)
        length = len(prompt) + n
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(prompt)  # prefill
        generator.generate_next_token()
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        steps = 0
        while not generator.is_done():
            generator.generate_next_token()
            steps += 1
        return prefill * 1e3, steps / (time.perf_counter() - start)

    def score() -> float:
        # Its model.onnx has ecosystem I/O names: run it through plain onnxruntime.
        session = OrtModel(open_session(folder / "model.onnx", threads=threads))
        if session.head_dim is None:  # its cache's last axis is symbolic: read its config
            decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
            session.head_dim = int(decoder["head_size"])
        logits, _ = session.decode(scored, session.empty_past(1), 0)
        return perplexity(logits, scored)

    return measure, score


# --- the parent: builds, workers, interleaved rounds, table ----------------------------------


def _ensure_builds(args, source_folder: pathlib.Path, prompt: list[int]) -> list[str]:
    from fdec.compile import CompileOptions, compile_model

    work = pathlib.Path(args.work)
    variants = ["pytorch eager"]
    for name, (folder, recipe, passes) in FDEC_BUILDS.items():
        if not (work / folder / "model.onnx").exists():
            if args.skip_missing:
                print(f"{work / folder} missing: {name} skipped (--skip-missing)", file=sys.stderr)
                continue
            print(f"compiling {work / folder} (--quantize {recipe}) ...", file=sys.stderr)
            extra = {"passes": passes} if passes else {}
            compile_model(
                CompileOptions(model=args.model, out=work / folder, quantize=recipe, **extra)
            )
        variants.append(name)
    try:
        import onnxruntime_genai  # noqa: F401
        from decode import _genai_runner  # benchmarks/decode.py builds the peer

        if not (work / "genai-int4" / "model.onnx").exists():
            print("building the onnxruntime-genai int4 peer ...", file=sys.stderr)
        _genai_runner(work / "genai-int4", source_folder, prompt, args.threads)
        variants[2:2] = ["genai int4", GENAI_PINNED]
    except ImportError:
        print("onnxruntime-genai not installed: its int4 peer is skipped", file=sys.stderr)
    return variants


def _size_mb(args, name: str) -> float | None:
    work = pathlib.Path(args.work)
    if name == "pytorch eager":
        return None  # filled from the fp32 build's parameters below
    folder = work / ("genai-int4" if name.startswith("genai") else FDEC_BUILDS[name][0])
    return sum(p.stat().st_size for p in folder.glob("model.onnx*")) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--work", default="build/bench", help="where builds live (made if missing)")
    parser.add_argument("--prompt-tokens", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one measured round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--skip-missing", action="store_true", help="leave out fdec builds not yet compiled"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)
    warnings.filterwarnings("ignore")
    rounds = 1 if args.quick else args.rounds
    prompt, text_ids, source = _prompt_and_text(args.model, args.prompt_tokens)
    variants = _ensure_builds(args, source.folder, prompt)
    common = [
        "--model", args.model, "--work", args.work, "--threads", str(args.threads),
        "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
    ]  # fmt: skip
    workers = {}
    for name in variants:  # started one at a time: loading is not what is measured
        worker = subprocess.Popen(
            [sys.executable, __file__, "--worker", name, *common],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )  # fmt: skip
        json.loads(worker.stdout.readline())
        workers[name] = worker

    def ask(name: str, command: str) -> dict:
        worker = workers[name]
        worker.stdin.write(command + "\n")
        worker.stdin.flush()
        line = worker.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {name!r} died (see its stderr above)")
        return json.loads(line)

    samples: dict[str, list[dict]] = {name: [] for name in variants}
    load_before = os.getloadavg()
    for _ in range(rounds):
        for name in variants:
            samples[name].append(ask(name, "run"))
    load_after = os.getloadavg()
    rows: dict[str, dict] = {}
    for name in variants:
        quality = ask(name, "ppl")
        workers[name].stdin.close()
        workers[name].wait()
        rows[name] = {
            "decode_tok_s": statistics.median(s["decode_tok_s"] for s in samples[name]),
            "prefill_ms": statistics.median(s["prefill_ms"] for s in samples[name]),
            "peak_rss_mb": max(s["peak_rss_mb"] for s in samples[name]),
            "mb": _size_mb(args, name),
            **quality,
            "decode_rounds": [round(s["decode_tok_s"], 2) for s in samples[name]],
        }
    rows["pytorch eager"]["mb"] = rows.get("fdec fp32", rows.get("ort plain fp32", {})).get("mb")
    peers = [name for name in PEERS if name in rows]
    best_decode = max(rows[p]["decode_tok_s"] for p in peers)
    best_prefill = min(rows[p]["prefill_ms"] for p in peers)
    for row in rows.values():
        row["decode_vs_best_peer"] = row["decode_tok_s"] / best_decode
        row["prefill_vs_best_peer"] = best_prefill / row["prefill_ms"]
    result = {
        "model": args.model,
        "threads": args.threads,
        "prompt_tokens": len(prompt),
        "new_tokens": args.new_tokens,
        "rounds": rounds,
        "perplexity_tokens": len(text_ids),
        "load_average": {"before": load_before, "after": load_after},
        "cpu_count": os.cpu_count(),
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(_render(result))
    return 0


def _render(result: dict) -> str:
    rows = result["rows"]
    lines = [
        f"{result['model']}: {result['prompt_tokens']}-token prompt, {result['new_tokens']} greedy "
        f"tokens, {result['threads']} threads, median of {result['rounds']} interleaved rounds; "
        f"load average {result['load_average']['before'][0]:.1f} -> "
        f"{result['load_average']['after'][0]:.1f} on {result['cpu_count']} cores",
        "| variant | MB | decode tok/s | × best peer | prefill ms | peak RSS MB | perplexity |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        ppl = row.get("perplexity")
        lines.append(
            f"| {name} | {row['mb'] or 0:.1f} | {row['decode_tok_s']:.1f} | "
            f"{row['decode_vs_best_peer']:.2f}× | {row['prefill_ms']:.1f} | "
            f"{row['peak_rss_mb']:.0f} | {f'{ppl:.2f}' if ppl else 'n/a'} |"
        )
    goals = []
    for peer in ("genai int4", GENAI_PINNED):
        if peer in rows and "fdec int4" in rows:
            goals.append(
                f"fdec int4 / {peer} decode: "
                f"{rows['fdec int4']['decode_tok_s'] / rows[peer]['decode_tok_s']:.2f}× (goal 1.25×)"
            )
    if "fdec fp32" in rows:
        goals.append(
            f"fdec fp32 / PyTorch eager decode: "
            f"{rows['fdec fp32']['decode_tok_s'] / rows['pytorch eager']['decode_tok_s']:.2f}× (goal 2×)"
        )
    base = rows["pytorch eager"].get("perplexity")
    if base:
        for name in ("fdec int4", "genai int4"):
            if rows.get(name, {}).get("perplexity"):
                goals.append(
                    f"{name} perplexity vs fp32: {rows[name]['perplexity'] / base - 1:+.1%}"
                )
    return "\n".join(lines + goals)


if __name__ == "__main__":
    sys.exit(main())
