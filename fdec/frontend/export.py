"""Load an HF model with PyTorch and export it to ONNX (dynamo exporter, KV cache) as FdecModel."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import warnings
from typing import Any

import onnx_ir as ir

from fdec.errors import CompileError, InputError
from fdec.frontend.families import build_spec
from fdec.frontend.input_order import apply_input_orders, read_input_orders
from fdec.frontend.source import ModelSource
from fdec.ir import FdecModel

__all__ = [
    "ImportedModel",
    "cache_argument",
    "export_model",
    "import_model",
    "infer_task",
    "load_hf_model",
    "load_tokenizer",
    "output_cache",
    "parameter_aliases",
    "seed_longrope",
]

logger = logging.getLogger(__name__)

# Example sizes used while tracing. All > 1 and distinct so no dimension is specialised.
_TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST = 2, 3, 5
_WRAPPED = "hf."  # prefix the wrapper module adds to parameter names; stripped after export


@dataclasses.dataclass
class ImportedModel:
    """The result of import: the graph IR plus what verification needs from the source."""

    fdec_model: FdecModel
    hf_model: Any  # torch.nn.Module, kept as the numeric reference
    tokenizer: Any | None
    source: ModelSource


def load_hf_model(source: ModelSource, *, trust_remote_code: bool = False) -> Any:
    """The source model in fp32 on the CPU, in eval mode."""
    import torch
    import transformers

    auto = (
        transformers.AutoModelForCausalLM
        if source.family.kind == "decoder"
        else transformers.AutoModel
    )
    try:
        model, info = auto.from_pretrained(
            source.folder,
            dtype=torch.float32,
            trust_remote_code=trust_remote_code,
            use_safetensors=not source.pickle_weights,
            output_loading_info=True,
            # Load past shape mismatches so they can be named below, then refuse them.
            ignore_mismatched_sizes=True,
        )
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise InputError(
            f"cannot load the model in {source.folder}: {first}",
            "check that config.json matches the weights",
        ) from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [], key=str)
    if missing or mismatched:
        if missing:
            what = f"missing {missing[0]!r}"
        else:
            first = mismatched[0]
            if isinstance(first, (tuple, list)) and len(first) == 3:
                what = (
                    f"{first[0]!r} is {list(first[1])} in the weights, {list(first[2])} by config"
                )
            else:
                what = f"{first} has another shape in the weights"
        raise InputError(
            f"the weights in {source.folder} do not match config.json ({what}, "
            f"{len(missing) + len(mismatched)} in all)",
            "use the config.json that came with these weights",
        )
    model.eval()
    seed_longrope(model)
    return model


def seed_longrope(model: Any) -> None:
    """Give a longrope rotary (Phi-3.5, Phi-4-mini) its long frequencies as real values.

    transformers computes them inside forward the first time (`longrope_frequency_update`)
    and keeps what it computed. Where that first time is the export's trace, it keeps a fake
    tensor: the model used for the reference afterwards took wrong long factors (a tiny Phi-3
    with 32 original positions, 1.24 off at every position of the 128 held tokens, while the
    exported graph was exact), and on a fake model the trace made a constant without values
    (the streamed compile stopped at "'model.rotary_emb.lifted_tensor_4' is not in the
    checkpoint"). Set beforehand, forward and the trace both read real values; the traced
    graph then keeps transformers' switch between the short and long factors on the
    sequence's length, and a build holds every position the model has."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for module in model.modules():
        if getattr(module, "rope_type", None) != "longrope" or not hasattr(
            module, "original_inv_freq"
        ):
            continue
        original = module.config.rope_parameters["original_max_position_embeddings"]
        module.long_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](
            module.config, "cpu", seq_len=original + 1
        )


def load_tokenizer(folder: Any) -> Any:
    """The folder's tokenizer (callers ask only where its files are). One that does not load
    is an InputError: a build never ships tokenizer files that do not work."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # transformers raises many kinds for broken files
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise InputError(
            f"the tokenizer in {folder} does not load ({reason})",
            "fix or remove its tokenizer files (without them fdec verifies on synthetic ids)",
        ) from None


def cache_argument(model: Any) -> str:
    """The keyword a model's forward takes its KV cache by: `cache` from transformers 5.24,
    `past_key_values` before (deprecated there, removed in 5.40)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned, under either name."""
    return out["cache"] if "cache" in out else out.past_key_values


def parameter_aliases(model: Any) -> dict[str, list[str]]:
    """Each parameter name with every other name sharing its storage (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(parameter), []).append(name)
    return {name: [n for n in names if n != name] for names in by_id.values() for name in names}


def _decoder_wrapper(model: Any) -> Any:
    import torch
    from transformers.cache_utils import DynamicCache

    num_layers = model.config.num_hidden_layers
    cache_kw = cache_argument(model)

    class DecoderWithCache(torch.nn.Module):
        """Flat tensors in and out, so the ONNX graph has one input per KV-cache tensor."""

        def __init__(self, hf: Any):
            super().__init__()
            self.hf = hf

        def forward(self, input_ids, attention_mask, position_ids, past):
            # Full layers: a sliding-window model's layers would slice the cache to the
            # window inside the graph (which TensorRT's shape profiles and the attention
            # fusion do not take). The window stays in the traced mask; fused attention gets
            # it from kv-policy (GroupQueryAttention's local_window_size).
            cache = DynamicCache()
            for layer in range(num_layers):
                cache.update(past[2 * layer], past[2 * layer + 1], layer)
            out = self.hf(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                **{cache_kw: cache},
            )
            present = []
            for layer in output_cache(out).layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return DecoderWithCache(model)


def _encoder_wrapper(model: Any, with_token_types: bool, with_pooler: bool) -> Any:
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self, hf: Any):
            super().__init__()
            self.hf = hf

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            out = self.hf(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )
            if with_pooler:
                return out.last_hidden_state, out.pooler_output
            return (out.last_hidden_state,)

    return Encoder(model)


def _decoder_example(model: Any):
    import torch

    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    batch, seq, past = _TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, past + seq, dtype=torch.int64)
    position_ids = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    cache = tuple(
        torch.randn(batch, kv_heads, past, head_dim, generator=generator)
        for _ in range(2 * config.num_hidden_layers)
    )
    dim = torch.export.Dim
    b, s, p, t = dim("batch"), dim("sequence"), dim("past_sequence"), dim("total_sequence")
    dynamic = {
        "input_ids": {0: b, 1: s},
        "attention_mask": {0: b, 1: t},
        "position_ids": {0: b, 1: s},
        "past": tuple({0: b, 2: p} for _ in cache),
    }
    layers = range(config.num_hidden_layers)
    inputs = ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in layers for kv in ("key", "value")
    ]
    outputs = ["logits"] + [f"present.{i}.{kv}" for i in layers for kv in ("key", "value")]
    return (input_ids, attention_mask, position_ids, cache), dynamic, inputs, outputs


def _encoder_example(model: Any, with_token_types: bool, with_pooler: bool):
    import torch

    batch, seq = _TRACE_BATCH, _TRACE_SEQ
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    b, s = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic: dict[str, Any] = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s}}
    args: tuple = (input_ids, mask)
    inputs = ["input_ids", "attention_mask"]
    if with_token_types:
        args += (torch.zeros(batch, seq, dtype=torch.int64),)
        dynamic["token_type_ids"] = {0: b, 1: s}
        inputs.append("token_type_ids")
    outputs = ["last_hidden_state"] + (["pooler_output"] if with_pooler else [])
    return args, dynamic, inputs, outputs


def _rename_io(model: ir.Model, inputs: list[str], outputs: list[str]) -> None:
    graph = model.graph
    if len(graph.inputs) != len(inputs) or len(graph.outputs) != len(outputs):
        raise CompileError(
            f"export produced {len(graph.inputs)} inputs/{len(graph.outputs)} outputs, "
            f"expected {len(inputs)}/{len(outputs)}",
            "report this model to the fdec developers",
        )
    for value, name in zip(graph.inputs, inputs):
        value.name = name
    for value, name in zip(graph.outputs, outputs):
        value.name = name
    for name, value in list(graph.initializers.items()):
        if name.startswith(_WRAPPED):
            value.name = name[len(_WRAPPED) :]


def export_model(hf_model: Any, family_kind: str) -> tuple[ir.Model, list[str], list[str]]:
    """Trace `hf_model` with torch.onnx's dynamo exporter; returns the IR and its I/O names."""
    import torch

    if family_kind == "decoder":
        wrapper = _decoder_wrapper(hf_model)
        args, dynamic, inputs, outputs = _decoder_example(hf_model)
    else:
        with_types = getattr(hf_model.config, "type_vocab_size", 0) > 0
        with_pooler = getattr(hf_model, "pooler", None) is not None
        wrapper = _encoder_wrapper(hf_model, with_types, with_pooler)
        args, dynamic, inputs, outputs = _encoder_example(hf_model, with_types, with_pooler)
    # The exporter prints progress lines and warnings of its own: fdec shows its own progress.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch").setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                wrapper,
                args,
                dynamic_shapes=dynamic,
                dynamo=True,
                optimize=False,
                verbose=False,
            )
        except Exception as err:
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else repr(err)
            raise CompileError(
                f"ONNX export failed: {first}", "report the model to the fdec developers"
            ) from err
    model = program.model
    _rename_io(model, inputs, outputs)
    model.producer_name = "fdec"
    return model, inputs, outputs


def import_model(
    source: ModelSource, *, trust_remote_code: bool = False, hf_model: Any = None
) -> ImportedModel:
    """Load, export and describe `source`: the front of every compile."""
    hf_model = (
        hf_model
        if hf_model is not None
        else load_hf_model(source, trust_remote_code=trust_remote_code)
    )
    _check_config_matches_weights(hf_model, source)
    model, inputs, outputs = export_model(hf_model, source.family.kind)
    apply_input_orders(model.graph, read_input_orders(source))
    spec = build_spec(
        source.family,
        hf_model.config,
        parameter_aliases(hf_model),
        set(model.graph.initializers),
        inputs,
        outputs,
    )
    spec.task = infer_task(hf_model, source.family.kind)
    tokenizer = load_tokenizer(source.folder) if source.has_tokenizer else None
    return ImportedModel(FdecModel(model, spec), hf_model, tokenizer, source)


def infer_task(hf_model: Any, kind: str) -> str:
    """The HF task of the loaded model, from optimum's TasksManager (class → task tables)."""
    fallback = "text-generation" if kind == "decoder" else "feature-extraction"
    try:
        from optimum.exporters.tasks import TasksManager

        task = TasksManager.infer_task_from_model(hf_model)
    except Exception as err:
        logger.info("optimum could not name the task (%s); using %s", err, fallback)
        return fallback
    if (task == "text-generation") != (kind == "decoder"):
        raise CompileError(
            f"optimum says this model's task is {task!r}, but fdec imported it as a {kind}",
            "report the model to the fdec developers",
        )
    return task


def _check_config_matches_weights(hf_model: Any, source: ModelSource) -> None:
    """transformers warns and re-initialises mismatched weights; fdec refuses instead."""
    import torch

    with torch.no_grad():
        for name, parameter in hf_model.named_parameters():
            # A sum is finite unless an element is NaN/Inf (or finite values overflow): one
            # reduction per weight instead of a bool copy of it; look closer only when not.
            # SmolLM2-135M, weights paged in: 0.6 s -> 0.1 s.
            if torch.isfinite(parameter.sum()) or torch.isfinite(parameter).all():
                continue
            raise InputError(
                f"weight {name!r} in {source.folder} holds NaN or Inf values",
                "the checkpoint is damaged; re-download or re-save it",
            )
