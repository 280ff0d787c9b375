"""fdec distill: the recipe file, a real PyTorch distillation of a layer-dropped tiny Llama, the
checkpoint it writes (transformers loads it, fdec compile builds it), and bad inputs."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
from models import make_tiny_model

from fdec.cli import cli
from fdec.distill import RECIPE_FILE, REPORT_FILE, Recipe, read_recipe, write_recipe
from fdec.errors import InputError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja")  # fmt: skip


def drop_layers(
    teacher: pathlib.Path, keep: list[int], out: pathlib.Path, *, recipe: dict | None = None
) -> pathlib.Path:
    """A student cut from `teacher` in HF: only the decoder layers in `keep`, same weights,
    config with the new layer count, the teacher's tokenizer, and a distill.json recipe.

    Also used for the SmolLM2 measurement (see docs/design-notes.md).
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = index
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in _TOKENIZER_FILES:
        if (teacher / name).is_file():
            shutil.copyfile(teacher / name, out / name)
    dropped = [i for i in range(len(layers)) if i not in keep]
    write_recipe(
        out,
        teacher=str(teacher),
        layer_map=dict(enumerate(keep)),
        pruned={"method": "drop-layers", "dropped_layers": dropped},
        **(recipe or {}),
    )
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A 4-layer tiny Llama teacher and a 2-layer student (layers 0 and 3) with its recipe."""
    root = tmp_path_factory.mktemp("distill")
    teacher = make_tiny_model(root / "teacher", "llama", num_hidden_layers=4)
    recipe = {
        "losses": {"logit_kl": {"weight": 1.0, "temperature": 2.0}, "hidden_mse": {"weight": 0.1}},
        "seq_len": 64,
    }
    student = drop_layers(teacher, [0, 3], root / "student", recipe=recipe)
    return teacher, student


@pytest.fixture(scope="module")
def distilled(pair, tmp_path_factory):
    """`fdec distill STUDENT --steps 40 --json` run once; the outcome and the output folder."""
    from click.testing import CliRunner

    _, student = pair
    out = tmp_path_factory.mktemp("distilled") / "out"
    args = ["distill", str(student), "--steps", "40", "--lr", "2e-3", "-o", str(out), "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, (result.output, result.stderr)
    return json.loads(result.stdout), out


def test_recipe_round_trip_and_defaults(tmp_path):
    assert read_recipe(tmp_path) == Recipe()  # no distill.json: every default
    path = write_recipe(
        tmp_path, teacher="smollm2-135m", layer_map={0: 0, 1: 4},
        losses={"logit_kl": {"temperature": 4.0}, "hidden_mse": {"weight": 0.5}},
        optimizer={"lr": 3e-4}, batch_size=2, pruned={"kept_layers": 2},
    )  # fmt: skip
    data = json.loads(path.read_text())
    assert data["layer_map"] == {"0": 0, "1": 4}
    assert data["losses"]["logit_kl"] == {"weight": 1.0, "temperature": 4.0}
    recipe = read_recipe(tmp_path)
    assert recipe.layer_map == {0: 0, 1: 4}
    assert (recipe.temperature, recipe.hidden_mse_weight, recipe.lr) == (4.0, 0.5, 3e-4)
    assert (recipe.batch_size, recipe.seq_len, recipe.teacher) == (2, 128, "smollm2-135m")
    assert recipe.pruned == {"kept_layers": 2}


@pytest.mark.parametrize(
    ("recipe", "words"),
    [
        ({"layermap": {}}, ["unknown key 'layermap'", "did you mean 'layer_map'"]),
        ({"losses": {"logit_kl": {"temprature": 2}}}, ["'temprature'", "temperature"]),
        ({"losses": {"logit_kl": {"temperature": 0}}}, ["temperature is 0", "positive"]),
        ({"layer_map": {"a": 1}}, ["layer_map key 'a'"]),
        ({"batch_size": True}, ["batch_size is True"]),
        ({"losses": {"logit_kl": {"weight": 0}}}, ["every loss weight is 0"]),
    ],
)
def test_bad_recipe_is_one_line(tmp_path, recipe, words):
    (tmp_path / RECIPE_FILE).write_text(json.dumps(recipe))
    with pytest.raises(InputError) as info:
        read_recipe(tmp_path)
    message = info.value.one_line()
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_distill_lowers_loss_and_kl(distilled):
    outcome, out = distilled
    losses = [row["loss"] for row in outcome["losses"]]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    assert all(row["mse"] > 0 for row in outcome["losses"])  # the hidden loss took part
    before, after = outcome["before"], outcome["after"]
    assert after["kl_to_teacher"] < 0.7 * before["kl_to_teacher"], (before, after)
    assert after["perplexity"] < before["perplexity"], (before, after)
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["after"] == after and report["steps"] == 40
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe["layer_map"] == {"0": 0, "1": 3} and recipe["optimizer"]["lr"] == 2e-3


def test_checkpoint_loads_with_transformers(distilled, pair):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fdec.verify import held_token_ids

    outcome, out = distilled
    teacher, _ = pair
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_hidden_layers == 2
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    # The saved weights are the trained ones: the held KL recomputed from the checkpoint
    # matches the figure the run reported after training (and differs from the untrained one).
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = torch.from_numpy(held_token_ids(tokenizer, model.config.vocab_size, limit=256))
    reference = AutoModelForCausalLM.from_pretrained(teacher).eval()
    with torch.no_grad():
        t = torch.log_softmax(reference(input_ids=ids).logits[0], -1)
        s = torch.log_softmax(model(input_ids=ids).logits[0], -1)
    kl = float((t.exp() * (t - s)).sum(-1).mean())
    assert kl == pytest.approx(outcome["after"]["kl_to_teacher"], rel=1e-3)
    assert kl != pytest.approx(outcome["before"]["kl_to_teacher"], rel=1e-2)


def test_distilled_checkpoint_compiles(distilled, tmp_path, cli_runner):
    _, out = distilled
    build = tmp_path / "build"
    args = ["compile", str(out), "--target", "cpu", "--quantize", "none", "-o", str(build), "-q"]
    result = cli_runner.invoke(cli, args)
    assert result.exit_code == 0, (result.output, result.stderr)
    assert (build / "model.onnx").is_file()


def _expect_error(cli_runner, args, out, words):
    result = cli_runner.invoke(cli, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and not ln.startswith("[fdec ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not out.exists()
    assert [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


def _copy_student(student, tmp_path, recipe=None, config=None):
    folder = tmp_path / "student"
    shutil.copytree(student, folder)
    if recipe is not None:
        (folder / RECIPE_FILE).write_text(json.dumps(recipe))
    if config is not None:
        data = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**data, **config}))
    return folder


def test_bad_inputs_exit_2_and_write_nothing(pair, tmp_path, cli_runner):
    teacher, student = pair
    out = tmp_path / "out"
    run = ["--steps", "3", "-o", str(out)]
    no_recipe = _copy_student(student, tmp_path / "a")
    (no_recipe / RECIPE_FILE).unlink()
    _expect_error(cli_runner, ["distill", str(no_recipe), *run], out, ["no teacher", "--teacher"])
    missing = str(tmp_path / "nowhere")
    _expect_error(cli_runner, ["distill", str(student), "--teacher", missing, *run], out,
                  ["does not exist"])  # fmt: skip
    wide = _copy_student(student, tmp_path / "b", config={"vocab_size": 400})
    _expect_error(cli_runner, ["distill", str(wide), *run], out,
                  ["vocabulary mismatch", "400", "320"])  # fmt: skip
    bad_key = _copy_student(student, tmp_path / "c", recipe={"teacher": str(teacher), "lr": 1})
    _expect_error(cli_runner, ["distill", str(bad_key), *run], out, ["unknown key 'lr'"])
    too_far = _copy_student(student, tmp_path / "d",
                            recipe={"teacher": str(teacher), "layer_map": {"0": 7}})  # fmt: skip
    _expect_error(cli_runner, ["distill", str(too_far), *run], out, ["teacher layer 7"])
    _expect_error(cli_runner, ["distill", str(student), "--steps", "0", "-o", str(out)], out,
                  ["--steps is 0"])  # fmt: skip
    held = tmp_path / "held.txt"
    shutil.copyfile(pathlib.Path(__file__).parents[1] / "fdec" / "data" / "held.txt", held)
    _expect_error(cli_runner, ["distill", str(student), "--data", str(held), *run], out,
                  ["held-out evaluation text"])  # fmt: skip
    _expect_error(cli_runner, ["distill", str(student), "-o", str(student / "sub"), "--steps",
                               "1"], student / "sub", ["inside the student folder"])  # fmt: skip
    build = tmp_path / "pruned-build"  # a --prune build holds its student in student/
    _copy_student(student, build)
    _expect_error(cli_runner, ["distill", str(build), *run], out,
                  ["is a pruned build", f"pass {build / 'student'}"])  # fmt: skip


def test_student_without_tokenizer_takes_the_teachers(pair, tmp_path, cli_runner):
    """The pruner may leave the tokenizer out: the teacher's is used and lands in the output.
    A failed run before it left an existing output folder untouched."""
    teacher, student = pair
    bare = _copy_student(student, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    result = cli_runner.invoke(cli, ["distill", str(bare), "--steps", "0", "-o", str(out)])
    assert result.exit_code == 2 and (out / "keep.txt").read_text() == "previous"
    # keep.txt is not fdec's: only --force replaces the folder (fdec.build.check_replaceable)
    args = ["distill", str(bare), "--steps", "2", "-o", str(out), "--json", "--force"]
    result = cli_runner.invoke(cli, args)
    assert result.exit_code == 0, (result.output, result.stderr)
    assert not (out / "keep.txt").exists()  # replaced whole
    teacher_tokenizer = (teacher / "tokenizer.json").read_bytes()
    assert (out / "tokenizer.json").read_bytes() == teacher_tokenizer
    assert json.loads(result.stdout)["steps"] == 2
