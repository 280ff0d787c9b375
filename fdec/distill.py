"""Distill a pruned student from its teacher with PyTorch: the recipe (distill.json), the trainer, and the checkpoint it writes.

The pruner writes the student folder (HF config with the new sizes + safetensors + tokenizer)
and calls `write_recipe` to leave `distill.json` beside it: the teacher, the student→teacher
layer map and the losses. `distill` reads that recipe, trains the student on text against the
teacher's logits (KL at temperature T, scaled by T²) plus an optional hidden-state MSE on
mapped layers, measures held-out perplexity and KL-to-teacher before and after (on
fdec/data/held.txt, never trained on), and writes an HF checkpoint that `fdec compile` takes.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import pathlib
import shutil
import time
from collections.abc import Callable
from typing import Any

from fdec.errors import CompileError, InputError, UsageError

__all__ = [
    "RECIPE_FILE",
    "REPORT_FILE",
    "DistillResult",
    "Recipe",
    "distill",
    "parse_recipe",
    "read_recipe",
    "write_recipe",
]

logger = logging.getLogger(__name__)

RECIPE_FILE = "distill.json"
REPORT_FILE = "distill-report.json"
_SCHEMA_VERSION = 1
_RECIPE_KEYS = (
    "teacher", "layer_map", "losses", "optimizer", "seq_len", "batch_size", "seed", "pruned",
    "schema_version",
)  # fmt: skip
_LOSS_KEYS = {"logit_kl": ("weight", "temperature"), "hidden_mse": ("weight",)}
_OPTIMIZER_KEYS = ("lr", "weight_decay")
# Files of the student folder that the checkpoint rewrites itself (save_pretrained, recipe,
# report) or that describe other weights; everything else (tokenizer, chat template) is copied.
_NOT_COPIED = {"config.json", "generation_config.json", "model.safetensors.index.json",
               "pytorch_model.bin.index.json", "fdec-cache.json", RECIPE_FILE, REPORT_FILE}  # fmt: skip
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_HELD_SHINGLE = 40  # characters: training text sharing one with the held text is refused


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


# --- the trainer ------------------------------------------------------------------------------


@dataclasses.dataclass
class DistillResult:
    """What a distillation did: per-step losses and held-out figures before and after."""

    out: pathlib.Path
    student: str
    teacher: str
    steps: int
    losses: list[dict[str, float]]  # one per step: loss, kl, mse (weighted sum and its parts)
    before: dict[str, float]  # held perplexity and KL(teacher || student) per token
    after: dict[str, float]
    teacher_perplexity: float
    held_tokens: int
    train_tokens: int
    threads: int
    seconds: float
    recipe: Recipe

    @property
    def first_loss(self) -> float:
        return self.losses[0]["loss"]

    @property
    def last_loss(self) -> float:
        return self.losses[-1]["loss"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "student": self.student,
            "teacher": self.teacher,
            "steps": self.steps,
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            "losses": self.losses,
            "before": self.before,
            "after": self.after,
            "teacher_perplexity": self.teacher_perplexity,
            "held_tokens": self.held_tokens,
            "train_tokens": self.train_tokens,
            "threads": self.threads,
            "seconds": round(self.seconds, 2),
            "recipe": self.recipe.to_dict(),
        }


def _dims(config: dict[str, Any]) -> tuple[int | None, int | None, int | None, int | None]:
    """(layers, hidden size, vocab size, max positions) of an HF config, Llama or GPT-2 names."""
    config = config.get("text_config") or config

    def first(*names: str) -> int | None:
        for name in names:
            if isinstance(config.get(name), int):
                return config[name]
        return None

    return (
        first("num_hidden_layers", "n_layer"),
        first("hidden_size", "n_embd"),
        first("vocab_size"),
        first("max_position_embeddings", "n_positions"),
    )


def _check_pair(student: Any, teacher: Any, recipe: Recipe) -> None:
    """Refuse a student/teacher pair the recipe cannot train, before loading any weights."""
    for role, source in (("student", student), ("teacher", teacher)):
        if source.family.kind != "decoder":
            raise InputError(
                f"{role} {source.given} is a {source.family.name} encoder; distillation here "
                "trains causal language models",
                "give decoder models (Llama, Qwen2, Mistral, GPT-2)",
            )
    s_layers, s_hidden, s_vocab, s_positions = _dims(student.config)
    t_layers, t_hidden, t_vocab, _ = _dims(teacher.config)
    if s_vocab != t_vocab:
        raise InputError(
            f"vocabulary mismatch: student {student.given} has {s_vocab} tokens, teacher "
            f"{teacher.given} has {t_vocab}",
            "distill from the teacher the student was pruned from (same tokenizer)",
        )
    for s_layer, t_layer in sorted(recipe.layer_map.items()):
        if s_layers is not None and s_layer >= s_layers:
            raise InputError(
                f"layer_map names student layer {s_layer}, but the student has {s_layers} layers",
                f"map student layers 0..{s_layers - 1} in {RECIPE_FILE}",
            )
        if t_layers is not None and t_layer >= t_layers:
            raise InputError(
                f"layer_map maps student layer {s_layer} to teacher layer {t_layer}, but the "
                f"teacher has {t_layers} layers",
                f"map to teacher layers 0..{t_layers - 1} in {RECIPE_FILE}",
            )
    if recipe.hidden_mse_weight > 0:
        if not recipe.layer_map:
            raise InputError(
                "losses.hidden_mse has a weight but the recipe has no layer_map",
                f'add "layer_map" (student layer -> teacher layer) to {RECIPE_FILE}, or set the '
                "hidden_mse weight to 0",
            )
        if s_hidden != t_hidden:
            raise InputError(
                f"losses.hidden_mse compares hidden states, but the student's are {s_hidden} "
                f"wide and the teacher's {t_hidden}",
                "set the hidden_mse weight to 0 for a student with a narrower hidden size",
            )
    if s_positions is not None and recipe.seq_len > s_positions:
        raise InputError(
            f"seq_len {recipe.seq_len} is longer than the student's {s_positions} positions",
            f"lower seq_len in {RECIPE_FILE}",
        )


def _check_not_held(texts: list[str], label: str) -> None:
    from fdec.verify import held_text

    held = " ".join(held_text().split())
    shingles = {held[i : i + _HELD_SHINGLE] for i in range(len(held) - _HELD_SHINGLE + 1)}
    for text in texts:
        flat = " ".join(text.split())
        if any(
            flat[i : i + _HELD_SHINGLE] in shingles for i in range(len(flat) - _HELD_SHINGLE + 1)
        ):
            raise InputError(
                f"training text {label} contains the held-out evaluation text (fdec/data/held.txt)",
                "train on other text: held-out figures would be meaningless",
            )


def _decoder_layers(model: Any, count: int) -> Any:
    """The ModuleList of decoder layers (model.layers for Llama, transformer.h for GPT-2)."""
    import torch

    for module in model.base_model.children():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise InputError(
        f"cannot find the {count} decoder layers of {type(model).__name__}",
        "set the hidden_mse weight to 0 for this architecture",
    )


class _LayerOutputs:
    """Forward hooks keeping each mapped decoder layer's output (the residual stream)."""

    def __init__(self, model: Any, count: int, indices: list[int]):
        self.outputs: dict[int, Any] = {}
        layers = _decoder_layers(model, count)
        self._handles = [layers[i].register_forward_hook(self._keep(i)) for i in indices]

    def _keep(self, index: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            self.outputs[index] = output[0] if isinstance(output, tuple) else output

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _kl(teacher_logits: Any, student_logits: Any, temperature: float) -> Any:
    """KL(teacher ‖ student) per token at `temperature`, averaged, times T² (Hinton et al.)."""
    import torch.nn.functional as F

    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


def _held_figures(model: Any, ids: Any, teacher_logits: Any) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[0, :-1], ids[0, 1:])
        kl = _kl(teacher_logits, logits, 1.0)
    return {"perplexity": float(torch.exp(nll)), "kl_to_teacher": float(kl)}


def _train_tokens(texts: list[str], tokenizer: Any, vocab: int) -> list[int]:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return [i for i in ids if 0 <= i < vocab]


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over the first 10 % of steps, then cosine decay to 10 % of the rate."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    done = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _copy_side_files(source: pathlib.Path, out: pathlib.Path) -> list[str]:
    copied = []
    for path in sorted(source.iterdir()):
        if (
            path.is_file()
            and path.name not in _NOT_COPIED
            and not path.name.endswith(_WEIGHT_SUFFIXES)
            and not path.name.startswith(".")
        ):
            shutil.copyfile(path, out / path.name)
            copied.append(path.name)
    return copied


def distill(
    student: str | pathlib.Path,
    teacher: str | None = None,
    data: pathlib.Path | str | None = None,
    *,
    steps: int = 100,
    out: pathlib.Path | str,
    lr: float | None = None,
    threads: int | None = None,
    cache_dir: pathlib.Path | None = None,
    progress: Callable[[str], None] | None = None,
    force: bool = False,
) -> DistillResult:
    """Train `student` against `teacher` for `steps` steps and write the checkpoint to `out`.

    `teacher` defaults to the recipe's (the student folder's distill.json); both resolve like
    `fdec compile` resolves models (folder, .gguf, hub id, bundled name). `data` is a .txt or
    .jsonl file (default: the built-in calibration corpus). Everything is checked before any
    weight loads; `out` is written whole or not at all, and replaces only an empty folder or an
    earlier fdec output (a manifest lists its files) unless `force` (fdec.build).
    """
    from fdec.build import AtomicBuild, check_output_path, write_manifest
    from fdec.calibrate import load_calibration_texts
    from fdec.frontend.source import default_cache_dir, resolve_source

    say = progress or (lambda message: None)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"--steps is {steps!r}", "give --steps a whole number of 1 or more")
    if lr is not None and (not math.isfinite(lr) or lr <= 0):
        raise UsageError(f"--lr is {lr!r}", "give --lr a positive number such as 1e-4")
    if threads is not None and threads < 1:
        raise UsageError(f"threads is {threads!r}", "give 1 or more threads")
    out = pathlib.Path(out).absolute()
    keep = [pathlib.Path(student), cache_dir or default_cache_dir()]
    keep += [pathlib.Path(teacher)] if teacher else []
    check_output_path(out, force=force, keep=keep)
    s_source = resolve_source(str(student), cache_dir=cache_dir, progress=say)
    recipe = read_recipe(s_source.folder)
    if lr is not None:
        recipe = dataclasses.replace(recipe, lr=float(lr))
    teacher_given = teacher or recipe.teacher
    if not teacher_given:
        raise UsageError(
            f"no teacher for {student}: its folder has no {RECIPE_FILE} naming one",
            "pass --teacher MODEL (the model the student was pruned from)",
        )
    if teacher is None and not pathlib.Path(teacher_given).is_absolute():
        beside = s_source.folder / teacher_given  # a relative path in the recipe: from its folder
        if beside.exists():
            teacher_given = str(beside)
    t_source = resolve_source(teacher_given, cache_dir=cache_dir, progress=say)
    for role, source in (("student", s_source), ("teacher", t_source)):
        if out == source.folder or source.folder in out.parents:
            raise UsageError(
                f"-o {out} is inside the {role} folder {source.folder}",
                "write the distilled checkpoint to a new folder",
            )
    _check_pair(s_source, t_source, recipe)
    texts = load_calibration_texts(pathlib.Path(data) if data is not None else None)
    _check_not_held(texts, str(data) if data is not None else "(built-in corpus)")
    token_folder = s_source.folder if s_source.has_tokenizer else t_source.folder
    if not (s_source.has_tokenizer or t_source.has_tokenizer):
        raise InputError(
            f"neither {s_source.given} nor {t_source.given} has a tokenizer",
            "copy the teacher's tokenizer files (tokenizer.json, tokenizer_config.json) into "
            "the student folder",
        )

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fdec.verify import held_token_ids

    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    n_threads = threads or _default_threads()
    torch.set_num_threads(n_threads)
    try:
        tokenizer = AutoTokenizer.from_pretrained(token_folder)
        vocab = _dims(s_source.config)[2] or len(tokenizer)
        ids = _train_tokens(texts, tokenizer, vocab)
        if len(ids) < recipe.seq_len:
            raise InputError(
                f"the training text has {len(ids)} tokens, fewer than seq_len {recipe.seq_len}",
                f"give more text with --data, or lower seq_len in {RECIPE_FILE}",
            )
        max_positions = _dims(s_source.config)[3] or 1024
        held = torch.from_numpy(held_token_ids(tokenizer, vocab, limit=min(1024, max_positions)))
        say(f"loading student {s_source.given} and teacher {t_source.given}")
        torch.manual_seed(recipe.seed)
        t_model = AutoModelForCausalLM.from_pretrained(t_source.folder, dtype=torch.float32).eval()
        s_model = AutoModelForCausalLM.from_pretrained(s_source.folder, dtype=torch.float32)
        for model, source in ((t_model, t_source), (s_model, s_source)):
            rows = model.get_input_embeddings().weight.shape[0]
            if rows != vocab:
                raise InputError(
                    f"vocabulary mismatch: {source.given} has {rows} embedding rows, "
                    f"its pair {vocab}",
                    "distill from the teacher the student was pruned from (same tokenizer)",
                )
        t_model.requires_grad_(False)
        with torch.no_grad():
            held_teacher = t_model(input_ids=held, use_cache=False).logits.float()
            t_nll = torch.nn.functional.cross_entropy(held_teacher[0, :-1], held[0, 1:])
        teacher_ppl = float(torch.exp(t_nll))
        before = _held_figures(s_model, held, held_teacher)
        say(
            f"before: held perplexity {before['perplexity']:.2f} (teacher {teacher_ppl:.2f}), "
            f"KL to teacher {before['kl_to_teacher']:.4f}; {len(ids)} training tokens"
        )
        losses = _train(s_model, t_model, s_source, t_source, recipe, ids, steps, say)
        after = _held_figures(s_model, held, held_teacher)
        say(
            f"after {steps} steps: held perplexity {after['perplexity']:.2f}, "
            f"KL to teacher {after['kl_to_teacher']:.4f}"
        )
        del t_model
        result = DistillResult(
            out=out, student=s_source.given, teacher=t_source.given, steps=steps,
            losses=losses, before=before, after=after, teacher_perplexity=teacher_ppl,
            held_tokens=int(held.shape[1]), train_tokens=len(ids), threads=n_threads,
            seconds=time.perf_counter() - started,
            recipe=dataclasses.replace(recipe, teacher=_teacher_for_recipe(teacher_given)),
        )  # fmt: skip
        with AtomicBuild(out, progress=say, force=force, keep=keep) as tmp:
            s_model.eval()
            s_model.save_pretrained(tmp)
            if not s_source.has_tokenizer:
                _copy_side_files(t_source.folder, tmp)
            _copy_side_files(s_source.folder, tmp)
            (tmp / RECIPE_FILE).write_text(
                json.dumps(result.recipe.to_dict(), indent=2, sort_keys=True) + "\n"
            )
            report = {k: v for k, v in result.to_dict().items() if k not in ("recipe", "out")}
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
            # lists the files: a later distill may replace this folder (fdec.build)
            write_manifest(tmp, {"kind": "distilled-checkpoint"})
        say(f"distilled checkpoint written to {out}")
        return result
    finally:
        torch.set_num_threads(previous_threads)


def _teacher_for_recipe(given: str) -> str:
    path = pathlib.Path(given).expanduser()
    return str(path.resolve()) if path.exists() else given


def _train(
    s_model: Any,
    t_model: Any,
    s_source: Any,
    t_source: Any,
    recipe: Recipe,
    ids: list[int],
    steps: int,
    say: Callable[[str], None],
) -> list[dict[str, float]]:
    """AdamW on the student: KL on logits at T (× T²) + normalized MSE on mapped layers."""
    import numpy as np
    import torch

    tokens = torch.tensor(ids, dtype=torch.long)
    rng = np.random.default_rng(recipe.seed)
    s_model.train()
    optimizer = torch.optim.AdamW(
        [p for p in s_model.parameters() if p.requires_grad],
        lr=recipe.lr,
        weight_decay=recipe.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps))
    use_mse = recipe.hidden_mse_weight > 0
    pairs = sorted(recipe.layer_map.items())
    hooks: list[_LayerOutputs] = []
    if use_mse:
        hooks = [
            _LayerOutputs(s_model, _dims(s_source.config)[0], [s for s, _ in pairs]),
            _LayerOutputs(t_model, _dims(t_source.config)[0], sorted({t for _, t in pairs})),
        ]
    every = max(1, steps // 20)
    losses: list[dict[str, float]] = []
    started = time.perf_counter()
    try:
        for step in range(steps):
            starts = rng.integers(0, len(ids) - recipe.seq_len + 1, size=recipe.batch_size)
            batch = torch.stack([tokens[int(s) : int(s) + recipe.seq_len] for s in starts])
            with torch.no_grad():
                t_logits = t_model(input_ids=batch, use_cache=False).logits
            s_logits = s_model(input_ids=batch, use_cache=False).logits
            kl = _kl(t_logits, s_logits, recipe.temperature)
            loss = recipe.logit_kl_weight * kl
            mse = torch.zeros(())
            if use_mse:
                s_out, t_out = hooks[0].outputs, hooks[1].outputs
                parts = []
                for s_layer, t_layer in pairs:
                    target = t_out[t_layer].detach()
                    parts.append(
                        (s_out[s_layer] - target).pow(2).mean()
                        / target.pow(2).mean().clamp_min(1e-8)
                    )
                mse = torch.stack(parts).mean()
                loss = loss + recipe.hidden_mse_weight * mse
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(s_model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            row = {"loss": loss.item(), "kl": kl.item(), "mse": mse.item()}
            if not all(math.isfinite(v) for v in row.values()):
                raise CompileError(
                    f"distillation diverged at step {step + 1} (loss {row['loss']})",
                    "lower the learning rate (--lr)",
                )
            losses.append(row)
            if step == 0 or (step + 1) % every == 0 or step + 1 == steps:
                rate = (time.perf_counter() - started) / (step + 1)
                extra = f", mse {row['mse']:.4f}" if use_mse else ""
                say(
                    f"step {step + 1}/{steps}: loss {row['loss']:.4f} (kl {row['kl']:.4f}{extra}), "
                    f"lr {schedule.get_last_lr()[0]:.2e}, {rate:.2f} s/step, "
                    f"~{rate * (steps - step - 1):.0f} s left"
                )
    finally:
        for hook in hooks:
            hook.close()
    return losses
