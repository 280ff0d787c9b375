"""The distillation recipe (distill.json): teacher, layer map, losses, optimizer; read, checked and written."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import pathlib
from typing import Any

from fdec.errors import InputError

__all__ = ["RECIPE_FILE", "REPORT_FILE", "Recipe", "parse_recipe", "read_recipe", "write_recipe"]

RECIPE_FILE = "distill.json"
REPORT_FILE = "distill-report.json"
_SCHEMA_VERSION = 1
_RECIPE_KEYS = (
    "teacher", "layer_map", "losses", "optimizer", "seq_len", "batch_size", "seed", "pruned",
    "schema_version",
)  # fmt: skip
_LOSS_KEYS = {"logit_kl": ("weight", "temperature"), "hidden_mse": ("weight",)}
_OPTIMIZER_KEYS = ("lr", "weight_decay")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A distillation recipe: every field has a default, so a missing distill.json is valid."""

    teacher: str | None = None
    layer_map: dict[int, int] = dataclasses.field(default_factory=dict)  # student -> teacher
    logit_kl_weight: float = 1.0
    temperature: float = 2.0
    hidden_mse_weight: float = 0.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    seq_len: int = 128
    batch_size: int = 4
    seed: int = 0
    pruned: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as distill.json holds it (layer-map keys are strings in JSON)."""
        return {
            "schema_version": _SCHEMA_VERSION,
            "teacher": self.teacher,
            "layer_map": {str(k): v for k, v in sorted(self.layer_map.items())},
            "losses": {
                "logit_kl": {"weight": self.logit_kl_weight, "temperature": self.temperature},
                "hidden_mse": {"weight": self.hidden_mse_weight},
            },
            "optimizer": {"lr": self.lr, "weight_decay": self.weight_decay},
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "pruned": self.pruned,
        }


def _unknown(label: str, key: str, known: tuple[str, ...]) -> InputError:
    near = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return InputError(
        f"{label}: unknown key {key!r}{hint}", "use only these keys: " + ", ".join(known)
    )


def _number(label: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"{label} is {value!r}, not a number", f"write a number for {label}")
    if value < 0 or (positive and value == 0):
        bound = "positive" if positive else "zero or more"
        raise InputError(f"{label} is {value!r}", f"write a number {bound} for {label}")
    return float(value)


def _integer(label: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{label} is {value!r}", f"write a whole number >= {minimum} for {label}")
    return value


def _table(label: str, value: Any, known: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InputError(f"{label} is not a JSON object", f"write {label} as {{...}}")
    for key in value:
        if key not in known:
            raise _unknown(label, key, known)
    return value


def parse_recipe(data: Any, label: str = RECIPE_FILE) -> Recipe:
    """Check a recipe's JSON value and fill defaults; InputError (exit 2) on the first fault."""
    data = _table(label, data, _RECIPE_KEYS)
    fields: dict[str, Any] = {}
    teacher = data.get("teacher")
    if teacher is not None and (not isinstance(teacher, str) or not teacher.strip()):
        raise InputError(f"{label}: teacher is {teacher!r}", "write the teacher's path or name")
    fields["teacher"] = teacher
    layer_map: dict[int, int] = {}
    raw_map = data.get("layer_map", {})
    if not isinstance(raw_map, dict):
        raise InputError(
            f"{label}: layer_map is not a JSON object",
            'write it as {"student layer": teacher layer}, e.g. {"0": 0, "1": 4}',
        )
    for key, value in raw_map.items():
        if not str(key).isdigit():
            raise InputError(
                f"{label}: layer_map key {key!r} is not a layer index",
                'write student layer indices as keys, e.g. {"0": 0, "1": 4}',
            )
        layer_map[int(key)] = _integer(f"{label}: layer_map[{key}]", value, minimum=0)
    fields["layer_map"] = layer_map
    losses = _table(f"{label}: losses", data.get("losses", {}), tuple(_LOSS_KEYS))
    kl = _table(f"{label}: losses.logit_kl", losses.get("logit_kl", {}), _LOSS_KEYS["logit_kl"])
    mse = _table(
        f"{label}: losses.hidden_mse", losses.get("hidden_mse", {}), _LOSS_KEYS["hidden_mse"]
    )
    if "weight" in kl:
        fields["logit_kl_weight"] = _number(f"{label}: losses.logit_kl.weight", kl["weight"],
                                            positive=False)  # fmt: skip
    if "temperature" in kl:
        fields["temperature"] = _number(
            f"{label}: losses.logit_kl.temperature", kl["temperature"], positive=True
        )
    if "weight" in mse:
        fields["hidden_mse_weight"] = _number(
            f"{label}: losses.hidden_mse.weight", mse["weight"], positive=False
        )
    optimizer = _table(f"{label}: optimizer", data.get("optimizer", {}), _OPTIMIZER_KEYS)
    if "lr" in optimizer:
        fields["lr"] = _number(f"{label}: optimizer.lr", optimizer["lr"], positive=True)
    if "weight_decay" in optimizer:
        fields["weight_decay"] = _number(
            f"{label}: optimizer.weight_decay", optimizer["weight_decay"], positive=False
        )
    if "seq_len" in data:
        fields["seq_len"] = _integer(f"{label}: seq_len", data["seq_len"], minimum=2)
    if "batch_size" in data:
        fields["batch_size"] = _integer(f"{label}: batch_size", data["batch_size"], minimum=1)
    if "seed" in data:
        fields["seed"] = _integer(f"{label}: seed", data["seed"], minimum=0)
    pruned = data.get("pruned", {})
    if not isinstance(pruned, dict):
        raise InputError(f"{label}: pruned is not a JSON object", "write it as {...}")
    fields["pruned"] = pruned
    version = data.get("schema_version", _SCHEMA_VERSION)
    if version != _SCHEMA_VERSION:
        raise InputError(
            f"{label}: schema_version {version!r} is not {_SCHEMA_VERSION}",
            "write the recipe again with this fdec",
        )
    recipe = Recipe(**fields)
    if recipe.logit_kl_weight == 0 and recipe.hidden_mse_weight == 0:
        raise InputError(
            f"{label}: every loss weight is 0", "give losses.logit_kl.weight a positive value"
        )
    return recipe


def write_recipe(
    folder: pathlib.Path | str,
    *,
    teacher: str | None = None,
    layer_map: dict[int, int] | None = None,
    losses: dict[str, Any] | None = None,
    optimizer: dict[str, Any] | None = None,
    seq_len: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    pruned: dict[str, Any] | None = None,
) -> pathlib.Path:
    """Check and write `folder/distill.json` with every default filled in; return its path.

    A teacher given as an existing path is stored absolute, so the recipe works from any
    folder; a bundled name (smollm2-135m) or hub id is stored as given.
    """
    folder = pathlib.Path(folder)
    if teacher is not None and pathlib.Path(teacher).expanduser().exists():
        teacher = str(pathlib.Path(teacher).expanduser().resolve())
    data: dict[str, Any] = {"teacher": teacher}
    for key, value in (("layer_map", layer_map), ("losses", losses), ("optimizer", optimizer),
                       ("seq_len", seq_len), ("batch_size", batch_size), ("seed", seed),
                       ("pruned", pruned)):  # fmt: skip
        if value is not None:
            data[key] = value
    if layer_map is not None:
        data["layer_map"] = {str(k): v for k, v in layer_map.items()}
    recipe = parse_recipe(data, "write_recipe")
    path = folder / RECIPE_FILE
    path.write_text(json.dumps(recipe.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def read_recipe(folder: pathlib.Path | str) -> Recipe:
    """The recipe of a student folder: its distill.json, or the defaults when there is none."""
    path = pathlib.Path(folder) / RECIPE_FILE
    if not path.is_file():
        return Recipe()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path} is not valid JSON ({err})", "fix the file or delete it") from None
    return parse_recipe(data, str(path))
