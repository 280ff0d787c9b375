"""Checkpoints another tool quantized to int4 (GPTQ, AWQ, compressed-tensors) compile, keeping
their int4 blocks exactly.

The checkpoints are made here from a tiny random Qwen2: GPTQ and AWQ by this file's own packers
(written from the formats' descriptions, not from fdec's reader), compressed-tensors by the
compressed-tensors library itself. The reference is each quantized model as its own tools read
it: transformers with compressed-tensors decompressing (`dequantize`), for AWQ after
compressed-tensors' own AutoAWQ converter; for GPTQ the float model holding the test's codes.
Group scales are widened by 1.2 so a group's codes do not reach both 0 and 15 (as after GPTQ's
updates): min/max rounding (ONNX Runtime's RTN, GGUF's grid) could not reproduce them.

The builds' logits are held to 0.15 of the reference's: what is left is the int8 embedding the
int4 recipe adds (measured 0.058–0.076 on these checkpoints; the same builds rounding the
checkpoints' values again instead of keeping their blocks: 0.94–1.19, top-1 0.66–0.69).
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import onnx
import pytest
import torch
from models import TOKENIZER_VOCAB, make_tiny_model

from fdec.cli import cli

_AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PROMPT = "The quick brown fox jumps over the lazy dog while the lighthouse keeper"


def _float_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny Qwen2 with 128/256-wide layers (groups of 32, 64 and 128 fit every one)."""
    folder = tmp_path_factory.mktemp("qwen2") / "float"
    return make_tiny_model(folder, "qwen2", hidden_size=128, intermediate_size=256)


def _grid(weight, group, symmetric, widen=1.2, bits=4):
    """Codes [K, N], zero points and float16 scales [groups, N] of a torch [N, K] weight."""
    w = weight.detach().numpy().T.astype(np.float32)  # [K, N]
    k, n = w.shape
    blocks = w.reshape(k // group, group, n)
    top, center = (1 << bits) - 1, 1 << (bits - 1)
    if symmetric:
        scales = np.abs(blocks).max(axis=1) / (center - 1) * widen
        zeros = np.full(scales.shape, center)
    else:
        low, high = np.minimum(blocks.min(axis=1), 0), np.maximum(blocks.max(axis=1), 0)
        scales = (high - low) / top * widen
        zeros = np.clip(np.rint(-low / scales), 0, top).astype(np.int64)
    scales = scales.astype(np.float16).astype(np.float32)
    rows = np.arange(k) // group
    codes = np.clip(np.rint(w / scales[rows]) + zeros[rows], 0, top).astype(np.int64)
    return codes, zeros, scales


def _pack_rows(values, bits=4):
    """[K, N] values as int32 [K·bits/32, N]: input pr + j in bits·j of word r (p = 32/bits)."""
    per = 32 // bits
    v = values.astype(np.uint32).reshape(-1, per, values.shape[1])
    return sum(v[:, j] << (bits * j) for j in range(per)).astype(np.uint32).view(np.int32)


def _pack_columns(values, order=None, bits=4):
    """[R, N] values as int32 [R, N·bits/32]: column pc + order[i] in bits·i of word c."""
    per = 32 // bits
    order = range(per) if order is None else order
    v = values.astype(np.uint32).reshape(values.shape[0], -1, per)
    return (
        sum(v[:, :, o] << (bits * i) for i, o in enumerate(order)).astype(np.uint32).view(np.int32)
    )


def _activation_order(prefix, k):
    """The order GPTQ's desc_act quantizes a layer's inputs in: by its input's statistics, so
    layers reading one input (q/k/v, gate/up) share it. Here a random one per input."""
    layer, kind = prefix.split(".")[2], prefix.rsplit(".", 1)[-1]
    reads = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp",
             "up_proj": "mlp"}.get(kind, kind)  # fmt: skip
    seed = int(layer) * 10 + ["attn", "o_proj", "mlp", "down_proj"].index(reads)
    return np.random.default_rng(seed).permutation(k)


def _rule(prefix, dynamic):
    """GPTQModel's `dynamic` for one layer: the first pattern matching its name from the start
    decides; None (a "-:" rule: left in float), its overrides, or {} (none matches)."""
    for pattern, overrides in (dynamic or {}).items():
        if re.match(pattern.removeprefix("-:").removeprefix("+:"), prefix):
            return None if pattern.startswith("-:") else overrides
    return {}


def _write_checkpoint(
    source, folder, method, group, symmetric=False, act_order=False, bits=4, dynamic=None
):
    """`source` as a GPTQ (v1 format; `bits` 4 or 8) or AWQ (GEMM) checkpoint in `folder`;
    returns the float weights its groups stand for, by parameter name. With `act_order` (GPTQ's
    desc_act) each layer's groups are consecutive in `_activation_order`, not in its inputs'
    order: `g_idx` names each input's group. `dynamic` (GPTQ): GPTQModel's per-layer rules,
    written into the config; a layer they leave float keeps its weight (and is not returned)."""
    import safetensors.torch

    model = _float_model(source)
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    expected = {}
    for name in list(tensors):
        prefix = name.removesuffix(".weight")
        if not name.endswith(".weight") or prefix.rsplit(".", 1)[-1] not in _LINEAR:
            continue
        own = _rule(prefix, dynamic)
        if own is None:
            continue
        weight = tensors.pop(name)
        k = weight.shape[1]
        order = _activation_order(prefix, k) if act_order else np.arange(k)
        layer_bits, layer_group = own.get("bits", bits), own.get("group_size", group)
        codes, zeros, scales = _grid(weight[:, order], layer_group, symmetric, bits=layer_bits)
        inputs = np.empty_like(order)
        inputs[order] = np.arange(k)  # input i is the inputs[i]-th in order
        codes = codes[inputs]  # [K, N] rows back in input order
        g_idx = inputs // layer_group
        expected[name] = ((codes - zeros[g_idx]) * scales[g_idx]).T.astype(np.float32)
        if method == "gptq":
            tensors[f"{prefix}.qweight"] = _pack_rows(codes, layer_bits)
            minus_one = (zeros - 1) & ((1 << layer_bits) - 1)  # v1: stored minus one
            tensors[f"{prefix}.qzeros"] = _pack_columns(minus_one, bits=layer_bits)
            tensors[f"{prefix}.g_idx"] = g_idx.astype(np.int32)
        else:
            tensors[f"{prefix}.qweight"] = _pack_columns(codes, _AWQ_ORDER)
            tensors[f"{prefix}.qzeros"] = _pack_columns(zeros, _AWQ_ORDER)
        tensors[f"{prefix}.scales"] = scales.astype(np.float16)
    folder.mkdir(parents=True)
    safetensors.torch.save_file(
        {k: torch.as_tensor(v).contiguous() for k, v in tensors.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order,
         "sym": symmetric, "checkpoint_format": "gptq", **({"dynamic": dynamic} if dynamic else {})}
        if method == "gptq"
        else {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
              "version": "gemm"}
    )  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    for path in source.glob("tokenizer*"):
        (folder / path.name).write_bytes(path.read_bytes())
    return expected


def _compressed_tensors(source, folder, group, bits=4):
    """`source` quantized (asymmetric `bits`-bit groups, the test's grid) and saved by the
    compressed-tensors library as a pack-quantized checkpoint."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )

    model = _float_model(source)
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group",
                               group_size=group)  # fmt: skip
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"g": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"], format="pack-quantized",
    ))  # fmt: skip
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            _, zeros, scales = _grid(module.weight, group, symmetric=False, bits=bits)
            module.weight_scale.data = torch.from_numpy(scales.T.copy())
            # compressed-tensors' codes and zero points are signed (the stored value - 8 / 128)
            signed = zeros.T - (1 << (bits - 1))
            module.weight_zero_point.data = torch.from_numpy(signed).to(torch.int8)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(folder)
    for path in source.glob("tokenizer*"):
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def _dequantizing_transformers(folder):
    """A compressed-tensors checkpoint as transformers reads it, decompressed to float."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()


def _decompressed(folder):
    """The checkpoint as transformers decompresses it, and its linear layers' [N, K] weights."""
    reference = _dequantizing_transformers(folder)
    expected = {
        name: parameter.detach().numpy()
        for name, parameter in reference.named_parameters()
        if name.endswith(".weight") and name.rsplit(".", 2)[-2] in _LINEAR
    }
    return reference, expected


def _greedy(model, folder, steps=40):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(_PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=steps, do_sample=False, eos_token_id=None,
                             pad_token_id=0)  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def _compile(cli_runner, model, out, *args):
    result = cli_runner.invoke(cli, ["compile", str(model), "-o", str(out), "--json", *args])
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout), json.loads((out / "report.json").read_text())


def _close(summary):
    verification = summary["verification"]
    assert verification["max_abs_error"] <= 0.15 and verification["top1_agreement"] >= 0.95


def _run(cli_runner, build, steps=40):
    ran = cli_runner.invoke(
        cli, ["run", str(build), "-p", _PROMPT, "-n", str(steps), "--no-chat-template", "--json"]
    )
    assert ran.exit_code == 0, ran.output + ran.stderr
    return json.loads(ran.stdout)["tokens"]


def _nibbles(packed):
    return np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[0], -1)


def _matmul_nbits(build):
    """Each MatMulNBits of the build as (dequantized float32 [N, K], block size, scales dtype,
    zero points dtype or None), read from the ONNX file itself."""
    model = onnx.load(str(build / "model.onnx"))
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        n, k, block, bits = attrs["N"], attrs["K"], attrs["block_size"], attrs.get("bits", 4)
        blocks = -(-k // block)
        unpack = _nibbles if bits == 4 else (lambda packed: packed)  # 8 bits: a byte each
        codes = unpack(arrays[node.input[1]].reshape(n, -1)).reshape(n, blocks, block)
        scales = arrays[node.input[2]].reshape(n, blocks)
        zeros = np.full((n, blocks), 1 << (bits - 1))
        zero_dtype = None
        if len(node.input) > 3 and node.input[3]:
            stored = arrays[node.input[3]]
            zero_dtype = stored.dtype
            zeros = unpack(stored.reshape(n, -1))[:, :blocks]
        weight = (codes - zeros[..., None].astype(np.float64)) * scales.astype(np.float64)[
            ..., None
        ]
        found.append((weight.reshape(n, -1)[:, :k].astype(np.float32), block, scales.dtype,
                      zero_dtype))  # fmt: skip
    return found


def _kept_exactly(expected, build, rtol=0.0):
    """Every expected [N, K] weight is rows of one MatMulNBits (q/k/v may be packed), equal
    (within `rtol`: a float32 scale found again from float32 values is off by an ulp)."""
    nbits = _matmul_nbits(build)
    for name, weight in expected.items():
        for matrix, *_ in nbits:
            if matrix.shape[1] != weight.shape[1]:
                continue
            starts = np.nonzero(np.all(np.isclose(matrix, weight[0], rtol=rtol, atol=0), axis=1))[0]
            rows = len(weight)
            if any(np.allclose(matrix[s : s + rows], weight, rtol=rtol, atol=0) for s in starts):
                break
        else:
            raise AssertionError(f"{name}: no MatMulNBits holds its checkpoint's blocks")
    return nbits


@pytest.mark.parametrize(("group", "symmetric"), [(64, False), (128, True)])
def test_a_gptq_checkpoint_compiles_with_its_own_int4_blocks(
    group, symmetric, source, tmp_path, cli_runner
):
    checkpoint = tmp_path / "gptq"
    expected = _write_checkpoint(source, checkpoint, "gptq", group, symmetric)
    summary, report = _compile(cli_runner, checkpoint, tmp_path / "b", "--target", "cpu")
    # No --quantize: an int4 source builds int4, keeping its 14 layers' blocks
    assert (
        report["recipe"]["quantize"] == "int4-awq" and "gptq int4" in report["recipe"]["chosen_by"]
    )
    assert report["source"]["quantized_by"]["method"] == "gptq"
    stats = next(p for p in report["passes"] if p["name"] == "quantize-int4-awq")["stats"]
    assert stats["source_grid_kept"] == len(expected) == 14
    nbits = _kept_exactly(expected, tmp_path / "b")
    kept = [entry for entry in nbits if entry[0].shape[0] != TOKENIZER_VOCAB]  # not lm_head
    assert len(kept) >= 5 and all(block == group for _, block, *_ in kept)
    # symmetric groups need no zero points (an asymmetric group whose codes fit around 8,
    # with either sign of scale, needs none either)
    assert all(z is None for *_, z in kept) or not symmetric
    _close(summary)


def test_an_8bit_gptq_checkpoint_keeps_its_blocks_as_int8_weight_only_on_cpu_and_cuda(
    source, tmp_path, cli_runner
):
    """GPTQ 8-bit: no --quantize builds int8-wo (MatMulNBits bits=8) on its own blocks, for
    the CPU and for the ONNX Runtime CUDA model (fp16 scales: the checkpoint's are fp16)."""
    checkpoint = tmp_path / "gptq8"
    expected = _write_checkpoint(source, checkpoint, "gptq", 64, symmetric=False, bits=8)
    for target in ("cpu", "h200"):
        out = tmp_path / target
        args = ("--target", target) + (("--backend", "onnxruntime") if target == "h200" else ())
        summary, report = _compile(cli_runner, checkpoint, out, *args)
        assert report["recipe"]["quantize"] == "int8-wo", report["recipe"]
        assert "gptq int8 (group 64)" in report["recipe"]["chosen_by"]
        stats = next(p for p in report["passes"] if p["name"] == "quantize-int8-wo")["stats"]
        assert stats["source_grid_kept"] == len(expected) == 14
        nbits = _kept_exactly(expected, out, rtol=1e-6)
        kept = [entry for entry in nbits if entry[0].shape[0] != TOKENIZER_VOCAB]
        assert all(block == 64 for _, block, *_ in kept)
        assert {str(dtype) for _, _, dtype, _ in kept} == {
            "float16" if target == "h200" else "float32"
        }
        model = onnx.load(str(out / "model.onnx"), load_external_data=False)
        assert {a.i for n in model.graph.node if n.op_type == "MatMulNBits"
                for a in n.attribute if a.name == "bits"} == {8}  # fmt: skip
        _close(summary)  # the blocks are the checkpoint's: the int8 embedding is what is left
    placement = report["cuda_placement"]
    assert placement["cpu_nodes"] == placement["memcpy_nodes"] == 0
    assert placement["contract_breaches"] == []


def test_gptqmodel_dynamic_rules_keep_each_layers_own_width_and_groups(
    source, tmp_path, cli_runner
):
    """GPTQModel's `dynamic`: a 4-bit group-32 checkpoint whose layer-1 down_proj is 8-bit in
    groups of 64 and whose layer-0 MLP is left float. Each quantized layer is read at its own
    width and kept bit for bit, the 8-bit one as MatMulNBits bits 8 inside the int4 build;
    the float ones are quantized by the recipe (AWQ) like a float model's."""
    dynamic = {
        r"+:model\.layers\.1\..*down_proj": {"bits": 8, "group_size": 64},
        r"-:model\.layers\.0\.mlp\..*": {},
    }
    checkpoint = tmp_path / "dynamic"
    expected = _write_checkpoint(source, checkpoint, "gptq", 32, dynamic=dynamic)
    assert len(expected) == 11  # 14 layers, 3 left float
    summary, report = _compile(cli_runner, checkpoint, tmp_path / "b", "--target", "cpu")
    assert report["recipe"]["quantize"] == "int4-awq"
    assert "gptq int4+8 (group 32)" in report["recipe"]["chosen_by"], report["recipe"]
    stats = next(p for p in report["passes"] if p["name"] == "quantize-int4-awq")["stats"]
    assert stats["source_grid_kept"] == 11 and stats["source_grid_kept_wider"] == 1
    _kept_exactly(expected, tmp_path / "b", rtol=1e-6)
    model = onnx.load(str(tmp_path / "b" / "model.onnx"), load_external_data=False)
    attrs = [{a.name: a.i for a in n.attribute} for n in model.graph.node
             if n.op_type == "MatMulNBits"]  # fmt: skip
    down = [a for a in attrs if a["bits"] == 8 and a["K"] == 256 and a["N"] == 128]
    assert len(down) == 1 and down[0]["block_size"] == 64, attrs
    assert summary["verification"]["ok"]  # the float layers' int4 rounding is all it lost
    # A rule storing a width fdec does not read is refused before any work.
    bad = tmp_path / "bad"
    _write_checkpoint(source, bad, "gptq", 32)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["dynamic"] = {r"model\.layers\.1\..*": {"bits": 3}}
    (bad / "config.json").write_text(json.dumps(config))
    refused = cli_runner.invoke(cli, ["compile", str(bad), "-o", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "3-bit" in refused.stderr, refused.stderr
    assert not (tmp_path / "x").exists()


def _group_order(name, k, group=32):
    """The input order that makes an activation-ordered layer's groups consecutive."""
    g_idx = _activation_order(name.removesuffix(".weight"), k).argsort() // group
    return np.argsort(g_idx, kind="stable")


def _input_orders(build):
    """The Gathers re-laying a MatMul input in an order: their index arrays."""
    model = onnx.load(str(build / "model.onnx"))
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return [arrays[node.input[1]] for node in model.graph.node
            if node.op_type == "Gather" and node.input[1] in arrays]  # fmt: skip


def test_an_activation_ordered_gptq_checkpoint_keeps_its_blocks_behind_one_gather_per_input(
    source, tmp_path, cli_runner
):
    """GPTQ's desc_act (GPTQModel's default): groups are consecutive in the order the inputs
    were quantized in, not in the inputs' own. Was refused ("activation order"); now each
    layer's inputs are gathered into group order, and its blocks are kept there."""
    checkpoint = tmp_path / "gptq"
    expected = _write_checkpoint(source, checkpoint, "gptq", 32, act_order=True)
    summary, report = _compile(cli_runner, checkpoint, tmp_path / "cpu", "--target", "cpu")
    stats = next(p for p in report["passes"] if p["name"] == "quantize-int4-awq")["stats"]
    assert stats["source_grid_kept"] == 14
    in_group_order = {}
    for name, weight in expected.items():
        in_group_order[name] = weight[:, _group_order(name, weight.shape[1])]
        if name.endswith(("gate_proj.weight", "up_proj.weight")):  # down_proj's order, as rows
            down = name.replace("gate_proj", "down_proj").replace("up_proj", "down_proj")
            in_group_order[name] = in_group_order[name][_group_order(down, weight.shape[0])]
    _kept_exactly(in_group_order, tmp_path / "cpu")
    # q/k/v read one input in one order, gate/up another, o_proj its own; down_proj's input
    # comes in its order from gate/up's re-laid rows: 3 Gathers a layer, not 7
    orders = _input_orders(tmp_path / "cpu")
    assert len(orders) == 2 * 3 and all(sorted(o) == list(range(len(o))) for o in orders)
    _close(summary)
    # The fp16 CUDA model keeps them too, its Gathers on the GPU
    out = tmp_path / "h200"
    summary, report = _compile(cli_runner, checkpoint, out, "--target", "h200",
                               "--backend", "onnxruntime")  # fmt: skip
    _kept_exactly(in_group_order, out)
    assert len(_input_orders(out)) == 6
    _close(summary)
    assert report["cuda_placement"]["cpu_nodes"] == 0
    assert report["cuda_placement"]["memcpy_nodes"] == 0
    # A build's HF checkpoint (round to nearest keeps them too) holds gathered weights in the
    # inputs' own order (in float: compressed-tensors reads consecutive groups only; they were
    # written in the gathered order, logits 4.8 off), and down_proj packed in the order its
    # input comes in, gate/up's rows in the same order: the same model
    out = tmp_path / "emit"
    _compile(cli_runner, checkpoint, out, "--target", "cpu", "--quantize", "int4",
             "--emit", "hf-checkpoint")  # fmt: skip
    _kept_exactly(in_group_order, out)
    reference = _float_model(report["source"]["folder"])
    emitted = _dequantizing_transformers(out / "hf-checkpoint")
    packed = json.loads((out / "hf-checkpoint" / "config.json").read_text())
    assert "model.layers.0.mlp.down_proj" not in packed["quantization_config"]["ignore"]
    assert "input_order" not in packed["fdec_source_quantization"]  # it is not beside it
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        assert (reference(ids).logits - emitted(ids).logits).abs().max() < 0.05


def test_activation_order_with_unequal_groups_is_refused(source, tmp_path, cli_runner):
    """Groups of other sizes than group_size (no consecutive blocks hold them): one line."""
    import safetensors.torch

    checkpoint = tmp_path / "gptq"
    _write_checkpoint(source, checkpoint, "gptq", 32, act_order=True)
    tensors = safetensors.torch.load_file(str(checkpoint / "model.safetensors"))
    g_idx = tensors["model.layers.1.mlp.down_proj.g_idx"]
    g_idx[g_idx == 1] = 0  # group 0 of 64 inputs, group 1 of none
    safetensors.torch.save_file(tensors, str(checkpoint / "model.safetensors"))
    out = tmp_path / "b"
    result = cli_runner.invoke(cli, ["compile", str(checkpoint), "-o", str(out), "--quiet"])
    assert result.exit_code == 2 and not out.exists()
    error = result.stderr.strip()
    assert len(error.splitlines()) == 1
    assert "down_proj" in error and "groups of other sizes than 32" in error
    assert "static-groups or desc_act=false variant" in error


def test_an_awq_checkpoint_reads_as_compressed_tensors_reads_it(source, tmp_path, cli_runner):
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters import AutoAWQConverter

    checkpoint = tmp_path / "awq"
    expected = _write_checkpoint(source, checkpoint, "awq", 32)
    # compressed-tensors' own reading of the AWQ layout, decompressed by transformers
    converted = tmp_path / "awq-as-ct"
    convert_checkpoint(str(checkpoint), str(converted), AutoAWQConverter.from_pretrained(
        str(checkpoint)), max_workers=1, device="cpu")  # fmt: skip
    reference = _dequantizing_transformers(converted)
    weights = dict(reference.named_parameters())
    for name, weight in expected.items():  # it multiplies in float16: within its rounding
        torch.testing.assert_close(weights[name], torch.from_numpy(weight), rtol=1e-3, atol=0)
    summary, report = _compile(cli_runner, checkpoint, tmp_path / "b", "--target", "cpu")
    stats = next(p for p in report["passes"] if p["name"] == "quantize-int4-awq")["stats"]
    assert stats["source_grid_kept"] == 14
    _kept_exactly(expected, tmp_path / "b")
    _close(summary)


def test_an_8bit_compressed_tensors_checkpoint_keeps_its_blocks_as_int8_weight_only(
    source, tmp_path, cli_runner
):
    """llm-compressor's W8A16 (asymmetric groups of 64), written by the compressed-tensors
    library: read as its own decompression reads it, built int8-wo on those blocks."""
    checkpoint = _compressed_tensors(source, tmp_path / "ct8", 64, bits=8)
    _, expected = _decompressed(checkpoint)
    summary, report = _compile(cli_runner, checkpoint, tmp_path / "cpu", "--target", "cpu")
    assert report["recipe"]["quantize"] == "int8-wo"
    assert "compressed-tensors int8 (group 64)" in report["recipe"]["chosen_by"]
    _kept_exactly(expected, tmp_path / "cpu", rtol=1e-6)
    _close(summary)


def test_a_compressed_tensors_checkpoint_keeps_its_blocks_for_cpu_and_h200(
    source, tmp_path, cli_runner
):
    checkpoint = _compressed_tensors(source, tmp_path / "ct", 32)
    reference, expected = _decompressed(checkpoint)
    summary, report = _compile(cli_runner, checkpoint, tmp_path / "cpu", "--target", "cpu")
    _kept_exactly(expected, tmp_path / "cpu")
    _close(summary)
    # What fdec reads is what transformers' decompression gives: a float build (--quantize none)
    # runs its greedy tokens
    _compile(cli_runner, checkpoint, tmp_path / "fp32", "--target", "cpu", "--quantize", "none")
    assert _run(cli_runner, tmp_path / "fp32") == _greedy(reference, checkpoint)
    # --quantize int4 (round to nearest) keeps them too; the GPU build's are float16-scaled
    # (the checkpoint's scales are float16 values) with uint8 zero points
    out = tmp_path / "h200"
    summary, report = _compile(cli_runner, checkpoint, out, "--target", "h200",
                               "--backend", "onnxruntime", "--quantize", "int4")  # fmt: skip
    stats = next(p for p in report["passes"] if p["name"] == "quantize-int4")["stats"]
    assert stats["source_grid_kept"] == 14
    nbits = _kept_exactly(expected, out)
    layers = [entry for entry in nbits if entry[0].shape[0] != TOKENIZER_VOCAB]  # not lm_head
    assert len(layers) >= 5 and all(b == 32 and s == np.float16 and z == np.uint8
                                    for _, b, s, z in layers)  # fmt: skip
    _close(summary)
    assert report["cuda_placement"]["cpu_nodes"] == 0
    assert report["cuda_placement"]["memcpy_nodes"] == 0


def test_a_symmetric_gptq_checkpoint_keeps_its_blocks_in_a_tensorrt_rtx_engine(
    source, tmp_path, cli_runner
):
    """TensorRT's blocked DequantizeLinear takes the symmetric blocks (int4, no zero points):
    a real TensorRT-RTX engine builds from them. Asymmetric ones are rounded again: its parser
    refused uint4 zero points ("cannot take 1 node(s)"). The symmetric one is activation
    ordered: the engine takes the Gathers that re-lay its inputs."""
    import tensorrt_rtx  # noqa: F401  (installed by the rtx extra, as in CI)

    kept = {}
    for name, symmetric in (("sym", True), ("asym", False)):
        checkpoint = tmp_path / name
        _write_checkpoint(source, checkpoint, "gptq", 64 if symmetric else 128, symmetric,
                          act_order=symmetric)  # fmt: skip
        # options for int4-awq's pass, though rtx4090's own default is fp8: the source decides
        summary, report = _compile(cli_runner, checkpoint, tmp_path / f"b-{name}", "--target",
                                   "rtx4090", "--pass-options", "quantize-int4-awq.clip=true")  # fmt: skip
        stats = next(p for p in report["passes"] if p["name"] == "quantize-int4-awq")["stats"]
        kept[name] = stats["source_grid_kept"]
        assert [e["status"] for e in report["engines"]] == ["built"]
        assert summary["verification"]["ok"] is True
    # an asymmetric layer whose every block also fits the zero point 8 is kept too
    assert kept["sym"] == 14 and kept["asym"] < 14
    assert len(_input_orders(tmp_path / "b-sym")) == 2 * 3


def _packed_codes(build):
    """The 4-bit codes of every MatMulNBits, as a sorted list of bytes."""
    model = onnx.load(str(build / "model.onnx"))
    arrays = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    return sorted(onnx.numpy_helper.to_array(arrays[n.input[1]]).tobytes() for n in nodes)


def test_fdecs_own_hf_checkpoint_compiles_back_onto_the_same_codes(source, tmp_path, cli_runner):
    """`--emit hf-checkpoint` writes int4 as compressed-tensors; compiling that checkpoint keeps
    every layer's codes as the first build had them (ONNX Runtime's symmetric blocks carry
    scales max/-8: the negative scale is found again, no zero points)."""
    first = tmp_path / "first"
    _compile(cli_runner, source, first, "--target", "cpu", "--quantize", "int4",
             "--emit", "hf-checkpoint")  # fmt: skip
    checkpoint = first / "hf-checkpoint"
    _, expected = _decompressed(checkpoint)
    again = tmp_path / "again"
    _, report = _compile(cli_runner, checkpoint, again, "--target", "cpu",
                         "--quantize", "int4")  # fmt: skip
    stats = next(p for p in report["passes"] if p["name"] == "quantize-int4")["stats"]
    assert stats["source_grid_kept"] == 14
    nbits = _kept_exactly(expected, again, rtol=1e-6)  # its scales are float32
    layers = [e for e in nbits if e[0].shape[0] != TOKENIZER_VOCAB]
    assert all(zero is None for *_, zero in layers)
    assert _packed_codes(again) == _packed_codes(first)


def test_a_layer_split_across_shards_converts_into_bounded_files(
    source, tmp_path, cli_runner, monkeypatch
):
    """Hugging Face shards split by tensor: a layer's qweight and its zero points can sit in two
    files. They are read one tensor at a time and written in files of _SHARD_BYTES (here
    ~100 kB: several files and an index), which bounds the conversion's memory."""
    import safetensors.torch

    from fdec.frontend import prequantized

    checkpoint = tmp_path / "gptq"
    expected = _write_checkpoint(source, checkpoint, "gptq", 64)
    tensors = safetensors.torch.load_file(str(checkpoint / "model.safetensors"))
    (checkpoint / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}  # fmt: skip
    for file, keys in shards.items():
        safetensors.torch.save_file({k: tensors[k] for k in keys}, str(checkpoint / file))
    weight_map = {key: file for file, keys in shards.items() for key in keys}
    assert weight_map["model.layers.0.mlp.up_proj.qweight"] != weight_map[
        "model.layers.0.mlp.up_proj.qzeros"]  # fmt: skip
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    monkeypatch.setattr(prequantized, "_SHARD_BYTES", 100_000)

    summary, report = _compile(cli_runner, checkpoint, tmp_path / "b", "--target", "cpu")
    converted = json.loads((tmp_path / "b" / "report.json").read_text())["source"]["folder"]
    files = sorted(p.name for p in pathlib.Path(converted).glob("*.safetensors"))
    assert len(files) > 3 and files[0] == "model-00001.safetensors"
    index = json.loads((pathlib.Path(converted) / "model.safetensors.index.json")
                       .read_text())["weight_map"]  # fmt: skip
    assert set(index.values()) == set(files) and "model.layers.0.mlp.up_proj.weight" in index
    stats = next(p for p in report["passes"] if p["name"] == "quantize-int4-awq")["stats"]
    assert stats["source_grid_kept"] == 14
    _kept_exactly(expected, tmp_path / "b")
    _close(summary)


def test_a_converted_checkpoint_is_hashed_once_and_cleared_with_the_cache(
    source, tmp_path, cli_runner, monkeypatch
):
    """The float folder an int4 checkpoint becomes is found again by the checkpoint's digest,
    remembered in the cache's digest index: a compile after the first reads neither the
    checkpoint's files nor the converted ones in full again (an 8B GPTQ is ~6 GB of them).
    `fdec cache clear` keeps the converted folder, `--all` removes it."""
    from fdec import cache as cache_module
    from fdec.frontend.source import resolve_source

    checkpoint, cache = tmp_path / "gptq", tmp_path / "cache"
    _write_checkpoint(source, checkpoint, "gptq", 64)
    monkeypatch.setattr(cache_module, "_RACY_NS", -1)  # files written just now count as settled
    hashed = []
    real = cache_module.sha256_file
    monkeypatch.setattr(cache_module, "sha256_file", lambda path: hashed.append(path) or real(path))

    folders = []
    for _ in range(3):
        hashed.clear()
        folders.append(resolve_source(str(checkpoint), cache_dir=cache).folder)
        if len(folders) == 1:
            assert {p.name for p in hashed} == {p.name for p in checkpoint.iterdir()}
        elif len(folders) == 2:  # the converted files, renamed into place after the first
            assert hashed and all(p.is_relative_to(cache / "int4") for p in hashed)
    assert hashed == [] and len(set(folders)) == 1
    assert folders[0].parent == cache / "int4"

    cleared = cli_runner.invoke(cli, ["cache", "clear", "--cache-dir", str(cache)])
    assert cleared.exit_code == 0, cleared.output + cleared.stderr
    assert folders[0].is_dir()
    cleared = cli_runner.invoke(cli, ["cache", "clear", "--all", "--cache-dir", str(cache)])
    assert cleared.exit_code == 0, cleared.output + cleared.stderr
    assert not (cache / "int4").exists()
