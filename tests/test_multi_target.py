"""`--target a,b`: one build per target under -o, sharing the export through fdec's cache;
per-target outcomes in --json; the worst exit code; unknown targets refused before any work."""

from __future__ import annotations

import json

import pytest

from fdec.api import worst_exit_code
from fdec.cli import cli


def test_cpu_and_rtx4090_from_a_config_list(tiny_models, tmp_path, cli_runner):
    pytest.importorskip("tensorrt_rtx", reason="the rtx extra builds the TensorRT-RTX engine")
    config = tmp_path / "fdec.toml"
    config.write_text(
        f'model = "{tiny_models("llama")}"\ntarget = ["cpu", "rtx4090"]\n'
        f'cache_dir = "cache"\n[recipe]\nquantize = "none"\n'
    )
    out = tmp_path / "multi"
    result = cli_runner.invoke(cli, ["compile", "--config", str(config), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["ok"] is True and outcome["exit_code"] == 0
    assert [t["target"] for t in outcome["targets"]] == ["cpu", "rtx4090"]
    reports = {}
    for row in outcome["targets"]:
        folder = out / row["target"]
        assert row["out"] == str(folder) and row["ok"] is True
        reports[row["target"]] = json.loads((folder / "report.json").read_text())
        assert reports[row["target"]]["target"]["name"] == row["target"]
        assert (folder / "report.html").is_file() and (folder / "fdec-build.json").is_file()
    # Each target's own lowering: the rtx4090 build carries a real TensorRT-RTX engine.
    assert reports["cpu"]["engines"] == []
    engine = reports["rtx4090"]["engines"][0]
    assert engine["backend"] == "tensorrt-rtx" and engine["status"] == "built"
    assert (out / "rtx4090" / engine["engine"]).stat().st_size > 0
    # The export (and the reference and the shared passes) were computed once, for the first
    # target, in this fresh cache, and read back for the second.
    assert reports["cpu"]["export"]["cached"] is False
    assert reports["rtx4090"]["export"]["cached"] is True
    assert reports["rtx4090"]["cache"]["reference"] is True
    assert reports["rtx4090"]["cache"]["passes_cached"] >= 1
    # Both builds verified against the same source model.
    for report in reports.values():
        assert report["verification"]["ok"] is True


def test_fp8_refused_on_one_target_while_the_other_builds(tiny_models, tmp_path, cli_runner):
    out = tmp_path / "multi"
    args = ["compile", str(tiny_models("llama")), "--target", "cpu,h100", "--quantize", "fp8",
            "--passes", "none", "-o", str(out), "--json"]  # fmt: skip
    result = cli_runner.invoke(cli, args)
    assert result.exit_code == 2, result.output + result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["ok"] is False and outcome["exit_code"] == 2
    cpu, h100 = outcome["targets"]
    assert cpu["target"] == "cpu" and cpu["ok"] is False and cpu["exit_code"] == 2
    assert "FP8" in cpu["error"]
    assert not (out / "cpu").exists()
    assert h100["ok"] is True and h100["recipe"]["quantize"] == "fp8"
    assert json.loads((out / "h100" / "report.json").read_text())["target"]["name"] == "h100"
    assert "error: [cpu]" in result.stderr


def test_unknown_or_repeated_target_fails_before_any_work(tiny_models, tmp_path, cli_runner):
    out = tmp_path / "multi"
    model = str(tiny_models("llama"))
    result = cli_runner.invoke(cli, ["compile", model, "--target", "cpu,h1000", "-o", str(out)])
    assert result.exit_code == 2
    assert "unknown target 'h1000'; did you mean 'h100'?" in result.stderr
    assert not out.exists()
    result = cli_runner.invoke(cli, ["compile", model, "-t", "l4, l4", "-o", str(out)])
    assert result.exit_code == 2 and "target l4 is given twice" in result.stderr
    assert not out.exists()
    # -o holding a single-target build is not turned into a parent of per-target builds.
    out.mkdir()
    (out / "fdec-build.json").write_text("{}")
    result = cli_runner.invoke(cli, ["compile", model, "-t", "cpu,l4", "-o", str(out)])
    assert result.exit_code == 2 and "holds a single-target build" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["fdec-build.json"]


def test_worst_exit_code_orders_failure_over_gate_over_usage():
    assert worst_exit_code([0, 0]) == 0
    assert worst_exit_code([0, 2]) == 2
    assert worst_exit_code([2, 3, 0]) == 3
    assert worst_exit_code([3, 1, 2]) == 1
