"""Dynamic int8 on a BERT-style encoder keeps its sentence embeddings (issue 4).

A tiny random BERT (tests/models.py) is imported and cleaned as compile does, quantized by
quantize-int8 (plain, and with SmoothQuant calibrated on the built-in corpus, as
`fdec compile --quantize int8 --target cpu` runs it), and run in ONNX Runtime. Its sentence
embeddings (mean-pooled last_hidden_state over the attention mask, and pooler_output) are
compared with PyTorch's fp32 ones over several inputs of different lengths.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from exported import dump, load, op_counts, run_pass

from fdec.calibrate import calibration_batches, load_calibration_texts
from fdec.compile import INT8_DYNAMIC_ALPHA
from fdec.frontend.export import import_model
from fdec.frontend.source import resolve_source
from fdec.passes import make_pipeline
from fdec.passes.quantize import QuantizeInt8Pass
from fdec.pipeline import PassManager
from fdec.runtime import session_for_model

_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization stores weights in eight bits and scales activations at run time.",
    "def add(a, b):\n    return a + b",
    "Invoice 2024-117: 3 items, total 41.50 EUR, due in 30 days.",
    "Hello!",
    "A much longer sentence, written to make sure that padding and masks are exercised "
    "when several inputs of different lengths share one batch of embeddings.",
]


@pytest.fixture(scope="module")
def bert(tiny_models, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache-bert")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FDEC_CACHE_DIR", str(cache / "fdec"))
        patch.setenv("XDG_CACHE_HOME", str(cache))
        patch.setenv("HF_HUB_OFFLINE", "1")
        imported = import_model(resolve_source(str(tiny_models("bert"))))
    model, _ = PassManager(make_pipeline(["fold-constants", "cse", "remove-dead-nodes"])).run(
        imported.fdec_model
    )
    assert model.spec.kind == "encoder"
    return model, imported


def _embeddings(run, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(mean-pooled last_hidden_state, pooler_output), one row per sentence."""
    pooled, pooler = [], []
    for text in _SENTENCES:
        ids = np.asarray([tokenizer(text)["input_ids"]], dtype=np.int64)
        mask = np.ones_like(ids)
        hidden, pool = run(ids, mask)
        pooled.append((hidden * mask[..., None]).sum(axis=1)[0] / mask.sum())
        pooler.append(pool[0])
    return np.stack(pooled), np.stack(pooler)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("smoothing", [False, True])
def test_int8_keeps_bert_sentence_embeddings(bert, smoothing):
    model, imported = bert
    tokenizer = imported.tokenizer

    def torch_run(ids, mask):
        with torch.no_grad():
            out = imported.hf_model(
                input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
            )
        return out.last_hidden_state.numpy(), out.pooler_output.numpy()

    options = {}
    if smoothing:
        texts = load_calibration_texts()
        batches = calibration_batches(texts, tokenizer, model.spec.vocab_size)
        options = {"alpha": INT8_DYNAMIC_ALPHA, "batches": batches}
    quantized, record = run_pass(QuantizeInt8Pass(**options), load(dump(model), model.spec))
    session = session_for_model(quantized)

    def ort_run(ids, mask):
        out = session.encode(ids, mask)
        return out["last_hidden_state"], out["pooler_output"]

    assert record.stats["weights_quantized"] == 2 * 6  # q k v o fc_in fc_out per layer
    assert op_counts(quantized)[("", "MatMulInteger")] == record.stats["matmuls_quantized"]
    if smoothing:
        assert record.stats["smoothing_folded"] + record.stats["smoothing_inserted"] > 0
    want_pooled, want_pooler = _embeddings(torch_run, tokenizer)
    got_pooled, got_pooler = _embeddings(ort_run, tokenizer)
    assert not np.allclose(got_pooled, want_pooled, atol=1e-4)  # the weights really changed
    pooled = _cosines(got_pooled, want_pooled)
    pooler = _cosines(got_pooler, want_pooler)
    assert pooled.mean() >= 0.995, pooled
    assert pooler.mean() >= 0.995, pooler
