"""A model's shape for the planner: the sizes that decide its memory, read from config.json."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from collections.abc import Callable
from typing import Any

from fdec.errors import InputError
from fdec.frontend.fp8_checkpoint import with_modelopt
from fdec.frontend.prequantized import source_quantization

__all__ = [
    "INT8_WEIGHT_ONLY",
    "KV_DTYPES",
    "WEIGHT_FORMATS",
    "ModelShape",
    "WeightFormat",
    "load_shape",
    "shape_from_config",
]

_GB = 1e9


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
# --quantize int8-wo (and an 8-bit source): 8-bit blocks of 32 along the inputs, not channels
INT8_WEIGHT_ONLY = WeightFormat("int8", 8, block=32)
KV_DTYPES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}
_ENCODER_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "deberta", "deberta-v2"}
)
# Llama-layout types whose MLP is up and down only, with no gate (ReLU², xIELU, GELU)
_UNGATED_MLP_TYPES = frozenset(("arcee", "apertus", "nemotron", "starcoder2"))


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
    gated_mlp: bool = True  # gate, up and down (False: up and down)
    type_vocab_size: int = 0
    notes: tuple[str, ...] = ()
    # "gptq int4" etc.: a checkpoint another tool quantized, which compiles to its own width
    # (int4, int8 weight-only; NVFP4 and FP8 where the target runs them) by default
    # (fdec.frontend.prequantized.source_recipe of (source_method, source_bits))
    source_quantization: str = ""
    source_method: str = ""
    source_bits: int = 0

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
                *[(h, i)] * (2 if self.gated_mlp else 1), (i, h),
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
            per_layer += (2 if self.gated_mlp else 1) * i + h
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
            mlp = "gate/up/down" if model_type not in _UNGATED_MLP_TYPES else "up/down"
            notes.append(
                f"model_type {model_type or 'unknown'!r}: parameters counted as a Llama-style "
                f"block (q/k/v/o, {mlp}; its norms as two RMSNorms)"
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
    every_bias = bool(config.get("use_bias"))  # StarCoder2: a bias on every linear layer
    attention_bias = bool(config.get("attention_bias")) or every_bias
    method, bits = source_quantization(config) or ("", 0)
    described = method if method in ("nvfp4", "fp8") else f"{method} int{bits}" if method else ""
    return ModelShape(
        source_quantization=described,
        source_method=method,
        source_bits=bits,
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
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(config.get("mlp_bias") or every_bias),
        gated_mlp=model_type not in _UNGATED_MLP_TYPES,
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
        config = with_modelopt(_read_config(config_path), path)  # hf_quant_config.json
        return shape_from_config(config, model, str(config_path))
    if path.is_file() and path.suffix.lower() == ".json":
        return shape_from_config(_read_config(path), model, str(path))
    from fdec.frontend.source import default_cache_dir, resolve_source

    if not path.exists() and _HUB_ID.match(model):  # only config.json, never the weights
        config_path = _hub_config(model, (cache_dir or default_cache_dir()) / "hub")
        return shape_from_config(_read_config(config_path), model, f"{model}/config.json")

    source = resolve_source(model, cache_dir=cache_dir, progress=progress)
    return shape_from_config(source.config, model, str(source.folder / "config.json"))
