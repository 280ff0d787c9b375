"""End to end: tiny random Llama / GPT-2 / BERT models compile, verify, run and report."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from models import transformers_greedy, transformers_padded_greedy

from fdec.cli import cli


def _compile(cli_runner, model, out, *args):
    result = cli_runner.invoke(
        cli,
        [
            "compile",
            str(model),
            "-o",
            str(out),
            "--json",
            *(() if "--quantize" in args else ("--quantize", "none")),
            *args,
        ],
    )
    assert result.exit_code == 0, result.output + result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] is True
    return summary


def _run_tokens(cli_runner, build, prompt, steps):
    """`fdec run`'s greedy tokens after `prompt` (no chat template)."""
    ran = cli_runner.invoke(
        cli, ["run", str(build), "-p", prompt, "-n", str(steps), "--no-chat-template", "--json"]
    )
    assert ran.exit_code == 0, ran.output + ran.stderr
    return json.loads(ran.stdout)["tokens"]


def _attention(graph):
    """The graph's attention nodes (GroupQueryAttention, MultiHeadAttention, ...), in order."""
    return [node for node in graph.node if node.op_type.endswith("Attention")]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_decoder_compiles_verifies_and_runs_in_plain_onnxruntime(
    family, tiny_models, tmp_path, cli_runner
):
    out = tmp_path / "build"
    summary = _compile(cli_runner, tiny_models(family), out)
    verification = summary["verification"]
    assert verification["max_abs_error"] <= 1e-3
    assert verification["top1_agreement"] == 1.0
    assert verification["greedy_identical"] is True
    assert verification["perplexity_build"] == pytest.approx(
        verification["perplexity_source"], rel=1e-4
    )
    for name in ("model.onnx", "model.onnx.data", "report.json", "fdec-build.json",
                 "fdec-runtime.json", "tokenizer.json", "config.json"):  # fmt: skip
        assert (out / name).is_file(), name
    # The build runs with plain onnxruntime and ecosystem I/O names, empty past first.
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    outputs = [o.name for o in session.get_outputs()]
    assert outputs[:3] == ["logits", "present.0.key", "present.0.value"]
    report = json.loads((out / "report.json").read_text())
    assert report["schema_version"] == 1
    assert report["verification"]["providers"] == ["CPUExecutionProvider"]
    assert [p["name"] for p in report["passes"]] == report["pipeline"]
    folding = next(p for p in report["passes"] if p["name"] == "fold-constants")
    assert folding["after"]["nodes"] < folding["before"]["nodes"]
    manifest = json.loads((out / "fdec-build.json").read_text())
    assert manifest["outputs"]["model.onnx"]["bytes"] == (out / "model.onnx").stat().st_size


def test_run_matches_transformers_greedy_generate(tiny_models, tmp_path, cli_runner):
    model_dir = tiny_models("llama")
    out = tmp_path / "build"
    _compile(cli_runner, model_dir, out)
    result = cli_runner.invoke(
        cli, ["run", str(out), "--prompt", "The lighthouse keeper", "-n", "20", "--json"]
    )
    assert result.exit_code == 0, result.output + result.stderr
    ran = json.loads(result.stdout)
    assert ran["providers"] == ["CPUExecutionProvider"]
    assert ran["tokens"] == transformers_greedy(model_dir, "The lighthouse keeper", 20)
    # Streaming mode prints the same text.
    streamed = cli_runner.invoke(
        cli, ["run", str(out), "--prompt", "The lighthouse keeper", "-n", "20"]
    )
    assert streamed.exit_code == 0
    assert ran["text"] in streamed.stdout


_GQA = {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"}


@pytest.mark.parametrize(
    "family, fused",
    [("qwen3", _GQA), ("gemma", _GQA), ("olmo2", _GQA), ("granite", _GQA),
     ("gemma2", _GQA), ("gemma3_text", _GQA),
     ("stablelm", {"GroupQueryAttention", "RotaryEmbedding", "SkipLayerNormalization"})],
)  # fmt: skip
def test_llama_like_model_types_compile_fused_and_match_transformers(
    family, fused, tiny_models, tmp_path, cli_runner
):
    """Qwen3 (per-head q/k RMSNorm), Gemma (scaled embeddings, (1 + w) norms), OLMo 2 (q/k
    norms over all heads, post-norms), Granite (attention scale 1/64: onnxscript's
    GroupQueryAttention fusion dropped it, 0.009 off), Gemma 2 (soft-capped attention; an
    8-position window on alternate layers), Gemma 3 (q/k norms, a rotary table per
    layer kind: GroupQueryAttention, windowed on alternate layers) and StableLM (LayerNorm, partial
    rotary) export and fuse through the Llama path, and 40 greedy tokens of the fp32 build
    equal transformers' (past the Gemmas' windows)."""
    import onnx

    model_dir = tiny_models(family)
    out = tmp_path / "build"
    _compile(cli_runner, model_dir, out)
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    assert fused <= {node.op_type for node in graph.node if node.domain == "com.microsoft"}
    if family == "gemma3_text":  # its window on the local layers' attention only
        windows = [
            next((a.i for a in node.attribute if a.name == "local_window_size"), None)
            for node in graph.node
            if node.op_type == "GroupQueryAttention"
        ]
        assert windows == [8, None, 8, None]
    prompt = "The quick brown fox jumps over the lazy dog"
    assert _run_tokens(cli_runner, out, prompt, 40) == transformers_greedy(model_dir, prompt, 40)


# model type -> (do_rotary, rotary_interleaved, local_window_size) of each layer's
# GroupQueryAttention, where the sweep's models rotate interleaved, outside it or not at all
_GQA_LAYERS = {
    "smollm3": [(1, 0, None)] * 3 + [(0, 0, None)],
    "exaone4": [(1, 0, 8)] * 3 + [(0, 0, None)],
    **dict.fromkeys(("helium", "ernie4_5"), [(1, 1, None)] * 4),
    **dict.fromkeys(("cohere", "glm", "glm4", "hunyuan_v1_dense", "nemotron"), [(0, 0, None)] * 4),
}


@pytest.mark.parametrize(
    "family",
    ["smollm3", "exaone4", "olmo", "olmo3", "ministral", "seed_oss", "apertus", "arcee",
     "helium", "ernie4_5", "cohere", "glm", "glm4", "hunyuan_v1_dense", "nemotron",
     "vaultgemma", "starcoder2"],
)  # fmt: skip
def test_swept_model_types_compile_and_match_transformers(
    family, tiny_models, tmp_path, cli_runner
):
    """The model types a sweep of transformers' architectures found working through the
    Llama path compile, every linear layer has its role (GLM's packed gate_up, StarCoder2's
    c_fc / c_proj: without one, recipes that keep a role's layers weight-only miss them), each
    layer's attention is one GroupQueryAttention, and 40 greedy tokens of the fp32 build equal
    transformers' (past the 8-position windows).
    Layers with no rotary (SmolLM3's every 4th, EXAONE 4's global ones) fuse with do_rotary=0
    (they were MultiHeadAttention over the traced past concatenation, and EXAONE 4 failed its
    build: kv-policy found 3 GroupQueryAttention nodes for 4 layers), and so do layers whose
    rotary GroupQueryAttention does not take (Cohere's interleaved tables; partial: Nemotron,
    GLM; a norm after it: Hunyuan), the rotary left before it. Helium's and ERNIE 4.5's
    interleaved rotary goes into GroupQueryAttention itself (rotary_interleaved=1)."""
    import onnx
    from safetensors import safe_open

    from fdec.frontend.families import family_for_config

    model_dir = tiny_models(family)
    config = json.loads((model_dir / "config.json").read_text())
    with safe_open(model_dir / "model.safetensors", "np") as weights:
        linear = [n for n in weights.keys() if n.startswith("model.layers.") and "proj" in n]
    roles = family_for_config(config, "config.json")
    assert linear and [n for n in linear if n.endswith("weight") and not roles.role_of(n)] == []
    out = tmp_path / "build"
    _compile(cli_runner, model_dir, out)
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    attention = _attention(graph)
    assert [node.op_type for node in attention] == ["GroupQueryAttention"] * 4
    layers = [
        tuple(
            next((a.i for a in node.attribute if a.name == name), default)
            for name, default in (("do_rotary", 0), ("rotary_interleaved", 0),
                                  ("local_window_size", None))
        )
        for node in attention
    ]  # fmt: skip
    assert layers == _GQA_LAYERS.get(family, layers)
    prompt = "The quick brown fox jumps over the lazy dog"
    assert _run_tokens(cli_runner, out, prompt, 40) == transformers_greedy(model_dir, prompt, 40)


def test_soft_capped_attention_fuses_to_group_query_attention_with_its_cap(tmp_path, cli_runner):
    """Gemma 2 caps its attention scores (cap · tanh(scores / cap)), which onnxscript's
    attention rules do not match: its attention stayed traced (every op of it a kernel of its
    own, the past concatenated each step). The cap now goes to GroupQueryAttention's softcap
    attribute: with a cap of 1 that binds (without the attribute the tokens differ from the
    2nd), 40 greedy tokens of the fp32 build equal transformers', past the 8-position window
    of alternate layers."""
    import onnx
    from models import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "gemma2", "gemma2", attn_logit_softcapping=1.0)
    out = tmp_path / "build"
    _compile(cli_runner, model_dir, out)
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    attention = _attention(graph)
    assert [n.op_type for n in attention] == ["GroupQueryAttention"] * 4
    for node in attention:
        assert next(a.f for a in node.attribute if a.name == "softcap") == 1.0
    assert sum(n.op_type == "Tanh" for n in graph.node) == 1  # the final logits' cap stays
    prompt = "The quick brown fox jumps over the lazy dog"
    assert _run_tokens(cli_runner, out, prompt, 40) == transformers_greedy(model_dir, prompt, 40)


def test_heads_with_their_own_key_and_value_fuse_to_group_query_attention(tmp_path, cli_runner):
    """Llama-2, Phi-3-mini, SmolLM2-1.7B: every head has its own key and value, so the traced
    graph repeats none across heads, where onnxscript's GroupQueryAttention rule looks for the
    repeat: such models fused to MultiHeadAttention (the past concatenated every step). Now
    GroupQueryAttention with kv_num_heads = num_heads and one shared cache buffer per layer;
    40 greedy tokens of the fp32 build equal transformers'."""
    import onnx
    from models import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "mha", "llama", num_key_value_heads=4)
    out = tmp_path / "build"
    _compile(cli_runner, model_dir, out)
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    attention = _attention(graph)
    assert [n.op_type for n in attention] == ["GroupQueryAttention"] * 2
    for node in attention:
        heads = {a.name: a.i for a in node.attribute if a.name.endswith("num_heads")}
        assert heads == {"num_heads": 4, "kv_num_heads": 4}
    fused = next(p for p in json.loads((out / "report.json").read_text())["passes"]
                 if p["name"] == "fuse-attention")  # fmt: skip
    assert fused["stats"]["kv_shared_buffer_layers"] == 2
    prompt = "The quick brown fox jumps over the lazy dog"
    assert _run_tokens(cli_runner, out, prompt, 40) == transformers_greedy(model_dir, prompt, 40)


def test_phi3_compiles_with_its_window_and_types_for_cuda(tiny_models, tmp_path, cli_runner):
    """Phi-3's packed qkv_proj fuses to GroupQueryAttention taking the packed projection, with
    the model's 48-position window as its local_window_size: the fp32 build's 80 greedy tokens
    equal transformers'. It fused to MultiHeadAttention + RotaryEmbedding until a reshape of
    the attention output to its own shape was dropped (MultiHeadAttention concatenates the
    past every step; GroupQueryAttention writes one shared buffer in place). The CUDA model's
    fp16 typing died on the untyped outputs of the fused ops ("2 value(s) have no element
    type"), and its rotary tables were computed every step on the host."""
    import onnx

    model_dir = tiny_models("phi3")
    out = tmp_path / "build"
    _compile(cli_runner, model_dir, out)
    report = json.loads((out / "report.json").read_text())
    assert report["kv_cache"]["policy"]["model_window"] == 47
    attention = [
        node
        for node in onnx.load(out / "model.onnx", load_external_data=False).graph.node
        if node.op_type in ("GroupQueryAttention", "MultiHeadAttention")
    ]
    assert [node.op_type for node in attention] == ["GroupQueryAttention"] * 2
    for node in attention:
        assert node.input[1] == node.input[2] == ""  # packed q/k/v
        window = next(a.i for a in node.attribute if a.name == "local_window_size")
        assert window == 48
    prompt = "The quick brown fox jumps over the lazy dog"
    assert _run_tokens(cli_runner, out, prompt, 80) == transformers_greedy(model_dir, prompt, 80)
    cuda = tmp_path / "cuda"
    args = ["--target", "h200", "--backend", "onnxruntime"]
    result = cli_runner.invoke(cli, ["compile", str(model_dir), "-o", str(cuda), "--json", *args])
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads((cuda / "report.json").read_text())
    assert report["verification"]["ok"]
    # RotaryEmbedding's cos/sin tables are constants, as GroupQueryAttention's are: the per-step
    # Range over max(position_ids) made a MemcpyToHost every step (no CUDA graph capture).
    placement = report["cuda_placement"]
    assert placement["memcpy_nodes"] == 0 and placement["cuda_graph_capturable"]
    # int4 takes every linear layer, gate_up too (it was left fp32: a role no pass knew)
    int4 = tmp_path / "int4"
    result = cli_runner.invoke(cli, ["compile", str(model_dir), "-o", str(int4), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    passes = json.loads((int4 / "report.json").read_text())["passes"]
    awq = next(p for p in passes if p["name"] == "quantize-int4-awq")
    assert awq["stats"]["matmuls_quantized"] == 2 * 4 + 1  # qkv, o, gate_up, down; lm_head


def test_a_longrope_model_switches_to_its_long_factors_past_its_original_positions(
    tmp_path, cli_runner
):
    """Phi-3.5 / Phi-4-mini (longrope) take the short rotary factors within
    original_max_position_embeddings and the long ones past it. transformers computes the long
    ones inside forward the first time and keeps them; when that was the export's trace it
    kept a fake tensor, and the reference taken afterwards was 1.24 off at every position
    while the graph was exact (the build was then held to the original positions). The build
    holds every position: its graph switches factors on the sequence's length, and generation
    recomputes the cache once at the switch as transformers' Phi-3 generate does (without
    that the tokens left transformers' at the 22nd). Streamed the long factors were a traced
    constant without values: "lifted_tensor_4 is not in the checkpoint"."""
    import onnx
    from models import make_tiny_model

    from fdec.runner import load_build
    from fdec.runtime import generate
    from fdec.runtime.batch import generate_batch

    factors = {"short_factor": [1.0 + 0.1 * i for i in range(8)],
               "long_factor": [2.0 + 0.5 * i for i in range(8)]}  # fmt: skip
    model_dir = make_tiny_model(
        tmp_path / "phi", "phi3", sliding_window=None, original_max_position_embeddings=32,
        rope_scaling={"rope_type": "longrope", "type": "longrope", **factors},
    )  # fmt: skip
    out = tmp_path / "build"
    _compile(cli_runner, model_dir, out)
    assert json.loads((out / "fdec-runtime.json").read_text())["max_positions"] == 256
    # GroupQueryAttention on both factors' tables, the graph's switch selecting one per step
    # (onnxscript's cos/sin-cache rule took no switched frequencies: MultiHeadAttention)
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    assert [n.op_type for n in _attention(graph)] == ["GroupQueryAttention"] * 2
    tables = {n.input[7] for n in graph.node if n.op_type == "GroupQueryAttention"}
    assert {n.op_type for n in graph.node if set(n.output) & tables} == {"Where"}
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["greedy"]["identical"]  # 16 + 32 positions: past the switch
    prompt = "The quick brown fox"  # 11 tokens: the switch comes at the 22nd new one
    want = transformers_greedy(model_dir, prompt, 60)
    for build in (out, tmp_path / "streamed"):
        if build.name == "streamed":
            _compile(cli_runner, model_dir, build, "--stream")
        assert _run_tokens(cli_runner, build, prompt, 60) == want
    loaded = load_build(out)
    assert loaded.model.rotary_restart == 32
    ids = loaded.tokenizer(prompt)["input_ids"]
    assert generate_batch(loaded.model, [ids, ids], max_new_tokens=60).tokens == [want, want]
    # fixed-shape decode steps (as CUDA graphs replay them): the restart reuses the buffers
    assert loaded.model.shares_kv_buffer
    assert generate(loaded.model, ids, max_new_tokens=60, static=True).tokens == want
    # Left-padded rows (a plain build) switch and recompute as transformers' batched generate
    # does: by the padded width, every row at once.
    plain = tmp_path / "plain"
    _compile(cli_runner, model_dir, plain, "--passes", "default")
    rows = [ids, loaded.tokenizer("Ships relied")["input_ids"]]
    got = generate_batch(load_build(plain).model, rows, max_new_tokens=40).tokens
    assert got == transformers_padded_greedy(model_dir, rows, 40)


def test_a_yarn_rotary_fuses_to_group_query_attention_with_its_attention_factor(
    tmp_path, cli_runner
):
    """YaRN multiplies cos and sin by an attention factor, which onnxscript's cos/sin-cache
    rule does not match: such models kept the rotary traced and MultiHeadAttention (the past
    concatenated every step). The factor now goes into GroupQueryAttention's constant tables
    (cos(0) × 1.3 in the first row); 40 greedy tokens of the fp32 build equal transformers'."""
    import onnx
    from models import make_tiny_model
    from onnx import numpy_helper

    yarn = {"rope_type": "yarn", "type": "yarn", "factor": 4.0,
            "original_max_position_embeddings": 64, "attention_factor": 1.3}  # fmt: skip
    model_dir = make_tiny_model(tmp_path / "yarn", "llama", rope_scaling=yarn)
    out = tmp_path / "build"
    _compile(cli_runner, model_dir, out)
    model = onnx.load(out / "model.onnx")
    attention = _attention(model.graph)
    assert [n.op_type for n in attention] == ["GroupQueryAttention"] * 2
    tables = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    cos = tables[attention[0].input[7]]
    assert cos.shape == (256, 8) and np.allclose(cos[0], 1.3)
    prompt = "The quick brown fox jumps over the lazy dog"
    assert _run_tokens(cli_runner, out, prompt, 40) == transformers_greedy(model_dir, prompt, 40)


def test_sampling_options_change_tokens_reproducibly(tiny_models, tmp_path, cli_runner):
    out = tmp_path / "build"
    _compile(cli_runner, tiny_models("llama"), out)
    args = [
        "run",
        str(out),
        "-p",
        "Ships",
        "-n",
        "12",
        "--json",
        "--temperature",
        "5",
        "--top-k",
        "50",
    ]
    first = json.loads(cli_runner.invoke(cli, [*args, "--seed", "1"]).stdout)["tokens"]
    again = json.loads(cli_runner.invoke(cli, [*args, "--seed", "1"]).stdout)["tokens"]
    other = json.loads(cli_runner.invoke(cli, [*args, "--seed", "2"]).stdout)["tokens"]
    greedy = json.loads(
        cli_runner.invoke(cli, ["run", str(out), "-p", "Ships", "-n", "12", "--json"]).stdout
    )["tokens"]
    assert first == again
    assert first != other or first != greedy


def test_sampling_edges_and_an_empty_prompt(tiny_models, tmp_path, cli_runner):
    """Each used to be an internal error (exit 1): --top-p 0 (NaN probabilities), --top-k
    past the vocabulary (np.partition out of bounds), a negative --seed, an infinite
    temperature, and a prompt of 0 tokens (GroupQueryAttention's prefill)."""
    out = tmp_path / "build"
    _compile(cli_runner, tiny_models("llama"), out)
    run = ["run", str(out), "-p", "Ships", "-n", "12", "--json"]

    def tokens(*options):
        result = cli_runner.invoke(cli, [*run, *options])
        assert result.exit_code == 0, result.output + result.stderr
        return json.loads(result.stdout)["tokens"]

    greedy = tokens()
    assert tokens("--temperature", "3", "--top-p", "0") == greedy  # only the top token left
    wide = tokens("--temperature", "3", "--top-k", "100000", "--seed", "4")
    assert wide == tokens("--temperature", "3", "--seed", "4")  # k past the vocabulary: all
    for options, words in (
        (["--seed", "-1"], "-1 is not in the range"),
        (["--temperature", "inf"], "give temperature 0 (greedy) or a finite number"),
    ):
        refused = cli_runner.invoke(cli, [*run, *options])
        assert refused.exit_code == 2 and words in refused.output + refused.stderr
    empty = cli_runner.invoke(cli, ["run", str(out), "-p", "", "--no-chat-template"])
    assert empty.exit_code == 2 and "the prompt is empty (0 tokens)" in empty.stderr


def test_run_stops_at_the_models_positions(tiny_models, tmp_path, cli_runner):
    """Past the model's positions (256 here) the fused graph's rotary table ends: ONNX
    Runtime failed with an internal error. Generation stops there, a prompt filling them is
    refused in one line."""
    out = tmp_path / "build"
    _compile(cli_runner, tiny_models("llama"), out)
    args = ["run", str(out), "--no-chat-template", "--json", "-n", "300"]
    result = cli_runner.invoke(cli, [*args, "-p", "word " * 30])
    assert result.exit_code == 0, result.output + result.stderr
    ran = json.loads(result.stdout)
    assert ran["max_positions_reached"] == 256
    assert ran["prompt_tokens"] + ran["new_tokens"] == 256
    refused = cli_runner.invoke(cli, [*args, "-p", "word " * 70])
    assert refused.exit_code == 2
    assert "model has 256 positions; shorten the prompt" in refused.stderr


def test_a_model_with_fewer_positions_than_the_held_text_compiles(tmp_path, cli_runner):
    """A model with 48 positions died in the reference (128 held tokens: "index out of range
    in self" in GPT-2's position embedding), then in int4-awq's calibration (128-token
    pieces). Both now use as many positions as the model has, and greedy decoding fits."""
    from models import make_tiny_model

    model = make_tiny_model(tmp_path / "short", "gpt2", n_positions=48)
    out = tmp_path / "build"
    result = cli_runner.invoke(cli, ["compile", str(model), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads((out / "report.json").read_text())
    assert "quantize-int4-awq" in report["pipeline"]  # the cpu default calibrates
    verification = report["verification"]
    assert verification["numeric"]["tokens_scored"] == 48
    assert verification["greedy"]["steps"] == 48 - 16  # prompt 16, the rest greedy


def test_encoder_compiles_and_verifies_both_outputs(tiny_models, tmp_path, cli_runner):
    out = tmp_path / "bert"
    summary = _compile(cli_runner, tiny_models("bert"), out)
    assert summary["verification"]["max_abs_error"] <= 1e-3
    report = json.loads((out / "report.json").read_text())
    errors = report["verification"]["numeric"]["errors"]
    assert set(errors) == {"last_hidden_state", "pooler_output"}
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state", "pooler_output"]
    assert [i.name for i in session.get_inputs()] == [
        "input_ids",
        "attention_mask",
        "token_type_ids",
    ]
    ran = cli_runner.invoke(cli, ["run", str(out), "-p", "hello there", "--json"])
    assert ran.exit_code == 0, ran.output
    assert len(json.loads(ran.stdout)["embedding"]) == 64


def test_verify_each_dump_dir_and_untie(tiny_models, tmp_path, cli_runner):
    out, dumps = tmp_path / "build", tmp_path / "dumps"
    _compile(
        cli_runner, tiny_models("llama"), out, "--verify-each", "--dump-dir", str(dumps),
        "--passes", "untie-embeddings,default",
    )  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    names = [p["name"] for p in report["passes"]]
    assert names == [
        "untie-embeddings",
        "strip-metadata",
        "fold-constants",
        "cse",
        "remove-dead-nodes",
        "infer-shapes",
    ]
    for record in report["passes"]:
        assert record["checks"]["numeric"]["ok"] is True
        assert record["checks"]["numeric"]["max_abs_error"] <= 1e-3
        assert record["checks"]["structure"]["ok"] is True
    assert report["passes"][0]["stats"]["untied"] == 1
    assert report["spec"]["tie_word_embeddings"] is False
    assert report["spec"]["weights"]["lm_head"] != report["spec"]["weights"]["embed"]
    dumped = sorted(p.name for p in dumps.glob("*.onnx"))
    assert dumped == ["001_UntieEmbeddingsPass.onnx", "002_StripMetadataPass.onnx",
                      "003_FoldConstantsPass.onnx", "004_EliminateCommonSubexpressionsPass.onnx",
                      "005_RemoveDeadNodesPass.onnx", "006_InferShapesPass.onnx"]  # fmt: skip
    # The untied lm_head is its own [hidden, vocab] weight in the build.
    import onnx

    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    assert shapes[report["spec"]["weights"]["lm_head"]] == [64, 320]


def test_verify_each_of_an_int4_recipe_judges_fusion_with_int4s_error(
    tiny_models, tmp_path, cli_runner
):
    """fuse-attention after int4 carries int4's error: its own 1e-3 failed the compile."""
    out = tmp_path / "build"
    _compile(cli_runner, tiny_models("llama"), out, "--quantize", "int4", "--verify-each")
    report = json.loads((out / "report.json").read_text())
    checks = {p["name"]: p["checks"]["numeric"] for p in report["passes"]}
    assert checks["fuse-attention"]["ok"] and checks["fuse-attention"]["max_abs_error"] > 1e-3
    assert checks["fuse-attention"]["tolerance"] == checks["quantize-int4"]["tolerance"]


def test_report_command_prints_pass_table(tiny_models, tmp_path, cli_runner):
    out = tmp_path / "build"
    _compile(cli_runner, tiny_models("gpt2"), out)
    result = cli_runner.invoke(cli, ["report", str(out)])
    assert result.exit_code == 0
    for name in ("fold-constants", "cse", "remove-dead-nodes", "infer-shapes", "verification PASS"):
        assert name in result.stdout
    as_json = json.loads(cli_runner.invoke(cli, ["report", str(out), "--json"]).stdout)
    assert as_json["source"]["family"] == "gpt2"


def test_no_passes_still_verifies(tiny_models, tmp_path, cli_runner):
    summary = _compile(cli_runner, tiny_models("llama"), tmp_path / "b", "--passes", "none")
    assert summary["passes"] == []
    assert summary["verification"]["greedy_identical"] is True


def test_logits_of_build_match_pytorch_at_every_position(tiny_models, tmp_path, cli_runner):
    """Independent of fdec's own verifier: compare the build with transformers directly."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = tiny_models("qwen2")
    out = tmp_path / "build"
    _compile(cli_runner, model_dir, out)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(0, 320, size=(2, 9))
    past = {
        i.name: np.zeros((2, 2, 0, 16), np.float32)
        for i in session.get_inputs()
        if i.name.startswith("past_key_values")
    }
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.tile(np.arange(9), (2, 1)),
        **past,
    }
    logits = session.run(["logits"], feeds)[0]
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(logits - expected).max() < 1e-3


def test_same_inputs_give_byte_identical_model_files(tiny_models, tmp_path, cli_runner):
    first, second = tmp_path / "one", tmp_path / "two"
    _compile(cli_runner, tiny_models("llama"), first)
    _compile(cli_runner, tiny_models("llama"), second)
    hashes = [
        json.loads((out / "fdec-build.json").read_text())["outputs"] for out in (first, second)
    ]
    for name in ("model.onnx", "model.onnx.data", "fdec-runtime.json", "tokenizer.json"):
        assert hashes[0][name]["sha256"] == hashes[1][name]["sha256"], name


def test_hub_id_already_in_the_hugging_face_cache_compiles_offline(
    tiny_models, tmp_path, cli_runner, monkeypatch
):
    """A model transformers downloaded (the Hugging Face cache, HF_HUB_CACHE) compiles by its
    hub id with no network: fdec used to download it again into its own cache, and offline
    failed ("cannot download")."""
    import shutil

    import huggingface_hub.constants

    hub = tmp_path / "hf-hub"
    repo = hub / "models--someorg--tiny-llama"
    revision = "0" * 40
    shutil.copytree(tiny_models("llama"), repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    out = tmp_path / "build"
    args = ["compile", "someorg/tiny-llama", "-o", str(out), "--quantize", "none"]
    result = cli_runner.invoke(cli, [*args, "--cache-dir", str(tmp_path / "fdec-cache")])
    assert result.exit_code == 0, result.output + result.stderr
    assert "using the Hugging Face cache's copy" in result.stderr
    assert json.loads((out / "report.json").read_text())["verification"]["ok"]
    assert not (tmp_path / "fdec-cache" / "hub").exists()  # nothing downloaded again
