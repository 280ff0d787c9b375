"""Where the ONNX export of a model spends its time, stage by stage, and how it grows with layers.

    python benchmarks/export_cost.py                       # SmolLM2-135M: stages, then 1/2/8 layers
    python benchmarks/export_cost.py MODEL --layers 2,4    # any fdec source; layer counts to time

Stages are torch.onnx's own steps, run one by one exactly as `torch.onnx.export(dynamo=True,
optimize=False)` runs them for fdec (fdec/frontend/export.py): torch.export (non-strict), the
ONNX-friendly decompositions (a second full trace), translation to ONNX, and the opset 18 -> 20
conversion. The layer rows time fdec's whole `export_model` on the same model cut to its first N
decoder layers, so the per-layer cost and the fixed cost can be read off one run.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings


def _stages(model) -> None:
    import onnxscript._framework_apis.torch_2_9 as onnxscript_apis
    import torch
    from torch.onnx import _flags
    from torch.onnx._internal.exporter import _core, _registration

    from fdec.frontend import export

    wrapper = export._decoder_wrapper(model)
    args, dynamic, _, _ = export._decoder_example(model)
    registry = _registration.ONNXRegistry().from_torchlib(opset_version=18)
    started = time.perf_counter()
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        program = torch.export.export(
            wrapper,
            args,
            dynamic_shapes=dynamic,
            strict=False,
            prefer_deferred_runtime_asserts_over_guards=_flags.PREFER_DEFERRED_RUNTIME_ASSERTS_OVER_GUARDS,
        )
    print(f"  torch.export (non-strict)   {time.perf_counter() - started:6.1f} s", flush=True)
    started = time.perf_counter()
    program = _core._prepare_exported_program_for_export(program, registry=registry)
    print(f"  decompositions (retrace)    {time.perf_counter() - started:6.1f} s", flush=True)
    started = time.perf_counter()
    onnx_program = _core._exported_program_to_onnx_program(program, registry=registry)
    print(f"  translation to ONNX         {time.perf_counter() - started:6.1f} s", flush=True)
    started = time.perf_counter()
    onnx_model = onnxscript_apis.convert_version(onnx_program.model, 20)
    print(f"  opset 18 -> 20              {time.perf_counter() - started:6.1f} s", flush=True)
    print(f"  {len(onnx_model.graph)} nodes", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m")
    parser.add_argument("--layers", default="1,2,8", help="decoder layer counts to time")
    parser.add_argument("--no-stages", action="store_true")
    options = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.getLogger("torch").setLevel(logging.ERROR)

    import torch

    from fdec.frontend.export import export_model, load_hf_model
    from fdec.frontend.source import resolve_source

    source = resolve_source(options.model)
    model = load_hf_model(source)
    layers = model.model.layers
    total = len(layers)
    if not options.no_stages:
        print(f"{options.model}, {total} layers, stages:")
        _stages(model)
    print("export_model by layer count:")
    for count in [int(n) for n in options.layers.split(",") if n]:
        model.model.layers = torch.nn.ModuleList(list(layers)[:count])
        model.config.num_hidden_layers = count
        started = time.perf_counter()
        onnx_model, _, _ = export_model(model, source.family.kind)
        print(
            f"  {count:3d} layers  {time.perf_counter() - started:6.1f} s  "
            f"{len(onnx_model.graph)} nodes",
            flush=True,
        )
    from fdec.bench import peak_rss_mb

    print(f"peak RSS {peak_rss_mb() / 1024:.2f} GiB")


if __name__ == "__main__":
    main()
