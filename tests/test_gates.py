"""fdec's evaluation corpus (two balanced splits sharing no text) and the default quality gates
measured on it: each recipe gets its own, and a broken quantizer fails it with exit code 3."""

from __future__ import annotations

import importlib.resources
import json
import subprocess
import sys

import pytest

from fdec.compile import DEFAULT_MAX_PPL_INCREASE, plan_pipeline
from fdec.gates import CORPUS_KINDS, GATES, SPLITS, corpus, recipe_of
from fdec.targets import load_target


def _words(documents):
    counts = dict.fromkeys(CORPUS_KINDS, 0)
    for kind, text in documents:
        counts[kind] += len(text.split())
    return counts


def test_both_splits_hold_every_kind_balanced():
    tune, held_out = (_words(corpus(split)) for split in SPLITS)
    for counts in (tune, held_out):
        assert set(counts) == set(CORPUS_KINDS) and len(CORPUS_KINDS) >= 6
        # ~420-480 SmolLM2 tokens per kind and split (benchmarks/quality.py prints the counts)
        assert min(counts.values()) >= 150, counts
        assert max(counts.values()) <= 2.2 * min(counts.values()), counts
    for kind in CORPUS_KINDS:
        assert 0.7 <= tune[kind] / held_out[kind] <= 1.4, kind
    # ≥ 5,000 SmolLM2 tokens in all: 5,358 measured; words are ~0.7 of them for this text
    assert sum(tune.values()) + sum(held_out.values()) >= 3500


def test_splits_share_no_text_with_each_other_or_the_held_and_calibration_text():
    data = importlib.resources.files("fdec").joinpath("data")
    others = [data.joinpath("held.txt").read_text()]
    others += [p.read_text() for p in data.joinpath("calib").iterdir() if p.name.endswith(".txt")]
    lines = {
        split: {line.strip() for _, text in corpus(split) for line in text.splitlines()}
        for split in SPLITS
    }
    long_lines = {
        split: {line for line in found if len(line) > 40} for split, found in lines.items()
    }
    assert not long_lines["tune"] & long_lines["eval"]
    for other in others:
        other_lines = {line.strip() for line in other.splitlines() if len(line.strip()) > 40}
        assert not (long_lines["tune"] | long_lines["eval"]) & other_lines


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="unknown corpus split"):
        corpus("test")


# --- default gates --------------------------------------------------------------------------

_BROKEN_FDEC = '''
import dataclasses, sys

import fdec.passes
from fdec.passes.quantize import QuantizeInt4Pass


@dataclasses.dataclass
class BrokenScalesPass(QuantizeInt4Pass):
    """quantize-int4 with every stored scale 10x too large: the bug class the gate must catch."""

    def _round(self, weight):
        rounded = super()._round(weight)
        return dataclasses.replace(rounded, scales=rounded.scales * 10.0)


fdec.passes.REGISTRY["quantize-int4"] = BrokenScalesPass
from fdec.cli import cli

cli(sys.argv[1:], prog_name="fdec")
'''


def _compile(tmp_path, model, *options, broken=False):
    out = tmp_path / ("broken" if broken else "build")
    command = ["compile", str(model), "-o", str(out), "--json", "--no-cache", *options]
    if broken:
        script = tmp_path / "broken_fdec.py"
        script.write_text(_BROKEN_FDEC)
        command = [sys.executable, str(script), *command]
    else:
        command = [
            sys.executable,
            "-c",
            "from fdec.cli import cli; cli(prog_name='fdec')",
            *command,
        ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    return proc, out


def test_a_broken_quantizer_fails_the_default_gate_with_exit_3(tiny_models, tmp_path):
    model = tiny_models("llama")
    proc, out = _compile(tmp_path, model, "--quantize", "int4-rtn", "--target", "cpu", broken=True)
    assert proc.returncode == 3, proc.stderr
    outcome = json.loads(proc.stdout)
    assert outcome["exit_code"] == 3 and outcome["error"].startswith(
        "quality gate failed on held text: "
    )
    assert outcome["gate"]["limit"] == GATES["int4-rtn"].max_ppl_increase
    assert not out.exists()
    # The same quantizer, unbroken, meets the same default gate; the report names its source.
    proc, out = _compile(tmp_path, model, "--quantize", "int4-rtn", "--target", "cpu")
    assert proc.returncode == 0, proc.stderr
    tolerance = json.loads((out / "report.json").read_text())["verification"]["tolerance"]
    gate = GATES["int4-rtn"]
    assert tolerance["max_perplexity_increase"] == gate.max_ppl_increase
    assert tolerance["min_top1_agreement"] == gate.min_top1_agreement
    assert tolerance["max_abs_error"] == gate.max_logit_error
    assert tolerance["source"] == gate.source() and "benchmarks/quality.py" in gate.source()


@pytest.mark.parametrize(
    ("quantize", "target", "backend", "recipe"),
    [
        ("int4-rtn", "cpu", "onnxruntime", "int4-rtn"),
        ("int4-awq", "cpu", "onnxruntime", "int4-awq"),
        ("int4-awq-mixed", "cpu", "onnxruntime", "int4-awq-mixed"),
        ("int8", "cpu", "onnxruntime", "int8-wo"),  # a cpu decoder's int8 is -wo
        ("int8-dynamic", "cpu", "onnxruntime", "int8-dynamic"),
        ("int8", "h100", "onnxruntime", "int8-smoothquant"),
        ("int8-wo", "cpu", "onnxruntime", "int8-wo"),
        ("fp8", "h100", "onnxruntime", "fp8"),
        ("fp4", "rtx5090", "tensorrt-rtx", "fp4"),  # NVFP4 W4A4
        ("fp4-wo", "b200", "tensorrt", "fp4-wo"),
        # the ONNX Runtime CUDA model: fp16 (its default), bf16, int4 under fp16 activations
        (None, "h200", "onnxruntime-cuda", "onnxruntime-cuda fp16"),
        ("bf16", "h200", "onnxruntime-cuda", "onnxruntime-cuda bf16"),
        ("int4", "h200", "onnxruntime-cuda", "onnxruntime-cuda int4-rtn"),
        ("int4-awq", "t4", "onnxruntime-cuda", "onnxruntime-cuda int4-awq"),
        ("int4-awq-mixed", "h200", "onnxruntime-cuda", "onnxruntime-cuda int4-awq-mixed"),
        ("int8", "h200", "onnxruntime-cuda", "onnxruntime-cuda int8-wo"),  # its int8 is -wo
    ],
)
def test_each_measured_recipe_gets_its_own_gate(quantize, target, backend, recipe):
    plan = plan_pipeline(target=load_target(target), backend=backend, quantize=quantize)
    assert recipe_of(plan.pipeline) == recipe
    if recipe not in GATES:  # not measured yet: the generic gate, saying so
        assert plan.tolerance.max_perplexity_increase == DEFAULT_MAX_PPL_INCREASE
        assert plan.tolerance.source.startswith("generic gate")
        return
    gate = GATES[recipe]
    assert plan.tolerance.max_perplexity_increase == gate.max_ppl_increase
    assert plan.tolerance.min_top1_agreement == gate.min_top1_agreement
    assert plan.tolerance.source == gate.source()
    # Stricter than the generic gate it replaces, and derived from a measured figure.
    assert gate.ppl_increase < gate.max_ppl_increase < DEFAULT_MAX_PPL_INCREASE
    # An explicit --max-ppl-increase wins over the default.
    asked = plan_pipeline(
        target=load_target(target), backend=backend, quantize=quantize, max_ppl_increase=0.5
    )
    assert asked.tolerance.max_perplexity_increase == 0.5


def test_unmeasured_combinations_keep_the_generic_gate():
    cpu = load_target("cpu")
    for options in (
        {"quantize": "int4-awq", "kv_dtype": "int8"},  # a quantized KV cache: not measured
        {"quantize": "int4", "pass_options": {"quantize-int4": {"lm_head_bits": 4}}},
        {"quantize": "int4", "keep_fp": 1},
    ):
        plan = plan_pipeline(target=cpu, backend="onnxruntime", **options)
        assert recipe_of(plan.pipeline) is None, options
        assert plan.tolerance.max_perplexity_increase == DEFAULT_MAX_PPL_INCREASE
        assert plan.tolerance.source.startswith("generic gate")
    h200 = load_target("h200")
    for options in (
        # a typing of the user's own (no CUDA options: not the CUDA model's graph)
        {"passes": "fold-constants,cast-float16", "quantize": "none"},
    ):
        plan = plan_pipeline(target=h200, backend="onnxruntime-cuda", **options)
        assert recipe_of(plan.pipeline) is None, options
        assert plan.tolerance.source.startswith("generic gate")
    # int8-wo's blocked int8 DequantizeLinear for TensorRT: not measured
    plan = plan_pipeline(target=h200, backend="tensorrt", quantize="int8-wo")
    assert [p.name for p in plan.pipeline if p.name == "quantize-int8-wo"]
    assert recipe_of(plan.pipeline) is None


def test_a_typed_float_model_is_judged_by_the_measured_typing_gate():
    """The TensorRT model of a float build: the recipe's exact gate plus the measured typing
    gate ("tensorrt bf16" / "tensorrt fp16"), which SmolLM2's rtx4090 float build holds on its
    held text (bf16 0.976, fp16 0.088: both failed the tiny-model limits 0.25 / 0.05)."""
    from fdec.compile.recipe import FP32_TOLERANCE
    from fdec.lower.tensorrt_model import typed_tolerance, typing_tolerance

    for dtype, held in (("bf16", 0.976), ("fp16", 0.088)):
        measured = GATES[f"tensorrt {dtype}"]
        gate = typed_tolerance(FP32_TOLERANCE, typing_tolerance(dtype))
        assert gate.max_abs_error == pytest.approx(1e-3 + measured.max_logit_error)
        assert gate.min_top1_agreement == measured.min_top1_agreement
        assert gate.max_perplexity_increase == measured.max_ppl_increase
        assert f"tensorrt {dtype}" in gate.source
        figures = {"max_abs_error": held, "top1_agreement": 0.98, "perplexity_source": 54.05,
                   "perplexity_build": 54.10}  # fmt: skip
        assert gate.judge(figures) is None
    # A quantized recipe keeps its own perplexity bound, its error widened by the typing's.
    fp8 = GATES["fp8"].tolerance()
    typed = typed_tolerance(fp8, typing_tolerance("bf16"))
    assert typed.max_perplexity_increase == fp8.max_perplexity_increase
    assert typed.max_abs_error == pytest.approx(
        fp8.max_abs_error + GATES["tensorrt bf16"].max_logit_error
    )
