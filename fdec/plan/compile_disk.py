"""The disk `fdec compile` writes on the way to a build, and the up-front refusal when the
disks it writes to cannot hold it.

A large compile fails late when its disk fills: the 8B Llama's h100 default ran 65 minutes
before the typed check's scratch copy found the disk full (session 12). The files, each about
the build's weight bytes W (fdec.plan's formulas, as the memory check uses):

- the build, written into a temporary folder beside `-o` (fdec.build.AtomicBuild);
- streamed compiles: the spill beside it, holding the weights passes make until the build is
  written (fdec.ir.spill), removed once it is; W plus, where untie-embeddings runs on tied
  embeddings, the fp32 lm_head it makes before it is quantized;
- strongly typed backends (TensorRT, TensorRT-RTX) on a GPU target: the typed model inside
  the build (half of W for a float build: typed to bf16/fp16), and its copy with bf16/fp16
  emulated in fp32 for the check, in the temporary directory (fdec.lower.tensorrt_model).

The peak on each file system is the larger of the two phases (writing: build + spill; typing:
build + typed model, plus the emulated copy where the temporary directory shares the disk),
plus 10 %. A previous build at `-o` stays until the new one replaces it; it already counts as
used space.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import tempfile
from typing import Any

from fdec.build import nearest_existing
from fdec.errors import CapacityError

__all__ = ["CompileDisk", "check_compile_disk", "predict_compile_disk"]

_GB = 1e9
_MARGIN = 1.10


@dataclasses.dataclass(frozen=True)
class CompileDisk:
    """The bytes a compile writes at its peak on each file system, keyed by a folder on it;
    `build_folder`: the one the build goes to (beside `-o`)."""

    peak_bytes: dict[str, int]
    parts: dict[str, int]
    build_folder: str = ""


def predict_compile_disk(
    source: Any, *, quantize: str, target: Any, out: pathlib.Path, streamed: bool, typed: bool,
    untie: bool = False, scratch: pathlib.Path | None = None,
) -> CompileDisk:  # fmt: skip
    """The compile's peak disk use per file system: the build under `out`'s parent, the scratch
    copies under `scratch` (the temporary directory); `typed`: the backend writes a strongly
    typed model (and checks an emulated copy of it); `untie`: the pipeline unties embeddings."""
    from fdec.plan.capacity import precision_of
    from fdec.plan.compile_memory import build_weight_bytes
    from fdec.plan.shape import shape_from_config

    if source.pickle_weights or not source.weight_files:
        return CompileDisk({}, {})
    build = build_weight_bytes(source, quantize, target)
    float_build = precision_of(quantize, "--quantize") == "fp32"
    # A tied table's lm_head is untied into the spill in fp32 before it is quantized, and its
    # bytes stay there until the build is written (the 8B fp8 build: 8.0 GB, spill 10.1 GB).
    shape = shape_from_config(source.config, source.given)
    tied = untie and shape.tie_word_embeddings
    untied = 4 * shape.vocab_size * shape.hidden_size if tied else 0
    parts = {
        "build_bytes": build,
        "spill_bytes": build + untied if streamed else 0,
        # A float (fp32) build is typed to bf16/fp16: half its bytes; the check's copy is fp32.
        "typed_model_bytes": (build // 2 if float_build else build) if typed else 0,
        "emulated_copy_bytes": build if typed else 0,
    }
    beside = nearest_existing(pathlib.Path(out).absolute().parent)
    scratch = nearest_existing(pathlib.Path(scratch or tempfile.gettempdir()).absolute())
    writing = {beside: build + parts["spill_bytes"]}
    typing = {beside: build + parts["typed_model_bytes"]}
    if os.stat(scratch).st_dev == os.stat(beside).st_dev:
        typing[beside] += parts["emulated_copy_bytes"]
    elif typed:
        typing[scratch] = parts["emulated_copy_bytes"]
    peak = {
        str(folder): int(_MARGIN * max(writing.get(folder, 0), typing.get(folder, 0)))
        for folder in {*writing, *typing}
    }
    return CompileDisk(peak, parts, str(beside))


def check_compile_disk(
    source: Any, *, quantize: str, target: Any, out: pathlib.Path, streamed: bool, typed: bool,
    untie: bool = False,
) -> CompileDisk:  # fmt: skip
    """The prediction, or a CapacityError (exit 4) naming the disk short of room and the fix."""
    need = predict_compile_disk(
        source, quantize=quantize, target=target, out=out, streamed=streamed, typed=typed,
        untie=untie,
    )  # fmt: skip
    for folder, wanted in sorted(need.peak_bytes.items()):
        free = shutil.disk_usage(folder).free
        if wanted <= free:
            continue
        beside = folder == need.build_folder
        what, elsewhere = (
            ("the build and its scratch", "write the build to a disk with room (-o)")
            if beside
            else ("scratch copies", "point TMPDIR at a disk with room")
        )
        raise CapacityError(
            f"compiling {source.given} writes about {wanted / _GB:.1f} GB to {folder} ({what}), "
            f"{free / _GB:.1f} GB is free there",
            f"free {(wanted - free) / _GB:.1f} GB there or {elsewhere}",
        )
    return need
