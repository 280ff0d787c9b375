"""`distill`: a student and its teacher checked, the student trained, the HF checkpoint written whole."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shutil
import time
from collections.abc import Callable
from typing import Any

from fdec.distill.recipe import RECIPE_FILE, REPORT_FILE, Recipe, read_recipe
from fdec.distill.train import default_threads, held_figures, model_dims, train, train_tokens
from fdec.errors import InputError, UsageError

__all__ = ["DistillResult", "distill"]

# Files of the student folder that the checkpoint rewrites itself (save_pretrained, recipe,
# report) or that describe other weights; everything else (tokenizer, chat template) is copied.
_NOT_COPIED = {"config.json", "generation_config.json", "model.safetensors.index.json",
               "pytorch_model.bin.index.json", "fdec-cache.json", RECIPE_FILE, REPORT_FILE}  # fmt: skip
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_HELD_SHINGLE = 40  # characters: training text sharing one with the held text is refused


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


def _check_pair(student: Any, teacher: Any, recipe: Recipe) -> None:
    """Refuse a student/teacher pair the recipe cannot train, before loading any weights."""
    for role, source in (("student", student), ("teacher", teacher)):
        if source.family.kind != "decoder":
            raise InputError(
                f"{role} {source.given} is a {source.family.name} encoder; distillation here "
                "trains causal language models",
                "give decoder models (Llama, Qwen2, Mistral, GPT-2)",
            )
    s_layers, s_hidden, s_vocab, s_positions = model_dims(student.config)
    t_layers, t_hidden, t_vocab, _ = model_dims(teacher.config)
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
    inside = pathlib.Path(student) / "student"
    if (inside / RECIPE_FILE).is_file() and not (pathlib.Path(student) / RECIPE_FILE).exists():
        raise UsageError(
            f"{student} is a pruned build; the model to distill is its student/ folder",
            f"pass {inside}",
        )
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
    n_threads = threads or default_threads()
    torch.set_num_threads(n_threads)
    try:
        tokenizer = AutoTokenizer.from_pretrained(token_folder)
        vocab = model_dims(s_source.config)[2] or len(tokenizer)
        ids = train_tokens(texts, tokenizer, vocab)
        if len(ids) < recipe.seq_len:
            raise InputError(
                f"the training text has {len(ids)} tokens, fewer than seq_len {recipe.seq_len}",
                f"give more text with --data, or lower seq_len in {RECIPE_FILE}",
            )
        max_positions = model_dims(s_source.config)[3] or 1024
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
        before = held_figures(s_model, held, held_teacher)
        say(
            f"before: held perplexity {before['perplexity']:.2f} (teacher {teacher_ppl:.2f}), "
            f"KL to teacher {before['kl_to_teacher']:.4f}; {len(ids)} training tokens"
        )
        losses = train(s_model, t_model, s_source, t_source, recipe, ids, steps, say)
        after = held_figures(s_model, held, held_teacher)
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
