"""Which weight formats TensorRT-RTX fuses into a GEMM, per optimization profile.

    python benchmarks/rtx_fusion_probe.py                 # decode batch up to 1 and up to 2
    python benchmarks/rtx_fusion_probe.py --max-batch 1 int8 fp8

Builds a one-GEMM engine (x [b, s, 1024] bf16 @ a [1024, 2048] weight) for sm 8.9 with fdec's
two decoder profiles — prefill (s up to 256) and decode (s = 1) — for each weight format, and
prints each profile's kernels from the engine's own layer listing: a fused weight shows as one
`runtime_fusion` holding the quantized weight; an unfused one as a kernel with no inputs that
writes the dequantized weight, then a dense GEMM. No GPU needed (tensorrt-rtx builds here).
Found with it (TensorRT-RTX 1.7.1): with the decode profile's batch static at 1, int8 and FP8
per-channel weight-only GEMMs are not fused in decode; with batch up to 2 they are; int4 in
128-blocks is fused either way; int8 in 128-blocks never (fdec.lower.tensorrt_rtx
`_engine_profiles`, docs/design-notes.md session 30).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import tempfile

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

K, N, BLOCK = 1024, 2048, 128
FORMATS = ("bf16", "int8", "fp8", "int4-block", "int8-block")


def _bf16(name: str, array: np.ndarray) -> onnx.TensorProto:
    raw = np.asarray(array, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16).tobytes()
    return helper.make_tensor(name, TensorProto.BFLOAT16, array.shape, vals=raw, raw=True)


def one_gemm(kind: str, path: pathlib.Path) -> None:
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["b", "s", K])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["b", "s", N])
    channel_scale = _bf16("s", np.abs(rng.standard_normal(N)) / 100)
    block_scale = _bf16("s", np.abs(rng.standard_normal((K // BLOCK, N))) / 100)
    ints = rng.integers(-127, 128, (K, N)).astype(np.int8)
    if kind == "bf16":
        inits, weight = [_bf16("w", rng.standard_normal((K, N)) / 30)], "w"
    elif kind in ("int8", "int8-block"):
        block = kind == "int8-block"
        inits, weight = (
            [numpy_helper.from_array(ints, "w"), block_scale if block else channel_scale],
            "wd",
        )
    elif kind == "fp8":
        codes = (rng.standard_normal((K, N)) * 50).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
        fp8 = helper.make_tensor(
            "w", TensorProto.FLOAT8E4M3FN, (K, N), vals=codes.tobytes(), raw=True
        )
        inits, weight = [fp8, channel_scale], "wd"
    else:  # int4-block
        int4 = helper.make_tensor(
            "w", TensorProto.INT4, (K, N), vals=(ints // 16).flatten().tolist()
        )
        inits, weight = [int4, block_scale], "wd"
    nodes = []
    if weight == "wd":
        blocked = {"block_size": BLOCK, "axis": 0} if kind.endswith("block") else {"axis": 1}
        nodes.append(helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], **blocked))
    nodes.append(helper.make_node("MatMul", ["x", weight], ["y"]))
    model = helper.make_model(
        helper.make_graph(nodes, kind, [x], [y], initializer=inits),
        opset_imports=[helper.make_opsetid("", 21)],
    )
    model.ir_version = 10
    onnx.save(model, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("formats", nargs="*", choices=[*FORMATS, []], help="default: all")
    parser.add_argument("--max-batch", type=int, action="append", help="default: 1 and 2")
    args = parser.parse_args(argv)
    import fdec.lower.tensorrt_rtx as rtx
    from fdec.lower.profiles import Profile

    listings: list[str] = []
    measure = rtx.engine_precision
    rtx.engine_precision = lambda listing: listings.append(listing) or measure(listing)
    rtx._engine_profiles = lambda profiles: profiles  # the profiles as given here
    for batch in args.max_batch or [1, 2]:
        profiles = [
            Profile("context", {"x": ((1, 1, K), (1, 128, K), (batch, 256, K))}),
            Profile("generation", {"x": ((1, 1, K), (1, 1, K), (batch, 1, K))}),
        ]
        for kind in args.formats or FORMATS:
            with tempfile.TemporaryDirectory() as scratch:
                path = pathlib.Path(scratch) / "model.onnx"
                one_gemm(kind, path)
                result = rtx.build_engine(
                    path, pathlib.Path(scratch) / "engine", spec=None, limits=None,
                    compute_capability=(8, 9), profiles=profiles,
                )  # fmt: skip
            if result.status != "built":
                print(f"decode batch ≤ {batch}, {kind}: {result.status} {result.reason}")
                continue
            print(f"decode batch ≤ {batch}, {kind}: {result.bytes / 1e6:.2f} MB engine")
            layers = re.findall(
                r"Name: (.*?), LayerType: \w+, Inputs: \[(.*?)\], Constants: (.*?), Outputs",
                listings[-1],
            )
            details = {name: (inputs, constants) for name, inputs, constants in layers}
            for name, layer, profile in rtx.listed_layers(listings[-1], len(profiles)) or []:
                if layer in rtx.NOT_KERNELS:
                    continue
                inputs, constants = details.get(name, ("", ""))
                types = re.findall(r"Datatype: (\w+)", constants)
                what = "no inputs: writes the dequantized weight" if not inputs.strip() else ""
                stage = (
                    profiles[profile]
                    .name.replace("context", "prefill")
                    .replace("generation", "decode")
                )
                print(f"  {stage:8s} {layer:15s} constants {'/'.join(types) or '-':28s} {what}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
