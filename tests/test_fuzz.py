"""Property tests: arbitrary input to fdec's parsers and loaders gives a clean one-line error,
never a traceback. (The target loader's own properties are in tests/targets/test_targets.py.)"""

from __future__ import annotations

import json
import math
import pathlib
import struct
import tempfile

import click
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fdec.compile
from fdec.calibrate import load_calibration_texts
from fdec.cli import FRACTION, cli
from fdec.errors import EXIT_USAGE, FdecError, InputError, UsageError
from fdec.frontend.source import resolve_source
from fdec.passes import REGISTRY, parse_pass_list

_FUZZ = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60)


def _one_line(error: BaseException) -> None:
    text = str(error)
    assert text and "\n" not in text, text
    if isinstance(error, FdecError):
        assert error.exit_code == EXIT_USAGE


# --- --max-ppl-increase -----------------------------------------------------------------------


@_FUZZ
@given(st.one_of(_TEXT, st.floats().map(str), st.floats().map(lambda f: f"{f}%")))
def test_max_ppl_increase_is_a_finite_fraction_or_a_usage_error(text):
    try:
        value = FRACTION.convert(text, None, None)
    except click.BadParameter as err:
        _one_line(err)
        return
    assert isinstance(value, float) and math.isfinite(value) and value >= 0
    expected = float(text.strip()[:-1]) / 100 if text.strip().endswith("%") else float(text)
    assert value == expected


def test_max_ppl_increase_examples():
    assert FRACTION.convert("3%", None, None) == pytest.approx(0.03)
    assert FRACTION.convert("0.03", None, None) == 0.03
    for bad in ("nan", "inf", "1e999%", "-1%", "three"):
        with pytest.raises(click.BadParameter):
            FRACTION.convert(bad, None, None)


# --- --passes -----------------------------------------------------------------------------------

_PASS_PIECES = st.sampled_from([*REGISTRY, "default", "none", "", " ", "fold", "CSE", ",,"])


@_FUZZ
@given(st.one_of(_TEXT, st.lists(st.one_of(_PASS_PIECES, _TEXT), max_size=6).map(",".join)))
def test_pass_list_gives_registered_names_or_a_usage_error(text):
    try:
        names = parse_pass_list(text)
    except UsageError as err:
        _one_line(err)
        assert err.fix
        return
    assert all(name in REGISTRY for name in names)


# --- calibration files --------------------------------------------------------------------------


@_FUZZ
@given(
    st.sampled_from([".txt", ".jsonl", ".TXT", ".json", ""]),
    st.one_of(st.binary(max_size=300), _TEXT.map(str.encode)),
)
def test_calibration_loader_gives_texts_or_an_input_error(suffix, data):
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / f"calib{suffix}"
        path.write_bytes(data)
        try:
            texts = load_calibration_texts(path)
        except InputError as err:
            _one_line(err)
            return
    assert texts and all(isinstance(t, str) and t.strip() for t in texts)


# --- config.json ------------------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=8,
)
_CONFIG_KEYS = ["model_type", "architectures", "hidden_size", "vocab_size", "num_hidden_layers",
                "torch_dtype", "auto_map", "tie_word_embeddings"]  # fmt: skip
_MODEL_TYPES = st.sampled_from(["llama", "gpt2", "bert", "qwen2", "mistral", "t5", ""])


def _tiny_safetensors() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(8)


@_FUZZ
@given(
    st.one_of(
        _JSON.map(lambda value: json.dumps(value).encode()),
        st.dictionaries(
            st.sampled_from(_CONFIG_KEYS), st.one_of(_JSON, _MODEL_TYPES), max_size=5
        ).map(lambda value: json.dumps(value).encode()),
        st.binary(max_size=200),
    )
)
def test_config_loader_gives_a_source_or_an_input_error(config_bytes):
    with tempfile.TemporaryDirectory() as folder:
        root = pathlib.Path(folder)
        (root / "config.json").write_bytes(config_bytes)
        (root / "model.safetensors").write_bytes(_tiny_safetensors())
        try:
            source = resolve_source(str(root))
        except InputError as err:
            _one_line(err)
            return
    assert source.family.name and source.weight_files


# --- the command line ---------------------------------------------------------------------------

_OPTIONS = {
    "compile": ["--target", "-t", "-o", "--out", "--passes", "--verify-each", "--dump-dir",
                "--trust-pickle", "--trust-remote-code", "--cache-dir", "--backend", "--max-batch",
                "--max-seq-len", "--quantize", "--calibration", "--calib", "--keep-fp",
                "--max-ppl-increase", "--emit", "--no-wait", "--json", "-q", "--bogus"],
    "run": ["--prompt", "-p", "--max-new-tokens", "-n", "--temperature", "--top-k", "--top-p",
            "--seed", "--no-chat-template", "--json", "--bogus"],
    "report": ["--json", "--bogus"],
    "targets": ["--json", "--bogus"],
    "passes": ["--json", "--bogus"],
}  # fmt: skip
_VALUES = st.sampled_from(
    [
        "cpu",
        "h100",
        "a100",
        "int4",
        "int4-awq",
        "int8",
        "fp8",
        "none",
        "fp32",
        "default",
        "tensorrt",
        "onnxruntime",
        "hf-checkpoint",
        "3%",
        "0.03",
        "-1",
        "0",
        "2",
        "1e9",
        "nan",
        "calib.txt",
        "model",
        "build",
        "x.toml",
        "",
        "-",
    ]
)
# Free text never holds "/" or "..": every path it makes stays in the isolated working folder.
_WORD = _TEXT.filter(lambda t: "/" not in t and ".." not in t and "\x00" not in t)


@st.composite
def _argv(draw):
    command = draw(st.sampled_from(sorted(_OPTIONS)))
    token = st.one_of(st.sampled_from(_OPTIONS[command]), _VALUES, _WORD)
    head = ["-v"] if draw(st.booleans()) else []
    return [*head, command, *draw(st.lists(token, max_size=8))]


@pytest.fixture
def stop_before_loading(monkeypatch):
    """Compile runs every check that needs no model, then stops where it would load one."""

    def stop(given, **kwargs):
        raise InputError("fuzz: stopped before loading the model")

    monkeypatch.setattr(fdec.compile.resolve, "resolve_source", stop)


@_FUZZ
@given(argv=_argv())
def test_command_line_never_gives_a_traceback(
    argv, stop_before_loading, cli_runner, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # relative paths the fuzz makes land here
    pathlib.Path("calib.txt").write_text("some calibration text\n")
    result = cli_runner.invoke(cli, argv)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        argv,
        repr(result.exception),
    )
    assert "Traceback" not in result.output + result.stderr
    if result.exit_code == 0:
        return
    assert result.exit_code in (1, 2, 3), (argv, result.exit_code)
    # One clean error line (a fuzzed argument may itself hold line breaks, which click echoes).
    lines = result.stderr.split("\n")
    assert any(line.startswith(("error: ", "Error: ")) for line in lines), (argv, result.stderr)
