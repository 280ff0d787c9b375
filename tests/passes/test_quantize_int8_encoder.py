"""Dynamic int8 on a BERT-style encoder keeps its sentence embeddings (issue 4).

A tiny random BERT (tests/models.py) is imported and cleaned as compile does, quantized by
quantize-int8 (plain, and with SmoothQuant calibrated on the built-in corpus, as
`fdec compile --quantize int8 --target cpu` runs it), and run in ONNX Runtime. Its sentence
embeddings (mean-pooled last_hidden_state over the attention mask, and pooler_output) are
compared with PyTorch's fp32 ones over several inputs of different lengths.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
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


def test_encoder_recipe_keeps_its_declared_layers_wide(bert):
    """`--quantize int8` for an encoder (the cpu target's encoder default) keeps the layers
    INT8_ENCODER_WEIGHT_ONLY names W8A16: their int8 weights are dequantized and multiplied by
    the float activation (no run-time activation quantizer), every other layer is W8A8."""
    from fdec.compile import (
        INT8_ENCODER_WEIGHT_ONLY,
        INT8_WEIGHT_ONLY,
        choose_backend,
        plan_pipeline,
    )
    from fdec.targets import load_target

    model, imported = bert
    target = load_target("cpu")
    backend = choose_backend("onnxruntime", target)
    decoder = plan_pipeline(target=target, backend=backend, quantize="int8-dynamic")
    plan = plan_pipeline(target=target, backend=backend, quantize="int8", kind="encoder")
    assert INT8_ENCODER_WEIGHT_ONLY == ("fc_out",)
    (int8,) = [p for p in plan.pipeline if p.name == "quantize-int8"]
    assert int8.weight_only == INT8_ENCODER_WEIGHT_ONLY
    decoder_int8 = [p.weight_only for p in decoder.pipeline if p.name == "quantize-int8"]
    assert decoder_int8 == [INT8_WEIGHT_ONLY] != [INT8_ENCODER_WEIGHT_ONLY]
    plan.attach_calibration(imported.tokenizer, model.spec)
    (int8,) = [p for p in plan.pipeline if p.name == "quantize-int8"]
    quantized, record = run_pass(int8, load(dump(model), model.spec))
    wide = {model.spec.weights[f"layers.{i}.fc_out"] for i in range(model.spec.num_layers)}
    assert set(record.stats["weight_only"]) == wide
    assert record.stats["weights_quantized"] == 2 * 6
    for role, name in quantized.spec.weights.items():
        if not role.startswith("layers."):
            continue
        value = quantized.graph.initializers[name]
        assert value.const_value.dtype == ir.DataType.INT8
        readers = {use.node.op_type for use in value.uses()}
        assert readers == ({"DequantizeLinear"} if role.endswith("fc_out") else {"MatMulInteger"})
    layers = model.spec.num_layers
    assert op_counts(quantized)[("", "MatMulInteger")] == 5 * layers  # q k v o fc_in

    def run(session):
        def encode(ids, mask):
            out = session.encode(ids, mask)
            return out["last_hidden_state"], out["pooler_output"]

        return encode

    got, _ = _embeddings(run(session_for_model(quantized)), imported.tokenizer)
    want, _ = _embeddings(run(session_for_model(model)), imported.tokenizer)
    assert not np.allclose(got, want, atol=1e-5)
    assert _cosines(got, want).min() >= 0.995
