"""`fdec passes`, `fdec targets` and the examples, run for real."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from fdec.cli import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_passes_lists_registry(cli_runner):
    result = cli_runner.invoke(cli, ["passes"])
    assert result.exit_code == 0
    for name in ("fold-constants", "cse", "remove-dead-nodes", "infer-shapes", "untie-embeddings"):
        assert name in result.stdout
    rows = json.loads(cli_runner.invoke(cli, ["passes", "--json"]).stdout)
    by_name = {row["name"]: row for row in rows}
    assert by_name["fold-constants"]["default"] is True
    assert by_name["untie-embeddings"]["default"] is False
    assert all(row["summary"] and row["family"] for row in rows)


def test_targets_table_and_json(cli_runner):
    table = cli_runner.invoke(cli, ["targets"])
    assert table.exit_code == 0
    for name in ("h100", "a100", "l4", "t4", "cpu", "rtx4090"):
        assert name in table.stdout
    h100 = json.loads(cli_runner.invoke(cli, ["targets", "h100", "--json"]).stdout)
    assert h100["compute_capability"] == "9.0"
    assert "fp8" in h100["precisions"]
    bad = cli_runner.invoke(cli, ["targets", "h1000"])
    assert bad.exit_code == 2 and "unknown target" in bad.stderr


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "tests")
    return env


def test_custom_pass_example_runs_with_numeric_checks(tiny_models):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "custom_pass.py"), str(tiny_models("llama"))],
        capture_output=True, text=True, timeout=300, env=_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    name, _, rest = proc.stdout.strip().partition(" ")
    assert name == "remove-mul-by-one"
    assert float(rest.rsplit(" ", 1)[1]) <= 1e-3


def test_ci_build_step_example(tiny_models, tmp_path):
    out = tmp_path / "ci"
    env = _env()
    env["PATH"] = str(pathlib.Path(sys.executable).parent) + os.pathsep + env["PATH"]
    proc = subprocess.run(
        ["bash", str(ROOT / "examples" / "ci_build_step.sh"), str(tiny_models("gpt2")), str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "with --quantize int4-awq: " in proc.stdout  # the cpu target's default recipe
    assert "verification PASS" in (out / "report.txt").read_text()
    # A gate the build cannot meet fails the step with exit code 3.
    gated = subprocess.run(
        ["bash", str(ROOT / "examples" / "ci_build_step.sh"), str(tiny_models("llama")),
         str(tmp_path / "gated"), "0%", "--quantize", "int4",
         # All 4-bit: with the default 8-bit head the tiny llama's perplexity falls.
         "--pass-options", "quantize-int4.lm_head_bits=4"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert gated.returncode == 3, gated.stderr[-2000:]
    assert "quality gate failed" in gated.stderr
    # And a bad model makes the step fail with fdec's exit code.
    failed = subprocess.run(
        ["bash", str(ROOT / "examples" / "ci_build_step.sh"), str(tmp_path / "missing"), str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert failed.returncode == 2


def test_python_api_example(tiny_models, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "python_api.py"), str(tiny_models("qwen2")), str(tmp_path / "b")],
        capture_output=True, text=True, timeout=300, env=_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "verified: max logit error" in proc.stdout
    assert f"recipe: --quantize int4-awq, build in {tmp_path / 'b'}" in proc.stdout  # fdec.compile
