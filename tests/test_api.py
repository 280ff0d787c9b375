"""The Python API: fdec.compile / fdec.load / Build, on tiny models, run for real."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import fdec
from fdec.cli import cli
from fdec.errors import FdecError, InputError, UsageError


def test_import_fdec_loads_nothing_heavy():
    code = (
        "import sys, fdec; heavy = [m for m in ('torch', 'transformers', 'onnxruntime', "
        "'fdec.compile', 'onnx_ir') if m in sys.modules]; print(heavy)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_compile_returns_a_build_that_runs(tiny_models, tmp_path, cli_runner):
    lines = []
    build = fdec.compile(
        tiny_models("llama"), target="cpu", out=tmp_path / "b", quantize="none",
        passes=["fold-constants", "cse"], progress=lines.append,
    )  # fmt: skip
    assert isinstance(build, fdec.Build)
    assert build.path == tmp_path / "b" and build.ok and build.target == "cpu"
    assert build.report["pipeline"] == ["fold-constants", "cse"]
    assert build.report["recipe"]["quantize"] == "none"
    assert build.report["verification"]["greedy"]["identical"] is True
    assert any(line.startswith("pass 1/2") for line in lines)
    answer = build.run("Hello there", max_new_tokens=6, chat_template=False)
    assert answer["kind"] == "decoder" and 1 <= answer["new_tokens"] <= 6
    assert len(answer["tokens"]) == answer["new_tokens"]
    # The same tokens through fdec.load and through `fdec run`.
    loaded = fdec.load(tmp_path / "b")
    assert loaded.report == json.loads((tmp_path / "b" / "report.json").read_text()) | {
        "outputs": loaded.report["outputs"]
    }
    again = loaded.run("Hello there", max_new_tokens=6, chat_template=False)
    assert again["tokens"] == answer["tokens"]
    cli_result = cli_runner.invoke(cli, ["run", str(build.path), "-p", "Hello there", "-n", "6",
                                         "--no-chat-template", "--json"])  # fmt: skip
    assert json.loads(cli_result.stdout)["tokens"] == answer["tokens"]
    # The ranges `fdec run` checks hold for the API (it gave a token for -3 new tokens).
    for bad in (dict(max_new_tokens=-3), dict(temperature=-1.0), dict(top_p=1.5)):
        with pytest.raises(UsageError, match="out of range"):
            loaded.run("Hello there", **bad)


def test_compile_reads_a_config_and_keywords_override_it(tiny_models, tmp_path):
    config = tmp_path / "fdec.toml"
    config.write_text(
        f'model = "{tiny_models("gpt2")}"\nout = "cfg-build"\npasses = "none"\n'
        '[recipe]\nquantize = "int4"\n'
    )
    build = fdec.compile(config=config, quantize="none", max_ppl_increase="1%")
    assert build.path == tmp_path / "cfg-build"  # relative to the config file
    assert build.report["recipe"]["quantize"] == "none" and build.report["pipeline"] == []


def test_compile_without_out_writes_a_temporary_folder(tiny_models):
    build = fdec.compile(tiny_models("llama"), quantize="none", passes="none")
    assert (build.path / "model.onnx").is_file() and build.path.name == "build"


def test_api_errors_are_fdec_errors(tiny_models, tmp_path):
    model = tiny_models("llama")
    with pytest.raises(UsageError, match="unknown option 'quantise'; did you mean 'quantize'"):
        fdec.compile(model, out=tmp_path / "x", quantise="int4")
    with pytest.raises(UsageError, match="keep_fp must be an integer >= 0"):
        fdec.compile(model, out=tmp_path / "x", keep_fp="two")
    with pytest.raises(InputError, match="FP8") as refused:
        fdec.compile(model, target="a100", out=tmp_path / "x", quantize="fp8")
    assert refused.value.exit_code == 2
    with pytest.raises(FdecError, match="unknown target 'h1000'") as unknown:
        fdec.compile(model, target=["cpu", "h1000"], out=tmp_path / "x")
    assert unknown.value.exit_code == 2
    assert not (tmp_path / "x").exists()
    with pytest.raises(InputError, match="not an fdec build"):
        fdec.load(tmp_path)


def test_several_targets_return_builds_or_raise_the_worst(tiny_models, tmp_path):
    model = tiny_models("llama")
    with pytest.raises(FdecError) as failed:
        fdec.compile(model, target="cpu,h100", out=tmp_path / "m", quantize="fp8", passes="none")
    assert failed.value.exit_code == 2 and "FP8" in str(failed.value)
    assert list(failed.value.builds) == ["h100"] and list(failed.value.errors) == ["cpu"]
    assert failed.value.builds["h100"].report["recipe"]["quantize"] == "fp8"
    with pytest.raises(InputError, match=r"one build per target \(h100\)"):
        fdec.load(tmp_path / "m")


def test_compile_submodule_stays_importable():
    import fdec.compile

    assert callable(fdec.compile)
    assert fdec.compile.CompileOptions is not None and fdec.compile.compile_model is not None
