"""Loading a build folder and running a prompt through it (what `fdec run` does)."""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

from fdec.build import read_build_json
from fdec.errors import FdecError, InputError, UsageError
from fdec.lower import MODEL_FILE, RUNTIME_CONFIG
from fdec.runtime import OrtModel, Sampling, generate, open_session
from fdec.runtime.session import KV_BUFFERS, OPT_LEVELS

__all__ = [
    "DRAFT_FOLDER",
    "SPECULATIVE_METHODS",
    "LoadedBuild",
    "load_build",
    "load_draft",
    "run_prompt",
    "run_prompt_genai",
]

logger = logging.getLogger(__name__)

DRAFT_FOLDER = "draft"  # where `fdec compile --draft` writes the draft build, inside the build
SPECULATIVE_METHODS = (None, "prompt-lookup", "draft")


@dataclasses.dataclass
class LoadedBuild:
    folder: pathlib.Path
    config: dict[str, Any]
    model: OrtModel
    tokenizer: Any
    # Draft builds opened for `--speculative draft`, by folder (kept for later runs).
    drafts: dict[pathlib.Path, LoadedBuild] = dataclasses.field(default_factory=dict)

    @property
    def max_positions(self) -> int:
        """Positions the model has (0: unknown): its rotary table or position embeddings end
        there, and positions keep counting under a KV-cache window."""
        return int(
            self.config.get("max_positions")
            or (self.config.get("kv_cache") or {}).get("max_length")
            or 0
        )

    @property
    def requested_providers(self) -> list[str]:
        return [p if isinstance(p, str) else p[0] for p in self.config.get("providers") or []]

    def provider_fallback(self) -> str | None:
        """A loud line when the session did not get the accelerator the build asked for
        (onnxruntime-gpu falls back to the CPU silently)."""
        if self.model.provider_fallback:  # a GPU provider failed to start (open_session)
            return self.model.provider_fallback
        got = self.model.providers
        wanted = [p for p in self.requested_providers if p != "CPUExecutionProvider"]
        if wanted and not any(p in got for p in wanted):
            return (
                f"this build asks for {', '.join(wanted)} but the session runs on "
                f"{', '.join(got)}: install onnxruntime-gpu (pip install 'fdec[gpu]' in an "
                "environment without onnxruntime) on a machine with an NVIDIA GPU"
            )
        return None


def load_build(folder: pathlib.Path, *, cuda_graph: bool | None = None) -> LoadedBuild:
    """Open a build's model and tokenizer with the session options it was written with.

    `cuda_graph` (default: the build's `session_options.cuda_graph`, off unless set) asks the
    CUDA provider to capture decode steps as CUDA graphs; on a CPU session it changes nothing,
    and `model.cuda_graph` says whether the session really captures them."""
    folder = pathlib.Path(folder)
    config_path = folder / RUNTIME_CONFIG
    if not config_path.is_file() or not (folder / MODEL_FILE).is_file():
        raise InputError(
            f"{folder} is not an fdec build (no {RUNTIME_CONFIG})", "run fdec compile first"
        )
    config = read_build_json(config_path)
    options = config.get("session_options") or {}
    level = options.get("graph_optimization_level", "all")
    path = folder / config.get("model", MODEL_FILE)
    try:
        session = open_session(
            path,
            providers=config.get("providers"),
            optimization=level if level in OPT_LEVELS else "all",
            cuda_graph=bool(options.get("cuda_graph", False)) if cuda_graph is None else cuda_graph,
        )
    except FdecError:  # fdec's own (no ONNX Runtime installed): already one line
        raise
    except Exception as err:  # onnxruntime's own error types
        session = _emulated_on_cpu(path, err, folder)
    tokenizer = None
    if (folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    # How the build takes its KV cache ("shared": one buffer bound as past and present).
    kv_buffer = (config.get("kv_cache") or {}).get("buffer")
    # The cache policy (--kv-window / --kv-sink) the build was made with: generation honours it.
    kv_policy = (config.get("kv_cache") or {}).get("policy")
    model = OrtModel(
        session,
        kv_buffer=kv_buffer if kv_buffer in KV_BUFFERS else None,
        kv_policy=kv_policy if isinstance(kv_policy, dict) else None,
    )
    return LoadedBuild(folder, config, model, tokenizer)


def _emulated_on_cpu(path: pathlib.Path, err: Exception, folder: pathlib.Path) -> Any:
    """A bf16 GPU graph where only the CPU provider started: ONNX Runtime's CPU has no bf16
    kernels, so the graph runs with its bf16 rounding emulated in fp32 (the verification's
    form, fdec.runtime.check_forms), with one warning line. A model ONNX Runtime cannot load
    (a truncated weights file) is an InputError naming it."""
    from fdec.lower.cuda_kernels import cpu_unrunnable
    from fdec.runtime.check_forms import forms_needed, lighter_session_args

    low, fp4 = forms_needed(path)
    if fp4:  # no ONNX Runtime provider takes FP4: the check's exact FP4 form
        forms = lighter_session_args(path, emulate=low is not None)
        session = open_session(path, **{"optimization": "basic", **forms})
        session.fdec_provider_fallback = (
            "ONNX Runtime has no FP4 kernels: running this NVFP4 graph on the CPU in the form "
            "its verification uses (FP4 written out in standard ops; slow; for checking, not "
            "serving: the TensorRT engine serves it)"
        )
        logger.warning(session.fdec_provider_fallback)
        return session
    if cpu_unrunnable(err) is None or low != "bf16":
        first = " ".join(str(err).split())[:200] or type(err).__name__
        raise InputError(
            f"ONNX Runtime cannot load {path} ({first})",
            f"`fdec verify {folder}` names the files that changed; compile the build again",
        ) from None
    session = open_session(path, **lighter_session_args(path, emulate=True))
    session.fdec_provider_fallback = (
        "no GPU provider started and ONNX Runtime's CPU has no bf16 kernels: running this bf16 "
        "graph on the CPU with its bf16 rounding emulated in fp32 (slow; for checking, not "
        "serving)"
    )
    logger.warning(session.fdec_provider_fallback)
    return session


def run_prompt(
    build: LoadedBuild,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    chat_template: bool = True,
    stream: Callable[[str], None] | None = None,
    speculative: str | None = None,
    k: int = 4,
    draft_build: pathlib.Path | str | None = None,
    draft_min_probability: float = 0.0,
) -> dict[str, Any]:
    """Generate from `prompt`. `speculative` verifies up to `k` drafts per target step (greedy
    only, same tokens; fdec.runtime.speculative): "prompt-lookup" drafts n-grams of the
    context, "draft" drafts with the build in `draft_build` (default: the build's draft/),
    stopping at a token it gives less than `draft_min_probability`."""
    _check_sampling(max_new_tokens, temperature, top_k, top_p, draft_min_probability, seed)
    if speculative not in SPECULATIVE_METHODS:
        raise UsageError(
            f"unknown speculative method {speculative!r}",
            f"use one of {', '.join(m for m in SPECULATIVE_METHODS if m)}",
        )
    if (draft_build is not None or draft_min_probability) and speculative != "draft":
        raise UsageError(
            "a draft build (--draft-build, --draft-min-prob) is only used with --speculative draft",
            "add --speculative draft",
        )
    if speculative and temperature > 0:
        raise UsageError(
            "speculative decoding is greedy only (--temperature must be 0)",
            "drop --temperature or --speculative",
        )
    tokenizer = build.tokenizer
    if tokenizer is None:
        raise InputError(f"{build.folder} has no tokenizer", "compile from a model folder with one")
    if not build.model.is_decoder:
        encoded = tokenizer(prompt, return_tensors="np")
        outputs = build.model.encode(encoded["input_ids"], encoded["attention_mask"])
        hidden = outputs["last_hidden_state"]
        embedding = hidden.mean(axis=1)[0]
        if stream:
            stream(
                f"embedding: {embedding.shape[0]} dims, norm {float(np.linalg.norm(embedding)):.4f}"
            )
        return {
            "kind": "encoder",
            "embedding": embedding.tolist(),
            "new_tokens": 0,
            "decode_tokens_per_s": 0.0,
            "providers": build.model.providers,
        }
    ids = _prompt_ids(tokenizer, prompt, chat_template)
    if len(ids) == 0:  # GroupQueryAttention failed on a 0-token prefill (internal error)
        raise UsageError(
            "the prompt is empty (0 tokens)",
            "give text to continue, or keep the chat template (drop --no-chat-template)",
        )
    max_new_tokens, capped = _within_positions(build, len(ids), max_new_tokens)
    out = _TextStream(tokenizer, build.config, stream)

    draft = load_draft(build, draft_build) if speculative == "draft" else None
    if speculative:
        result = _speculate(
            build, draft, draft_min_probability, list(ids), max_new_tokens, k, out.stop, out.on_token,
        )  # fmt: skip
    else:
        result = generate(
            build.model,
            list(ids),
            max_new_tokens=max_new_tokens,
            sampling=Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
            stop_tokens=out.stop,
            on_token=out.on_token,
        )
    text = out.finish()
    spec_figures = (
        {
            "method": speculative,
            "k": k,
            "steps": result.steps,
            "drafted": result.drafted,
            "accepted": result.accepted,
            "acceptance_rate": round(result.acceptance_rate, 4),
            "tokens_per_step": round(result.tokens_per_step, 3),
            "draft_s": round(result.draft_s, 4),
            "target_s": round(result.target_s, 4),
            "draft_build": str(draft.folder) if draft else None,
            "draft_min_probability": draft_min_probability if draft else None,
        }
        if speculative
        else None
    )
    return {
        "kind": "decoder",
        "speculative": spec_figures,
        "prompt_tokens": result.prompt_tokens,
        "new_tokens": len(result.tokens),
        "text": text,
        "tokens": result.tokens,
        "prefill_s": round(result.prefill_s, 4),
        "decode_tokens_per_s": round(result.decode_tokens_per_s, 2),
        # Speculative runs never drop positions: their cache is the whole context.
        "max_cache_positions": getattr(
            result, "max_past_length", result.prompt_tokens + len(result.tokens) - 1
        ),
        "providers": build.model.providers,
        "cuda_graph": build.model.cuda_graph,
        # the model's positions, where prompt + --max-new-tokens would have gone past them
        "max_positions_reached": capped,
    }


def _check_sampling(
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    draft_min: float,
    seed: int = 0,
) -> None:
    """The ranges `fdec run`'s options have, for the API too (Build.run took -3 new tokens
    and gave one, and a negative temperature)."""
    for name, value, ok, want in (
        ("max_new_tokens", max_new_tokens, max_new_tokens >= 1, "1 or more"),
        (
            "temperature",
            temperature,
            math.isfinite(temperature) and temperature >= 0,
            "0 (greedy) or a finite number above it",
        ),
        ("seed", seed, seed >= 0, "0 or more"),
        ("top_k", top_k, top_k >= 0, "0 (off) or more"),
        ("top_p", top_p, 0 <= top_p <= 1, "in [0, 1]"),
        ("draft_min_probability", draft_min, 0 <= draft_min <= 1, "in [0, 1]"),
    ):
        if not ok:
            raise UsageError(f"{name} {value!r} is out of range", f"give {name} {want}")


def _within_positions(
    build: LoadedBuild, prompt: int, max_new_tokens: int
) -> tuple[int, int | None]:
    """--max-new-tokens cut to the positions the model has (its rotary table or position
    embeddings end there: ONNX Runtime failed past them with an internal error), and that
    limit where it cut; a prompt that fills them is refused."""
    limit = build.max_positions
    if not limit or prompt + max_new_tokens <= limit:
        return max_new_tokens, None
    if prompt >= limit:
        raise UsageError(
            f"the prompt is {prompt} tokens; {build.folder}'s model has {limit} positions",
            f"shorten the prompt to fewer than {limit} tokens",
        )
    return limit - prompt, limit


def _prompt_ids(tokenizer: Any, prompt: str, chat_template: bool) -> list[int]:
    if chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(prompt)["input_ids"])


def run_prompt_genai(
    folder: pathlib.Path | str,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    chat_template: bool = True,
    stream: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Greedy generation with onnxruntime-genai's generator on a build compiled with
    --emit genai (fdec.lower.genai); the prompt is tokenized as `run_prompt` does."""
    from fdec.lower.genai import generate_genai

    folder = pathlib.Path(folder)
    config_path = folder / RUNTIME_CONFIG
    if not config_path.is_file():
        raise InputError(
            f"{folder} is not an fdec build (no {RUNTIME_CONFIG})", "run fdec compile first"
        )
    config = read_build_json(config_path)
    if config.get("kind") != "decoder":
        raise UsageError(
            f"--engine genai generates text; {folder} is an encoder build", "drop --engine genai"
        )
    if not (folder / "tokenizer.json").is_file():
        raise InputError(f"{folder} has no tokenizer", "compile from a model folder with one")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = _prompt_ids(tokenizer, prompt, chat_template)
    out = _TextStream(tokenizer, config, stream)

    result = generate_genai(
        folder, ids, max_new_tokens=max_new_tokens, stop_tokens=out.stop, on_token=out.on_token
    )
    text = out.finish()
    return {
        "kind": "decoder",
        "engine": "genai",
        "speculative": None,
        "prompt_tokens": result["prompt_tokens"],
        "new_tokens": len(result["tokens"]),
        "text": text,
        "tokens": result["tokens"],
        "prefill_s": round(result["prefill_s"], 4),
        "decode_tokens_per_s": round(result["decode_tokens_per_s"], 2),
        "providers": ["onnxruntime-genai (CPU)"],
    }


class _TextStream:
    """Stop tokens of a build and the text of the tokens generated so far, streamed as it
    grows (never half a multi-byte character); stop tokens are not part of the text."""

    def __init__(
        self, tokenizer: Any, config: dict[str, Any], stream: Callable[[str], None] | None
    ):
        stop = set(config.get("eos_token_ids") or [])
        if tokenizer.eos_token_id is not None:
            stop.add(tokenizer.eos_token_id)
        self.stop = sorted(stop)
        self.tokenizer, self.stream = tokenizer, stream
        self.tokens: list[int] = []
        self.printed = ""

    def on_token(self, token: int) -> None:
        if token in self.stop:
            return
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.stream and text.startswith(self.printed) and not text.endswith("\ufffd"):
            self.stream(text[len(self.printed) :])
            self.printed = text

    def finish(self) -> str:
        """The whole text; streams what is left of it."""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.stream and len(text) > len(self.printed) and text.startswith(self.printed):
            self.stream(text[len(self.printed) :])
        return text


def load_draft(build: LoadedBuild, folder: pathlib.Path | str | None) -> LoadedBuild:
    """The draft build for `build` (default: its draft/ folder), checked to share its tokenizer."""
    folder = pathlib.Path(folder) if folder is not None else build.folder / DRAFT_FOLDER
    if folder in build.drafts:
        return build.drafts[folder]
    if not (folder / RUNTIME_CONFIG).is_file():
        raise UsageError(
            f"no draft build in {folder}",
            "compile the model with a draft beside it (fdec compile MODEL -o BUILD "
            "--draft layers=1/4) or pass --draft-build DIR",
        )
    draft = load_build(folder)
    if not draft.model.is_decoder or not draft.model.num_layers:
        raise UsageError(
            f"{folder} is not a decoder build with a KV cache", "pass a draft decoder build"
        )
    theirs = draft.tokenizer.get_vocab() if draft.tokenizer is not None else None
    if theirs is not None and theirs != build.tokenizer.get_vocab():
        raise UsageError(
            f"the draft build {folder} has another tokenizer than {build.folder}",
            "compile the draft from the same model (fdec compile MODEL -o BUILD --draft ...)",
        )
    build.drafts[folder] = draft
    return draft


def _speculate(
    build: LoadedBuild,
    draft: LoadedBuild | None,
    min_probability: float,
    ids: list[int],
    max_new_tokens: int,
    k: int,
    stop: list[int],
    on_token: Callable[[int], None],
) -> Any:
    from fdec.runtime.speculative import DraftModelDrafter, check_draft_model, generate_speculative

    try:
        drafter = None
        if draft:
            check_draft_model(build.model, draft.model)
            drafter = DraftModelDrafter(draft.model, stop_tokens=stop,
                                        min_probability=min_probability)  # fmt: skip
        return generate_speculative(
            build.model, ids, max_new_tokens=max_new_tokens, k=k, stop_tokens=stop,
            on_token=on_token, draft=drafter,
        )  # fmt: skip
    except ValueError as err:
        raise UsageError(f"cannot decode {build.folder} speculatively: {err}",
                         "run without --speculative") from None  # fmt: skip
