"""Score one fdec build against another on fdec's corpus: perplexity of each, and top-1
agreement, KL and the largest logit difference of the second against the first.

    python benchmarks/compare_builds.py REFERENCE_BUILD BUILD                # tune split
    python benchmarks/compare_builds.py REFERENCE_BUILD BUILD --splits tune,eval,held
    python benchmarks/compare_builds.py BUILD BUILD/hf-checkpoint --splits eval [--bf16]
    python benchmarks/compare_builds.py REFERENCE_BUILD BUILD --typed      # its TensorRT model

For choices between two builds of one model that differ in one option (e.g. the fp16 CUDA
graph's lm_head: `--pass-options cast-float16.logits=fp32`): choose on `tune`, quote
`eval` (fdec.gates). Both builds run on the CPU provider at their own optimization level; a
GPU graph runs there as fdec's verification runs it (nodes without a CPU fp16 kernel in fp32
between casts; a bf16 graph with its rounding emulated), an NVFP4 graph in its FP4 form. The documents and the scoring are
benchmarks/quality.py's.

`--typed` scores the second build's strongly typed TensorRT model (engines/tensorrt/model.onnx,
what its engine is built from) with its fp16/bf16 rounding emulated, as `fdec compile` checks it.

The second folder may be a build's `--emit hf-checkpoint` folder: it is then run by
transformers (+ compressed-tensors), the way a serving stack reads it, with its NVFP4 weights
dequantized in fp32 (fdec.lower.hf_checkpoint.load), or with `--bf16` as transformers loads it
by default (a bf16 model, weights dequantized in bf16).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import quality  # benchmarks/quality.py: _documents, _score


def open_build(folder: pathlib.Path, typed: bool = False):
    from fdec.lower.tensorrt_model import TYPED_MODEL
    from fdec.runtime.check_forms import forms_needed, lighter_session_args
    from fdec.runtime.session import OrtModel, open_session

    config = json.loads((folder / "fdec-runtime.json").read_text())
    if typed:
        return quality._open(folder / TYPED_MODEL, "basic")[0]
    level = (config.get("session_options") or {}).get("graph_optimization_level", "all")
    path = folder / config.get("model", "model.onnx")
    low, fp4 = forms_needed(path)
    if low == "bf16":  # no bf16 CPU kernels: its rounding emulated
        return quality._open(path, level)[0]
    args = {"optimization": level}
    if fp4:  # NVFP4: ONNX Runtime runs its FP4 form only
        args.update(lighter_session_args(path))
    session = open_session(path, providers=["CPUExecutionProvider"], **args)
    return OrtModel(session, kv_buffer=(config.get("kv_cache") or {}).get("buffer"))


class _Transformers:
    """A checkpoint run by transformers, scored as quality._score scores a build."""

    def __init__(self, folder: pathlib.Path, bf16: bool) -> None:
        import torch
        import transformers

        from fdec.lower.hf_checkpoint.load import load_fp32

        self.torch = torch
        if bf16:
            auto = transformers.AutoModelForCausalLM
            self.model = auto.from_pretrained(folder, dtype=torch.bfloat16).eval()
        else:
            self.model = load_fp32(folder)[0]

    def empty_past(self, batch: int) -> None:
        return None

    def decode(self, ids, past, start):
        with self.torch.no_grad():
            logits = self.model(self.torch.from_numpy(ids)).logits
        return logits.float().numpy(), None


def open_folder(folder: pathlib.Path, bf16: bool = False, typed: bool = False):
    """A build (fdec-runtime.json; its TensorRT model with `typed`) or a written HF checkpoint
    (model.safetensors)."""
    if (folder / "fdec-runtime.json").is_file():
        return open_build(folder, typed)
    return _Transformers(folder, bf16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=pathlib.Path, help="the build scored against")
    parser.add_argument("build", type=pathlib.Path)
    parser.add_argument("--splits", default="tune", help="from tune, eval, held, held:N")
    parser.add_argument("--bf16", action="store_true", help="an HF checkpoint as a bf16 model")
    parser.add_argument(
        "--typed", action="store_true", help="score BUILD's TensorRT model, emulated"
    )
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.reference)
    reference, build = open_build(args.reference), open_folder(args.build, args.bf16, args.typed)
    vocab = int(reference.session.get_outputs()[0].shape[-1])
    for split in args.splits.split(","):
        documents = quality._documents(split, tokenizer, vocab)
        want = quality._score(reference, documents, None)
        got = quality._score(build, documents, want["logits"])["figures"]
        before = want["figures"]["perplexity"]
        print(
            f"{split}: {got['tokens']} tokens, perplexity {before:.4f} → {got['perplexity']:.4f}"
            f" ({got['perplexity'] / before - 1:+.3%}), top-1 {got['top1']:.4f}, "
            f"KL {got['kl']:.2e}, max logit difference {got['max_abs_error']:.4f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
