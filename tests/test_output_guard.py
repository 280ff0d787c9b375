"""`-o` never destroys what fdec did not write: real `fdec` subprocesses on a tiny model.

Each case records the sha256 of every file the user had, runs the command, and checks the exit
code, the one-line message and that every byte is still there. Replacing an empty folder or a
previous fdec build still works, and `--force` replaces a user's folder only after listing it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from models import make_tiny_model

_FDEC = [sys.executable, "-m", "fdec.cli"]


def _fdec(*args: str, cwd: pathlib.Path | None = None, home: pathlib.Path | None = None):
    env = dict(os.environ)
    if home is not None:
        env["HOME"] = str(home)
    return subprocess.run(
        [*_FDEC, *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env
    )


def _hashes(folder: pathlib.Path) -> dict[str, str]:
    """Every file (and link) under folder, with the sha256 of its bytes."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(
            os.readlink(p).encode() if p.is_symlink() else p.read_bytes()
        ).hexdigest()
        for p in folder.rglob("*")
        if p.is_symlink() or p.is_file()
    }


def _user_folder(path: pathlib.Path) -> pathlib.Path:
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("precious\n")
    (path / "sub" / "data.bin").write_bytes(os.urandom(64))
    return path


def _compile(model: pathlib.Path, out: pathlib.Path | str, *extra: str, **kwargs):
    return _fdec("compile", str(model), "--quantize", "none", "-o", str(out), *extra, **kwargs)


def _refused(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, done.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> pathlib.Path:
    return make_tiny_model(tmp_path_factory.mktemp("guard") / "tiny-llama", "llama")


def test_user_folder_with_files_is_refused(model, tmp_path):
    notes = _user_folder(tmp_path / "notes")
    before = _hashes(notes)
    _refused(_compile(model, notes), "holds files fdec did not write", "notes.txt", "--force")
    assert _hashes(notes) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]  # no staging left either


def test_current_directory_is_refused_even_with_force(model, tmp_path):
    here = _user_folder(tmp_path / "work")
    before = _hashes(here)
    _refused(_compile(model, ".", cwd=here), "the current directory")
    _refused(_compile(model, ".", "--force", cwd=here), "the current directory")
    _refused(_compile(model, "..", "--force", cwd=here), "holds the current directory")
    assert _hashes(here) == before


def test_home_directory_is_refused(model, tmp_path):
    home = _user_folder(tmp_path / "home")
    before = _hashes(home)
    _refused(_compile(model, home, home=home), "your home directory")
    _refused(_compile(model, home, "--force", home=home), "your home directory")
    assert _hashes(home) == before


def test_source_model_folder_is_refused_even_with_force(model, tmp_path):
    before = _hashes(model)
    _refused(_compile(model, model), "where", str(model))
    _refused(_compile(model, model, "--force"), str(model))
    # its parent holds it: replacing that would delete the model too
    _refused(_compile(model, model.parent, "--force"), "holds", str(model))
    assert _hashes(model) == before


def test_cache_folder_is_refused(model, tmp_path):
    cache = _user_folder(tmp_path / "cache")
    before = _hashes(cache)
    _refused(_compile(model, cache, "--force", "--cache-dir", str(cache)), str(cache))
    assert _hashes(cache) == before


def test_a_file_is_refused(model, tmp_path):
    file = tmp_path / "build.txt"
    file.write_text("not a folder\n")
    _refused(_compile(model, file, "--force"), "is a file")
    assert file.read_text() == "not a folder\n"


def test_symlink_to_a_folder_is_refused(model, tmp_path):
    notes = _user_folder(tmp_path / "notes")
    link = tmp_path / "link"
    link.symlink_to(notes)
    before = _hashes(tmp_path)
    _refused(_compile(model, link), "symbolic link", str(notes))
    _refused(_compile(model, link, "--force"), "symbolic link")
    assert _hashes(tmp_path) == before
    assert link.is_symlink() and os.readlink(link) == str(notes)


def test_empty_folder_then_previous_build_are_replaced(model, tmp_path):
    out = tmp_path / "build"
    out.mkdir()
    first = _compile(model, out, "-q")
    assert first.returncode == 0, first.stderr[-2000:]
    assert (out / "fdec-build.json").is_file()
    (out / "bench.json").write_text("{}")  # written into a build after it: still fdec's
    again = _compile(model, out, "-q")
    assert again.returncode == 0, again.stderr[-2000:]
    assert _fdec("verify", str(out)).returncode == 0
    # a build the user added a file to is no longer only fdec's
    (out / "my-notes.md").write_text("mine\n")
    before = _hashes(out)
    _refused(_compile(model, out), "holds files fdec did not write", "my-notes.md")
    assert _hashes(out) == before


def test_force_lists_what_it_removes_then_replaces(model, tmp_path):
    notes = _user_folder(tmp_path / "notes")
    done = _compile(model, notes, "--force", "-q")
    assert done.returncode == 0, done.stderr[-2000:]
    warning = [line for line in done.stderr.splitlines() if "--force" in line]
    assert len(warning) == 1 and "notes.txt" in warning[0] and "sub/data.bin" in warning[0]
    assert (notes / "fdec-build.json").is_file() and not (notes / "notes.txt").exists()


def test_multi_target_refuses_a_user_folder_per_target(model, tmp_path):
    out = tmp_path / "out"
    mine = _user_folder(out / "rtx4090")
    before = _hashes(mine)
    done = _compile(model, out, "--target", "cpu,rtx4090", "--json")
    assert done.returncode == 2, done.stderr[-2000:]
    rows = {row["target"]: row for row in json.loads(done.stdout)["targets"]}
    assert rows["cpu"]["ok"] and (out / "cpu" / "fdec-build.json").is_file()
    assert (
        not rows["rtx4090"]["ok"] and "holds files fdec did not write" in rows["rtx4090"]["error"]
    )
    assert _hashes(mine) == before


def test_distill_output_is_guarded(model, tmp_path):
    notes = _user_folder(tmp_path / "notes")
    before = _hashes(notes)
    _refused(_fdec("distill", str(model), "--steps", "1", "-o", str(notes)), "notes.txt")
    assert _hashes(notes) == before


def test_cache_clear_refuses_a_folder_that_is_not_a_cache(tmp_path):
    notes = _user_folder(tmp_path / "notes")
    (notes / "calibration").mkdir()
    (notes / "calibration" / "mine.csv").write_text("1,2\n")
    before = _hashes(notes)
    _refused(_fdec("cache", "clear", "--all", "--cache-dir", str(notes)), "not fdec's cache")
    assert _hashes(notes) == before


def test_build_engine_refuses_a_folder_that_is_not_a_build(tmp_path):
    notes = _user_folder(tmp_path / "notes")
    before = _hashes(notes)
    _refused(_fdec("build-engine", str(notes)), "not an fdec build")
    assert _hashes(notes) == before


def test_broken_tokenizer_is_refused_not_shipped(model, tmp_path):
    broken = tmp_path / "broken-tokenizer"
    shutil.copytree(model, broken)
    (broken / "tokenizer.json").write_text("{not json")
    out = tmp_path / "build"
    _refused(_compile(broken, out), "tokenizer.json", "not a readable JSON file")
    assert not out.exists()
    # valid JSON that is no tokenizer: refused when it is loaded, still before any build
    (broken / "tokenizer.json").write_text('{"model": 3}')
    _refused(_compile(broken, out), "tokenizer", "does not load")
    assert not out.exists()
