"""Model families fdec imports: how to read their HF config and which weight plays which role."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from fdec.errors import InputError
from fdec.ir.spec import ModelSpec

__all__ = [
    "FAMILIES",
    "Family",
    "build_spec",
    "family_for_config",
    "prunable_model_types",
    "rotary_restart",
    "sliding_window",
    "supported_model_types",
]


@dataclasses.dataclass(frozen=True)
class Family:
    """A family of HF architectures that share one export path and one weight layout."""

    name: str
    kind: str  # "decoder" | "encoder"
    model_types: tuple[str, ...]
    weight_patterns: tuple[tuple[str, str], ...]  # (regex over HF parameter names, role)
    # layers the prune pass slices: q, k, v, o, gate, up and down weights of their own
    prunable: bool = False

    def role_of(self, parameter: str) -> str | None:
        for pattern, role in self.weight_patterns:
            match = re.fullmatch(pattern, parameter)
            if match:
                return role.format(*match.groups())
        return None


# Qwen3 (per-head q/k RMSNorm) and Gemma (scaled embeddings, (1 + w) norms) share Llama's
# weight names and fuse the same way (tests/test_compile.py).
_LLAMA = Family(
    name="llama",
    kind="decoder",
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma"),
    weight_patterns=(
        (r"model\.embed_tokens\.weight", "embed"),
        (r"lm_head\.weight", "lm_head"),
        (r"model\.layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.weight", "layers.{0}.{1}"),
        (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", "layers.{0}.{1}"),
    ),
    prunable=True,
)
# Llama's weight names in layers the prune pass cannot slice: OLMo 2 (q/k RMSNorm over all
# heads together, norms after attention and MLP), StableLM (LayerNorm with bias, partial
# rotary; fused to MultiHeadAttention + RotaryEmbedding), Granite (its residual multiplier
# sits between a layer's output projection and the residual add, where layer pruning looks),
# Gemma 2 (soft-capped attention logits: the attention stays traced) and Gemma 3 (a rotary
# base per layer kind), both with norms after attention and MLP and a window on some layers
# (fdec.passes.kv_cache.ModelWindow). Then the architectures a sweep of transformers' model
# types found exporting and matching transformers' greedy tokens through this path
# (tests/test_compile.py): SmolLM3 and EXAONE 4 (layers with no rotary: GroupQueryAttention
# without one), OLMo 1 and 3, Ministral, Seed-OSS, Apertus and Arcee (an MLP of up and down
# only), Helium, ERNIE 4.5, Cohere and GLM (interleaved rotary), Hunyuan (q/k norms after the
# rotary), Nemotron (partial rotary, LayerNorm + 1), VaultGemma, StarCoder2 (a GELU MLP of
# c_fc / c_proj, read as up / down) and GLM's packed gate_up.
_LLAMA_NAMES = dataclasses.replace(
    _LLAMA,
    name="llama-names",
    model_types=(
        "olmo2", "stablelm", "granite", "gemma2", "gemma3_text", "smollm3", "exaone4", "olmo",
        "olmo3", "ministral", "seed_oss", "apertus", "arcee", "helium", "ernie4_5", "cohere",
        "glm", "glm4", "hunyuan_v1_dense", "nemotron", "vaultgemma", "starcoder2",
    ),
    weight_patterns=(
        *_LLAMA.weight_patterns,
        (r"model\.layers\.(\d+)\.mlp\.gate_up_proj\.weight", "layers.{0}.gate_up"),
        (r"model\.layers\.(\d+)\.mlp\.c_fc\.weight", "layers.{0}.up"),
        (r"model\.layers\.(\d+)\.mlp\.c_proj\.weight", "layers.{0}.down"),
    ),
    prunable=False,
)  # fmt: skip
# Phi-3/3.5/4-mini: Llama's layout with q/k/v packed in one qkv_proj and gate/up in one
# gate_up_proj (so the prune pass, which slices them apart, does not take it).
_PHI3 = Family(
    name="phi3",
    kind="decoder",
    model_types=("phi3",),
    weight_patterns=(
        (r"model\.embed_tokens\.weight", "embed"),
        (r"lm_head\.weight", "lm_head"),
        (r"model\.layers\.(\d+)\.self_attn\.qkv_proj\.weight", "layers.{0}.qkv"),
        (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "layers.{0}.o"),
        (r"model\.layers\.(\d+)\.mlp\.gate_up_proj\.weight", "layers.{0}.gate_up"),
        (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "layers.{0}.down"),
    ),
)
_GPT2 = Family(
    name="gpt2",
    kind="decoder",
    model_types=("gpt2",),
    weight_patterns=(
        (r"transformer\.wte\.weight", "embed"),
        (r"lm_head\.weight", "lm_head"),
        (r"transformer\.h\.(\d+)\.attn\.c_attn\.weight", "layers.{0}.qkv"),
        (r"transformer\.h\.(\d+)\.attn\.c_proj\.weight", "layers.{0}.o"),
        (r"transformer\.h\.(\d+)\.mlp\.c_fc\.weight", "layers.{0}.fc_in"),
        (r"transformer\.h\.(\d+)\.mlp\.c_proj\.weight", "layers.{0}.fc_out"),
    ),
)
_BERT = Family(
    name="bert",
    kind="encoder",
    model_types=("bert", "roberta"),
    weight_patterns=(
        (r"embeddings\.word_embeddings\.weight", "embed"),
        (r"encoder\.layer\.(\d+)\.attention\.self\.query\.weight", "layers.{0}.q"),
        (r"encoder\.layer\.(\d+)\.attention\.self\.key\.weight", "layers.{0}.k"),
        (r"encoder\.layer\.(\d+)\.attention\.self\.value\.weight", "layers.{0}.v"),
        (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.weight", "layers.{0}.o"),
        (r"encoder\.layer\.(\d+)\.intermediate\.dense\.weight", "layers.{0}.fc_in"),
        (r"encoder\.layer\.(\d+)\.output\.dense\.weight", "layers.{0}.fc_out"),
    ),
)

FAMILIES: tuple[Family, ...] = (_LLAMA, _LLAMA_NAMES, _PHI3, _GPT2, _BERT)


def supported_model_types() -> list[str]:
    return sorted(t for family in FAMILIES for t in family.model_types)


def prunable_model_types() -> list[str]:
    """The model types whose layers the prune pass slices (Family.prunable)."""
    return [t for family in FAMILIES if family.prunable for t in family.model_types]


def family_for_config(config: dict[str, Any], where: str) -> Family:
    """The family of an HF config.json, or an InputError naming the supported ones."""
    model_type = config.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    architectures = ", ".join(config.get("architectures") or []) or "no architectures listed"
    raise InputError(
        f"unsupported architecture in {where}: model_type {model_type!r} ({architectures})",
        f"fdec imports these model types: {', '.join(supported_model_types())}",
    )


def sliding_window(hf_config: Any) -> tuple[int, tuple[int, ...] | None] | None:
    """The model's own sliding window (transformers' `sliding_window`: the keys each query
    attends to, itself included) and the layers it is on (None: every layer; Gemma 2/3 and
    Qwen2's `max_window_layers` window some layers only), or None where every layer attends
    to every position: no window, or one at least as wide as the model's positions."""
    window = getattr(hf_config, "sliding_window", None)
    if not window:
        return None
    layers = _get(hf_config, "num_hidden_layers", default=0)
    types = getattr(hf_config, "layer_types", None) or ["sliding_attention"] * layers
    sliding = tuple(i for i, kind in enumerate(types) if kind == "sliding_attention")
    if not sliding:
        return None
    positions = _get(hf_config, "max_position_embeddings", "n_positions", default=0)
    if positions and window >= positions:
        return None
    return int(window), None if len(sliding) == len(types) else sliding


def rotary_restart(hf_config: Any) -> int:
    """Positions after which generation recomputes the KV cache once (0: never).

    A longrope model (Phi-3.5, Phi-4-mini) takes its short rotary factors while the sequence
    is within original_max_position_embeddings and the long ones past it, a switch the graph
    makes itself (the traced `torch.where` on the sequence's length). Keys already cached keep
    the short factors unless the cache is recomputed; transformers' Phi-3 `generate` does so
    once, when the sequence first grows past those positions (Phi3ForCausalLM's
    prepare_inputs_for_generation), and fdec's generation does the same."""
    if _get(hf_config, "model_type") != "phi3":
        return 0
    rope = _get(hf_config, "rope_parameters", "rope_scaling", default=None) or {}
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type")) != "longrope":
        return 0
    original = rope.get("original_max_position_embeddings") or _get(
        hf_config, "original_max_position_embeddings", default=0
    )
    positions = _get(hf_config, "max_position_embeddings", default=0)
    return int(original) if original and original < positions else 0


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def build_spec(
    family: Family,
    hf_config: Any,
    parameter_aliases: dict[str, list[str]],
    initializer_names: set[str],
    inputs: list[str],
    outputs: list[str],
) -> ModelSpec:
    """ModelSpec from a loaded HF config and the exported graph's initializer names.

    `parameter_aliases` maps each HF parameter name to all names sharing its storage (tied
    weights), so a role is found whichever alias the exporter kept.
    """
    hidden = _get(hf_config, "hidden_size", "n_embd")
    heads = _get(hf_config, "num_attention_heads", "n_head")
    kv_heads = _get(hf_config, "num_key_value_heads", default=heads)
    head_dim = _get(hf_config, "head_dim", default=hidden // heads)
    intermediate = _get(hf_config, "intermediate_size", "n_inner", default=4 * hidden)
    weights: dict[str, str] = {}
    for parameter, aliases in parameter_aliases.items():
        role = family.role_of(parameter)
        if role is None:
            continue
        present = [name for name in [parameter, *aliases] if name in initializer_names]
        if present:
            weights[role] = present[0]
    tied = weights.get("embed") is not None and weights.get("embed") == weights.get("lm_head")
    return ModelSpec(
        family=family.name,
        architecture=(_get(hf_config, "architectures", default=[None]) or [None])[0]
        or type(hf_config).__name__,
        kind=family.kind,
        num_layers=_get(hf_config, "num_hidden_layers", "n_layer"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        intermediate_size=intermediate,
        vocab_size=hf_config.vocab_size,
        max_positions=_get(hf_config, "max_position_embeddings", "n_positions", default=0),
        tie_word_embeddings=tied,
        rotary_restart=rotary_restart(hf_config),
        weights=weights,
        inputs=list(inputs),
        outputs=list(outputs),
    )
