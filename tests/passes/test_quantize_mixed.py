"""Tests of the mixed-precision pass (quantize-mixed) on the tiny exported llama.

The tiny llama (2 layers: units layers.0, layers.1, lm_head) is exported once per module,
untied and cleaned; each test runs the pass on a fresh copy under the PassManager with the full
structure check, then checks which weights stayed fp32 (initializer dtype, the op reading
them), the ranking, the stats, and runs the result with ONNX Runtime against PyTorch.

A "harmful" copy hides an outlier in a layer without changing what the fp32 model computes:
one input channel per int4 block of 32 is divided by 1000 in the RMSNorm weight feeding
q/k/v (and gate/up) and the matching weight rows are multiplied by 1000. Block-wise int4 (and
per-channel int8) then rounds every other row of those blocks to zero, destroying the layer.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from exported import export_tiny

from fdec.calibrate import calibration_batches, load_calibration_texts
from fdec.errors import UsageError, VerificationError
from fdec.ir import FdecModel, ModelSpec
from fdec.passes import REGISTRY
from fdec.passes.quantize import QuantizeInt4Pass, QuantizeInt8Pass
from fdec.passes.quantize_mixed import QuantizeMixedPass
from fdec.pipeline import Pass, PassManager, PassRecord, StructureCheckInstrument
from fdec.runtime import session_for_model
from fdec.verify import Reference

_LAYER_ROLES = ("q", "k", "v", "o", "gate", "up", "down")
_UNITS = {"layers.0", "layers.1", "lm_head"}
_OUTLIER = 1000.0


@dataclasses.dataclass
class _Tiny:
    """The untied, cleaned tiny llama, its PyTorch reference and two kinds of batches."""

    proto: bytes
    spec: ModelSpec
    reference: Reference
    text_batches: list[np.ndarray]  # the built-in calibration corpus, 4 × 64 tokens
    sampled_batches: list[np.ndarray]  # 4 × 64 tokens sampled from the fp32 model itself
    tied_proto: bytes
    tied_spec: ModelSpec

    def cleaned(self) -> FdecModel:
        proto = onnx.load_from_string(self.proto)
        return FdecModel(ir.serde.deserialize_model(proto), copy.deepcopy(self.spec))

    def tied(self) -> FdecModel:
        proto = onnx.load_from_string(self.tied_proto)
        return FdecModel(ir.serde.deserialize_model(proto), copy.deepcopy(self.tied_spec))

    def harmful(self, *units: str) -> FdecModel:
        """The model with an int4-destroying outlier hidden in each of `units` (same fp32 output)."""
        model = self.cleaned()
        for unit in units:
            _hide_outliers(model, unit)
        return model


def _sample(hf_model, count: int, length: int, seed: int) -> list[np.ndarray]:
    """Token sequences drawn from the model's own distribution (token 0 first).

    On them the expected NLL of any other distribution q is the model's entropy plus KL(p‖q),
    so whatever changes the logits raises perplexity (a random model's perplexity on real
    text can go either way).
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros((count, 1), dtype=torch.long)
    with torch.no_grad():
        for _ in range(length - 1):
            probs = torch.softmax(hf_model(input_ids=ids).logits[:, -1].double(), dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return [ids[i : i + 1].numpy() for i in range(count)]


@pytest.fixture(scope="module")
def llama(tiny_models, tmp_path_factory) -> _Tiny:
    tiny = export_tiny(tiny_models, tmp_path_factory, "llama")
    vocab = tiny.spec.vocab_size
    text_batches = calibration_batches(
        load_calibration_texts(), tiny.tokenizer, vocab, seq_len=64, max_samples=4
    )
    sampled = _sample(tiny.hf_model, count=4, length=64, seed=0)
    return _Tiny(
        tiny.proto,
        tiny.spec,
        tiny.reference,
        text_batches,
        sampled,
        tiny.tied_proto,
        tiny.tied_spec,
    )


def _hide_outliers(model: FdecModel, unit: str) -> None:
    """Divide channels 0, 32, ... of the norms feeding `unit` by 1000, multiply the rows by it."""
    graph = model.graph
    if unit == "lm_head":
        feeds = {"model.norm.weight": ["lm_head"]}
    else:
        layer = f"model.{unit}"
        feeds = {
            f"{layer}.input_layernorm.weight": [f"{unit}.{r}" for r in ("q", "k", "v")],
            f"{layer}.post_attention_layernorm.weight": [f"{unit}.{r}" for r in ("gate", "up")],
        }
    s = np.ones(model.spec.hidden_size, dtype=np.float32)
    s[::32] = _OUTLIER  # one outlier row in every int4 block of 32 along K
    for norm, roles in feeds.items():
        value = graph.initializers[norm]
        (use,) = value.uses()
        assert use.node.op_type == "Mul"  # the traced RMSNorm weight multiply
        value.const_value = ir.tensor(value.const_value.numpy() / s, name=norm)
        for role in roles:
            weight = graph.initializers[model.spec.weights[role]]
            assert weight.const_value.shape[0] == s.shape[0]  # [K, N], as MatMul reads it
            weight.const_value = ir.tensor(
                weight.const_value.numpy() * s[:, None], name=weight.name
            )


def _run(pass_: Pass, model: FdecModel) -> tuple[FdecModel, dict]:
    """Run the pass in place; the full structure check (ONNX checker too) must pass after it.

    Returns the model and the stats as the pass made them (the PassManager's record turns
    the sensitivity rows into strings).
    """
    result = pass_(model)
    assert result.model is model
    record = PassRecord(1, pass_.name, pass_.family, {})
    StructureCheckInstrument(full=True).after(pass_, result, record)
    assert record.checks["structure"] == {"ok": True, "problems": []}
    assert result.modified == (result.stats["weights_quantized"] > 0)
    return model, result.stats


def _mixed(model: FdecModel, **options) -> tuple[FdecModel, dict]:
    return _run(QuantizeMixedPass(**options), model)


def _unit_roles(spec: ModelSpec, unit: str) -> list[str]:
    if unit == "lm_head" or unit.count(".") == 2:  # "lm_head", "layers.1.q"
        return [unit]
    return [f"{unit}.{role}" for role in _LAYER_ROLES if f"{unit}.{role}" in spec.weights]


def _readers(model: FdecModel, role: str) -> tuple[ir.DataType, set[str]]:
    """The dtype of the role's initializer and the op types reading it."""
    value = model.graph.initializers[model.spec.weights[role]]
    return value.const_value.dtype, {use.node.op_type for use in value.uses()}


def _assert_split(model: FdecModel, kept_units: list[str], quantized_op: str) -> None:
    """The kept units' weights are fp32 read by MatMul, every other linear weight quantized."""
    kept = {role for unit in kept_units for role in _unit_roles(model.spec, unit)}
    for role in model.spec.weights:
        if role == "embed":
            continue
        dtype, readers = _readers(model, role)
        if role in kept:
            assert (dtype, readers) == (ir.DataType.FLOAT, {"MatMul"}), role
        else:
            assert readers == {quantized_op} and dtype != ir.DataType.FLOAT, (role, readers)


def _ops(model: FdecModel) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph)


# --- ranking and splitting --------------------------------------------------------------------


def test_keep_fp_one_keeps_the_most_sensitive_layer_in_fp32_and_the_rest_int4(llama):
    model = llama.cleaned()
    original_roles = list(model.spec.weights)
    pass_ = QuantizeMixedPass(keep_fp=1, batches=llama.text_batches)
    model, stats = _run(pass_, model)

    sensitivity = stats["sensitivity"]
    assert {row["unit"] for row in sensitivity} == _UNITS and len(sensitivity) == 3
    kls = [row["kl"] for row in sensitivity]
    assert all(math.isfinite(kl) and kl >= 0 for kl in kls) and kls == sorted(kls, reverse=True)
    assert kls[-1] > 0  # every unit really was quantized in its trial
    assert all(0 <= row["top1"] <= 1 and math.isfinite(row["ppl"]) for row in sensitivity)
    worst = sensitivity[0]["unit"]
    assert stats["kept_fp32"] == [worst]
    assert stats["quantized_units"] == [row["unit"] for row in sensitivity[1:]]

    # Structure: the kept unit's weights are the original fp32 arrays read by MatMul.
    _assert_split(model, [worst], "MatMulNBits")
    cleaned = llama.cleaned()
    for role in _unit_roles(model.spec, worst):
        name = model.spec.weights[role]
        assert name == cleaned.spec.weights[role]
        np.testing.assert_array_equal(
            model.graph.initializers[name].const_value.numpy(),
            cleaned.graph.initializers[name].const_value.numpy(),
        )
    assert list(model.spec.weights) == original_roles  # hidden roles went back in place
    kept_weights = len(_unit_roles(model.spec, worst))
    assert stats["weights_quantized"] == _ops(model)["MatMulNBits"] == 15 - kept_weights
    assert stats["kept_fp32_weights"] == kept_weights
    assert stats["quantizer"] == "quantize-int4"
    assert stats["evaluations"] == 5  # reference, 3 units, the final mix
    assert stats["tokens_measured"] == 4 * 64
    assert stats["ppl_increase"] == pytest.approx(stats["ppl_mixed"] / stats["ppl_fp32"] - 1)

    # Numbers: ONNX Runtime runs it, within int4's tolerance of PyTorch.
    figures = llama.reference.compare(session_for_model(model))
    assert figures["max_abs_error"] <= pass_.tolerance.max_abs_error
    assert figures["top1_agreement"] >= pass_.tolerance.min_top1_agreement
    assert figures["max_abs_error"] > 1e-3  # the weights really changed


def test_the_pass_manager_runs_it_and_records_json_stats(llama):
    pass_ = QuantizeMixedPass(keep_fp=1, batches=llama.text_batches)
    _, (record,) = PassManager([pass_]).run(llama.cleaned())
    assert record.modified and len(record.stats["kept_fp32"]) == 1
    assert len(record.stats["sensitivity"]) == 3
    assert record.options["batches"] == "4 batches, 256 tokens"
    json.dumps(record.to_dict())


def test_a_layer_int4_destroys_is_ranked_first_kept_and_that_restores_the_logits(llama):
    model = llama.harmful("layers.1")
    # The outlier is hidden: in fp32 the model computes what the source does.
    assert llama.reference.compare(session_for_model(model))["max_abs_error"] < 1e-3

    model, stats = _mixed(model, keep_fp=1, batches=llama.text_batches)

    first, second, _ = stats["sensitivity"]
    assert first["unit"] == "layers.1" and first["kl"] > 10 * second["kl"]
    assert first["top1"] < 0.5 < second["top1"]
    assert stats["kept_fp32"] == ["layers.1"]
    _assert_split(model, ["layers.1"], "MatMulNBits")
    q = model.graph.initializers[model.spec.weights["layers.1.q"]].const_value.numpy()
    assert np.abs(q[0]).max() > 100 * np.abs(q[1:32]).max()  # the outlier rows are still there
    # Plain int4 of the same model loses most top-1 tokens; the mix keeps them.
    plain = QuantizeInt4Pass()(llama.harmful("layers.1")).model
    mixed = llama.reference.compare(session_for_model(model))
    rtn = llama.reference.compare(session_for_model(plain))
    assert rtn["top1_agreement"] < 0.5 < mixed["top1_agreement"]
    assert mixed["kl_divergence"] < rtn["kl_divergence"] / 10


def test_matmul_granularity_ranks_each_weight_alone(llama):
    model, stats = _mixed(
        llama.harmful("layers.1"), granularity="matmul", keep_fp=3, batches=llama.text_batches
    )
    units = [row["unit"] for row in stats["sensitivity"]]
    roles = [f"layers.{i}.{role}" for i in range(2) for role in _LAYER_ROLES] + ["lm_head"]
    assert sorted(units) == sorted(roles) and stats["units"] == 15
    kept = stats["kept_fp32"]
    assert kept == units[:3]
    harmed = {f"layers.1.{role}" for role in ("q", "k", "v", "gate", "up")}
    assert units[0] in harmed  # an outlier-carrying weight is the most sensitive
    assert stats["kept_fp32_weights"] == 3 and stats["weights_quantized"] == 12
    _assert_split(model, kept, "MatMulNBits")


def test_int8_method_wraps_dynamic_int8(llama):
    model, stats = _mixed(
        llama.harmful("layers.1"), method="int8", keep_fp=1, batches=llama.text_batches
    )
    assert stats["quantizer"] == "quantize-int8" and stats["kept_fp32"] == ["layers.1"]
    assert "reduce_range" in stats  # the wrapped quantizer's own stats are kept
    _assert_split(model, ["layers.1"], "MatMulInteger")
    figures = llama.reference.compare(session_for_model(model))
    assert figures["top1_agreement"] >= QuantizeInt8Pass.tolerance.min_top1_agreement


def test_a_registered_quantizer_plugs_in_by_name_and_gets_the_batches(llama, monkeypatch):
    """A quantizer registered later (as quantize-int4-awq will be) plugs in by its name and
    gets the calibration batches when it takes them."""
    seen = []

    @dataclasses.dataclass
    class _CalibratedInt4(QuantizeInt4Pass):
        name = "quantize-int4-calibrated"
        batches: tuple | None = dataclasses.field(default=None, kw_only=True)

        def call(self, model):
            seen.append((self.batches, self.block_size))
            return super().call(model)

    monkeypatch.setitem(REGISTRY, "quantize-int4-calibrated", _CalibratedInt4)
    pass_ = QuantizeMixedPass(
        method="quantize-int4-calibrated",
        quantizer_options={"block_size": 64},
        keep_fp=1,
        batches=llama.text_batches,
    )
    model, stats = _run(pass_, llama.cleaned())

    assert stats["quantizer"] == "quantize-int4-calibrated"
    assert len(seen) == 4  # three unit trials and the final mix
    assert all(batches is pass_.batches and block == 64 for batches, block in seen)
    (node, *_) = [node for node in model.graph if node.op_type == "MatMulNBits"]
    assert node.attributes["block_size"].as_int() == 64


# --- the perplexity budget --------------------------------------------------------------------


def test_budget_keeps_the_fewest_sensitive_layers_that_meet_it(llama):
    batches = llama.sampled_batches
    _, none_kept = _mixed(llama.harmful("layers.1"), keep_fp=0, batches=batches)
    _, one_kept = _mixed(llama.harmful("layers.1"), keep_fp=1, batches=batches)
    all_int4, layer1_fp32 = none_kept["ppl_increase"], one_kept["ppl_increase"]
    assert all_int4 > layer1_fp32 and all_int4 > 0.05  # sampled tokens: harm raises perplexity

    budget = (all_int4 + layer1_fp32) / 2
    model, stats = _mixed(llama.harmful("layers.1"), max_ppl_increase=budget, batches=batches)
    assert stats["kept_fp32"] == ["layers.1"] and stats["max_ppl_increase"] == budget
    assert stats["ppl_increase"] == pytest.approx(layer1_fp32) and stats["ppl_increase"] <= budget
    assert stats["evaluations"] == 1 + 3 + 2  # reference, units, then keep 0 and keep 1
    _assert_split(model, ["layers.1"], "MatMulNBits")

    _, generous = _mixed(llama.harmful("layers.1"), max_ppl_increase=all_int4, batches=batches)
    assert generous["kept_fp32"] == [] and generous["weights_quantized"] == 15


def test_a_budget_only_all_fp32_meets_fails_with_exit_code_3_naming_the_worst_units(llama):
    """Decided: when only keeping every unit in fp32 meets the budget, nothing would be
    quantized, so the pass fails (exit code 3) instead of returning the fp32 model."""
    batches = llama.sampled_batches
    units = ("layers.0", "layers.1", "lm_head")
    _, ranked = _mixed(llama.harmful(*units), keep_fp=0, batches=batches)
    worst = [row["unit"] for row in ranked["sensitivity"]]
    # Every unit alone raises perplexity on the model's own samples.
    assert all(row["ppl"] > ranked["ppl_fp32"] for row in ranked["sensitivity"])

    model = llama.harmful(*units)
    with pytest.raises(VerificationError) as caught:
        QuantizeMixedPass(max_ppl_increase=0.0, batches=batches)(model)
    error = caught.value
    assert error.exit_code == 3
    assert f"most sensitive: {', '.join(worst)}" in error.problem
    assert "+0.0%" in error.problem and "--max-ppl-increase" in error.fix
    assert _ops(model)["MatMulNBits"] == 0 and model.spec_problems() == []  # left untouched


# --- options ----------------------------------------------------------------------------------


def test_keep_fp_beyond_the_units_keeps_everything_and_reports_no_change(llama):
    model, stats = _mixed(llama.cleaned(), keep_fp=9, batches=llama.text_batches)
    assert stats["weights_quantized"] == 0 and stats["quantized_units"] == []
    assert sorted(stats["kept_fp32"]) == sorted(_UNITS)
    assert _ops(model)["MatMulNBits"] == 0
    assert stats["ppl_increase"] == 0.0


def test_measuring_uses_at_most_max_batches_of_max_tokens(llama):
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, llama.spec.vocab_size, size=(1, 100)) for _ in range(6)]
    pass_ = QuantizeMixedPass(keep_fp=0, batches=batches, max_batches=3, max_tokens=50)
    assert [ids.shape for ids in pass_.measuring_batches()] == [(1, 50)] * 3
    _, stats = _run(pass_, llama.cleaned())
    assert stats["tokens_measured"] == 150
    assert pass_.options()["batches"] == "6 batches, 600 tokens"


def test_options_are_checked_and_calibration_is_required(llama):
    model = llama.cleaned()
    assert QuantizeMixedPass().needs_calibration
    assert not QuantizeMixedPass(batches=llama.text_batches).needs_calibration
    with pytest.raises(UsageError, match="calibration data") as caught:
        QuantizeMixedPass(keep_fp=1).requires(model)
    assert "calibration_batches" in caught.value.fix
    with pytest.raises(UsageError, match="not both"):
        QuantizeMixedPass(keep_fp=1, max_ppl_increase=0.1)
    with pytest.raises(UsageError, match="granularity 'block'") as caught:
        QuantizeMixedPass(granularity="block")
    assert "layer, matmul" in caught.value.fix
    with pytest.raises(UsageError, match="method 'int3'") as caught:
        QuantizeMixedPass(method="int3")
    assert "int4, int4-rtn, int8" in caught.value.fix and "quantize-mixed" not in caught.value.fix
    with pytest.raises(UsageError, match="method 'quantize-mixed'"):
        QuantizeMixedPass(method="quantize-mixed")
    for option, value in (
        ("keep_fp", -1),
        ("keep_fp", True),
        ("max_ppl_increase", -0.1),
        ("max_ppl_increase", math.nan),
        ("max_batches", 0),
        ("max_tokens", 1),
    ):
        with pytest.raises(UsageError, match=option):
            QuantizeMixedPass(**{option: value})
    with pytest.raises(UsageError, match="batches"):
        QuantizeMixedPass(batches=[np.zeros((1, 1), dtype=np.int64)])
    with pytest.raises(UsageError, match="bad options for pass 'quantize-int4'"):
        QuantizeMixedPass(quantizer_options={"nibbles": 3})
    with pytest.raises(UsageError, match="bits 3 is not supported"):
        QuantizeMixedPass(quantizer_options={"bits": 3})
    # The wrapped quantizer's checks run too: a tied lm_head cannot be quantized.
    tied = llama.cleaned()
    tied.spec.tie_word_embeddings = True
    with pytest.raises(UsageError, match="tied"):
        QuantizeMixedPass(batches=llama.text_batches).requires(tied)
    # Tolerance: the wrapped quantizer's.
    assert QuantizeMixedPass().tolerance == QuantizeInt4Pass.tolerance
    assert QuantizeMixedPass(method="int8").tolerance == QuantizeInt8Pass.tolerance
    assert QuantizeMixedPass.tolerance == QuantizeInt4Pass.tolerance


# --- kept units in 8 bits; a tied table shared by the lm_head and the embedding ----------------


def _bits(model: FdecModel, role: str) -> set[int]:
    value = model.graph.initializers[model.spec.weights[role]]
    return {use.node.attributes["bits"].as_int() for use in value.uses()}


def test_keep_bits_8_stores_the_destroyed_layer_in_8_bits_and_restores_the_logits(llama):
    model, stats = _mixed(
        llama.harmful("layers.1"), keep_fp=1, keep_bits=8, batches=llama.text_batches
    )

    assert stats["sensitivity"][0]["unit"] == "layers.1"
    assert stats["kept"] == ["layers.1"] and stats["kept_fp32"] == []
    assert stats["kept_precision"] == "int8 weight-only" and stats["kept_fp32_weights"] == 0
    assert stats["weights_quantized"] == _ops(model)["MatMulNBits"] == 15  # nothing left fp32
    for role in model.spec.weights:
        if role != "embed":
            assert _bits(model, role) == ({8} if role.startswith("layers.1.") else {4}), role
    # 8-bit codes: one byte per weight (+ a float32 scale per 32) instead of half a byte.
    kept = sum(
        model.graph.initializers[model.spec.weights[f"layers.1.{r}"]].const_value.nbytes
        for r in _LAYER_ROLES
    )
    layer_weights = sum(
        np.prod(llama.cleaned().graph.initializers[llama.spec.weights[f"layers.1.{r}"]].shape)
        for r in _LAYER_ROLES
    )
    assert kept == layer_weights
    assert stats["kept_bytes_after"] == layer_weights * (1 + 4 / 32)
    # Numbers, on the model without the outlier (1000× defeats 8 bits' 127 steps too): the
    # most sensitive layer in 8 bits brings the whole model closer to fp32 than all-int4.
    mixed_model, mixed_stats = _mixed(
        llama.cleaned(), keep_fp=1, keep_bits=8, batches=llama.text_batches
    )
    assert (
        mixed_stats["ppl_mixed"]
        < _mixed(llama.cleaned(), keep_fp=0, batches=llama.text_batches)[1]["ppl_mixed"]
    )
    plain = QuantizeInt4Pass()(llama.cleaned()).model
    mixed = llama.reference.compare(session_for_model(mixed_model))
    rtn = llama.reference.compare(session_for_model(plain))
    assert mixed["kl_divergence"] < rtn["kl_divergence"]
    assert mixed["top1_agreement"] >= QuantizeMixedPass.tolerance.min_top1_agreement


def test_a_shared_tied_table_is_one_unit_and_can_be_kept_in_8_bits(llama):
    options = {"share_tied_embedding": True}
    pass_ = QuantizeMixedPass(
        keep_fp=3, keep_bits=8, quantizer_options=options, batches=llama.text_batches
    )
    model = llama.tied()
    units = pass_.units(model, pass_.quantizer())
    assert ("lm_head", ["embed", "lm_head"]) in [(u.name, sorted(u.roles)) for u in units]
    assert {u.name for u in units} == _UNITS

    model, stats = _run(pass_, model)

    assert sorted(stats["kept"]) == sorted(_UNITS) and stats["quantized_units"] == []
    assert model.spec.weights["embed"] == model.spec.weights["lm_head"]
    assert _bits(model, "lm_head") == {8}  # MatMulNBits and GatherBlockQuantized, 8 bits
    assert _ops(model)["GatherBlockQuantized"] == 1
    figures = llama.reference.compare(session_for_model(model))
    assert figures["top1_agreement"] > 0.9  # 8 bits everywhere: nearly the fp32 model


def test_keep_bits_is_checked(llama):
    with pytest.raises(UsageError, match="keep_bits 4"):
        QuantizeMixedPass(keep_bits=4, batches=llama.text_batches)
    with pytest.raises(UsageError, match="needs an int4 method"):
        QuantizeMixedPass(method="int8", keep_bits=8, batches=llama.text_batches)
