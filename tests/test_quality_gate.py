"""A lossy build over its --max-ppl-increase fails with exit code 3, names the most sensitive
layers (measured), prints the figures as JSON, and writes nothing."""

from __future__ import annotations

import json

from fdec.cli import cli


def test_gate_fails_with_exit_3_naming_the_worst_layers(tiny_models, tmp_path, cli_runner):
    out = tmp_path / "b"
    result = cli_runner.invoke(cli, [
        "compile", str(tiny_models("llama")), "--quantize", "int4", "--max-ppl-increase", "0%",
        "-o", str(out), "--json",
        # An all-4-bit build: with the default 8-bit head the tiny llama's perplexity falls.
        "--pass-options", "quantize-int4.lm_head_bits=4",
    ])  # fmt: skip
    assert result.exit_code == 3, result.output + result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["ok"] is False and outcome["exit_code"] == 3
    gate = outcome["gate"]
    assert gate["gate"] == "max_ppl_increase" and gate["limit"] == 0.0
    assert gate["perplexity_build"] > gate["perplexity_source"]
    worst = gate["worst_layers"]
    # Measured: every unit a weight quantizer touches (2 layers + lm_head), largest KL first.
    assert len(worst) == 3 and {row["unit"] for row in worst} == {"layers.0", "layers.1", "lm_head"}
    assert [row["kl"] for row in worst] == sorted((row["kl"] for row in worst), reverse=True)
    assert worst[0]["unit"] in outcome["error"] and "--keep-fp" in outcome["error"]
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_a_failed_gate_leaves_the_previous_build(tiny_models, tmp_path, cli_runner):
    out = tmp_path / "b"
    model = str(tiny_models("llama"))
    first = cli_runner.invoke(cli, ["compile", model, "--quantize", "int4", "-o", str(out), "-q"])
    assert first.exit_code == 0, first.stderr
    before = (out / "fdec-build.json").read_bytes()
    again = cli_runner.invoke(cli, [
        "compile", model, "--quantize", "int4", "--max-ppl-increase", "0", "-o", str(out), "-q",
        "--keep-fp", "1",
    ])  # fmt: skip
    assert again.exit_code == 3, again.stderr
    # The mixed pass measured sensitivity already: the gate names its table's top unit.
    assert "most sensitive layers: " in again.stderr
    assert (out / "fdec-build.json").read_bytes() == before
