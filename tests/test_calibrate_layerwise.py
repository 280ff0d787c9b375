"""Calibration layer by layer on the streamed model (issue 19): what it collects equals ONNX
Runtime's calibration of the whole model for every MatMul, and streamed calibrated builds
verify as today's do."""

from __future__ import annotations

import numpy as np
import pytest

from fdec.calibrate import (
    calibration_batches,
    calibration_source,
    collect_activation_stats,
    load_calibration_texts,
)
from fdec.calibrate_layerwise import LayerwiseCalibration, layerwise_kinds
from fdec.compile import CompileOptions, compile_model
from fdec.frontend.export import load_tokenizer
from fdec.frontend.source import resolve_source
from fdec.frontend.stream import import_streamed
from fdec.passes.gptq import hessians
from fdec.passes.quantize_awq import _capture
from fdec.passes.smoothquant import capture_rows
from fdec.passes.weights import collect_weights


@pytest.fixture(scope="module")
def streamed(tiny_models):
    source = resolve_source(str(tiny_models("llama")))
    model = import_streamed(source).fdec_model
    batches = calibration_batches(
        load_calibration_texts(None), load_tokenizer(source.folder), model.spec.vocab_size
    )
    weights, _ = collect_weights(model, True, True)
    names = list(dict.fromkeys(site.activation.name for w in weights for site in w.sites))
    return source, model, batches, names


def test_layerwise_statistics_equal_onnx_runtime_calibration_for_every_matmul(streamed):
    source, model, batches, names = streamed
    assert len(names) == 2 * 4 + 1  # q/k/v, o, gate/up, down per layer, and the lm_head
    want = collect_activation_stats(model, batches, names)
    calibration = LayerwiseCalibration(source, batches, collect=("stats", "sampled", "first"))
    with calibration_source(calibration):  # the same call, answered layer by layer
        got = collect_activation_stats(model, batches, names)
    assert set(got) == set(want) == set(names)
    for name in names:
        a, b = want[name], got[name]
        assert b.count == a.count == sum(ids.size for ids in batches)
        np.testing.assert_allclose(b.absmax, a.absmax, rtol=1e-5)
        np.testing.assert_allclose(b.percentile_99_9, a.percentile_99_9, rtol=1e-5)
        np.testing.assert_allclose(b.channel_absmax, a.channel_absmax, rtol=1e-5, atol=1e-6)
    # One pass over the layers served everything asked; the layers hold no weights after it.
    assert len(calibration.runs) == 1 and calibration.runs[0]["layers"] == 2

    # AWQ's rows and mean |x| (same rows chosen), SmoothQuant's first rows, GPTQ's XᵀX.
    with calibration_source(calibration):
        awq = _capture(model, batches, names, 64)
        first = capture_rows(model, batches, names, max_rows=200)
        products = hessians(model, batches, names)
    awq_ort = _capture(model, batches, names, 64)
    first_ort = capture_rows(model, batches, names, max_rows=200)
    products_ort = hessians(model, batches, names)
    for name in names:
        np.testing.assert_allclose(awq[name].mean_abs, awq_ort[name].mean_abs, rtol=1e-5)
        np.testing.assert_allclose(awq[name].rows, awq_ort[name].rows, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(first[name], first_ort[name], rtol=1e-4, atol=1e-5)
        scale = np.abs(products_ort[name]).max()
        np.testing.assert_allclose(products[name] / scale, products_ort[name] / scale, atol=1e-6)
    # XᵀX came from one more pass, layer by layer, in the order the names were asked.
    assert [run["kinds"] for run in calibration.runs][-1] == ["hessian"]


def test_xtx_is_computed_only_for_the_activations_asked(streamed):
    """GPTQ asks XᵀX of its W8A8 groups only: a W8A16 down_proj's (1.6 GB on an 8B) is never
    summed, and the ones asked equal those of a walk that sums every Linear's."""
    source, model, batches, names = streamed
    asked = names[:2]  # layer 0's q/k/v input and o's input
    calibration = LayerwiseCalibration(source, batches, collect=("stats",))
    with calibration_source(calibration):
        products = hessians(model, batches, asked)
        got = {name: products[name].copy() for name in asked}
    summed = [owner for owner, seen in calibration._seen.items() if seen.hessian is not None]
    assert len(summed) <= 2 and all("down_proj" not in owner for owner in summed)
    every = LayerwiseCalibration(source, batches, collect=("stats",))
    with calibration_source(every):
        products = hessians(model, batches, names)
        for name in asked:
            np.testing.assert_array_equal(got[name], products[name])


def test_batches_other_than_the_calibrated_ones_are_refused(streamed):
    from fdec.errors import CompileError

    source, model, batches, names = streamed
    calibration = LayerwiseCalibration(source, batches)
    with calibration_source(calibration), pytest.raises(CompileError, match="other token"):
        collect_activation_stats(model, batches[:2], names)


@pytest.mark.parametrize(
    ("target", "quantize", "kinds"),
    [("h100", None, ["stats"]), ("cpu", "int4-awq", ["sampled"])],
)
def test_streamed_calibrated_build_verifies_like_todays(
    tiny_models, tmp_path, target, quantize, kinds
):
    model = str(tiny_models("llama"))
    reports = {}
    for stream in (False, True):
        options = CompileOptions(
            model=model, out=tmp_path / f"b{stream}", target=target, quantize=quantize,
            stream=stream,
        )  # fmt: skip
        reports[stream] = compile_model(options).report
    streamed, today = reports[True], reports[False]
    assert streamed["verification"]["ok"] and today["verification"]["ok"]
    quantizer = next(p for p in streamed["passes"] if p["name"].startswith("quantize-"))
    # Calibrated layer by layer (no ONNX Runtime run of the float model), every weight done.
    assert quantizer["stats"]["calibration"]["runs"][0]["kinds"] == kinds
    same = next(p for p in today["passes"] if p["name"] == quantizer["name"])
    assert "calibration" not in same["stats"]
    for key in ("weights_quantized", "activations_quantized", "groups_scaled", "rtn_only"):
        assert quantizer["stats"].get(key) == same["stats"].get(key), key
    a, b = streamed["verification"]["numeric"], today["verification"]["numeric"]
    assert a["perplexity_build"] == pytest.approx(b["perplexity_build"], rel=1e-4)
    assert a["top1_agreement"] == pytest.approx(b["top1_agreement"], abs=0.02)


def test_layerwise_kinds_follow_the_passes():
    from fdec import passes as fdec_passes

    fp8 = fdec_passes.make_pass("quantize-fp8", weight_rounding="gptq")
    awq = fdec_passes.make_pass("quantize-int4-awq")
    int8 = fdec_passes.make_pass("quantize-int8-static", alpha_search=(0.5, 0.8))
    assert layerwise_kinds([fp8]) == ("stats", "hessian")
    assert layerwise_kinds([awq]) == ("sampled",)
    assert layerwise_kinds([int8]) == ("stats", "first")


def test_streamed_calibration_memory_is_predicted_per_layer(
    cli_runner, tiny_models, monkeypatch, tmp_path
):
    from fdec.cli import cli
    from fdec.plan import compile_memory
    from fdec.targets import load_target

    source = resolve_source(str(tiny_models("llama")))
    h100 = load_target("h100")

    def predict(*kinds):
        return compile_memory.predict_compile_memory(
            source, quantize="fp8", target=h100, streamed=True, calibrates=True,
            calibration=kinds,
        )  # fmt: skip

    stats, gptq = predict("stats"), predict("stats", "hessian")
    # GPTQ's XᵀX (one layer's, factored in place) counts in the passes' stage.
    assert gptq.parts["passes_bytes"] > stats.parts["passes_bytes"]
    assert gptq.parts["calibration_bytes"] == stats.parts["calibration_bytes"]
    assert predict("stats", "sampled").parts["calibration_bytes"] > stats.parts["calibration_bytes"]

    monkeypatch.setattr(compile_memory, "available_memory", lambda: (10 << 20, "a test"))
    for extra, fix in (
        ([], "weight_rounding"),
        (["--pass-options", 'quantize-fp8.weight_rounding="nearest"'], "weight-only recipe"),
    ):
        result = cli_runner.invoke(
            cli, ["compile", str(source.folder), "--target", "h100", "--stream", "-o",
                  str(tmp_path / "b"), *extra],
        )  # fmt: skip
        assert result.exit_code == 4, result.output
        assert fix in next(line for line in result.output.splitlines() if "needs about" in line)
        assert not (tmp_path / "b").exists()


def test_xtx_is_summed_in_place_a_block_of_columns_at_a_time(monkeypatch):
    """GPTQ's XᵀX sum never holds a second [K, K] product (an 8B down_proj's is 1.6 GB)."""
    import fdec.calibrate as calibrate

    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((40, 24)).astype(np.float32) for _ in range(3)]
    monkeypatch.setattr(calibrate, "_XTX_CHUNK_BYTES", 8 * 24 * 5)  # 5 columns a product
    total = None
    for part in parts:
        before = total
        total = calibrate.add_xtx(total, part)
        assert before is None or total is before  # in place after the first
    x = np.concatenate(parts).astype(np.float64)
    np.testing.assert_allclose(total, x.T @ x, rtol=1e-13, atol=1e-12)


def test_streamed_model_drops_and_reads_again_what_is_outside_the_layers(tiny_models):
    """While calibration runs the layers one by one, the embedding and head are not held."""
    import torch

    from fdec.frontend.stream import open_streamed

    streamed = open_streamed(resolve_source(str(tiny_models("llama"))))
    model = streamed.model
    ids = torch.tensor([[1, 5, 9, 2]])
    for layer in streamed.layers:
        streamed.load(layer)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    streamed.unload_outside()
    outside = model.get_input_embeddings().weight
    assert outside.device.type == "meta" and model.get_output_embeddings().weight.is_meta
    assert all(not p.is_meta for p in streamed.layers.parameters())  # the layers keep theirs
    streamed.load_outside()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)
