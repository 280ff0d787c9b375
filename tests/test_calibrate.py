"""Tests of calibration: the built-in corpus, text loading, token batches and activation statistics.

Statistics are checked exactly against numpy on a hand-written graph, and against PyTorch
forward hooks on a tiny exported llama (the q_proj input), so a wrong name or a wrong axis
fails here rather than as a slightly worse quantized model.
"""

from __future__ import annotations

import importlib.resources
import json
import pathlib
import re

import numpy as np
import onnx_ir as ir
import pytest
from graphs import ir_model, tiny_spec

from fdec.calibrate import (
    CORPUS_DOMAINS,
    ActivationStats,
    calibration_batches,
    capture_activations,
    collect_activation_stats,
    load_calibration_texts,
    matmul_activation_inputs,
)
from fdec.errors import CompileError, InputError
from fdec.frontend.export import import_model
from fdec.frontend.source import resolve_source
from fdec.ir import FdecModel
from fdec.verify import held_token_ids


def _corpus_file(domain: str) -> pathlib.Path:
    return pathlib.Path(str(importlib.resources.files("fdec").joinpath(f"data/calib/{domain}.txt")))


# --- the built-in corpus ----------------------------------------------------------------------


def test_builtin_corpus_has_four_substantial_domains():
    texts = load_calibration_texts(None)
    per_domain = {domain: load_calibration_texts(_corpus_file(domain)) for domain in CORPUS_DOMAINS}

    assert texts == [text for domain in CORPUS_DOMAINS for text in per_domain[domain]]
    words = {domain: sum(len(t.split()) for t in ts) for domain, ts in per_domain.items()}
    assert all(count >= 400 for count in words.values()), words
    assert 2_500 <= sum(words.values()) <= 4_000, words
    assert all(len(ts) >= 10 for ts in per_domain.values())

    dialogue = "\n".join(per_domain["dialogue"])
    assert dialogue.count("User:") >= 10 and dialogue.count("Assistant:") >= 10
    code = "\n".join(per_domain["code"])
    for marker in ("def ", "class ", "function ", "const ", "SELECT ", "CREATE TABLE"):
        assert marker in code, marker
    numbers = "\n".join(per_domain["numbers"])
    assert sum(c.isdigit() for c in numbers) / len(numbers) > 0.2
    assert re.search(r"\d{4}-\d{2}-\d{2}", numbers) and "|" in numbers
    prose = "\n".join(per_domain["prose"])
    assert sum(c.isdigit() for c in prose) / len(prose) < 0.01
    assert len(set(prose.lower().split())) > 400  # varied vocabulary, not a repeated line


# --- loading files ----------------------------------------------------------------------------


def test_txt_files_split_into_paragraphs_on_blank_lines(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_bytes(b"first line\nsame paragraph\n\n  \t\nsecond\r\n\r\nthird\n\n\n")

    assert load_calibration_texts(path) == ["first line\nsame paragraph", "second", "third"]


def test_jsonl_files_give_one_text_per_line(tmp_path):
    path = tmp_path / "texts.jsonl"
    lines = [json.dumps({"text": "one", "id": 1}), "", json.dumps({"text": "two\n\nlines"})]
    path.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")

    assert load_calibration_texts(path) == ["one", "two\n\nlines"]


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("empty.txt", b"", "has no text"),
        ("blank.txt", b" \n\n\t\n", "has no text"),
        ("blank.jsonl", b"\n\n", "has no text"),
        ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
        ("latin1.txt", "caf\u00e9 cr\u00e8me".encode("latin-1"), "not UTF-8"),
        ("broken.jsonl", b'{"text": "ok"}\n{"text": \n', "line 2: not JSON"),
        ("fields.jsonl", b'{"body": "no text field"}\n', "line 1: no string field 'text'"),
        ("list.jsonl", b'["text"]\n', "line 1: no string field 'text'"),
        ("data.csv", b"text\nhello\n", "is not .txt or .jsonl"),
    ],
)
def test_unusable_files_raise_one_line_input_errors(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content)

    with pytest.raises(InputError) as caught:
        load_calibration_texts(path)

    assert problem in caught.value.problem
    assert str(path) in caught.value.problem
    assert caught.value.fix and "\n" not in str(caught.value)
    assert caught.value.exit_code == 2


def test_missing_files_and_folders_raise_input_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_calibration_texts(tmp_path / "missing.txt")
    folder = tmp_path / "texts.txt"
    folder.mkdir()
    with pytest.raises(InputError, match="is a folder"):
        load_calibration_texts(folder)


# --- token batches ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tiny_models, tmp_path_factory):
    """The tiny llama exported (not cleaned: calibration works on any graph) + its tokenizer."""
    cache = tmp_path_factory.mktemp("cache-calibrate")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FDEC_CACHE_DIR", str(cache / "fdec"))
        patch.setenv("XDG_CACHE_HOME", str(cache))
        patch.setenv("HF_HUB_OFFLINE", "1")
        return import_model(resolve_source(str(tiny_models("llama"))))


def test_batches_cover_the_whole_corpus_in_even_steps(llama):
    tokenizer, vocab = llama.tokenizer, llama.fdec_model.spec.vocab_size
    texts = load_calibration_texts(None)
    stream = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    pieces = len(stream) // 128
    assert pieces > 16  # more text than 16 × 128 tokens: a choice is made

    batches = calibration_batches(texts, tokenizer, vocab)

    assert len(batches) == 16
    assert all(b.shape == (1, 128) and b.dtype == np.int64 for b in batches)
    want = np.linspace(0, pieces - 1, num=16).round().astype(int)
    for batch, k in zip(batches, want):
        np.testing.assert_array_equal(batch[0], stream[k * 128 : (k + 1) * 128])
    # The first and the last piece are taken: prose and numbers are both seen.
    np.testing.assert_array_equal(batches[-1][0], stream[(pieces - 1) * 128 : pieces * 128])

    short = calibration_batches(["a few words"], tokenizer, vocab, seq_len=64)
    assert len(short) == 1 and 8 <= short[0].shape[1] < 64
    assert len(calibration_batches(texts, tokenizer, vocab, seq_len=32, max_samples=5)) == 5


def test_batches_without_a_tokenizer_are_fixed_pseudo_random_ids():
    first = calibration_batches(["ignored"], None, 50, seq_len=24, max_samples=3)
    again = calibration_batches([], None, 50, seq_len=24, max_samples=3)

    assert len(first) == 3 and all(b.shape == (1, 24) and b.dtype == np.int64 for b in first)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    ids = np.concatenate(first, axis=1)
    assert 0 <= ids.min() and ids.max() < 50 and len(np.unique(ids)) > 20
    assert not np.array_equal(first[0][0], held_token_ids(None, 50)[0, :24])
    with pytest.raises(InputError, match="seq_len"):
        calibration_batches(["x"], None, 50, seq_len=0)


# --- statistics on a hand-written graph -------------------------------------------------------

_GRAPH = """
<ir_version: 10, opset_import: ["" : 20]>
g (int64[1, seq] input_ids) => (float[1, seq, 6] y) {
    e = Gather (table, input_ids)
    h = Mul (e, gain)
    y = MatMul (h, w)
}
"""


def _hand_written() -> tuple[FdecModel, dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    arrays = {
        "table": rng.standard_normal((20, 5)).astype(np.float32),
        "gain": np.array([1.0, -3.0, 0.5, 2.0, 0.25], dtype=np.float32),
        "w": rng.standard_normal((5, 6)).astype(np.float32),
    }
    spec = tiny_spec(vocab_size=20, inputs=["input_ids"], outputs=["y"])
    return FdecModel(ir_model(_GRAPH, arrays), spec), arrays


def test_stats_equal_numpy_exactly_and_leave_the_model_untouched():
    model, arrays = _hand_written()
    before = ir.serde.serialize_model(model.model).SerializeToString()
    batches = [np.array([[1, 4, 4, 9]]), np.array([[0, 19, 3, 3, 7, 2]])]

    stats = collect_activation_stats(model, batches, ["h", "e", "y", "h"])

    assert set(stats) == {"h", "e", "y"}
    h = [arrays["table"][ids[0]] * arrays["gain"] for ids in batches]  # [seq, 5] each
    every = np.abs(np.concatenate(h))
    got = stats["h"]
    assert got.absmax == float(every.max())
    np.testing.assert_array_equal(got.channel_absmax, every.max(axis=0))
    assert got.channel_absmax.shape == (5,) and got.count == 10
    per_batch = [np.percentile(np.abs(x), 99.9) for x in h]
    assert got.percentile_99_9 == pytest.approx((per_batch[0] * 4 + per_batch[1] * 6) / 10)
    np.testing.assert_array_equal(
        stats["e"].channel_absmax, np.abs(arrays["table"][[1, 4, 9, 0, 19, 3, 7, 2]]).max(axis=0)
    )
    assert stats["y"].channel_absmax.shape == (6,)  # a graph output: read as it is
    y = np.concatenate(h) @ arrays["w"]
    np.testing.assert_allclose(stats["y"].channel_absmax, np.abs(y).max(axis=0), rtol=1e-5)
    assert stats["h"].to_dict() == {
        "absmax": got.absmax,
        "percentile_99_9": got.percentile_99_9,
        "channels": 5,
        "count": 10,
    }

    assert ir.serde.serialize_model(model.model).SerializeToString() == before
    assert [v.name for v in model.graph.outputs] == ["y"]


def test_stats_update_matches_stats_of_everything():
    rng = np.random.default_rng(3)
    parts = [rng.standard_normal((1, n, 4)).astype(np.float32) for n in (3, 5)]
    merged = ActivationStats.of(parts[0])
    merged.update(parts[1])
    whole = ActivationStats.of(np.concatenate(parts, axis=1))

    assert merged.absmax == whole.absmax and merged.count == whole.count == 8
    np.testing.assert_array_equal(merged.channel_absmax, whole.channel_absmax)
    with pytest.raises(CompileError, match="3 channels"):
        merged.update(np.ones((2, 3), dtype=np.float32))


def test_unknown_tensor_names_are_refused():
    model, _ = _hand_written()
    with pytest.raises(CompileError, match="'nowhere'"):
        collect_activation_stats(model, [np.array([[1, 2]])], ["h", "nowhere"])
    assert collect_activation_stats(model, [np.array([[1, 2]])], []) == {}


# --- a real (tiny) model ----------------------------------------------------------------------


def test_q_proj_input_stats_match_pytorch(llama):
    import torch

    model = llama.fdec_model
    spec = model.spec
    roles = matmul_activation_inputs(
        model, ["layers.0.q", "layers.0.k", "layers.0.v", "layers.0.o", "embed", "nothing"]
    )
    assert set(roles) == {"layers.0.q", "layers.0.k", "layers.0.v", "layers.0.o"}
    assert roles["layers.0.q"] == roles["layers.0.k"] == roles["layers.0.v"] != roles["layers.0.o"]
    every = matmul_activation_inputs(model)
    # As imported, the lm_head is the embedding table (read by Gather too): not a plain weight.
    assert len(every) == 7 * spec.num_layers
    assert "embed" not in every and "lm_head" not in every
    batches = calibration_batches(load_calibration_texts(None), llama.tokenizer, spec.vocab_size)
    name = roles["layers.0.q"]

    stats = collect_activation_stats(model, batches[:4], [name])[name]

    seen: list[np.ndarray] = []
    q_proj = llama.hf_model.model.layers[0].self_attn.q_proj
    hook = q_proj.register_forward_hook(lambda mod, args, out: seen.append(args[0].numpy()))
    try:
        with torch.no_grad():
            for ids in batches[:4]:
                llama.hf_model(input_ids=torch.from_numpy(ids))
    finally:
        hook.remove()
    want = np.abs(np.concatenate(seen, axis=1))[0]  # [4 · 128, hidden]
    assert stats.count == 4 * 128
    assert stats.channel_absmax.shape == (spec.hidden_size,)
    np.testing.assert_allclose(stats.channel_absmax, want.max(axis=0), rtol=1e-4)
    assert stats.absmax == pytest.approx(float(want.max()), rel=1e-4)
    assert 0 < stats.percentile_99_9 < stats.absmax
    captured = capture_activations(model, batches[0], [name])[name]
    np.testing.assert_allclose(captured, seen[0], rtol=1e-4, atol=1e-5)


# --- the statistics cache ---------------------------------------------------------------------


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(
        a[n].absmax == b[n].absmax
        and a[n].count == b[n].count
        and a[n].percentile_99_9 == b[n].percentile_99_9
        and np.array_equal(a[n].channel_absmax, b[n].channel_absmax)
        for n in a
    )


def test_cached_stats_are_reused_exactly_and_keyed_by_model_and_batches(tmp_path):
    from fdec.calibrate import calibration_cache

    model, arrays = _hand_written()
    batches = [np.array([[1, 4, 4, 9]]), np.array([[0, 19, 3, 3, 7, 2]])]
    fresh = collect_activation_stats(model, batches, ["h", "y"])
    with calibration_cache(tmp_path / "c") as cache:
        first = collect_activation_stats(model, batches, ["h", "y"])
        second = collect_activation_stats(model, batches, ["h", "y"])
        assert (cache.hits, cache.misses) == (1, 1)
        assert _same(first, fresh) and _same(second, fresh)
        # Other batches, other names, or other weights: other entries.
        collect_activation_stats(model, batches[:1], ["h", "y"])
        collect_activation_stats(model, batches, ["h"])
        model.graph.initializers["gain"].const_value = ir.tensor(arrays["gain"] * 2)
        doubled = collect_activation_stats(model, batches, ["h", "y"])
        assert (cache.hits, cache.misses) == (1, 4)
        assert doubled["h"].absmax == pytest.approx(2 * fresh["h"].absmax)
    assert len(list((tmp_path / "c").glob("*.npz"))) == 4


def test_a_corrupt_cache_entry_is_detected_and_recomputed(tmp_path):
    from fdec.calibrate import calibration_cache

    model, _ = _hand_written()
    batches = [np.array([[1, 4, 4, 9]])]
    with calibration_cache(tmp_path) as cache:
        fresh = collect_activation_stats(model, batches, ["h"])
    (entry,) = tmp_path.glob("*.npz")
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.write_bytes(bytes(data))
    with calibration_cache(tmp_path) as cache:
        again = collect_activation_stats(model, batches, ["h"])
        assert (cache.hits, cache.misses, cache.corrupt) == (0, 1, 1)
        assert _same(again, fresh)
        assert _same(collect_activation_stats(model, batches, ["h"]), fresh)
        assert cache.hits == 1  # rewritten whole


def test_calibration_sessions_read_large_weights_from_the_models_own_arrays(monkeypatch):
    import fdec.calibrate as calibrate

    model, arrays = _hand_written()
    # The IR holding numpy memory, as the exporter's tensors hold PyTorch's.
    model.graph.initializers["w"].const_value = ir.Tensor(arrays["w"], name="w")
    batches = [np.array([[1, 4, 4, 9]])]
    # Every float weight counts as large here (SmolLM2's are 1 MB and more).
    monkeypatch.setattr(calibrate, "_IN_MEMORY_MIN_BYTES", 0)
    runner = calibrate.ActivationRunner(model, ["h", "y"])
    try:
        pinned = runner.session.fdec_initializers
        assert set(pinned) == {"table", "gain", "w"}
        # ORT computes with the IR's memory, not a copy read from the saved file.
        assert pinned["w"].data_ptr() == arrays["w"].ctypes.data
        got = runner.run(batches[0])
    finally:
        runner.close()
    h = arrays["table"][batches[0][0]] * arrays["gain"]
    np.testing.assert_allclose(got["y"][0], h @ arrays["w"], rtol=1e-6)
