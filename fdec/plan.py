"""Capacity planner: weight, KV-cache and workspace bytes of a model on a target, and what fits.

Everything is computed from the model's config.json (no weights are loaded) and the target's
data file. The formulas, stated once here and in docs/design-notes.md:

- **Weights** follow what `fdec compile` writes. Float precisions (fp32/fp16/bf16) store every
  parameter at that width, tied embeddings once. Quantized precisions store every linear
  weight (the layers' projections and the lm_head, which fdec unties for quantization) at the
  precision plus its scales: int8/fp8 one scale per output channel, int4 one scale per block
  of 32 inputs (0.5 + 2/32 bytes per weight with fp16 scales), fp4 one fp8 scale per 16. The
  token-embedding table is stored int8 per row (`quantize-embedding`), except that int4
  for ONNX Runtime keeps a tied table tied and stores it once in int4; norms, biases and
  position tables stay in float. Scales and float tensors are 2 bytes on a GPU (fp16 engines)
  and 4 bytes on the cpu target (fdec's ONNX Runtime builds keep an fp32 graph).
- **KV cache** per token: 2 (key and value) × layers × KV heads × head dim × KV dtype bytes
  (fp32 4, fp16/bf16 2, fp8/int8 1; static per-head scales are negligible). Encoders (BERT)
  have no KV cache.
- **Activation workspace** for B sequences at context S: T × (2·hidden + q_dim + 2·kv_dim +
  2·intermediate) × activation bytes, the widest set of one layer's tensors alive at once
  (residual and normed input, q/k/v, gate and up), with T = max(B, min(PREFILL_CHUNK, S))
  tokens in flight (B decoding, or one prefill chunk), plus B × vocab × 4 bytes of fp32
  logits for the last position. Activation bytes: 4 for fp32, else 2 (fp8/int8 activations
  are GEMM inputs; outputs, residual and norms stay 16-bit). Encoders process all B × S
  tokens at once and materialise B × heads × S² attention scores.
- **Memory** is the target's `memory_gb` × 1e9 bytes; a cpu target (memory_gb = 0) uses this
  machine's total RAM. `headroom` (default 10 %) is kept back for the runtime, CUDA context
  and fragmentation. A batch × context fits when weights + B·S·KV + workspace ≤ the rest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Callable
from typing import Any

from fdec.errors import CapacityError, InputError, UsageError

__all__ = [
    "DEFAULT_CONTEXT_CAP",
    "DEFAULT_HEADROOM",
    "KV_DTYPES",
    "PREFILL_CHUNK",
    "WEIGHT_FORMATS",
    "CapacityPlan",
    "ModelShape",
    "WeightFormat",
    "check_capacity",
    "load_shape",
    "plan_capacity",
    "plan_targets",
    "render_table",
    "shape_from_config",
    "target_memory",
    "workspace_bytes",
]

DEFAULT_HEADROOM = 0.10  # share of memory kept back for the runtime and fragmentation
PREFILL_CHUNK = 512  # prompt tokens processed at once (chunked prefill)
DEFAULT_CONTEXT_CAP = 8192  # `fdec plan` default context: the model's positions, at most this
_GB = 1e9
_MB = 1e6
_SEARCH_LIMIT = 1 << 40  # upper bound for the sequence / context searches


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """How one weight precision is stored: bits per weight and its scales."""

    name: str
    bits: int
    block: int | None = None  # None: float (no scales); 0: one scale per output channel
    scale_bytes: int | None = None  # None: the target's float width (2 GPU, 4 cpu)

    @property
    def quantized(self) -> bool:
        return self.block is not None


WEIGHT_FORMATS: dict[str, WeightFormat] = {
    "fp32": WeightFormat("fp32", 32),
    "fp16": WeightFormat("fp16", 16),
    "bf16": WeightFormat("bf16", 16),
    "fp8": WeightFormat("fp8", 8, block=0),
    "int8": WeightFormat("int8", 8, block=0),
    "int4": WeightFormat("int4", 4, block=32),
    "fp4": WeightFormat("fp4", 4, block=16, scale_bytes=1),
}
KV_DTYPES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}
_ENCODER_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "deberta", "deberta-v2"}
)


# ---------------------------------------------------------------------------------------------
# The model's shape


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The sizes of a model that decide its memory, read from config.json."""

    name: str
    model_type: str
    kind: str  # "decoder" | "encoder"
    layout: str  # "llama" | "gpt2" | "bert": how the parameters are counted
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    type_vocab_size: int = 0
    notes: tuple[str, ...] = ()

    @property
    def is_decoder(self) -> bool:
        return self.kind == "decoder"

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_values_per_token(self) -> int:
        """2 × layers × KV heads × head dim (0 for an encoder)."""
        return 2 * self.num_layers * self.kv_dim if self.is_decoder else 0

    def linear_weights(self) -> list[tuple[int, int, int]]:
        """(inputs K, outputs N, count) of every matrix a quantizer packs, lm_head excluded."""
        h, i, layers = self.hidden_size, self.intermediate_size, self.num_layers
        if self.layout == "gpt2":
            per_layer = [(h, 3 * h), (h, h), (h, i), (i, h)]
        elif self.layout == "bert":
            per_layer = [(h, h), (h, h), (h, h), (h, h), (h, i), (i, h)]
        else:
            per_layer = [
                (h, self.q_dim), (h, self.kv_dim), (h, self.kv_dim), (self.q_dim, h),
                (h, i), (h, i), (i, h),
            ]  # fmt: skip
        matrices = [(k, n, layers) for k, n in per_layer]
        if self.layout == "bert":
            matrices.append((h, h, 1))  # pooler
        return matrices

    def other_parameters(self) -> int:
        """Norms, biases and position tables: the parameters that stay in float."""
        h, i, layers = self.hidden_size, self.intermediate_size, self.num_layers
        if self.layout == "gpt2":
            per_layer = 2 * h + 3 * h + h + 2 * h + i + h  # ln_1, qkv bias, o bias, ln_2, mlp
            return layers * per_layer + self.max_positions * h + 2 * h
        if self.layout == "bert":
            per_layer = 4 * h + 2 * h + i + h + 2 * h  # q/k/v/o biases, LN, mlp biases, LN
            tables = (self.max_positions + self.type_vocab_size) * h + 2 * h
            return layers * per_layer + tables + h  # + pooler bias
        per_layer = 2 * h  # input and post-attention norms
        if self.qkv_bias:
            per_layer += self.q_dim + 2 * self.kv_dim
        if self.o_bias:
            per_layer += h
        if self.mlp_bias:
            per_layer += 2 * i + h
        return layers * per_layer + h  # final norm

    def parameters(self) -> int:
        """Parameters of the model as Hugging Face counts them (tied embeddings once)."""
        linear = sum(k * n * count for k, n, count in self.linear_weights())
        embed = self.vocab_size * self.hidden_size
        lm_head = 0 if (self.tie_word_embeddings or not self.is_decoder) else embed
        return linear + embed + lm_head + self.other_parameters()

    def weight_bytes(self, fmt: WeightFormat, float_bytes: int, *, share_tied: bool = False) -> int:
        """Bytes of the weights stored in `fmt` (see the module's formulas). `share_tied`: a
        tied embedding is stored once, quantized like the lm_head that reads it."""
        if not fmt.quantized:
            return self.parameters() * fmt.bits // 8
        scale = fmt.scale_bytes or float_bytes
        matrices = list(self.linear_weights())
        if self.is_decoder:
            matrices.append((self.hidden_size, self.vocab_size, 1))  # lm_head
        total = 0
        for k, n, count in matrices:
            scales = n * (math.ceil(k / fmt.block) if fmt.block else 1)
            total += count * (math.ceil(k * n * fmt.bits / 8) + scales * scale)
        shared = share_tied and self.is_decoder and self.tie_word_embeddings
        embed = 0 if shared else self.vocab_size * (self.hidden_size + scale)  # int8 rows
        return total + embed + self.other_parameters() * float_bytes

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["notes"] = list(self.notes)
        data["parameters"] = self.parameters()
        data["kv_values_per_token"] = self.kv_values_per_token()
        return data


def _int(config: dict[str, Any], where: str, *names: str, default: int | None = None) -> int:
    for name in names:
        value = config.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(
                f"{where}: {name} must be a positive integer, got {value!r}",
                "fix config.json",
            )
        return value
    if default is not None:
        return default
    raise InputError(f"{where} has no {' or '.join(names)}", "fix config.json")


def shape_from_config(config: dict[str, Any], name: str, where: str = "config.json") -> ModelShape:
    """The ModelShape of an HF config (Llama/Mistral/Qwen2, GPT-2 and BERT names)."""
    if not isinstance(config, dict):
        raise InputError(f"{where} is not a JSON object", "fix config.json")
    if config.get("is_encoder_decoder"):
        raise InputError(
            f"{where} describes an encoder-decoder model ({config.get('model_type')!r})",
            "fdec plans decoder-only and encoder-only models",
        )
    model_type = str(config.get("model_type") or "")
    notes: list[str] = []
    if model_type == "gpt2":
        layout, kind = "gpt2", "decoder"
    elif model_type in _ENCODER_TYPES:
        layout, kind = "bert", "encoder"
        notes.append("encoder: no KV cache; parameters include the pooler")
    else:
        layout, kind = "llama", "decoder"
        if model_type not in ("llama", "mistral", "qwen2"):
            notes.append(
                f"model_type {model_type or 'unknown'!r}: parameters counted as a Llama-style "
                "block (q/k/v/o, gate/up/down, RMSNorm)"
            )
    hidden = _int(config, where, "hidden_size", "n_embd", "d_model")
    heads = _int(config, where, "num_attention_heads", "n_head")
    if layout == "llama" and hidden % heads and "head_dim" not in config:
        raise InputError(
            f"{where}: hidden_size {hidden} is not a multiple of {heads} heads and head_dim "
            "is not given",
            "add head_dim to config.json",
        )
    kv_heads = _int(config, where, "num_key_value_heads", default=heads)
    if heads % kv_heads:
        raise InputError(
            f"{where}: {heads} attention heads do not group into {kv_heads} KV heads",
            "fix num_key_value_heads",
        )
    default_inner = 4 * hidden if layout == "gpt2" else None
    return ModelShape(
        name=name,
        model_type=model_type,
        kind=kind,
        layout=layout,
        num_layers=_int(config, where, "num_hidden_layers", "n_layer"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=_int(config, where, "head_dim", default=hidden // heads),
        hidden_size=hidden,
        intermediate_size=_int(
            config, where, "intermediate_size", "n_inner", default=default_inner
        ),
        vocab_size=_int(config, where, "vocab_size"),
        max_positions=_int(config, where, "max_position_embeddings", "n_positions", default=0),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", layout == "gpt2")),
        qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias")),
        o_bias=bool(config.get("attention_bias")),
        mlp_bias=bool(config.get("mlp_bias")),
        type_vocab_size=_int(config, where, "type_vocab_size", default=2)
        if layout == "bert"
        else 0,
        notes=tuple(notes),
    )


_MAX_CONFIG_BYTES = 16 << 20


def _read_config(path: pathlib.Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            raise InputError(f"{path} is far too large for a config.json", "check the path")
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read {path} ({err})", "fix or re-download it") from None
    if not isinstance(config, dict):
        raise InputError(f"{path} is not a JSON object", "fix or re-download it")
    return config


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_config(repo_id: str, cache_dir: pathlib.Path) -> pathlib.Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover
        raise InputError(
            "reading a hub id needs huggingface_hub", "pip install huggingface_hub"
        ) from None
    try:
        return pathlib.Path(hf_hub_download(repo_id, "config.json", cache_dir=str(cache_dir)))
    except Exception as err:
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise InputError(
            f"cannot fetch config.json of {repo_id!r} from the Hugging Face Hub ({reason})",
            "check the id and the network, or pass a local config.json",
        ) from None


def load_shape(
    model: str,
    *,
    cache_dir: pathlib.Path | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> ModelShape:
    """The shape of MODEL: a folder holding config.json (weights not needed), a config.json
    path, a hub id (its config.json alone is fetched), or a bundled name / .gguf file
    (converted once by resolve_source, the same cached folder compile uses)."""
    path = pathlib.Path(model).expanduser()
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise InputError(
                f"{path} has no config.json",
                "give a model folder with its config.json (weights are not needed), a "
                "config.json path or a bundled name such as smollm2-135m",
            )
        return shape_from_config(_read_config(config_path), model, str(config_path))
    if path.is_file() and path.suffix.lower() == ".json":
        return shape_from_config(_read_config(path), model, str(path))
    from fdec.frontend.source import default_cache_dir, resolve_source

    if not path.exists() and _HUB_ID.match(model):  # only config.json, never the weights
        config_path = _hub_config(model, (cache_dir or default_cache_dir()) / "hub")
        return shape_from_config(_read_config(config_path), model, f"{model}/config.json")

    source = resolve_source(model, cache_dir=cache_dir, progress=progress)
    return shape_from_config(source.config, model, str(source.folder / "config.json"))


# ---------------------------------------------------------------------------------------------
# Targets' memory and recipes


def target_memory(target: Any) -> tuple[int, str]:
    """(bytes, where the figure comes from): the target's memory_gb, or this host's RAM."""
    if target.memory_gb:
        return int(target.memory_gb * _GB), f"{target.name} memory_gb = {target.memory_gb:g}"
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX
        total = 0
    if total <= 0:  # pragma: no cover
        raise InputError(
            f"target {target.name} declares no memory and this host's RAM cannot be read",
            "give a target file with memory_gb set",
        )
    return total, "the target declares no memory_gb: this host's total RAM"


def _precision(text: str, what: str) -> str:
    from fdec.targets import Precision

    base = text.strip().lower().split("-", 1)[0]
    if base in ("none", ""):
        return "fp32"
    try:
        precision = Precision.parse(base)
    except InputError as err:
        raise UsageError(f"{what} {text!r}: {err.problem}", err.fix) from None
    return "fp32" if precision.value == "tf32" else precision.value


def _float_bytes(target: Any) -> int:
    return 2 if target.is_gpu else 4


def _activation_bytes(target: Any) -> int:
    return 4 if _precision(target.default_recipe["activations"], "activations") == "fp32" else 2


# ---------------------------------------------------------------------------------------------
# The plan


@dataclasses.dataclass(frozen=True)
class CapacityPlan:
    """What `shape` needs on `target` at batch × context, and the limits that fit."""

    model: str
    target: str
    memory_bytes: int
    memory_source: str
    headroom: float
    weight_precision: str
    weight_precision_from: str
    kv_dtype: str
    kv_dtype_from: str
    activation_bytes: int
    parameters: int
    weight_bytes: int
    kv_bytes_per_token: int
    context: int
    batch: int
    kv_bytes_per_sequence: int
    workspace_bytes: int
    needed_bytes: int
    fits: bool
    max_sequences: int  # at `context`
    max_context: int  # at `batch`, by memory alone
    max_positions: int
    notes: tuple[str, ...] = ()

    @property
    def usable_bytes(self) -> int:
        return int(self.memory_bytes * (1.0 - self.headroom))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["usable_bytes"] = self.usable_bytes
        data["notes"] = list(self.notes)
        data["formulas"] = "see fdec/plan.py and docs/design-notes.md (Capacity planner)"
        return data


def workspace_bytes(shape: ModelShape, batch: int, context: int, activation_bytes: int) -> int:
    """Activation workspace for `batch` sequences at `context` (see the module's formulas)."""
    width = 2 * shape.hidden_size + shape.q_dim + 2 * shape.kv_dim + 2 * shape.intermediate_size
    if not shape.is_decoder:
        scores = batch * shape.num_heads * context * context * activation_bytes
        return batch * context * width * activation_bytes + scores
    tokens = max(batch, min(PREFILL_CHUNK, context))
    return tokens * width * activation_bytes + batch * shape.vocab_size * 4


def _largest(fits: Callable[[int], bool]) -> int:
    """The largest n ≥ 1 with fits(n) (fits is monotone decreasing), 0 if none."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while high < _SEARCH_LIMIT and fits(high):
        low, high = high, high * 2
    if high >= _SEARCH_LIMIT and fits(high):
        return high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def plan_capacity(
    shape: ModelShape,
    target: Any,
    *,
    weights: str | None = None,
    kv_dtype: str | None = None,
    context: int | None = None,
    batch: int = 1,
    headroom: float = DEFAULT_HEADROOM,
) -> CapacityPlan:
    """Plan `shape` on `target`. `weights` and `kv_dtype` default to the target's
    [default_recipe]; `context` to the model's positions (at most DEFAULT_CONTEXT_CAP)."""
    if batch < 1:
        raise UsageError(f"--batch must be at least 1, got {batch}", "pass --batch 1 or more")
    if not 0.0 <= headroom < 1.0:
        raise UsageError(
            f"--headroom must be at least 0 and below 1, got {headroom:g}", "pass e.g. 10%"
        )
    if context is None:
        context = min(shape.max_positions or DEFAULT_CONTEXT_CAP, DEFAULT_CONTEXT_CAP)
    if context < 1:
        raise UsageError(f"--context must be at least 1, got {context}", "pass --context 1 or more")
    recipe = target.default_recipe
    weight_from = "--quantize" if weights else f"{target.name} default_recipe.weights"
    weight_name = _precision(weights or recipe["weights"], "weight precision")
    if shape.kind == "encoder" and not weights and "encoder_weights" in recipe:
        weight_from = f"{target.name} default_recipe.encoder_weights"
        weight_name = _precision(recipe["encoder_weights"], "weight precision")
    kv_from = "--kv-dtype" if kv_dtype else f"{target.name} default_recipe.kv_cache"
    kv_name = _precision(kv_dtype or recipe["kv_cache"], "KV-cache dtype")
    if kv_name not in KV_DTYPES:
        raise UsageError(
            f"KV-cache dtype {kv_name} is not supported", f"use one of: {', '.join(KV_DTYPES)}"
        )
    target.require(weight_name)  # e.g. fp8 on an a100: InputError naming the alternatives
    if shape.is_decoder:
        target.require(kv_name)
    fmt = WEIGHT_FORMATS[weight_name]
    memory, memory_source = target_memory(target)
    usable = int(memory * (1.0 - headroom))
    act = _activation_bytes(target)
    # fdec's int4 for ONNX Runtime keeps a tied table tied (MatMulNBits + GatherBlockQuantized).
    share = weight_name == "int4" and target.default_backend == "onnxruntime"
    weight_total = shape.weight_bytes(fmt, _float_bytes(target), share_tied=share)
    kv_token = shape.kv_values_per_token() * KV_DTYPES[kv_name]

    def need(b: int, s: int) -> int:
        return weight_total + b * s * kv_token + workspace_bytes(shape, b, s, act)

    notes = list(shape.notes)
    if not shape.is_decoder:
        notes.append("no KV cache (encoder): limits come from weights and activations")
    if fmt.quantized and shape.is_decoder and shape.tie_word_embeddings:
        notes.append(
            "tied embedding: one int4 table for lm_head and embedding (ONNX Runtime int4)"
            if share
            else "tied lm_head stored separately, quantized (fdec unties it to quantize)"
        )
    if shape.max_positions and context > shape.max_positions:
        notes.append(f"context {context} exceeds the model's {shape.max_positions} positions")
    max_context = _largest(lambda s: need(batch, s) <= usable)
    needed = need(batch, context)
    return CapacityPlan(
        model=shape.name,
        target=target.name,
        memory_bytes=memory,
        memory_source=memory_source,
        headroom=headroom,
        weight_precision=weight_name,
        weight_precision_from=weight_from,
        kv_dtype=kv_name if shape.is_decoder else "none",
        kv_dtype_from=kv_from if shape.is_decoder else "encoder: no KV cache",
        activation_bytes=act,
        parameters=shape.parameters(),
        weight_bytes=weight_total,
        kv_bytes_per_token=kv_token,
        context=context,
        batch=batch,
        kv_bytes_per_sequence=kv_token * context,
        workspace_bytes=workspace_bytes(shape, batch, context, act),
        needed_bytes=needed,
        fits=needed <= usable,
        max_sequences=_largest(lambda b: need(b, context) <= usable),
        max_context=max_context,
        max_positions=shape.max_positions,
        notes=tuple(notes),
    )


def check_capacity(
    config: dict[str, Any],
    target: Any,
    *,
    model: str,
    weights: str | None,
    kv_dtype: str | None = None,
    batch: int,
    context: int | None,
    default_context: int,
) -> CapacityPlan:
    """`fdec compile`'s early check: the plan for --max-batch × --max-seq-len, or a
    CapacityError (exit 4) with the numbers when it cannot fit the target's memory."""
    shape = shape_from_config(config, model)
    if context is None:
        context = min(default_context, shape.max_positions or default_context)
    plan = plan_capacity(
        shape, target, weights=weights, kv_dtype=kv_dtype, context=context, batch=batch
    )
    if plan.fits:
        return plan
    limits = []
    if plan.max_sequences:
        limits.append(f"--max-batch {plan.max_sequences}")
    if plan.max_context:
        limits.append(f"--max-seq-len {plan.max_context}")
    fix = (
        f"lower to {' or '.join(limits)}" if limits else "quantize further (--quantize int4)"
    ) + f", or use a larger target (fdec plan {model} --target all)"
    raise CapacityError(
        f"{model} at --max-batch {batch} × --max-seq-len {context} does not fit {target.name}: "
        f"needs {_gb(plan.needed_bytes)} (weights {_gb(plan.weight_bytes)} "
        f"{plan.weight_precision} + KV {_gb(batch * plan.kv_bytes_per_sequence)} "
        f"{plan.kv_dtype} + workspace {_gb(plan.workspace_bytes)}), "
        f"{_gb(plan.usable_bytes)} available ({_gb(plan.memory_bytes)} less "
        f"{plan.headroom:.0%} headroom)",
        fix,
    )


def _gb(n: int) -> str:
    """A byte count for a message: GB, MB or KB (decimal), three significant digits or more."""
    for unit, size in (("GB", _GB), ("MB", _MB), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:,.{max(0, 2 - int(math.log10(n / size)))}f} {unit}"
    return f"{n} bytes"


def plan_targets(shape: ModelShape, targets: list[Any], **options: Any) -> list[dict[str, Any]]:
    """One plan per target, as dicts; a target lacking the asked precision gets an error row."""
    rows: list[dict[str, Any]] = []
    for target in targets:
        try:
            rows.append(plan_capacity(shape, target, **options).to_dict())
        except InputError as err:  # e.g. --quantize fp8 on an a100
            rows.append({"target": target.name, "error": err.one_line()})
    return rows


def render_table(shape: ModelShape, rows: list[dict[str, Any]]) -> str:
    """The terminal form of `plan_targets`: a header, one line per target, then notes."""
    planned = [row for row in rows if "error" not in row]
    first = planned[0] if planned else {}
    batch, context = first.get("batch", 1), first.get("context", 0)
    lines = [
        f"{shape.name}: {shape.model_type or shape.layout} {shape.kind}, {shape.num_layers} "
        f"layers, {shape.num_heads} heads / {shape.num_kv_heads} KV heads × {shape.head_dim}, "
        f"hidden {shape.hidden_size}, {shape.parameters() / 1e6:,.1f} M parameters, "
        f"{shape.max_positions or '?'} positions",
        f"batch {batch} × context {context}; {first.get('headroom', DEFAULT_HEADROOM):.0%} of "
        "memory kept back; GB = 1e9 bytes, MB = 1e6",
    ]
    header = (
        "target", "usable GB", "weights", "GB", "KV", "MB/token", f"GB/seq@{context}",
        "workspace GB", f"max seqs@{context}", f"max ctx@{batch}", f"{batch}×{context}",
    )  # fmt: skip
    table: list[tuple[str, ...]] = [header]
    notes: list[str] = []
    capped = False
    for row in rows:
        if "error" in row:
            table.append((row["target"], "-", "-", "-", "-", "-", "-", "-", "-", "-", "n/a"))
            notes.append(f"{row['target']}: {row['error']}")
            continue
        max_ctx = row["max_context"]
        limit = row["max_positions"]
        shown = f"{max_ctx:,}"
        if limit and max_ctx > limit:
            shown, capped = f"{max_ctx:,}*", True
        kv = "-" if not row["kv_bytes_per_token"] else row["kv_dtype"]
        table.append(
            (
                row["target"],
                f"{row['usable_bytes'] / _GB:.1f}",
                row["weight_precision"],
                f"{row['weight_bytes'] / _GB:.3f}",
                kv,
                f"{row['kv_bytes_per_token'] / _MB:.4f}",
                f"{row['kv_bytes_per_sequence'] / _GB:.3f}",
                f"{row['workspace_bytes'] / _GB:.3f}",
                f"{row['max_sequences']:,}",
                shown,
                "fits" if row["fits"] else "DOES NOT FIT",
            )
        )
        if not row["memory_source"].endswith(f"memory_gb = {row['memory_bytes'] / _GB:g}"):
            notes.append(
                f"{row['target']}: {row['memory_source']} ({row['memory_bytes'] / _GB:.1f} GB)"
            )
        notes.extend(note for note in row["notes"] if note not in notes)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        cells = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    if capped:
        notes.append(f"* memory alone; beyond the model's {shape.max_positions:,} positions")
    lines.extend(f"note: {note}" for note in notes)
    return "\n".join(lines)
