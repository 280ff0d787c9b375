"""How far a build's serving checkpoint is from the build, against how far the checkpoint is
from itself when its embedding table moves by one ulp.

    python benchmarks/checkpoint_last_bit.py BUILD [--tokens 256]

Builds whose activations are quantized (fp8 W8A8, NVFP4 W4A4) are chaotic at the last bit: a
one-ulp difference early in the network flips some activation roundings, and the flips grow
through the layers. Two correct runtimes of the same checkpoint (ONNX Runtime on the build,
transformers + compressed-tensors on BUILD/hf-checkpoint) differ by their float rounding alone;
this prints that difference next to the one a (1 + 2⁻²³) scaling of the checkpoint's own
embedding makes, on the first held tokens of fdec's corpus (fdec/data/held.txt).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from compare_builds import open_build


def _compare(a: np.ndarray, b: np.ndarray) -> str:
    top1 = float((a.argmax(-1) == b.argmax(-1)).mean())
    apart = np.abs(a - b).max(-1)[0] > 1e-3
    first = int(np.argmax(apart)) if apart.any() else None
    return f"top-1 {top1:.3f}, max logit difference {np.abs(a - b).max():.3f}, first position apart {first}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", type=pathlib.Path)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from fdec.lower.hf_checkpoint.load import load_fp32

    text = (pathlib.Path(__file__).resolve().parents[1] / "fdec/data/held.txt").read_text()
    tokenizer = AutoTokenizer.from_pretrained(args.build)
    ids = np.array([tokenizer(text).input_ids[: args.tokens]], dtype=np.int64)
    build = open_build(args.build)
    built, _ = build.decode(ids, build.empty_past(1), 0)
    model = load_fp32(args.build / "hf-checkpoint")[0]
    with torch.no_grad():
        checkpoint = model(torch.from_numpy(ids)).logits.numpy()
        model.get_input_embeddings().weight.mul_(1 + 2**-23)
        nudged = model(torch.from_numpy(ids)).logits.numpy()
    print(f"{ids.shape[1]} tokens")
    print(f"checkpoint against the build:            {_compare(checkpoint, built)}")
    print(f"checkpoint against its embedding × (1 + 2⁻²³): {_compare(checkpoint, nudged)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
