"""`fdec compile --quantize`: the precision guard before any work, and verified lossy builds."""

from __future__ import annotations

import collections
import json
import re

import onnx
import pytest

from fdec.cli import cli
from fdec.compile import plan_pipeline
from fdec.gates import GATES
from fdec.lower.tensorrt_rtx import available as rtx_available
from fdec.passes.smoothquant import SMOOTHING_MUL
from fdec.pipeline import Tolerance
from fdec.targets import load_target


def _ops(path):
    model = onnx.load(str(path), load_external_data=False)
    return [(n.domain, n.op_type) for n in model.graph.node]


def test_fp8_on_a100_fails_before_any_work(tiny_models, tmp_path, cli_runner):
    out = tmp_path / "b"
    result = cli_runner.invoke(
        cli,
        [
            "compile",
            str(tiny_models("llama")),
            "--target",
            "a100",
            "--quantize",
            "fp8",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 2
    assert (
        result.stderr.strip()
        == "error: FP8 needs compute capability ≥ 8.9; a100 is 8.0; use int8 or int4"
    )
    assert not out.exists()


def test_unknown_precision_and_method_are_usage_errors(tiny_models, tmp_path, cli_runner):
    for value, words in (("fp9", "fp8"), ("int4-gptq", "methods for int4: rtn")):
        result = cli_runner.invoke(
            cli,
            ["compile", str(tiny_models("llama")), "--quantize", value, "-o", str(tmp_path / "b")],
        )
        assert result.exit_code == 2, result.stderr
        assert words in result.stderr
        assert "[fdec" not in result.stderr  # refused before loading anything


def test_int4_build_is_matmulnbits_smaller_and_verified(tiny_models, tmp_path, cli_runner):
    fp32, int4 = tmp_path / "fp32", tmp_path / "int4"
    model = tiny_models("llama")
    fp32_compile = ["compile", str(model), "-o", str(fp32), "-q", "--quantize", "none"]
    assert cli_runner.invoke(cli, fp32_compile).exit_code == 0
    result = cli_runner.invoke(
        cli, ["compile", str(model), "-o", str(int4), "--quantize", "int4", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    ops = _ops(int4 / "model.onnx")
    # 2 layers × (packed qkv, o, gate, up, down) + lm_head: pack-qkv merges q/k/v after fusion
    assert ops.count(("com.microsoft", "MatMulNBits")) == 11
    report = json.loads((int4 / "report.json").read_text())
    # The tied table stays tied: the lm_head's MatMulNBits and the embedding's
    # GatherBlockQuantized read one packed int4 table (quantize-embedding has nothing left).
    names = [p["name"] for p in report["passes"]]
    assert names[names.index("quantize-int4") + 1] == "quantize-embedding"
    assert "untie-embeddings" not in names
    assert ops.count(("com.microsoft", "GatherBlockQuantized")) == 1
    verification = report["verification"]
    assert verification["ok"] is True
    assert verification["tolerance"]["greedy_identical"] is False
    # int4 = int4-rtn here: its measured default gate (fdec.gates), not the generic +100 %
    assert verification["tolerance"]["max_perplexity_increase"] == (
        GATES["int4-rtn"].max_ppl_increase
    )
    numeric = verification["numeric"]
    assert numeric["perplexity_build"] <= 2.0 * numeric["perplexity_source"]
    stats = report["passes"][names.index("quantize-int4")]["stats"]
    # 4-bit codes + one scale per 32; the tied lm_head / embedding table in 8 bits.
    assert stats["bytes_after"] * 5 < stats["bytes_before"]
    assert report["passes"][names.index("quantize-int4")]["options"]["lm_head_bits"] == 8
    size = lambda d: sum(p.stat().st_size for p in d.glob("model.onnx*"))  # noqa: E731
    assert size(int4) < size(fp32) - (stats["bytes_before"] - stats["bytes_after"]) // 2
    ran = cli_runner.invoke(cli, ["run", str(int4), "-p", "Ships", "-n", "8", "--json"])
    assert ran.exit_code == 0 and json.loads(ran.stdout)["new_tokens"] >= 1


def _nbits_attrs(path):
    model = onnx.load(str(path), load_external_data=False)
    return [{a.name: a.i for a in n.attribute} for n in model.graph.node
            if n.op_type == "MatMulNBits"]  # fmt: skip


def test_int8_weight_only_is_matmulnbits_8bit_on_the_cpu_and_the_cuda_model(
    tiny_models, tmp_path, cli_runner
):
    """int8-wo: 8-bit blocks of 32 for MatMulNBits (accuracy_level 4 on the CPU, 0 for the
    CUDA kernel), the tied table shared 8-bit, closer to fp32 than int4; on the ONNX Runtime
    CUDA model `--quantize int8` means it, and the Q/DQ methods are refused by name."""
    model = tiny_models("llama")
    builds = {}
    for target, quantize in (("cpu", "int8-wo"), ("h200", "int8"), ("cpu", "int4")):
        out = builds[target, quantize] = tmp_path / f"{target}-{quantize}"
        args = ["--backend", "onnxruntime"] if target == "h200" else []
        result = cli_runner.invoke(cli, [
            "compile", str(model), "--target", target, "--quantize", quantize, *args,
            "-o", str(out), "--json",
        ])  # fmt: skip
        assert result.exit_code == 0, result.stderr
    for (target, quantize), out in builds.items():
        if quantize == "int4":
            continue
        attrs = _nbits_attrs(out / "model.onnx")
        # 2 layers × (packed qkv, o, gate, up, down) + the lm_head, all 8-bit blocks of 32
        assert len(attrs) == 11
        assert {(a["bits"], a["block_size"]) for a in attrs} == {(8, 32)}
        assert {a.get("accuracy_level", 0) for a in attrs} == {4 if target == "cpu" else 0}
        ops = _ops(out / "model.onnx")
        assert ops.count(("com.microsoft", "GatherBlockQuantized")) == 1  # the tied table, once
        report = json.loads((out / "report.json").read_text())
        names = [p["name"] for p in report["passes"]]
        assert "quantize-int8-wo" in names and "untie-embeddings" not in names
        assert report["verification"]["ok"] is True
    cpu = json.loads((builds["cpu", "int8-wo"] / "report.json").read_text())
    int4 = json.loads((builds["cpu", "int4"] / "report.json").read_text())
    error = lambda r: r["verification"]["numeric"]["max_abs_error"]  # noqa: E731
    assert error(cpu) < error(int4) / 3  # 8 bits: far closer to the source than 4
    cuda = json.loads((builds["h200", "int8"] / "report.json").read_text())
    assert cuda["recipe"]["quantize"] == "int8"
    assert cuda["models"][0]["summary"] == "fp16 compute, int8 weights (MatMulNBits), fp16 KV cache"
    assert cuda["cuda_placement"]["cpu_nodes"] == cuda["cuda_placement"]["memcpy_nodes"] == 0
    assert cuda["cuda_placement"]["contract_breaches"] == []
    refused = cli_runner.invoke(cli, [
        "compile", str(model), "--target", "h200", "--backend", "onnxruntime",
        "--quantize", "int8-smoothquant", "-o", str(tmp_path / "x"),
    ])  # fmt: skip
    assert refused.exit_code == 2 and not (tmp_path / "x").exists()
    assert "runs int8 as int8-wo only, not smoothquant" in refused.stderr


def test_dynamic_int8_is_cpu_only(tiny_models, tmp_path, cli_runner):
    result = cli_runner.invoke(
        cli,
        [
            "compile",
            str(tiny_models("gpt2")),
            "--target",
            "l4",
            "--quantize",
            "int8-dynamic",
            "-o",
            str(tmp_path / "b"),
        ],
    )
    assert result.exit_code == 2
    assert "quantize-int8 is dynamic int8 for the CPU; l4 is a GPU" in result.stderr
    # On the CPU, int8-dynamic is MatMulInteger; a decoder's plain int8 is weight-only (int8-wo,
    # CPU_INT8_METHOD), as onnxruntime-genai's -p int8; --keep-fp keeps dynamic's mixed recipe.
    for asked, op in (("int8-dynamic", "MatMulInteger"), ("int8", "MatMulNBits")):
        out = tmp_path / asked
        ok = cli_runner.invoke(
            cli, ["compile", str(tiny_models("gpt2")), "--quantize", asked, "-o", str(out), "-q"]
        )
        assert ok.exit_code == 0, ok.stderr
        assert op in {op_type for _, op_type in _ops(out / "model.onnx")}, asked
    pipeline = json.loads((tmp_path / "int8" / "report.json").read_text())["pipeline"]
    assert "quantize-int8-wo" in pipeline and "quantize-int8" not in pipeline


@pytest.mark.skipif(rtx_available() is not None, reason=str(rtx_available()))
def test_int4_for_rtx_uses_standard_ops_and_builds_an_engine(tiny_models, tmp_path, cli_runner):
    out = tmp_path / "rtx"
    result = cli_runner.invoke(cli, [
        "compile", str(tiny_models("llama")), "--target", "rtx4090", "--quantize", "int4",
        "--max-seq-len", "256", "-o", str(out), "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    ops = _ops(out / "model.onnx")
    assert not any(domain == "com.microsoft" for domain, _ in ops)
    assert ops.count(("", "DequantizeLinear")) >= 15
    report = json.loads((out / "report.json").read_text())
    assert report["engines"][0]["status"] == "built"


@pytest.mark.skipif(rtx_available() is not None, reason=str(rtx_available()))
def test_int8_weight_only_for_rtx_is_blocked_int8_dequantize_in_a_real_engine(
    tiny_models, tmp_path, cli_runner
):
    out = tmp_path / "rtx"
    result = cli_runner.invoke(cli, [
        "compile", str(tiny_models("llama")), "--target", "rtx4090", "--quantize", "int8-wo",
        "--max-seq-len", "256", "-o", str(out), "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    blocked = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" and a.i == 32 for a in n.attribute)]  # fmt: skip
    assert len(blocked) == 15  # 2 layers × q k v o gate up down + the untied lm_head
    report = json.loads((out / "report.json").read_text())
    (engine,) = report["engines"]
    assert engine["status"] == "built"
    assert engine["typed_model"]["precisions"] == ["bf16", "fp16", "int8"]  # fp16 logits


@pytest.mark.skipif(rtx_available() is not None, reason=str(rtx_available()))
def test_fp4_for_rtx5090_builds_an_nvfp4_engine_and_is_refused_without_fp4(
    tiny_models, tmp_path, cli_runner
):
    """--quantize fp4 (NVFP4 W4A4) on a Blackwell GeForce: FP4 weights and TensorRT's FP4
    activation quantizers in model.onnx, verified here in its FP4 form, and a real TensorRT-RTX
    engine for sm 12.0 whose own listing has FP4 GEMMs. Where FP4 cannot run: one line."""
    llama = str(tiny_models("llama"))

    def compile_fp4(target: str, out, *extra: str):
        result = cli_runner.invoke(cli, [
            "compile", llama, "--target", target, "--quantize", "fp4", "--max-seq-len", "256",
            "-o", str(out), "-q", *extra,
        ])  # fmt: skip
        assert result.exit_code == 0, result.stderr
        return json.loads((out / "report.json").read_text())

    out = tmp_path / "rtx5090"
    report = compile_fp4("rtx5090", out)
    ops = _ops(out / "model.onnx")
    assert ops.count(("trt", "TRT_FP4DynamicQuantize")) == 6  # 2 layers: q/k/v, o, gate/up
    assert report["verification"]["ok"]
    (engine,) = report["engines"]
    assert engine["status"] == "built" and engine["compute_capability"] == "12.0"
    assert "fp4" in engine["typed_model"]["precisions"]
    assert engine["typed_model"]["numerics"]["ok"]
    # W4A4 GEMMs (q k v o gate up of both layers, each profile); down and lm_head are W4A16
    gemms = engine["engine_precision"]["gemms"]
    assert gemms.get("fp4") == 12 * len(engine["profiles"]), gemms
    # The roofline counts the engine's own decode kernels and its FP4 math
    floor = report["estimate"]["step_floor"]
    assert floor["nodes"] == engine["kernels"]["generation"] > 0
    assert floor["nodes_from"] == "tensorrt-rtx engine listing, decode profile kernels"
    assert report["estimate"]["math_precision"] == "fp4"

    # `fdec run` on this CPU: the build's FP4 form, said in one warning line
    ran = cli_runner.invoke(
        cli, ["run", str(out), "--prompt", "Hello", "--max-new-tokens", "3", "--json"]
    )
    assert ran.exit_code == 0, ran.stderr
    outcome = json.loads(ran.stdout)
    assert outcome["new_tokens"] == 3 and "no FP4 kernels" in outcome["provider_fallback"]

    # b200 (TensorRT): the engine plan takes the same graph, TensorRT's own FP4 quantizer
    # being no foreign op to its parser. With a serving checkpoint (vLLM's NVFP4 format) the
    # smoothing is kept where it folds into a norm; none is applied by a graph Mul.
    b200 = compile_fp4("b200", tmp_path / "b200-fp4", "--emit", "hf-checkpoint")
    engines = b200["engines"]
    assert engines[0]["backend"] == "tensorrt" and "fp4" in engines[0]["typed_model"]["precisions"]
    assert b200["checkpoint"]["format"] == "compressed-tensors nvfp4-pack-quantized"
    assert b200["checkpoint"]["quantization"]["schemes"] == {"NVFP4": 12, "NVFP4A16": 2}
    (fp4,) = [p for p in b200["passes"] if p["name"] == "quantize-fp4"]
    assert len(fp4["stats"]["smoothing_not_foldable"]) == 2  # o_proj's inputs
    graph = onnx.load(str(tmp_path / "b200-fp4" / "model.onnx"), load_external_data=False).graph
    assert not [n.name for n in graph.node if any(p.key == SMOOTHING_MUL for p in n.metadata_props)]

    for target, backend, says in [
        ("rtx4090", [], r"FP4 needs compute capability ≥ 10\.0; rtx4090 is 8\.9"),
        ("b200", ["--backend", "onnxruntime"], "the onnxruntime-cuda backend runs .* not fp4"),
        ("cpu", [], "the onnxruntime backend runs .* not fp4"),
    ]:
        refused = cli_runner.invoke(cli, [
            "compile", llama, "--target", target, *backend, "--quantize", "fp4",
            "-o", str(tmp_path / target),
        ])  # fmt: skip
        assert refused.exit_code == 2, refused.output
        assert re.search(says, refused.stderr), refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert not (tmp_path / target).exists()


def test_tolerance_judges_perplexity_growth():
    gate = Tolerance(max_abs_error=10, min_top1_agreement=0.5, max_perplexity_increase=0.2)
    figures = {"max_abs_error": 1.0, "top1_agreement": 0.9, "perplexity_source": 10.0}
    assert gate.judge({**figures, "perplexity_build": 11.9}) is None
    broken = gate.judge({**figures, "perplexity_build": 12.5})
    assert broken == "perplexity grew 25.0% (10.00 → 12.50; limit 20%)"
    assert "top-1" in gate.judge({**figures, "top1_agreement": 0.4, "perplexity_build": 10.0})


def test_emit_hf_checkpoint_loads_in_transformers(tiny_models, tmp_path, cli_runner):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "b"
    result = cli_runner.invoke(
        cli, ["compile", str(tiny_models("qwen2")), "-o", str(out), "--emit", "hf-checkpoint", "-q"]
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["checkpoint"]["directory"] == "hf-checkpoint"
    reloaded = AutoModelForCausalLM.from_pretrained(out / "hf-checkpoint").eval()
    source = AutoModelForCausalLM.from_pretrained(tiny_models("qwen2")).eval()
    ids = torch.tensor([[5, 17, 42, 7]])
    with torch.no_grad():
        assert np.abs((reloaded(ids).logits - source(ids).logits).numpy()).max() < 1e-5
    refused = cli_runner.invoke(cli, [
        "compile", str(tiny_models("qwen2")), "-o", str(tmp_path / "c"), "--quantize",
        "int8-dynamic", "--emit", "hf-checkpoint",
    ])  # fmt: skip
    assert refused.exit_code == 2, refused.stderr
    assert "cannot write a --quantize int8-dynamic build" in refused.stderr


def test_emit_hf_checkpoint_of_int8_weight_only_is_w8a16_transformers_loads(
    tiny_models, tmp_path, cli_runner
):
    """--quantize int8 (a cpu decoder's is int8-wo) --emit hf-checkpoint: compressed-tensors
    W8A16 (num_bits 8), which transformers loads in its default compressed mode, close to the
    float source."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "b"
    result = cli_runner.invoke(cli, [
        "compile", str(tiny_models("qwen2")), "-o", str(out), "--quantize", "int8",
        "--emit", "hf-checkpoint", "-q",
    ])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    checkpoint = json.loads((out / "report.json").read_text())["checkpoint"]
    assert checkpoint["quantization"]["num_bits"] == 8 and len(checkpoint["packed"]) == 14
    config = json.loads((out / "hf-checkpoint" / "config.json").read_text())
    weights = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"]) == (8, 32)
    reloaded = AutoModelForCausalLM.from_pretrained(out / "hf-checkpoint").eval()
    source = AutoModelForCausalLM.from_pretrained(tiny_models("qwen2")).eval()
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        error = np.abs((reloaded(ids).logits - source(ids).logits).numpy()).max()
    assert 0 < error < 0.05  # 8-bit blocks: quantized, and close


def test_emit_hf_checkpoint_of_the_int4_recipe_with_its_8bit_tied_head(
    tiny_models, tmp_path, cli_runner
):
    """--quantize int4 keeps GPT-2's tied lm_head in 8 bits (lm_head_bits): the writer read
    only 4-bit MatMulNBits and the compile died after verification; the head (like GPT-2's
    Conv1D layers) is now written dequantized, and the checkpoint loads."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "b"
    result = cli_runner.invoke(cli, [
        "compile", str(tiny_models("gpt2")), "-o", str(out), "--quantize", "int4",
        "--emit", "hf-checkpoint", "-q",
    ])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    checkpoint = json.loads((out / "report.json").read_text())["checkpoint"]
    assert "lm_head.weight" in checkpoint["dequantized"]
    assert AutoModelForCausalLM.from_pretrained(out / "hf-checkpoint") is not None


def test_fp8_on_h100_is_qdq_verified_at_basic_and_flags_the_engine_plan(
    tiny_models, tmp_path, cli_runner
):
    out = tmp_path / "fp8"
    result = cli_runner.invoke(cli, [
        "compile", str(tiny_models("llama")), "--target", "h100", "--quantize", "fp8",
        "--max-seq-len", "256", "-o", str(out), "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    fp8 = [
        i for i in model.graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT8E4M3FN and len(i.dims) == 2
    ]  # fmt: skip
    int8 = [
        i.name for i in model.graph.initializer
        if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2
    ]  # fmt: skip
    # 2 layers × q k v o gate up in FP8; down_proj and the lm_head W8A16 (FP8_WEIGHT_ONLY),
    # beside the int8 token embedding; 2 layers are too few for FP8_WEIGHT_ONLY_LAYERS
    assert len(fp8) == 12 and len([n for n in int8 if "down_proj" in n]) == 2
    assert len(int8) == 4  # + the lm_head and the embedding
    runtime = json.loads((out / "fdec-runtime.json").read_text())
    assert runtime["session_options"]["graph_optimization_level"] == "basic"
    report = json.loads((out / "report.json").read_text())
    assert (
        report["verification"]["ok"] and report["verification"]["numeric"]["top1_agreement"] > 0.8
    )
    plan = json.loads((out / "engines" / "tensorrt" / "plan.json").read_text())
    # Strongly typed: fp8 is in the TensorRT model's Q/DQ, no builder flag says so.
    assert "fp8" in plan["precisions"] and "--fp8" not in plan["trtexec_shell"]
    assert "--stronglyTyped" in plan["trtexec_shell"]


def test_int8_on_a_gpu_is_smoothquant_with_user_calibration(tiny_models, tmp_path, cli_runner):
    calib = tmp_path / "calib.jsonl"
    calib.write_text(
        "\n".join(
            json.dumps({"text": f"Ship {i} sails past the lighthouse at dusk."}) for i in range(40)
        )
    )
    out = tmp_path / "int8"
    result = cli_runner.invoke(cli, [
        "compile", str(tiny_models("llama")), "--target", "l4", "--quantize", "int8",
        "--calibration", str(calib), "--max-seq-len", "256", "-o", str(out), "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    record = report["passes"][-2]
    assert record["name"] == "quantize-int8-static"
    assert record["stats"]["alpha"] == 0.8 and record["stats"]["smoothing_folded"] > 0
    assert ("", "DequantizeLinear") in _ops(out / "model.onnx")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad = cli_runner.invoke(cli, [
        "compile", str(tiny_models("llama")), "--target", "l4", "--quantize", "int8",
        "--calibration", str(empty), "-o", str(tmp_path / "x"),
    ])  # fmt: skip
    assert bad.exit_code == 2 and "[fdec" not in bad.stderr


def test_max_ppl_increase_takes_percent_or_fraction(tiny_models, tmp_path, cli_runner):
    for value, expected in (("3%", 0.03), ("0.5", 0.5)):
        out = tmp_path / value.replace("%", "pc")
        result = cli_runner.invoke(cli, [
            "compile", str(tiny_models("gpt2")), "--quantize", "int4", "--max-ppl-increase", value,
            "-o", str(out), "-q",
        ])  # fmt: skip
        report = json.loads((out / "report.json").read_text())
        assert report["verification"]["tolerance"]["max_perplexity_increase"] == expected
        assert result.exit_code == (0 if report["verification"]["ok"] else 1)
    bad = cli_runner.invoke(
        cli, ["compile", "x", "-o", str(tmp_path / "z"), "--max-ppl-increase", "-1%"]
    )
    assert bad.exit_code == 2 and "negative" in bad.stderr


def test_keep_fp_keeps_the_most_sensitive_layer_in_fp32(tiny_models, tmp_path, cli_runner):
    out = tmp_path / "mixed"
    result = cli_runner.invoke(cli, [
        "compile", str(tiny_models("llama")), "--quantize", "int4", "--keep-fp", "1", "-o", str(out), "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    mixed = next(p for p in report["passes"] if p["name"] == "quantize-mixed")
    sensitivity = mixed["stats"]["sensitivity"]
    assert sensitivity[0]["unit"] == mixed["stats"]["kept_fp32"][0]
    assert len(sensitivity) == 3 and all(isinstance(row, dict) for row in sensitivity)
    assert _ops(out / "model.onnx").count(("com.microsoft", "MatMulNBits")) < 15
    refused = cli_runner.invoke(
        cli, [
            "compile", str(tiny_models("llama")), "--quantize", "none", "--keep-fp", "1",
            "-o", str(tmp_path / "x"),
        ],
    )  # fmt: skip
    assert refused.exit_code == 2 and "--keep-fp needs a quantized build" in refused.stderr


def test_keep_fp_takes_the_cpus_int8_and_refuses_a_gpus_static_int8():
    """On the cpu target `--quantize int8 --keep-fp N` is dynamic int8's mixed recipe (plain
    int8 is weight-only there): it was refused, naming int8-dynamic, which is the same recipe."""
    from fdec.errors import UsageError

    for quantize in ("int8", "int8-dynamic"):
        plan = plan_pipeline(
            target=load_target("cpu"), backend="onnxruntime", quantize=quantize, keep_fp=1
        )
        mixed = next(p for p in plan.pipeline if p.name == "quantize-mixed")
        assert mixed.method == "int8" and mixed.keep_fp == 1
    with pytest.raises(UsageError, match="static SmoothQuant Q/DQ on GPU targets"):
        plan_pipeline(target=load_target("h100"), backend="tensorrt", quantize="int8", keep_fp=1)


def test_int4_awq_compiles_calibrated_and_verified(tiny_models, tmp_path, cli_runner):
    out = tmp_path / "awq"
    result = cli_runner.invoke(
        cli,
        ["compile", str(tiny_models("llama")), "--quantize", "int4-awq", "-o", str(out), "--json"],
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    awq = next(p for p in report["passes"] if p["name"] == "quantize-int4-awq")
    assert awq["stats"]["groups_searched"] > 0 and awq["stats"]["mean_error_reduction"] > 0
    assert _ops(out / "model.onnx").count(("com.microsoft", "MatMulNBits")) == 11  # qkv packed
    assert report["verification"]["ok"] is True


def test_int4_awq_mixed_keeps_the_most_sensitive_layers_in_8_bits(
    tiny_models, tmp_path, cli_runner
):
    out = tmp_path / "awq-mixed"
    result = cli_runner.invoke(cli, [
        "compile", str(tiny_models("llama")), "--quantize", "int4-awq-mixed", "--keep-fp", "1",
        "-o", str(out), "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    mixed = next(p for p in report["passes"] if p["name"] == "quantize-mixed")
    stats = mixed["stats"]
    assert (
        stats["quantizer"] == "quantize-int4-awq" and stats["kept_precision"] == "int8 weight-only"
    )
    assert stats["kept"] == [stats["sensitivity"][0]["unit"]] and stats["kept_fp32"] == []
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    bits = collections.Counter(
        next(a.i for a in node.attribute if a.name == "bits")
        for node in model.graph.node
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized")
    )
    # 12 readers: 10 layer MatMulNBits (q/k/v packed into one by pack-qkv), the lm_head's and
    # the embedding's of the tied table.
    kept = 2 if stats["kept"] == ["lm_head"] else 5
    assert bits[8] == kept and bits[4] == 12 - kept
    assert report["verification"]["ok"] is True


def _on_q4_1_grid(folder, out):
    """A copy of `folder` whose layers' linear weights are rounded as GGUF Q4_1 rounds them
    (blocks of 32 inputs, scale (max - min) / 15, float offset): a GGUF-sourced model's fp32."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    shutil.copytree(folder, out)
    tensors = load_file(str(out / "model.safetensors"))
    rounded = 0
    for name, weight in tensors.items():
        if ".layers." in name and name.endswith("proj.weight"):  # [out, in]
            blocks = weight.reshape(weight.shape[0], -1, 32).astype(np.float64)
            low, high = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
            step = (high - low) / 15
            grid = np.round((blocks - low) / step) * step + low
            tensors[name] = grid.reshape(weight.shape).astype(np.float32)
            rounded += 1
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return rounded


def test_int4_awq_keeps_a_q4_1_source_grid_on_the_fast_kernel(tiny_models, tmp_path, cli_runner):
    model = tmp_path / "q4_1"
    assert _on_q4_1_grid(tiny_models("llama"), model) == 14  # 2 layers × q k v o gate up down
    builds = {}
    for name, keep in (("grid", "true"), ("awq", "false")):
        out = tmp_path / name
        result = cli_runner.invoke(cli, [
            "compile", str(model), "--quantize", "int4-awq", "-o", str(out), "--json",
            "--pass-options", f"quantize-int4-awq.keep_source_grid={keep}",
        ])  # fmt: skip
        assert result.exit_code == 0, result.stderr
        builds[name] = json.loads((out / "report.json").read_text())
    report = builds["grid"]
    stats = next(p for p in report["passes"] if p["name"] == "quantize-int4-awq")["stats"]
    assert stats["source_grid_kept"] == 14 and stats["groups_searched"] == 0
    assert stats["block_sum_inputs"] == 8  # attention, o, MLP and down inputs of 2 layers
    onnx_model = onnx.load(str(tmp_path / "grid" / "model.onnx"), load_external_data=False)
    nbits = [n for n in onnx_model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 11  # q/k/v still packed into one by pack-qkv, through the Concat
    ops = collections.Counter(n.op_type for n in onnx_model.graph.node)
    assert ops["Concat"] >= 8 and ops["GroupQueryAttention"] == 2  # fusion intact
    # No float zero points (ONNX Runtime's slow path): the layers' are uint8 (rounded z)
    layers = [n for n in nbits if next(a.i for a in n.attribute if a.name == "bits") == 4]
    types = {i.name: i.data_type for i in onnx_model.graph.initializer}
    assert len(layers) == 10 and all(len(n.input) == 4 for n in layers)
    assert {types[n.input[3]] for n in layers} == {onnx.TensorProto.UINT8}
    assert report["verification"]["ok"] is True
    kl = {name: b["verification"]["numeric"]["kl_divergence"] for name, b in builds.items()}
    assert kl["grid"] < 0.5 * kl["awq"], kl


def test_int4_awq_mixed_keeps_a_q4_1_source_grid_too(tiny_models, tmp_path, cli_runner):
    """int4-awq-mixed's int4 units are int4-awq's: on a Q4_1 source they keep its grid (they
    were rounded again by AWQ's own scaling, +9.0 % on SmolLM2's evaluation split against
    int4-awq's +0.93 %)."""
    model = tmp_path / "q4_1"
    _on_q4_1_grid(tiny_models("llama"), model)
    out = tmp_path / "mixed"
    result = cli_runner.invoke(cli, [
        "compile", str(model), "--quantize", "int4-awq-mixed", "-o", str(out), "--json",
        "--pass-options", "quantize-mixed.keep_fp=1",  # 1 of 3 units 8-bit: 2 layers int4
    ])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    stats = next(p for p in report["passes"] if p["name"] == "quantize-mixed")["stats"]
    layers = [u for u in stats["quantized_units"] if u.startswith("layers.")]
    assert len(stats["kept"]) == 1 and stats["kept_precision"] == "int8 weight-only"
    assert layers and stats["source_grid_kept"] == 7 * len(layers)  # q k v o gate up down
    assert stats["block_sum_inputs"] == 4 * len(layers)
    assert report["verification"]["ok"] is True
