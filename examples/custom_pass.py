"""A custom pass: fold `Mul(x, 1)` away, run it in fdec's PassManager with numeric checks.

python examples/custom_pass.py MODEL_DIR
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import onnx_ir as ir

from fdec.frontend.export import import_model
from fdec.frontend.source import resolve_source
from fdec.ir import FdecModel
from fdec.pipeline import NumericCheckInstrument, Pass, PassManager, PassResult
from fdec.runtime import session_for_model
from fdec.verify import Reference


@dataclasses.dataclass
class RemoveMulByOnePass(Pass):
    """Replace `Mul(x, c)` where c is a constant of ones by `x`."""

    name = "remove-mul-by-one"
    family = "cleanup"
    summary = "remove multiplications by a constant one"

    def call(self, model: FdecModel) -> PassResult:
        removed = 0
        for node in list(model.graph):
            if node.op_type != "Mul" or len(node.inputs) != 2:
                continue
            data, factor = node.inputs
            tensor = factor.const_value if factor is not None else None
            if tensor is None or not np.all(tensor.numpy() == 1):
                continue
            if data.shape != node.outputs[0].shape or node.outputs[0].is_graph_output():
                continue  # broadcasting or a graph output: not a no-op to remove
            ir.convenience.replace_all_uses_with(node.outputs[0], data)
            model.graph.remove(node, safe=True)
            removed += 1
        return PassResult(model, modified=removed > 0, stats={"removed": removed})


def main(model_dir: str) -> int:
    imported = import_model(resolve_source(model_dir))
    spec = imported.fdec_model.spec
    reference = Reference.from_hf(imported.hf_model, spec.kind, imported.tokenizer, spec.vocab_size)
    manager = PassManager(
        [RemoveMulByOnePass()],
        [NumericCheckInstrument(lambda m: reference.compare(session_for_model(m)))],
    )
    _, records = manager.run(imported.fdec_model)
    for record in records:
        print(record.name, record.stats, record.checks["numeric"]["max_abs_error"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
