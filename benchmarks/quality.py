"""Quantization quality on one model, every recipe in one run: size and perplexity vs the fp32 build.

    python benchmarks/quality.py                       # SmolLM2-135M (bundled)
    python benchmarks/quality.py --recipes none,int4,fp8 --target h100
    python benchmarks/quality.py --recipes "none,int4-awq,int4-awq:quantize-int4-awq.rounding=gptq"

A recipe may carry pass options after a colon, `;`-separated, as `--pass-options` takes them
(`int4-awq:quantize-int4-awq.block_size=64;quantize-int4-awq.clip=false`).

The model is imported once; each recipe runs the same pipeline `fdec compile --quantize R`
runs (fdec.compile.plan_pipeline) on a fresh copy of the graph, is saved, opened in ONNX Runtime
at the level its build uses, and scored on the held text (fdec/data/held.txt, distinct from the
calibration corpus) against the fp32 build measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time
import warnings


def _weights_bytes(folder: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("model.onnx*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--recipes",
        default="none,int8-dynamic,int8-smoothquant,fp8,int4-rtn,int4-awq,int4-awq-mixed",
    )
    parser.add_argument(
        "--target", default=None, help="default: cpu for cpu-only recipes, h100 for fp8/static"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    import copy

    import onnx_ir as ir
    import transformers

    from fdec.cli import _parse_pass_options
    from fdec.compile import choose_backend, plan_pipeline
    from fdec.frontend.export import import_model
    from fdec.frontend.source import resolve_source
    from fdec.ir import FdecModel
    from fdec.pipeline import PassManager
    from fdec.runtime import OrtModel, open_session
    from fdec.targets import load_target
    from fdec.verify import Reference

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    started = time.perf_counter()
    imported = import_model(resolve_source(args.model))
    spec = imported.fdec_model.spec
    reference = Reference.from_hf(imported.hf_model, spec.kind, imported.tokenizer, spec.vocab_size)
    pristine = ir.serde.serialize_model(imported.fdec_model.model)
    print(f"imported {args.model} in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    rows = []
    for recipe in args.recipes.split(","):
        name, _, options = recipe.partition(":")
        quantize = None if name == "none" else name
        needs_gpu = name.startswith(("fp8", "int8-smoothquant"))
        target = load_target(args.target or ("h100" if needs_gpu else "cpu"))
        plan = plan_pipeline(
            target=target,
            backend=choose_backend("onnxruntime", target),
            quantize=quantize,
            pass_options=_parse_pass_options(tuple(filter(None, options.split(";")))),
        )
        if plan.calibrating:
            plan.attach_calibration(imported.tokenizer, spec.vocab_size)
        model = FdecModel(ir.serde.deserialize_model(pristine), copy.deepcopy(spec))
        began = time.perf_counter()
        model, records = PassManager(plan.pipeline, target=target).run(model)
        seconds = time.perf_counter() - began
        with tempfile.TemporaryDirectory(prefix="fdec-quality-") as folder:
            path = pathlib.Path(folder) / "model.onnx"
            model.save(path)
            size = _weights_bytes(pathlib.Path(folder))
            figures = reference.compare(
                OrtModel(open_session(path, optimization=plan.optimization))
            )
        rows.append({
            "recipe": recipe, "target": target.name, "bytes": size, "pass_s": round(seconds, 1),
            "perplexity": figures["perplexity_build"], "top1": figures["top1_agreement"],
            "kl": figures["kl_divergence"], "max_abs_error": figures["max_abs_error"],
            "passes": [r.name for r in records],
            "kept": next((r.stats.get("kept") for r in records if r.name == "quantize-mixed"), None),
        })  # fmt: skip
        print(f"{recipe}: done in {seconds:.0f} s", file=sys.stderr)

    base = next((r for r in rows if r["recipe"] == "none"), rows[0])
    for row in rows:
        row["size_vs_fp32"] = row["bytes"] / base["bytes"]
        row["ppl_increase"] = row["perplexity"] / base["perplexity"] - 1.0
    if args.json:
        print(json.dumps({"model": args.model, "rows": rows}, indent=2))
        return 0
    print(f"{args.model}: perplexity on {reference.ids.shape[1]} held tokens; fp32 build = none")
    header = f"{'recipe':<28} {'target':<6} {'MB':>7} {'size/fp32':>9} {'ppl':>8} {'Δppl':>8} {'top-1':>6} {'KL':>7}"
    print(header)
    for r in rows:
        print(
            f"{r['recipe']:<28} {r['target']:<6} {r['bytes'] / 1e6:>7.1f} {r['size_vs_fp32']:>8.2f}x "
            f"{r['perplexity']:>8.2f} {r['ppl_increase']:>+7.1%} {r['top1']:>6.3f} {r['kl']:>7.4f}"
        )
    for r in rows:
        if r["kept"]:
            print(
                f"{r['recipe']}: most sensitive, kept in higher precision: {', '.join(r['kept'])}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
