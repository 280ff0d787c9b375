"""fdec's GPU builds against PyTorch and onnxruntime-genai on one GPU, in one run (issue 16).

    python3 benchmarks/gpu.py --hf HF_FOLDER --build fp16=/tmp/b/fp16 --build int4=/tmp/b/int4 \\
        --build int8=/tmp/b/int8 --peer fp16 --peer int4 --batches 1,16 --gen 64 --json $OUT/gpu.json

Rows, all greedy, the same prompt ids (HF_FOLDER's tokenizer), `--gen` new tokens, batch sizes
`--batches`, median of `--rounds` timed calls after a warm-up, the device synchronised:
- each `--build NAME=DIR`: an fdec build through fdec's runtime (IOBinding loop) on the
  providers its fdec-runtime.json asks for; with `--cuda-graph`, also a row "fdec NAME
  cuda-graph" whose session captures decode steps as CUDA graphs (static shapes from the
  shared max-length buffer; the row says whether ONNX Runtime allowed it); plus, per build,
  the placement check: predicted
  (fdec.lower.cuda_kernels, the kernel table) and real (a profiled prefill and decode step:
  nodes per provider, Memcpy nodes), and greedy tokens on the GPU against the CPU provider for
  `--check-steps` steps;
- PyTorch `generate`, bf16: eager and `cache_implementation="static"` (torch.compile);
- each `--peer PRECISION` (fp16, int4): onnxruntime-genai's own build of HF_FOLDER
  (`python -m onnxruntime_genai.models.builder -i HF_FOLDER -o PEER_DIR/PRECISION -p PRECISION
  -e cuda`, made when missing), driven by onnxruntime_genai.
tok/s is batch × new tokens ÷ wall time of the whole call (prefill included, as the issue's
table measured); "decode" is fdec's own decode-only figure. Ratios are against PyTorch static
and genai fp16 at the same batch. After the table, issue 16's figures, each met or not (builds
named fp16, int4 and int8): fp16 >= 1.5x PyTorch static at batch 1 and >= 1.0x at batch 16,
>= genai fp16, int4 and int8 faster than fp16 at batch 1, no CPU or Memcpy nodes, 32 greedy
tokens equal to the
CPU run. One JSON document (--json) and the text on stdout.
`--device cpu` runs the same code on the CPU (tests; no speed meaning there).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

PROMPT = (
    "The railway reached the valley in the spring of that year, and within a decade the "
    "town had doubled in size. Farmers sent their grain to the city by train, and"
)
TORCH_MODES = ("eager", "static")
PEER_PRECISIONS = ("fp16", "int4", "fp32")


# ---------------------------------------------------------------------------------------------
# Arguments


def _named_folder(text: str) -> tuple[str, pathlib.Path]:
    name, equals, folder = text.partition("=")
    if not equals or not name or not folder:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=DIR")
    return name, pathlib.Path(folder)


def _batches(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 1,16") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: batch sizes are positive integers")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )  # fmt: skip
    parser.add_argument(
        "--hf", type=pathlib.Path, help="Hugging Face folder (tokenizer, torch, peer)"
    )
    parser.add_argument(
        "--build",
        type=_named_folder,
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="an fdec build to measure (repeatable)",
    )
    parser.add_argument(
        "--peer",
        action="append",
        default=[],
        choices=PEER_PRECISIONS,
        help="an onnxruntime-genai build of --hf to make and measure",
    )
    parser.add_argument("--peer-dir", type=pathlib.Path, default=pathlib.Path("/tmp/peer"))
    parser.add_argument(
        "--torch", default="eager,static", help="PyTorch modes, from eager,static; 'none' to skip"
    )
    parser.add_argument("--batches", type=_batches, default=[1, 16])
    parser.add_argument("--gen", type=int, default=64, help="new tokens per call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--check-steps",
        type=int,
        default=32,
        help="greedy steps compared between the GPU and the CPU provider",
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also measure each build with CUDA graphs (enable_cuda_graph)")  # fmt: skip
    parser.add_argument("--fpa-intb", action="store_true",
                        help="also measure builds with MatMulNBits through ONNX Runtime's CUTLASS "
                             "fpA_intB kernels (session config ep.cuda.fpa_intb_gemm=1)")  # fmt: skip
    parser.add_argument("--json", type=pathlib.Path, help="write the whole result here")
    parser.add_argument("--timeout", type=int, default=300,
                        help="seconds for each peer build subprocess")  # fmt: skip
    args = parser.parse_args(argv)
    modes = [] if args.torch == "none" else [m.strip() for m in args.torch.split(",")]
    unknown = [m for m in modes if m not in TORCH_MODES]
    if unknown:
        parser.error(f"--torch {args.torch!r}: unknown mode {unknown[0]!r} (eager, static, none)")
    args.torch_modes = modes
    if (modes or args.peer) and args.hf is None:
        parser.error("--hf HF_FOLDER is needed for PyTorch and --peer rows (or --torch none)")
    if args.gen < 2 or args.rounds < 1:
        parser.error("--gen must be at least 2 and --rounds at least 1")
    if not (args.build or modes or args.peer):
        parser.error("nothing to measure: give --build, --peer or --torch")
    return args


# ---------------------------------------------------------------------------------------------
# Measuring


def _timed(call: Callable[[], Any], rounds: int, sync: Callable[[], None]) -> list[float]:
    call()  # warm-up (and torch.compile's compilation)
    sync()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return times


def _row(system: str, batch: int, gen: int, times: list[float], **extra: Any) -> dict[str, Any]:
    wall = statistics.median(times)
    return {"system": system, "batch": batch, "tok_s": round(batch * gen / wall, 1),
            "wall_s": round(wall, 4), "wall_s_rounds": [round(t, 4) for t in times], **extra}  # fmt: skip


def device_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device,
        "host": platform.node(),
        "python": platform.python_version(),
    }
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        info["onnxruntime"] = None
    try:
        import torch

        info["torch"] = torch.__version__
        if device == "cuda" and torch.cuda.is_available():
            info["compute_capability"] = "{}.{}".format(*torch.cuda.get_device_capability())
    except ImportError:
        info["torch"] = None
    from fdec.runtime.ort import device_name

    info["name"] = device_name("CUDAExecutionProvider" if device == "cuda" else "")
    return info


def _providers(device: str) -> list[Any]:
    return (
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if device == "cuda"
        else ["CPUExecutionProvider"]
    )


#: ONNX Runtime 1.31's CUDA MatMulNBits runs CUTLASS mixed-input (fpA_intB) kernels, weights
#: re-laid at session load and tactics profiled, only when asked (matmul_nbits.h,
#: ParseFpAIntBEnabled; fp16, block 32, no zero points: fdec's int4 qualifies).
FPA_INTB = {"ep.cuda.fpa_intb_gemm": "1"}


def _open_build(
    folder: pathlib.Path,
    device: str,
    profile: str | None = None,
    cuda_graph: bool = False,
    config_entries: dict[str, str] | None = None,
) -> Any:
    """(OrtModel, kv_cache config) of the build on `device`'s providers: through fdec's
    open_session (its provider fallback included), or, to profile into `profile`, a plain
    session whose provider failures raise."""
    import onnxruntime as ort

    from fdec.runtime.session import OrtModel, open_session

    config = json.loads((folder / "fdec-runtime.json").read_text())
    path = folder / config.get("model", "model.onnx")
    level = (config.get("session_options") or {}).get("graph_optimization_level", "all")
    if profile:
        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        }.get(level, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        options.enable_profiling = True
        options.profile_file_prefix = profile
        session = ort.InferenceSession(
            str(path), options, providers=_providers(device), enable_fallback=0
        )
    else:
        session = open_session(
            path, providers=_providers(device), optimization=level, cuda_graph=cuda_graph,
            config_entries=config_entries,
        )  # fmt: skip
    kv = config.get("kv_cache") or {}
    return OrtModel(session, kv_buffer=kv.get("buffer")), kv


def profiled_placement(folder: pathlib.Path, device: str, prompt: list[int]) -> dict[str, Any]:
    """Where ONNX Runtime really ran each node: one prefill and one decode step through fdec's
    bound decoder, profiled; per provider the node count, microseconds and op types."""
    import numpy as np

    prefix = str(pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"placement-{folder.name}")
    model, kv = _open_build(folder, device, profile=prefix)
    decoder = model.bound_decoder(1, int(kv.get("max_length") or len(prompt) + 8))
    logits = decoder.step(np.asarray([prompt]))
    decoder.step(logits[:, -1:].argmax(-1))
    per: dict[str, dict[str, Any]] = {}
    profile = pathlib.Path(model.session.end_profiling())
    for event in json.loads(profile.read_text()):
        args = event.get("args") or {}
        if event.get("cat") != "Node" or "provider" not in args:
            continue
        if not event.get("name", "").endswith("_kernel_time"):
            continue
        entry = per.setdefault(args["provider"], {"nodes": 0, "us": 0, "ops": {}})
        entry["nodes"] += 1
        entry["us"] += event.get("dur", 0)
        op = args.get("op_name", "?")
        entry["ops"][op] = entry["ops"].get(op, 0) + 1
    profile.unlink(missing_ok=True)
    memcpy = sum(n for e in per.values() for op, n in e["ops"].items() if op.startswith("Memcpy"))
    cpu = per.get("CPUExecutionProvider", {}).get("nodes", 0)
    return {"session_providers": model.providers, "per_provider": per, "memcpy_nodes": memcpy,
            "cpu_nodes": cpu, "steps_profiled": 2}  # fmt: skip


def token_check(
    folder: pathlib.Path, device: str, prompt: list[int], steps: int, held: Any = None
) -> dict[str, Any]:
    """Greedy tokens of the build on `device` against the same build on the CPU provider, and
    with `held` ([1, n] token ids) the perplexity of that text on both: issue 16 takes either
    (tokens equal, or perplexity within 0.5 %; the GPU's int4 kernels sum in fp16, the CPU's in
    fp32, so a near tie may flip a token)."""
    from fdec.runtime import generate
    from fdec.verify import logits_through_cache, perplexity

    on_device, on_cpu = _open_build(folder, device)[0], _open_build(folder, "cpu")[0]
    got = generate(on_device, prompt, max_new_tokens=steps).tokens
    want = generate(on_cpu, prompt, max_new_tokens=steps).tokens
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    found: dict[str, Any] = {"steps": steps, "identical": got == want, "first_divergence": first}
    if held is not None:
        # And the form fdec verifies a GPU graph in on a CPU: its fp16/bf16 rounding emulated
        # (fdec.runtime.check_forms). How far each CPU run's logits are from the device's says
        # which one predicts the GPU.
        from fdec.runtime.check_forms import lighter_session_args
        from fdec.runtime.session import OrtModel, open_session

        path = folder / "model.onnx"
        emulated = OrtModel(open_session(path, prepack=False,
                                         **lighter_session_args(path, emulate=True)))  # fmt: skip
        logits = [logits_through_cache(m, held, held.shape[1])
                  for m in (on_device, on_cpu, emulated)]  # fmt: skip
        ppl = [perplexity(x, held) for x in logits]
        found["perplexity"] = {"tokens": int(held.shape[1]), "device": round(ppl[0], 4),
                               "cpu": round(ppl[1], 4), "change": round(ppl[0] / ppl[1] - 1, 5),
                               "cpu_emulated": round(ppl[2], 4)}  # fmt: skip
        found["max_logit_diff_from_device"] = {
            "cpu": float(abs(logits[1] - logits[0]).max()),
            "cpu_emulated": float(abs(logits[2] - logits[0]).max()),
        }
    return found


def measure_fdec(name: str, folder: pathlib.Path, args: argparse.Namespace, prompt: list[int],
                 sync: Callable[[], None], held: Any = None) -> list[dict[str, Any]]:  # fmt: skip
    from fdec.lower.cuda_kernels import as_ir_model
    from fdec.lower.cuda_placement import placement_summary
    from fdec.runtime.batch import generate_batch

    model, _ = _open_build(folder, args.device)
    graph = as_ir_model(folder / "model.onnx")  # read once: placement, and the op types
    checks: dict[str, Any] = {"predicted": placement_summary(graph)}
    try:  # the report's roofline estimate of batch-1 decode, to hold against the measured
        report = json.loads((folder / "report.json").read_text())
        checks["estimate_tok_s"] = (report.get("estimate") or {}).get("decode_tokens_per_s")
    except (OSError, ValueError):
        checks["estimate_tok_s"] = None
    for key, check in (("profiled", lambda: profiled_placement(folder, args.device, prompt)),
                       ("tokens_vs_cpu", lambda: token_check(folder, args.device, prompt,
                                                             args.check_steps, held))):  # fmt: skip
        try:
            checks[key] = check()
        except Exception as err:  # reported in the table, the other rows still run
            checks[key] = {"error": f"{type(err).__name__}: {err}"[:300]}
    rows = []
    variants = [(f"fdec {name}", model)]
    if args.cuda_graph:
        graphed, _ = _open_build(folder, args.device, cuda_graph=True)
        variants.append((f"fdec {name} cuda-graph", graphed))
    if args.fpa_intb and any(node.op_type == "MatMulNBits" for node in graph.graph):
        cutlass, _ = _open_build(folder, args.device, config_entries=FPA_INTB)
        variants.append((f"fdec {name} fpa-intb", cutlass))
    for system, session in variants:
        for batch in args.batches:
            prompts = [prompt] * batch
            decode: list[float] = []

            def call(prompts=prompts, decode=decode, session=session) -> None:
                result = generate_batch(session, prompts, max_new_tokens=args.gen)
                decode.append(result.decode_tokens_per_s)

            times = _timed(call, args.rounds, sync)
            rows.append(_row(system, batch, args.gen, times, providers=session.providers,
                             decode_tok_s=round(statistics.median(decode[1:]), 1),
                             cuda_graph=session.cuda_graph,
                             provider_fallback=session.provider_fallback,
                             build=str(folder)))  # fmt: skip
    rows[0]["checks"] = checks
    return rows


def measure_torch(
    args: argparse.Namespace, ids: list[int], sync: Callable[[], None]
) -> list[dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=dtype).to(args.device).eval()
    rows = []
    for mode in args.torch_modes:
        extra = {"cache_implementation": "static"} if mode == "static" else {}
        for batch in args.batches:
            x = torch.tensor([ids] * batch, device=args.device)
            kwargs = dict(do_sample=False, max_new_tokens=args.gen, min_new_tokens=args.gen,
                          attention_mask=torch.ones_like(x), pad_token_id=0, **extra)  # fmt: skip

            def call(x=x, kwargs=kwargs) -> None:
                with torch.no_grad():
                    model.generate(x, **kwargs)

            label = "pytorch static-cache (torch.compile)" if mode == "static" else "pytorch eager"
            rows.append(_row(f"{label} {str(dtype).split('.')[-1]}", batch, args.gen,
                             _timed(call, args.rounds, sync)))  # fmt: skip
    return rows


def build_peer(args: argparse.Namespace, precision: str) -> pathlib.Path:
    """onnxruntime-genai's own build of --hf at `precision` for the device (made if missing)."""
    out = args.peer_dir / f"{precision}-{args.device}"
    if not (out / "genai_config.json").is_file():
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(args.hf),
                   "-o", str(out), "-p", precision, "-e", args.device,
                   "-c", str(args.peer_dir / "cache")]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-400:]}")
    return out


def measure_genai(precision: str, folder: pathlib.Path, args: argparse.Namespace,
                  ids: list[int], sync: Callable[[], None]) -> list[dict[str, Any]]:  # fmt: skip
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    rows = []
    for batch in args.batches:
        length = len(ids) + args.gen

        def call(batch=batch, length=length) -> None:
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=length, min_length=length, do_sample=False,
                                      batch_size=batch)  # fmt: skip
            generator = og.Generator(model, params)
            generator.append_tokens(np.asarray([ids] * batch, dtype=np.int32))
            while not generator.is_done():
                generator.generate_next_token()

        rows.append(_row(f"onnxruntime-genai {precision}", batch, args.gen,
                         _timed(call, args.rounds, sync), build=str(folder)))  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------
# Report


def _placement_text(checks: dict[str, Any] | None) -> str:
    if not checks:
        return ""
    predicted = checks.get("predicted") or {}
    parts = [f"predicted {predicted.get('cpu_nodes', '?')} CPU nodes, "
             f"{predicted.get('memcpy_nodes', '?')} Memcpy"]  # fmt: skip
    real = checks.get("profiled") or {}
    if "error" in real:
        parts.append(f"profile failed: {real['error'][:60]}")
    elif real:
        parts.append(f"ran {real['cpu_nodes']} CPU nodes, {real['memcpy_nodes']} Memcpy")
    tokens = checks.get("tokens_vs_cpu") or {}
    if "error" in tokens:
        parts.append(f"token check failed: {tokens['error'][:60]}")
    elif tokens:
        same = "same" if tokens["identical"] else f"differ at {tokens['first_divergence']}"
        parts.append(f"{tokens['steps']} tokens vs CPU {same}")
        if tokens.get("perplexity"):
            parts.append(f"held ppl vs CPU {tokens['perplexity']['change']:+.2%}")
        diff = tokens.get("max_logit_diff_from_device")
        if diff:
            parts.append(f"max logit diff vs CPU {diff['cpu']:.3g}, vs emulated "
                         f"{diff['cpu_emulated']:.3g}")  # fmt: skip
    return "; ".join(parts)


def _best(rows: list[dict[str, Any]], prefix: str, batch: int) -> dict[str, Any] | None:
    """The fastest row of the fdec build `prefix` ("fdec fp16": plain, with CUDA graphs, or
    with the fpA_intB kernels)."""
    found = [r for r in rows if r["batch"] == batch
             and (r["system"] == prefix or r["system"].startswith(f"{prefix} "))]  # fmt: skip
    return max(found, key=lambda r: r["tok_s"]) if found else None


def verdicts(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 16's figures from one run: each with the measured value and met True/False (None
    when a row it needs is missing). Builds are found by name: "fdec fp16", "fdec int4"."""
    rows = result["rows"]

    def tok(system: str, batch: int) -> float | None:
        if system.startswith("fdec "):
            row = _best(rows, system, batch)
        else:
            row = next((r for r in rows if r["batch"] == batch
                        and r["system"].startswith(system)), None)  # fmt: skip
        return row["tok_s"] if row else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    out = []
    static = "pytorch static-cache"
    on_gpu = result["device"]["device"] == "cuda"  # a CPU run's speeds mean nothing here
    for what, value, need in (
        ("fdec fp16 / PyTorch static, batch 1", ratio(tok("fdec fp16", 1), tok(static, 1)), 1.5),
        ("fdec fp16 / PyTorch static, batch 16", ratio(tok("fdec fp16", 16), tok(static, 16)), 1.0),
        ("fdec fp16 / genai fp16, batch 1", ratio(tok("fdec fp16", 1),
                                                  tok("onnxruntime-genai fp16", 1)), 1.0),
        ("fdec int4 / fdec fp16, batch 1", ratio(tok("fdec int4", 1), tok("fdec fp16", 1)), 1.0),
        ("fdec int8 / fdec fp16, batch 1", ratio(tok("fdec int8", 1), tok("fdec fp16", 1)), 1.0),
    ):  # fmt: skip
        faster = "int4" in what or "int8" in what  # a quantized build must beat fp16
        met = None if value is None else (value > need if faster else value >= need)
        met = met if on_gpu else None
        out.append({"figure": what, "value": value, "needs": need, "met": met})
    for name in ("fp16", "int4"):  # the roofline within 2x of the measured (no CUDA graph)
        plain = next((r for r in rows if r["system"] == f"fdec {name}" and r["batch"] == 1), None)
        first_checks = (
            next(
                (
                    r.get("checks")
                    for r in rows
                    if r["system"] == f"fdec {name}" and r.get("checks")
                ),
                None,
            )
            or {}
        )
        value = ratio(first_checks.get("estimate_tok_s"), (plain or {}).get("decode_tok_s"))
        out.append(
            {
                "figure": f"fdec {name}: roofline estimate / measured decode, batch 1",
                "value": value,
                "needs": "0.5 to 2",
                "met": (0.5 <= value <= 2) if value is not None and on_gpu else None,
            }
        )
    for name in ("fp16", "int4"):
        first = next((r for r in rows if r["system"] == f"fdec {name}" and r.get("checks")), None)
        checks = (first or {}).get("checks") or {}
        real, tokens = checks.get("profiled") or {}, checks.get("tokens_vs_cpu") or {}
        # Shape work ONNX Runtime puts on the host by design (fdec.lower.cuda_placement's
        # host_shape_nodes: the int32 Cast of the mask's width GroupQueryAttention reads in
        # host memory) is allowed; any other CPU node, or any Memcpy, is not.
        host = set((checks.get("predicted") or {}).get("host_shape_nodes") or {})
        cpu_ops = (real.get("per_provider") or {}).get("CPUExecutionProvider", {}).get("ops", {})
        other = {op: n for op, n in cpu_ops.items() if op not in host}
        placed = None if not real or "error" in real else (
            not other and real["memcpy_nodes"] == 0)  # fmt: skip
        out.append({"figure": f"fdec {name}: no CPU nodes but predicted host shape nodes, "
                              "no Memcpy (profiled)",
                    "value": None if placed is None else
                    f"{real['cpu_nodes']} CPU ({', '.join(sorted(cpu_ops)) or 'none'}), "
                    f"{real['memcpy_nodes']} Memcpy",
                    "met": placed if on_gpu else None})  # fmt: skip
        same = tokens.get("identical") if tokens and "error" not in tokens else None
        ppl = tokens.get("perplexity") or {}
        close = ppl.get("change") is not None and abs(ppl["change"]) <= 0.005
        value = None if same is None else (
            "identical" if same else f"differ at step {tokens['first_divergence']}")  # fmt: skip
        if value is not None and ppl:
            value += f"; held perplexity {ppl['device']} vs {ppl['cpu']} ({ppl['change']:+.2%})"
        out.append({"figure": f"fdec {name}: {tokens.get('steps', '?')} greedy tokens = CPU run, "
                              "or held perplexity within 0.5 %",
                    "value": value,
                    "met": (same or close) if on_gpu and same is not None else None})  # fmt: skip
    return out


def render(result: dict[str, Any]) -> str:
    """The table: one line per system and batch, with ratios to PyTorch static and genai fp16."""
    device = result["device"]
    lines = [
        f"device: {device.get('name')} ({device['device']}"
        + (f", cc {device['compute_capability']}" if device.get("compute_capability") else "")
        + f"); onnxruntime {device.get('onnxruntime')}; torch {device.get('torch')}; "
        f"{result['gen']} new tokens, median of {result['rounds']}",
    ]
    rows = result["rows"]
    refs: dict[str, dict[int, float]] = {"torch static": {}, "genai fp16": {}}
    for row in rows:
        if row["system"].startswith("pytorch static-cache"):
            refs["torch static"][row["batch"]] = row["tok_s"]
        if row["system"] == "onnxruntime-genai fp16":
            refs["genai fp16"][row["batch"]] = row["tok_s"]
    header = ("system", "batch", "tok/s", "decode", "x torch static", "x genai fp16", "checks")
    table = [header]
    for row in rows:
        ratios = []
        for name in ("torch static", "genai fp16"):
            ref = refs[name].get(row["batch"])
            ratios.append(f"{row['tok_s'] / ref:.2f}x" if ref else "-")
        table.append((row["system"], str(row["batch"]), f"{row['tok_s']:,.1f}",
                      f"{row['decode_tok_s']:,.1f}" if row.get("decode_tok_s") else "-",
                      *ratios, _placement_text(row.get("checks"))))  # fmt: skip
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    for r in table:
        lines.append("  ".join([c.ljust(w) for c, w in zip(r, widths)] + [r[-1]]).rstrip())
    figures = result.get("verdicts") or []
    if figures:
        lines.append("issue 16 figures" + ("" if result["device"]["device"] == "cuda"
                                             else " (a CPU run: nothing is met or missed)") + ":")  # fmt: skip
        for v in figures:
            mark = {True: "met", False: "NOT met", None: "not measured"}[v["met"]]
            need = (
                f" (needs {'>' if 'int4' in v['figure'] else '>='} {v['needs']})"
                if "needs" in v
                else ""
            )
            lines.append(f"  {mark:>12}: {v['figure']} = {v['value']}{need}")
    for error in result.get("errors", []):
        lines.append(f"error: {error['part']}: {error['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sync = lambda: None  # noqa: E731
    if args.device == "cuda":
        try:
            import torch

            if torch.cuda.is_available():
                sync = torch.cuda.synchronize
        except ImportError:
            pass
    tokenizer_folder = args.hf or (args.build[0][1] if args.build else None)
    from transformers import AutoTokenizer

    from fdec.verify import held_token_ids

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    ids = tokenizer(PROMPT)["input_ids"]
    held = held_token_ids(tokenizer, len(tokenizer))  # the text fdec's verification holds out
    result: dict[str, Any] = {"device": device_info(args.device), "gen": args.gen,
                              "rounds": args.rounds, "batches": args.batches,
                              "prompt_tokens": len(ids), "rows": [], "errors": []}  # fmt: skip

    def part(label: str, run: Callable[[], list[dict[str, Any]]]) -> None:
        started = time.perf_counter()
        try:
            result["rows"] += run()
        except Exception as err:  # one failing part leaves the others measured
            traceback.print_exc(file=sys.stderr)
            result["errors"].append({"part": label, "error": f"{type(err).__name__}: {err}"[:400]})
        print(
            f"[gpu.py] {label}: {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True
        )

    if args.torch_modes:
        part("pytorch", lambda: measure_torch(args, ids, sync))
    for precision in args.peer:
        part(f"genai {precision}",
             lambda p=precision: measure_genai(p, build_peer(args, p), args, ids, sync))  # fmt: skip
    for name, folder in args.build:
        part(f"fdec {name}", lambda n=name, f=folder: measure_fdec(n, f, args, ids, sync, held))
    result["verdicts"] = verdicts(result)
    text = render(result)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
