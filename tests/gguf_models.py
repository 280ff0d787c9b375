"""A tiny random Llama-architecture GGUF file (F32 tensors) with a real byte-level BPE tokenizer."""

from __future__ import annotations

import pathlib

__all__ = ["GGUF_SHAPE", "make_tiny_gguf"]

# hidden 64, 2 layers, 4 heads of 16, 2 KV heads: the same shape as the tiny llama folder model.
GGUF_SHAPE = {
    "hidden": 64,
    "layers": 2,
    "heads": 4,
    "kv_heads": 2,
    "ffn": 128,
    "context": 256,
    "vocab_target": 300,
}
_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog while the lighthouse keeper climbs the stairs.",
    "def add(a, b):\n    return a + b  # numbers 0123456789 and symbols +-*/=<>",
    "User: how are you today?\nAssistant: I am well, thank you for asking!",
    "Ships relied on the slow sweep of light to find the channel between the rocks.",
]
_EOS = "<|endoftext|>"


def _train_tokenizer() -> tuple[list[str], list[str]]:
    """A small byte-level BPE: (tokens in id order, merges as "a b" strings)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=GGUF_SHAPE["vocab_target"],
        special_tokens=[_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TRAINING_TEXT, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    assert [vocab[token] for token in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def _gguf_permute(weight, n_head: int):
    """llama.cpp's convert_hf_to_gguf q/k row permutation (transformers undoes it on load)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def make_tiny_gguf(path, *, seed: int = 0, name: str = "tiny-llama") -> pathlib.Path:
    """Write a random 2-layer Llama GGUF file (F32, untied output) to `path`; return the path.

    Weights are laid out as llama.cpp's converter writes them: the HF-shaped (out, in) matrices,
    with the q/k rows permuted into GGUF's rotary order. Loaded back through transformers, the
    model is a plain LlamaForCausalLM with the vocabulary of the embedded tokenizer.
    """
    import gguf
    import numpy as np

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens, merges = _train_tokenizer()
    vocab = len(tokens)
    eos = tokens.index(_EOS)
    hidden, heads, kv_heads = GGUF_SHAPE["hidden"], GGUF_SHAPE["heads"], GGUF_SHAPE["kv_heads"]
    head_dim = hidden // heads
    ffn = GGUF_SHAPE["ffn"]
    rng = np.random.default_rng(seed)

    def matrix(rows: int, cols: int, std: float = 0.25) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * std).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(GGUF_SHAPE["context"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(GGUF_SHAPE["layers"])
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    token_types = [
        gguf.TokenType.CONTROL if token == _EOS else gguf.TokenType.NORMAL for token in tokens
    ]
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    writer.add_pad_token_id(eos)
    writer.add_add_bos_token(False)

    writer.add_tensor("token_embd.weight", matrix(vocab, hidden, 1.0))
    for layer in range(GGUF_SHAPE["layers"]):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", norm())
        q = matrix(heads * head_dim, hidden)
        k = matrix(kv_heads * head_dim, hidden)
        writer.add_tensor(f"{prefix}.attn_q.weight", _gguf_permute(q, heads))
        writer.add_tensor(f"{prefix}.attn_k.weight", _gguf_permute(k, kv_heads))
        writer.add_tensor(f"{prefix}.attn_v.weight", matrix(kv_heads * head_dim, hidden))
        writer.add_tensor(f"{prefix}.attn_output.weight", matrix(hidden, heads * head_dim))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", norm())
        writer.add_tensor(f"{prefix}.ffn_gate.weight", matrix(ffn, hidden))
        writer.add_tensor(f"{prefix}.ffn_up.weight", matrix(ffn, hidden))
        writer.add_tensor(f"{prefix}.ffn_down.weight", matrix(hidden, ffn))
    writer.add_tensor("output_norm.weight", norm())
    writer.add_tensor("output.weight", matrix(vocab, hidden, 0.5))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
