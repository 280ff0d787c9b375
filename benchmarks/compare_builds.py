"""Score one fdec build against another on fdec's corpus: perplexity of each, and top-1
agreement, KL and the largest logit difference of the second against the first.

    python benchmarks/compare_builds.py REFERENCE_BUILD BUILD                # tune split
    python benchmarks/compare_builds.py REFERENCE_BUILD BUILD --splits tune,eval,held

For choices between two builds of one model that differ in one option (e.g. the fp16 CUDA
graph's lm_head: `--pass-options cast-float16.keep_logits=false`): choose on `tune`, quote
`eval` (fdec.gates). Both builds run on the CPU provider at their own optimization level; a
GPU graph runs there as fdec's verification runs it (nodes without a CPU fp16 kernel in fp32
between casts). The documents and the scoring are benchmarks/quality.py's.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import quality  # benchmarks/quality.py: _documents, _score


def open_build(folder: pathlib.Path):
    from fdec.runtime.session import OrtModel, open_session

    config = json.loads((folder / "fdec-runtime.json").read_text())
    level = (config.get("session_options") or {}).get("graph_optimization_level", "all")
    session = open_session(
        folder / config.get("model", "model.onnx"),
        providers=["CPUExecutionProvider"],
        optimization=level,
    )
    return OrtModel(session, kv_buffer=(config.get("kv_cache") or {}).get("buffer"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=pathlib.Path, help="the build scored against")
    parser.add_argument("build", type=pathlib.Path)
    parser.add_argument("--splits", default="tune", help="from tune, eval, held, held:N")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.reference)
    reference, build = open_build(args.reference), open_build(args.build)
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
