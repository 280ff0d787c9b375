"""Export and reference without materialising weights: initializers bound to checkpoint bytes.

The model is built from config.json with fake tensors (no storage), traced by the same
dynamo export as `fdec.frontend.export`, and each initializer is
then bound to its bytes inside the `.safetensors` files: an onnx-ir `ExternalTensor` at the
tensor's offset when the checkpoint's dtype is the graph's (nothing read until a pass or the
writer asks), else a `LazyTensor` that reads that one tensor and widens it exactly (bf16/fp16
to fp32) each time it is asked, keeping nothing. Tied parameters bind to the one tensor the
checkpoint holds. The reference runs the same skeleton with one decoder layer's weights in
memory at a time (`streamed_reference_model`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import pathlib
import struct
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx_ir as ir

from fdec.errors import CompileError, InputError
from fdec.frontend.export import (
    ImportedModel,
    export_model,
    infer_task,
    parameter_aliases,
    seed_longrope,
)
from fdec.frontend.families import build_spec
from fdec.frontend.input_order import apply_input_orders, read_input_orders
from fdec.frontend.source import ModelSource
from fdec.ir import FdecModel

__all__ = [
    "STREAM_PARAMETERS",
    "CheckpointTensor",
    "StreamedModel",
    "bind_initializers",
    "checkpoint_index",
    "checkpoint_parameters",
    "import_streamed",
    "open_streamed",
    "skeleton_model",
    "streamed_reference_model",
]

logger = logging.getLogger(__name__)

# Sources with more parameters than this compile through the streamed front end by default
# (below it today's path, which loads the model in fp32, stays the default).
STREAM_PARAMETERS = 2_000_000_000

_DTYPES = {
    "F32": ir.DataType.FLOAT,
    "F16": ir.DataType.FLOAT16,
    "BF16": ir.DataType.BFLOAT16,
    "F64": ir.DataType.DOUBLE,
    "I64": ir.DataType.INT64,
    "I32": ir.DataType.INT32,
}


# safetensors dtype → the numpy dtype its bytes are read as (bf16 as its raw 16 bits).
_WIDENED_FROM = {"F32": "<f4", "BF16": "<u2", "F16": "<f2"}
_READ_CHUNK = 64 << 20


@dataclasses.dataclass(frozen=True)
class CheckpointTensor:
    """Where one tensor's raw little-endian bytes lie inside a safetensors file."""

    path: pathlib.Path
    offset: int  # from the start of the file
    length: int
    dtype: str  # safetensors' name: F32, BF16, ...
    shape: tuple[int, ...]

    def external(self, name: str) -> ir.ExternalTensor:
        """The tensor as onnx-ir external data in the checkpoint's own dtype (nothing read)."""
        return ir.ExternalTensor(
            self.path.name, self.offset, self.length, _DTYPES[self.dtype],
            shape=ir.Shape(self.shape), name=name, base_dir=self.path.parent,
        )  # fmt: skip

    def read_float32(self) -> np.ndarray:
        """This tensor alone, widened exactly to fp32 as it is read, `_READ_CHUNK` bytes at a
        time: the fp32 result is the only whole copy held (the 8B Llama's 1 GB bf16 table read
        whole, then widened, then shifted held 5.3 GB at once)."""
        if self.dtype not in _WIDENED_FROM:
            raise CompileError(
                f"checkpoint tensor of dtype {self.dtype} cannot be widened to fp32",
                "compile this model with --no-stream",
            )
        source = np.dtype(_WIDENED_FROM[self.dtype])
        count = self.length // source.itemsize
        out = np.empty(count, dtype=np.float32)
        step = max(1, _READ_CHUNK // source.itemsize)
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            for start in range(0, count, step):
                stop = min(count, start + step)
                raw = np.frombuffer(handle.read((stop - start) * source.itemsize), dtype=source)
                if self.dtype == "BF16":  # bf16 is the top half of an fp32
                    out.view(np.uint32)[start:stop] = raw.astype(np.uint32) << 16
                else:
                    out[start:stop] = raw
        return out.reshape(self.shape)


def checkpoint_index(files: tuple[pathlib.Path, ...] | list[pathlib.Path]) -> dict[str, Any]:
    """Every tensor of the safetensors `files` by name, from their headers alone."""
    index: dict[str, CheckpointTensor] = {}
    for path in files:
        if path.suffix != ".safetensors":
            raise CompileError(
                f"streaming needs safetensors weights, not {path.name}",
                "re-save the checkpoint as safetensors or compile with --no-stream",
            )
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        start = 8 + length
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            index[name] = CheckpointTensor(
                path, start + begin, end - begin, info["dtype"], tuple(info["shape"])
            )
    return index


def checkpoint_parameters(source: ModelSource) -> int:
    """The number of elements the source's safetensors files hold (0 for pickled weights)."""
    if source.pickle_weights or not source.weight_files:
        return 0
    files = [p for p in source.weight_files if p.suffix == ".safetensors"]
    return sum(int(np.prod(t.shape)) for t in checkpoint_index(files).values())


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on `meta` (no storage) and their buffers
    (rotary tables and the like, computed at construction) on the CPU with real values."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module: Any, name: str, parameter: Any) -> None:
        register(module, name, parameter)
        if parameter is not None and parameter.device.type != "meta":  # tied ones stay one
            kind = type(module._parameters[name])
            module._parameters[name] = kind(
                module._parameters[name].to("meta"), requires_grad=parameter.requires_grad
            )

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def skeleton_model(source: ModelSource, *, trust_remote_code: bool = False) -> Any:
    """The source's architecture in fp32, eval mode, parameters on `meta`, buffers real."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(
        source.folder, trust_remote_code=trust_remote_code
    )
    auto = (
        transformers.AutoModelForCausalLM
        if source.family.kind == "decoder"
        else transformers.AutoModel
    )
    with _parameters_on_meta():
        model = auto.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.eval()
    return model


def _fake_model(source: ModelSource, *, trust_remote_code: bool = False) -> Any:
    """The source's architecture with fake CPU tensors (no storage) for tracing. Fake rather
    than `meta`: kernels pick their CPU paths (SDPA's flash kernel returns the CPU layout), so
    the traced graph is node for node the one a real model gives; on `meta` it is not (two
    extra copies after the attention transposes of a 2-layer Llama)."""
    import torch
    import transformers
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = transformers.AutoConfig.from_pretrained(
        source.folder, trust_remote_code=trust_remote_code
    )
    auto = (
        transformers.AutoModelForCausalLM
        if source.family.kind == "decoder"
        else transformers.AutoModel
    )
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = auto.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    seed_longrope(model)
    return model.eval()


def _traced_constants(model: ir.Model) -> dict[str, np.ndarray]:
    """Initializers the trace gave real values (not the fake tensors of parameters)."""
    from torch._subclasses.fake_tensor import FakeTensor

    found = {}
    for name, value in model.graph.initializers.items():
        raw = getattr(value.const_value, "raw", None)
        if raw is not None and hasattr(raw, "numpy") and not isinstance(raw, FakeTensor):
            found[name] = raw.detach().numpy().copy()
    return found


def _checkpoint_name(name: str, aliases: dict[str, list[str]], index: dict[str, Any]) -> str:
    for candidate in [name, *aliases.get(name, [])]:
        if candidate in index:
            return candidate
    raise CompileError(
        f"parameter {name!r} is not in the checkpoint under that name",
        "compile this model with --no-stream (it loads the weights through transformers)",
    )


def bind_initializers(
    model: ir.Model,
    index: dict[str, CheckpointTensor],
    aliases: dict[str, list[str]],
    buffers: dict[str, np.ndarray],
) -> dict[str, int]:
    """Give every initializer of `model` its data: a buffer's values, or the checkpoint bytes
    (external when the dtypes agree, else a lazily widened read); returns counts by kind."""
    counts = {"external": 0, "widened": 0, "buffer": 0}
    for name, value in model.graph.initializers.items():
        want = value.dtype
        if name in buffers:
            value.const_value = ir.tensor(buffers[name], name=name)
            counts["buffer"] += 1
            continue
        entry = index[_checkpoint_name(name, aliases, index)]
        shape = tuple(value.shape.numpy()) if value.shape is not None else entry.shape
        if shape != entry.shape:
            raise CompileError(
                f"{name!r} is {list(entry.shape)} in the weights, {list(shape)} by config",
                "use the config.json that came with these weights",
            )
        if want == _DTYPES.get(entry.dtype):
            value.const_value = entry.external(name)
            counts["external"] += 1
        elif want == ir.DataType.FLOAT:
            value.const_value = ir.LazyTensor(
                lambda entry=entry, name=name: ir.tensor(entry.read_float32(), name=name),
                dtype=ir.DataType.FLOAT,
                shape=ir.Shape(entry.shape),
                name=name,
            )
            counts["widened"] += 1
        else:
            raise CompileError(
                f"{name!r} is {entry.dtype} in the weights but {want} in the graph",
                "compile this model with --no-stream",
            )
    return counts


def _transposed(tensor: Any, perm: tuple[int, ...], name: str) -> ir.TensorProtocol:
    return ir.tensor(np.ascontiguousarray(np.transpose(tensor.numpy(), perm)), name=name)


def _relay_weight_transposes(graph: ir.Graph) -> int:
    """Replace each Transpose of a weight nothing else reads by the weight in its new layout,
    as a lazy tensor (read and transposed when asked), under the weight's name.

    fold-constants (passes.cleanup) folds these Transposes too, but into in-memory copies: on
    an 8B model every projection in fp32 (30 GB). Done here the same way (the new initializer
    registered where folding registers it, the old one dropped), the build is byte for byte
    the one today's path gives; returns how many were re-laid."""
    relaid = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain != "" or not node.inputs:
            continue
        source = node.inputs[0]
        if source is None or not source.is_initializer() or len(source.uses()) != 1:
            continue
        tensor, out = source.const_value, node.outputs[0]
        if tensor is None:
            continue
        attribute = node.attributes.get("perm")
        perm = tuple(attribute.as_ints()) if attribute is not None else None
        perm = perm or tuple(reversed(range(len(tensor.shape))))
        shape = ir.Shape([tensor.shape[i] for i in perm])
        name = source.name
        lazy = ir.LazyTensor(
            lambda tensor=tensor, perm=perm, name=name: _transposed(tensor, perm, name),
            dtype=tensor.dtype,
            shape=shape,
            name=name,
        )
        relaid_value = ir.Value(name=out.name, shape=shape, type=ir.TensorType(tensor.dtype))
        relaid_value.const_value = lazy
        ir.convenience.replace_all_uses_with(out, relaid_value)
        graph.remove(node, safe=True)
        del graph.initializers[name]
        relaid_value.name = name
        graph.register_initializer(relaid_value)
        relaid += 1
    return relaid


def import_streamed(
    source: ModelSource, *, trust_remote_code: bool = False, relay: bool = True
) -> ImportedModel:
    """`import_model` without loading the weights: the graph traced on fake tensors, the
    initializers bound to the checkpoint, and (`relay`) weight Transposes re-laid lazily."""
    index = checkpoint_index(source.weight_files)
    skeleton = skeleton_model(source, trust_remote_code=trust_remote_code)
    buffers = {
        name: buffer.detach().numpy().copy()
        for name, buffer in skeleton.named_buffers()
        if buffer.device.type != "meta"
    }
    aliases = parameter_aliases(skeleton)
    model, inputs, outputs = export_model(
        _fake_model(source, trust_remote_code=trust_remote_code), source.family.kind
    )
    counts = bind_initializers(model, index, aliases, {**_traced_constants(model), **buffers})
    counts["relaid"] = _relay_weight_transposes(model.graph) if relay else 0
    counts["input_orders"] = apply_input_orders(model.graph, read_input_orders(source))
    logger.info("streamed export: initializers %s", counts)
    spec = build_spec(
        source.family, skeleton.config, aliases, set(model.graph.initializers), inputs, outputs
    )
    spec.task = infer_task(skeleton, source.family.kind)
    return ImportedModel(FdecModel(model, spec), None, None, source)


def _layer_list(model: Any) -> Any:
    """The ModuleList holding the decoder/encoder layers (num_hidden_layers long)."""
    import torch

    count = getattr(model.config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise CompileError(
        "cannot find the model's layer list for the streamed reference",
        "compile this model with --no-stream",
    )


def _check_finite(name: str, array: np.ndarray, source: ModelSource) -> None:
    """Refuse a checkpoint tensor holding NaN or Inf (what today's path checks on the loaded
    model), one tensor at a time: a sum is finite unless an element is not (or finite values
    overflow: then look closer)."""
    if np.isfinite(array.sum(dtype=np.float64)) or np.isfinite(array).all():
        return
    raise InputError(
        f"weight {name!r} in {source.folder} holds NaN or Inf values",
        "the checkpoint is damaged; re-download or re-save it",
    )


@dataclasses.dataclass
class StreamedModel:
    """The source's architecture with everything outside the layers (embeddings, final norm,
    head) read once in fp32 and the layers' parameters on `meta`: `load(layer)` reads one
    layer's weights from the checkpoint (widened to fp32), `unload(layer)` drops them;
    `unload_outside()` drops the weights outside the layers (an 8B Llama's embedding: 2.1 GB)
    while only the layers run, `load_outside()` reads them again.
    `aliases`: parameter_aliases of the architecture (tied names), taken before loading."""

    model: Any
    layers: Any  # the ModuleList of decoder/encoder layers
    load: Callable[[Any], None]
    unload: Callable[[Any], None]
    aliases: dict[str, list[str]]
    load_outside: Callable[[], None]
    unload_outside: Callable[[], None]


def open_streamed(source: ModelSource, *, trust_remote_code: bool = False) -> StreamedModel:
    """The source model with no layer's weights in memory (see StreamedModel)."""
    import torch

    index = checkpoint_index(source.weight_files)
    model = skeleton_model(source, trust_remote_code=trust_remote_code)
    aliases = parameter_aliases(model)
    names = {id(module): name for name, module in model.named_modules()}
    layers = _layer_list(model)

    checked: set[str] = set()  # NaN/Inf looked for once per tensor, as it is first read

    def read(stored: str) -> Any:
        array = index[stored].read_float32()
        if stored not in checked:
            _check_finite(stored, array, source)
            checked.add(stored)
        return torch.from_numpy(array)

    def load(module: Any) -> None:
        prefix = names[id(module)]
        prefix = f"{prefix}." if prefix else ""
        state = {}
        for name, _ in module.named_parameters(remove_duplicate=False):
            state[name] = read(_checkpoint_name(prefix + name, aliases, index))
        module.load_state_dict(state, strict=False, assign=True)

    def to_meta(modules: Any) -> None:
        for sub in modules:
            for key, parameter in list(sub._parameters.items()):
                if parameter is not None:
                    sub._parameters[key] = torch.nn.Parameter(
                        parameter.to("meta"), requires_grad=False
                    )

    def unload(module: Any) -> None:
        to_meta(module.modules())

    in_layers = {id(p) for p in layers.parameters()}
    outside_names = [
        name
        for name, parameter in model.named_parameters(remove_duplicate=False)
        if id(parameter) not in in_layers
    ]
    in_layer_modules = {id(m) for m in layers.modules()}
    outside_modules = [m for m in model.modules() if id(m) not in in_layer_modules]

    def load_outside() -> None:
        outside: dict[str, Any] = {}
        tensors: dict[str, Any] = {}  # tied names share one tensor
        for name in outside_names:
            stored = _checkpoint_name(name, aliases, index)
            if stored not in tensors:
                tensors[stored] = read(stored)
            outside[name] = tensors[stored]
        model.load_state_dict(outside, strict=False, assign=True)

    load_outside()
    return StreamedModel(
        model, layers, load, unload, aliases, load_outside, lambda: to_meta(outside_modules)
    )


def streamed_reference_model(source: ModelSource, *, trust_remote_code: bool = False) -> Any:
    """The source model for the PyTorch reference with one layer's weights in memory at a
    time: everything outside the layers (embeddings, final norm, head) is read once; each
    layer's weights are read from the checkpoint just before it runs and dropped after. Each
    tensor is checked for NaN/Inf the first time it is read (InputError)."""
    streamed = open_streamed(source, trust_remote_code=trust_remote_code)
    for layer in streamed.layers:
        layer.register_forward_pre_hook(lambda module, _args: streamed.load(module))
        layer.register_forward_hook(lambda module, *_: streamed.unload(module))
    return streamed.model
