"""fdec.toml / [tool.fdec]: values reach the build, the command line overrides them, mistakes
are one-line exit-2 errors naming the key, and docs/config.md is the schema's own rendering."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from fdec.cli import cli
from fdec.config import SCHEMA, load_config, parse_config, render_docs, suggest_key
from fdec.errors import InputError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _fdec(cwd, *args):
    """`fdec ARGS` in a subprocess run in `cwd`, as a user in that folder would."""
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-c", "from fdec.cli import main; main()", *args],
        cwd=cwd, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def _write(path, text):
    path.write_text(text)
    return path


def test_docs_are_generated_from_the_schema():
    docs = (ROOT / "docs" / "config.md").read_text()
    assert docs == render_docs(), "regenerate: python -m fdec.config > docs/config.md"
    for key in SCHEMA:
        assert f"`{key.path}`" in docs
    # The docs' example is itself a valid config file.
    example = re.search(r"```toml\n(.*?)```", docs, re.S).group(1)
    import tomllib

    config = parse_config(tomllib.loads(example), ROOT / "fdec.toml")
    assert config.values["target"] == ["cpu", "rtx4090"]
    assert config.values["max_ppl_increase"] == pytest.approx(0.05)
    assert config.values["calibration"] == ROOT / "calib.txt"  # relative to the file


def test_config_values_apply_and_the_command_line_overrides_them(tiny_models, tmp_path):
    _write(tmp_path / "fdec.toml", f"""
model = "{tiny_models("gpt2")}"
out = "builds/from-config"
passes = ["fold-constants", "cse"]
max_seq_len = 64

[recipe]
quantize = "none"

[gates]
max_ppl_increase = "2%"
""")  # fmt: skip
    proc = _fdec(tmp_path, "compile", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    out = tmp_path / "builds" / "from-config"
    assert pathlib.Path(summary["out"]).resolve() == out.resolve()
    report = json.loads((out / "report.json").read_text())
    assert report["pipeline"] == ["fold-constants", "cse"]
    assert report["recipe"]["quantize"] == "none"
    assert report["limits"]["max_seq_len"] == 64
    manifest = json.loads((out / "fdec-build.json").read_text())
    assert manifest["options"]["max_ppl_increase"] == pytest.approx(0.02)

    # Given options win; the rest still comes from the file.
    proc = _fdec(tmp_path, "compile", "--passes", "fold-constants", "-o", "cli-out", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "cli-out" / "report.json").read_text())
    assert report["pipeline"] == ["fold-constants"]
    assert report["recipe"]["quantize"] == "none"
    assert report["limits"]["max_seq_len"] == 64
    assert not (tmp_path / "builds" / "from-config" / "cli-out").exists()


def test_pruning_sparsity_and_draft_come_from_the_recipe_table(tmp_path):
    """--sparsity, --prune and --draft had no keys: a CI build step or a matrix recipe could
    not ask for them."""
    from fdec.api import compile_options

    _write(tmp_path / "fdec.toml", """
model = "smollm2-135m"
out = "build"

[recipe]
sparsity = "2:4"
prune = "mlp=0.25"
draft = "layers=1/4"
""")  # fmt: skip
    options, _ = compile_options(config=tmp_path / "fdec.toml")
    assert (options.sparsity, options.prune, options.draft) == ("2:4", "mlp=0.25", "layers=1/4")


def test_pyproject_tool_fdec_table_is_read(tiny_models, tmp_path):
    _write(tmp_path / "pyproject.toml", f"""
[project]
name = "demo"

[tool.fdec]
model = "{tiny_models("llama")}"
out = "build"
passes = "none"

[tool.fdec.recipe]
quantize = "none"
""")  # fmt: skip
    proc = _fdec(tmp_path, "compile")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pyproject.toml [tool.fdec]" in proc.stderr  # the progress line naming the config
    report = json.loads((tmp_path / "build" / "report.json").read_text())
    assert report["pipeline"] == []
    assert report["recipe"] == {"quantize": "none", "chosen_by": "options"}
    # fdec.toml beside it wins over pyproject.toml.
    _write(tmp_path / "fdec.toml", 'out = "other"\n[recipe]\nquantise = "int4"\n')
    proc = _fdec(tmp_path, "compile")
    assert proc.returncode == 2
    assert "quantise" in proc.stderr and "fdec.toml" in proc.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[recipe]\nquantise = "int4"\n', "unknown key 'recipe.quantise'; did you mean 'recipe.quantize'?"),
        ('modle = "x"\n', "unknown key 'modle'; did you mean 'model'?"),
        ('[recipe]\nmax_ppl_increase = "5%"\n', "did you mean 'gates.max_ppl_increase'?"),
        ('[gate]\nmax_ppl_increase = 0.1\n', "unknown key 'gate'; did you mean 'gates'?"),
        ('[recipe]\nkeep_fp = "two"\n', "recipe.keep_fp must be an integer >= 0, got 'two' (string)"),
        ("max_batch = 0\n", "max_batch must be an integer >= 1, got 0"),
        ("verify_each = 1\n", "verify_each must be a boolean, got 1 (integer)"),
        ('[gates]\nmax_ppl_increase = "lots"\n', 'gates.max_ppl_increase must be a fraction ("5%" or 0.05)'),
        ('backend = "tensorrt-llm"\n', 'backend must be one of "onnxruntime", "onnxruntime-cuda", "tensorrt", "tensorrt-rtx"'),
        ('[recipe]\nemit = ["gguf"]\n', 'recipe.emit must be a list of strings, each one of "hf-checkpoint"'),
        ("target = [1, 2]\n", "target must be a string or a list of strings"),
        ("model = \n", "is not valid TOML"),
        ('[recipe]\nsparsity = "3:4"\n', 'recipe.sparsity must be one of "none", "2:4"'),
    ],
)  # fmt: skip
def test_mistakes_are_one_line_usage_errors(cli_runner, tmp_path, monkeypatch, text, expected):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "fdec.toml", text)
    result = cli_runner.invoke(cli, ["compile", "some-model", "-o", "b"])
    assert result.exit_code == 2, result.output
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_json_outcome_for_a_bad_config(cli_runner, tmp_path):
    config = _write(tmp_path / "ci.toml", 'model = "m"\nout = "b"\ntarget = "cpu,h1000"\n')
    result = cli_runner.invoke(cli, ["compile", "--config", str(config), "--json"])
    assert result.exit_code == 2
    outcome = json.loads(result.stdout)
    assert outcome["ok"] is False and outcome["exit_code"] == 2
    assert "did you mean 'h100'" in outcome["error"]


def test_paths_are_relative_to_the_config_file(tmp_path):
    sub = tmp_path / "ci"
    sub.mkdir()
    _write(sub / "fdec.toml", 'model = "m"\nout = "build"\ncache_dir = "~/c"\n'
           '[recipe]\ncalibration = "data/calib.txt"\n')  # fmt: skip
    config = load_config(sub / "fdec.toml")
    assert config.values["out"] == sub / "build"
    assert config.values["calibration"] == sub / "data" / "calib.txt"
    assert config.values["cache_dir"] == pathlib.Path("~/c").expanduser()
    assert config.values["model"] == "m"  # a model name is not a path: left as written


def test_missing_model_or_out_names_both_places(cli_runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli_runner.invoke(cli, ["compile", "-o", "b"])
    assert result.exit_code == 2 and "no MODEL given" in result.stderr
    result = cli_runner.invoke(cli, ["compile", "m"])
    assert result.exit_code == 2 and "pass -o DIR, or set out" in result.stderr
    with pytest.raises(InputError, match=r"no \[tool.fdec\] table"):
        _write(tmp_path / "pyproject.toml", "[project]\nname = 'x'\n")
        load_config(tmp_path / "pyproject.toml")


def test_suggestions():
    assert suggest_key("recipe.quantise") == "recipe.quantize"
    assert suggest_key("max_ppl") == "gates.max_ppl_increase"
    assert suggest_key("targets") == "target"
    assert suggest_key("zzzz") is None
