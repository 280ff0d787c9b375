"""GPU providers that cannot start: fdec runs on the CPU with one warning and reports what it got."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from fdec.cli import cli
from fdec.runner import load_build
from fdec.runtime import open_session

_GPU_FIRST = [["CUDAExecutionProvider", {}], ["CPUExecutionProvider", {}]]
_NO_DEVICE = (
    "[ONNXRuntimeError] : 1 : FAIL : CUDA failure 100: no CUDA-capable device is detected ; "
    "GPU=-1 ; hostname=h ; file=/onnxruntime_src/onnxruntime/core/providers/cuda/cuda_call.cc ; "
    "line=129 ; expr=cudaSetDevice(info_.device_id); "
)
# What onnxruntime-gpu does on a machine without a usable GPU: it lists CUDAExecutionProvider
# as available (it is compiled in), and creating a session that asks for it raises ONNX
# Runtime's Fail with the message above. This environment has the CPU onnxruntime and no GPU,
# and the two packages cannot be installed side by side, so the child process makes the CPU
# package behave that way at the narrowest point Python reaches: the provider list, and the
# InferenceSession constructor when CUDA is asked for. Sessions on the CPU are real.
_INJECT = f"""
import sys
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail

_Real = ort.InferenceSession
ort.get_available_providers = lambda: [
    "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
]


class _NoDevice(_Real):
    def __init__(self, path, sess_options=None, providers=None, provider_options=None, **kw):
        if set(providers or ()) & {{"CUDAExecutionProvider", "TensorrtExecutionProvider"}}:
            raise Fail({_NO_DEVICE!r})
        super().__init__(path, sess_options=sess_options, providers=providers,
                         provider_options=provider_options, **kw)


ort.InferenceSession = _NoDevice
sys.argv = ["fdec", *sys.argv[1:]]
from fdec.cli import main
main()
"""


@pytest.fixture(scope="module")
def gpu_build(tiny_models, tmp_path_factory):
    """A tiny fp32 build whose fdec-runtime.json asks for CUDA first, as GPU-target builds do."""
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("fallback") / "build"
    result = CliRunner().invoke(
        cli, ["compile", str(tiny_models("llama")), "--quantize", "none", "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    config_path = out / "fdec-runtime.json"
    config = json.loads(config_path.read_text())
    config["providers"] = _GPU_FIRST
    config_path.write_text(json.dumps(config))
    return out


def test_cuda_that_cannot_start_falls_back_to_the_cpu_with_one_warning(gpu_build, tmp_path):
    """`fdec run` where onnxruntime-gpu raises 'CUDA failure 100' (see _INJECT for why it is
    injected): the prompt runs on the CPU, stderr has one line, the JSON says what ran."""
    build = tmp_path / "build"
    shutil.copytree(gpu_build, build)
    result = subprocess.run(
        [sys.executable, "-c", _INJECT, "run", str(build), "--prompt", "Hello", "--json",
         "--max-new-tokens", "4"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert (
        "CUDAExecutionProvider could not start (CUDA failure 100: no CUDA-capable device "
        in (lines[0])
    )
    assert lines[0].endswith("running on CPUExecutionProvider")
    assert "hostname" not in lines[0]
    outcome = json.loads(result.stdout)
    assert outcome["providers"] == ["CPUExecutionProvider"]
    assert outcome["provider_fallback"].startswith("CUDAExecutionProvider could not start")
    assert outcome["new_tokens"] == 4


def test_plain_cpu_onnxruntime_asked_for_cuda_reports_what_it_got(gpu_build, cli_runner, caplog):
    """The CPU package has no CUDA provider: the session is CPU-only, nothing raised, and
    `fdec run` says loudly which providers ran."""
    with caplog.at_level(logging.WARNING, logger="fdec"):
        loaded = load_build(gpu_build)
    assert loaded.model.providers == ["CPUExecutionProvider"]
    assert loaded.model.provider_fallback is None  # nothing failed to start
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    line = loaded.provider_fallback()
    assert "asks for CUDAExecutionProvider but the session runs on CPUExecutionProvider" in line
    result = cli_runner.invoke(
        cli, ["run", str(gpu_build), "--prompt", "Hi", "--max-new-tokens", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    outcome = json.loads(result.stdout)
    assert outcome["providers"] == ["CPUExecutionProvider"]
    assert outcome["provider_fallback"] == line


def test_a_cpu_session_that_fails_is_not_masked(tmp_path):
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not an onnx model")
    with pytest.raises(Exception, match=r"(?i)protobuf|parse|load"):
        open_session(broken, providers=["CPUExecutionProvider"])


def test_tensorrt_and_cuda_failing_alike_make_one_line(gpu_build, tmp_path):
    """A GPU-target build asks for TensorRT, then CUDA (fdec.lower.onnxruntime.providers_for):
    both fail the same way without a GPU; one line names both, stdout stays JSON."""
    from fdec.lower.onnxruntime import providers_for
    from fdec.targets import load_target

    build = tmp_path / "build"
    shutil.copytree(gpu_build, build)
    config = json.loads((build / "fdec-runtime.json").read_text())
    config["providers"] = providers_for(load_target("h200"))
    (build / "fdec-runtime.json").write_text(json.dumps(config))
    result = subprocess.run(
        [sys.executable, "-c", _INJECT, "run", str(build), "--prompt", "Hello", "--json",
         "--max-new-tokens", "2"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [
        "WARNING fdec.runtime.session: TensorrtExecutionProvider and CUDAExecutionProvider "
        "could not start (CUDA failure 100: no CUDA-capable device is detected); running on "
        "CPUExecutionProvider"
    ]
    assert json.loads(result.stdout)["providers"] == ["CPUExecutionProvider"]
