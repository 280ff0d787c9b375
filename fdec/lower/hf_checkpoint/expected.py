"""What the HF model class expects: parameter names, shapes and module types, from a meta-device model."""

from __future__ import annotations

import dataclasses
from typing import Any

from fdec.errors import CompileError

__all__ = ["Parameter", "expected_parameters"]


@dataclasses.dataclass(frozen=True)
class Parameter:
    """One tensor of the HF state dict: its name, shape and the kind of module owning it."""

    name: str
    shape: tuple[int, ...]
    module: str  # owning module's name
    kind: str  # "linear" (torch [out, in]) | "conv1d" ([in, out]) | "other"
    buffer: bool = False


def expected_parameters(
    config: dict[str, Any], kind: str
) -> tuple[list[Parameter], list[Parameter]]:
    """The state dict the HF class of `config` loads, tied aliases left out; and those aliases
    (a tied lm_head: written by its embedding's tensor, still a Linear a scheme must skip).

    The model is built on the meta device (no memory, no weights), from the config written.
    """
    import torch
    import transformers
    from transformers.pytorch_utils import Conv1D

    hf_config = transformers.AutoConfig.for_model(**config)
    auto = transformers.AutoModelForCausalLM if kind == "decoder" else transformers.AutoModel
    try:
        with torch.device("meta"):
            hf_model = auto.from_config(hf_config)
    except (ValueError, KeyError, TypeError) as err:
        raise CompileError(
            f"transformers cannot build the model class of this config: {err}",
            "report the model to the fdec developers",
        ) from err
    modules = dict(hf_model.named_modules())
    parameters: list[Parameter] = []
    aliases: list[Parameter] = []
    seen: set[int] = set()
    for name, tensor in hf_model.named_parameters(remove_duplicate=False):
        owner = name.rpartition(".")[0]
        module = modules.get(owner)
        kind_of = (
            "linear"
            if isinstance(module, torch.nn.Linear)
            else "conv1d"
            if isinstance(module, Conv1D)
            else "other"
        )
        parameter = Parameter(name, tuple(tensor.shape), owner, kind_of)
        (aliases if id(tensor) in seen else parameters).append(parameter)
        seen.add(id(tensor))
    state = hf_model.state_dict()
    names = {p.name for p in parameters + aliases}
    for name, tensor in state.items():
        if name not in names:  # a persistent buffer
            parameters.append(
                Parameter(name, tuple(tensor.shape), name.rpartition(".")[0], "other", True)
            )
    return parameters, aliases
