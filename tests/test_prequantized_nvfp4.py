"""NVFP4 checkpoints (compressed-tensors' nvfp4-pack-quantized) compile, keeping their FP4 codes.

The checkpoints are written by the compressed-tensors library itself from a tiny random Qwen2
(round to nearest, its own global and block scales: what llm-compressor's NVFP4 recipe without
GPTQ writes). fdec reads them as the float weights compressed-tensors decompresses them to; on
a target that runs FP4 the default recipe is fp4-wo, whose codes must be the checkpoint's, byte
for byte; elsewhere the target's own recipe applies.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx_ir as ir
import pytest
import torch
from models import compressed_tensors_checkpoint, make_tiny_model
from safetensors.torch import load_file, save_file

from fdec.cli import cli
from fdec.errors import InputError
from fdec.frontend.prequantized import quantized_checkpoint

pytest.importorskip("compressed_tensors")

_PROMPT = "The quick brown fox jumps over the lazy dog while the lighthouse keeper"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2") / "float"
    return make_tiny_model(folder, "qwen2", hidden_size=128, intermediate_size=256)


def _nvfp4_checkpoint(source, folder, preset: str):
    """`source` quantized by compressed-tensors to `preset` ("NVFP4A16" or "NVFP4": W4A4 with a
    stored activation scale), round to nearest on min/max scales, lm_head left in float."""
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    def fill(module, scheme):
        weight = module.weight.data
        global_scale = generate_gparam(weight.min(), weight.max())
        module.weight_global_scale.data = global_scale.reshape(1)
        blocks = weight.reshape(weight.shape[0], -1, 16)
        module.weight_scale.data, _ = calculate_qparams(
            blocks.amin(-1), blocks.amax(-1), scheme.weights, global_scale=global_scale
        )
        if hasattr(module, "input_global_scale"):
            module.input_global_scale.data = torch.tensor([6 * 448 / 4.0])

    return compressed_tensors_checkpoint(source, folder, preset, "nvfp4-pack-quantized", fill)


def _compile(cli_runner, model, out, *args):
    result = cli_runner.invoke(cli, ["compile", str(model), "-o", str(out), "--json", *args])
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout), json.loads((out / "report.json").read_text())


def _fp4_codes(build) -> dict[str, np.ndarray]:
    """Each FP4 weight's E2M1 codes [N, K] in the build's model.onnx, by HF module name."""
    graph = ir.load(str(build / "model.onnx")).graph
    return {
        name.removesuffix(".weight_F4"): (v.const_value.numpy().view(np.uint8) & 15).T
        for name, v in graph.initializers.items()
        if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT4E2M1
    }


def test_an_nvfp4_checkpoint_builds_fp4_on_blackwell_with_its_own_codes(
    source, tmp_path, cli_runner
):
    checkpoint = _nvfp4_checkpoint(source, tmp_path / "nvfp4", "NVFP4A16")
    summary, report = _compile(cli_runner, checkpoint, tmp_path / "rtx5090", "--target", "rtx5090")
    assert report["recipe"]["quantize"] == "fp4-wo"
    assert "the source is compressed-tensors NVFP4" in report["recipe"]["chosen_by"]
    stats = next(p for p in report["passes"] if p["name"] == "quantize-fp4")["stats"]
    assert stats["source_grid_kept"] == 14 and stats["weight_rounding"] == "gptq"
    tensors = load_file(checkpoint / "model.safetensors")
    codes = _fp4_codes(tmp_path / "rtx5090")
    layers = [name for name in codes if name.startswith("model.layers.")]
    assert len(layers) == 14
    for module in layers:
        packed = tensors[f"{module}.weight_packed"].numpy()
        stored = np.stack([packed & 15, packed >> 4], -1).reshape(packed.shape[0], -1)
        np.testing.assert_array_equal(codes[module], stored, err_msg=module)
    assert summary["verification"]["ok"] and report["engines"][0]["status"] == "built"

    # What fdec reads is what compressed-tensors decompresses (in fp32): a float build runs the
    # greedy tokens of transformers on the checkpoint
    from transformers import AutoTokenizer

    from fdec.lower.hf_checkpoint.load import load_fp32

    _compile(cli_runner, checkpoint, tmp_path / "fp32", "--target", "cpu", "--quantize", "none")
    ran = cli_runner.invoke(cli, ["run", str(tmp_path / "fp32"), "-p", _PROMPT, "-n", "24",
                                  "--no-chat-template", "--json"])  # fmt: skip
    assert ran.exit_code == 0, ran.output + ran.stderr
    reference, _ = load_fp32(checkpoint)
    ids = AutoTokenizer.from_pretrained(checkpoint)(_PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = reference.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)  # fmt: skip
    assert json.loads(ran.stdout)["tokens"] == out[0, ids.shape[1] :].tolist()


def test_a_w4a4_nvfp4_checkpoint_reads_its_weights_and_elsewhere_takes_the_targets_recipe(
    source, tmp_path, cli_runner
):
    """An NVFP4 (W4A4) checkpoint's activation scales are not weights: the float folder holds
    none of them. Where FP4 does not run (h100, b200's ONNX Runtime model) the target's own
    recipe applies; `fdec plan` says the same."""
    checkpoint = _nvfp4_checkpoint(source, tmp_path / "nvfp4", "NVFP4")
    _, report = _compile(cli_runner, checkpoint, tmp_path / "b200", "--target", "b200")
    assert report["recipe"]["quantize"] == "fp4-wo"
    stats = next(p for p in report["passes"] if p["name"] == "quantize-fp4")["stats"]
    assert stats["source_grid_kept"] == 14
    for target, backend, want in [
        ("h100", [], "fp8"),
        ("b200", ["--backend", "onnxruntime"], None),
    ]:
        _, report = _compile(cli_runner, checkpoint, tmp_path / target, "--target", target,
                             *backend)  # fmt: skip
        assert "source" not in (report["recipe"]["chosen_by"] or "")
        assert not report["recipe"]["quantize"].startswith("fp4")
        if want:
            assert report["recipe"]["quantize"] == want
    planned = cli_runner.invoke(cli, ["plan", str(checkpoint), "--target", "rtx5090", "--json"])
    assert planned.exit_code == 0, planned.output
    assert "fp4" in planned.stdout and "nvfp4" in planned.stdout


def _modelopt_layout(checkpoint, folder):
    """A compressed-tensors NVFP4 checkpoint in ModelOpt's own names (the inverse of
    compressed-tensors' ModelOptNvfp4Converter): `weight`, `weight_scale_2` = 1 /
    weight_global_scale, `input_scale` = 1 / input_global_scale; named by hf_quant_config.json
    alone, as ModelOpt exports it."""
    shutil.copytree(checkpoint, folder)
    tensors = {}
    for name, tensor in load_file(checkpoint / "model.safetensors").items():
        module, _, part = name.rpartition(".")
        renamed = {"weight_packed": "weight", "weight_global_scale": "weight_scale_2",
                   "input_global_scale": "input_scale"}.get(part)  # fmt: skip
        if renamed is None:
            tensors[name] = tensor
        else:
            tensors[f"{module}.{renamed}"] = tensor if part == "weight_packed" else 1 / tensor
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "hf_quant_config.json").write_text(json.dumps({
        "producer": {"name": "modelopt", "version": "0.39.0"},
        "quantization": {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]},
    }))  # fmt: skip
    return folder


def test_a_modelopt_nvfp4_checkpoint_builds_on_its_own_codes(source, tmp_path, cli_runner):
    """ModelOpt's own NVFP4 layout (no conversion to compressed-tensors first) builds fp4-wo on
    Blackwell with every code the checkpoint's; compressed-tensors' own converter maps the
    layout written here back to the checkpoint it came from."""
    from compressed_tensors.entrypoints.convert import (
        ModelOptNvfp4Converter,
        convert_checkpoint,
    )

    checkpoint = _nvfp4_checkpoint(source, tmp_path / "nvfp4", "NVFP4")
    modelopt = _modelopt_layout(checkpoint, tmp_path / "modelopt")
    converter = ModelOptNvfp4Converter(ignore=["lm_head"], targets=["re:.*_proj$"])
    convert_checkpoint(modelopt, tmp_path / "back", converter, device="cpu")
    back, tensors = load_file(tmp_path / "back" / "model.safetensors"), load_file(
        checkpoint / "model.safetensors"
    )  # fmt: skip
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():  # inverted twice: the global scales within an ulp
        rtol = 1e-6 if tensor.dtype == torch.float32 else 0.0
        torch.testing.assert_close(back[name].reshape(tensor.shape), tensor, rtol=rtol, atol=0.0)

    planned = cli_runner.invoke(cli, ["plan", str(modelopt), "--target", "rtx5090", "--json"])
    assert planned.exit_code == 0, planned.output
    plan = json.loads(planned.stdout)["plans"][0]
    assert (plan["weight_precision"], plan["weight_precision_from"]) == (
        "fp4", "the source (nvfp4)",
    )  # fmt: skip
    _, report = _compile(cli_runner, modelopt, tmp_path / "b", "--target", "rtx5090")
    assert report["recipe"]["quantize"] == "fp4-wo"
    assert "the source is ModelOpt NVFP4" in report["recipe"]["chosen_by"]
    stats = next(p for p in report["passes"] if p["name"] == "quantize-fp4")["stats"]
    assert stats["source_grid_kept"] == 14
    codes = _fp4_codes(tmp_path / "b")
    for module in [name for name in codes if name.startswith("model.layers.")]:
        packed = tensors[f"{module}.weight_packed"].numpy()
        stored = np.stack([packed & 15, packed >> 4], -1).reshape(packed.shape[0], -1)
        np.testing.assert_array_equal(codes[module], stored, err_msg=module)
    assert report["engines"][0]["status"] == "built"


def test_an_nvfp4_checkpoint_of_other_groups_is_refused(tmp_path):
    config = {
        "quantization_config": {
            "quant_method": "compressed-tensors",
            "format": "nvfp4-pack-quantized",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "format": "nvfp4-pack-quantized",
                    "weights": {"num_bits": 4, "type": "float", "group_size": 32},
                }
            },
        }
    }
    with pytest.raises(InputError, match="not FP4 in groups of 16"):
        quantized_checkpoint(config, tmp_path)
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 16
    assert quantized_checkpoint(config, tmp_path).method == "nvfp4"
    modelopt = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 32}
    with pytest.raises(InputError, match="ModelOpt NVFP4 checkpoint in groups of 32"):
        quantized_checkpoint({"quantization_config": modelopt}, tmp_path)
    modelopt["quant_algo"] = "NVFP4_AWQ"  # AWQ's pre-scales are not read: refused by name
    with pytest.raises(InputError, match="already quantized"):
        quantized_checkpoint({"quantization_config": modelopt}, tmp_path)
