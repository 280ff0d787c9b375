"""onnxruntime-genai's genai_config.json for an fdec ONNX Runtime decoder build (issue 8).

With it, onnxruntime-genai's native generator (`og.Model(build)`) drives the fdec model.onnx
as it does its own builder's output: the config names the build's real inputs and outputs, the
shape of its KV cache, its special tokens and greedy search defaults. `generate_genai` is what
`fdec run BUILD --engine genai` uses.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Callable
from typing import Any

from fdec.errors import InputError, UsageError

__all__ = [
    "GENAI_CONFIG",
    "GENAI_INSTALL",
    "check_genai_cache",
    "genai_config",
    "generate_genai",
    "open_genai_model",
    "write_genai_config",
]

GENAI_CONFIG = "genai_config.json"
GENAI_INSTALL = "pip install onnxruntime-genai"
# Model types onnxruntime-genai 0.18 drives through its generic decoder with the names given
# in the config; anything else (gpt2: its "gpt2" type expects one stacked past_%d per layer)
# is written as "decoder", its type for any decoder-only model with such names (measured).
_NAMED_TYPES = ("llama", "mistral", "qwen2")


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _special_ids(*configs: dict[str, Any]) -> dict[str, Any]:
    """bos/eos/pad ids from the first of `configs` (generation_config.json, then config.json)
    that has each."""
    found: dict[str, Any] = {}
    for data in configs:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if found.get(key) is None and data.get(key) is not None:
                found[key] = data[key]
    return found


# generation_config.json's sampling fields, copied into genai_config.json's search as
# onnxruntime-genai's own builder does (so an app's generator samples as the model's authors
# set it), where the value is one genai accepts; fdec's own `run` and checks stay greedy.
_SAMPLING = {
    "do_sample": lambda v: isinstance(v, bool),
    "temperature": lambda v: isinstance(v, int | float) and v > 0,
    "top_k": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "top_p": lambda v: isinstance(v, int | float) and 0 < v <= 1,
    "repetition_penalty": lambda v: isinstance(v, int | float) and v > 0,
}


def _sampling(generation: dict[str, Any]) -> dict[str, Any]:
    """The model's sampling defaults from its generation_config.json (transformers' top_k 50
    where sampling is on and no top_k is given); {} where it sets none."""
    found = {k: generation[k] for k, valid in _SAMPLING.items() if valid(generation.get(k))}
    if found.get("do_sample") and "top_k" not in found:
        found["top_k"] = 50
    return found


def check_genai_cache(pipeline: list[Any]) -> None:
    """--emit genai, refused when the recipe is planned where the cache would be one
    onnxruntime-genai's generator cannot drive (`genai_config` checks the written build
    again): one the runtime trims (attention sinks, a window without fused attention), or
    one stored int8/fp8 (quantize-kv-cache) or bf16 (a bf16 typing of the cache I/O)."""
    from fdec.passes.kv_cache import QuantizeKvCachePass, runtime_trim
    from fdec.passes.typing import CastFloat16Pass

    trimmed = runtime_trim(pipeline)
    if trimmed:
        raise UsageError(
            f"--emit genai: this build's runtime trims its KV cache ({trimmed}), which "
            "onnxruntime-genai's generator does not",
            "drop --emit genai, or --kv-window/--kv-sink",
        )
    for pass_ in pipeline:
        stored = pass_.dtype if isinstance(pass_, QuantizeKvCachePass) else None
        if isinstance(pass_, CastFloat16Pass) and pass_.low_io:
            stored = pass_.dtype
        if stored in ("int8", "fp8", "bf16"):
            raise UsageError(
                f"--emit genai: onnxruntime-genai does not drive a {stored} KV cache",
                "drop --emit genai, or keep an fp16/fp32 cache (drop --kv-dtype; --quantize "
                "fp16, the CUDA default, instead of bf16)",
            )


def genai_config(build_folder: pathlib.Path, spec: Any) -> dict[str, Any]:
    """The genai_config.json content for the decoder build in `build_folder`."""
    build_folder = pathlib.Path(build_folder)
    if not spec.is_decoder:
        raise UsageError(
            f"--emit genai is for decoder builds; {spec.architecture or spec.family} is an encoder",
            "drop --emit genai",
        )
    runtime = _read_json(build_folder / "fdec-runtime.json")
    hf_config = _read_json(build_folder / "config.json")
    generation = _read_json(build_folder / "generation_config.json")
    inputs = set(spec.inputs or runtime.get("inputs") or [])
    outputs = set(spec.outputs or runtime.get("outputs") or [])
    ids = _special_ids(generation, hf_config)
    eos = ids.get("eos_token_id")
    if eos is None:
        eos = runtime.get("eos_token_ids") or []
    pad = ids.get("pad_token_id")
    if pad is None:  # genai needs one; the first eos is what HF generate pads with
        pad = eos[0] if isinstance(eos, list) and eos else eos
    kv = runtime.get("kv_cache") or {}
    model_type = hf_config.get("model_type") or spec.family
    policy = kv.get("policy")
    if policy and not policy.get("native_window"):
        raise UsageError(
            "--emit genai: this build's runtime trims its KV cache (--kv-window/--kv-sink), "
            "which onnxruntime-genai's generator does not",
            "drop --emit genai, or --kv-window/--kv-sink",
        )
    if kv.get("dtype") not in (None, "float32", "float16"):
        raise UsageError(
            f"--emit genai: onnxruntime-genai does not drive a {kv['dtype']} KV cache",
            "drop --emit genai, or keep an fp16/fp32 cache (no --kv-dtype, --quantize fp16)",
        )
    context = int(runtime.get("max_positions") or spec.max_positions or 2048)
    names_in: dict[str, str] = {"input_ids": "input_ids"}
    for name in ("attention_mask", "position_ids"):
        if name in inputs:
            names_in[name] = name
    names_in["past_key_names"] = "past_key_values.%d.key"
    names_in["past_value_names"] = "past_key_values.%d.value"
    names_out = {
        "logits": "logits",
        "present_key_names": "present.%d.key",
        "present_value_names": "present.%d.value",
    }
    missing = [n for n in ("input_ids", "past_key_values.0.key") if inputs and n not in inputs]
    missing += [n for n in ("logits", "present.0.key") if outputs and n not in outputs]
    if missing:
        raise UsageError(
            f"this build has no {', '.join(missing)}: onnxruntime-genai cannot drive it",
            "compile a decoder with a KV cache (the default) to use --emit genai",
        )
    return {
        "model": {
            "bos_token_id": ids.get("bos_token_id"),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": runtime.get("model", "model.onnx"),
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "inputs": names_in,
                "outputs": names_out,
                "num_attention_heads": spec.num_heads,
                "num_hidden_layers": spec.num_layers,
                "num_key_value_heads": spec.num_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": model_type if model_type in _NAMED_TYPES else "decoder",
            "vocab_size": spec.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # Only a fused build (GroupQueryAttention writing in place) takes one max-length
            # buffer as both past and present; a traced graph concatenates.
            "past_present_share_buffer": kv.get("buffer") == "shared",
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
            **_sampling(generation),
        },
    }


def write_genai_config(build_folder: pathlib.Path, spec: Any) -> pathlib.Path:
    """Write genai_config.json into the (lowered) ONNX Runtime build; returns its path."""
    build_folder = pathlib.Path(build_folder)
    config = genai_config(build_folder, spec)
    path = build_folder / GENAI_CONFIG
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def _import_genai() -> Any:
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise UsageError(
            "--engine genai needs onnxruntime-genai, which is not installed",
            f"{GENAI_INSTALL} (or run without --engine genai)",
        ) from None
    return og


def open_genai_model(folder: pathlib.Path, threads: int = 0) -> Any:
    """onnxruntime-genai's Model for the folder holding a genai_config.json, on the CPU;
    `threads` > 0 pins its intra-op threads (0: its own default, half the cores)."""
    og = _import_genai()
    config = og.Config(str(folder))
    config.clear_providers()
    if threads:
        options = {"intra_op_num_threads": threads}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    return og.Model(config)


def generate_genai(
    build_folder: pathlib.Path,
    ids: list[int],
    *,
    max_new_tokens: int,
    stop_tokens: list[int] = (),
    on_token: Callable[[int], None] | None = None,
    threads: int = 0,
) -> dict[str, Any]:
    """Greedy tokens after `ids` from onnxruntime-genai's generator on the build, with timings.

    Stops after a stop token (kept last, as fdec.runtime.generate does), after
    `max_new_tokens`, or at the context length.
    """
    build_folder = pathlib.Path(build_folder)
    og = _import_genai()
    if not (build_folder / GENAI_CONFIG).is_file():
        raise InputError(
            f"{build_folder} has no {GENAI_CONFIG}",
            "compile it with --emit genai (fdec compile MODEL -o BUILD --emit genai)",
        )
    model = open_genai_model(build_folder, threads)
    params = og.GeneratorParams(model)
    context = json.loads((build_folder / GENAI_CONFIG).read_text())["model"]["context_length"]
    # greedy without the model's repetition penalty (genai_config.json may carry one), as
    # fdec.runtime.generate
    params.set_search_options(
        max_length=min(len(ids) + max_new_tokens, context),
        do_sample=False,
        repetition_penalty=1.0,
    )
    generator = og.Generator(model, params)
    stop = set(stop_tokens)
    tokens: list[int] = []
    start = time.perf_counter()
    generator.append_tokens(list(ids))
    prefill_s = 0.0
    decode_start = start
    while not generator.is_done() and len(tokens) < max_new_tokens:
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        if not tokens:
            prefill_s = time.perf_counter() - start
            decode_start = time.perf_counter()
        tokens.append(token)  # a stop token is kept last, as fdec.runtime.generate does
        if on_token:
            on_token(token)
        if token in stop:
            break
    decode_s = time.perf_counter() - decode_start
    steps = max(0, len(tokens) - 1)
    return {
        "tokens": tokens,
        "prompt_tokens": len(ids),
        "prefill_s": prefill_s,
        "decode_tokens_per_s": steps / decode_s if steps and decode_s > 0 else 0.0,
    }
