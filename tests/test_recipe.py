"""Without --quantize, a compile follows its target's default recipe (issue 4's plan)."""

from __future__ import annotations

import json

import onnx

from fdec.cli import cli


def _compile(cli_runner, model, out, *args):
    result = cli_runner.invoke(cli, ["compile", str(model), "-o", str(out), "--json", *args])
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads((out / "report.json").read_text())


def _op_types(path):
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_cpu_decoder_defaults_to_int4_awq(tiny_models, tmp_path, cli_runner):
    report = _compile(cli_runner, tiny_models("llama"), tmp_path / "b")
    assert report["recipe"] == {"quantize": "int4-awq", "chosen_by": "target cpu default"}
    assert "quantize-int4-awq" in report["pipeline"]
    assert "MatMulNBits" in _op_types(tmp_path / "b" / "model.onnx")
    manifest = json.loads((tmp_path / "b" / "fdec-build.json").read_text())
    assert manifest["options"]["quantize"] == "int4-awq"


def test_cpu_encoder_defaults_to_dynamic_int8(tiny_models, tmp_path, cli_runner):
    report = _compile(cli_runner, tiny_models("bert"), tmp_path / "b")
    assert report["recipe"]["quantize"] == "int8"
    assert "quantize-int8" in report["pipeline"]
    assert "MatMulInteger" in _op_types(tmp_path / "b" / "model.onnx")


def test_quantize_none_and_checkpoints_stay_full_precision(tiny_models, tmp_path, cli_runner):
    plain = _compile(cli_runner, tiny_models("llama"), tmp_path / "a", "--quantize", "none")
    assert plain["recipe"] == {"quantize": "none", "chosen_by": "options"}
    assert not any(name.startswith("quantize") for name in plain["pipeline"])
    assert plain["verification"]["numeric"]["max_abs_error"] <= 1e-3
    checkpoint = _compile(
        cli_runner, tiny_models("qwen2"), tmp_path / "c", "--emit", "hf-checkpoint"
    )
    assert checkpoint["recipe"]["quantize"] == "none"


def test_a_pass_list_with_its_own_quantizer_replaces_the_default(tiny_models, tmp_path, cli_runner):
    """The cpu recipe's int4-awq used to be appended after a listed quantize-int4: the weights
    were quantized twice, with calibration, and the report named int4-awq."""
    listed = ("--passes", "untie-embeddings,quantize-int4")
    report = _compile(cli_runner, tiny_models("llama"), tmp_path / "b", *listed)
    assert report["pipeline"] == ["untie-embeddings", "quantize-int4"]
    assert report["recipe"]["chosen_by"] == "weights quantized by --passes quantize-int4"
    both = cli_runner.invoke(cli, [
        "compile", str(tiny_models("llama")), "-o", str(tmp_path / "c"), *listed,
        "--quantize", "int4-awq",
    ])  # fmt: skip
    assert both.exit_code == 2
    assert "--quantize int4-awq and --passes quantize-int4 both quantize" in both.stderr


def test_calibration_statistics_are_cached_between_compiles(tiny_models, tmp_path, cli_runner):
    args = ("--target", "l4", "--quantize", "int8", "--max-seq-len", "256")
    args += ("--cache-dir", str(tmp_path / "cache"))
    first = _compile(cli_runner, tiny_models("llama"), tmp_path / "a", *args)
    # Whole pass results are cached too (fdec.cache); --dump-dir runs every pass again, so what
    # the second compile reuses is the statistics cache.
    second = _compile(
        cli_runner, tiny_models("llama"), tmp_path / "b", *args, "--dump-dir", str(tmp_path / "d")
    )
    assert first["calibration_cache"]["hits"] + first["calibration_cache"]["misses"] >= 1
    assert second["calibration_cache"]["misses"] == 0 and second["calibration_cache"]["hits"] >= 1
    # Same statistics, so the same quantized model, byte for byte.
    assert (tmp_path / "a" / "model.onnx.data").read_bytes() == (
        tmp_path / "b" / "model.onnx.data"
    ).read_bytes()
