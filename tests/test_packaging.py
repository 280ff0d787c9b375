"""Packaging: ONNX Runtime is an extra (cpu or gpu), never a core dependency, and fdec says so."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# `import onnxruntime` fails in the child as if neither package were installed: this test
# environment needs the CPU onnxruntime for everything else, so it cannot be uninstalled here.
_WITHOUT_ORT = (
    "import sys; sys.modules['onnxruntime'] = None; sys.argv = ['fdec', *sys.argv[1:]]; "
    "from fdec.cli import main; main()"
)
_INSTALL = "pip install 'fdec[cpu]' (CPU) or pip install 'fdec[gpu]' (NVIDIA GPU, CUDA 13)"


def _fdec_without_onnxruntime(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_ORT, *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip


@pytest.mark.network
def test_gpu_extra_resolves_to_onnxruntime_gpu_without_onnxruntime(tmp_path):
    """`pip install '.[gpu]'` would install onnxruntime-gpu and not the CPU onnxruntime (which
    would overwrite its module). A full resolution against the registry (--ignore-installed:
    what this environment already has must not hide a dependency)."""
    report = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
         "--report", str(report), f"{ROOT}[gpu]"],
        check=True, capture_output=True, timeout=240,
    )  # fmt: skip
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "onnxruntime-gpu" in names
    assert "onnxruntime" not in names
    assert {"fdec", "onnx", "onnx-ir", "onnxscript"} <= names


def test_core_dependencies_name_no_onnxruntime():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("onnxruntime")]
    extras = project["optional-dependencies"]
    assert extras["cpu"] == ["onnxruntime>=1.22"]
    assert extras["gpu"] == ["onnxruntime-gpu>=1.31"]
    assert not [d for d in extras["gpu"] if d.startswith("onnxruntime>") or d == "onnxruntime"]


def test_fdec_works_without_onnxruntime_until_a_command_needs_it(tiny_models, tmp_path):
    for args in (["--help"], ["targets"], ["targets", "h200"], ["passes"]):
        result = _fdec_without_onnxruntime(*args)
        assert result.returncode == 0, (args, result.stderr)
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['onnxruntime'] = None; import fdec; "
         "fdec.load; print('ok')"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert probe.stdout.strip() == "ok"
    # compile fails before any work (no export, no build folder), one line, exit 2
    out = tmp_path / "build"
    result = _fdec_without_onnxruntime(
        "compile", str(tiny_models("llama")), "--target", "cpu", "-o", str(out)
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: ONNX Runtime is not installed; install one: {_INSTALL}"
    ]
    assert not out.exists()


def test_run_without_onnxruntime_names_both_install_lines(tiny_models, tmp_path, cli_runner):
    from fdec.cli import cli

    out = tmp_path / "build"
    built = cli_runner.invoke(
        cli, ["compile", str(tiny_models("llama")), "--quantize", "none", "-o", str(out), "--json"]
    )
    assert built.exit_code == 0, built.output
    for command in (["run", str(out), "--prompt", "hi", "--max-new-tokens", "2"],
                    ["bench", str(out)]):  # fmt: skip
        result = _fdec_without_onnxruntime(*command)
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr.strip().splitlines()[-1] == (
            f"error: ONNX Runtime is not installed; install one: {_INSTALL}"
        )
