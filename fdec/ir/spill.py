"""Weight spill: new weights a pass makes on a streamed compile go to a data file, not memory.

A streamed compile (fdec.frontend.stream) binds the source's weights to the checkpoint's bytes,
so they are read one at a time; but each weight a pass makes (int4 codes and scales, a packed
qkv, an fp8 table) would stay in memory until the build is written: 4.5 GB for an 8B model's
int4 weights. A `WeightSpill` attached to the model's graph (`attach`) takes such a tensor as
it is registered (`fdec.passes.weights.add_initializer` calls `spill_tensor`), appends its bytes
to one data file in a folder the compile owns, and gives back an onnx-ir `ExternalTensor`
pointing at them; `spill_initializers` does the same for every in-memory initializer a pass
registered another way (fdec.compile.optimize runs it after each pass). The build's writer copies
external tensors in 1 MiB chunks (`ExternalTensor.tofile`), so no weight is held whole again;
the bytes written are the tensor's own, so the build is byte for byte the one kept in memory
gives. `close` removes the folder once the build is written.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = [
    "SPILL_MIN_BYTES",
    "WeightSpill",
    "spill_initializers",
    "spill_tensor",
    "transposed_tensor",
]

logger = logging.getLogger(__name__)

# Tensors smaller than this stay in memory (shape constants, norms' small tables): the ONNX
# file keeps those up to 1 KB inline anyway, and the spill is for the bulk of the weights.
SPILL_MIN_BYTES = 64 * 1024
_META_KEY = "fdec.weight_spill"
_DATA_FILE = "spilled.data"
# write_transposed's block of source rows: 4096 x 8192 fp32 for an 8B's table
_TRANSPOSE_BLOCK_BYTES = 128 << 20


class WeightSpill:
    """A data file that new weights are appended to, in `folder` (a new temporary folder when
    None, created when missing); `close` removes the folder."""

    def __init__(self, folder: str | pathlib.Path | None = None, *, min_bytes: int | None = None):
        self.folder = pathlib.Path(folder or tempfile.mkdtemp(prefix="fdec-spill-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / _DATA_FILE
        self.min_bytes = SPILL_MIN_BYTES if min_bytes is None else min_bytes
        self._file: Any = self.path.open("wb")
        self.tensors = 0
        self.bytes = 0

    def attach(self, graph: ir.Graph) -> WeightSpill:
        """Make `graph`'s new weights go here (read back by `spill_tensor`)."""
        graph.meta[_META_KEY] = self
        return self

    def wants(self, tensor: Any) -> bool:
        """In memory (not external, not lazily computed) and at least `min_bytes`."""
        return not isinstance(tensor, (ir.ExternalTensor, ir.LazyTensor)) and self.takes(
            tensor.nbytes
        )

    def takes(self, nbytes: int) -> bool:
        """Open, and `nbytes` is at least `min_bytes`."""
        return self._file is not None and nbytes >= self.min_bytes

    def write(self, tensor: ir.TensorProtocol, name: str) -> ir.ExternalTensor:
        """Append `tensor`'s bytes; the external tensor reading them back (same dtype, shape)."""
        offset = self._file.tell()
        tensor.tofile(self._file) if hasattr(tensor, "tofile") else self._file.write(
            tensor.tobytes()
        )
        length = self._file.tell() - offset
        self._file.flush()  # readers open the file by name
        return self._written(offset, length, tensor.dtype, tensor.shape, name,
                             doc_string=tensor.doc_string,
                             metadata_props=dict(tensor.metadata_props))  # fmt: skip

    def _written(
        self, offset: int, length: int, dtype: ir.DataType, shape: Any, name: str, **extra: Any
    ) -> ir.ExternalTensor:
        """Count `length` bytes written at `offset`; the external tensor reading them back."""
        self.tensors += 1
        self.bytes += length
        return ir.ExternalTensor(_DATA_FILE, offset, length, dtype, shape=ir.Shape(shape),
                                 name=name, base_dir=self.folder, **extra)  # fmt: skip

    def write_transposed(self, array: np.ndarray, name: str) -> ir.ExternalTensor:
        """Append the bytes of `array.T` ([N, M] of an [M, N] array, row-major), written a
        block of `array`'s rows at a time: no whole transposed copy is made (an 8B Llama's
        tied [128256, 4096] fp32 table untied into the lm_head: 2.1 GB)."""
        rows, columns = array.shape
        item = array.dtype.itemsize
        self._file.flush()
        offset, fd = self._file.tell(), self._file.fileno()
        step = max(1, _TRANSPOSE_BLOCK_BYTES // max(1, columns * item))
        for start in range(0, rows, step):
            block = np.ascontiguousarray(array[start : start + step].T)  # [N, step]
            for column in range(columns):  # row `column` of array.T, at its place
                os.pwrite(fd, block[column].data, offset + (column * rows + start) * item)
        length = rows * columns * item
        self._file.seek(offset + length)
        return self._written(
            offset, length, ir.DataType.from_numpy(array.dtype), (columns, rows), name
        )

    def to_dict(self) -> dict[str, int]:
        return {"tensors": self.tensors, "bytes": self.bytes}

    def close(self) -> None:
        """Remove the data file (the model's spilled tensors cannot be read after this)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> WeightSpill:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def _spill_of(graph: ir.Graph) -> WeightSpill | None:
    spill = graph.meta.get(_META_KEY)
    return spill if isinstance(spill, WeightSpill) else None


def spill_tensor(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    """`tensor`, or where `graph` has a spill attached and wants it, the spilled copy."""
    spill = _spill_of(graph)
    if spill is None or not spill.wants(tensor):
        return tensor
    return spill.write(tensor, name)


def transposed_tensor(graph: ir.Graph, name: str, array: np.ndarray) -> ir.TensorProtocol:
    """`array.T` as a tensor named `name`: written to `graph`'s spill a block at a time where
    one is attached and wants it (`WeightSpill.write_transposed`), else an in-memory copy."""
    spill = _spill_of(graph)
    if spill is None or array.ndim != 2 or not spill.takes(array.nbytes):
        return ir.tensor(np.ascontiguousarray(array.T), name=name)
    return spill.write_transposed(array, name)


def spill_initializers(graph: ir.Graph) -> int:
    """Spill every initializer of `graph` held in memory that its spill wants; how many."""
    spill = _spill_of(graph)
    if spill is None:
        return 0
    count = 0
    for name, value in graph.initializers.items():
        tensor = value.const_value
        if tensor is not None and spill.wants(tensor):
            value.const_value = spill.write(tensor, name)
            count += 1
    return count
