"""`fdec bench`: prefill latency, decode throughput per batch size, peak memory and the fraction
of this machine's memory-bandwidth bound, measured on a build and written to BUILD/bench.json,
which `fdec report` shows (text, --json under "bench", html "Measured speed").

Bytes read per decode step = the weights (every initializer's bytes, less tables read one row
per token by a Gather: an untied embedding) + the KV cache of every row at its mean length
over the decode steps. The bandwidth is measured here by summing a large float32 array with
one thread per core, best of several tries; on a GPU session it is the GPU's own memory,
measured by a device-to-device copy through ONNX Runtime (`measure_device_bandwidth`), and the
result names the device. fraction = bytes per step × steps per second ÷ bandwidth; 1.0 is the
roofline, a little above it can happen (caches, a noisy bandwidth try).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import pathlib
import platform
import resource
import statistics
import sys
import threading
import time
from typing import Any

import numpy as np

from fdec.errors import InputError, UsageError
from fdec.report.bench_results import (
    BENCH_FILE,
    BENCH_HTML,
    BENCH_KEY,
    load_bench,
    render_bench,
)
from fdec.runtime.ort import GPU_PROVIDERS, device_name

__all__ = [
    "BENCH_FILE",
    "BENCH_HTML",
    "BENCH_KEY",
    "load_bench",
    "measure_bandwidth",
    "measure_device_bandwidth",
    "parse_batches",
    "render_bench",
    "run_bench",
    "weight_bytes",
    "write_bench",
]

logger = logging.getLogger(__name__)

_GATHER_OPS = ("Gather", "GatherBlockQuantized")
# Bytes per element by ONNX TensorProto data type (4-bit types: half a byte).
_ITEM_BYTES = {
    1: 4,
    2: 1,
    3: 1,
    5: 2,
    6: 4,
    7: 8,
    9: 1,
    10: 2,
    11: 8,
    16: 2,
    17: 1,
    21: 0.5,
    22: 0.5,
}


def parse_batches(text: str) -> list[int]:
    """`1,4,16` → [1, 4, 16]; anything else is a UsageError naming the bad value."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise UsageError(
                f"--batch {text!r}: {part!r} is not a positive whole number",
                "give batch sizes as a comma-separated list, e.g. --batch 1,4,16",
            )
        values.append(int(part))
    return sorted(set(values))


def weight_bytes(model_file: pathlib.Path) -> dict[str, int]:
    """{"total", "gathered"}: bytes of every initializer, and of those only Gather-ed (read a
    row per token: an embedding table not shared with lm_head)."""
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    uses: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    for node in graph.node:
        for index, name in enumerate(node.input):
            uses[name].append((node.op_type, index))
    total = gathered = 0
    for tensor in graph.initializer:
        size = _tensor_bytes(tensor)
        total += size
        used = uses.get(tensor.name, [])
        if used and all(op in _GATHER_OPS and index != 1 for op, index in used):
            gathered += size
    return {"total": total, "gathered": gathered}


def _tensor_bytes(tensor: Any) -> int:
    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    if tensor.raw_data:
        return len(tensor.raw_data)
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    return int(count * _ITEM_BYTES.get(tensor.data_type, 4))


def measure_bandwidth(
    *, megabytes: int = 512, tries: int = 7, threads: int | None = None
) -> dict[str, Any]:
    """Memory read bandwidth of this machine in GB/s: sum a float32 array far larger than the
    caches, split across `threads` threads (numpy releases the GIL), best of `tries`."""
    threads = threads or os.cpu_count() or 1
    array = np.ones(megabytes * (1 << 20) // 4, dtype=np.float32)
    parts = np.array_split(array, threads)
    sink = [0.0] * threads

    def work(index: int) -> None:
        sink[index] = float(parts[index].sum())

    best = 0.0
    for _ in range(tries):
        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = max(best, array.nbytes / (time.perf_counter() - start) / 1e9)
    return {"gb_s": round(best, 2), "array_mb": megabytes, "tries": tries, "threads": threads}


def measure_device_bandwidth(
    provider: str, *, megabytes: int = 1024, runs: int = 20, tries: int = 3
) -> dict[str, Any]:
    """Memory bandwidth of the device `provider` runs on, in GB/s: ONNX Runtime copies a
    `megabytes` float32 tensor device to device (an Identity node, input and output bound on
    the device through IOBinding) `runs` times, the device synchronised at the end; read and
    write bytes both count, best of `tries`. On a GPU this is the GPU's memory, which the
    decode roofline reads weights from (host RAM says nothing about it)."""
    import onnx
    from onnx import TensorProto, helper

    from fdec.runtime.ort import CUDA_PROVIDER, require_onnxruntime

    ort = require_onnxruntime()
    on_gpu = provider in GPU_PROVIDERS
    # The copy runs through the CUDA provider for either GPU provider (an Identity node means
    # nothing to TensorRT); the CPU provider copies host memory.
    session_provider = CUDA_PROVIDER if on_gpu else "CPUExecutionProvider"
    device = "cuda" if on_gpu else "cpu"
    count = megabytes * (1 << 20) // 4
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "copy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [count])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [count])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=[session_provider])
    source = ort.OrtValue.ortvalue_from_numpy(np.ones(count, np.float32), device, 0)
    target = ort.OrtValue.ortvalue_from_shape_and_type((count,), np.float32, device, 0)
    binding = session.io_binding()
    binding.bind_ortvalue_input("x", source)
    binding.bind_ortvalue_output("y", target)
    session.run_with_iobinding(binding)  # warm-up
    binding.synchronize_outputs()
    best = 0.0
    for _ in range(tries):
        start = time.perf_counter()
        for _ in range(runs):
            session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        best = max(best, 2 * count * 4 * runs / (time.perf_counter() - start) / 1e9)
    return {
        "gb_s": round(best, 2),
        "method": "device-to-device copy through ONNX Runtime (Identity), read + write bytes",
        "provider": session.get_providers()[0],
        "device": device_name(provider),
        "array_mb": megabytes,
        "runs": runs,
        "tries": tries,
    }


def peak_rss_mb() -> float:
    """This process's peak resident set in MB: Linux's VmHWM, which starts again at exec. (A
    child's ru_maxrss keeps its parent's peak from before the exec: every worker of
    benchmarks/run.py reported its parent's 1,714 MB.)"""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes vs KiB


DEFAULT_PROMPT_LEN, DEFAULT_GEN_LEN = 40, 64  # fdec bench's --prompt-len and --gen-len


def run_bench(
    folder: pathlib.Path,
    *,
    batches: list[int],
    prompt_len: int | None = None,
    gen_len: int | None = None,
    rounds: int = 3,
    threads: int = 0,
    bandwidth: dict[str, Any] | None = None,
    cuda_graph: bool | None = None,
) -> dict[str, Any]:
    """Measure a build: per batch size, median prefill ms and decode tok/s over `rounds`
    (batch sizes interleaved within each round), then the bandwidth fraction. `cuda_graph`
    as in `fdec.runner.load_build`. Without `prompt_len` and `gen_len`: 40 and 64 tokens, in
    that ratio within the positions of a model with fewer than 104."""
    from fdec.lower import MODEL_FILE
    from fdec.runner import load_build
    from fdec.runtime.batch import generate_batch
    from fdec.runtime.generate import KvPolicy
    from fdec.runtime.session import OrtModel, open_session

    folder = pathlib.Path(folder)
    defaults = prompt_len is None and gen_len is None
    prompt_len = DEFAULT_PROMPT_LEN if prompt_len is None else prompt_len
    gen_len = DEFAULT_GEN_LEN if gen_len is None else gen_len
    if prompt_len < 1 or gen_len < 2 or rounds < 1 or threads < 0:
        raise UsageError(
            f"--prompt-len {prompt_len}, --gen-len {gen_len}, --rounds {rounds}, --threads "
            f"{threads}: need prompt >= 1, gen >= 2, rounds >= 1, threads >= 0",
            "give positive lengths (decode speed needs at least 2 generated tokens)",
        )
    loaded = load_build(folder, cuda_graph=cuda_graph)
    model = loaded.model
    if not model.num_layers:
        raise InputError(f"{folder} is not a decoder build", "fdec bench measures causal LMs")
    if threads:  # the build's providers and CUDA graph choice, with the thread count asked for
        level = (loaded.config.get("session_options") or {}).get("graph_optimization_level")
        session = open_session(
            folder / MODEL_FILE, providers=loaded.config.get("providers"),
            optimization=level or "all", threads=threads, cuda_graph=model.cuda_graph,
        )  # fmt: skip
        model = OrtModel(session, kv_buffer=model.kv_buffer, kv_policy=model.kv_policy)
    kv = loaded.config.get("kv_cache") or {}
    limit = loaded.max_positions
    if defaults and limit and prompt_len + gen_len > limit:  # a model with few positions
        prompt_len = max(1, limit * DEFAULT_PROMPT_LEN // (DEFAULT_PROMPT_LEN + DEFAULT_GEN_LEN))
        gen_len = limit - prompt_len
    if limit and prompt_len + gen_len > limit:
        raise UsageError(
            f"--prompt-len {prompt_len} + --gen-len {gen_len} exceeds the build's "
            f"{limit} positions",
            f"keep prompt + generation within {limit} tokens",
        )
    vocab = _vocab_size(model)
    rng = np.random.default_rng(0)
    prompts = {b: rng.integers(1, vocab, size=(b, prompt_len)).tolist() for b in batches}
    generate_batch(model, prompts[batches[0]][:1], max_new_tokens=4)  # warm-up
    prefill: dict[int, list[float]] = {b: [] for b in batches}
    decode: dict[int, list[float]] = {b: [] for b in batches}
    for _ in range(rounds):
        for b in batches:
            result = generate_batch(model, prompts[b], max_new_tokens=gen_len)
            prefill[b].append(result.prefill_s * 1e3)
            decode[b].append(result.decode_tokens_per_s)
    peak_rss = peak_rss_mb()
    provider = model.providers[0] if model.providers else "CPUExecutionProvider"
    if bandwidth is None:  # the memory the weights are read from: the GPU's on a GPU session
        on_gpu = provider in GPU_PROVIDERS
        bandwidth = measure_device_bandwidth(provider) if on_gpu else measure_bandwidth()
    weights = weight_bytes(folder / MODEL_FILE)
    kv_per_token = int(
        kv.get("bytes_per_token")
        or 2
        * model.num_layers
        * model.kv_heads
        * model.head_dim
        * np.dtype(model.kv_dtype).itemsize
    )
    # past positions read, averaged over the decode steps; a cache the runtime trims holds at
    # most sink + window of them
    policy = KvPolicy.of(model.kv_policy)
    cap = policy.max_cache_tokens if policy is not None and policy.trims else None
    lengths = prompt_len + 0.5 + np.arange(gen_len - 1)  # mean: prompt + (gen - 1) / 2
    mean_length = float(np.mean(np.minimum(lengths, cap) if cap else lengths))
    streamed = weights["total"] - weights["gathered"]
    rows = []
    for b in batches:
        tok_s = statistics.median(decode[b])
        step_bytes = streamed + b * kv_per_token * mean_length
        steps_per_s = tok_s / b
        rows.append(
            {
                "batch": b,
                "prefill_ms": round(statistics.median(prefill[b]), 2),
                "decode_tok_s": round(tok_s, 2),
                "decode_tok_s_per_row": round(steps_per_s, 2),
                "bytes_per_step": int(step_bytes),
                "bound_steps_s": round(bandwidth["gb_s"] * 1e9 / step_bytes, 1),
                "bandwidth_fraction": round(
                    step_bytes * steps_per_s / (bandwidth["gb_s"] * 1e9), 3
                ),
                "prefill_ms_rounds": [round(v, 2) for v in prefill[b]],
                "decode_tok_s_rounds": [round(v, 2) for v in decode[b]],
            }
        )
    return {
        "build": str(folder),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "batches": list(batches),
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "rounds": rounds,
        "threads": threads or "onnxruntime default",
        "providers": model.providers,
        "device": {"provider": provider, "name": device_name(provider)},
        "cuda_graph": model.cuda_graph,
        "kv_buffer": model.kv_buffer,
        "peak_rss_mb": round(peak_rss, 1),
        "bandwidth": bandwidth,
        "weight_bytes": weights["total"],
        "gathered_bytes": weights["gathered"],
        "kv_bytes_per_token": kv_per_token,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "rows": rows,
    }


def _vocab_size(model: Any) -> int:
    logits = model.session.get_outputs()[model.output_names.index("logits")]
    vocab = logits.shape[-1]
    return vocab if isinstance(vocab, int) and vocab > 1 else 2


def write_bench(folder: pathlib.Path, bench: dict[str, Any]) -> pathlib.Path:
    """Store `bench` as BUILD/bench.json (temp file + rename: the newest run replaces the old)
    and, when the build has a report.json, BUILD/bench.html: the report rendered again with the
    "Measured speed" section. The build's outputs (report.json, report.html, the manifest) are
    left as they are, so `fdec verify` still checks what `fdec compile` wrote."""
    from fdec.report import REPORT_FILE, load_report

    folder = pathlib.Path(folder)
    path = folder / BENCH_FILE
    _replace(path, json.dumps(bench, indent=2) + "\n")
    if (folder / REPORT_FILE).is_file():
        from fdec.report.html import render_html

        _replace(folder / BENCH_HTML, render_html(load_report(folder)))
    return path


def _replace(path: pathlib.Path, text: str) -> None:
    # the temp name starts with the file's own name: `fdec verify` allows it like the file
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
