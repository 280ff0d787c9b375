"""The roofline estimate's per-step floor (node_launch_us, target data) and its calibration figures."""

from __future__ import annotations

import dataclasses

import pytest

from fdec.errors import InputError
from fdec.ir import ModelSpec
from fdec.report import render_report
from fdec.report.roofline import FUSED_NODES_PER_LAYER, estimate
from fdec.targets import load_target

# SmolLM2-135M-Instruct's shape (its config.json): 30 layers, 9 heads, 3 KV heads, head dim 64.
_SMOLLM2 = ModelSpec(
    family="llama", architecture="LlamaForCausalLM", kind="decoder", num_layers=30,
    num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=576, intermediate_size=1536,
    vocab_size=49152, max_positions=8192, tie_word_embeddings=True,
)  # fmt: skip
_PARAMETERS = 134_515_008


def _smollm2(target: str, bytes_per_weight: int, nodes: int | None = None) -> dict:
    return estimate(
        _SMOLLM2,
        load_target(target),
        weight_bytes=bytes_per_weight * _PARAMETERS,
        parameters=_PARAMETERS,
        nodes=nodes,
    )


def test_the_floor_dominates_a_135m_model_on_h200():
    guess = _smollm2("h200", 2)
    assert guess["decode_bound"] == "launch"
    bounds = guess["bounds_ms"]
    assert set(bounds) == {"memory", "compute", "launch"}
    assert bounds["launch"] > 10 * bounds["memory"] > 10 * bounds["compute"]
    floor = guess["step_floor"]
    assert floor["nodes"] == round(30 * FUSED_NODES_PER_LAYER) == 344
    assert floor["nodes_from"] == "fused graph, nodes per layer"
    assert floor["node_launch_us"] == load_target("h200").node_launch_us == 4.0
    assert floor["ms"] == pytest.approx(344 * 4.0e-3, rel=1e-3)
    assert guess["decode_tokens_per_s"] == pytest.approx(1e3 / floor["ms"], rel=1e-3)
    assert "per-step floor" in guess["label"]
    # The bytes alone (the estimate before the floor) said tens of thousands of tok/s.
    assert 1e3 / bounds["memory"] > 10_000


def test_the_floor_reproduces_the_h200_figures_it_was_calibrated_on():
    """targets/data/h200.toml: fp32 build, 2,399 nodes, 103 tok/s measured (calibration);
    fp8 Q/DQ build, 2,852 nodes, 79 tok/s measured (cross-check, not fitted)."""
    assert _smollm2("h200", 4, nodes=2399)["decode_tokens_per_s"] == pytest.approx(103, rel=0.05)
    assert _smollm2("h200", 1, nodes=2852)["decode_tokens_per_s"] == pytest.approx(79, rel=0.15)
    # A fused build (344 nodes) is estimated between PyTorch static-cache generate's measured
    # 327 tok/s and 4x that: what the GPU run of a fused fp16 build has to confirm.
    fused = _smollm2("h200", 2)["decode_tokens_per_s"]
    assert 327 < fused < 4 * 327


def test_a_graph_without_nodes_or_a_target_without_the_field_has_no_floor():
    cpu = _smollm2("cpu", 1)
    assert "step_floor" not in cpu and cpu["decode_bound"] == "memory"
    bare = dataclasses.replace(load_target("h200"), node_launch_us=0.0)
    guess = estimate(_SMOLLM2, bare, weight_bytes=_PARAMETERS, parameters=_PARAMETERS)
    assert guess["decode_bound"] == "memory" and guess["decode_tokens_per_s"] > 10_000


def test_node_launch_us_is_target_data(tmp_path):
    text = load_target("h200").path
    source = open(text, encoding="utf-8").read()
    assert "node_launch_us = 4.0" in source and "103 tok/s" in source
    mine = tmp_path / "my-gpu.toml"
    mine.write_text(source.replace('name = "h200"', 'name = "my-gpu"'))
    assert load_target(str(mine)).node_launch_us == 4.0
    assert load_target(str(mine)).to_dict()["node_launch_us"] == 4.0
    mine.write_text(mine.read_text().replace("node_launch_us = 4.0", ""))
    assert load_target(str(mine)).node_launch_us == 0.0
    mine.write_text(source.replace("node_launch_us = 4.0", "node_launch_us = -1"))
    with pytest.raises(InputError, match="node_launch_us must be ≥ 0"):
        load_target(str(mine))


def test_report_says_launch_bound():
    guess = _smollm2("h200", 2)
    text = render_report({"estimate": guess})
    assert "launch-bound" in text and f"~{guess['decode_tokens_per_s']:,.0f} decode tok/s" in text


def test_an_engines_own_kernels_and_precision_set_the_floor_and_the_peak():
    """A built engine's listing says what runs: its decode profile's kernels (not the Q/DQ
    graph's nodes) and its GEMMs' precision (not a guess from bytes per weight: NVFP4 weights
    with their scales are ~0.56 bytes, which rounds to fp8)."""
    target = load_target("rtx5090")
    fp4 = dict(weight_bytes=int(0.56 * _PARAMETERS), parameters=_PARAMETERS)
    guessed = estimate(_SMOLLM2, target, **fp4, nodes=2778)
    listed = estimate(
        _SMOLLM2, target, **fp4, nodes=428, nodes_from="tensorrt-rtx engine listing", math="fp4"
    )
    assert guessed["math_precision"] == "fp8" and listed["math_precision"] == "fp4"
    assert listed["step_floor"]["nodes_from"] == "tensorrt-rtx engine listing"
    assert listed["step_floor"]["nodes"] == 428
    ratio = listed["decode_tokens_per_s"] / guessed["decode_tokens_per_s"]
    assert ratio == pytest.approx(2778 / 428, rel=1e-3)  # both launch-bound
    weight_only = estimate(_SMOLLM2, target, **fp4, math="bf16 (int4 weights)")
    assert weight_only["math_precision"] == "bf16"
