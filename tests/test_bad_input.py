"""Bad input: each case is one clear error line naming the fix, exit code 2, and nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from fdec.cli import cli


def _expect_error(cli_runner, args, *, words, out, code=2):
    result = cli_runner.invoke(cli, args)
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    lines = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and not line.startswith("[fdec ")
    ]
    assert len(lines) == 1, result.stderr  # one line, no traceback
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not out.exists()
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert leftovers == []
    return lines[0]


def _copy(model, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(model, target)
    return target


def test_missing_path(cli_runner, tmp_path):
    out = tmp_path / "build"
    _expect_error(cli_runner, ["compile", str(tmp_path / "nope"), "-o", str(out)],
                  words=["does not exist", "smollm2-135m"], out=out)  # fmt: skip


def test_folder_without_config(cli_runner, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "build"
    _expect_error(cli_runner, ["compile", str(tmp_path / "empty"), "-o", str(out)],
                  words=["no config.json", "safetensors"], out=out)  # fmt: skip


def test_peft_adapter_folder_says_merge_it_first(cli_runner, tmp_path):
    adapter = tmp_path / "lora"
    adapter.mkdir()
    config = {"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M", "peft_type": "LORA"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    out = tmp_path / "build"
    _expect_error(cli_runner, ["compile", str(adapter), "-o", str(out)],
                  words=["PEFT adapter", "SmolLM2-135M", "merge_and_unload"], out=out)  # fmt: skip


def test_unsupported_architecture_names_supported_ones(cli_runner, tmp_path):
    folder = tmp_path / "t5"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]})
    )
    out = tmp_path / "build"
    line = _expect_error(cli_runner, ["compile", str(folder), "-o", str(out)],
                         words=["unsupported architecture", "t5", "T5ForConditionalGeneration"], out=out)  # fmt: skip
    for supported in ("llama", "qwen3", "gemma", "olmo2", "stablelm", "phi3", "gpt2", "bert"):
        assert supported in line


@pytest.mark.parametrize("damage", ["truncate", "header", "lying-shape"])
def test_corrupt_weights(damage, tiny_models, cli_runner, tmp_path):
    folder = _copy(tiny_models("llama"), tmp_path)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "header":
        data[8:40] = b"\xff" * 32
    else:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        name = next(k for k in header if k != "__metadata__")
        header[name]["shape"] = [dim * 2 for dim in header[name]["shape"]]
        text = json.dumps(header).encode().ljust(header_len)
        data[8 : 8 + header_len] = text[:header_len] if len(text) == header_len else text
        data[:8] = len(text).to_bytes(8, "little")
    weights.write_bytes(bytes(data))
    out = tmp_path / "build"
    _expect_error(cli_runner, ["compile", str(folder), "-o", str(out)],
                  words=["model.safetensors", "corrupt" if damage != "truncate" else "truncated"],
                  out=out)  # fmt: skip


def test_unknown_target_lists_known_ones(tiny_models, cli_runner, tmp_path):
    out = tmp_path / "build"
    _expect_error(cli_runner, ["compile", str(tiny_models("llama")), "--target", "h1000", "-o", str(out)],
                  words=["unknown target 'h1000'", "h100", "a100", "cpu"], out=out)  # fmt: skip


@pytest.mark.parametrize("given", ["", " , "])
def test_empty_target_is_refused_not_taken_as_the_default(given, tiny_models, cli_runner, tmp_path):
    # `--target ""` used to build for cpu (an empty value read as "not given")
    out = tmp_path / "build"
    _expect_error(cli_runner, ["compile", str(tiny_models("llama")), "--target", given, "-o", str(out)],
                  words=["no target given", "--target cpu"], out=out)  # fmt: skip


def test_output_path_is_a_file(tiny_models, cli_runner, tmp_path):
    out = tmp_path / "taken"
    out.write_text("not a folder")
    result = cli_runner.invoke(cli, ["compile", str(tiny_models("llama")), "-o", str(out)])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: output path")
    assert "is a file" in result.stderr
    assert out.read_text() == "not a folder"


def test_pickle_weights_need_trust_pickle(tiny_models, cli_runner, tmp_path):
    import torch
    from safetensors.torch import load_file

    folder = _copy(tiny_models("gpt2"), tmp_path)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    out = tmp_path / "build"
    _expect_error(cli_runner, ["compile", str(folder), "-o", str(out)],
                  words=["pickle", "pytorch_model.bin", "--trust-pickle"], out=out)  # fmt: skip
    # With the explicit flag it loads (weights-only) and verifies.
    result = cli_runner.invoke(
        cli,
        ["compile", str(folder), "-o", str(out), "--trust-pickle", "--json", "--quantize", "none"],
    )
    assert result.exit_code == 0, result.output + result.stderr
    assert json.loads(result.stdout)["verification"]["greedy_identical"] is True


def test_unknown_pass(tiny_models, cli_runner, tmp_path):
    out = tmp_path / "build"
    _expect_error(cli_runner, ["compile", str(tiny_models("llama")), "-o", str(out), "--passes", "fold,cse"],
                  words=["unknown pass 'fold'", "fold-constants"], out=out)  # fmt: skip


@pytest.mark.parametrize(
    "passes, words",
    [
        # options only --prune / --kv-window give: the pass died on its defaults (prune with
        # an internal TypeError, kv-policy naming the --kv-window already given)
        ("prune", ["--passes prune", "--prune heads=F,mlp=F,layers=N"]),
        ("kv-policy", ["--passes kv-policy", "--kv-window W"]),
        # a quantizer calibrating after the cache's Q/DQ fed its float cache to int8 inputs
        # (ONNX Runtime's INVALID_ARGUMENT, exit 1); here the cpu recipe's int4-awq follows
        ("quantize-kv-cache", ["quantize-int4-awq calibrates after it", "--kv-dtype"]),
    ],
)
def test_pass_lists_fdec_cannot_run_are_refused_when_planned(
    tiny_models, cli_runner, tmp_path, passes, words
):
    out = tmp_path / "build"
    _expect_error(cli_runner, ["compile", str(tiny_models("llama")), "-o", str(out), "--passes", passes],
                  words=words, out=out)  # fmt: skip


def test_hub_id_offline_fails_clearly(cli_runner, tmp_path):
    out = tmp_path / "build"
    _expect_error(cli_runner, ["compile", "someorg/some-model", "-o", str(out)],
                  words=["cannot download 'someorg/some-model'", "local folder"], out=out)  # fmt: skip


def test_config_that_does_not_match_weights(tiny_models, cli_runner, tmp_path):
    folder = _copy(tiny_models("llama"), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = 128
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "build"
    _expect_error(cli_runner, ["compile", str(folder), "-o", str(out)],
                  words=["do not match config.json"], out=out)  # fmt: skip


def test_config_transformers_refuses_is_one_line(tiny_models, cli_runner, tmp_path):
    # transformers' strict config classes raised StrictDataclassFieldValidationError: exit 1
    folder = _copy(tiny_models("llama"), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["num_attention_heads"] = "four"
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "build"
    _expect_error(cli_runner, ["compile", str(folder), "-o", str(out)],
                  words=["does not load in transformers", "num_attention_heads", "expected int"],
                  out=out)  # fmt: skip


@pytest.mark.parametrize(
    "quantization, words",
    [({"quant_method": "bitsandbytes", "load_in_4bit": True},
      ["already quantized", "bitsandbytes", "original float checkpoint"]),
     ({"quant_method": "gptq", "bits": 3, "group_size": 128},
      ["GPTQ 3-bit", "fdec reads 4 and 8-bit ones", "original float checkpoint"]),
     ({"quant_method": "awq", "bits": 8, "group_size": 128},
      ["AWQ 8-bit", "fdec reads 4-bit ones", "original float checkpoint"]),
     ({"quant_method": "awq", "bits": 4, "version": "gemv"}, ["AWQ gemv", "GEMM"]),
     ({"quant_method": "gptq", "bits": 4, "group_size": 128}, ["no layer holds qweight"])],
)  # fmt: skip
def test_checkpoint_quantized_by_another_tool_is_refused(
    quantization, words, tiny_models, cli_runner, tmp_path
):
    # bitsandbytes checkpoints died in transformers' loader (exit 1: ImportError "requires
    # bitsandbytes"); fdec reads GPTQ/AWQ/compressed-tensors int4/int8 (tests/test_prequantized.py)
    # and names what it does not
    folder = _copy(tiny_models("llama"), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quantization
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "build"
    _expect_error(cli_runner, ["compile", str(folder), "-o", str(out)], words=words,
                  out=out)  # fmt: skip


def test_dynamic_ntk_rotary_is_refused_before_the_export(tiny_models, cli_runner, tmp_path):
    # died in torch.export: "ONNX export failed ...; report the model to the fdec developers"
    folder = _copy(tiny_models("llama"), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "dynamic", "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "build"
    _expect_error(cli_runner, ["compile", str(folder), "-o", str(out)],
                  words=["dynamic NTK", "cannot export", 'rope_type "default"'], out=out)  # fmt: skip


def test_json_mode_reports_error_as_json(cli_runner, tmp_path):
    result = cli_runner.invoke(
        cli, ["compile", str(tmp_path / "nope"), "-o", str(tmp_path / "b"), "--json"]
    )
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["exit_code"] == 2 and "does not exist" in data["error"]


def test_real_entry_point_prints_one_line_and_exit_code(tmp_path):
    """The installed `fdec` script, not the in-process runner: no traceback, exit code 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "fdec.cli", "compile", str(tmp_path / "missing"), "-o", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "Traceback" not in proc.stderr
    usage = subprocess.run(
        [sys.executable, "-m", "fdec.cli", "compile"], capture_output=True, text=True, timeout=120
    )
    assert usage.returncode == 2
