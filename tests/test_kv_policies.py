"""Tests of KV-cache compression policies (sliding window, attention sink): runtime trimming, GQA's native window, compile + fdec run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from exported import export_tiny, run_pass

from fdec.cli import cli
from fdec.compile import plan_pipeline
from fdec.errors import UsageError
from fdec.passes.fusion import FuseAttentionPass
from fdec.passes.kv_cache import KvPolicyPass
from fdec.runtime import KvPolicy, generate, session_for_model
from fdec.targets import load_target

_PROMPT = [5, 17, 99, 3, 250, 7]


@pytest.fixture(scope="module")
def tiny(tiny_models, tmp_path_factory):
    return export_tiny(tiny_models, tmp_path_factory, "llama")


def test_trim_keeps_the_sink_and_the_last_window_positions():
    past = [np.arange(20, dtype=np.float32).reshape(1, 1, 20, 1) + 100 * i for i in range(4)]
    policy = KvPolicy(sink=3, window=5)
    kept = policy.trim(past)
    assert [int(v) for v in kept[0][0, 0, :, 0]] == [0, 1, 2, 15, 16, 17, 18, 19]
    assert [int(v) for v in kept[3][0, 0, :, 0]] == [300, 301, 302, 315, 316, 317, 318, 319]
    short = [p[:, :, :8] for p in past]
    assert policy.trim(short) is short  # nothing to drop yet
    assert KvPolicy(window=5, native_window=True).trim(past) is past  # the graph does it


def test_sliding_window_bounds_the_cache_and_is_exact_while_it_fits(tiny):
    session = session_for_model(tiny.cleaned())
    plain = generate(session, _PROMPT, max_new_tokens=40, bound=False)
    assert plain.max_past_length == len(_PROMPT) + 38
    for sink, window in ((0, 8), (2, 8), (4, 16)):
        policy = KvPolicy(sink=sink, window=window)
        windowed = generate(session, _PROMPT, max_new_tokens=40, policy=policy)
        assert windowed.max_past_length == sink + window  # never more, and it was reached
        fits = sink + window - len(_PROMPT) + 1  # tokens generated before anything is dropped
        assert windowed.tokens[:fits] == plain.tokens[:fits]
    long = generate(session, _PROMPT, max_new_tokens=40, policy=KvPolicy(sink=4, window=64))
    assert long.tokens == plain.tokens and long.max_past_length == len(_PROMPT) + 38


def test_long_prompt_is_prefilled_in_chunks_within_the_bound(tiny):
    session = session_for_model(tiny.cleaned())
    prompt = (_PROMPT * 6)[:30]
    result = generate(session, prompt, max_new_tokens=5, policy=KvPolicy(sink=2, window=6))
    assert result.max_past_length <= 8 and len(result.tokens) == 5


def test_plain_loop_window_equals_group_query_attention_local_window(tiny):
    """The runtime's trimmed past (positions keep counting) and ORT's native local window
    attend to the same keys at the same positions: logits agree step by step."""
    window = 6
    plain = session_for_model(tiny.cleaned())
    fused_model, record = run_pass(KvPolicyPass(window=window),
                                   run_pass(FuseAttentionPass(), tiny.cleaned())[0])  # fmt: skip
    assert record.stats["native_window"] and record.stats["gqa_nodes"] == tiny.spec.num_layers
    gqa = [n for n in fused_model.graph if n.op_type == "GroupQueryAttention"]
    assert all(n.attributes["local_window_size"].value == window + 1 for n in gqa)
    fused = session_for_model(fused_model)
    assert fused.kv_policy == {"native_window": True, "sink": 0, "window": window}
    policy = KvPolicy(window=window)
    tokens = [5, 17, 99, 3, 11, 22, 33, 44, 55, 66, 77, 88, 99, 111, 12, 13, 14]
    past, fused_past = plain.empty_past(1), fused.empty_past(1)
    worst = 0.0
    for position, token in enumerate(tokens):
        past = policy.trim(past)
        want, past = plain.decode(np.asarray([[token]]), past, past[0].shape[2], position=position)
        got, fused_past = fused.decode(np.asarray([[token]]), fused_past, position)
        worst = max(worst, float(np.abs(got - want).max()))
    assert worst < 1e-4
    # without trimming the two differ once the sequence outgrows the window
    full, _ = plain.decode(np.asarray([tokens]), plain.empty_past(1), 0)
    native, _ = fused.decode(np.asarray([tokens]), fused.empty_past(1), 0)
    assert np.abs(full[:, : window + 1] - native[:, : window + 1]).max() < 1e-4
    assert np.abs(full[:, window + 1 :] - native[:, window + 1 :]).max() > 1e-2
    # generate() leaves a native window to the graph
    assert generate(fused, _PROMPT, max_new_tokens=20).max_past_length == len(_PROMPT) + 18


def test_sinks_need_the_unfused_graph(tiny):
    fused = run_pass(FuseAttentionPass(), tiny.cleaned())[0]
    with pytest.raises(UsageError, match="sink"):
        run_pass(KvPolicyPass(window=8, sink=2), fused)
    cpu = load_target("cpu")
    plan = plan_pipeline(target=cpu, backend="onnxruntime", quantize="none", kv_window=8, kv_sink=2)
    assert "fuse-attention" not in plan.pass_names and plan.pass_names[-1] == "kv-policy"
    windowed = plan_pipeline(target=cpu, backend="onnxruntime", quantize="none", kv_window=8)
    assert "fuse-attention" in windowed.pass_names and windowed.pass_names[-1] == "kv-policy"
    with pytest.raises(UsageError, match="--kv-window"):
        plan_pipeline(target=cpu, backend="onnxruntime", quantize="none", kv_sink=2)


def test_compile_records_the_policy_and_fdec_run_honours_it(tiny_models, tmp_path, cli_runner):
    model, out = tiny_models("llama"), tmp_path / "build"
    args = ["compile", str(model), "-o", str(out), "--quantize", "none", "--json",
            "--kv-window", "8", "--kv-sink", "2", "--kv-dtype", "int8"]  # fmt: skip
    result = cli_runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    runtime = json.loads((out / "fdec-runtime.json").read_text())
    kv = runtime["kv_cache"]
    assert kv["policy"] == {"native_window": False, "sink": 2, "window": 8}
    assert kv["dtype"] == "int8" and kv["buffer"] == "concat"
    per_token = 2 * kv["layers"] * kv["kv_heads"] * kv["head_dim"]
    assert kv["bytes_per_token"] == per_token
    assert kv["memory_bound"] == {"bounded_by": "policy", "bytes_per_sequence": 10 * per_token,
                                  "max_cache_tokens": 10}  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["kv_cache"] == kv
    assert report["pipeline"][-2:] == ["quantize-kv-cache", "kv-policy"]
    numeric = report["verification"]["numeric"]
    assert numeric["tokens_scored"] == 11 and numeric["kv_cache"]["dtype"] == "int8"
    ran = cli_runner.invoke(cli, ["run", str(out), "-p", "hello world " * 10, "-n", "24", "--json"])
    assert ran.exit_code == 0, ran.output
    figures = json.loads(ran.output)
    assert figures["new_tokens"] == 24 and figures["max_cache_positions"] == 10
    # fdec run reads the policy from fdec-runtime.json (model metadata is only a fallback)
    kv["policy"] = {"native_window": False, "sink": 1, "window": 4}
    (out / "fdec-runtime.json").write_text(json.dumps(runtime))
    ran = cli_runner.invoke(cli, ["run", str(out), "-p", "hello world " * 10, "-n", "24", "--json"])
    assert json.loads(ran.output)["max_cache_positions"] == 5


@pytest.fixture(scope="module")
def windowed_mistral(tmp_path_factory):
    """A tiny Mistral with its own 8-position sliding window (Mistral-7B-v0.1 has 4096)."""
    from models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("swa"), "mistral", sliding_window=8)


@pytest.mark.parametrize(
    "options, gqa_window",
    [(["--target", "cpu"], 8), (["--target", "h200", "--quantize", "none"], None)],
    ids=["cpu-fused-int4", "h200-traced-fp32"],
)
def test_a_model_with_its_own_sliding_window_attends_as_the_source_does(
    windowed_mistral, tmp_path, cli_runner, options, gqa_window
):
    """Every compile of such a model used to die (the export sliced the cache to the window
    inside the graph: GroupQueryAttention got a past of 7 for a total of 17, TensorRT a shape
    profile it refused). The window is now the model's kv-policy: GroupQueryAttention's
    local_window_size where attention is fused, the traced mask where it is not; nothing is
    trimmed at run time, and the build is checked on all held tokens, past the window."""
    import onnx
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fdec.api import load

    out = tmp_path / "build"
    args = ["compile", str(windowed_mistral), "-o", str(out), "--json", *options]
    result = cli_runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    policy = {"model_window": 7, "native_window": True, "sink": 0, "window": 7}
    assert report["kv_cache"]["policy"] == policy
    assert report["kv_cache"]["memory_bound"]["bounded_by"] == "max_positions"
    verification = report["verification"]
    assert verification["numeric"]["tokens_scored"] > 8 * 4  # not cut to the window
    assert verification["greedy"]["steps"] == 32  # not cut to the window either
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    windows = {
        attribute.i
        for node in graph.node
        if node.op_type == "GroupQueryAttention"
        for attribute in node.attribute
        if attribute.name == "local_window_size"
    }
    assert windows == ({gqa_window} if gqa_window else set())
    # 40 greedy tokens after a 36-token prompt: every step is past the window.
    prompt = "The quick brown fox jumps over the lazy dog while the lighthouse"
    tokenizer = AutoTokenizer.from_pretrained(windowed_mistral)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    hf = AutoModelForCausalLM.from_pretrained(windowed_mistral, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1] :].tolist()
    assert ids.shape[1] > 8
    got = load(out).run(prompt, max_new_tokens=40, chat_template=False)["tokens"]
    if gqa_window:  # int4 weights: the first tokens, before int4's error adds up
        assert got[:4] == want[:4]
    else:
        assert got == want


def test_a_window_wider_than_the_models_own_is_refused(windowed_mistral, tmp_path, cli_runner):
    args = ["compile", str(windowed_mistral), "-o", str(tmp_path / "b"), "--kv-window", "9"]
    result = cli_runner.invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "wider than the model's own sliding window" in result.output
    assert "--kv-window 7 or less" in result.output
    assert not (tmp_path / "b").exists()


def _gqa_windows(out):
    import onnx

    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    return [
        next((a.i for a in node.attribute if a.name == "local_window_size"), None)
        for node in graph.node
        if node.op_type == "GroupQueryAttention"
    ]


def test_a_window_on_some_layers_stays_on_those_layers(tmp_path, cli_runner):
    """Qwen2 with `max_window_layers` 1 (Gemma 2/3 window alternate layers): was refused.
    The window is now GroupQueryAttention's on those layers only (the traced mask where not
    fused), and 40 greedy tokens after a 36-token prompt equal transformers'. --kv-window
    narrows every layer, and the policy is then that window alone."""
    from models import make_tiny_model, transformers_greedy

    from fdec.api import load

    model = make_tiny_model(
        tmp_path / "qwen", "qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1
    )
    out = tmp_path / "build"
    args = ["compile", str(model), "-o", str(out), "--quantize", "none", "--json"]
    result = cli_runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    policy = json.loads((out / "report.json").read_text())["kv_cache"]["policy"]
    assert policy["model_window_layers"] == [1] and policy["native_window"]
    assert _gqa_windows(out) == [None, 8]
    prompt = "The quick brown fox jumps over the lazy dog while the lighthouse"
    got = load(out).run(prompt, max_new_tokens=40, chat_template=False)["tokens"]
    assert got == transformers_greedy(model, prompt, 40)

    narrowed = tmp_path / "narrowed"
    result = cli_runner.invoke(cli, [*args[:3], str(narrowed), *args[4:], "--kv-window", "4"])
    assert result.exit_code == 0, result.output
    policy = json.loads((narrowed / "report.json").read_text())["kv_cache"]["policy"]
    assert policy == {"native_window": True, "sink": 0, "window": 4}
    assert _gqa_windows(narrowed) == [5, 5]


def test_the_models_window_is_found_where_it_binds():
    from transformers import AutoConfig

    from fdec.frontend.families import sliding_window

    def window(**config):
        return sliding_window(AutoConfig.for_model(**config))

    assert window(model_type="mistral", sliding_window=8, max_position_embeddings=256) == (8, None)
    # as wide as the positions (Qwen2.5's configs): no window binds
    assert window(model_type="mistral", sliding_window=256, max_position_embeddings=256) is None
    assert window(model_type="mistral", sliding_window=None) is None
    # Qwen2's window is off unless use_sliding_window
    assert window(model_type="qwen2", sliding_window=8, max_position_embeddings=256) is None
    assert window(model_type="llama") is None
    # Gemma 2: alternate layers
    assert window(model_type="gemma2", sliding_window=8, num_hidden_layers=4) == (8, (0, 2))
