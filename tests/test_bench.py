"""`fdec bench` on a tiny build: every figure present and positive, written into the report,
the build still verifying afterwards; bad options exit 2 with one line."""

from __future__ import annotations

import json

import onnx
import pytest

import fdec
from fdec.bench import measure_bandwidth, measure_device_bandwidth, parse_batches, weight_bytes
from fdec.cli import cli
from fdec.errors import UsageError
from fdec.report.html import render_html


@pytest.fixture(scope="module")
def tiny_build(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "b"
    fdec.compile(tiny_models("llama"), target="cpu", out=out, quantize="none")
    return out


def test_bench_json_reports_every_field_and_lands_in_the_report(tiny_build, cli_runner):
    before = json.loads((tiny_build / "report.json").read_text())
    html_before = (tiny_build / "report.html").read_text()
    result = cli_runner.invoke(
        cli,
        ["bench", str(tiny_build), "--batch", "2,1", "--prompt-len", "8", "--gen-len", "6",
         "--rounds", "2", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    bench = json.loads(result.stdout)
    assert [row["batch"] for row in bench["rows"]] == [1, 2]
    assert bench["peak_rss_mb"] > 0 and bench["bandwidth"]["gb_s"] > 0
    # The device it measured, by name (a GPU session measures the GPU's memory instead).
    assert bench["device"]["provider"] == bench["providers"][0] == "CPUExecutionProvider"
    assert bench["device"]["name"] and "threads" in bench["bandwidth"]
    assert bench["weight_bytes"] > 0 and bench["kv_bytes_per_token"] > 0
    for row in bench["rows"]:
        assert row["prefill_ms"] > 0 and row["decode_tok_s"] > 0
        assert len(row["decode_tok_s_rounds"]) == 2
        assert 0 < row["bandwidth_fraction"] <= 1.5
        # bytes per step: the streamed weights plus each row's KV cache at its mean length
        kv = row["batch"] * bench["kv_bytes_per_token"] * (8 + (6 - 1) / 2)
        assert row["bytes_per_step"] == int(bench["weight_bytes"] - bench["gathered_bytes"] + kv)
    batch2 = bench["rows"][1]
    assert batch2["decode_tok_s_per_row"] == pytest.approx(batch2["decode_tok_s"] / 2, abs=0.01)
    # bench.json holds the run; the build's hashed outputs (report.json/html) are untouched
    assert json.loads((tiny_build / "bench.json").read_text()) == bench
    assert json.loads((tiny_build / "report.json").read_text()) == before
    assert (tiny_build / "report.html").read_text() == html_before
    assert (tiny_build / "bench.html").read_text() == render_html({**before, "bench": bench})
    verify = cli_runner.invoke(cli, ["verify", str(tiny_build)])
    assert verify.exit_code == 0, verify.output


def test_bench_table_names_each_batch(tiny_build, cli_runner):
    result = cli_runner.invoke(
        cli, ["bench", str(tiny_build), "--batch", "1", "--gen-len", "4", "--rounds", "1"]
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "decode tok/s" in lines[1] and lines[2].split()[0] == "1"
    assert "peak RSS" in lines[-1] and "GB/s" in lines[-1]


@pytest.mark.parametrize("bad", ["0", "1,x", "-4", "", "2,,3"])
def test_bad_batch_values_exit_2_with_one_line(tiny_build, cli_runner, bad):
    result = cli_runner.invoke(cli, ["bench", str(tiny_build), "--batch", bad])
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --batch")


def test_too_long_or_missing_build_exits_2(tiny_build, tmp_path, cli_runner):
    long = cli_runner.invoke(cli, ["bench", str(tiny_build), "--prompt-len", "100000"])
    assert long.exit_code == 2 and "positions" in long.stderr
    missing = cli_runner.invoke(cli, ["bench", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "not an fdec build" in missing.stderr


def test_default_lengths_fit_a_model_with_few_positions(tiny_models, tmp_path, cli_runner):
    # a model with 48 positions: `fdec bench BUILD` refused its own defaults (40 + 64)
    from models import make_tiny_model

    out = tmp_path / "b"
    fdec.compile(make_tiny_model(tmp_path / "m", "gpt2", n_positions=48), out=out, quantize="none")
    args = ["bench", str(out), "--batch", "1", "--rounds", "1", "--json"]
    result = cli_runner.invoke(cli, args)
    assert result.exit_code == 0, result.output + result.stderr
    figures = json.loads(result.stdout)
    assert (figures["prompt_len"], figures["gen_len"]) == (18, 30)  # 40:64 within 48
    given = cli_runner.invoke(cli, [*args, "--gen-len", "64"])  # given lengths are kept
    assert given.exit_code == 2 and "exceeds the build's 48 positions" in given.stderr


def test_parse_batches_sorts_and_dedups():
    assert parse_batches("16,1, 4,1") == [1, 4, 16]
    with pytest.raises(UsageError):
        parse_batches("1.5")


def test_weight_bytes_counts_an_untied_embedding_as_gathered(tiny_build):
    weights = weight_bytes(tiny_build / "model.onnx")
    graph = onnx.load(str(tiny_build / "model.onnx"), load_external_data=False).graph
    size = (tiny_build / "model.onnx.data").stat().st_size
    assert 0 < weights["total"] <= size + 4096 * len(graph.initializer)
    gathers = [n for n in graph.node if n.op_type.startswith("Gather")]
    tables = {n.input[0] for n in gathers} & {i.name for i in graph.initializer}
    shared = any(
        name in node.input and not node.op_type.startswith("Gather")
        for name in tables
        for node in graph.node
    )
    assert (weights["gathered"] > 0) == (bool(tables) and not shared)


def test_measured_bandwidth_is_a_plausible_figure():
    bw = measure_bandwidth(megabytes=64, tries=2, threads=2)
    assert 0.1 < bw["gb_s"] < 2000 and bw["threads"] == 2


def test_device_copy_bandwidth_runs_through_onnxruntime():
    """The GPU's measure (a device-to-device copy bound through IOBinding), run here on the
    CPU provider: the same code a GPU session runs with device "cuda"."""
    bw = measure_device_bandwidth("CPUExecutionProvider", megabytes=64, runs=3, tries=2)
    assert 0.1 < bw["gb_s"] < 20000 and bw["provider"] == "CPUExecutionProvider"
    assert bw["device"] and "device-to-device copy" in bw["method"]


def test_a_gpu_bench_names_the_device_and_its_copy_bandwidth():
    """What a GPU session's bench.json holds (measure_device_bandwidth) renders as such."""
    from fdec.report.bench_results import render_bench

    bench = {
        "build": "b", "prompt_len": 8, "gen_len": 6, "rounds": 1, "threads": 1, "rows": [],
        "peak_rss_mb": 1, "weight_bytes": 1e6, "gathered_bytes": 0,
        "bandwidth": {"gb_s": 4000.0, "method": "device-to-device copy",
                      "provider": "CUDAExecutionProvider", "device": "NVIDIA H200",
                      "array_mb": 1024, "runs": 20, "tries": 3},
        "device": {"provider": "CUDAExecutionProvider", "name": "NVIDIA H200"},
    }  # fmt: skip
    text = render_bench(bench)
    assert "device NVIDIA H200;" in text
    assert "bandwidth 4000.0 GB/s (NVIDIA H200: copy of a 1024 MB tensor, best of 3)" in text


def test_bench_measures_a_build_whose_runtime_trims_the_cache(tiny_models, tmp_path, cli_runner):
    """--kv-window with a sink keeps the traced attention and has the runtime drop positions:
    `fdec bench` (batch sizes 1,4,16 by default) used to stop at the first batch with "batched
    generation does not trim the KV cache". Bytes per step count the kept positions only."""
    out = tmp_path / "windowed"
    fdec.compile(tiny_models("llama"), target="cpu", out=out, quantize="none",
                 kv_window=6, kv_sink=2)  # fmt: skip
    result = cli_runner.invoke(
        cli, ["bench", str(out), "--prompt-len", "12", "--gen-len", "6", "--rounds", "1", "--json"]
    )
    assert result.exit_code == 0, result.output
    bench = json.loads(result.stdout)
    assert [row["batch"] for row in bench["rows"]] == [1, 4, 16]
    for row in bench["rows"]:
        assert row["decode_tok_s"] > 0
        kv = row["batch"] * bench["kv_bytes_per_token"] * 8  # sink 2 + window 6, every step
        assert row["bytes_per_step"] == int(bench["weight_bytes"] - bench["gathered_bytes"] + kv)
