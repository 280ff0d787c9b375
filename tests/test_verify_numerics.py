"""`fdec verify BUILD --numerics`: a written build against its source model again, on the
providers the build runs on where this machine has them (a GPU build copied to a GPU machine
is checked there; here everything runs on the CPU, and a graph the CPU cannot run says so)."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from models import make_tiny_model

from fdec.cli import cli


def _compile(model, out, *args):
    result = CliRunner().invoke(cli, ["compile", str(model), "-o", str(out), "--quiet", *args])
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads((out / "report.json").read_text())


def _verify(build, *args):
    result = CliRunner().invoke(cli, ["verify", str(build), "--numerics", "--json", *args])
    return result.exit_code, json.loads(result.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def fp32_build(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "b"
    report = _compile(tiny_models("llama"), out, "--target", "cpu", "--quantize", "none")
    return out, report


def test_a_build_verifies_again_and_says_where(fp32_build):
    build, report = fp32_build
    # The compile's own record now names the device too.
    assert report["verification"]["providers"][0] == "CPUExecutionProvider"
    assert report["verification"]["device"]
    code, outcome = _verify(build)
    assert code == 0 and outcome["ok"] is True
    checked = outcome["numerics"]
    assert checked["ok"] is True and checked["providers"][0] == "CPUExecutionProvider"
    assert checked["device"] == report["verification"]["device"]
    # The same graph, reference and tolerance as at compile: the same figures.
    for key in ("max_abs_error", "top1_agreement"):
        assert checked["numeric"][key] == pytest.approx(report["verification"]["numeric"][key])
    assert checked["greedy"]["identical"] is True
    assert checked["tolerance"] == {
        k: v for k, v in report["verification"]["tolerance"].items() if k != "source"
    }
    text = CliRunner().invoke(cli, ["verify", str(build), "--numerics", "-q"]).output
    assert "numerics PASS on CPUExecutionProvider (" in text and "greedy tokens identical" in text


def test_other_weights_behind_the_same_config_fail(fp32_build, tmp_path):
    """Another model with the build's config.json but other weights: the check runs and
    fails (exit 1), which it would not if it compared the build with itself."""
    build, _ = fp32_build
    other = make_tiny_model(tmp_path / "other", "llama", seed=7)
    code, outcome = _verify(build, "--source", str(other))
    assert code == 1 and outcome["numerics"]["ok"] is False
    assert "differs from the source model" in outcome["numerics"]["failure"]


def test_a_different_model_is_refused(fp32_build, tiny_models, tmp_path):
    build, _ = fp32_build
    result = CliRunner().invoke(
        cli, ["verify", str(build), "--numerics", "--source", str(tiny_models("qwen2"))]
    )
    assert result.exit_code == 2
    assert "config.json is not the one" in result.stderr


def test_a_changed_build_stops_before_the_numerics(fp32_build, tmp_path):
    build, _ = fp32_build
    copy = tmp_path / "copy"
    shutil.copytree(build, copy)
    (copy / "report.json").write_text("{}")
    result = CliRunner().invoke(cli, ["verify", str(copy), "--numerics", "--json"])
    assert result.exit_code == 1
    outcome = json.loads(result.stdout.splitlines()[-1])
    assert "numerics" not in outcome and outcome["problems"][0]["file"] == "report.json"


def test_a_bf16_gpu_graph_is_verified_with_its_rounding_emulated(tiny_models, tmp_path):
    """No CPU bf16 kernels: the graph runs here with its bf16 rounding emulated (each bf16
    tensor rounded, nodes in fp32), and the line says it was made for the GPU."""
    build = tmp_path / "bf16"
    _compile(tiny_models("llama"), build, "--target", "h200", "--backend", "onnxruntime",
             "--quantize", "bf16", "--max-seq-len", "64")  # fmt: skip
    code, outcome = _verify(build)
    assert code == 0 and outcome["numerics"]["ok"] is True
    assert outcome["numerics"]["emulated"]["dtype"] == "bf16"
    assert outcome["numerics"]["made_for"] == "CUDAExecutionProvider"
    text = CliRunner().invoke(cli, ["verify", str(build), "--numerics", "-q"]).output
    assert "numerics PASS" in text
    assert (
        "made for CUDAExecutionProvider, not available here: checked with its bf16 "
        "rounding emulated" in text
    )
