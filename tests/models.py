"""Tiny random HF models written to a folder from a config, with a real trained tokenizer."""

from __future__ import annotations

import json
import pathlib

__all__ = [
    "FAMILY_CONFIGS",
    "TOKENIZER_VOCAB",
    "make_tiny_model",
    "transformers_greedy",
    "transformers_padded_greedy",
]

TOKENIZER_VOCAB = 320
_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog while the lighthouse keeper climbs the stairs.",
    "def add(a, b):\n    return a + b  # numbers 0123456789 and symbols +-*/=<>",
    "User: how are you today?\nAssistant: I am well, thank you for asking!",
    "Ships relied on the slow sweep of light to find the channel between the rocks.",
]

FAMILY_CONFIGS = {
    "llama": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5,
    },
    "qwen2": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": False,
    },
    "mistral": {
        "model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 1, "max_position_embeddings": 256, "tie_word_embeddings": False,
        "sliding_window": None,
    },
    # Qwen3: per-head RMSNorm on q and k; Gemma: scaled embeddings, (1 + w) norms, tanh gelu
    "qwen3": {
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "head_dim": 16, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    },
    "gemma": {
        "model_type": "gemma", "architectures": ["GemmaForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "head_dim": 16, "num_key_value_heads": 1, "max_position_embeddings": 256,
    },
    # OLMo 2: q/k RMSNorm over all heads, norms after attention and MLP; StableLM: LayerNorm
    # with bias and a quarter of each head rotated
    "olmo2": {
        "model_type": "olmo2", "architectures": ["Olmo2ForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": False,
    },
    "stablelm": {
        "model_type": "stablelm", "architectures": ["StableLmForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "partial_rotary_factor": 0.25,
    },
    # Granite: attention scale 1/64 (not 1/√16), embedding, residual and logits multipliers
    "granite": {
        "model_type": "granite", "architectures": ["GraniteForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "attention_multiplier": 1 / 64,
        "embedding_multiplier": 12.0, "residual_multiplier": 0.22, "logits_scaling": 8.0,
    },
    # Gemma 2: an 8-position window on alternate layers, attention logits soft-capped, the
    # query scaled by query_pre_attn_scalar; Gemma 3: q/k norms and a rotary base per layer kind
    "gemma2": {
        "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "head_dim": 16, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "sliding_window": 8, "query_pre_attn_scalar": 32, "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    },
    "gemma3_text": {
        "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "head_dim": 16, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "sliding_window": 8, "query_pre_attn_scalar": 32, "rope_local_base_freq": 10000.0,
        "rope_theta": 1000000.0, "layer_types": ["sliding_attention", "full_attention"] * 2,
    },
    # Phi-3: q/k/v packed in qkv_proj, gate/up in gate_up_proj; its own sliding window
    "phi3": {
        "model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": False,
        "sliding_window": 48,
    },
    # A sweep of transformers' model types on the Llama path (fdec.frontend.families): four
    # layers, head size 16, two key/value heads, each model's own traits written out
    **{
        model_type: {
            "model_type": model_type, "architectures": [architecture], "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
            "head_dim": 16, "num_key_value_heads": 2, "max_position_embeddings": 256, **traits,
        }
        for model_type, architecture, traits in (
            # no rotary on every 4th layer; EXAONE 4: none on its global layers, a window on the
            # other three, norms after attention and MLP
            ("smollm3", "SmolLM3ForCausalLM", {"no_rope_layers": [1, 1, 1, 0]}),
            ("exaone4", "Exaone4ForCausalLM", {"sliding_window": 8}),
            ("olmo", "OlmoForCausalLM", {}),
            ("olmo3", "Olmo3ForCausalLM", {"sliding_window": 8}),
            ("ministral", "MinistralForCausalLM", {
                "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"] * 2,
            }),
            ("seed_oss", "SeedOssForCausalLM", {}),
            ("apertus", "ApertusForCausalLM", {}),  # up and down only, xIELU
            ("arcee", "ArceeForCausalLM", {}),  # up and down only, ReLU²
            ("helium", "HeliumForCausalLM", {}),  # interleaved rotary
            ("ernie4_5", "Ernie4_5ForCausalLM", {}),
            ("cohere", "CohereForCausalLM", {}),
            ("glm", "GlmForCausalLM", {}),  # partial interleaved rotary, packed gate_up
            ("glm4", "Glm4ForCausalLM", {}),
            ("hunyuan_v1_dense", "HunYuanDenseV1ForCausalLM", {}),  # q/k norms after rotary
            ("nemotron", "NemotronForCausalLM", {}),  # partial rotary, LayerNorm + 1
            ("vaultgemma", "VaultGemmaForCausalLM", {"sliding_window": 8}),
            ("starcoder2", "Starcoder2ForCausalLM", {}),  # LayerNorm with bias, c_fc / c_proj
        )
    },
    "gpt2": {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_layer": 2,
        "n_head": 4, "n_positions": 256,
    },
    "bert": {
        "model_type": "bert", "architectures": ["BertModel"], "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
        "max_position_embeddings": 256,
    },
}  # fmt: skip


def _write_tokenizer(folder: pathlib.Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TRAINING_TEXT, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    fast.save_pretrained(folder)


def make_tiny_model(
    folder: pathlib.Path, family: str, *, seed: int = 0, tokenizer: bool = True, **overrides
) -> pathlib.Path:
    """Write a random `family` model (config.json + model.safetensors [+ tokenizer]) to folder."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = dict(FAMILY_CONFIGS[family], vocab_size=TOKENIZER_VOCAB, **overrides)
    data.update(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    config = AutoConfig.for_model(**data)
    torch.manual_seed(seed)
    auto = AutoModel if family == "bert" else AutoModelForCausalLM
    model = auto.from_config(config).eval()
    # Random init gives near-uniform logits; widen them so greedy decoding has clear winners.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(4.0)
    model.save_pretrained(folder)
    if tokenizer:
        _write_tokenizer(folder)
    # Keep the config as the user wrote it, so tests see a realistic folder.
    json.loads((folder / "config.json").read_text())
    return folder


def transformers_greedy(model_dir, prompt, steps):
    """transformers' greedy tokens after `prompt` (up to the tokenizer's eos), as fdec run's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model.generate(
            ids, max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, ids.shape[1] :].tolist()
    stop = tokenizer.eos_token_id
    return expected[: expected.index(stop) + 1] if stop in expected else expected


def transformers_padded_greedy(model_dir, rows, steps):
    """transformers' greedy tokens for token-id rows decoded as one left-padded batch (pad 0)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    width = max(len(row) for row in rows)
    ids = torch.tensor([[0] * (width - len(row)) + list(row) for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    return out[:, width:].tolist()


def compressed_tensors_checkpoint(source, folder, preset, quantization_format, fill):
    """`source` quantized by the compressed-tensors library itself to `preset` ("NVFP4",
    "FP8_DYNAMIC", ...) and saved in `quantization_format` into `folder`, the lm_head left in
    float: `fill(module, scheme)` sets each quantized module's scales first (round to nearest
    on them: what llm-compressor writes without GPTQ)."""
    import shutil

    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    scheme = preset_name_to_scheme(preset, ["Linear"])
    apply_quantization_config(
        model, QuantizationConfig(config_groups={"g": scheme}, ignore=["lm_head"])
    )
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            fill(module, scheme)
    compressor = ModelCompressor.from_pretrained_model(
        model, quantization_format=quantization_format
    )
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(folder)
    for path in source.glob("tokenizer*"):
        shutil.copyfile(path, folder / path.name)
    return folder
