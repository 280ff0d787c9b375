"""The capacity planner (`fdec plan`, fdec.plan) and compile's early capacity check, against
hand calculations: KV bytes per token = 2 × layers × KV heads × head dim × dtype bytes."""

from __future__ import annotations

import json
import math
import os

import pytest

from fdec.cli import cli
from fdec.errors import EXIT_DOES_NOT_FIT, CapacityError
from fdec.plan import PREFILL_CHUNK, load_shape, plan_capacity, shape_from_config
from fdec.targets import list_targets, load_target, target_names

# Llama-3-8B's shape (config.json only; no weights anywhere).
LLAMA3_8B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "hidden_size": 4096,
    "intermediate_size": 14336, "vocab_size": 128256, "max_position_embeddings": 8192,
    "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
}  # fmt: skip
# SmolLM2-135M's shape, as its config.json gives it.
SMOLLM2 = {
    "model_type": "llama", "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "head_dim": 64, "hidden_size": 576, "intermediate_size": 1536,
    "vocab_size": 49152, "max_position_embeddings": 8192, "tie_word_embeddings": True,
}  # fmt: skip

# Llama-3-8B by hand: per layer q 4096², k and v 4096×1024, o 4096², gate/up/down 4096×14336,
# two RMSNorms; embedding and lm_head 128256×4096 each; one final norm.
L3_LINEAR = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
L3_TABLE = 128256 * 4096
L3_NORMS = 32 * 2 * 4096 + 4096
L3_PARAMETERS = L3_LINEAR + 2 * L3_TABLE + L3_NORMS


@pytest.fixture
def llama3_folder(tmp_path):
    folder = tmp_path / "llama3-8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA3_8B))
    return folder


def _one_error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("[fdec]", "[fdec "))]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_llama3_8b_kv_cache_and_parameters_by_hand(llama3_folder):
    shape = load_shape(str(llama3_folder))  # a folder with config.json and no weights
    assert shape.parameters() == L3_PARAMETERS == 8_030_261_248
    h100 = load_target("h100")
    fp16 = plan_capacity(shape, h100, weights="fp16", kv_dtype="fp16", context=8192)
    assert fp16.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131_072
    assert fp16.kv_bytes_per_sequence == 131_072 * 8192  # 1 GiB per 8k-token sequence
    assert fp16.weight_bytes == 2 * L3_PARAMETERS
    for dtype, size in (("fp32", 4), ("bf16", 2), ("fp8", 1), ("int8", 1)):
        plan = plan_capacity(shape, h100, weights="fp16", kv_dtype=dtype)
        assert plan.kv_bytes_per_token == 2 * 32 * 8 * 128 * size
    # The bare config.json path gives the same shape.
    assert load_shape(str(llama3_folder / "config.json")).parameters() == L3_PARAMETERS


def test_llama3_8b_quantized_weight_bytes_by_hand(llama3_folder):
    shape = load_shape(str(llama3_folder))
    h100 = load_target("h100")
    lm_head = 4096 * 128256
    embed_int8 = 128256 * 4096 + 128256 * 2  # per-row int8 codes + one fp16 scale a row
    # int4: blocks of 32 inputs with an fp16 scale = 0.5 + 2/32 bytes per weight.
    int4 = plan_capacity(shape, h100, weights="int4", kv_dtype="fp16")
    assert int4.weight_bytes == (L3_LINEAR + lm_head) * (0.5 + 2 / 32) + embed_int8 + L3_NORMS * 2
    # fp8 per output channel: 1 byte a weight + one fp16 scale per output column.
    columns = 32 * (4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096) + 128256
    fp8 = plan_capacity(shape, h100, weights="fp8", kv_dtype="fp8")
    assert fp8.weight_bytes == L3_LINEAR + lm_head + 2 * columns + embed_int8 + L3_NORMS * 2
    # The same int4 on the cpu target keeps fp32 scales and float tensors (fdec's fp32 graph).
    cpu = plan_capacity(shape, load_target("cpu"), weights="int4-awq", kv_dtype="fp32")
    embed_cpu = 128256 * 4096 + 128256 * 4
    assert cpu.weight_bytes == (L3_LINEAR + lm_head) * (0.5 + 4 / 32) + embed_cpu + L3_NORMS * 4
    # int8-wo: 1 byte a weight + an fp16 scale per block of 32 inputs (h100: TensorRT, untied)
    wo = plan_capacity(shape, h100, weights="int8-wo", kv_dtype="fp16")
    assert wo.weight_bytes == (L3_LINEAR + lm_head) * (1 + 2 / 32) + embed_int8 + L3_NORMS * 2
    # On the cpu target a decoder's plain int8 is int8-wo (its tied-or-not table, fp32 scales);
    # int8-dynamic stores int8 per output channel.
    cpu_target = load_target("cpu")
    plain, cpu_wo, dynamic = (plan_capacity(shape, cpu_target, weights=w, kv_dtype="fp32")
                              for w in ("int8", "int8-wo", "int8-dynamic"))  # fmt: skip
    assert plain.weight_bytes == cpu_wo.weight_bytes != dynamic.weight_bytes
    assert cpu_wo.weight_bytes == (L3_LINEAR + lm_head) * (1 + 4 / 32) + embed_cpu + L3_NORMS * 4


def test_max_sequences_and_context_are_the_largest_that_fit(llama3_folder):
    shape = load_shape(str(llama3_folder))
    h100 = load_target("h100")  # 80 GB, recipe fp8 weights / fp8 KV / fp8 activations
    plan = plan_capacity(shape, h100, context=8192, batch=16)
    assert (plan.weight_precision, plan.kv_dtype) == ("fp8", "fp8")
    usable = 80e9 * 0.9
    kv = 2 * 32 * 8 * 128 * 1
    width = 2 * 4096 + 32 * 128 + 2 * 8 * 128 + 2 * 14336  # residual+norm, q/k/v, gate/up

    def need(batch, context):  # weights + KV + workspace (16-bit activations) + fp32 logits
        tokens = max(batch, min(PREFILL_CHUNK, context))
        return plan.weight_bytes + batch * context * kv + tokens * width * 2 + batch * 128256 * 4

    assert plan.needed_bytes == need(16, 8192) and plan.fits
    best = plan.max_sequences
    assert need(best, 8192) <= usable < need(best + 1, 8192)
    # Below the prefill chunk (512 tokens in flight) each sequence adds its KV and its logits.
    fixed = plan.weight_bytes + PREFILL_CHUNK * width * 2
    per_sequence = 8192 * kv + 128256 * 4
    assert best == (usable - fixed) // per_sequence == 118
    assert need(16, plan.max_context) <= usable < need(16, plan.max_context + 1)
    # Headroom is taken off the memory before anything is planned.
    half = plan_capacity(shape, h100, context=8192, batch=16, headroom=0.5)
    assert half.usable_bytes == 40e9
    assert half.max_sequences == (40e9 - fixed) // per_sequence
    too_many = plan_capacity(shape, h100, context=8192, batch=best + 1)
    assert not too_many.fits and too_many.needed_bytes > too_many.usable_bytes


def test_smollm2_shape_by_hand():
    shape = shape_from_config(SMOLLM2, "smollm2-135m")
    assert shape.parameters() == 134_515_008  # SmolLM2-135M's published count, tied embeddings
    cpu = plan_capacity(shape, load_target("cpu"), weights="int4-awq", context=2048)  # fp32 KV
    assert cpu.kv_bytes_per_token == 2 * 30 * 3 * 64 * 4 == 46_080
    fp16 = plan_capacity(shape, load_target("t4"), weights="int4", context=2048)  # fp16 KV
    assert fp16.kv_bytes_per_token == 2 * 30 * 3 * 64 * 2 == 23_040
    assert fp16.kv_bytes_per_sequence == 23_040 * 2048
    # Tied embeddings: float weights hold the table once; quantized builds untie the lm_head.
    assert plan_capacity(shape, load_target("h100"), weights="fp16").weight_bytes == 2 * 134_515_008
    # int4 (block 32): ONNX Runtime (cpu) keeps the tied table once, in int4 with fp32 scales;
    # TensorRT (t4) unties the lm_head (int4, fp16 scales) and stores the embedding int8 a row.
    linear = 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) + 576 * 49152
    norms = 30 * 2 * 576 + 576
    assert cpu.weight_bytes == linear * (0.5 + 4 / 32) + norms * 4
    assert fp16.weight_bytes == linear * (0.5 + 2 / 32) + 49152 * (576 + 2) + norms * 2
    assert any("one int4 table" in note for note in cpu.notes)
    assert any("tied lm_head stored separately" in note for note in fp16.notes)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2", "bert"])
def test_parameter_count_matches_the_real_model(tiny_models, family):
    from transformers import AutoModel, AutoModelForCausalLM

    folder = tiny_models(family)
    auto = AutoModel if family == "bert" else AutoModelForCausalLM
    model = auto.from_pretrained(folder)
    assert load_shape(str(folder)).parameters() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", ["arcee", "apertus", "nemotron", "starcoder2"])
def test_an_mlp_without_a_gate_is_counted_without_one(tiny_models, family):
    """Model types whose MLP is up and down only (and StarCoder2's biases on every linear
    layer) are counted so: the gate they lack had been counted (+21 % of these tiny models'
    parameters, a third of every real one's MLP); what is left is norms counted as RMSNorms."""
    from transformers import AutoModelForCausalLM

    folder = tiny_models(family)
    actual = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())
    shape = load_shape(str(folder))
    assert not shape.gated_mlp
    assert shape.parameters() == pytest.approx(actual, rel=0.005)
    assert any("up/down" in note for note in shape.notes)


def test_gpt2_names_and_encoder_without_kv_cache(tiny_models):
    gpt2 = load_shape(str(tiny_models("gpt2")))  # n_layer 2, n_head 4, n_embd 64
    plan = plan_capacity(gpt2, load_target("cpu"), context=128)
    assert plan.kv_bytes_per_token == 2 * 2 * 4 * (64 // 4) * 4
    assert (gpt2.intermediate_size, gpt2.max_positions) == (4 * 64, 256)
    bert = load_shape(str(tiny_models("bert")))
    plan = plan_capacity(bert, load_target("cpu"), context=128, batch=4)
    assert plan.kv_bytes_per_token == 0 and plan.kv_dtype == "none"
    recipe = load_target("cpu").default_recipe  # an encoder's weights, where it names them
    assert plan.weight_precision == recipe.get("encoder_weights", recipe["weights"]).split("-")[0]
    assert any("no KV cache" in note for note in plan.notes)
    assert plan.max_sequences > 4 and plan.fits


def test_cpu_target_uses_the_hosts_ram():
    shape = shape_from_config(SMOLLM2, "smollm2-135m")
    cpu = load_target("cpu")
    assert cpu.memory_gb == 0  # the data file declares none
    plan = plan_capacity(shape, cpu)
    assert plan.memory_bytes == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert "RAM" in plan.memory_source


def test_cli_table_lists_every_target(cli_runner, llama3_folder):
    result = cli_runner.invoke(cli, ["plan", str(llama3_folder), "--target", "all"])
    assert result.exit_code == 0, result.output + result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[3:] if line.strip()}
    assert set(target_names()) <= set(rows)
    assert "8,030.3 M parameters" in result.stdout
    # h100 row: fp8 weights, fp8 KV at 0.0655 MB a token, 0.537 GB per 8192-token sequence.
    cells = rows["h100"].split()
    assert cells[2] == "fp8" and cells[4] == "fp8"
    assert cells[5] == f"{65536 / 1e6:.4f}" and cells[6] == f"{65536 * 8192 / 1e9:.3f}"
    assert cells[-1] == "fits"
    assert cells[9].endswith("*") and "beyond the model's 8,192 positions" in result.stdout


def test_cli_json_is_one_object(cli_runner, llama3_folder):
    args = ["plan", str(llama3_folder), "--target", "h100", "--kv-dtype", "fp16",
            "--quantize", "int4", "--context", "4096", "--batch", "8", "--json"]  # fmt: skip
    result = cli_runner.invoke(cli, args)
    assert result.exit_code == 0, result.output + result.stderr
    data = json.loads(result.stdout)
    assert data["model"]["parameters"] == L3_PARAMETERS
    (plan,) = data["plans"]
    assert plan["kv_bytes_per_token"] == 131_072 and plan["kv_dtype_from"] == "--kv-dtype"
    assert plan["weight_precision"] == "int4" and plan["context"] == 4096 and plan["batch"] == 8
    every = json.loads(cli_runner.invoke(cli, ["plan", str(llama3_folder), "--json"]).stdout)
    assert [row["target"] for row in every["plans"]] == [t.name for t in list_targets()]


@pytest.mark.parametrize(
    ("quantization", "precision", "source"),
    [
        ({"quant_method": "gptq", "bits": 4}, "int4", "gptq int4"),
        ({"quant_method": "gptq", "bits": 8}, "int8", "gptq int8"),
        ({"quant_method": "compressed-tensors", "config_groups": {"group_0": {
            "weights": {"num_bits": 8, "type": "int", "strategy": "channel"}}}},
         "int8", "compressed-tensors int8"),
    ],
)  # fmt: skip
def test_a_quantized_checkpoint_is_planned_in_its_own_width(
    cli_runner, tmp_path, quantization, precision, source
):
    """A GPTQ/AWQ/compressed-tensors folder compiles on its own int4 (int8) blocks: planned
    so (the target's default, fp8 on h100, was shown before), from config.json alone."""
    folder = tmp_path / "llama3-8b-gptq"
    folder.mkdir()
    config = dict(LLAMA3_8B, quantization_config=quantization)
    (folder / "config.json").write_text(json.dumps(config))
    result = cli_runner.invoke(cli, ["plan", str(folder), "--target", "h100", "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    (plan,) = json.loads(result.stdout)["plans"]
    assert plan["weight_precision"] == precision
    assert plan["weight_precision_from"] == f"the source ({source})"
    asked = cli_runner.invoke(cli, ["plan", str(folder), "--target", "h100", "--quantize", "fp8",
                                    "--json"])  # fmt: skip
    assert json.loads(asked.stdout)["plans"][0]["weight_precision"] == "fp8"


def test_precision_a_target_lacks(cli_runner, llama3_folder):
    # --target all: a row that says why; one target: exit 2 with the target's own message.
    result = cli_runner.invoke(cli, ["plan", str(llama3_folder), "--quantize", "fp8", "--json"])
    rows = {row["target"]: row for row in json.loads(result.stdout)["plans"]}
    assert "compute capability" in rows["a100"]["error"] and rows["h100"]["weight_bytes"] > 0
    one = cli_runner.invoke(cli, ["plan", str(llama3_folder), "-t", "a100", "--quantize", "fp8"])
    assert one.exit_code == 2
    assert "FP8 needs compute capability" in _one_error_line(one)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--target", "h1000"], "unknown target"),
        (["--kv-dtype", "int4"], "KV-cache dtype int4 is not supported"),
        (["--kv-dtype", "fp7"], "unknown precision"),
        (["--headroom", "1.5"], "--headroom must be"),
    ],
)
def test_bad_options_exit_2_with_one_line(cli_runner, llama3_folder, args, words):
    result = cli_runner.invoke(cli, ["plan", str(llama3_folder), *args])
    assert result.exit_code == 2
    assert words in _one_error_line(result)


def test_bad_model_exits_2_with_one_line(cli_runner, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli_runner.invoke(cli, ["plan", str(empty)])
    assert result.exit_code == 2 and "has no config.json" in _one_error_line(result)
    broken = tmp_path / "config.json"
    broken.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    result = cli_runner.invoke(cli, ["plan", str(broken)])
    assert result.exit_code == 2 and "num_attention_heads" in _one_error_line(result)
    # A hub id fetches config.json alone (offline here: HF_HUB_OFFLINE=1 from conftest).
    result = cli_runner.invoke(cli, ["plan", "no-such-org/no-such-model"])
    assert result.exit_code == 2 and "cannot fetch config.json" in _one_error_line(result)


def test_compile_that_cannot_fit_exits_3_before_export(cli_runner, tiny_models, tmp_path):
    out = tmp_path / "build"
    args = ["compile", str(tiny_models("llama")), "-o", str(out), "--max-batch", "100000000"]
    result = cli_runner.invoke(cli, args)
    assert result.exit_code == EXIT_DOES_NOT_FIT == 4
    line = _one_error_line(result)
    assert "does not fit cpu" in line and "GB available" in line and "--max-batch" in line
    needed = float(line.split("needs ")[1].split(" GB")[0].replace(",", ""))
    # tiny llama: 2 layers × 2 KV heads × 16 dims, fp32 KV, 256 positions, 1e8 sequences.
    assert math.isclose(needed, 1e8 * 256 * (2 * 2 * 2 * 16 * 4) / 1e9, rel_tol=0.05)
    assert "exporting" not in result.stderr and not out.exists()


def test_compile_writes_the_plan_into_the_report(cli_runner, tiny_models, tmp_path):
    out = tmp_path / "build"
    args = ["compile", str(tiny_models("llama")), "-o", str(out), "--quantize", "none",
            "--max-batch", "4", "--max-seq-len", "128", "-q"]  # fmt: skip
    result = cli_runner.invoke(cli, args)
    assert result.exit_code == 0, result.output + result.stderr
    capacity = json.loads((out / "report.json").read_text())["capacity"]
    assert capacity["target"] == "cpu" and capacity["fits"] is True
    assert (capacity["batch"], capacity["context"]) == (4, 128)
    assert capacity["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert capacity["weight_precision"] == "fp32"


def test_capacity_error_is_exit_3():
    assert CapacityError("x").exit_code == EXIT_DOES_NOT_FIT


def test_plan_predicts_what_compiling_takes_on_this_machine(cli_runner, tiny_models, monkeypatch):
    from fdec.frontend.source import resolve_source
    from fdec.plan import compile_memory

    model = str(tiny_models("llama"))
    args = ["plan", model, "--target", "h100", "--json"]
    result = cli_runner.invoke(cli, args)
    assert result.exit_code == 0, result.output + result.stderr
    (plan,) = json.loads(result.stdout)["plans"]
    figures = plan["compile"]
    # The same figures `fdec compile` checks before it loads anything.
    assert figures["quantize"] == "fp8" and figures["fits"] and not figures["streamed"]
    assert figures["peak_rss_bytes"] > compile_memory.COMPILE_OVERHEAD_BYTES
    (disk,) = figures["disk_bytes"].values()
    build = compile_memory.build_weight_bytes(resolve_source(model), "fp8", load_target("h100"))
    assert disk >= 3 * build  # the build, its typed model and the emulated copy
    table = cli_runner.invoke(cli, ["plan", model, "--target", "h100"]).stdout
    assert "compiling here" in table and "h100 --quantize fp8: whole model, peak RSS" in table
    # A machine that cannot hold even the streamed compile: the figure, and why.
    monkeypatch.setattr(compile_memory, "available_memory", lambda: (10 << 20, "a test"))
    (plan,) = json.loads(cli_runner.invoke(cli, args).stdout)["plans"]
    assert not plan["compile"]["fits"] and plan["compile"]["streamed"]
    assert "needs about" in plan["compile"]["problem"]
    assert "DOES NOT FIT" in cli_runner.invoke(cli, ["plan", model, "--target", "h100"]).stdout
    # config.json alone: nothing to predict from, and the plan is unchanged.
    config_only = cli_runner.invoke(cli, ["plan", model + "/config.json", "--target", "h100"])
    assert config_only.exit_code == 0 and "compiling here" not in config_only.stdout
