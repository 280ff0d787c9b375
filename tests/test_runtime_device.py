"""The device decode loop (fdec.runtime.bound.BoundDecoder): static shapes for CUDA graphs.

On this CPU the same code runs with device "cpu": its static steps (one max-length attention
mask, fixed OrtValues) must give the tokens of today's loops, with the fp16 CUDA graph of a
GPU-target build and with an fp32 CPU build. The CUDA path (device "cuda", CUDA graph replay)
runs in benchmarks/gpu.py on a GPU machine.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime
import pytest
from click.testing import CliRunner

from fdec.cli import cli
from fdec.runtime import OrtModel, generate, open_session
from fdec.runtime.batch import generate_batch

_PROMPT = [5, 17, 99, 3, 250, 7, 8, 41, 120, 64, 2, 300]


@pytest.fixture(scope="module")
def builds(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    made = {}
    for name, args in (
        ("fp16-cuda", ("--target", "h200", "--backend", "onnxruntime")),
        ("fp32-cpu", ("--target", "cpu", "--quantize", "none")),
    ):
        out = root / name
        result = CliRunner().invoke(
            cli, ["compile", str(tiny_models("llama")), "-o", str(out), "--max-seq-len", "256",
                  *args],
        )  # fmt: skip
        assert result.exit_code == 0, result.output + result.stderr
        made[name] = out
    return made


@pytest.mark.parametrize("name", ["fp16-cuda", "fp32-cpu"])
def test_static_steps_give_the_tokens_of_the_plain_loop(builds, name):
    model = OrtModel(open_session(builds[name] / "model.onnx"))
    assert model.shares_kv_buffer
    plain = generate(model, _PROMPT, max_new_tokens=32, bound=False).tokens
    assert generate(model, _PROMPT, max_new_tokens=32).tokens == plain
    assert generate(model, _PROMPT, max_new_tokens=32, static=True).tokens == plain
    # The static decoder of that shape is kept (CUDA graphs replay its addresses) and reset.
    other = generate(model, _PROMPT[::-1], max_new_tokens=32, static=True).tokens
    assert other == generate(model, _PROMPT[::-1], max_new_tokens=32, bound=False).tokens
    again = model.bound_decoder(1, len(_PROMPT) + 32, static=True)
    assert again is model.bound_decoder(1, len(_PROMPT) + 32, static=True)
    assert generate(model, _PROMPT, max_new_tokens=32, static=True).tokens == plain


def test_static_steps_keep_their_buffers(builds):
    """CUDA graphs replay fixed addresses: a static decoder never rebinds another buffer."""
    model = OrtModel(open_session(builds["fp16-cuda"] / "model.onnx"))
    decoder = model.bound_decoder(2, 40, static=True)
    assert decoder.static and not decoder.cuda_graph  # no CUDA here
    logits = decoder.step(np.asarray([_PROMPT, _PROMPT[::-1]]))
    token = logits[:, -1:].argmax(-1)
    decoder.step(token)
    pointers = (decoder._mask_value.data_ptr(), decoder._step_ids.data_ptr(),
                [v.data_ptr() for v in decoder._past])  # fmt: skip
    for _ in range(5):
        token = decoder.step(token)[:, -1:].argmax(-1)
    assert pointers == (decoder._mask_value.data_ptr(), decoder._step_ids.data_ptr(),
                        [v.data_ptr() for v in decoder._past])  # fmt: skip
    assert decoder._mask[:, : decoder.length].all() and not decoder._mask[:, decoder.length :].any()
    # Two rows decoded together give each row's own tokens.
    batched = generate_batch(model, [_PROMPT, _PROMPT[::-1]], max_new_tokens=8)
    prompts = [_PROMPT, _PROMPT[::-1]]
    alone = [generate(model, p, max_new_tokens=8, bound=False).tokens for p in prompts]
    assert batched.tokens == alone


def test_cuda_graph_request_without_cuda_is_harmless(builds):
    session = open_session(builds["fp16-cuda"] / "model.onnx", cuda_graph=True)
    model = OrtModel(session)
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("a CUDA build of onnxruntime: benchmarks/gpu.py checks the graph path")
    assert model.cuda_graph is False and session.get_providers() == ["CPUExecutionProvider"]
    runtime = json.loads((builds["fp16-cuda"] / "fdec-runtime.json").read_text())
    assert runtime["providers"][0][0] == "CUDAExecutionProvider"


def test_cuda_graphs_refused_then_cuda_refused_fall_back_step_by_step(builds, monkeypatch):
    """onnxruntime-gpu refusing CUDA graphs for a graph (its session constructor raises) opens
    the session without them before giving up CUDA: injected at the constructor, as
    tests/test_provider_fallback.py does (no CUDA here); the CPU session is real."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    real = onnxruntime.InferenceSession
    asked: list[tuple[list[str], list[dict]]] = []

    class _Gpu(real):
        def __init__(self, path, sess_options=None, providers=None, provider_options=None, **kw):
            asked.append((list(providers), [dict(o) for o in provider_options]))
            if "CUDAExecutionProvider" in providers:
                options = provider_options[providers.index("CUDAExecutionProvider")]
                if options.get("enable_cuda_graph") == "1":
                    raise Fail("This session cannot use the graph capture feature as requested")
                raise Fail("CUDA failure 100: no CUDA-capable device is detected")
            super().__init__(path, sess_options=sess_options, providers=providers,
                             provider_options=provider_options, **kw)  # fmt: skip

    monkeypatch.setattr(onnxruntime, "InferenceSession", _Gpu)
    monkeypatch.setattr(
        onnxruntime,
        "get_available_providers",
        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    session = open_session(
        builds["fp16-cuda"] / "model.onnx",
        providers=[["CUDAExecutionProvider", {}], ["CPUExecutionProvider", {}]],
        cuda_graph=True,
    )
    assert [a[0] for a in asked] == [
        ["CUDAExecutionProvider", "CPUExecutionProvider"],
        ["CUDAExecutionProvider", "CPUExecutionProvider"],
        ["CPUExecutionProvider"],
    ]
    assert asked[0][1][0] == {"enable_cuda_graph": "1"} and asked[1][1][0] == {}
    assert session.fdec_cuda_graph is False
    assert session.fdec_provider_fallback.startswith("CUDA graphs could not start (This session")
    assert (
        "CUDAExecutionProvider could not start (CUDA failure 100" in session.fdec_provider_fallback
    )


@pytest.mark.parametrize(
    ("flag", "config", "asked"),
    [(None, False, False), ("--cuda-graph", False, True), (None, True, True),
     ("--no-cuda-graph", True, False)],
)  # fmt: skip
def test_run_and_bench_ask_for_cuda_graphs(builds, monkeypatch, tmp_path, flag, config, asked):
    """`fdec run` and `fdec bench` ask the CUDA provider for CUDA graphs when --cuda-graph is
    given or the build's session_options.cuda_graph says so (--no-cuda-graph overrides it).
    The request is read where onnxruntime gets it (no CUDA here: the session then falls back to
    the CPU for real, and the output says CUDA graphs did not run)."""
    import shutil

    build = tmp_path / "build"
    shutil.copytree(builds["fp16-cuda"], build)
    runtime_path = build / "fdec-runtime.json"
    runtime = json.loads(runtime_path.read_text())
    runtime["session_options"]["cuda_graph"] = config
    runtime_path.write_text(json.dumps(runtime))
    real = onnxruntime.InferenceSession
    requests: list[str | None] = []

    class _Gpu(real):
        def __init__(self, path, sess_options=None, providers=None, provider_options=None, **kw):
            if "CUDAExecutionProvider" in providers:
                options = provider_options[providers.index("CUDAExecutionProvider")]
                requests.append(options.get("enable_cuda_graph"))
                from onnxruntime.capi.onnxruntime_pybind11_state import Fail

                raise Fail("CUDA failure 100: no CUDA-capable device is detected")
            super().__init__(path, sess_options=sess_options, providers=providers,
                             provider_options=provider_options, **kw)  # fmt: skip

    monkeypatch.setattr(onnxruntime, "InferenceSession", _Gpu)
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])  # fmt: skip
    extra = [flag] if flag else []
    ran = CliRunner().invoke(
        cli, ["run", str(build), "-p", "hi", "-n", "4", "--no-chat-template", "--json", *extra]
    )
    assert ran.exit_code == 0, ran.output
    result = json.loads(ran.stdout)
    assert result["cuda_graph"] is False and result["providers"] == ["CPUExecutionProvider"]
    assert requests[0] == ("1" if asked else None)
    requests.clear()
    benched = CliRunner().invoke(
        cli, ["bench", str(build), "--batch", "1", "--gen-len", "2", "--prompt-len", "4",
              "--rounds", "1", "--json", *extra],
    )  # fmt: skip
    assert benched.exit_code == 0, benched.output
    assert json.loads(benched.stdout)["cuda_graph"] is False
    assert requests[0] == ("1" if asked else None)
