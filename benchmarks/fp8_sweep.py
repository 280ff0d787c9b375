"""Sweep quantize-fp8's options on one model's tuning split, sharing the export, the calibration statistics and the GPTQ Hessians between variants.

    python benchmarks/fp8_sweep.py --variants '[{}, {"weight_only": ["down", "lm_head"]}]'
    python benchmarks/fp8_sweep.py --variants @variants.json --rows /tmp/fp8.jsonl

Each variant is a dict of quantize-fp8 options (`weight_only`, `activation_range`,
`gptq_damping`, ...) applied over the recipe `fdec compile --target T --quantize fp8` runs
(fdec.compile.plan_pipeline with the target's default backend). The passes before quantize-fp8
run once; activation statistics and XᵀX of every activation are collected once on that model
and handed to each variant's pass (what the pass would compute itself: same model, same
calibration batches). Each variant is scored on the split (`--split`, default `tune`: options
are chosen there, never on `eval`) against the fp32 graph, as benchmarks/quality.py scores.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import pathlib
import sys
import tempfile
import time
import warnings
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--target", default="h100")
    parser.add_argument("--split", default="tune")
    parser.add_argument("--variants", default="[{}]", help="JSON list of option dicts, or @FILE")
    parser.add_argument("--rows", type=pathlib.Path, default=None, help="append rows (JSON lines)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    text = args.variants
    variants = json.loads(pathlib.Path(text[1:]).read_text() if text.startswith("@") else text)

    import onnx_ir as ir
    import transformers
    from quality import _documents, _exported, _score, _weights_bytes

    from fdec.calibrate import calibration_batches, collect_activation_stats
    from fdec.compile import plan_pipeline
    from fdec.frontend.export import load_tokenizer
    from fdec.frontend.source import default_cache_dir, resolve_source
    from fdec.ir import FdecModel
    from fdec.passes.gptq import hessians
    from fdec.pipeline import PassManager
    from fdec.runtime import OrtModel, open_session
    from fdec.targets import load_target

    transformers.logging.set_verbosity_error()
    source = resolve_source(args.model)
    pristine, spec = _exported(source, default_cache_dir() / "quality-export")
    tokenizer = load_tokenizer(source.folder)
    documents = _documents(args.split, tokenizer, spec.vocab_size)
    target = load_target(args.target)
    plan = plan_pipeline(target=target, backend=target.default_backend, quantize="fp8")
    index = plan.pass_names.index("quantize-fp8")
    before, fp8, after = plan.pipeline[:index], plan.pipeline[index], plan.pipeline[index + 1 :]
    batches = tuple(calibration_batches(plan.calibration_texts or [], tokenizer, spec.vocab_size))
    began = time.perf_counter()
    model = FdecModel(ir.serde.deserialize_model(pristine), copy.deepcopy(spec))
    model, _ = PassManager(before, target=target).run(model)
    spec = copy.deepcopy(model.spec)
    del pristine
    work = pathlib.Path(tempfile.mkdtemp(prefix="fdec-fp8-sweep-"))
    (work / "fp32").mkdir()
    model.save(work / "fp32" / "model.onnx")
    from fdec.calibrate import matmul_activation_inputs

    names = sorted(set(matmul_activation_inputs(model).values()))
    stats = collect_activation_stats(model, batches, names)
    wide = {name for role, name in matmul_activation_inputs(model).items() if role.endswith("down")}
    xtx = hessians(model, batches, [n for n in names if n not in wide])
    del model
    print(f"prepared in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    for name in names:  # how far below its range an activation's bulk sits (fp8 subnormals)
        found = stats[name]
        print(
            f"range {name}: absmax {found.absmax:.4g}, p99.9 {found.percentile_99_9:.4g}",
            file=sys.stderr,
        )
    reference = _score(
        OrtModel(open_session(work / "fp32" / "model.onnx", optimization="basic")),
        documents, None,
    )  # fmt: skip
    reference["logits"] = [array.astype("float16") for array in reference["logits"]]  # RSS
    base = reference["figures"]["perplexity"]
    print(f"fp32 {args.split} perplexity {base:.4f}", file=sys.stderr)

    for options in variants:
        began = time.perf_counter()
        pass_ = dataclasses.replace(fp8, stats=stats, batches=batches, **options)
        pass_._prepare = _given_hessians(pass_, xtx)  # the shared XᵀX, not recomputed
        # the prepared fp32 graph, its weights read from the saved file as needed (no copy)
        model = FdecModel(ir.load(work / "fp32" / "model.onnx"), copy.deepcopy(spec))
        model, records = PassManager([pass_, *after], target=target).run(model)
        path = work / "variant" / "model.onnx"
        path.parent.mkdir(exist_ok=True)
        model.save(path)
        del model
        seconds = time.perf_counter() - began
        scored = _score(
            OrtModel(open_session(path, optimization=plan.optimization)),
            documents, reference["logits"],
        )  # fmt: skip
        fp8_stats = records[0].stats
        row = {
            "options": options,
            "split": args.split,
            "perplexity": scored["figures"]["perplexity"],
            "ppl_increase": scored["figures"]["perplexity"] / base - 1,
            "top1": scored["figures"]["top1"],
            "kl": scored["figures"]["kl"],
            "bytes": _weights_bytes(path.parent),
            "pass_s": round(seconds, 1),
            "w8a8_matmuls": fp8_stats["matmuls_quantized"]
            - len(fp8_stats["weight_only"])
            - len(fp8_stats["int8_weight_only"]),
            "w8a16_matmuls": len(fp8_stats["weight_only"]) + len(fp8_stats["int8_weight_only"]),
        }
        print(json.dumps(row), flush=True)
        if args.rows:
            with args.rows.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        for leftover in path.parent.iterdir():
            leftover.unlink()
    return 0


def _given_hessians(pass_: Any, xtx: dict[str, Any]) -> Any:
    def prepare(model: Any, groups: list[Any], stats: dict[str, Any]) -> None:
        pass_._hessians = {}
        if pass_.weight_rounding == "gptq":
            pass_._hessians = {g.activation.name: xtx[g.activation.name] for g in groups
                               if g.activation.name in xtx}  # fmt: skip

    return prepare


if __name__ == "__main__":
    sys.exit(main())
