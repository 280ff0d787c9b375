"""benchmarks/gpu.py on the CPU: its arguments, its table, and one real run on tiny inputs."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

from fdec.cli import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _gpu_module():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks/gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_and_import_need_no_gpu():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu.py"), "--help"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    assert "--build NAME=DIR" in done.stdout and "onnxruntime_genai.models.builder" in done.stdout
    assert (ROOT / "benchmarks/gpu_session.sh").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--build", "nodir"], "is not NAME=DIR"),
        (["--build", "a=b", "--batches", "1,x"], "is not a list like 1,16"),
        (["--build", "a=b", "--batches", "0"], "batch sizes are positive"),
        (["--peer", "int4"], "--hf HF_FOLDER is needed"),
        (["--torch", "none"], "nothing to measure"),
        (["--hf", "x", "--torch", "eager,jit"], "unknown mode 'jit'"),
        (["--build", "a=b", "--torch", "none", "--gen", "1"], "--gen must be at least 2"),
    ],
)
def test_bad_arguments_exit_2_naming_the_problem(argv, message, capsys):
    gpu = _gpu_module()
    with pytest.raises(SystemExit) as exit_info:
        gpu.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_table_gives_ratios_to_torch_static_and_genai_fp16_at_the_same_batch():
    gpu = _gpu_module()
    result = {
        "device": {"device": "cuda", "name": "NVIDIA H200", "compute_capability": "9.0",
                   "onnxruntime": "1.31.1", "torch": "2.11"},
        "gen": 64, "rounds": 3, "errors": [{"part": "genai int4", "error": "RuntimeError: x"}],
        "rows": [
            {"system": "pytorch static-cache (torch.compile) bfloat16", "batch": 1, "tok_s": 327.0},
            {"system": "pytorch static-cache (torch.compile) bfloat16", "batch": 16, "tok_s": 3501.0},
            {"system": "onnxruntime-genai fp16", "batch": 1, "tok_s": 400.0},
            {"system": "fdec fp16", "batch": 1, "tok_s": 654.0, "decode_tok_s": 700.0,
             "checks": {"predicted": {"cpu_nodes": 0, "memcpy_nodes": 0},
                        "estimate_tok_s": 720.5,
                        "profiled": {"cpu_nodes": 0, "memcpy_nodes": 0},
                        "tokens_vs_cpu": {"steps": 32, "identical": True}}},
            {"system": "fdec fp16", "batch": 16, "tok_s": 3501.0},
        ],
    }  # fmt: skip
    lines = gpu.render(result).splitlines()
    assert lines[0].startswith("device: NVIDIA H200 (cuda, cc 9.0); onnxruntime 1.31.1")
    fdec_1 = next(line for line in lines if line.startswith("fdec fp16") and " 1 " in line)
    assert "2.00x" in fdec_1 and "1.64x" in fdec_1  # 654/327 and 654/400
    assert (
        "predicted 0 CPU nodes, 0 Memcpy; ran 0 CPU nodes, 0 Memcpy; 32 tokens vs CPU same"
        in fdec_1
    )
    fdec_16 = next(line for line in lines if line.startswith("fdec fp16") and " 16 " in line)
    assert "1.00x" in fdec_16 and fdec_16.rstrip().endswith("-")  # no genai fp16 at batch 16
    assert lines[-1] == "error: genai int4: RuntimeError: x"
    # Issue 16's figures, each met or not, from the same rows (int4 and batch-16 rows missing).
    figures = {v["figure"]: v for v in gpu.verdicts(result)}
    assert figures["fdec fp16 / PyTorch static, batch 1"] == {
        "figure": "fdec fp16 / PyTorch static, batch 1",
        "value": 2.0,
        "needs": 1.5,
        "met": True,
    }
    assert figures["fdec fp16 / PyTorch static, batch 16"]["met"] is True  # 3501 / 3501
    assert figures["fdec fp16 / genai fp16, batch 1"]["value"] == 1.635
    assert figures["fdec int4 / fdec fp16, batch 1"]["met"] is None  # no int4 row
    assert figures["fdec int8 / fdec fp16, batch 1"]["met"] is None  # nor int8
    # The report's roofline estimate against the measured batch-1 decode (no CUDA graph).
    roofline = figures["fdec fp16: roofline estimate / measured decode, batch 1"]
    assert roofline["value"] == round(720.5 / 700.0, 3) and roofline["met"] is True
    assert figures["fdec int4: roofline estimate / measured decode, batch 1"]["met"] is None
    placed = "fdec fp16: no CPU nodes but predicted host shape nodes, no Memcpy (profiled)"
    assert figures[placed]["met"] is True
    # The host Cast of the mask's width is predicted (fdec.lower.cuda_placement): allowed; a
    # CPU node the prediction did not name is not, nor is a Memcpy.
    checks = result["rows"][3]["checks"]
    checks["predicted"]["host_shape_nodes"] = {"Cast": 1}
    checks["profiled"] = {"cpu_nodes": 2, "memcpy_nodes": 0,
                          "per_provider": {"CPUExecutionProvider": {"ops": {"Cast": 2}}}}  # fmt: skip
    assert {v["figure"]: v for v in gpu.verdicts(result)}[placed]["met"] is True
    checks["profiled"]["per_provider"]["CPUExecutionProvider"]["ops"]["Gather"] = 2
    assert {v["figure"]: v for v in gpu.verdicts(result)}[placed]["met"] is False
    checks["profiled"] = {"cpu_nodes": 0, "memcpy_nodes": 1}
    assert {v["figure"]: v for v in gpu.verdicts(result)}[placed]["met"] is False
    checks["profiled"] = {"cpu_nodes": 0, "memcpy_nodes": 0}
    same = "fdec fp16: 32 greedy tokens = CPU run, or held perplexity within 0.5 %"
    assert figures[same]["value"] == "identical" and figures[same]["met"] is True
    # Tokens that part (int4's fp16 sums on the GPU): met while the held perplexity is close.
    checks["tokens_vs_cpu"] = {"steps": 32, "identical": False, "first_divergence": 20,
                               "perplexity": {"device": 68.1, "cpu": 68.0, "change": 0.00147}}  # fmt: skip
    figure = {v["figure"]: v for v in gpu.verdicts(result)}[same]
    assert figure["met"] is True and figure["value"] == (
        "differ at step 20; held perplexity 68.1 vs 68.0 (+0.15%)")  # fmt: skip
    checks["tokens_vs_cpu"]["perplexity"]["change"] = 0.012
    assert {v["figure"]: v for v in gpu.verdicts(result)}[same]["met"] is False
    # A CUDA-graph row of the same build counts when it is the faster one.
    result["rows"].append({"system": "fdec fp16 cuda-graph", "batch": 1, "tok_s": 1308.0})
    assert gpu.verdicts(result)[0]["value"] == 4.0
    # So does an int4 row through the fpA_intB kernels (--fpa-intb).
    result["rows"] += [{"system": "fdec int4", "batch": 1, "tok_s": 1000.0},
                       {"system": "fdec int4 fpa-intb", "batch": 1, "tok_s": 1962.0}]  # fmt: skip
    int4 = {v["figure"]: v for v in gpu.verdicts(result)}["fdec int4 / fdec fp16, batch 1"]
    assert int4["value"] == 1.5 and int4["met"] is True  # 1962 / 1308
    # The int8 (weight-only) build must beat fp16 too: equal is not met.
    result["rows"].append({"system": "fdec int8", "batch": 1, "tok_s": 1308.0})
    int8 = {v["figure"]: v for v in gpu.verdicts(result)}["fdec int8 / fdec fp16, batch 1"]
    assert int8["value"] == 1.0 and int8["met"] is False
    result["device"]["device"] = "cpu"
    assert all(v["met"] is None for v in gpu.verdicts(result))


def test_one_run_on_the_cpu_with_tiny_inputs(tiny_models, tmp_path, cli_runner):
    """Every part of the script runs for real (fdec build, PyTorch eager, onnxruntime-genai's
    own builder and generator) on the CPU provider; no speed is asserted."""
    hf = tiny_models("llama")
    build = tmp_path / "build"
    made = cli_runner.invoke(cli, ["compile", str(hf), "--quantize", "none", "-o", str(build)])
    assert made.exit_code == 0, made.output
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu.py"), "--device", "cpu", "--hf", str(hf),
         "--build", f"fused={build}", "--peer", "fp32", "--peer-dir", str(tmp_path / "peer"),
         "--torch", "eager", "--batches", "1,2", "--gen", "4", "--rounds", "1",
         "--check-steps", "4", "--cuda-graph", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    systems = [(row["system"], row["batch"]) for row in result["rows"]]
    assert systems == [
        ("pytorch eager float32", 1), ("pytorch eager float32", 2),
        ("onnxruntime-genai fp32", 1), ("onnxruntime-genai fp32", 2),
        ("fdec fused", 1), ("fdec fused", 2),
        ("fdec fused cuda-graph", 1), ("fdec fused cuda-graph", 2),
    ]  # fmt: skip
    assert [row["cuda_graph"] for row in result["rows"][4:]] == [False] * 4  # no CUDA here
    assert all(row["tok_s"] > 0 for row in result["rows"])
    checks = result["rows"][4]["checks"]
    assert checks["predicted"]["cpu_nodes"] == 2  # fp32 GroupQueryAttention: no CUDA kernel
    assert checks["profiled"]["session_providers"] == ["CPUExecutionProvider"]
    tokens = checks["tokens_vs_cpu"]
    assert {k: tokens[k] for k in ("steps", "identical", "first_divergence")} == {
        "steps": 4, "identical": True, "first_divergence": None}  # fmt: skip
    ppl = tokens["perplexity"]  # the held text on the device and the CPU: one provider here
    assert ppl["tokens"] >= 8 and ppl["device"] == ppl["cpu"] > 1 and ppl["change"] == 0
    # The verification's emulated form (an fp32 graph here: the same graph) beside them.
    assert ppl["cpu_emulated"] == pytest.approx(ppl["cpu"], rel=1e-4)
    assert tokens["max_logit_diff_from_device"]["cpu"] == 0
    assert tokens["max_logit_diff_from_device"]["cpu_emulated"] < 1e-3
    assert "fdec fused" in done.stdout and result["errors"] == []
