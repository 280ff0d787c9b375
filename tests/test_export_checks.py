"""Import refuses weights holding NaN or Inf, and only those (finite weights whose sum overflows pass)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fdec.errors import InputError
from fdec.frontend.export import _check_config_matches_weights, load_hf_model
from fdec.frontend.source import resolve_source

_WEIGHT = "model.layers.1.mlp.down_proj.weight"


def _with_weight_values(tiny_models, tmp_path, value: float, count: int):
    folder = tmp_path / "model"
    shutil.copytree(tiny_models("llama"), folder)
    path = folder / "model.safetensors"
    tensors = load_file(path)
    flat = tensors[_WEIGHT].view(-1)
    flat[-count:] = value  # the last elements: a check that stops early would miss them
    save_file(tensors, path, metadata={"format": "pt"})
    source = resolve_source(str(folder))
    return load_hf_model(source), source


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_refused_by_name(value, tiny_models, tmp_path):
    model, source = _with_weight_values(tiny_models, tmp_path, value, 1)
    with pytest.raises(InputError, match="NaN or Inf") as caught:
        _check_config_matches_weights(model, source)
    assert _WEIGHT in str(caught.value)


def test_finite_weights_whose_sum_overflows_pass(tiny_models, tmp_path):
    model, source = _with_weight_values(tiny_models, tmp_path, 3.0e38, 4)
    weight = dict(model.named_parameters())[_WEIGHT]
    assert not torch.isfinite(weight.sum())  # the fast path alone would refuse these
    assert torch.isfinite(weight).all()
    _check_config_matches_weights(model, source)  # no error
