"""Builds are written to a temporary sibling and moved into place: failures leave the old build."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

import fdec.compile
from fdec.build import AtomicBuild
from fdec.cli import cli
from fdec.errors import VerificationError
from fdec.pipeline import Tolerance


def _snapshot(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def previous_build(tiny_models, tmp_path, cli_runner):
    out = tmp_path / "build"
    result = cli_runner.invoke(
        cli, ["compile", str(tiny_models("llama")), "-o", str(out), "-q", "--quantize", "none"]
    )
    assert result.exit_code == 0, result.output + result.stderr
    return out


def _leftovers(out: pathlib.Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}"))


def test_failure_while_writing_keeps_previous_build(
    previous_build, tiny_models, cli_runner, monkeypatch
):
    before = _snapshot(previous_build)

    def broken_lowering(model, out, **kwargs):
        (out / "model.onnx").write_bytes(b"half written")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fdec.compile.lower, "lower_onnxruntime", broken_lowering)
    result = cli_runner.invoke(
        cli, ["compile", str(tiny_models("gpt2")), "-o", str(previous_build), "--quantize", "none"]
    )
    assert result.exit_code != 0
    assert _snapshot(previous_build) == before
    assert _leftovers(previous_build) == []


def test_failed_verification_keeps_previous_build(
    previous_build, tiny_models, cli_runner, monkeypatch
):
    before = _snapshot(previous_build)
    monkeypatch.setattr(fdec.compile.recipe, "FP32_TOLERANCE", Tolerance(max_abs_error=0.0))
    result = cli_runner.invoke(
        cli,
        [
            "compile",
            str(tiny_models("gpt2")),
            "-o",
            str(previous_build),
            "--json",
            "--quantize",
            "none",
        ],
    )
    assert result.exit_code == 1
    error = json.loads(result.stdout)["error"]
    assert "differs from the source model" in error and "logits at position" in error
    assert _snapshot(previous_build) == before
    assert _leftovers(previous_build) == []


def test_interrupt_keeps_previous_build(previous_build, tiny_models, monkeypatch):
    before = _snapshot(previous_build)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fdec.compile.gate, "verify_build", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fdec.compile.compile_model(
            fdec.compile.CompileOptions(
                model=str(tiny_models("gpt2")), out=previous_build, quantize="none"
            )
        )
    assert _snapshot(previous_build) == before
    assert _leftovers(previous_build) == []


def test_successful_rebuild_replaces_previous(previous_build, tiny_models, cli_runner):
    result = cli_runner.invoke(
        cli,
        [
            "compile",
            str(tiny_models("gpt2")),
            "-o",
            str(previous_build),
            "-q",
            "--quantize",
            "none",
        ],
    )
    assert result.exit_code == 0
    report = json.loads((previous_build / "report.json").read_text())
    assert report["source"]["family"] == "gpt2"
    assert _leftovers(previous_build) == []


def test_leftovers_of_a_killed_run_are_cleaned(tmp_path):
    out = tmp_path / "build"
    dead_pid = 2**22 + 12345  # above pid_max on Linux: never a live process
    stale = tmp_path / f".build.fdec-tmp-{dead_pid}-abc"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"partial")
    with AtomicBuild(out) as staging:
        (staging / "x").write_text("new")
    assert not stale.exists()
    assert (out / "x").read_text() == "new"


def test_killed_during_swap_restores_old_build(tmp_path):
    out = tmp_path / "build"
    dead_pid = 2**22 + 54321
    old = tmp_path / f".build.fdec-old-{dead_pid}"
    old.mkdir()
    (old / "model.onnx").write_text("old build")
    # A run killed between moving the old build aside and moving the new one in.
    with pytest.raises(VerificationError):
        with AtomicBuild(out):
            assert (out / "model.onnx").read_text() == "old build"
            raise VerificationError("boom")
    assert (out / "model.onnx").read_text() == "old build"
    assert not old.exists()
    assert os.listdir(tmp_path) == ["build"]
