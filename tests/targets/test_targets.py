"""Tests for fdec.targets: bundled data, derived precisions, user files and their errors."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fdec.errors import EXIT_USAGE, InputError
from fdec.targets import Precision, Target, list_targets, load_target, target_names

EXPECTED_NAMES = [
    "a100",
    "a10g",
    "b200",
    "cpu",
    "h100",
    "h200",
    "l4",
    "l40s",
    "rtx4090",
    "rtx5090",
    "t4",
]

VALID = """\
name = "my-gpu"
display_name = "My GPU"
vendor = "nvidia"
compute_capability = "8.9"
memory_gb = 24
memory_bandwidth_gbs = 1008
default_backend = "tensorrt-rtx"
sparse_tensor_cores = true
sources = ["my notes"]

[peak_tflops]
fp32 = 82.6
fp8 = 330.3

[default_recipe]
weights = "int4-awq"
activations = "fp16"
kv_cache = "fp8"
"""


def _write(tmp_path: Path, text: str, name: str = "gpu.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error_for(tmp_path: Path, text: str) -> InputError:
    path = _write(tmp_path, text)
    with pytest.raises(InputError) as caught:
        load_target(str(path))
    message = str(caught.value)
    assert str(path) in message, f"message does not name the file: {message}"
    assert caught.value.exit_code == EXIT_USAGE
    return caught.value


# Bundled targets ------------------------------------------------------------------------------


def test_every_bundled_target_is_listed_and_loads() -> None:
    assert target_names() == EXPECTED_NAMES
    targets = list_targets()
    assert [t.name for t in targets] == EXPECTED_NAMES
    for target in targets:
        assert load_target(target.name) == target
        assert Path(target.path).name == f"{target.name}.toml"
        assert target.sources, f"{target.name} cites no sources"
        assert target.display_name and target.vendor
        assert target.memory_bandwidth_gbs > 0
        assert {"weights", "activations", "kv_cache"} <= set(target.default_recipe)
        assert set(target.default_recipe) - {"weights", "activations", "kv_cache"} <= {
            "encoder_weights"
        }
        for value in target.default_recipe.values():
            assert target.supports(value.split("-")[0]), (target.name, value)
        assert set(target.peak_tflops) <= target.precisions
        json.loads(json.dumps(target.to_dict()))


def test_gpu_targets_cite_urls_and_give_real_figures() -> None:
    for target in list_targets():
        if not target.is_gpu:
            continue
        assert target.memory_gb > 0
        assert target.peak_tflops[Precision.FP32] > 0
        assert all("https://" in source for source in target.sources), target.name
        assert target.default_backend in {"tensorrt", "tensorrt-rtx"}


def test_bundled_figures_match_the_datasheets() -> None:
    h100 = load_target("h100")
    assert h100.compute_capability == (9, 0)
    assert h100.memory_gb == 80
    assert h100.memory_bandwidth_gbs == 3350
    assert h100.peak_tflops[Precision.FP8_E4M3] == 1979.0  # 3,958 sparse, halved
    assert load_target("a100").memory_bandwidth_gbs == 2039
    assert load_target("h200").memory_gb == 141
    assert load_target("b200").peak_tflops[Precision.FP4] == 9000.0
    assert load_target("t4").peak_tflops[Precision.INT8] == 130.0


def test_names_are_case_insensitive_and_results_cached() -> None:
    assert load_target("H100") is load_target("h100")
    assert load_target("  l40s ") is load_target("l40s")


def test_default_backends_and_recipes() -> None:
    assert load_target("h100").default_backend == "tensorrt"
    assert load_target("rtx4090").default_backend == "tensorrt-rtx"
    assert load_target("cpu").default_backend == "onnxruntime"
    assert dict(load_target("h100").default_recipe) == {
        "weights": "fp8",
        "activations": "fp8",
        "kv_cache": "fp8",
    }


def test_default_quantize_follows_each_targets_plan() -> None:
    """The issue's plan: cpu int4-awq (int8 for encoders); Ampere/Turing int8 or int4-awq;
    FP8-capable GPUs fp8."""
    from fdec.compile import default_quantize

    assert default_quantize(load_target("cpu"), "decoder") == "int4-awq"
    assert default_quantize(load_target("cpu"), "encoder") == "int8"
    for name in ("a100", "a10g", "t4"):
        assert default_quantize(load_target(name), "decoder") in {"int8", "int4-awq"}
    for name in ("h100", "h200", "l4", "l40s", "rtx4090", "b200", "rtx5090"):
        assert default_quantize(load_target(name), "decoder") == "fp8", name


# Derived precisions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "precision", "expected"),
    [
        ("h100", Precision.FP8_E4M3, True),
        ("a100", Precision.FP8_E4M3, False),
        ("a100", Precision.BF16, True),
        ("a100", Precision.TF32, True),
        ("t4", Precision.BF16, False),
        ("t4", Precision.TF32, False),
        ("t4", Precision.FP16, True),
        ("t4", Precision.INT4, True),
        ("l4", Precision.FP8_E4M3, True),
        ("h100", Precision.FP4, False),
        ("b200", Precision.FP4, True),
        ("rtx5090", Precision.FP4, True),
        ("cpu", Precision.FP16, False),
        ("cpu", Precision.BF16, False),
        ("cpu", Precision.FP8_E4M3, False),
        ("cpu", Precision.FP32, True),
        ("cpu", Precision.INT8, True),
        ("cpu", Precision.INT4, True),
    ],
)
def test_supports_is_derived_from_compute_capability(
    name: str, precision: Precision, expected: bool
) -> None:
    target = load_target(name)
    assert target.supports(precision) is expected
    assert target.supports(precision.value) is expected
    assert (precision in target.precisions) is expected


def test_cpu_precisions_exactly() -> None:
    cpu = load_target("cpu")
    assert not cpu.is_gpu
    assert cpu.compute_capability is None
    assert cpu.precisions == {Precision.FP32, Precision.INT8, Precision.INT4}
    assert cpu.to_dict()["compute_capability"] is None
    assert cpu.to_dict()["precisions"] == ["fp32", "int4", "int8"]


def test_precisions_follow_a_changed_compute_capability() -> None:
    # The same file data with another compute capability gets other precisions: nothing is
    # listed per GPU.
    l4 = load_target("l4")
    ampere = dataclasses.replace(l4, compute_capability=(8, 6), peak_tflops={"fp32": 1.0})
    assert not ampere.supports("fp8")
    assert ampere.supports("bf16")
    blackwell = dataclasses.replace(l4, compute_capability=(10, 0))
    assert blackwell.supports(Precision.FP4)


def test_require_message_for_fp8_on_a100() -> None:
    with pytest.raises(InputError) as caught:
        load_target("a100").require(Precision.FP8_E4M3)
    assert str(caught.value) == "FP8 needs compute capability ≥ 8.9; a100 is 8.0; use int8 or int4"
    assert caught.value.fix == "use int8 or int4"


def test_require_messages_suggest_supported_alternatives() -> None:
    with pytest.raises(InputError, match=r"BF16 needs compute capability ≥ 8\.0; t4 is 7\.5"):
        load_target("t4").require("bf16")
    with pytest.raises(InputError, match=r"FP4 needs compute capability ≥ 10\.0; h100 is 9\.0"):
        load_target("h100").require("fp4")
    with pytest.raises(
        InputError, match="FP16 needs a GPU; cpu supports fp32, int8, int4; use fp32"
    ):
        load_target("cpu").require("fp16")
    assert load_target("h100").require("fp8_e4m3") is Precision.FP8_E4M3


def test_to_dict_is_json_ready() -> None:
    data = load_target("h100").to_dict()
    assert data["compute_capability"] == "9.0"
    assert data["precisions"] == sorted(data["precisions"])
    assert "fp8" in data["precisions"] and "fp4" not in data["precisions"]
    assert data["peak_tflops"]["fp16"] == 989.5
    assert json.loads(json.dumps(data)) == data


def test_target_is_frozen() -> None:
    h100 = load_target("h100")
    with pytest.raises(dataclasses.FrozenInstanceError):
        h100.memory_gb = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        h100.peak_tflops[Precision.FP16] = 1.0  # type: ignore[index]
    with pytest.raises(TypeError):
        h100.default_recipe["weights"] = "fp32"  # type: ignore[index]
    assert hash(h100) == hash(load_target("h100"))


# Precision ------------------------------------------------------------------------------------


def test_precision_parse() -> None:
    assert Precision.parse("fp8") is Precision.FP8_E4M3
    assert Precision.parse("FP8_E4M3") is Precision.FP8_E4M3
    assert Precision.parse("BF16") is Precision.BF16
    assert Precision.parse(Precision.INT4) is Precision.INT4
    assert [p.value for p in Precision] == [
        "fp32",
        "tf32",
        "fp16",
        "bf16",
        "fp8",
        "int8",
        "int4",
        "fp4",
    ]
    assert Precision.FP8_E4M3.bits == 8 and Precision.INT4.bits == 4


@pytest.mark.parametrize("text", ["int4-awq", "fp8_e5m2", "float16", "", "nf4"])
def test_precision_parse_is_strict(text: str) -> None:
    with pytest.raises(InputError) as caught:
        Precision.parse(text)
    assert "valid precisions: fp32, tf32, fp16, bf16, fp8, int8, int4, fp4" in str(caught.value)


# Unknown names and user files -----------------------------------------------------------------


def test_unknown_name_lists_known_targets() -> None:
    with pytest.raises(InputError) as caught:
        load_target("h1000")
    error = caught.value
    assert error.problem == "unknown target 'h1000'"
    assert "known targets: a100, a10g, b200, cpu, h100" in error.fix
    assert "or give a path to a .toml target file" in error.fix
    assert "did you mean 'h100'?" in error.fix
    assert error.exit_code == EXIT_USAGE


def test_empty_name_is_an_input_error() -> None:
    with pytest.raises(InputError, match="no target given"):
        load_target("  ")


def test_user_toml_loads_by_path(tmp_path: Path) -> None:
    path = _write(tmp_path, VALID)
    target = load_target(str(path))
    assert target.name == "my-gpu"
    assert target.compute_capability == (8, 9)
    assert target.supports("fp8") and not target.supports("fp4")
    assert target.peak_tflops == {Precision.FP32: 82.6, Precision.FP8_E4M3: 330.3}
    assert target.path == str(path)
    assert load_target(path) == target  # a Path works too


def test_user_cpu_file_without_compute_capability(tmp_path: Path) -> None:
    text = VALID.replace('compute_capability = "8.9"\n', "")
    text = text.replace('"tensorrt-rtx"', '"onnxruntime"').replace("true", "false")
    text = text.replace("fp8 = 330.3\n", "").replace('"fp8"', '"int8"')
    text = text.replace('"fp16"', '"fp32"').replace("memory_gb = 24", "memory_gb = 0")
    target = load_target(str(_write(tmp_path, text)))
    assert not target.is_gpu
    assert target.memory_gb == 0


def test_missing_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_target(str(tmp_path / "nope.toml"))
    with pytest.raises(InputError, match="built-in target 'h100'"):
        load_target(str(tmp_path / "h100.toml"))


def test_folder_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a folder"):
        load_target(str(tmp_path) + "/")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        # missing field
        (lambda t: t.replace("memory_bandwidth_gbs = 1008\n", ""), "missing memory_bandwidth_gbs"),
        # unknown key, with the nearest valid key suggested
        (
            lambda t: t.replace("memory_gb = 24", "memory_gib = 24"),
            "unknown key 'memory_gib'; did you mean 'memory_gb'?",
        ),
        (
            lambda t: t.replace("kv_cache =", "kvcache ="),
            "unknown key 'default_recipe.kvcache'; did you mean 'kv_cache'?",
        ),
        (
            lambda t: t.replace("fp8 = 330.3", "fp9 = 330.3"),
            "unknown key 'peak_tflops.fp9'; did you mean 'fp8'?",
        ),
        # absurd values
        (lambda t: t.replace("memory_gb = 24", "memory_gb = 0"), "memory_gb must be > 0"),
        (lambda t: t.replace("memory_gb = 24", "memory_gb = -8"), "memory_gb must be > 0"),
        (lambda t: t.replace("memory_gb = 24", "memory_gb = 1e12"), "implausibly large"),
        (lambda t: t.replace("memory_gb = 24", "memory_gb = nan"), "finite"),
        (lambda t: t.replace("= 1008", "= 0"), "memory_bandwidth_gbs must be > 0"),
        (lambda t: t.replace("fp32 = 82.6", "fp32 = -1.0"), "peak_tflops.fp32 must be > 0"),
        (lambda t: t.replace("memory_gb = 24", 'memory_gb = "24"'), "memory_gb must be a number"),
        (lambda t: t.replace("memory_gb = 24", "memory_gb = true"), "memory_gb must be a number"),
        # compute capability
        (lambda t: t.replace('"8.9"', '"8.9.1"'), "is not of the form major.minor"),
        (lambda t: t.replace('"8.9"', '"sm_89"'), "is not of the form major.minor"),
        (lambda t: t.replace('"8.9"', "8.9"), 'must be a string like "8.9"'),
        (lambda t: t.replace('"8.9"', '"2.1"'), "outside 3.0–15.x"),
        (lambda t: t.replace('"8.9"', '"16.0"'), "outside 3.0–15.x"),
        # precisions the compute capability does not allow
        (
            lambda t: t.replace('"8.9"', '"8.0"'),
            "peak_tflops.fp8 is given, but FP8 needs compute capability ≥ 8.9",
        ),
        (
            lambda t: t.replace('"8.9"', '"7.5"').replace("fp8 = 330.3\n", ""),
            "2:4 sparse tensor cores need compute capability ≥ 8.0",
        ),
        (
            lambda t: t.replace('weights = "int4-awq"', 'weights = "fp4"'),
            "default_recipe.weights = 'fp4' cannot run on my-gpu: FP4 needs compute capability",
        ),
        # other fields
        (lambda t: t.replace('"tensorrt-rtx"', '"tensorrt_rtx"'), "did you mean 'tensorrt-rtx'?"),
        (lambda t: t.replace('"my-gpu"', '"My GPU"'), "is not a valid target name"),
        (lambda t: t.replace('"int4-awq"', '"int5-awq"'), "names no known precision"),
        (lambda t: t.replace('["my notes"]', '"my notes"'), "sources must be a list"),
        (lambda t: t.replace("sparse_tensor_cores = true", "sparse_tensor_cores = 1"), "true or"),
        (
            lambda t: t.replace('activations = "fp16"\n', ""),
            "default_recipe is missing activations",
        ),
        (lambda t: t.replace("fp32 = 82.6\n", ""), "peak_tflops.fp32 is missing"),
        (lambda t: t.replace("fp32 = 82.6", "fp32 = 82.6\nfp8_e4m3 = 1.0"), "fp8 twice"),
        (
            lambda t: t.replace('compute_capability = "8.9"\n', ""),
            "'tensorrt-rtx' needs a GPU, but compute_capability is not set",
        ),
        # not TOML at all
        (lambda t: "this is not { toml", "not valid TOML"),
        (lambda t: "<html><body>404</body></html>", "not valid TOML"),
    ],
)
def test_bad_files_give_useful_input_errors(tmp_path: Path, change, expected: str) -> None:
    error = _error_for(tmp_path, change(VALID))
    assert expected in str(error), str(error)
    assert error.fix, "every error names a fix"


def test_binary_file_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "gpu.toml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InputError, match="not UTF-8"):
        load_target(str(path))


def test_hand_built_target_is_frozen_too() -> None:
    target = Target(
        name="x",
        display_name="X",
        vendor="nvidia",
        compute_capability=(9, 0),
        memory_gb=80,
        memory_bandwidth_gbs=3350,
        peak_tflops={"fp8": 1.0},
        default_backend="tensorrt",
        default_recipe={"weights": "fp8", "activations": "fp8", "kv_cache": "fp8"},
        sparse_tensor_cores=True,
        sources=["notes"],
    )
    assert target.peak_tflops == {Precision.FP8_E4M3: 1.0}
    assert target.sources == ("notes",)
    hash(target)


# Property: nothing but InputError ever escapes ------------------------------------------------

_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=400)
_LINES = VALID.splitlines()


def _load_text_from_file(text: str) -> Target | InputError:
    """The loaded target, or the InputError it raised; any other exception escapes."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.toml"
        path.write_text(text, encoding="utf-8")
        try:
            return load_target(str(path))
        except InputError as error:
            return error


def _assert_clean_outcome(outcome: Target | InputError) -> None:
    if isinstance(outcome, InputError):
        assert str(outcome) and "\n" not in str(outcome)
        assert outcome.exit_code == EXIT_USAGE
    else:
        assert isinstance(outcome, Target)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_TEXT)
def test_arbitrary_text_only_raises_input_error(text: str) -> None:
    _assert_clean_outcome(_load_text_from_file(text))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(min_value=0, max_value=len(_LINES) - 1),
    st.sampled_from(
        [
            "",
            "= 1",
            ' = "x"',
            " = 1e999",
            " = -0.0",
            " = 99999999999999999999999999999999999",
            " = [1, 2]",
            " = {a = 1}",
            " = 1979-05-27T07:32:00Z",
            " = true",
            " = ''",
            "[x]",
        ]
    ),
    _TEXT,
)
def test_mutated_valid_file_only_raises_input_error(line: int, suffix: str, noise: str) -> None:
    lines = list(_LINES)
    key = lines[line].split("=")[0].strip()
    lines[line] = key + suffix if suffix.startswith(" ") else suffix or noise
    _assert_clean_outcome(_load_text_from_file("\n".join(lines) + "\n"))
