"""The strongly typed TensorRT model for every recipe: numerics on the CPU and a real engine.

For each recipe (none typed fp16 or bf16, fp8, int8-smoothquant, int4-awq) a tiny Llama runs
the pipeline `fdec compile --target rtx4090` runs, the TensorRT model is typed and written
(engines/tensorrt/model.onnx), checked against the PyTorch source within the recipe's
tolerance (ONNX Runtime on the CPU at optimization basic, fp16/bf16 storage emulated), and a
TensorRT-RTX engine is built from that same model for sm 8.9. The engine's precision is read
from its own inspector listing, not from the recipe.
"""

from __future__ import annotations

import json
import os
import pathlib

import onnx
import pytest
from exported import dump, load

from fdec.compile import plan_pipeline
from fdec.lower.profiles import ShapeLimits
from fdec.lower.tensorrt_model import TYPED_MODEL, prepare_tensorrt_model
from fdec.lower.tensorrt_rtx import ENGINE_FILE, available, build_engine
from fdec.pipeline import PassManager
from fdec.targets import load_target
from fdec.verify import Reference

_LIMITS = ShapeLimits(max_batch=2, max_seq_len=256)

# recipe, typing dtype (None: the target's choice), precisions in the graph, engine precision.
_MATRIX = [
    ("none", "fp16", ["fp16"], "fp16"),
    # (a bf16 graph's logits compute in fp16)
    ("none", None, ["bf16", "fp16"], "bf16"),
    ("fp8", None, ["bf16", "fp16", "int8", "fp8"], "fp8"),
    ("int8-smoothquant", None, ["bf16", "fp16", "int8"], "int8"),
    ("int4-awq", None, ["bf16", "fp16", "int8", "int4"], "bf16 (int4 weights)"),
    # (2 layers: all kept in 8-bit blocks, whose ONNX Runtime max/-128 scales TensorRT refused)
    ("int4-awq-mixed", None, ["bf16", "fp16", "int8"], "bf16"),
]


@pytest.fixture(scope="module")
def source(tiny_models, tmp_path_factory):
    """The tiny Llama imported once: (serialized model, spec, reference, tokenizer)."""
    from fdec.frontend.export import import_model
    from fdec.frontend.source import resolve_source

    cache = tmp_path_factory.mktemp("matrix-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FDEC_CACHE_DIR", str(cache / "fdec"))
        patch.setenv("XDG_CACHE_HOME", str(cache))
        imported = import_model(resolve_source(str(tiny_models("llama"))))
    model = imported.fdec_model
    reference = Reference.from_hf(
        imported.hf_model, "decoder", imported.tokenizer, model.spec.vocab_size
    )
    return dump(model), model.spec, reference, imported.tokenizer


def _built(source, tmp_path, target, backend, quantize, **plan_options):
    """The tiny Llama through `fdec compile`'s pipeline for (target, backend, quantize),
    saved as build/model.onnx: (build folder, model, plan, pass records)."""
    proto, spec, _, tokenizer = source
    plan = plan_pipeline(target=target, backend=backend, quantize=quantize, **plan_options)
    plan.attach_calibration(tokenizer, spec)
    model, records = PassManager(plan.pipeline, target=target).run(load(proto, spec))
    build = tmp_path / "build"
    build.mkdir()
    model.save(build / "model.onnx")
    return build, model, plan, records


@pytest.mark.parametrize(
    ("recipe", "dtype", "precisions", "engine"),
    _MATRIX,
    ids=[f"{recipe}-{dtype or 'auto'}" for recipe, dtype, *_ in _MATRIX],
)
def test_recipe_builds_a_strongly_typed_engine(source, tmp_path, recipe, dtype, precisions, engine):
    _, _, reference, _ = source
    target = load_target("rtx4090")
    build, model, plan, _ = _built(source, tmp_path, target, "tensorrt-rtx", recipe)

    record = prepare_tensorrt_model(
        build, target=target, spec=model.spec, reference=reference, tolerance=plan.tolerance,
        dtype=dtype,
    )  # fmt: skip
    figures = record["numerics"]
    assert figures["ok"], figures["failure"]
    assert record["precisions"] == precisions
    assert record["untyped_tensors"] == 0 and record["fallback"] is None
    # Typing costs little next to the recipe: perplexity within 2 % of the source here.
    assert figures["perplexity_build"] / figures["perplexity_source"] < 1.02 or recipe != "none"
    typed = build / TYPED_MODEL
    onnx.checker.check_model(str(typed), full_check=True)
    graph = onnx.load(str(typed), load_external_data=False).graph
    assert {v.type.tensor_type.elem_type for v in graph.output} == {onnx.TensorProto.FLOAT}

    if available() is not None:
        pytest.skip(f"TensorRT-RTX is not usable here: {available()}")
    out = tmp_path / "engine"
    result = build_engine(typed, out, spec=model.spec, limits=_LIMITS, compute_capability=(8, 9))
    assert result.status == "built", result.reason
    assert (out / ENGINE_FILE).stat().st_size == result.bytes > 0
    assert result.engine_precision["precision"] == engine, result.engine_precision
    # No product computes in fp32, the logits' included (fp16 in a bf16 engine too: an fp32
    # one had TensorRT-RTX dequantize an int8 lm_head to fp32 every decode step).
    gemms = result.engine_precision["gemms"]
    assert not [label for label in gemms if label.startswith("fp32")], gemms


def test_fp8_with_a_whole_layer_w8a16_builds_an_fp8_engine(source, tmp_path, monkeypatch):
    """fp8 with the last decoder layer kept W8A16 (weight_only_layers, as SmolLM2's default
    keeps the first and last): its int8 weights feed bf16 GEMMs, layer 0 stays FP8 W8A8, and
    the TensorRT-RTX engine builds with both kinds of GEMM."""
    from fdec.passes.quantize_fp8 import QuantizeFp8Pass

    _, spec, reference, _ = source
    monkeypatch.setattr(QuantizeFp8Pass, "layers_per_wide_layer", 1)  # 2 layers: widen one
    target = load_target("rtx4090")
    options = {"quantize-fp8": {"weight_only": ("down", "lm_head"), "weight_only_layers": (-1,)}}
    build, model, plan, records = _built(
        source, tmp_path, target, "tensorrt-rtx", "fp8", pass_options=options
    )
    (fp8,) = [r for r in records if r.name == "quantize-fp8"]
    last = spec.num_layers - 1
    wide = {spec.weights[f"layers.{last}.{k}"] for k in ("q", "k", "v", "o", "gate", "up")}
    assert wide <= set(fp8.stats["weight_only"])
    assert fp8.stats["activations_quantized"] == 3  # layer 0's q/k/v, o, gate/up
    record = prepare_tensorrt_model(
        build, target=target, spec=model.spec, reference=reference, tolerance=plan.tolerance
    )
    assert record["numerics"]["ok"], record["numerics"]["failure"]
    assert {"int8", "fp8"} <= set(record["precisions"])
    if available() is not None:
        pytest.skip(f"TensorRT-RTX is not usable here: {available()}")
    result = build_engine(
        build / TYPED_MODEL, tmp_path / "engine", spec=model.spec, limits=_LIMITS,
        compute_capability=(8, 9),
    )  # fmt: skip
    assert result.status == "built", result.reason
    # The inspector lists layer 0's FP8 GEMMs (q/k/v, o, gate/up: 3 per profile) and the
    # W8A16 ones as bf16 GEMMs of int8 weights (layer 1's, both down_proj, attention's bf16):
    # {'bf16': 4, 'bf16 (int8 weights)': 16, 'fp16 (int8 weights)': 2, 'fp8': 6}.
    gemms = result.engine_precision["gemms"]
    assert gemms.get("fp8") == 3 * len(result.profiles), gemms
    assert gemms.get("bf16 (int8 weights)", 0) > gemms["fp8"], gemms


def test_a_batch_1_decode_profile_keeps_weight_only_gemms_fused(source, tmp_path):
    """`--max-batch 1`: the decode profile takes batch 2 at most, so TensorRT-RTX fuses each
    int8 weight-only GEMM's dequantization into it in both profiles (with every decode shape
    static it dequantized each whole weight in a kernel of its own before a dense GEMM)."""
    if available() is not None:
        pytest.skip(f"TensorRT-RTX is not usable here: {available()}")
    _, _, reference, _ = source
    target = load_target("rtx4090")
    build, model, plan, records = _built(source, tmp_path, target, "tensorrt-rtx", "fp8")
    (fp8,) = [r for r in records if r.name == "quantize-fp8"]
    weight_only = [name for name in fp8.stats["weight_only"] if "lm_head" not in name]
    record = prepare_tensorrt_model(
        build, target=target, spec=model.spec, reference=reference, tolerance=plan.tolerance
    )
    assert record["numerics"]["ok"], record["numerics"]["failure"]
    limits = ShapeLimits(max_batch=1, max_seq_len=256)
    result = build_engine(
        build / TYPED_MODEL, tmp_path / "engine", spec=model.spec, limits=limits,
        compute_capability=(8, 9),
    )  # fmt: skip
    assert result.status == "built", result.reason
    context, generation = result.profiles
    assert context["shapes"]["input_ids"]["max"] == [1, 256]
    assert generation["shapes"]["input_ids"] == {"min": [1, 1], "opt": [1, 1], "max": [2, 1]}
    gemms = result.engine_precision["gemms"]
    assert gemms.get("bf16 (int8 weights)") == 2 * len(weight_only), gemms
    assert gemms.get("fp16 (int8 weights)") == 2, gemms  # the lm_head, fp16 logits


def test_the_fp32_graph_would_build_an_fp32_engine(source, tmp_path):
    """Why the typed model exists: TensorRT-RTX builds the untyped graph's GEMMs in fp32."""
    if available() is not None:
        pytest.skip(f"TensorRT-RTX is not usable here: {available()}")
    from fdec.passes import DEFAULT_PIPELINE, make_pipeline

    proto, spec, _, _ = source
    path = tmp_path / "model.onnx"
    model, _ = PassManager(make_pipeline(list(DEFAULT_PIPELINE))).run(load(proto, spec))
    model.save(path)
    result = build_engine(
        pathlib.Path(path), tmp_path / "engine", spec=spec, limits=_LIMITS,
        compute_capability=(8, 9),
    )  # fmt: skip
    assert result.status == "built", result.reason
    assert result.engine_precision["precision"] == "fp32"


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("FDEC_SLOW_TESTS") != "1",
    reason="SmolLM2 builds take minutes: FDEC_SLOW_TESTS=1",
)
def test_smollm2_rtx4090_ships_an_fp8_engine_built_from_the_typed_model(tmp_path, cli_runner):
    """The bundled SmolLM2-135M, default rtx4090 recipe (fp8): the engine is built from the
    strongly typed model and its inspector says fp8; the typed model holds the tolerance."""
    if available() is not None:
        pytest.skip(f"TensorRT-RTX is not usable here: {available()}")
    from fdec.cli import cli

    out = tmp_path / "rtx4090"
    result = cli_runner.invoke(
        cli, ["compile", "smollm2-135m", "--target", "rtx4090", "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads((out / "report.json").read_text())
    (engine,) = report["engines"]
    assert engine["status"] == "built" and engine["model"] == TYPED_MODEL
    assert engine["engine_precision"]["precision"] == "fp8"
    typed = engine["typed_model"]
    assert typed["numerics"]["ok"] and typed["untyped_tensors"] == 0
    assert "fp8" in typed["precisions"]


def test_bf16_that_misses_its_gate_falls_back_to_fp16(source, tmp_path, monkeypatch):
    """bf16 is chosen for sm >= 8.0 only while it holds the gate; else the model is fp16, and
    the record says why. When neither holds, the compile fails naming the gate."""
    import fdec.lower.tensorrt_model as tensorrt_model
    from fdec.errors import CompileError
    from fdec.passes import DEFAULT_PIPELINE, make_pipeline
    from fdec.pipeline import Tolerance

    proto, spec, reference, _ = source
    build = tmp_path / "build"
    build.mkdir()
    model, _ = PassManager(make_pipeline(list(DEFAULT_PIPELINE))).run(load(proto, spec))
    model.save(build / "model.onnx")
    exact = Tolerance(max_abs_error=1e-3, min_top1_agreement=1.0, greedy_identical=False)
    # bf16's own allowance shrunk to nothing: its ~3e-2 logit error now fails.
    measured = tensorrt_model.typing_tolerance
    shrunk = {"bf16": Tolerance(max_abs_error=0.0)}
    monkeypatch.setattr(
        tensorrt_model, "typing_tolerance", lambda dtype: shrunk.get(dtype) or measured(dtype)
    )
    record = prepare_tensorrt_model(
        build, target=load_target("rtx4090"), spec=model.spec, reference=reference,
        tolerance=exact,
    )  # fmt: skip
    assert record["dtype"] == "fp16" and record["precisions"] == ["fp16"]
    assert record["fallback"].startswith("bf16: ") and "off by" in record["fallback"]
    assert record["numerics"]["ok"]

    shrunk["fp16"] = Tolerance(max_abs_error=0.0)
    with pytest.raises(CompileError, match="misses its tolerance: fp16: "):
        prepare_tensorrt_model(
            build, target=load_target("rtx4090"), spec=model.spec, reference=reference,
            tolerance=exact,
        )  # fmt: skip


def test_typed_check_of_a_large_model_runs_slice_by_slice_with_the_same_figures(
    source, tmp_path, monkeypatch
):
    """An fp8 model above the one-session size (an 8B one: ~8 GB) is checked one slice of
    layers at a time (fdec.runtime.sliced), with the figures one session gives."""
    from fdec.runtime import sliced

    _, spec, reference, _ = source
    target = load_target("h100")
    build, model, plan, _ = _built(source, tmp_path, target, "tensorrt", "fp8")
    whole = prepare_tensorrt_model(
        build, target=target, spec=model.spec, reference=reference, tolerance=plan.tolerance
    )["numerics"]
    monkeypatch.setattr(sliced, "WHOLE_SESSION_BYTES", 0)
    monkeypatch.setattr(sliced, "DEFAULT_SLICE_BYTES", 1)
    record = prepare_tensorrt_model(
        build, target=target, spec=model.spec, reference=reference, tolerance=plan.tolerance
    )
    got = record["numerics"]
    assert "sliced" not in whole and got["sliced"]["slices"] == spec.num_layers
    assert got["ok"] and got["top1_agreement"] == whole["top1_agreement"]
    for key in ("max_abs_error", "kl_divergence", "perplexity_build"):
        assert got[key] == pytest.approx(whole[key], abs=1e-4), key
