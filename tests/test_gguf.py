"""A .gguf file compiles like a folder: converted once into the cache, verified, reported."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from gguf_models import GGUF_SHAPE, make_tiny_gguf

from fdec.cli import cli


def _compile(cli_runner, model, out):
    result = cli_runner.invoke(
        cli, ["compile", str(model), "-o", str(out), "--json", "--quantize", "none"]
    )
    assert result.exit_code == 0, result.output + result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] is True
    return summary


def _error_lines(result):
    """stderr without fdec's progress lines ("[fdec] ..." or "[fdec   1.2s] ...")."""
    return [
        line
        for line in result.stderr.splitlines()
        if line.strip() and not line.startswith(("[fdec]", "[fdec "))
    ]


def test_tiny_gguf_compiles_end_to_end(cli_runner, tmp_path):
    gguf_path = make_tiny_gguf(tmp_path / "model" / "tiny.gguf")
    out = tmp_path / "build"
    summary = _compile(cli_runner, gguf_path, out)
    verification = summary["verification"]
    assert verification["max_abs_error"] <= 1e-3
    assert verification["greedy_identical"] is True
    for name in ("model.onnx", "tokenizer.json", "report.json", "config.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["source"]["kind"] == "gguf"
    assert report["source"]["given"] == str(gguf_path)


def test_gguf_conversion_is_cached_and_build_matches_transformers(
    cli_runner, tmp_path, monkeypatch
):
    import torch
    from transformers import AutoModelForCausalLM

    # A cache of this test's own, so other tests' conversions do not show up in it.
    cache = tmp_path / "cache"
    monkeypatch.setenv("FDEC_CACHE_DIR", str(cache))
    gguf_path = make_tiny_gguf(tmp_path / "model" / "tiny.gguf", seed=1)

    first = cli_runner.invoke(
        cli, ["compile", str(gguf_path), "-o", str(tmp_path / "b1"), "--quantize", "none"]
    )
    assert first.exit_code == 0, first.output + first.stderr
    assert "converting tiny.gguf" in first.stderr
    entries = list((cache / "gguf").iterdir())
    assert len(entries) == 1, entries
    converted = entries[0]
    stamps = {p.name: p.stat().st_mtime_ns for p in converted.iterdir()}
    assert "model.safetensors" in stamps and "config.json" in stamps

    out = tmp_path / "b2"
    second = cli_runner.invoke(
        cli, ["compile", str(gguf_path), "-o", str(out), "--json", "--quantize", "none"]
    )
    assert second.exit_code == 0, second.output + second.stderr
    assert json.loads(second.stdout)["ok"] is True
    assert "converting" not in second.stderr
    assert list((cache / "gguf").iterdir()) == [converted]
    assert {p.name: p.stat().st_mtime_ns for p in converted.iterdir()} == stamps
    report = json.loads((out / "report.json").read_text())
    assert report["source"]["folder"] == str(converted)

    # The build against transformers' own GGUF load (q/k un-permuted by transformers).
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = model.eval()
    vocab = model.config.vocab_size
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    head_dim = GGUF_SHAPE["hidden"] // GGUF_SHAPE["heads"]
    ids = np.random.default_rng(0).integers(0, vocab, size=(1, 11))
    past = {
        i.name: np.zeros((1, GGUF_SHAPE["kv_heads"], 0, head_dim), np.float32)
        for i in session.get_inputs()
        if i.name.startswith("past_key_values")
    }
    assert len(past) == 2 * GGUF_SHAPE["layers"]
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.arange(ids.shape[1])[None, :],
        **past,
    }
    logits = session.run(["logits"], feeds)[0]
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()
    assert logits.shape == expected.shape == (1, 11, vocab)
    assert expected.std() > 0.5  # not flat: the comparison means something
    assert np.abs(logits - expected).max() < 1e-3
    assert (logits.argmax(-1) == expected.argmax(-1)).all()


def test_truncated_gguf_is_one_clear_error(cli_runner, tmp_path):
    whole = make_tiny_gguf(tmp_path / "whole" / "tiny.gguf", seed=2)
    data = whole.read_bytes()
    broken = tmp_path / "model" / "broken.gguf"
    broken.parent.mkdir()
    broken.write_bytes(data[: len(data) // 2])
    out = tmp_path / "build"
    result = cli_runner.invoke(cli, ["compile", str(broken), "-o", str(out)])
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    lines = _error_lines(result)
    assert len(lines) == 1, result.stderr  # one line, no traceback
    assert lines[0].startswith("error: ")
    assert "GGUF" in lines[0]
    assert not out.exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".build")] == []


@pytest.mark.parametrize("cut", [16, 4096])
def test_gguf_cut_in_header_is_one_clear_error(cli_runner, tmp_path, cut):
    whole = make_tiny_gguf(tmp_path / "whole" / "tiny.gguf", seed=3)
    broken = tmp_path / "model" / "broken.gguf"
    broken.parent.mkdir()
    broken.write_bytes(whole.read_bytes()[:cut])
    out = tmp_path / "build"
    result = cli_runner.invoke(cli, ["compile", str(broken), "-o", str(out)])
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    lines = _error_lines(result)
    assert len(lines) == 1, result.stderr
    assert "GGUF" in lines[0]
    assert not out.exists()
