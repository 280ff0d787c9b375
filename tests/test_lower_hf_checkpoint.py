"""Tests of `--emit hf-checkpoint`: the written folder loads in transformers with the right numbers.

Tiny llama, gpt2 and bert are exported once per module and cleaned with the default pipeline.
fp32 checkpoints must load with no missing or unexpected keys and give the source model's
outputs. int4 checkpoints (both quantize-int4 backends) are checked three ways: the packed
tensors' layout, compressed-tensors' own decompressor against the weights the ONNX graph
computes (unpacked here with numpy from MatMulNBits / DequantizeLinear), and transformers +
compressed-tensors loading the folder, whose logits must equal ONNX Runtime's on the graph.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from safetensors.numpy import load_file

from fdec.errors import CompileError, UsageError
from fdec.frontend.export import import_model
from fdec.frontend.source import resolve_source
from fdec.ir import FdecModel, ModelSpec
from fdec.lower.hf_checkpoint import (
    SAFETENSORS_FILE,
    check_quantize,
    check_source,
    write_hf_checkpoint,
)
from fdec.lower.hf_checkpoint.load import load_fp32
from fdec.lower.hf_checkpoint.pack import pack_weight
from fdec.lower.hf_checkpoint.read import Blocked
from fdec.passes import DEFAULT_PIPELINE, make_pass, make_pipeline
from fdec.pipeline import PassManager
from fdec.runtime import session_for_model

_IDS = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(3))


@dataclasses.dataclass
class _Tiny:
    """A tiny model as exported and cleaned by the default pipeline, and its PyTorch source."""

    folder: pathlib.Path
    proto: bytes
    spec: ModelSpec
    hf_model: Any

    def cleaned(self) -> FdecModel:
        graph = ir.serde.deserialize_model(onnx.load_from_string(self.proto))
        return FdecModel(graph, copy.deepcopy(self.spec))

    def quantized(self, **options: Any) -> FdecModel:
        passes = [make_pass("untie-embeddings"), make_pass("quantize-int4", **options)]
        model, _ = PassManager(passes).run(self.cleaned())
        return model


def _export(tiny_models, tmp_path_factory, family: str, folder=None) -> _Tiny:
    cache = tmp_path_factory.mktemp(f"cache-{family}")
    with pytest.MonkeyPatch.context() as patch:  # module scope: the autouse fixture is not up
        patch.setenv("FDEC_CACHE_DIR", str(cache / "fdec"))
        patch.setenv("XDG_CACHE_HOME", str(cache))
        patch.setenv("HF_HUB_OFFLINE", "1")
        folder = folder or tiny_models(family)
        imported = import_model(resolve_source(str(folder)))
        model, _ = PassManager(make_pipeline(list(DEFAULT_PIPELINE))).run(imported.fdec_model)
    proto = ir.serde.serialize_model(model.model).SerializeToString()
    return _Tiny(folder, proto, copy.deepcopy(model.spec), imported.hf_model)


@pytest.fixture(scope="module")
def tiny(tiny_models, tmp_path_factory):
    made: dict[str, _Tiny] = {}

    def get(family: str) -> _Tiny:
        if family not in made:
            made[family] = _export(tiny_models, tmp_path_factory, family)
        return made[family]

    return get


def _load(out: pathlib.Path, kind: str, **kwargs: Any) -> Any:
    """transformers' model of `out`, failing on any missing, unexpected or mismatched key."""
    import transformers

    auto = transformers.AutoModelForCausalLM if kind == "decoder" else transformers.AutoModel
    model, info = auto.from_pretrained(out, dtype=torch.float32, output_loading_info=True, **kwargs)
    assert {key: value for key, value in info.items() if value} == {}
    return model.eval()


def _assert_ort_logits(loaded: Any, model: FdecModel, atol: float = 1e-4) -> np.ndarray:
    """The loaded checkpoint's logits on _IDS equal ONNX Runtime's on the graph; returns them."""
    session = session_for_model(model, optimization="basic")
    ort_logits, _ = session.decode(_IDS.numpy(), session.empty_past(2), 0)
    with torch.no_grad():
        logits = loaded(_IDS).logits.numpy()
    np.testing.assert_allclose(logits, ort_logits, rtol=0, atol=atol)
    return logits


def _hf_state_keys(model: Any) -> set[str]:
    """The keys save_pretrained would write: the state dict without tied aliases."""
    keys, seen = set(), set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) not in seen:
            seen.add(id(parameter))
            keys.add(name)
    return keys


# --- fp32 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fp32_decoder_checkpoint_loads_with_source_logits(tiny, tmp_path, family):
    source = tiny(family)
    report = write_hf_checkpoint(source.cleaned(), source.folder, tmp_path)

    assert report["format"] == "safetensors" and report["quantization"] is None
    assert report["tied_aliases"] == ["lm_head.weight"] and report["dequantized"] == []
    assert {"config.json", SAFETENSORS_FILE, "tokenizer.json"} <= set(report["files"])
    assert report["bytes"] == sum((tmp_path / name).stat().st_size for name in report["files"])
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(
        (source.folder / "config.json").read_text()
    )
    tensors = load_file(tmp_path / SAFETENSORS_FILE)
    assert set(tensors) == _hf_state_keys(source.hf_model)
    assert report["tensors"] == report["kept"] == len(tensors)
    for name, parameter in source.hf_model.named_parameters():
        np.testing.assert_array_equal(tensors[name], parameter.detach().numpy(), err_msg=name)

    loaded = _load(tmp_path, "decoder")
    with torch.no_grad():
        want, got = source.hf_model(_IDS).logits, loaded(_IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_bf16_source_weights_are_written_back_in_bf16(tiny_models, tmp_path_factory, tmp_path):
    """A bf16 source (SmolLM2's dtype): the weights the build left as they were go back in bf16
    (exact: the graph holds them in fp32), so the checkpoint is the source's size, not twice it;
    a weight the build changed (a norm with smoothing folded in) stays in fp32."""
    import shutil

    import transformers
    from safetensors.torch import load_file as load_torch

    folder = tmp_path_factory.mktemp("bf16-llama")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_models("llama"))
    hf.to(torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_models("llama") / name, folder / name)
    source = _export(tiny_models, tmp_path_factory, "llama", folder)
    model = source.cleaned()
    changed = "model.layers.0.input_layernorm.weight"
    norm = model.graph.initializers[changed]
    norm.const_value = ir.tensor(norm.const_value.numpy() * np.float32(1.001), name=changed)
    report = write_hf_checkpoint(model, folder, tmp_path)

    tensors = load_torch(tmp_path / SAFETENSORS_FILE)
    assert tensors[changed].dtype == torch.float32
    assert sorted(report["in_source_dtype"]) == sorted(set(tensors) - {changed})
    for name, parameter in hf.named_parameters():
        if name in tensors and name != changed:
            assert tensors[name].dtype == torch.bfloat16
            torch.testing.assert_close(tensors[name], parameter, rtol=0, atol=0)
    assert report["bytes"] < 1.1 * (folder / SAFETENSORS_FILE).stat().st_size

    loaded = _load(tmp_path, "decoder")
    _assert_ort_logits(loaded, model)


def test_fp32_encoder_checkpoint_loads_with_source_outputs(tiny, tmp_path):
    source = tiny("bert")
    report = write_hf_checkpoint(source.cleaned(), source.folder, tmp_path)

    # The pooler's Linear weight is read by Gemm(transB=1) and the layers' by MatMul: both
    # come back as torch's [out, in].
    tensors = load_file(tmp_path / SAFETENSORS_FILE)
    assert set(tensors) == _hf_state_keys(source.hf_model) and report["tied_aliases"] == []
    loaded = _load(tmp_path, "encoder")
    with torch.no_grad():
        want, got = source.hf_model(_IDS), loaded(_IDS)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=0, atol=1e-5)


def test_untied_lm_head_is_written_and_config_unties(tiny, tmp_path):
    """An lm_head a pass changed gets its own tensor (config untied); one `untie-embeddings`
    only copied (an NVFP4 build's float lm_head) is tied again: one table, as in the source."""
    source = tiny("llama")
    model, _ = PassManager([make_pass("untie-embeddings")]).run(source.cleaned())
    copied = write_hf_checkpoint(model, source.folder, tmp_path / "copied")
    assert copied["tied_aliases"] == ["lm_head.weight"] and copied["config_changes"] == []
    assert "lm_head.weight" not in load_file(tmp_path / "copied" / SAFETENSORS_FILE)

    head = model.graph.initializers[model.spec.weights["lm_head"]]
    head.const_value = ir.tensor(head.const_value.numpy() * np.float32(1.5), name=head.name)
    report = write_hf_checkpoint(model, source.folder, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and report["tied_aliases"] == []
    assert report["config_changes"] == [
        "tie_word_embeddings=false (the lm_head has its own weight)"
    ]
    tensors = load_file(tmp_path / SAFETENSORS_FILE)
    embed = source.hf_model.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(tensors["lm_head.weight"], embed * np.float32(1.5))  # [V, H]
    loaded = _load(tmp_path, "decoder")
    _assert_ort_logits(loaded, model, atol=1e-5)


def test_missing_parameter_is_a_compile_error(tiny, tmp_path):
    source = tiny("llama")
    model = source.cleaned()
    norm = model.graph.initializers["model.norm.weight"]
    norm.name = "renamed_by_some_pass"
    with pytest.raises(CompileError, match=r"model\.norm\.weight"):
        write_hf_checkpoint(model, source.folder, tmp_path)


# --- int4 -----------------------------------------------------------------------------------------


def _graph_weight(model: FdecModel, name: str) -> np.ndarray:
    """The [out, in] float32 weight the graph computes from quantized initializer `name`."""
    value = model.graph.initializers[name]
    node = value.uses()[0].node
    if node.op_type == "MatMulNBits":
        attrs = {key: node.attributes[key].as_int() for key in ("K", "N", "block_size", "bits")}
        k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
        k_blocks = -(-k // block)

        def unpack(packed):  # 8 bits: a byte each; 4: two nibbles, low first
            return packed if attrs["bits"] == 8 else np.stack([packed & 15, packed >> 4], -1)

        packed = value.const_value.numpy().reshape(n, -1)
        codes = unpack(packed).reshape(n, -1)[:, :k].astype(np.int32)
        scales = node.inputs[2].const_value.numpy().reshape(n, k_blocks)
        zero = np.full((n, k_blocks), 1 << (attrs["bits"] - 1))
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            zp = node.inputs[3].const_value.numpy().reshape(n, -1)
            zero = unpack(zp).reshape(n, -1)[:, :k_blocks]
        step = np.repeat(scales, block, axis=1)[:, :k]
        return (codes - np.repeat(zero, block, axis=1)[:, :k]).astype(np.float32) * step
    assert node.op_type == "DequantizeLinear" and node.attributes["axis"].as_int() == 0
    block = node.attributes["block_size"].as_int()
    x = value.const_value.numpy().astype(np.int32)  # [K, N]
    k = x.shape[0]
    scales = node.inputs[1].const_value.numpy()
    zero = np.zeros_like(scales, dtype=np.int32)
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        zero = node.inputs[2].const_value.numpy().astype(np.int32)
    step = np.repeat(scales, block, axis=0)[:k]
    return ((x - np.repeat(zero, block, axis=0)[:k]).astype(np.float32) * step).T


def _module_of(parameter: str) -> str:
    return parameter.rpartition(".")[0]


_INT4_CASES = {
    # MatMulNBits, symmetric, lm_head packed too.
    "llama-nbits-sym": ("llama", dict(backend="onnxruntime", block_size=32), True),
    # Blocked DequantizeLinear with UINT4 zero points; lm_head written dequantized.
    "llama-qdq-asym": ("llama", dict(backend="tensorrt", symmetric=False, block_size=64), False),
    # Blocks of 128 over inputs of 64: one padded block, written as one group of 64.
    "llama-nbits-asym-128": (
        "llama",
        dict(backend="onnxruntime", symmetric=False, block_size=128),
        False,
    ),
    # GPT-2's Conv1D layers cannot be packed: dequantized and ignored; its lm_head is packed.
    "gpt2-qdq-sym": ("gpt2", dict(backend="tensorrt", block_size=32), True),
    # An 8-bit lm_head (the int4 recipes' lm_head_bits): written dequantized, even when asked
    # to pack it (the checkpoint's one scheme is W4A16), from MatMulNBits and from Q/DQ.
    "llama-nbits-8bit-head": ("llama", dict(backend="onnxruntime", lm_head_bits=8), True),
    "llama-qdq-8bit-head": ("llama", dict(backend="tensorrt", lm_head_bits=8), False),
    # int8-wo: 8-bit blocks everywhere, packed W8A16 (4 codes a word), lm_head too.
    "llama-nbits-int8": ("llama", dict(backend="onnxruntime", bits=8), True),
    "llama-qdq-int8-asym": ("llama", dict(backend="tensorrt", bits=8, symmetric=False), False),
}


# Loading with CompressedTensorsConfig(dequantize=True) over the checkpoint's own config warns
# that only the loading attributes are taken from it: that is the point.
@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
@pytest.mark.parametrize("case", list(_INT4_CASES))
def test_int4_checkpoint_is_compressed_tensors_with_graph_numbers(tiny, tmp_path, case):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized import pack_to_int32, unpack_from_int32
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import CompressedTensorsConfig

    family, options, pack_lm_head = _INT4_CASES[case]
    source = tiny(family)
    model = source.quantized(accuracy_level=0, **options)  # ORT runs the exact weights
    report = write_hf_checkpoint(model, source.folder, tmp_path, pack_lm_head=pack_lm_head)

    # Which HF weight is which graph initializer, and what the graph computes for it.
    graph = {
        role: _graph_weight(model, name)
        for role, name in model.spec.weights.items()
        if role != "embed"
    }
    patterns = {
        "llama": {
            "lm_head": "lm_head.weight",
            **{
                f"layers.{i}.{r}": f"model.layers.{i}.{'self_attn' if r in 'qkvo' else 'mlp'}."
                f"{r}_proj.weight"
                for i in range(2)
                for r in ("q", "k", "v", "o", "gate", "up", "down")
            },
        },
        "gpt2": {
            "lm_head": "lm_head.weight",
            **{
                f"layers.{i}.{r}": f"transformer.h.{i}.{m}.weight"
                for i in range(2)
                for r, m in (
                    ("qkv", "attn.c_attn"),
                    ("o", "attn.c_proj"),
                    ("fc_in", "mlp.c_fc"),
                    ("fc_out", "mlp.c_proj"),
                )
            },
        },
    }[family]
    weights = {patterns[role]: array for role, array in graph.items()}  # HF name → [out, in]

    # The config: a valid compressed-tensors W4A16 group scheme.
    config = json.loads((tmp_path / "config.json").read_text())
    quant = config["quantization_config"]
    parsed = QuantizationConfig.model_validate(quant)
    scheme = parsed.config_groups["group_0"]
    block = options.get("block_size", 32)  # quantize-int4's default
    group = 64 if block == 128 else block
    symmetric = options.get("symmetric", True)
    bits = options.get("bits", 4)
    assert (quant["quant_method"], quant["format"]) == ("compressed-tensors", "pack-quantized")
    assert scheme.targets == ["Linear"]
    assert (scheme.weights.num_bits, scheme.weights.type, scheme.weights.strategy) == (
        bits,
        "int",
        "group",
    )
    assert (scheme.weights.group_size, scheme.weights.symmetric) == (group, symmetric)
    conv1d = [name for name in weights if family == "gpt2" and name != "lm_head.weight"]
    packed_head = pack_lm_head and options.get("lm_head_bits", bits) == bits
    head_ignored = [] if packed_head else ["lm_head.weight"]
    assert sorted(report["dequantized"]) == sorted(conv1d + head_ignored)
    assert sorted(quant["ignore"]) == sorted(map(_module_of, conv1d + head_ignored))
    assert config["tie_word_embeddings"] is False
    assert report["quantization"]["group_size"] == group

    # The tensors: pack-quantized layout, bit for bit what compressed-tensors writes.
    tensors = load_file(tmp_path / SAFETENSORS_FILE)
    packed = sorted(set(weights) - set(report["dequantized"]))
    assert sorted(map(_module_of, packed)) == report["packed"]
    for name in packed:
        module, want = _module_of(name), weights[name]
        n, k = want.shape
        assert name not in tensors
        assert tensors[f"{module}.weight_packed"].dtype == np.int32
        assert tensors[f"{module}.weight_packed"].shape == (n, k * bits // 32)
        assert tensors[f"{module}.weight_scale"].shape == (n, k // group)
        np.testing.assert_array_equal(tensors[f"{module}.weight_shape"], [n, k])
        assert (f"{module}.weight_zero_point" in tensors) is not symmetric
        state = {
            key.rpartition(".")[2]: torch.from_numpy(value.copy())
            for key, value in tensors.items()
            if key.startswith(module + ".weight_")
        }
        decompressed = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        np.testing.assert_allclose(decompressed.numpy(), want, rtol=0, atol=1e-6, err_msg=name)
        # Re-quantizing the decompressed weight with the written scales gives the same bytes.
        scale = state["weight_scale"].repeat_interleave(group, dim=1)
        zero = torch.zeros_like(scale)
        if not symmetric:
            zp = unpack_from_int32(state["weight_zero_point"], bits, (n, k // group), packed_dim=0)
            zero = zp.to(torch.float32).repeat_interleave(group, dim=1)
            repacked_zp = pack_to_int32(zp, bits, packed_dim=0)
            assert torch.equal(repacked_zp, state["weight_zero_point"])
        q = torch.where(scale != 0, torch.round(decompressed / scale) + zero, zero)
        assert torch.equal(pack_to_int32(q.to(torch.int8), bits), state["weight_packed"])
    for name in report["dequantized"]:
        want = weights[name].T if name in conv1d else weights[name]
        np.testing.assert_array_equal(tensors[name], want)

    # transformers + compressed-tensors load it; every weight is the graph's, logits ORT's.
    loaded = _load(
        tmp_path, "decoder", quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    parameters = dict(loaded.named_parameters())
    for name, want in weights.items():
        got = parameters[name].detach().numpy()
        np.testing.assert_allclose(got.T if name in conv1d else got, want, atol=1e-6)
    logits = _assert_ort_logits(loaded, model, atol=1e-3)
    if symmetric:  # the default (compressed) load path works for symmetric schemes
        with torch.no_grad():
            compressed = _load(tmp_path, "decoder")(_IDS).logits.numpy()
        np.testing.assert_allclose(compressed, logits, rtol=0, atol=1e-5)


# --- NVFP4 ---------------------------------------------------------------------------------------


def _fp4_build(
    source: _Tiny, activations: str, tied: bool = False, **options: Any
) -> tuple[FdecModel, Any]:
    """The tiny model through quantize-fp4 with smoothing searched, down_proj and lm_head W4A16
    (`tied`: the lm_head, untied, left in float: what --emit hf-checkpoint builds)."""
    batches = [np.random.default_rng(i).integers(0, 320, (1, 64)) for i in range(4)]
    fp4 = make_pass(
        "quantize-fp4", batches=batches, activations=activations, weight_rounding="gptq",
        alpha_search=(0.25, 0.5, 0.75), weight_only=("down", "lm_head"),
        include_lm_head=not tied, **options,
    )  # fmt: skip
    model, records = PassManager([make_pass("untie-embeddings"), fp4]).run(source.cleaned())
    return model, records[-1]


@pytest.mark.parametrize("activations", ["fp4", "float"])
def test_nvfp4_checkpoint_is_compressed_tensors_with_graph_numbers(tiny, tmp_path, activations):
    """quantize-fp4 builds written as nvfp4-pack-quantized: the graph's FP4 codes and FP8 block
    scales byte for byte, inverted tensor scales, W4A4 and W4A16 layers as two config groups;
    transformers + compressed-tensors load it and (fp32 dequantization, its own run-time FP4
    activations) give the logits ONNX Runtime computes for the build's FP4 form; smoothing is
    folded into the norms, the o_proj activations (no norm) left unsmoothed."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file as load_torch

    source = tiny("llama")
    # W4A16: the lm_head left in float (what --emit hf-checkpoint builds), written tied again
    tied = activations == "float"
    model, record = _fp4_build(
        source, activations, tied, smoothing_folded_only=True, smooth_weight_only=tied
    )
    smoothed = record.stats["smoothed"]
    assert any(alpha is not None for alpha, _, _ in smoothed.values())  # folded into norms
    w4a4 = activations == "fp4"
    # unfolded: o_proj's inputs (no norm), and with weight-only smoothing down_proj's
    assert len(record.stats["smoothing_not_foldable"]) == (2 if w4a4 else 4)
    report = write_hf_checkpoint(model, source.folder, tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    quant = config["quantization_config"]
    parsed = QuantizationConfig.model_validate(quant)
    assert quant["format"] == report["quantization"]["format"] == "nvfp4-pack-quantized"
    groups = {
        "NVFP4" if g.input_activations is not None else "NVFP4A16": g
        for g in parsed.config_groups.values()
    }
    attention = [f"model.layers.{i}.self_attn.{r}_proj" for i in range(2) for r in "qkvo"]
    mlp = [f"model.layers.{i}.mlp.{r}_proj" for i in range(2) for r in ("gate", "up")]
    down = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    if w4a4:
        assert sorted(groups["NVFP4"].targets) == sorted(attention + mlp)
        assert groups["NVFP4A16"].targets == down
        assert groups["NVFP4"].input_activations.dynamic == "local"
    else:
        assert list(groups) == ["NVFP4A16"] and groups["NVFP4A16"].targets == ["Linear"]
    for group in groups.values():
        assert (group.weights.type, group.weights.strategy, group.weights.group_size) == (
            "float", "tensor_group", 16,
        )  # fmt: skip
    assert quant["ignore"] == ["lm_head"]  # dequantized (W4A4), or tied and float (W4A16)
    assert report["dequantized"] == ([] if tied else ["lm_head.weight"])
    assert report["tied_aliases"] == (["lm_head.weight"] if tied else [])

    # The tensors: the graph's codes and block scales unchanged, tensor scales inverted.
    tensors = load_torch(tmp_path / SAFETENSORS_FILE)
    hf_name = {f"layers.{i}.{r}": f"{m}" for m in attention + mlp + down
               for i, r in [(int(m.split(".")[2]), m.split(".")[-1][:-5])]}  # fmt: skip
    for role, name in model.spec.weights.items():
        if role not in hf_name:
            continue
        module = hf_name[role]
        dq = model.graph.initializers[name].uses()[0].node
        codes = model.graph.initializers[name].const_value.numpy().view(np.uint8) & 15
        steps = dq.inputs[1].producer()
        packed = tensors[f"{module}.weight_packed"].numpy()
        assert packed.dtype == np.uint8 and packed.shape == (codes.shape[1], codes.shape[0] // 2)
        nibbles = np.stack([packed & 15, packed >> 4], -1).reshape(packed.shape[0], -1)
        np.testing.assert_array_equal(nibbles, codes.T)
        scales = tensors[f"{module}.weight_scale"]
        assert scales.dtype == torch.float8_e4m3fn
        np.testing.assert_array_equal(
            scales.view(torch.uint8).numpy(), steps.inputs[0].const_value.numpy().T.view(np.uint8)
        )
        g = steps.inputs[1].const_value.numpy().reshape(-1)[0]
        np.testing.assert_allclose(tensors[f"{module}.weight_global_scale"].numpy(), [1 / g])
        assert (f"{module}.input_global_scale" in tensors) == (w4a4 and module not in down)

    # transformers + compressed-tensors load it (their loader dequantizes in bf16); with the
    # weights in fp32 (load_fp32) its logits are ORT's on the build.
    default = _load(tmp_path, "decoder")
    default.hf_quantizer.compressor.decompress_model(default)
    bf16 = {name: p.detach().float() for name, p in default.named_parameters()}
    loaded, info = load_fp32(tmp_path)
    assert {key: value for key, value in info.items() if value} == {}
    for name, parameter in loaded.named_parameters():
        if name.endswith(".weight") and name.rpartition(".")[0] in hf_name.values():
            np.testing.assert_allclose(bf16[name], parameter.detach(), rtol=2**-8, atol=0)
    _assert_ort_logits(loaded, model)


def test_nvfp4_builds_a_checkpoint_cannot_hold_are_refused(tiny, tmp_path):
    """Refused, nothing written: activations scaled by an inserted Mul (smoothing that did not
    fold into a norm: the scaled weights would be read unscaled), and W4A4 layers no packed
    format loads (GPT-2's Conv1D: in float their FP4 activations would be lost)."""
    source = tiny("llama")
    model, record = _fp4_build(source, "fp4")
    assert any(alpha is not None for alpha, _, _ in record.stats["smoothed"].values())
    with pytest.raises(CompileError, match="scaled by an inserted Mul") as error:
        write_hf_checkpoint(model, source.folder, tmp_path)
    assert "smoothing_folded_only" in error.value.fix
    gpt2 = tiny("gpt2")
    model, _ = _fp4_build(gpt2, "fp4", smoothing_folded_only=True)
    with pytest.raises(
        CompileError, match=r"W4A4 weight 'transformer\.h\.0\.attn\.c_attn\.weight'"
    ):
        write_hf_checkpoint(model, gpt2.folder, tmp_path)
    assert not (tmp_path / SAFETENSORS_FILE).exists()


@pytest.mark.parametrize("symmetric", [True, False])
def test_blocks_regrouped_for_a_narrower_group_decompress_exactly(symmetric):
    """Blocks of 128 over K=256 written as groups of 32 (another layer's K forces it)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    rng = np.random.default_rng(0)
    n, k, block, group = 24, 256, 128, 32
    zero = np.full((n, k // block), 8) if symmetric else rng.integers(0, 16, (n, k // block))
    weight = Blocked(
        codes=rng.integers(0, 16, (n, k)).astype(np.uint8),
        scales=rng.standard_normal((n, k // block)).astype(np.float32),
        zero_points=zero.astype(np.uint8),
        block_size=block,
        operator="MatMulNBits",
    )
    tensors = pack_weight("m", weight, group, symmetric)
    assert tensors["m.weight_scale"].shape == (n, k // group)
    assert ("m.weight_zero_point" in tensors) is not symmetric
    scheme = preset_name_to_scheme("W4A16" if symmetric else "W4A16_ASYM", ["Linear"])
    scheme.weights.group_size = group
    state = {key[2:]: torch.from_numpy(value) for key, value in tensors.items()}
    got = PackedQuantizationCompressor.decompress(state, scheme)["weight"].numpy()
    np.testing.assert_array_equal(got, weight.dequantized())


def test_int8_build_is_refused_naming_the_supported_values(tiny, tmp_path):
    source = tiny("llama")
    passes = [make_pass("untie-embeddings"), make_pass("quantize-int8")]
    model, _ = PassManager(passes).run(source.cleaned())
    with pytest.raises(UsageError, match="int8") as error:
        write_hf_checkpoint(model, source.folder, tmp_path)
    assert "--quantize int4" in error.value.fix
    assert not (tmp_path / SAFETENSORS_FILE).exists()


def test_check_quantize_refuses_before_any_work():
    for ok in (None, "", "int4", "INT4-rtn", "fp32"):
        check_quantize(ok)
    with pytest.raises(UsageError, match="int8") as error:
        check_quantize("int8")
    assert "int4" in error.value.fix
    for ok in ("fp4", "fp4-w4a4", "fp4-wo"):
        check_quantize(ok)


def test_w4a4_checkpoint_of_conv1d_layers_is_refused_before_loading(tiny_models):
    """GPT-2's Conv1D layers: no NVFP4 format loads them (UsageError from config.json alone,
    exit 2 before any work); fp4-wo and Linear models pass."""
    gpt2 = json.loads((tiny_models("gpt2") / "config.json").read_text())
    with pytest.raises(UsageError, match=r"Conv1D \(transformer\.h\.0\.attn\.c_attn"):
        check_source("fp4", gpt2, "decoder")
    check_source("fp4-wo", gpt2, "decoder")
    check_source("fp4", json.loads((tiny_models("llama") / "config.json").read_text()), "decoder")
