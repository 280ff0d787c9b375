"""FP8 checkpoints compile: fdec reads their E4M3 weights and, where the target runs FP8, keeps
their codes; and fdec's own fp8 builds are written as such checkpoints.

Four layouts are checked on a tiny random Qwen2: compressed-tensors' `float-quantized` written
by the compressed-tensors library itself (tensor scales with static activations, llm-compressor's
FP8; channel scales with dynamic ones, FP8_DYNAMIC), transformers' block-scaled `fp8`
(`weight_scale_inv`, Qwen3-FP8's and DeepSeek-V3's layout) and ModelOpt's FP8 named only by an
hf_quant_config.json, both written here with numpy as those formats define them.
"""

from __future__ import annotations

import json
import shutil

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
import torch
from models import compressed_tensors_checkpoint, make_tiny_model
from safetensors.torch import load_file, save_file

from fdec.cli import cli
from fdec.errors import InputError
from fdec.frontend.prequantized import dequantize_folder, quantized_checkpoint

pytest.importorskip("compressed_tensors")

_PROMPT = "The quick brown fox jumps over the lazy dog while the lighthouse keeper"
_LAYERS = 14  # 2 decoder layers × q, k, v, o, gate, up, down


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2") / "float"
    return make_tiny_model(folder, "qwen2", hidden_size=128, intermediate_size=256)


def _ct_fp8(source, folder, preset: str):
    """`source` quantized by compressed-tensors to `preset` ("FP8": one weight scale per tensor
    and a static activation scale; "FP8_DYNAMIC": one per output channel), min/max scales,
    round to nearest, lm_head left in float."""
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    def fill(module, scheme):
        weight = module.weight.data
        dims = None if scheme.weights.strategy == "tensor" else 1
        low = weight.amin(dims, keepdim=True) if dims else weight.min().reshape(1)
        high = weight.amax(dims, keepdim=True) if dims else weight.max().reshape(1)
        scale, _ = calculate_qparams(low, high, scheme.weights)
        module.weight_scale.data = scale.reshape(module.weight_scale.shape)
        if hasattr(module, "input_scale"):
            module.input_scale.data = torch.tensor([0.01])

    return compressed_tensors_checkpoint(source, folder, preset, "float-quantized", fill)


def _hand_fp8(source, folder, layout: str, block: int = 32):
    """`source` in an FP8 layout written with numpy: "block" (transformers' fp8, `block` ×
    `block` blocks: `weight_scale_inv`) or "modelopt" (one `weight_scale` per tensor, input
    and KV-cache scales, named by hf_quant_config.json alone)."""
    shutil.copytree(source, folder)
    tensors = load_file(source / "model.safetensors")
    out = {}
    for name, tensor in tensors.items():
        if not (name.startswith("model.layers.") and name.endswith("_proj.weight")):
            out[name] = tensor
            continue
        w, prefix = tensor.numpy(), name.removesuffix(".weight")
        if layout == "block":
            n, k = w.shape
            scales = np.abs(w.reshape(n // block, block, k // block, block)).max(axis=(1, 3))
            scales = scales / 448
            steps = np.repeat(np.repeat(scales, block, 0), block, 1)
            out[f"{prefix}.weight_scale_inv"] = torch.from_numpy(scales.astype(np.float32))
        else:
            steps = np.float32(np.abs(w).max() / 448)
            out[f"{prefix}.weight_scale"] = torch.tensor(steps)
            out[f"{prefix}.input_scale"] = torch.tensor(0.01)
            if prefix.endswith(("k_proj", "v_proj")):
                out[f"{prefix}.{prefix[-6]}_scale"] = torch.tensor(0.02)
        codes = (w / steps).astype(ml_dtypes.float8_e4m3fn)
        out[name] = torch.from_numpy(codes.view(np.uint8)).view(torch.float8_e4m3fn)
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    if layout == "block":
        config["quantization_config"] = {
            "quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [block, block]
        }  # fmt: skip
    else:
        (folder / "hf_quant_config.json").write_text(json.dumps({
            "producer": {"name": "modelopt", "version": "0.39.0"},
            "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8",
                             "exclude_modules": ["lm_head"]},
        }))  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _compile(cli_runner, model, out, *args):
    result = cli_runner.invoke(cli, ["compile", str(model), "-o", str(out), "--json", *args])
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout), json.loads((out / "report.json").read_text())


def _fp8_weights(build) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each FP8 weight's (E4M3 codes [N, K] as bytes, scales [N]) in the build's model.onnx, by
    HF module name."""
    graph = ir.load(str(build / "model.onnx")).graph
    found = {}
    for name, value in graph.initializers.items():
        if name.endswith(".weight_F8"):
            module = name.removesuffix(".weight_F8")
            scales = graph.initializers[f"{module}.weight_scales"].const_value.numpy()
            found[module] = (value.const_value.numpy().view(np.uint8).T, scales)
    return found


def _stats(report, name="quantize-fp8"):
    return next(p for p in report["passes"] if p["name"] == name)["stats"]


@pytest.mark.parametrize("preset", ["FP8", "FP8_DYNAMIC", "modelopt"])
def test_an_fp8_checkpoint_builds_fp8_on_its_own_codes(source, tmp_path, cli_runner, preset):
    """Tensor- and channel-scaled FP8 checkpoints build the target's fp8 with every code the
    checkpoint's, byte for byte: W8A8 layers and the W8A16 down_proj (FP8 weights there, not
    int8) alike, on the checkpoint's scales; a real TensorRT-RTX engine builds."""
    if preset == "modelopt":
        checkpoint = _hand_fp8(source, tmp_path / "ckpt", "modelopt")
    else:
        checkpoint = _ct_fp8(source, tmp_path / "ckpt", preset)
    summary, report = _compile(cli_runner, checkpoint, tmp_path / "b", "--target", "rtx4090")
    assert report["recipe"]["quantize"] == "fp8"
    kind = "per channel" if preset == "FP8_DYNAMIC" else "per tensor"
    assert f"FP8 E4M3 ({kind})" in report["recipe"]["chosen_by"]
    stats = _stats(report)
    assert stats["source_grid_kept"] == _LAYERS
    assert sorted(stats["fp8_weight_only"]) == [
        f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)
    ]
    tensors = load_file(checkpoint / "model.safetensors")
    built = _fp8_weights(tmp_path / "b")
    assert len(built) == _LAYERS
    for module, (codes, scales) in built.items():
        stored = tensors[f"{module}.weight"].view(torch.uint8).numpy()
        np.testing.assert_array_equal(codes, stored, err_msg=module)
        scale = tensors[f"{module}.weight_scale"].float().numpy().reshape(-1)
        np.testing.assert_allclose(scales, np.broadcast_to(scale, scales.shape), rtol=1e-6)
    assert summary["verification"]["ok"] and report["engines"][0]["status"] == "built"
    if preset == "modelopt":  # activation and KV-cache scales are not weights of the float model
        assert any(n.endswith(("input_scale", "k_scale", "v_scale")) for n in tensors)
        fmt = quantized_checkpoint({}, checkpoint)
        assert fmt is not None and fmt.describe() == "ModelOpt FP8 E4M3 (per tensor)"
        (tmp_path / "float").mkdir()
        dequantize_folder(checkpoint, fmt, tmp_path / "float")
        names = load_file(tmp_path / "float" / "model.safetensors")
        assert not any(n.endswith(("_scale", "_scale_inv")) for n in names)
        assert not (tmp_path / "float" / "hf_quant_config.json").exists()


def test_a_block_scaled_fp8_checkpoint_reads_exactly_and_rounds_per_channel(
    source, tmp_path, cli_runner
):
    """transformers' block-scaled fp8 reads as the values transformers dequantizes it to (its
    greedy tokens, on the CPU), and its 32 × 32 blocks, which per-channel FP8 cannot hold, are
    rounded again; on a CPU target the target's own recipe applies."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = _hand_fp8(source, tmp_path / "ckpt", "block")
    _, report = _compile(cli_runner, checkpoint, tmp_path / "h100", "--target", "h100")
    assert report["recipe"]["quantize"] == "fp8"
    assert "transformers FP8 E4M3 (32×32 blocks)" in report["recipe"]["chosen_by"]
    assert _stats(report)["source_grid_kept"] == 0

    _, report = _compile(cli_runner, checkpoint, tmp_path / "fp32", "--target", "cpu",
                         "--quantize", "none")  # fmt: skip
    ran = cli_runner.invoke(cli, ["run", str(tmp_path / "fp32"), "-p", _PROMPT, "-n", "24",
                                  "--no-chat-template", "--json"])  # fmt: skip
    assert ran.exit_code == 0, ran.output + ran.stderr
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    # no GPU: transformers dequantizes the blocks itself, into float32 weights
    assert reference.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    ids = AutoTokenizer.from_pretrained(checkpoint)(_PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = reference.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)  # fmt: skip
    assert json.loads(ran.stdout)["tokens"] == out[0, ids.shape[1] :].tolist()


def test_fp8_checkpoints_fdec_does_not_read_are_refused_with_the_reason(source, tmp_path):
    checkpoint = _hand_fp8(source, tmp_path / "ckpt", "modelopt")
    refusals = [
        ({"quant_method": "modelopt", "quant_algo": "INT4_AWQ"}, "already quantized"),
        ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {
            "g": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                              "dynamic": True}}}}, "dynamic weight scales"),
        ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {
            "g": {"weights": {"num_bits": 8, "type": "float", "strategy": "group"}}}},
         "strategies"),
    ]  # fmt: skip
    for quantization, reason in refusals:
        with pytest.raises(InputError, match=reason):
            quantized_checkpoint({"quantization_config": quantization}, checkpoint)
    # E5M2 weights where the config says E4M3
    tensors = load_file(checkpoint / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name].float().to(torch.float8_e5m2)
    save_file(tensors, str(checkpoint / "model.safetensors"))
    fmt = quantized_checkpoint({}, checkpoint)
    (tmp_path / "float").mkdir()
    with pytest.raises(InputError, match="float8_e5m2, not float8_e4m3fn"):
        dequantize_folder(checkpoint, fmt, tmp_path / "float")


def test_an_fp8_build_is_written_as_an_fp8_checkpoint_and_read_back(source, tmp_path, cli_runner):
    """`--quantize fp8 --emit hf-checkpoint`: compressed-tensors float-quantized, the W8A8 layers
    (static activation scales) and the W8A16 ones (FP8 weights) two groups naming their
    modules, the lm_head float; the graph's codes and scales byte for byte. transformers +
    compressed-tensors compute ONNX Runtime's logits on the build, and fdec reads the
    checkpoint back onto the same codes."""
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoModelForCausalLM

    from fdec.runtime.session import OrtModel, open_session

    build = tmp_path / "b"
    _, report = _compile(cli_runner, source, build, "--target", "rtx4090", "--quantize", "fp8",
                         "--emit", "hf-checkpoint")  # fmt: skip
    written = report["checkpoint"]
    assert written["format"] == "compressed-tensors float-quantized"
    assert written["quantization"]["schemes"] == {"FP8": 12, "FP8A16": 2}
    checkpoint = build / "hf-checkpoint"
    quantization = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    groups = QuantizationConfig.model_validate(quantization).config_groups.values()
    down = [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]
    for group in groups:
        assert (group.weights.type, group.weights.strategy, group.weights.num_bits) == (
            "float", "channel", 8,
        )  # fmt: skip
        activations = group.input_activations
        assert (group.targets == down) is (activations is None)
        assert activations is None or (activations.strategy, activations.dynamic) == (
            "tensor", False,
        )  # fmt: skip
    assert "lm_head" in quantization["ignore"]
    tensors = load_file(checkpoint / "model.safetensors")
    built = _fp8_weights(build)
    assert len(built) == _LAYERS
    for module, (codes, scales) in built.items():
        np.testing.assert_array_equal(tensors[f"{module}.weight"].view(torch.uint8), codes)
        np.testing.assert_array_equal(tensors[f"{module}.weight_scale"].numpy().ravel(), scales)
        assert (f"{module}.input_scale" in tensors) is (module not in down)

    runtime = json.loads((build / "fdec-runtime.json").read_text())
    session = open_session(build / "model.onnx", providers=["CPUExecutionProvider"],
                           optimization="basic")  # fmt: skip
    ort = OrtModel(session, kv_buffer=(runtime.get("kv_cache") or {}).get("buffer"))
    ids = np.array([[1, 5, 9, 22, 100, 7, 3, 44, 12, 13, 200, 17]], dtype=np.int64)
    want, _ = ort.decode(ids, ort.empty_past(1), 0)
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        got = loaded(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)

    _, back = _compile(cli_runner, checkpoint, tmp_path / "back", "--target", "rtx4090")
    assert _stats(back)["source_grid_kept"] == _LAYERS
    for module, (codes, scales) in _fp8_weights(tmp_path / "back").items():
        np.testing.assert_array_equal(codes, built[module][0], err_msg=module)
        np.testing.assert_allclose(scales, built[module][1], rtol=1e-6)
