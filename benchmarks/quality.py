"""Quantization quality on one model, every recipe and ONNX Runtime's own quantizers in one run: perplexity increase over fp32 on the tuning and evaluation splits.

    python benchmarks/quality.py                       # SmolLM2-135M (bundled), both splits
    python benchmarks/quality.py --recipes none,int4,fp8 --target h100 --peers none
    python benchmarks/quality.py --recipes none,fp16,int4-awq --target h200 --backend onnxruntime
    python benchmarks/quality.py --recipes "none,int4-awq,int4-awq:quantize-int4-awq.rounding=gptq" --splits tune
    python benchmarks/quality.py --recipes none --peers none --encoder minilm   # MiniLM only
    python benchmarks/quality.py --recipes none,fp8 --peers none --encoder none --splits held:512

A recipe may carry pass options after a colon, `;`-separated, as `--pass-options` takes them
(`int4-awq:quantize-int4-awq.block_size=64;quantize-int4-awq.clip=false`).

The model is exported once (the export is kept under fdec's cache folder, `quality-export/`,
keyed by the source files and the exporting libraries, so a rerun skips the ~3 min export);
each recipe runs the same pipeline `fdec compile --quantize R` runs (fdec.compile.plan_pipeline)
on a fresh copy of the graph, is saved, opened in ONNX Runtime at the level its build uses, and
scored against the fp32 build (`none`, always the cpu target's, measured first) on fdec's
corpus (fdec.gates). A GPU graph (`--backend onnxruntime` on a GPU target: the CUDA EP's
fp16/bf16 model) is scored as its compile verifies it on a CPU, with the fp16/bf16 rounding
emulated (fdec.runtime.check_forms). A TensorRT recipe (fp8, int8-smoothquant on h100) gets a
second row, "→ TensorRT model": the strongly typed model its engine is built from (bf16/fp16
with the same Q/DQ, fdec.lower.tensorrt_model), scored the same emulated way. The splits:
the tuning split (`tune`, on which defaults are chosen) and the evaluation split (`eval`, which
no choice looks at; the README quotes it), or `held` / `held:N` (the first HELD_TOKENS or N
tokens of the held text verification scores: what a build's own report would show). Each document is scored on its own (no context
across documents); perplexity is over all scored tokens of a split.

Peers, measured in the same run on the same fp32 build (`--peers`): `ort-int8` is
onnxruntime.quantization.quantize_dynamic with its defaults (per-tensor int8 weights),
`ort-int4` MatMulNBitsQuantizer (RTN, block 32, symmetric, accuracy level 4), `genai-int4` and
`genai-int8` onnxruntime-genai's model builder (`-p int4` / `-p int8 -e cpu`, from the source
folder) when installed.
With `--encoder minilm` (the default) the run also scores all-MiniLM-L6-v2 (benchmarks/
quality_encoder.py): fdec's cpu encoder recipe (int8) and ONNX Runtime's quantize_dynamic
(defaults, and per-channel) by the cosine of sentence embeddings to the fp32 build.
The report prints each recipe's default gate (fdec.gates) and whether the measured evaluation
figure is inside it.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import pathlib
import re
import shutil
import sys
import tempfile
import time
import warnings
from typing import Any

import numpy as np

_PEERS = ("ort-int8", "ort-int4", "genai-int4", "genai-int8")
# Recipes only GPU targets build, and the target each is scored on unless --target says
_GPU_RECIPE_TARGETS = {"fp8": "h100", "int8-smoothquant": "h100", "fp4": "b200"}
# onnxruntime-genai's CUDA builds (`-e cuda`: fp16 activations, fused ops), asked for by name
_GPU_PEERS = ("genai-cuda-fp16", "genai-cuda-int4")
_DEFAULT_RECIPES = "none,int8-wo,int8-dynamic,int8-smoothquant,fp8,int4-rtn,int4-awq,int4-awq-mixed"
_MAX_DOC_TOKENS = 512  # longer documents are scored in pieces of this many tokens


def _weights_bytes(folder: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.onnx*"))


# --- the export, cached by the source files and the exporting libraries ----------------------


def _export_key(source: Any) -> str:
    import importlib.metadata

    digest = hashlib.sha256(source.family.name.encode())
    for path in sorted(source.folder.iterdir()):
        if path.is_file():
            digest.update(f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())
    for package in ("torch", "transformers", "onnxscript", "onnx-ir", "onnx"):
        digest.update(f"{package}={importlib.metadata.version(package)}".encode())
    # fdec's exporter and spec builder themselves (fdec/frontend, fdec/ir)
    import fdec.frontend
    import fdec.ir

    for package in (fdec.frontend, fdec.ir):
        for path in sorted(pathlib.Path(next(iter(package.__path__))).rglob("*.py")):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:20]


def _exported(source: Any, folder: pathlib.Path) -> tuple[Any, Any]:
    """(serialized fp32 export, ModelSpec) of `source`, from `folder` when it holds them."""
    import onnx_ir as ir

    from fdec.frontend.export import import_model
    from fdec.ir import FdecModel, ModelSpec

    entry = folder / _export_key(source)
    if (entry / "spec.json").exists():
        model = ir.load(entry / "model.onnx")
        ir.external_data.load_to_model(model)
        spec = ModelSpec.from_dict(json.loads((entry / "spec.json").read_text()))
        print(f"export taken from {entry}", file=sys.stderr)
        return ir.serde.serialize_model(model), spec
    started = time.perf_counter()
    imported = import_model(source)
    folder.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
    FdecModel(imported.fdec_model.model, imported.fdec_model.spec).save(staging / "model.onnx")
    (staging / "spec.json").write_text(json.dumps(imported.fdec_model.spec.to_dict()))
    try:
        staging.rename(entry)
    except OSError:  # a run beside this one kept the same export first: use it
        if not (entry / "spec.json").exists():
            raise
        shutil.rmtree(staging)
    print(f"exported in {time.perf_counter() - started:.0f} s (kept in {entry})", file=sys.stderr)
    return ir.serde.serialize_model(imported.fdec_model.model), imported.fdec_model.spec


# --- scoring ------------------------------------------------------------------------------------


def _documents(split: str, tokenizer: Any, vocab: int) -> list[tuple[str, np.ndarray]]:
    """A split's documents as (kind, [1, n] ids); `held` / `held:N`: the first HELD_TOKENS
    (or N) tokens of fdec/data/held.txt, the text every build is verified on, as one document."""
    from fdec.gates import corpus

    if split.split(":")[0] == "held":
        from fdec.verify import HELD_TOKENS, held_token_ids

        limit = int(split.partition(":")[2] or HELD_TOKENS)
        return [("held", held_token_ids(tokenizer, vocab, limit=limit))]
    pieces = []
    for kind, text in corpus(split):
        ids = [i for i in tokenizer(text, add_special_tokens=False)["input_ids"] if i < vocab]
        for start in range(0, len(ids), _MAX_DOC_TOKENS):
            chunk = ids[start : start + _MAX_DOC_TOKENS]
            if len(chunk) >= 2:
                pieces.append((kind, np.asarray([chunk], dtype=np.int64)))
    return pieces


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _logits(session: Any, ids: np.ndarray) -> np.ndarray:
    logits, _ = session.decode(ids, session.empty_past(1), 0)
    return np.asarray(logits[0], dtype=np.float32)


def _score(session: Any, documents: list, reference: list | None) -> dict[str, Any]:
    """Perplexity of `session` on the documents; with the fp32 build's logits (`reference`),
    also top-1 agreement, KL(fp32 ‖ build) and the largest logit error against them. Returns
    the figures and the logits (kept only for the reference)."""
    nll = {}  # kind -> [sum, count]
    agree = kl = count = 0.0
    worst = 0.0
    kept = []
    for index, (kind, ids) in enumerate(documents):
        logits = _logits(session, ids)
        logp = _log_softmax(logits[:-1])
        target = ids[0, 1:]
        total = nll.setdefault(kind, [0.0, 0])
        total[0] += float(-logp[np.arange(len(target)), target].sum())
        total[1] += len(target)
        if reference is None:
            kept.append(logits)
            continue
        want = reference[index]
        agree += float((logits.argmax(-1) == want.argmax(-1)).sum())
        count += len(logits)
        want_logp = _log_softmax(want)
        kl += float((np.exp(want_logp) * (want_logp - _log_softmax(logits))).sum())
        worst = max(worst, float(np.abs(logits - want).max()))
    tokens = sum(c for _, c in nll.values())
    figures: dict[str, Any] = {
        "tokens": tokens,
        "perplexity": float(np.exp(sum(s for s, _ in nll.values()) / tokens)),
        "by_kind": {kind: float(np.exp(s / c)) for kind, (s, c) in nll.items()},
    }
    if reference is not None:
        figures.update(top1=agree / count, kl=kl / count, max_abs_error=worst)
    return {"figures": figures, "logits": kept}


# --- peers: ONNX Runtime's own quantizers and onnxruntime-genai -------------------------------


def _peer(name: str, fp32: pathlib.Path, source_folder: pathlib.Path, work: pathlib.Path):
    """The peer's model file (built now in `work`), or None when it cannot be built here."""
    import onnx

    out = work / name / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    if name == "ort-int8":
        from onnxruntime.quantization import quantize_dynamic

        quantize_dynamic(fp32, out, use_external_data_format=True)
    elif name == "ort-int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(
            onnx.load(fp32), block_size=32, is_symmetric=True, accuracy_level=4
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=True)
    elif name in ("genai-int4", "genai-int8", *_GPU_PEERS):
        import subprocess

        try:
            import onnxruntime_genai  # noqa: F401
        except ImportError:
            print(f"onnxruntime-genai not installed: its peer {name} is skipped", file=sys.stderr)
            return None
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder"]
        precision, execution = name.split("-")[-1], "cuda" if "-cuda-" in name else "cpu"
        command += ["-i", str(source_folder), "-o", str(out.parent), "-p", precision]
        command += ["-e", execution]
        command += ["-c", str(work / "genai-cache")]
        subprocess.run(command, check=True, capture_output=True)
    return out


def _open(path: pathlib.Path, optimization: str = "all") -> tuple[Any, str | None]:
    """(OrtModel, "fp16"/"bf16" or None) for the model at `path`. A GPU graph (fp16/bf16) is
    scored as fdec's compile verifies one on a CPU: every node in fp32, each fp16/bf16 tensor
    rounded to its type (fdec.runtime.check_forms.emulate_low_precision)."""
    from fdec.runtime.check_forms import low_dtype
    from fdec.runtime.session import check_session

    return check_session(path, optimization=optimization), low_dtype(path)


def _typed_row(row: dict[str, Any], path: pathlib.Path, target: Any, spec: Any) -> tuple:
    """(row, session) of the strongly typed model a TensorRT recipe's engine is built from
    (fdec.lower.tensorrt_model: fp16/bf16 with its Q/DQ, as `fdec compile` writes it), scored
    with its low-precision rounding emulated: what the shipped engine computes, where the
    recipe's own row is its fp32 Q/DQ graph."""
    from fdec.lower.tensorrt_model import TYPED_MODEL, prepare_tensorrt_model

    began = time.perf_counter()
    record = prepare_tensorrt_model(path.parent, target=target, spec=spec)
    typed = path.parent / TYPED_MODEL
    session, low = _open(typed, "basic")
    seconds = round(row["pass_s"] + time.perf_counter() - began, 1)
    typed_row = {
        **row, "recipe": f"{row['recipe']} → TensorRT model ({record['dtype']})",
        "emulated": low, "bytes": _weights_bytes(typed.parent), "pass_s": seconds,
        "precisions": record["precisions"],
    }  # fmt: skip
    return typed_row, session


def _open_peer(path: pathlib.Path) -> tuple[Any, str | None]:
    session, low = _open(path)
    config = path.parent / "genai_config.json"
    if session.head_dim is None and config.exists():  # genai's cache axis is symbolic
        decoder = json.loads(config.read_text())["model"]["decoder"]
        session.head_dim = int(decoder["head_size"])
    return session, low


# --- the run --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--recipes", default=_DEFAULT_RECIPES)
    parser.add_argument("--peers", default=",".join(_PEERS), help="or none")
    parser.add_argument("--splits", default="tune,eval")
    parser.add_argument(
        "--target",
        default=None,
        help="default: cpu for cpu-only recipes, h100 for fp8/static, b200 for fp4",
    )
    parser.add_argument(
        "--backend",
        default=None,
        help="every recipe but none: onnxruntime (on a GPU target the CUDA EP's fp16 graph) or "
        "tensorrt; default the target's own for fp8/static, onnxruntime otherwise",
    )
    parser.add_argument("--export-cache", type=pathlib.Path, default=None)
    parser.add_argument(
        "--encoder", default="minilm", help="minilm: also all-MiniLM-L6-v2 int8 (cosine); none"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--rows", type=pathlib.Path, default=None, help="append each row as a JSON line here"
    )
    args = parser.parse_args(argv)
    peers = [p for p in args.peers.split(",") if p and p != "none"]
    for peer in peers:  # before the export and minutes of recipes
        if peer not in (*_PEERS, *_GPU_PEERS):
            known = ", ".join((*_PEERS, *_GPU_PEERS))
            raise SystemExit(f"unknown peer {peer!r}; use {known} or none")
    warnings.filterwarnings("ignore")

    import onnx_ir as ir
    import transformers

    from fdec.backends import get_backend
    from fdec.backends.tensorrt_rtx import StronglyTypedBackend
    from fdec.cli import parse_pass_options
    from fdec.compile import choose_backend, plan_pipeline
    from fdec.frontend.export import load_tokenizer
    from fdec.frontend.source import default_cache_dir, resolve_source
    from fdec.ir import FdecModel
    from fdec.targets import load_target

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    source = resolve_source(args.model)
    pristine, spec = _exported(source, args.export_cache or default_cache_dir() / "quality-export")
    tokenizer = load_tokenizer(source.folder)
    splits = [s for s in args.splits.split(",") if s]
    documents = {s: _documents(s, tokenizer, spec.vocab_size) for s in splits}
    recipes = [r for r in re.split(r",(?![^\[]*\])", args.recipes) if r]  # not inside [..]
    recipes = ["none", *(r for r in recipes if r != "none")]

    rows: list[dict[str, Any]] = []
    reference: dict[str, list] = {}
    work = pathlib.Path(tempfile.mkdtemp(prefix="fdec-quality-"))
    fp32_path = work / "none" / "model.onnx"

    def measure(row: dict[str, Any], session: Any) -> None:
        for split in splits:
            scored = _score(session, documents[split], reference.get(split))
            if split not in reference:  # fp16: two splits' fp32 logits are ~1 GB of RSS
                reference[split] = [logits.astype(np.float16) for logits in scored["logits"]]
            row[split] = scored["figures"]
        rows.append(row)
        print(f"{row['recipe']}: scored", file=sys.stderr)
        if args.rows:  # a long run keeps what it measured even if stopped later
            with args.rows.open("a") as handle:
                handle.write(json.dumps(row) + "\n")

    for recipe in recipes:
        name, _, options = recipe.partition(":")
        # NAME@layerwise: the calibrating passes calibrate layer by layer on the PyTorch model
        # read from the checkpoint (fdec.calibrate_layerwise, what a streamed compile does).
        name, _, how = name.partition("@")
        quantize = None if name == "none" else name
        gpu = next((t for p, t in _GPU_RECIPE_TARGETS.items() if name.startswith(p)), None)
        needs_gpu = gpu is not None
        # none is the fp32 build every row is scored against, whatever --target says (on a GPU
        # target --backend onnxruntime is the CUDA EP's fp16 graph, tensorrt's is Q/DQ).
        target = load_target("cpu" if name == "none" else args.target or gpu or "cpu")
        asked = args.backend if name != "none" else "onnxruntime"
        # GPU recipes: the target's own backend (h100: tensorrt), the graph `fdec compile
        # --target h100` builds (--backend onnxruntime on a GPU is the CUDA EP's fp16 model)
        backend = choose_backend(asked or (None if needs_gpu else "onnxruntime"), target)
        plan = plan_pipeline(
            target=target,
            backend=backend,
            quantize=quantize,
            pass_options=parse_pass_options(tuple(filter(None, options.split(";")))),
        )
        if plan.calibrating:
            plan.attach_calibration(tokenizer, spec)
        model = FdecModel(ir.serde.deserialize_model(pristine), copy.deepcopy(spec))
        began = time.perf_counter()
        model, records = _run_passes(plan, model, target, source, how)
        seconds = time.perf_counter() - began
        path = work / ("none" if name == "none" else f"r{len(rows)}") / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(path)
        print(f"{recipe}: passes done in {seconds:.0f} s", file=sys.stderr)
        session, low = _open(path, plan.optimization)
        row = {
            "recipe": recipe, "kind": "fdec", "target": target.name,
            "backend": backend, "emulated": low,
            "bytes": _weights_bytes(path.parent), "pass_s": round(seconds, 1),
            "passes": [r.name for r in records],
            "kept": next((r.stats.get("kept") for r in records if r.name == "quantize-mixed"), None),
            "gate": _gate(name, plan),
        }  # fmt: skip
        measure(row, session)
        del session
        if isinstance(get_backend(backend), StronglyTypedBackend):
            measure(*_typed_row(row, path, target, model.spec))
        if name != "none":
            shutil.rmtree(path.parent)
    for peer in peers:
        began = time.perf_counter()
        path = _peer(peer, fp32_path, source.folder, work)
        if path is None:
            continue
        session, low = _open_peer(path)
        gpu = peer in _GPU_PEERS
        row = {
            "recipe": peer, "kind": "peer", "target": "gpu" if gpu else "cpu",
            "backend": "onnxruntime-cuda" if gpu else "onnxruntime", "emulated": low,
            "bytes": _weights_bytes(path.parent), "pass_s": round(time.perf_counter() - began, 1),
            "passes": [], "kept": None, "gate": None,
        }  # fmt: skip
        measure(row, session)

    encoder: list[dict[str, Any]] = []
    if args.encoder == "minilm":
        from quality_encoder import encoder_rows

        encoder = encoder_rows(splits, default_cache_dir(), work)
    elif args.encoder != "none":
        raise SystemExit(f"unknown --encoder {args.encoder!r}; use minilm or none")

    base = rows[0]
    for row in rows:
        row["size_vs_fp32"] = row["bytes"] / base["bytes"]
        for split in splits:
            row[split]["ppl_increase"] = row[split]["perplexity"] / base[split]["perplexity"] - 1
            row[split]["by_kind_increase"] = {
                kind: ppl / base[split]["by_kind"][kind] - 1
                for kind, ppl in row[split]["by_kind"].items()
            }
    if args.json:
        document = {"model": args.model, "splits": splits, "rows": rows, "encoder": encoder}
        print(json.dumps(document, indent=2))
        return 0
    _print_table(args.model, splits, rows)
    from quality_encoder import print_encoder_table

    print_encoder_table(splits, encoder)
    return 0


def _run_passes(plan: Any, model: Any, target: Any, source: Any, how: str) -> tuple[Any, list]:
    """The recipe's passes; with `how` "layerwise", calibrated layer by layer from the
    checkpoint instead of by ONNX Runtime on the whole model."""
    from fdec.calibrate import calibration_source
    from fdec.calibrate_layerwise import LayerwiseCalibration, layerwise_kinds
    from fdec.compile.optimize import LayerwiseInstrument
    from fdec.pipeline import PassManager

    if how not in ("", "layerwise"):
        raise SystemExit(f"unknown recipe suffix @{how}; use @layerwise")
    calibrating = [p for p in plan.pipeline if getattr(p, "batches", None)]
    if how != "layerwise" or not calibrating:
        return PassManager(plan.pipeline, target=target).run(model)
    layerwise = LayerwiseCalibration(
        source, calibrating[0].batches, collect=layerwise_kinds(calibrating)
    )
    manager = PassManager(plan.pipeline, [LayerwiseInstrument(layerwise)], target=target)
    with calibration_source(layerwise):
        try:
            return manager.run(model)
        finally:
            layerwise.close()


def _gate(name: str, plan: Any) -> dict[str, Any] | None:
    """The default gate fdec applies to this recipe's builds (fdec.gates), as the report shows it."""
    tolerance = plan.tolerance
    if name == "none":
        return None
    return {
        "max_ppl_increase": tolerance.max_perplexity_increase,
        "min_top1": tolerance.min_top1_agreement,
        "max_abs_error": tolerance.max_abs_error,
        "source": getattr(tolerance, "source", None),
    }


def _print_table(model: str, splits: list[str], rows: list[dict[str, Any]]) -> None:
    tokens = ", ".join(f"{s} {rows[0][s]['tokens']} tokens" for s in splits)
    print(f"{model}: perplexity increase over the fp32 build (none); corpus {tokens}")
    columns = "".join(f" {s + ' ppl':>9} {s + ' Δppl':>10} {s + ' top-1':>10}" for s in splits)
    print(
        f"{'recipe':<34} {'target':<6} {'backend':<16} {'MB':>7} {'size/fp32':>9}{columns} "
        f"{'gate':>8}"
    )
    for row in rows:
        cells = "".join(
            f" {row[s]['perplexity']:>9.2f} {row[s]['ppl_increase']:>+10.1%} "
            f"{row[s].get('top1', 1.0):>10.3f}"
            for s in splits
        )
        gate = row["gate"]["max_ppl_increase"] if row["gate"] else None
        print(
            f"{row['recipe']:<34} {row['target']:<6} {row.get('backend', 'onnxruntime'):<16} "
            f"{row['bytes'] / 1e6:>7.1f} "
            f"{row['size_vs_fp32']:>8.2f}x{cells} "
            f"{'' if gate is None else f'{gate:+.1%}':>8}"
        )
    for row in rows:
        if row["kept"]:
            print(f"{row['recipe']}: kept in higher precision: {', '.join(row['kept'])}")
    for row in rows:
        if row["gate"] and row["gate"]["source"]:
            print(f"{row['recipe']}: {row['gate']['source']}")


if __name__ == "__main__":
    sys.exit(main())
