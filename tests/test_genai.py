"""onnxruntime-genai driving fdec builds (--emit genai, fdec run --engine genai; issue 8)."""

from __future__ import annotations

import builtins
import json

import pytest

from fdec.cli import cli
from fdec.errors import InputError, UsageError
from fdec.lower.genai import GENAI_CONFIG, generate_genai
from fdec.runner import load_build, run_prompt_genai
from fdec.runtime import generate

PROMPT_IDS = [5, 17, 42, 99, 3, 7, 8, 120, 64]
PLAIN_PASSES = "strip-metadata,fold-constants,cse,remove-dead-nodes,infer-shapes"


def _compile(cli_runner, model, out, *args):
    result = cli_runner.invoke(
        cli, ["compile", str(model), "-o", str(out), "--json", "--emit", "genai", *args]
    )
    assert result.exit_code == 0, result.output + result.stderr
    return out


@pytest.fixture(scope="module")
def builds(tiny_models, tmp_path_factory):
    from click.testing import CliRunner

    runner = CliRunner()
    root = tmp_path_factory.mktemp("genai-builds")
    llama = tiny_models("llama")
    return {
        "fused": _compile(runner, llama, root / "fused", "--quantize", "none"),
        "plain": _compile(
            runner, llama, root / "plain", "--quantize", "none", "--passes", PLAIN_PASSES
        ),
        "int4": _compile(runner, llama, root / "int4", "--quantize", "int4"),
        "gpt2": _compile(runner, tiny_models("gpt2"), root / "gpt2", "--quantize", "none"),
    }


def test_config_names_the_builds_inputs_outputs_and_cache(builds, tiny_models):
    hf = json.loads((tiny_models("llama") / "config.json").read_text())
    runtime = json.loads((builds["fused"] / "fdec-runtime.json").read_text())
    config = json.loads((builds["fused"] / GENAI_CONFIG).read_text())
    model, decoder = config["model"], config["model"]["decoder"]
    assert model["type"] == "llama" and model["vocab_size"] == hf["vocab_size"]
    assert model["context_length"] == runtime["max_positions"]
    assert decoder["num_hidden_layers"] == hf["num_hidden_layers"]
    assert decoder["num_attention_heads"] == hf["num_attention_heads"]
    assert decoder["num_key_value_heads"] == hf["num_key_value_heads"]
    assert decoder["head_size"] == hf["hidden_size"] // hf["num_attention_heads"]
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert set(decoder["inputs"]) >= {"input_ids", "attention_mask", "position_ids"}
    assert model["eos_token_id"] == hf["eos_token_id"]
    assert config["search"]["do_sample"] is False
    # The fused build's GroupQueryAttention shares one buffer; the traced graph concatenates.
    assert config["search"]["past_present_share_buffer"] is True
    plain = json.loads((builds["plain"] / GENAI_CONFIG).read_text())
    assert plain["search"]["past_present_share_buffer"] is False
    # genai's own "gpt2" type wants a stacked past_%d per layer: its generic decoder drives ours.
    gpt2 = json.loads((builds["gpt2"] / GENAI_CONFIG).read_text())
    assert gpt2["model"]["type"] == "decoder"


def test_config_samples_as_the_models_generation_config(tiny_models, tmp_path, cli_runner):
    """onnxruntime-genai's builder copies generation_config.json's sampling into the search
    (Llama-3-Instruct: do_sample, temperature 0.6, top_p 0.9); fdec wrote greedy whatever the
    model said. fdec's own genai run stays greedy without the repetition penalty."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_models("llama"), model)
    sampling = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.3}
    (model / "generation_config.json").write_text(json.dumps({**sampling, "top_k": "x"}))
    out = _compile(cli_runner, model, tmp_path / "build", "--quantize", "none")
    search = json.loads((out / GENAI_CONFIG).read_text())["search"]
    assert {k: search[k] for k in sampling} == sampling
    assert search["top_k"] == 50  # transformers' default: the invalid "x" is not copied
    stop = json.loads((out / "fdec-runtime.json").read_text())["eos_token_ids"]
    ours = generate(load_build(out).model, PROMPT_IDS, max_new_tokens=24, stop_tokens=stop)
    theirs = generate_genai(out, PROMPT_IDS, max_new_tokens=24, stop_tokens=stop)
    assert theirs["tokens"] == list(ours.tokens)


@pytest.mark.parametrize("build", ["fused", "plain", "int4", "gpt2"])
def test_genai_greedy_tokens_equal_fdecs_generate(builds, build):
    folder = builds[build]
    stop = json.loads((folder / "fdec-runtime.json").read_text())["eos_token_ids"]
    ours = generate(load_build(folder).model, PROMPT_IDS, max_new_tokens=48, stop_tokens=stop)
    theirs = generate_genai(folder, PROMPT_IDS, max_new_tokens=48, stop_tokens=stop)
    assert len(ours.tokens) > 8
    assert theirs["tokens"] == list(ours.tokens)


def test_a_stop_token_ends_both_generators_at_the_same_place(builds):
    folder = builds["fused"]
    free = generate(load_build(folder).model, PROMPT_IDS, max_new_tokens=48).tokens
    stop = [t for t in free if t not in free[:3]][:1]  # a token first produced after step 3
    assert stop, free
    ours = generate(load_build(folder).model, PROMPT_IDS, max_new_tokens=48, stop_tokens=stop)
    seen: list[int] = []
    theirs = generate_genai(
        folder, PROMPT_IDS, max_new_tokens=48, stop_tokens=stop, on_token=seen.append
    )
    assert ours.tokens[-1] == stop[0] and len(ours.tokens) < 48
    assert theirs["tokens"] == seen == list(ours.tokens)


def test_fdec_run_engine_genai_gives_fdecs_text(builds, cli_runner):
    args = ["run", str(builds["fused"]), "-p", "the quick brown fox", "-n", "24", "--json"]
    ours = cli_runner.invoke(cli, args)
    theirs = cli_runner.invoke(cli, [*args, "--engine", "genai"])
    assert ours.exit_code == 0 and theirs.exit_code == 0, ours.output + theirs.output
    ours, theirs = json.loads(ours.stdout), json.loads(theirs.stdout)
    assert theirs["engine"] == "genai" and theirs["new_tokens"] > 0
    assert theirs["tokens"] == ours["tokens"] and theirs["text"] == ours["text"]


def test_encoders_are_refused_before_any_work(tiny_models, tmp_path, cli_runner):
    out = tmp_path / "bert"
    result = cli_runner.invoke(
        cli, ["compile", str(tiny_models("bert")), "-o", str(out), "--emit", "genai"]
    )
    assert result.exit_code == 2
    assert "--emit genai is for decoder builds" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "args",
    [["--quantize", "none", "--kv-window", "16", "--kv-sink", "4"],
     # TensorRT's model.onnx keeps the traced attention: the window is trimmed at run time
     ["--target", "h100", "--kv-window", "16"]],
)  # fmt: skip
def test_a_trimmed_kv_cache_is_refused_and_nothing_is_written(
    tiny_models, tmp_path, cli_runner, args
):
    out = tmp_path / "sink"
    args = [*args, "--emit", "genai"]
    result = cli_runner.invoke(cli, ["compile", str(tiny_models("llama")), "-o", str(out), *args])
    assert result.exit_code == 2, result.output + result.stderr
    assert "trims its KV cache" in result.stderr
    assert "exporting" not in result.stderr  # refused when planned, before any work
    assert not out.exists()


@pytest.mark.parametrize(
    ("target", "options", "stored"),
    [("h200", {"backend": "onnxruntime-cuda", "quantize": "bf16"}, "bf16"),
     ("cpu", {"backend": "onnxruntime", "quantize": "none", "kv_dtype": "int8"}, "int8")],
)  # fmt: skip
def test_a_cache_genai_cannot_drive_is_refused_when_planned(target, options, stored):
    """A bf16 CUDA graph keeps a bf16 cache: the compile used to die after export and
    verification, telling the user to drop a --kv-dtype they had not given."""
    from fdec.compile import plan_pipeline
    from fdec.targets import load_target

    with pytest.raises(UsageError, match=f"does not drive a {stored} KV cache") as caught:
        plan_pipeline(target=load_target(target), emit=("genai",), **options)
    assert "--quantize fp16" in caught.value.one_line()
    fp16 = {**options, "quantize": "fp16"} if stored == "bf16" else {**options, "kv_dtype": None}
    plan_pipeline(target=load_target(target), emit=("genai",), **fp16)


def test_run_refusals(builds, tmp_path, cli_runner, monkeypatch):
    # Sampling is not offered through genai: one line, exit 2.
    sampled = cli_runner.invoke(
        cli, ["run", str(builds["fused"]), "-p", "x", "--engine", "genai", "--temperature", "0.7"]
    )
    assert sampled.exit_code == 2 and "greedy decoding only" in sampled.stderr
    # A build compiled without --emit genai.
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in builds["fused"].iterdir():
        if path.name != GENAI_CONFIG:
            (bare / path.name).symlink_to(path)
    with pytest.raises(InputError, match="--emit genai"):
        run_prompt_genai(bare, "hello", max_new_tokens=4)
    # onnxruntime-genai not installed: the refusal names the pip install.
    real_import = builtins.__import__

    def no_genai(name, *args, **kwargs):
        if name == "onnxruntime_genai":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_genai)
    with pytest.raises(UsageError, match="pip install onnxruntime-genai"):
        generate_genai(builds["fused"], PROMPT_IDS, max_new_tokens=4)
    result = cli_runner.invoke(cli, ["run", str(builds["fused"]), "-p", "x", "--engine", "genai"])
    assert result.exit_code == 2 and "pip install onnxruntime-genai" in result.stderr
