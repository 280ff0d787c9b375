"""Pass options from the config file ([pass_options.NAME]) and --pass-options reach the passes."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx

from fdec.cli import cli


def _matmulnbits_block_sizes(path):
    model = onnx.load(str(path), load_external_data=False)
    return {
        attr.i
        for node in model.graph.node
        if node.op_type == "MatMulNBits"
        for attr in node.attribute
        if attr.name == "block_size"
    }


def test_config_pass_options_set_the_block_size(tiny_models, tmp_path):
    (tmp_path / "fdec.toml").write_text(
        f'model = "{tiny_models("llama")}"\nout = "b"\n'
        '[recipe]\nquantize = "int4"\n'
        "[pass_options.quantize-int4]\nblock_size = 64\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "fdec.cli", "compile", "--json", "-q"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    record = next(p for p in report["passes"] if p["name"] == "quantize-int4")
    assert record["options"]["block_size"] == 64
    assert _matmulnbits_block_sizes(tmp_path / "b" / "model.onnx") == {64}


def test_command_line_pass_options_and_their_errors(tiny_models, tmp_path, cli_runner):
    model = str(tiny_models("llama"))
    ok = cli_runner.invoke(cli, [
        "compile", model, "-o", str(tmp_path / "b"), "--quantize", "int4", "-q",
        "--pass-options", "quantize-int4.block_size=64",
    ])  # fmt: skip
    assert ok.exit_code == 0, ok.stderr
    assert _matmulnbits_block_sizes(tmp_path / "b" / "model.onnx") == {64}
    for item, words in (
        ("quantize-int4.blocksize=64", "did you mean 'block_size'"),
        ("quantise-int4.block_size=64", "did you mean 'quantize-int4'"),
        ("quantize-int4-awq.block_size=64", "does not run"),  # not in an int4 (RTN) pipeline
        ("quantize-int4.block_size=48", "block_size"),  # the pass's own check
        ("block_size=64", "PASS.OPTION=VALUE"),
    ):
        bad = cli_runner.invoke(cli, [
            "compile", model, "-o", str(tmp_path / "x"), "--quantize", "int4",
            "--pass-options", item,
        ])  # fmt: skip
        assert bad.exit_code == 2, (item, bad.stderr)
        assert words in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert not (tmp_path / "x").exists()
