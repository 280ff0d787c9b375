"""Tests of the IOBinding decode loop: a KV buffer shared by past and present, against the plain numpy loop."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from exported import export_tiny, run_pass

from fdec.lower import MODEL_FILE, RUNTIME_CONFIG, lower_onnxruntime
from fdec.passes.fusion import FuseAttentionPass
from fdec.runner import load_build, run_prompt
from fdec.runtime import OrtModel, Sampling, generate, open_session
from fdec.runtime.session import auto_threads
from fdec.targets import load_target

_PROMPT = [5, 17, 99, 3, 250, 7, 8, 41, 120, 64, 2, 300]


@pytest.fixture(scope="module")
def builds(tiny_models, tmp_path_factory):
    """A fused (shared-buffer) and a plain build of the tiny llama, written by the lowering."""
    tiny = export_tiny(tiny_models, tmp_path_factory, "llama")
    fused, _ = run_pass(FuseAttentionPass(), tiny.cleaned())
    out = {}
    for name, model in (("fused", fused), ("plain", tiny.cleaned())):
        folder = tmp_path_factory.mktemp(f"build-{name}")
        lower_onnxruntime(
            model, folder, source_folder=tiny_models("llama"), target=load_target("cpu")
        )
        out[name] = folder
    return out


def _open(folder, **options) -> OrtModel:
    return OrtModel(open_session(folder / MODEL_FILE), **options)


def test_runtime_config_and_model_record_the_kv_buffer(builds):
    fused = json.loads((builds["fused"] / RUNTIME_CONFIG).read_text())["kv_cache"]
    plain = json.loads((builds["plain"] / RUNTIME_CONFIG).read_text())["kv_cache"]
    assert fused["buffer"] == "shared" and plain["buffer"] == "concat"
    assert fused["layout"] == plain["layout"] == "BNSH"
    assert fused["layers"] == 2 and fused["max_length"] == 256
    # The model file says it too, so a session opened on model.onnx alone finds it.
    assert _open(builds["fused"]).shares_kv_buffer
    assert not _open(builds["plain"]).shares_kv_buffer
    assert load_build(builds["fused"]).model.shares_kv_buffer


@pytest.mark.parametrize("build", ["fused", "plain"])
def test_bound_loop_gives_the_plain_loops_tokens(builds, build):
    model = _open(builds[build])
    want = generate(model, _PROMPT, max_new_tokens=64, bound=False).tokens
    got = generate(model, _PROMPT, max_new_tokens=64, bound=True).tokens
    assert len(want) == 64 and got == want
    sampling = Sampling(temperature=0.8, top_k=20, seed=3)
    assert (
        generate(model, _PROMPT, max_new_tokens=32, sampling=sampling, bound=True).tokens
        == generate(model, _PROMPT, max_new_tokens=32, sampling=sampling, bound=False).tokens
    )


def test_shared_buffer_is_written_in_place_with_the_plain_loops_cache(builds):
    model = _open(builds["fused"])
    decoder = model.bound_decoder(1, 32)
    buffers = list(decoder._past)
    ids = np.asarray([_PROMPT])
    logits = decoder.step(ids)
    want_logits, present = model.decode(ids, model.empty_past(1), 0)
    np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=0)
    token = np.asarray([[int(logits[0, -1].argmax())]])
    step_logits = decoder.step(token)
    want_step, present = model.decode(token, present, len(_PROMPT))
    np.testing.assert_allclose(step_logits, want_step, atol=1e-5, rtol=0)
    length = len(_PROMPT) + 1
    assert decoder.length == length
    for index, buffer in enumerate(decoder._past):
        assert buffer is buffers[index]  # the same OrtValue every step: nothing reallocated
        cache = buffer.numpy()
        assert cache.shape == (1, model.kv_heads, 32, model.head_dim)
        np.testing.assert_allclose(cache[:, :, :length], present[index], atol=1e-5, rtol=0)
        assert not cache[:, :, length:].any()  # positions not reached are untouched
    with pytest.raises(ValueError, match="exceeds"):
        decoder.step(np.zeros((1, 32), dtype=np.int64))


def test_fdec_run_on_both_builds_gives_the_same_text(builds):
    fused = run_prompt(load_build(builds["fused"]), "the quick brown fox", max_new_tokens=24)
    plain = run_prompt(load_build(builds["plain"]), "the quick brown fox", max_new_tokens=24)
    assert fused["tokens"] == plain["tokens"] and fused["new_tokens"] > 0


def test_session_threads_and_spinning_come_from_the_runtime_config(builds, tmp_path, monkeypatch):
    config = json.loads((builds["fused"] / RUNTIME_CONFIG).read_text())["session_options"]
    assert config["intra_op_num_threads"] == 0 and config["allow_spinning"] == "auto"

    def spinning(load: float, **kwargs) -> tuple[int, str]:
        monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
        options = open_session(builds["fused"] / MODEL_FILE, **kwargs).get_session_options()
        return (
            options.intra_op_num_threads,
            options.get_session_config_entry("session.intra_op.allow_spinning"),
        )

    threads, spin = spinning(0.2)  # idle: every core, spinning when there are several
    assert threads == auto_threads() >= 1
    assert spin == ("1" if threads > 1 else "0")
    assert spinning(0.2, threads=1) == (1, "0")  # one thread has no pool to spin
    assert spinning(1.0 + 64, threads=2) == (2, "0")  # every core busy: no spinning
    assert spinning(1.0 + 64) == (1, "0")
    folder = tmp_path / "build"
    shutil.copytree(builds["fused"], folder)
    runtime = json.loads((folder / RUNTIME_CONFIG).read_text())
    runtime["session_options"].update(intra_op_num_threads=1, allow_spinning=True)
    (folder / RUNTIME_CONFIG).write_text(json.dumps(runtime))
    options = open_session(folder / MODEL_FILE).get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    # Arguments win over the file.
    options = open_session(folder / MODEL_FILE, threads=2, spinning=False).get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_auto_threads_leaves_out_cores_that_other_work_keeps_busy(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    idle = auto_threads()
    assert idle >= 1
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0 + idle, 0.0, 0.0))  # all cores taken
    assert auto_threads() == 1
    if idle > 1:
        monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 0.0, 0.0))  # one other busy job
        assert auto_threads() == idle - 1


def test_decode_logits_written_in_place_are_handed_out_as_copies(builds):
    decoder = _open(builds["fused"]).bound_decoder(1, 32)
    decoder.step(np.asarray([_PROMPT]))
    first = decoder.step(np.asarray([[7]]))
    kept = first.copy()
    second = decoder.step(np.asarray([[9]]))
    assert first is not second and not np.array_equal(first, second)
    np.testing.assert_array_equal(first, kept)  # the next step did not overwrite it
