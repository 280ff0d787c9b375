"""Peak memory of `fdec compile` against the model's fp32 size: a ~1B Llama made from a config, and SmolLM2.

    python benchmarks/large_weights.py                     # ~1.1B (TinyLlama shape) + SmolLM2
    python benchmarks/large_weights.py --models smollm2    # SmolLM2-135M only
    python benchmarks/large_weights.py --layers 8          # a smaller Llama (same widths)
    python benchmarks/large_weights.py --stream both --models smollm2,llama-1b   # issue 19
    python benchmarks/large_weights.py --stream stream --models llama-8b --max-rss-gb 8
    python benchmarks/large_weights.py --stream no-stream --models llama-1b-bf16 --target h200 \
        --backend onnxruntime --quantize default     # the CUDA graph, checked slice by slice

The large model is written tensor by tensor (random normal weights, std 0.02, to a
safetensors file whose header is written first), so the writer never holds more than one
tensor. Each model is compiled fp32 for the cpu target (`--quantize none`) in a subprocess;
its peak RSS comes from `os.wait4`'s rusage for that child alone and is printed next to the
model's fp32 weight bytes. Goal (issue 9): peak RSS < 2 x fp32 size + a fixed overhead
(the interpreter, torch, onnxruntime: measured here as the peak of compiling a tiny model).
A watchdog kills a compile whose RSS passes --max-rss-gb, so the benchmark cannot take the
machine down.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

GIB = 1024**3

# TinyLlama-1.1B's shape: 1.10e9 parameters, 4.4 GB in fp32.
LLAMA_1B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# Llama-3.1-8B's shape: 8.0e9 parameters (7.5e9 with tied embeddings), ~15 GB in bf16.
LLAMA_8B = {
    **LLAMA_1B,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}


def _llama_tensors(config: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF name, shape, init) of every Llama parameter, in the order HF writes them."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    names = [("model.embed_tokens.weight", (v, h), "normal")]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        names += [
            (p + "input_layernorm.weight", (h,), "ones"),
            (p + "self_attn.q_proj.weight", (h, h), "normal"),
            (p + "self_attn.k_proj.weight", (kv, h), "normal"),
            (p + "self_attn.v_proj.weight", (kv, h), "normal"),
            (p + "self_attn.o_proj.weight", (h, h), "normal"),
            (p + "post_attention_layernorm.weight", (h,), "ones"),
            (p + "mlp.gate_proj.weight", (i, h), "normal"),
            (p + "mlp.up_proj.weight", (i, h), "normal"),
            (p + "mlp.down_proj.weight", (h, i), "normal"),
        ]
    names += [("model.norm.weight", (h,), "ones"), ("lm_head.weight", (v, h), "normal")]
    return names


def write_llama(
    folder: pathlib.Path,
    config: dict,
    *,
    seed: int = 0,
    dtype: str = "F32",
    verifiable: bool = False,
) -> int:
    """config.json + model.safetensors with random weights; returns the parameter count.

    `dtype` is F32 or BF16 (bf16 by truncating fp32 draws). `verifiable`: embeddings tied and
    the layers' projections scaled by 0.1 (std 0.002), so the residual stream stays close to
    the input token's embedding and the model predicts its input token with a wide margin: a
    lossy build then verifies on greedy tokens instead of failing on near-uniform logits. Rows
    are drawn in chunks, so the writer never holds more than ~256 MB."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    config = dict(config, torch_dtype={"F32": "float32", "BF16": "bfloat16"}[dtype])
    if verifiable:
        config["tie_word_embeddings"] = True
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = _llama_tensors(config)
    if config.get("tie_word_embeddings"):
        tensors = [t for t in tensors if t[0] != "lm_head.weight"]
    itemsize = 4 if dtype == "F32" else 2
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in tensors:
        size = itemsize * int(np.prod(shape))
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
    rng = np.random.default_rng(seed)
    partial = folder / "model.safetensors.partial"
    with partial.open("wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        for name, shape, init in tensors:
            std = 0.02 if not verifiable or "embed_tokens" in name else 0.002
            rows_per_chunk = max(1, (64 << 20) // int(np.prod(shape[1:], dtype=np.int64)))
            for start in range(0, shape[0], rows_per_chunk):
                rows = (min(rows_per_chunk, shape[0] - start), *shape[1:])
                if init == "ones":
                    array = np.ones(rows, dtype=np.float32)
                else:
                    array = rng.standard_normal(rows, dtype=np.float32)
                    array *= std
                if dtype == "BF16":
                    array = (array.view(np.uint32) >> 16).astype(np.uint16)
                handle.write(array.tobytes())
                del array
    partial.rename(folder / "model.safetensors")
    return offset // itemsize


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def compile_peak(
    model: str,
    out: pathlib.Path,
    *,
    cap_bytes: int,
    extra: list[str],
    target: str = "cpu",
    quantize: str | None = "none",
) -> dict:
    """Run `fdec compile MODEL --target T [--quantize Q]`; its exit code, peak RSS, time."""
    # A fresh cache folder: a cold compile (export, reference, passes) with the cache writing
    # its entries, as a user's first compile does.
    cache = out.parent / f"{out.name}-cache"
    shutil.rmtree(cache, ignore_errors=True)
    command = [sys.executable, "-m", "fdec.cli", "compile", model, "--target", target,
               *(["--quantize", quantize] if quantize else []), "-o", str(out),
               "--cache-dir", str(cache), *extra]  # fmt: skip
    # No --json: it silences the progress lines that `stage_peaks` times the stages by; the
    # outcome is read from the build's report.json instead.
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = threading.Event()
    samples: list[tuple[float, int]] = []

    def watch() -> None:
        while proc.poll() is None:
            rss = rss_bytes(proc.pid)
            samples.append((time.perf_counter() - started, rss))
            if rss > cap_bytes:
                killed.set()
                os.kill(proc.pid, signal.SIGKILL)
                return
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout_chunks: list[str] = []
    reader = threading.Thread(target=lambda: stdout_chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    watcher.join(2)
    wall = time.perf_counter() - started
    summary = {}
    if proc.returncode == 0 and (out / "report.json").exists():
        summary = json.loads((out / "report.json").read_text())
    return {
        "exit_code": proc.returncode,
        "killed_at_cap": killed.is_set(),
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports KiB
        "wall_s": round(wall, 1),
        "progress": [line for line in stderr.splitlines() if line.strip()][-3:],
        "verified": (summary.get("verification") or {}).get("ok"),
        "command": " ".join(command[1:]),
        # (seconds, RSS) every ~5 s: where in the compile the memory went
        "rss_timeline": [(round(t), round(r / GIB, 2)) for t, r in samples[::10]],
        "stderr_progress": [line for line in stderr.splitlines() if line.startswith("[fdec ")],
        "stage_peaks": stage_peaks(stderr, samples),
    }


_PROGRESS = re.compile(r"^\[fdec\s+([\d.]+)s\] (.*)$")


def stage_peaks(stderr: str, samples: list[tuple[float, int]]) -> list[dict]:
    """The peak RSS (GiB) and seconds of each stage, a stage running from one progress line
    (`[fdec  12.3s] message`, seconds since the compile started) to the next."""
    marks = [(float(m.group(1)), m.group(2)[:70]) for m in map(_PROGRESS.match, stderr.splitlines())
             if m]  # fmt: skip
    stages = []
    for index, (start, message) in enumerate(marks):
        stop = marks[index + 1][0] if index + 1 < len(marks) else float("inf")
        peak = max((rss for t, rss in samples if start <= t < stop), default=0)
        if stop - start >= 1 or peak:
            stages.append({"stage": message, "from_s": round(start),
                           "peak_rss_gib": round(peak / GIB, 2)})  # fmt: skip
    return stages


def _row(name: str, fp32_bytes: int, result: dict, overhead: int) -> dict:
    peak = result["peak_rss_bytes"]
    return {
        "model": name,
        "fp32_gb": round(fp32_bytes / GIB, 2),
        "peak_rss_gb": round(peak / GIB, 2),
        "peak_over_fp32": round(peak / fp32_bytes, 2),
        "goal_gb": round((2 * fp32_bytes + overhead) / GIB, 2),
        "meets_goal": peak < 2 * fp32_bytes + overhead and result["exit_code"] == 0,
        **{k: result[k] for k in ("exit_code", "killed_at_cap", "verified", "wall_s")},
    }


def cached_llama(name: str) -> pathlib.Path:
    """A verifiable bf16 Llama written once into fdec's cache (benchmarks/NAME)."""
    from fdec.frontend.source import default_cache_dir

    config = {"llama-8b": LLAMA_8B, "llama-1b-bf16": LLAMA_1B}[name]
    folder = default_cache_dir() / "benchmarks" / f"{name}-verifiable"
    if not (folder / "model.safetensors").exists():
        print(f"writing {name} (bf16, verifiable) to {folder}", file=sys.stderr)
        write_llama(folder, config, dtype="BF16", verifiable=True)
    return folder


def _build_digest(out: pathlib.Path) -> dict:
    import hashlib

    digests = {}
    for name in ("model.onnx", "model.onnx.data"):
        path = out / name
        if path.exists():
            sha = hashlib.sha256()
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    sha.update(block)
            digests[name] = sha.hexdigest()
    return digests


def streaming(args: argparse.Namespace) -> int:
    """Issue 19: compile through the streamed front end (and, with --stream both, today's
    path too, comparing the model files byte for byte); one row per compile."""
    cap = int(args.max_rss_gb * GIB)
    rows = []
    work = pathlib.Path(tempfile.mkdtemp(prefix="fdec-stream-", dir=args.workdir))
    try:
        for name in args.models.split(","):
            if name == "smollm2":
                from fdec.frontend.source import resolve_source

                model = str(resolve_source("smollm2-135m").folder)
            elif name == "llama-1b":
                model = str(work / "llama")
                write_llama(work / "llama", dict(LLAMA_1B, num_hidden_layers=args.layers))
            else:
                model = str(cached_llama(name))
            modes = ["--no-stream", "--stream"] if args.stream == "both" else [f"--{args.stream}"]
            digests = {}
            for mode in modes:
                out = work / f"{name}{mode}"
                print(f"compiling {name} {mode} --target {args.target} "
                      f"--quantize {args.quantize}", file=sys.stderr)  # fmt: skip
                quantize = None if args.quantize == "default" else args.quantize
                backend = ["--backend", args.backend] if args.backend else []
                result = compile_peak(model, out, cap_bytes=cap,
                                      extra=[mode, "--no-cache", *backend],
                                      target=args.target, quantize=quantize)  # fmt: skip
                digests[mode] = _build_digest(out) if result["exit_code"] == 0 else {}
                report = {}
                if (out / "report.json").exists():
                    report = json.loads((out / "report.json").read_text())
                rows.append({
                    "model": name, "mode": mode, "exit_code": result["exit_code"],
                    "killed_at_cap": result["killed_at_cap"],
                    "peak_rss_gib": round(result["peak_rss_bytes"] / GIB, 2),
                    "wall_s": result["wall_s"], "verified": result["verified"],
                    "verification": {
                        k: (report.get("verification") or {}).get(k)
                        for k in ("ok", "numeric", "greedy", "reference", "checks", "sliced")
                    },
                    "export": report.get("export"),  # wall time, what was spilled
                    "front": report.get("cache") or report.get("front"),
                    "command": result["command"],
                    "rss_timeline": result["rss_timeline"][::12],  # (s, GiB) every ~60 s
                    "stage_peaks": result["stage_peaks"],
                    "progress": result["progress"],
                })  # fmt: skip
                shutil.rmtree(out, ignore_errors=True)
            if len(digests) == 2:
                rows[-1]["identical_to_no_stream"] = {
                    file: digests["--stream"].get(file) == digest
                    for file, digest in digests["--no-stream"].items()
                }
            shutil.rmtree(work / "llama", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(rows, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,llama-1b", help="smollm2, llama-1b")
    parser.add_argument("--layers", type=int, default=LLAMA_1B["num_hidden_layers"])
    parser.add_argument("--max-rss-gb", type=float, default=18.0, help="watchdog: kill above")
    parser.add_argument("--workdir", type=pathlib.Path, default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--stream",
        choices=("both", "stream", "no-stream"),
        default=None,
        help="issue 19: compile with the streamed front end (both: and today's path, compared "
        "byte for byte); models also llama-1b-bf16, llama-8b (verifiable bf16, cached)",
    )
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--backend", default=None, help="with --stream: e.g. onnxruntime")
    parser.add_argument("--quantize", default="int4-rtn", help="with --stream; default: recipe")
    args = parser.parse_args(argv)
    if args.workdir is not None:  # made if missing (mkdtemp needs the folder)
        args.workdir.mkdir(parents=True, exist_ok=True)
    if args.stream:
        return streaming(args)
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    from models import make_tiny_model

    work = pathlib.Path(tempfile.mkdtemp(prefix="fdec-large-", dir=args.workdir))
    cap = int(args.max_rss_gb * GIB)
    rows, details = [], {}
    try:
        # The fixed overhead: interpreter + torch + transformers + onnxruntime, on a tiny model.
        tiny = make_tiny_model(work / "tiny", "llama")
        base = compile_peak(str(tiny), work / "tiny-build", cap_bytes=cap, extra=[])
        overhead = base["peak_rss_bytes"]
        print(f"fixed overhead (tiny model compile): {overhead / GIB:.2f} GiB", file=sys.stderr)
        for name in args.models.split(","):
            if name == "smollm2":
                # Convert the bundled GGUF once (into the default cache) and compile the
                # safetensors folder it gives: the compile's fresh --cache-dir then holds only
                # what the compile itself stores.
                from fdec.frontend.source import resolve_source

                source = resolve_source("smollm2-135m")
                fp32 = sum(p.stat().st_size for p in source.weight_files)
                model = str(source.folder)
            elif name == "llama-1b":
                config = dict(LLAMA_1B, num_hidden_layers=args.layers)
                print(f"writing a {args.layers}-layer Llama to {work / 'llama'}", file=sys.stderr)
                params = write_llama(work / "llama", config)
                fp32 = 4 * params
                model = str(work / "llama")
                print(
                    f"  {params / 1e9:.2f}e9 parameters, {fp32 / GIB:.2f} GiB fp32", file=sys.stderr
                )
            else:
                parser.error(f"unknown model {name!r}")
            print(f"compiling {name} (fp32, cpu)...", file=sys.stderr)
            result = compile_peak(model, work / f"{name}-build", cap_bytes=cap, extra=[])
            rows.append(_row(name, fp32, result, overhead))
            details[name] = result
            shutil.rmtree(work / f"{name}-build", ignore_errors=True)
            shutil.rmtree(work / "llama", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(
            json.dumps(
                {"overhead_gb": round(overhead / GIB, 2), "rows": rows, "details": details},
                indent=2,
            )
        )
        return 0
    print(f"fixed overhead (tiny model): {overhead / GIB:.2f} GiB")
    print(
        f"{'model':<10} {'fp32 GiB':>9} {'peak RSS GiB':>13} {'x fp32':>7} {'goal GiB':>9} {'ok':>4} {'verified':>9} {'wall s':>7}"
    )
    for row in rows:
        print(
            f"{row['model']:<10} {row['fp32_gb']:>9.2f} {row['peak_rss_gb']:>13.2f} "
            f"{row['peak_over_fp32']:>7.2f} {row['goal_gb']:>9.2f} "
            f"{'yes' if row['meets_goal'] else 'NO':>4} {row['verified']!s:>9} {row['wall_s']:>7}"
        )
    for name, result in details.items():
        print(
            f"\n{name}: exit {result['exit_code']}, RSS timeline (s, GiB): {result['rss_timeline']}"
        )
        for line in result["stderr_progress"]:
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
