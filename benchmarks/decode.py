"""Decode speed and perplexity: PyTorch eager `generate` against an fdec build, in one run.

    python benchmarks/decode.py                      # SmolLM2-135M, compiles build/smollm2 if missing
    python benchmarks/decode.py --model DIR --build build/x --rounds 5
    python benchmarks/decode.py --build build/fp32=none --build build/int4=int4-awq-mixed
    python benchmarks/decode.py --build build/int8=int8 --genai int8 --prompt-tokens 512

Each `--build DIR[=RECIPE]` is one row; a missing DIR is compiled first with
`--quantize RECIPE` (without one: the target's default recipe, int4-awq on the CPU).

`--genai PRECISION` (repeatable) adds onnxruntime-genai's own CPU build (`-p PRECISION -e cpu`,
built into build/genai-PRECISION when missing) run by its native generator.

Every side uses the same prompt, thread count and greedy decoding; rounds are interleaved and
medians reported. Decode tok/s excludes the prefill: PyTorch's is (N-1) / (t(N) - t(1)) from
`generate` with N and 1 new tokens; fdec's is timed inside its own loop after the first token,
genai's after its first generated token. Prefill (fdec, genai) is the prompt's forward pass.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
import warnings

import numpy as np


def _pytorch_decode(model, ids, new_tokens: int) -> float:
    import torch

    def timed(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - start

    one = timed(1)
    full = timed(new_tokens)
    return (new_tokens - 1) / max(full - one, 1e-9)


def _fdec_decode(session, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(decode tok/s, prefill seconds) of one fdec generation."""
    from fdec.runtime import generate

    result = generate(session, prompt, max_new_tokens=new_tokens)
    return result.decode_tokens_per_s, result.prefill_s


def _size_mb(folder: pathlib.Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("model.onnx*")) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--build", action="append", help="DIR[=RECIPE], repeatable (default: build/smollm2)"
    )
    parser.add_argument("--prompt-tokens", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads for every side (default: --fusion lets each side choose as its "
        "users get it: fdec's build config, i.e. auto_threads(), and onnxruntime-genai's own "
        "default; otherwise 2)",
    )
    parser.add_argument(
        "--genai",
        action="append",
        default=[],
        choices=("int4", "int8", "fp32"),
        help="add onnxruntime-genai's own cpu build of this precision (repeatable)",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--fusion", action="store_true", help="plain traced vs fused + shared-KV builds (issue 5)"
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.fusion:
        return _fusion_comparison(args)
    if args.threads is None:
        args.threads = 2

    import torch
    import transformers

    from fdec.compile import CompileOptions, compile_model
    from fdec.frontend.export import load_hf_model, load_tokenizer
    from fdec.frontend.source import resolve_source
    from fdec.lower import MODEL_FILE, RUNTIME_CONFIG
    from fdec.runtime import OrtModel, open_session
    from fdec.verify import held_text, perplexity

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    builds: dict[str, tuple[pathlib.Path, str | None]] = {}
    for given in args.build or ["build/smollm2"]:
        folder, _, recipe = given.partition("=")
        builds[folder] = (pathlib.Path(folder), recipe or None)
    sessions = {}
    for name, (folder, recipe) in builds.items():
        if not (folder / "model.onnx").exists():
            print(f"compiling {args.model} into {folder} ({recipe}) ...", file=sys.stderr)
            compile_model(CompileOptions(model=args.model, out=folder, quantize=recipe))
        runtime = json.loads((folder / RUNTIME_CONFIG).read_text())
        level = runtime["session_options"]["graph_optimization_level"]  # basic for Q/DQ
        sessions[name] = OrtModel(
            open_session(folder / MODEL_FILE, threads=args.threads, optimization=level)
        )
    source = resolve_source(args.model)
    model = load_hf_model(source)
    tokenizer = load_tokenizer(source.folder)

    text_ids = tokenizer(held_text(), add_special_tokens=False)["input_ids"]
    prompt = (text_ids * 4)[: args.prompt_tokens]
    ids = torch.tensor([prompt])
    runners = {
        name: lambda n, s=session: _fdec_decode(s, prompt, n) for name, session in sessions.items()
    }
    for precision in args.genai:
        folder = pathlib.Path("build") / f"genai-{precision}"
        genai = _genai_runner(folder, source.folder, prompt, args.threads, precision)
        if genai is None:
            print(f"onnxruntime-genai not installed: genai {precision} skipped", file=sys.stderr)
            continue
        runners[f"genai {precision}"] = genai[0]
        builds[f"genai {precision}"] = (folder, precision)
    torch_rates: list[float] = []
    fdec_rates: dict[str, list[float]] = {name: [] for name in runners}
    prefills: dict[str, list[float]] = {name: [] for name in runners}
    _pytorch_decode(model, ids, 4)  # warm-up every side
    for run in runners.values():
        run(4)
    for _ in range(args.rounds):
        torch_rates.append(_pytorch_decode(model, ids, args.new_tokens))
        for name, run in runners.items():
            rate, prefill_s = run(args.new_tokens)
            fdec_rates[name].append(rate)
            prefills[name].append(prefill_s)

    scored = np.asarray([text_ids], dtype=np.int64)
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(scored)).logits.numpy()
    torch_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
    rows = {
        "pytorch_eager": {
            "decode_tok_s": statistics.median(torch_rates),
            "perplexity": perplexity(torch_logits, scored),
            "mb": torch_mb,
        },
    }
    for name in runners:
        session = sessions.get(name)
        fdec_logits = session.decode(scored, session.empty_past(1), 0)[0] if session else None
        rows[name] = {
            "decode_tok_s": statistics.median(fdec_rates[name]),
            "prefill_ms": 1000 * statistics.median(prefills[name]),
            "perplexity": perplexity(fdec_logits, scored) if session else float("nan"),
            "mb": _size_mb(builds[name][0]),
            "providers": session.providers if session else ["onnxruntime-genai (cpu)"],
        }
    first = next(iter(sessions))
    ratio = rows[first]["decode_tok_s"] / rows["pytorch_eager"]["decode_tok_s"]
    result = {
        "model": args.model,
        "build": list(sessions),
        "threads": args.threads,
        "prompt_tokens": len(prompt),
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "perplexity_tokens": len(text_ids),
        "rows": rows,
        "speedup_vs_pytorch": ratio,
        "torch_rounds": torch_rates,
        "fdec_rounds": fdec_rates,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{args.model}: {len(prompt)}-token prompt, {args.new_tokens} greedy tokens, "
        f"{args.threads} threads, median of {args.rounds} interleaved rounds"
    )
    print(
        f"{'variant':<24} {'MB':>8} {'prefill ms':>11} {'decode tok/s':>13} {'perplexity':>11} "
        f"{'vs eager':>9}"
    )
    eager = rows["pytorch_eager"]["decode_tok_s"]
    for name, row in rows.items():
        prefill = f"{row['prefill_ms']:>11.0f}" if "prefill_ms" in row else f"{'-':>11}"
        print(
            f"{name:<24} {row['mb']:>8.1f} {prefill} {row['decode_tok_s']:>13.1f} "
            f"{row['perplexity']:>11.3f} {row['decode_tok_s'] / eager:>8.2f}x"
        )
    print(f"providers used by the fdec builds: {', '.join(rows[first]['providers'])}")
    return 0


# --- issue 5: plain traced build vs fused + shared-KV-buffer build -------------------------------


def _fusion_comparison(args) -> int:
    """fp32 and int4, each plain (cleanup passes, numpy KV loop) and fused (fuse-attention,
    shared KV buffer through IOBinding), plus onnxruntime-genai's int4 build when installed:
    node counts and decode tok/s, rounds interleaved, medians and ratios."""
    import onnx

    from fdec.compile import CompileOptions, compile_model, plan_pipeline
    from fdec.frontend.export import load_tokenizer
    from fdec.frontend.source import resolve_source
    from fdec.lower import MODEL_FILE
    from fdec.runtime import OrtModel, generate, open_session
    from fdec.targets import load_target
    from fdec.verify import held_text

    source = resolve_source(args.model)
    tokenizer = load_tokenizer(source.folder)
    text_ids = tokenizer(held_text(), add_special_tokens=False)["input_ids"]
    prompt = (text_ids * 4)[: args.prompt_tokens]
    root = pathlib.Path("build")
    rows: dict[str, dict] = {}
    runners = {}
    for precision in ("fp32", "int4"):
        for variant, passes in (("plain", "default"), ("fused", None)):
            folder = root / f"smollm2-{precision}-{variant}"
            planned = plan_pipeline(
                target=load_target("cpu"), backend="onnxruntime", passes=passes, quantize=precision
            ).pass_names
            built = _built_pipeline(folder)
            # Missing, or made before a fusion pass the plan now has (e.g. pack-qkv).
            if built is None or {"fuse-attention", "pack-qkv"} & (set(planned) - set(built)):
                print(f"compiling {folder} ...", file=sys.stderr)
                compile_model(
                    CompileOptions(model=args.model, out=folder, quantize=precision, passes=passes)
                )
            graph = onnx.load(str(folder / MODEL_FILE), load_external_data=False).graph
            session = OrtModel(open_session(folder / MODEL_FILE, threads=args.threads))
            bound = variant == "fused"
            name = f"{precision} {variant}"
            rows[name] = {
                "nodes": len(graph.node),
                "mb": _size_mb(folder),
                "threads": session.session.get_session_options().intra_op_num_threads,
                "kv_buffer": session.kv_buffer if bound else "numpy loop",
            }
            runners[name] = lambda n, s=session, b=bound: (
                generate(s, prompt, max_new_tokens=n, bound=b).decode_tokens_per_s
            )
    genai = _genai_runner(root / "genai-int4", source.folder, prompt, args.threads)
    if genai is not None:
        genai_run, genai_threads = genai
        runners["genai int4"] = lambda n: genai_run(n)[0]
        peer = root / "genai-int4"
        rows["genai int4"] = {
            "nodes": len(onnx.load(str(peer / "model.onnx"), load_external_data=False).graph.node),
            "mb": sum(p.stat().st_size for p in peer.glob("model.onnx*")) / 1e6,
            "threads": genai_threads,
            "kv_buffer": "genai native",
        }
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for run in runners.values():
        run(4)  # warm-up
    for _ in range(args.rounds):
        for name, run in runners.items():
            rates[name].append(run(args.new_tokens))
    for name, row in rows.items():
        row["decode_tok_s"] = statistics.median(rates[name])
        row["rounds"] = rates[name]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{args.model}: {len(prompt)}-token prompt, {args.new_tokens} greedy tokens, "
        f"median of {args.rounds} interleaved rounds, load average {load:.1f} on "
        f"{os.cpu_count()} CPUs"
    )
    print(f"{'variant':<12} {'nodes':>7} {'MB':>7} {'threads':>7} {'decode tok/s':>13}  KV cache")
    for name, row in rows.items():
        print(
            f"{name:<12} {row['nodes']:>7} {row['mb']:>7.1f} {row['threads']:>7} "
            f"{row['decode_tok_s']:>13.1f}  {row['kv_buffer']}"
        )
    for precision in ("fp32", "int4"):
        plain, fused = rows[f"{precision} plain"], rows[f"{precision} fused"]
        print(
            f"{precision}: nodes {plain['nodes'] / fused['nodes']:.1f}x fewer, decode "
            f"{fused['decode_tok_s'] / plain['decode_tok_s']:.2f}x faster (fused / plain)"
        )
    if genai is not None:
        ratio = rows["int4 fused"]["decode_tok_s"] / rows["genai int4"]["decode_tok_s"]
        print(f"int4 fused / onnxruntime-genai int4 decode: {ratio:.2f}x (goal 1.25x)")
    else:
        print("onnxruntime-genai not installed: its int4 peer was skipped")
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


def _genai_runner(
    folder: pathlib.Path,
    hf_folder: pathlib.Path,
    prompt: list[int],
    threads: int,
    precision: str = "int4",
):
    """(run, threads): onnxruntime-genai's own cpu build of `precision` and its native
    generator, run(new_tokens) giving (decode tok/s, prefill seconds); None when not
    installed."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    import subprocess

    if not (folder / "model.onnx").exists():
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder)]
        command += ["-o", str(folder), "-p", precision, "-e", "cpu", "-c", str(folder) + "-cache"]
        subprocess.run(command, check=True, capture_output=True)
    from fdec.lower.genai import open_genai_model

    model = open_genai_model(folder, threads)
    # Its default: max(1, hardware_concurrency / 2) intra-op threads (model.cpp), 1 on 2 CPUs.
    used = threads or max(1, min(16, (os.cpu_count() or 2) // 2))

    def run(new_tokens: int) -> tuple[float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(
            max_length=len(prompt) + new_tokens,
            do_sample=False,
            min_length=len(prompt) + new_tokens,
        )
        generator = og.Generator(model, params)
        began = time.perf_counter()
        generator.append_tokens(prompt)  # prefill
        prefill_s = time.perf_counter() - began
        generator.generate_next_token()  # the first token
        start = time.perf_counter()
        steps = 0
        while not generator.is_done():
            generator.generate_next_token()
            steps += 1
        return steps / (time.perf_counter() - start), prefill_s

    return run, used


def _built_pipeline(folder: pathlib.Path) -> list[str] | None:
    """The pass names a build was made with (fdec-build.json), None when there is no build."""
    manifest = folder / "fdec-build.json"
    if not (folder / "model.onnx").exists() or not manifest.exists():
        return None
    pipeline = json.loads(manifest.read_text()).get("pipeline") or []
    return [p if isinstance(p, str) else p.get("name") for p in pipeline]


if __name__ == "__main__":
    sys.exit(main())
