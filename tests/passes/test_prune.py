"""Structured pruning (fdec.passes.prune): coupling, importance, slicing == masking, the CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from exported import export_tiny, run_pass

from fdec.calibrate import calibration_batches, capture_activations
from fdec.cli import cli
from fdec.errors import CompileError, UsageError
from fdec.passes.prune import PrunePass, coupled_groups, measure_importance, parse_prune

IDS = np.array([[5, 17, 33, 2, 99, 150, 7, 8, 9, 10, 11, 12]], dtype=np.int64)


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def tiny(request, tiny_models, tmp_path_factory):
    return export_tiny(tiny_models, tmp_path_factory, request.param)


def _outputs(model, names=None):
    names = names or [v.name for v in model.graph.outputs]
    return capture_activations(model, IDS, names)


def _mask(model, role, keep_rows):
    """Zero every row (K index) of a MatMul weight except `keep_rows`: the masked twin of
    slicing the closer's input."""
    value = model.graph.initializers[model.spec.weights[role]]
    array = value.const_value.numpy().copy()
    keep = np.zeros(array.shape[0], dtype=bool)
    keep[list(keep_rows)] = True
    array[~keep] = 0.0
    value.const_value = ir.tensor(array, name=value.name)


def test_coupling_is_found_from_the_dataflow(tiny):
    model = tiny.cleaned()
    groups = coupled_groups(model)
    assert len(groups) == 2 * model.spec.num_layers
    for layer in range(model.spec.num_layers):
        attention, mlp = [g for g in groups if g.layer == layer]
        assert attention.openers == tuple(f"layers.{layer}.{r}" for r in ("k", "q", "v"))
        assert attention.closer == f"layers.{layer}.o"
        assert mlp.openers == (f"layers.{layer}.gate", f"layers.{layer}.up")
        assert mlp.closer == f"layers.{layer}.down"


def test_slicing_equals_masking_heads_channels_and_layers(tiny):
    spec = tiny.spec
    group = spec.num_heads // spec.num_kv_heads
    # keep the last query head of every KV group in layer 0, the first in layer 1
    keep_heads = {
        0: [g * group + group - 1 for g in range(spec.num_kv_heads)],
        1: [g * group for g in range(spec.num_kv_heads)],
    }
    keep_channels = {0: list(range(0, spec.intermediate_size, 2)), 1: list(range(64))}
    pruned, record = run_pass(
        PrunePass(keep_heads=keep_heads, keep_channels=keep_channels, drop_layers=[0]),
        tiny.cleaned(),
    )
    assert record.modified
    assert (pruned.spec.num_layers, pruned.spec.num_heads) == (1, spec.num_kv_heads)
    assert pruned.spec.intermediate_size == 64
    assert pruned.spec.inputs[-2:] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert "model.layers.0.self_attn.q_proj.weight" in pruned.graph.initializers
    assert "model.layers.1.self_attn.q_proj.weight" not in pruned.graph.initializers
    assert record.stats["parameters_after"] < record.stats["parameters_before"]

    masked = tiny.cleaned()
    dim = spec.head_dim
    _mask(masked, "layers.1.o", [d for h in keep_heads[1] for d in range(h * dim, (h + 1) * dim)])
    _mask(masked, "layers.1.down", keep_channels[1])
    _mask(masked, "layers.0.o", [])  # a layer writing nothing to the residual == no layer
    _mask(masked, "layers.0.down", [])
    want = _outputs(masked, ["logits", "present.1.key", "present.1.value"])
    got = _outputs(pruned, ["logits", "present.0.key", "present.0.value"])
    np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-4)
    np.testing.assert_allclose(got["present.0.key"], want["present.1.key"], atol=1e-5)
    np.testing.assert_allclose(got["present.0.value"], want["present.1.value"], atol=1e-5)
    # and the unpruned model really differs: the test would see a wrong cut
    assert np.abs(_outputs(tiny.cleaned(), ["logits"])["logits"] - got["logits"]).max() > 1e-2


def test_importance_chooses_the_highest_scoring_units(tiny):
    model = tiny.cleaned()
    batches = calibration_batches([], None, model.spec.vocab_size, seq_len=16, max_samples=2)
    scores = measure_importance(model, batches)
    spec = model.spec
    assert scores.heads.shape == (spec.num_layers, spec.num_heads)
    assert scores.channels.shape == (spec.num_layers, spec.intermediate_size)
    assert scores.layers.shape == (spec.num_layers,) and (scores.layers > 0).all()
    assert scores.tokens == 32
    pruned, record = run_pass(
        PrunePass(heads=0.25, mlp=0.3, layers=1, batches=tuple(batches)), tiny.cleaned()
    )
    group = spec.num_heads // spec.num_kv_heads
    assert pruned.spec.num_heads == spec.num_heads - spec.num_kv_heads  # one per KV group
    assert pruned.spec.intermediate_size == 88  # 128 * 0.7 = 89.6 → a multiple of 8
    assert pruned.spec.num_layers == spec.num_layers - 1
    assert record.stats["layers_removed"] == [int(np.argmin(scores.layers))]
    # the head dropped from each group is that group's lowest scorer
    kept_layer = [i for i in range(spec.num_layers) if i not in record.stats["layers_removed"]]
    assert record.stats["importance"]["heads"][kept_layer[0]] == pytest.approx(
        scores.heads[kept_layer[0]].round(5).tolist()
    )
    assert group > 1


def test_bad_options_are_refused(tiny):
    for bad in ({"heads": 1.0}, {"mlp": -0.1}, {"layers": -1}, {"heads": "x"}):
        with pytest.raises(UsageError):
            PrunePass(**bad)
    with pytest.raises(UsageError, match="would remove all"):
        PrunePass(layers=2, drop_layers=[0, 1]).requires(tiny.cleaned())
    with pytest.raises(UsageError, match="calibration"):
        PrunePass(heads=0.5).requires(tiny.cleaned())
    with pytest.raises(UsageError, match="same number of query heads"):
        PrunePass(keep_heads={0: [0], 1: [0]})(tiny.cleaned()) if tiny.spec.num_kv_heads > 1 else (
            _raise_same()
        )
    assert parse_prune("heads=0.25, mlp=0.3,layers=4") == {"heads": 0.25, "mlp": 0.3, "layers": 4}
    for text in ("heads", "width=0.2", "layers=1.5", "heads=2"):
        with pytest.raises(UsageError):
            parse_prune(text)


def _raise_same():
    raise UsageError("keep the same number of query heads in every KV group", "")


def test_gpt2_fused_qkv_is_refused(tiny_models, tmp_path_factory):
    gpt2 = export_tiny(tiny_models, tmp_path_factory, "gpt2")
    with pytest.raises(CompileError, match="llama-style"):
        PrunePass(drop_layers=[0])(gpt2.cleaned())


def test_compile_prune_and_draft_end_to_end(tiny_models, tmp_path, cli_runner):
    import torch
    from transformers import AutoModelForCausalLM

    from fdec.runtime import OrtModel, open_session

    out = tmp_path / "build"
    result = cli_runner.invoke(cli, [
        "compile", str(tiny_models("llama")), "--target", "cpu", "--quantize", "none",
        "--prune", "heads=0.5,mlp=0.3,layers=1", "--draft", "layers=1/2,distill=3,quantize=int4", "-o", str(out),
        "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["spec"]["num_layers"] == 1 and report["spec"]["num_heads"] == 2
    assert report["spec"]["intermediate_size"] == 88
    assert report["prune"]["stats"]["parameters_ratio"] < 0.6
    assert report["prune"]["accuracy"]["perplexity_build"] > 0
    assert report["verification"]["ok"]  # the build against the *pruned* model's PyTorch
    assert report["draft"]["layers"] == 1 and (out / "draft" / "model.onnx").is_file()
    assert report["draft"]["distill"]["steps"] == 3 and report["draft"]["quantize"] == "int4"
    draft_report = json.loads((out / "draft" / "report.json").read_text())
    assert "quantize-int4" in draft_report["pipeline"]  # the main build stays fp32
    assert not any(name.startswith("quantize") for name in report["pipeline"])
    recipe = json.loads((out / "student" / "distill.json").read_text())
    assert recipe["layer_map"] == {"0": 1 - report["prune"]["stats"]["layers_removed"][0]}
    # The student loads with transformers and computes what the build computes.
    student = AutoModelForCausalLM.from_pretrained(out / "student").eval()
    assert student.config.num_attention_heads == 2 and student.config.head_dim == 16
    with torch.no_grad():
        want = student(torch.tensor(IDS)).logits.numpy()
    session = OrtModel(open_session(out / "model.onnx"))
    got, _ = session.decode(IDS, session.empty_past(1), 0)
    np.testing.assert_allclose(got, want, atol=1e-3)
    listed = json.loads((out / "fdec-build.json").read_text())["outputs"]
    assert "student/model.safetensors" in listed and "draft/model.onnx" in listed
    # verify --numerics finds the pruned source in the build (not in the working directory)
    verified = cli_runner.invoke(cli, ["verify", str(out), "--numerics", "--json"])
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.stdout.splitlines()[-1])["numerics"]["source"] == str(
        out / "student"
    )


@pytest.mark.parametrize(
    "args, words",
    [
        (["--prune", "heads=2"], "fraction"),
        (["--prune", "depth=3"], "heads=, mlp= or layers="),
        (["--draft", "layers=5/4"], "share below 1"),
        (["--draft", "layers=9"], "fewer than"),
        (["--draft", "layers=1/2,distill=x"], "number of steps"),
        (["--draft", "distill=3"], "how many layers"),
    ],
)
def test_compile_refuses_bad_prune_options(tiny_models, tmp_path, cli_runner, args, words):
    out = tmp_path / "build"
    result = cli_runner.invoke(cli, ["compile", str(tiny_models("llama")), "-o", str(out), *args])
    assert result.exit_code == 2, result.output
    assert words in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    "family, args, words",
    [
        # GPT-2's packed q/k/v: the pass's coupling check stopped it after the export
        # (exit 1), with --draft only after the whole main build
        ("gpt2", ["--prune", "mlp=0.25"], "gpt2 layers are not"),
        ("gpt2", ["--draft", "layers=1"], "gpt2 layers are not"),
        # OLMo 2's q/k norms span all heads: a shape error after the export
        ("olmo2", ["--prune", "heads=0.25"], "olmo2 layers are not"),
        # a sink's cache is trimmed at run time, which speculative decoding refuses: the
        # draft was built, then `fdec run --speculative draft` refused it
        ("llama", ["--kv-window", "8", "--kv-sink", "2", "--draft", "layers=1"], "trims its KV"),
    ],
)
def test_prune_and_draft_refused_when_planned(
    tiny_models, tmp_path, cli_runner, family, args, words
):
    out = tmp_path / "build"
    result = cli_runner.invoke(cli, ["compile", str(tiny_models(family)), "-o", str(out), *args])
    assert result.exit_code == 2, result.output
    assert words in result.stderr
    assert "exporting" not in result.stderr  # before any work
    assert not out.exists()
