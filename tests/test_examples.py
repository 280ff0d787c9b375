"""examples/github-workflow.yml and examples/Makefile: parsed, and their fdec steps run for real."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _env(**extra):
    env = dict(os.environ)
    env["PATH"] = str(pathlib.Path(sys.executable).parent) + os.pathsep + env["PATH"]
    env.update(extra)
    return env


def test_github_workflow_compiles_gates_and_uploads(tiny_models, tmp_path):
    workflow = yaml.safe_load((EXAMPLES / "github-workflow.yml").read_text())
    assert workflow["env"]["GATE"] == "5%"
    steps = workflow["jobs"]["compile"]["steps"]
    uses = [step.get("uses", "") for step in steps]
    assert any(u.startswith("actions/setup-python@") for u in uses)
    assert any("pip install" in step.get("run", "") for step in steps)
    compile_step = next(step for step in steps if "fdec compile" in step.get("run", ""))
    script = compile_step["run"]
    for piece in ("--json", '--max-ppl-increase "$GATE"', "set -euo pipefail", "fdec verify"):
        assert piece in script
    uploads = {
        step["with"]["path"]: step for step in steps if "upload-artifact" in step.get("uses", "")
    }
    assert set(uploads) == {"${{ env.OUT }}", "${{ env.OUT }}/report.html", "fdec-summary.json"}
    assert uploads["fdec-summary.json"]["if"] == "always()"  # the outcome even when a gate fails

    # The step's own script, run by bash as the runner would, on a tiny model.
    def run(model, gate):
        env = _env(MODEL=str(model), OUT="build/model", GATE=gate)
        return subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip

    ok = run(tiny_models("gpt2"), "10%")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "build/model: --quantize int4-awq" in ok.stdout and "against the source" in ok.stdout
    assert (tmp_path / "build" / "model" / "report.html").is_file()
    assert json.loads((tmp_path / "fdec-summary.json").read_text())["ok"] is True
    # The repository's fdec.toml applies in CI too: plain int4 RTN misses a 0 % gate.
    (tmp_path / "fdec.toml").write_text(
        '[recipe]\nquantize = "int4"\n'
        # All 4-bit: with the default 8-bit head the tiny llama's perplexity falls.
        "[pass_options.quantize-int4]\nlm_head_bits = 4\n"
    )
    gated = run(tiny_models("llama"), "0%")
    assert gated.returncode == 3, gated.stderr[-2000:]  # the job fails on the gate
    outcome = json.loads((tmp_path / "fdec-summary.json").read_text())
    assert outcome["ok"] is False and outcome["exit_code"] == 3 and outcome["gate"]


def test_makefile_builds_once_verifies_and_cleans(tiny_models, tmp_path):
    (tmp_path / "fdec.toml").write_text('passes = "none"\n[recipe]\nquantize = "none"\n')

    def make(*args):
        model = f"MODEL={tiny_models('llama')}"
        return subprocess.run(["make", "-f", str(EXAMPLES / "Makefile"), model, *args],
                              cwd=tmp_path, env=_env(), capture_output=True, text=True,
                              timeout=300)  # fmt: skip

    dry = make("-n", "build")
    assert dry.returncode == 0, dry.stderr
    assert f"fdec compile {tiny_models('llama')} --config fdec.toml -o build/model" in dry.stdout
    built = make("build")
    assert built.returncode == 0, built.stderr[-2000:]
    report = json.loads((tmp_path / "build" / "model" / "report.json").read_text())
    assert report["pipeline"] == [] and report["recipe"]["quantize"] == "none"  # fdec.toml's
    assert "fdec compile" not in make("-n", "build").stdout  # up to date: nothing to redo
    stamp = (tmp_path / "build" / "model" / "fdec-build.json").stat().st_mtime
    os.utime(tmp_path / "fdec.toml", (stamp + 10, stamp + 10))  # the config changed
    assert "fdec compile" in make("-n", "build").stdout
    verified = make("verify", "-o", "build/model/fdec-build.json")  # -o: treat as up to date
    assert verified.returncode == 0, verified.stderr
    assert "fdec verify build/model" in verified.stdout
    assert "rm -rf build/model" in make("-n", "clean").stdout
    assert make("clean").returncode == 0 and not (tmp_path / "build" / "model").exists()
