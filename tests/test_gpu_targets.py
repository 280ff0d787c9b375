"""Compiling for GPU targets on this CPU machine: real TensorRT-RTX engines where the toolchain
builds ahead of time, complete deferred TensorRT plans elsewhere, and honest provider reports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from fdec.cli import cli
from fdec.lower.tensorrt import tensorrt_available
from fdec.lower.tensorrt_rtx import available as rtx_available
from fdec.report import render_report

needs_rtx = pytest.mark.skipif(rtx_available() is not None, reason=str(rtx_available()))


def _compile(cli_runner, model, out, *args):
    result = cli_runner.invoke(
        cli,
        [
            "compile",
            str(model),
            "-o",
            str(out),
            "--json",
            "--max-seq-len",
            "256",
            *(() if "--quantize" in args else ("--quantize", "none")),
            *args,
        ],
    )
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout), json.loads((out / "report.json").read_text())


@needs_rtx
def test_rtx4090_gets_a_real_tensorrt_rtx_engine(tiny_models, tmp_path, cli_runner):
    out = tmp_path / "rtx"
    summary, report = _compile(cli_runner, tiny_models("llama"), out, "--target", "rtx4090")
    assert report["backend"] == "tensorrt-rtx"
    (engine,) = report["engines"]
    assert engine["status"] == "built" and engine["purpose"] == "deployable"
    assert engine["compute_capability"] == "8.9"
    path = out / engine["engine"]
    assert path.is_file() and path.stat().st_size == engine["bytes"] > 100_000
    assert path.read_bytes()[:4] == b"vtrt"  # TensorRT-RTX engine header (observed)
    manifest = json.loads((out / "fdec-build.json").read_text())
    assert "engines/tensorrt-rtx/model.engine" in manifest["outputs"]
    assert report["verification"]["ok"] is True
    assert summary["engines"][0]["status"] == "built"


@needs_rtx
def test_l4_reports_a_tensorrt_rtx_compile_check_and_a_deferred_tensorrt_plan(
    tiny_models, tmp_path, cli_runner
):
    out = tmp_path / "l4"
    _, report = _compile(cli_runner, tiny_models("llama"), out, "--target", "l4")
    by_backend = {e["backend"]: e for e in report["engines"]}
    check = by_backend["tensorrt-rtx"]
    assert check["purpose"] == "check" and check["status"] == "built"
    assert check["compute_capability"] == "8.9" and check["engine"] is None
    assert not (out / "engines" / "tensorrt-rtx").exists()  # a check is not shipped
    assert by_backend["tensorrt"]["status"] == ("deferred" if tensorrt_available() else "built")


def test_h100_build_is_complete_with_the_engine_deferred(tiny_models, tmp_path, cli_runner):
    if tensorrt_available() is None:
        pytest.skip("TensorRT and a GPU are present: the engine is built, not deferred")
    out = tmp_path / "h100"
    summary, report = _compile(cli_runner, tiny_models("llama"), out, "--target", "h100")
    assert summary["ok"] is True
    trt = next(e for e in report["engines"] if e["backend"] == "tensorrt")
    assert trt["status"] == "deferred" and "tensorrt" in trt["reason"]
    plan = json.loads((out / "engines" / "tensorrt" / "plan.json").read_text())
    assert plan["compute_capability"] == "9.0" and plan["status"] == "deferred"
    # Which precision each shipped model runs in: model.onnx, then the typed TensorRT model.
    models = {m["file"]: m for m in report["models"]}
    assert models["model.onnx"]["summary"] == "fp32 compute, fp32 weights, fp32 KV cache"
    assert models["engines/tensorrt/model.onnx"]["compute"] in ("bf16", "fp16")
    placement = report["cuda_placement"]  # informational here: TensorRT runs this build
    assert placement["cpu_nodes"] == 0 and "required" not in placement
    # The traced graph's one MemcpyFromHost is said as what ORT's CUDA provider would do,
    # not as a fault of a build the TensorRT engine runs.
    line = next(x for x in render_report(report).splitlines() if x.startswith("CUDA placement"))
    assert placement["memcpy_nodes"] == 1 and line.endswith("this build's engine runs it instead)")
    assert (
        "trtexec" in plan["trtexec_shell"] and "--saveEngine=model.engine" in plan["trtexec_shell"]
    )
    assert os.access(out / "engines" / "tensorrt" / "build.sh", os.X_OK)
    rtx = next(e for e in report["engines"] if e["backend"] == "tensorrt-rtx")
    assert rtx["status"] in ("not-applicable", "deferred")  # TensorRT-RTX cannot target sm 9.0
    assert report["estimate"]["target"] == "h100" and report["estimate"]["decode_tokens_per_s"] > 0
    # fdec build-engine explains where to run it, exit 1, and leaves the plan as it was.
    later = cli_runner.invoke(cli, ["build-engine", str(out)])
    assert later.exit_code == 1
    assert "fdec build-engine" in later.stderr and "NVIDIA GPU" in later.stderr
    assert json.loads((out / "engines" / "tensorrt" / "plan.json").read_text()) == plan


def test_gpu_build_run_here_says_it_fell_back_to_the_cpu(tiny_models, tmp_path, cli_runner):
    out = tmp_path / "a100"
    _compile(cli_runner, tiny_models("gpt2"), out, "--target", "a100", "--backend", "onnxruntime")
    runtime = json.loads((out / "fdec-runtime.json").read_text())
    # --backend onnxruntime on a GPU target is the ONNX Runtime CUDA build (fp16 graph).
    assert [p[0] for p in runtime["providers"]] == [
        "CUDAExecutionProvider", "CPUExecutionProvider",
    ]  # fmt: skip
    result = cli_runner.invoke(cli, ["run", str(out), "-p", "Ships", "-n", "4", "--json"])
    assert result.exit_code == 0, result.output
    ran = json.loads(result.stdout)
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert ran["providers"] == ["CPUExecutionProvider"]
        assert "warning: this build asks for CUDAExecutionProvider" in result.stderr
        assert "runs on CPUExecutionProvider" in ran["provider_fallback"]


def test_custom_target_file(tiny_models, tmp_path, cli_runner):
    from fdec.targets import load_target

    source = load_target("l4").path
    mine = tmp_path / "my-gpu.toml"
    text = open(source).read().replace('name = "l4"', 'name = "my-gpu"')
    mine.write_text(text)
    shown = cli_runner.invoke(cli, ["targets", str(mine), "--json"])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["name"] == "my-gpu"
    out = tmp_path / "mine"
    _, report = _compile(
        cli_runner, tiny_models("gpt2"), out, "--target", str(mine), "--backend", "onnxruntime"
    )
    assert report["target"]["name"] == "my-gpu"
    assert report["estimate"]["target"] == "my-gpu"


def test_engine_backend_on_cpu_target_is_a_usage_error(tiny_models, tmp_path, cli_runner):
    out = tmp_path / "b"
    result = cli_runner.invoke(
        cli, ["compile", str(tiny_models("llama")), "-o", str(out), "--backend", "tensorrt"]
    )
    assert result.exit_code == 2
    assert "needs a GPU target" in result.stderr
    assert not out.exists()


def test_max_seq_len_beyond_the_model_is_refused(tiny_models, tmp_path, cli_runner):
    out = tmp_path / "b"
    result = cli_runner.invoke(
        cli,
        [
            "compile",
            str(tiny_models("llama")),
            "-o",
            str(out),
            "--target",
            "h100",
            "--max-seq-len",
            "100000",
        ],
    )
    assert result.exit_code == 2
    assert "exceeds the model's 256 positions" in result.stderr
    assert not out.exists()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_build_sh_says_what_is_missing(tiny_models, tmp_path, cli_runner):
    if tensorrt_available() is None:
        pytest.skip("TensorRT present: build.sh would really build")
    out = tmp_path / "h100"
    _compile(cli_runner, tiny_models("llama"), out, "--target", "h100")
    proc = subprocess.run(
        ["bash", str(out / "engines" / "tensorrt" / "build.sh")], capture_output=True, text=True,
        env={**os.environ, "PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin"},
    )  # fmt: skip
    if shutil.which("trtexec") is None:
        assert proc.returncode != 0 and "trtexec" in proc.stderr
