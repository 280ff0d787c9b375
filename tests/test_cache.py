"""fdec's content-addressed cache and deterministic builds: a second identical compile takes its
export, reference and every pass from the cache and writes the same bytes; a changed pass
option re-runs that pass and the ones after it; a damaged entry is detected and rebuilt;
--no-cache writes nothing; `fdec verify` re-hashes a build."""

from __future__ import annotations

import json
import multiprocessing
import os
import pathlib
import shutil

import pytest

from fdec.cache import ENTRIES, ENTRY_MANIFEST, Cache, DigestIndex, digest_of, fingerprint
from fdec.cli import cli
from fdec.compile import CompileOptions, compile_model
from fdec.errors import QualityGateError

# Files whose bytes must not depend on the cache (report.json/.html and the manifest carry
# timings and cache figures).
_VOLATILE = {"report.json", "report.html", "fdec-build.json"}
# Report keys that may differ between a cold and a cached build: timings and cache provenance.
_TIMING_KEYS = {"wall_s", "cached", "cached_wall_s", "cache", "export", "calibration_cache"}


def _compile(model, out, cache, *args, progress=None):
    messages: list[str] = []
    options = CompileOptions(
        model=str(model), out=out, cache_dir=cache, quantize="int4", **dict(args)
    )
    result = compile_model(options, progress or messages.append)
    return result.report, messages


def _outputs(out: pathlib.Path) -> dict[str, str]:
    outputs = json.loads((out / "fdec-build.json").read_text())["outputs"]
    return {name: info["sha256"] for name, info in outputs.items() if name not in _VOLATILE}


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in _TIMING_KEYS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _flip_byte(path: pathlib.Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


def _entries(cache: pathlib.Path, kind: str) -> list[pathlib.Path]:
    found = []
    for path in sorted((cache / ENTRIES).iterdir()):
        manifest = path / ENTRY_MANIFEST
        if manifest.is_file() and json.loads(manifest.read_text())["kind"] == kind:
            found.append(path)
    return found


@pytest.fixture(scope="module")
def builds(tiny_models, tmp_path_factory):
    """A cold int4 (--keep-fp 1) compile and the same compile again, sharing one cache."""
    root = tmp_path_factory.mktemp("cached-builds")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(root / "xdg"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        model = tiny_models("llama")
        cold, _ = _compile(model, root / "cold", root / "cache", ("keep_fp", 1))
        warm, messages = _compile(model, root / "warm", root / "cache", ("keep_fp", 1))
    return {
        "root": root, "model": model, "cache": root / "cache", "cold": cold, "warm": warm,
        "warm_messages": messages,
    }  # fmt: skip


def test_second_compile_takes_everything_from_the_cache_and_writes_the_same_bytes(builds):
    cold, warm = builds["cold"], builds["warm"]
    assert "quantize-mixed" in cold["pipeline"]
    assert [p["cached"] for p in cold["passes"]] == [False] * len(cold["pipeline"])
    assert cold["export"]["cached"] is False and cold["cache"]["reference"] is False
    assert [p["cached"] for p in warm["passes"]] == [True] * len(warm["pipeline"])
    assert warm["export"]["cached"] is True and warm["cache"]["reference"] is True
    assert warm["cache"]["passes_cached"] == len(warm["pipeline"])
    assert all(p["wall_s"] == 0.0 and p["cached_wall_s"] >= 0 for p in warm["passes"])
    # `fdec report` marks each pass taken from the cache; the cold build's passes ran.
    from fdec.report import render_report

    assert render_report(warm).count(" cached") == len(warm["pipeline"])
    assert " cached" not in render_report(cold)
    # Nothing was exported or run with PyTorch the second time.
    steps = builds["warm_messages"]
    assert not any(m.startswith(("loading", "exporting", "computing", "pass ")) for m in steps)
    assert "ONNX export taken from the cache" not in steps  # not even read: the passes were
    # Byte-identical model files, the same report figures apart from timings, and the build is
    # still verified against the (cached) reference.
    cold_out, warm_out = builds["root"] / "cold", builds["root"] / "warm"
    assert _outputs(cold_out) == _outputs(warm_out)
    assert {"model.onnx", "model.onnx.data", "fdec-runtime.json"} <= set(_outputs(warm_out))
    assert _without_timings(cold) | {"outputs": None} == _without_timings(warm) | {"outputs": None}
    assert warm["verification"]["ok"] is True
    assert warm["verification"]["numeric"] == cold["verification"]["numeric"]
    # The cached export keeps the spec as import made it, roles in their order (passes walk
    # them in order; a sorted spec changed the calibration statistics' key).
    keys = json.loads((warm_out / "fdec-build.json").read_text())["cache_keys"]
    stored = json.loads((builds["cache"] / ENTRIES / keys["export"] / "spec.json").read_text())
    assert list(stored["weights"])[:2] == ["embed", "lm_head"]
    assert list(stored["weights"]) != sorted(stored["weights"])
    manifest = json.loads((warm_out / "fdec-build.json").read_text())
    assert set(manifest["inputs"]["files"]) >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    }
    assert manifest["inputs"]["calibration"]["source"] == "built-in corpus"
    assert manifest["versions"]["packages"]["torch"] and manifest["versions"]["fdec_code"]
    assert [p["name"] for p in manifest["passes"]] == warm["pipeline"]


def test_changing_one_pass_option_reruns_that_pass_and_the_ones_after_it(builds):
    report, _ = _compile(builds["model"], builds["root"] / "keep2", builds["cache"], ("keep_fp", 2))
    changed = report["pipeline"].index("quantize-mixed")
    assert 0 < changed < len(report["pipeline"]) - 1
    cached = [p["cached"] for p in report["passes"]]
    assert cached == [True] * changed + [False] * (len(cached) - changed)
    assert report["export"]["cached"] is True and report["cache"]["reference"] is True
    mixed = report["passes"][changed]
    assert mixed["options"]["keep_fp"] == 2 and len(mixed["stats"]["kept"]) == 2
    assert (
        _outputs(builds["root"] / "keep2")["model.onnx.data"]
        != (_outputs(builds["root"] / "cold")["model.onnx.data"])
    )


def test_a_damaged_entry_is_reported_once_deleted_and_rebuilt(builds):
    cache = builds["cache"]
    # The model the last pass left: the entry every resume of this pipeline needs.
    manifest = json.loads((builds["root"] / "cold" / "fdec-build.json").read_text())
    key = manifest["cache_keys"]["passes"][-1]
    last = json.loads((cache / ENTRIES / key / ENTRY_MANIFEST).read_text())
    damaged = cache / ENTRIES / last["meta"]["model"]
    _flip_byte(damaged / "model.onnx.data")
    messages: list[str] = []
    report, _ = _compile(
        builds["model"],
        builds["root"] / "repaired",
        cache,
        ("keep_fp", 1),
        progress=messages.append,
    )
    reports = [m for m in messages if "damaged" in m]
    assert len(reports) == 1 and damaged.name[:12] in reports[0], messages
    assert "model.onnx.data" in reports[0]
    assert report["cache"]["corrupt"] and not report["passes"][-1]["cached"]
    # The same build as from a clean cache, and the entry was rebuilt whole.
    assert _outputs(builds["root"] / "repaired") == _outputs(builds["root"] / "cold")
    assert Cache(cache).get(damaged.name, "model") is not None
    again, _ = _compile(builds["model"], builds["root"] / "again", cache, ("keep_fp", 1))
    assert all(p["cached"] for p in again["passes"]) and not again["cache"]["corrupt"]


def test_no_cache_writes_nothing_and_builds_the_same_bytes(builds, cli_runner):
    cache = builds["root"] / "unused-cache"
    out = builds["root"] / "uncached"
    result = cli_runner.invoke(cli, [
        "compile", str(builds["model"]), "--quantize", "int4", "--keep-fp", "1", "-o", str(out),
        "--cache-dir", str(cache), "--no-cache", "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    summary = json.loads(result.stdout)
    assert not any(p["cached"] for p in summary["passes"])
    assert not cache.exists()
    assert _outputs(out) == _outputs(builds["root"] / "cold")


def test_quality_gate_measures_layers_when_the_lossy_pass_came_from_the_cache(
    tiny_models, tmp_path
):
    model, cache = tiny_models("llama"), tmp_path / "cache"
    # All 4-bit: with the default 8-bit head the tiny llama's perplexity falls, and no gate fails.
    four = ("pass_options", {"quantize-int4": {"lm_head_bits": 4}})
    _compile(model, tmp_path / "first", cache, four)
    messages: list[str] = []
    with pytest.raises(QualityGateError) as failed:
        _compile(
            model,
            tmp_path / "gated",
            cache,
            four,
            ("max_ppl_increase", 0.0),
            progress=messages.append,
        )
    assert any("taken from the cache" in m for m in messages), messages
    assert not any(m.startswith("pass ") for m in messages), messages
    worst = failed.value.details["worst_layers"]
    assert {row["unit"] for row in worst} == {"layers.0", "layers.1", "lm_head"}
    assert not (tmp_path / "gated").exists()


def test_fdec_verify_passes_on_a_build_and_names_the_first_file_that_differs(
    builds, tmp_path, cli_runner
):
    build = tmp_path / "build"
    shutil.copytree(builds["root"] / "cold", build)
    ok = cli_runner.invoke(cli, ["verify", str(build)])
    assert ok.exit_code == 0, ok.output + ok.stderr
    assert ok.stdout.startswith("OK ") and len(ok.stdout.strip().splitlines()) == 1
    _flip_byte(build / "model.onnx.data")
    changed = cli_runner.invoke(cli, ["verify", str(build)])
    assert changed.exit_code == 1
    assert "model.onnx.data changed" in changed.stderr
    as_json = json.loads(cli_runner.invoke(cli, ["verify", str(build), "--json"]).stdout)
    assert as_json["ok"] is False
    assert as_json["problems"] == [
        {"file": "model.onnx.data", "problem": "changed",
         "detail": "its sha256 differs from the manifest's"},
    ]  # fmt: skip
    (build / "fdec-runtime.json").unlink()
    (build / "notes.txt").write_text("hand edit")
    problems = json.loads(cli_runner.invoke(cli, ["verify", str(build), "--json"]).stdout)
    assert [(p["file"], p["problem"]) for p in problems["problems"]] == [
        ("fdec-runtime.json", "missing"), ("model.onnx.data", "changed"), ("notes.txt", "extra"),
    ]  # fmt: skip
    not_a_build = cli_runner.invoke(cli, ["verify", str(tmp_path)])
    assert not_a_build.exit_code == 2 and "fdec-build.json" in not_a_build.stderr


# --- the store itself --------------------------------------------------------------------------


def _write(size: int, seed: int = 0):
    def write(folder: pathlib.Path) -> None:
        (folder / "blob.bin").write_bytes(bytes((seed + i) % 251 for i in range(size)))
        (folder / "note.json").write_text(json.dumps({"seed": seed}))

    return write


def test_entries_are_checked_when_read(tmp_path):
    cache = Cache(tmp_path)
    key = digest_of("test", value=1)
    assert cache.get(key, "blob") is None
    assert cache.put(key, "blob", _write(5000), {"note": "x"})
    entry = cache.get(key, "blob")
    assert entry.meta == {"note": "x"} and entry.bytes > 5000
    _flip_byte(entry.path / "blob.bin", 4321)
    messages: list[str] = []
    checking = Cache(tmp_path, progress=messages.append)
    assert checking.get(key, "blob") is None
    assert len(messages) == 1 and "blob.bin" in messages[0]
    assert not (tmp_path / ENTRIES / key).exists()  # deleted, so reported once
    assert checking.get(key, "blob") is None and len(messages) == 1
    # An extra file, a missing file, or an entry of another kind are damage too.
    cache.put(key, "blob", _write(10))
    (tmp_path / ENTRIES / key / "stray").write_text("?")
    assert Cache(tmp_path).get(key, "blob") is None
    cache.put(key, "blob", _write(10))
    assert Cache(tmp_path).get(key, "other kind") is None


_SHARED_KEY = "5" * 64


def _put_same_key(folder: str, seed: int) -> bool:
    return Cache(pathlib.Path(folder)).put(_SHARED_KEY, "blob", _write(200_000, seed=0))


def test_concurrent_writers_of_one_key_are_harmless(tmp_path):
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        stored = pool.starmap(_put_same_key, [(str(tmp_path), n) for n in range(8)])
    assert all(stored)
    entry = Cache(tmp_path).get(_SHARED_KEY, "blob")
    assert entry is not None
    assert [p.name for p in (tmp_path / ENTRIES).iterdir()] == [_SHARED_KEY]  # no leftovers
    assert Cache(tmp_path).get("../" + _SHARED_KEY[3:], "blob") is None  # keys are hex digests


def test_least_recently_used_entries_go_first_under_the_size_cap(tmp_path):
    writer = Cache(tmp_path)
    keys = [digest_of("test", n=n) for n in range(4)]
    for n, key in enumerate(keys):
        writer.put(key, "blob", _write(100_000, seed=n))
        os.utime(tmp_path / ENTRIES / key / ENTRY_MANIFEST, (1000 + n, 1000 + n))
    reader = Cache(tmp_path, max_gb=250_000 / 1e9)
    assert reader.get(keys[0], "blob") is not None  # now the most recently used
    reader.finish()
    assert reader.evicted == 2
    assert sorted(p.name for p in (tmp_path / ENTRIES).iterdir()) == sorted([keys[0], keys[3]])


def test_weight_digests_are_remembered_until_the_file_changes(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"w" * 10_000)
    first = DigestIndex(tmp_path / "cache")
    assert first.sha256(weights) and first.hashed == 1
    first.save()
    # Written within the last seconds: its mtime could still change within one clock tick, so
    # it is not remembered yet (git's "racy" files).
    racy = DigestIndex(tmp_path / "cache")
    assert racy.sha256(weights) and (racy.hashed, racy.remembered) == (1, 0)
    past = 1_600_000_000 * 10**9
    os.utime(weights, ns=(past, past))
    digest = first.sha256(weights)
    first.save()
    second = DigestIndex(tmp_path / "cache")
    assert second.sha256(weights) == digest and (second.hashed, second.remembered) == (0, 1)
    weights.write_bytes(b"v" * 10_000)  # same size, new content and mtime
    assert second.sha256(weights) != digest and second.hashed == 1


def test_keys_follow_every_option_and_array_byte():
    import numpy as np

    batches = [np.arange(8, dtype=np.int64).reshape(1, 8)]
    base = digest_of("pass", options=fingerprint({"bits": 4, "batches": batches}))
    same = digest_of("pass", options=fingerprint({"batches": list(batches), "bits": 4}))
    assert base == same
    changed = [np.arange(8, dtype=np.int64).reshape(1, 8)]
    changed[0][0, 3] = 99
    assert digest_of("pass", options=fingerprint({"bits": 4, "batches": changed})) != base
    assert digest_of("pass", options=fingerprint({"bits": 8, "batches": batches})) != base
