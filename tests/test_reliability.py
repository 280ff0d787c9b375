"""Reliability: concurrent compiles, Ctrl-C and kill -9, and the rest of the bad-input matrix.

Everything here runs the real `fdec` entry point in subprocesses on tiny random models: locks are
per process, and signals need a process to hit.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from gguf_models import make_tiny_gguf
from models import make_tiny_model

from fdec.build import FileLock, build_lock
from fdec.cli import cli

_PY = [sys.executable, "-m", "fdec.cli"]
# fp32 builds with a short cleanup pipeline: the fastest compile, exact verification, and
# independent of which passes the default pipeline holds (these tests are about the build folder).
# --no-cache: these tests wait for progress lines (export, passes) a cached rebuild skips.
FP32 = ["--quantize", "none", "--passes", "fold-constants,cse,remove-dead-nodes", "--no-cache"]


class _Fdec:
    """`fdec ARGS` in a subprocess, with stderr collected line by line as it comes."""

    def __init__(self, *args: str, preexec_fn=None):
        self.proc = subprocess.Popen(
            [*_PY, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=preexec_fn,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.finish()
                raise AssertionError(f"never saw {text!r}: {self.stderr}")
            time.sleep(0.01)

    def finish(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def messages(self) -> list[str]:
        """stderr without progress lines (and the blank line click prints on Ctrl-C)."""
        return [line for line in self.lines if line.strip() and not line.startswith("[fdec ")]


def _run(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*_PY, *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def _snapshot(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _leftovers(out: pathlib.Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}"))


def _assert_whole_build(out: pathlib.Path, family: str) -> None:
    """Every file the manifest lists has its hash, nothing else is there, from one model."""
    manifest = json.loads((out / "fdec-build.json").read_text())
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files == {*manifest["outputs"], "fdec-build.json"}
    for name, info in manifest["outputs"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == info["sha256"], name
    report = json.loads((out / "report.json").read_text())
    assert report["source"]["family"] == family
    assert report["verification"]["ok"] is True


@pytest.fixture
def previous_build(tiny_models, tmp_path):
    out = tmp_path / "build"
    done = _run("compile", str(tiny_models("llama")), "-o", str(out), "-q", *FP32)
    assert done.returncode == 0, done.stderr
    return out


# --- concurrency ----------------------------------------------------------------------------


def test_two_compiles_into_one_folder_take_turns(tiny_models, tmp_path):
    out = tmp_path / "build"
    first = _Fdec("compile", str(tiny_models("llama")), "-o", str(out), *FP32)
    first.wait_for("loading ")  # holds the lock from here to the end
    second = _Fdec("compile", str(tiny_models("gpt2")), "-o", str(out), *FP32)
    second.wait_for(f"waiting for another compile (pid {first.proc.pid}) writing {out}")
    assert first.finish() == 0, first.stderr
    _assert_whole_build(out, "llama")
    assert second.finish() == 0, second.stderr
    _assert_whole_build(out, "gpt2")  # replaced whole, after the first finished
    assert _leftovers(out) == []  # no staging folders, no lock file


def test_no_wait_fails_in_one_line_and_writes_nothing(previous_build, tiny_models):
    before = _snapshot(previous_build)
    with build_lock(previous_build):  # this process plays the compile already running
        busy = _Fdec("compile", str(tiny_models("gpt2")), "-o", str(previous_build), "--no-wait")
        assert busy.finish() == 1
        assert busy.messages() == [
            f"error: another compile (pid {os.getpid()}) is writing {previous_build}; wait for "
            "it to finish, or drop --no-wait to queue behind it"
        ]
        assert _snapshot(previous_build) == before
        # Without --no-wait the compile queues and writes nothing while the lock is held.
        waiting = _Fdec("compile", str(tiny_models("gpt2")), "-o", str(previous_build), *FP32)
        waiting.wait_for("waiting for another compile")
        time.sleep(1)
        assert waiting.proc.poll() is None
        assert _snapshot(previous_build) == before
    assert waiting.finish() == 0, waiting.stderr
    _assert_whole_build(previous_build, "gpt2")
    assert _leftovers(previous_build) == []


def test_file_lock_survives_the_holder_removing_its_file(tmp_path):
    """A waiter that opened the old lock file retakes the lock on the new one (inode check)."""
    path = tmp_path / "x.lock"
    with FileLock(path):
        assert path.read_text() == str(os.getpid())
        with FileLock(path):  # re-entrant within a process
            pass
        assert path.exists()
    assert not path.exists()
    stale = os.open(path, os.O_RDWR | os.O_CREAT)  # a waiter's descriptor on a file...
    path.unlink()  # ...that the holder removed on release
    with FileLock(path):
        assert os.fstat(stale).st_ino != path.stat().st_ino
    os.close(stale)


def test_two_compiles_share_the_gguf_cache(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "FDEC_CACHE_DIR": str(cache)}
    gguf = make_tiny_gguf(tmp_path / "model" / "tiny.gguf", seed=3)
    key = hashlib.sha256(gguf.read_bytes()).hexdigest()[:24]
    (cache / "gguf").mkdir(parents=True)
    # Hold the entry's lock so both compiles are certainly inside the cache step at once.
    with FileLock(cache / "gguf" / f"{key}.lock"):
        runs = [
            subprocess.Popen(
                [*_PY, "compile", str(gguf), "-o", str(tmp_path / f"b{i}"), *FP32],
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for i in range(2)
        ]
        deadline = time.monotonic() + 120
        waiting = set()
        while len(waiting) < 2 and time.monotonic() < deadline:
            for i, run in enumerate(runs):
                line = run.stderr.readline() if i not in waiting else ""
                if "waiting for another compile" in line and "cache entry for tiny.gguf" in line:
                    waiting.add(i)
        assert waiting == {0, 1}
    stderr = [run.communicate(timeout=300)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], stderr
    assert sum(text.count("converting tiny.gguf") for text in stderr) == 1  # one converted
    entry = cache / "gguf" / key
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == [key]  # no temp, no lock
    for i in range(2):
        report = json.loads((tmp_path / f"b{i}" / "report.json").read_text())
        assert report["source"]["folder"] == str(entry)
        assert report["verification"]["ok"] is True

    # A damaged entry (same size, flipped bytes) is found by its hash and converted again.
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(255 - b for b in data[-64:])
    weights.write_bytes(bytes(data))
    again = _run("compile", str(gguf), "-o", str(tmp_path / "b2"), *FP32, env=env)
    assert again.returncode == 0, again.stderr
    assert "is damaged or incomplete; converting again" in again.stderr
    assert weights.read_bytes() != bytes(data)
    manifest = json.loads((entry / "fdec-cache.json").read_text())["files"]
    assert (
        hashlib.sha256(weights.read_bytes()).hexdigest() == manifest["model.safetensors"]["sha256"]
    )
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == [key]


# --- interruptions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sig", "at", "code", "word"),
    [
        (signal.SIGINT, "exporting to ONNX", 130, "interrupted"),
        (signal.SIGINT, "verifying the build", 130, "interrupted"),
        (signal.SIGTERM, "pass 1/", 143, "terminated"),
    ],
)
def test_ctrl_c_prints_one_line_and_keeps_previous_build(
    previous_build, tiny_models, sig, at, code, word
):
    before = _snapshot(previous_build)
    run = _Fdec("compile", str(tiny_models("gpt2")), "-o", str(previous_build), *FP32)
    run.wait_for(at)
    run.proc.send_signal(sig)
    assert run.finish() == code, run.stderr
    assert run.messages() == [f"{word}; any previous build is unchanged"], run.stderr
    assert _snapshot(previous_build) == before
    assert _leftovers(previous_build) == []  # cleaned on the way out, lock released


def _staging_written(out: pathlib.Path) -> bool:
    return any((p / "model.onnx").exists() for p in out.parent.glob(f".{out.name}.fdec-tmp-*"))


def test_kill_9_at_several_points_then_rerun(previous_build, tiny_models, tmp_path):
    """kill -9 during export, the passes, calibration, the writing and verification: the
    previous build stays byte for byte; the next compile cleans the leftovers and writes a
    whole build."""
    before = _snapshot(previous_build)
    model = str(tiny_models("gpt2"))
    points = [
        ("exporting to ONNX", FP32),
        ("pass 1/", FP32),
        ("tokenizing calibration text", ["--quantize", "int4-awq", "--no-cache"]),
        ("writing", FP32),  # the staging folder holds model.onnx
        ("verifying the build", FP32),
    ]
    killed_with_staging = 0
    for at, recipe in points:
        run = _Fdec("compile", model, "-o", str(previous_build), *recipe)
        if at == "writing":
            deadline = time.monotonic() + 180
            while not _staging_written(previous_build):
                assert run.proc.poll() is None and time.monotonic() < deadline, run.stderr
                time.sleep(0.002)
        else:
            run.wait_for(at)
        run.proc.kill()
        assert run.finish() == -signal.SIGKILL
        assert _snapshot(previous_build) == before, at
        killed_with_staging += bool(_staging_written(previous_build))
    assert killed_with_staging >= 2  # the kills while writing/verifying left staging folders
    assert f".{previous_build.name}.fdec-lock" in _leftovers(previous_build)

    rerun = _run("compile", model, "-o", str(previous_build), *FP32)
    assert rerun.returncode == 0, rerun.stderr
    _assert_whole_build(previous_build, "gpt2")
    assert _leftovers(previous_build) == []


# --- bad input not covered by test_bad_input.py ---------------------------------------------


def _expect_error(cli_runner, args, *, words, out, code=2):
    result = cli_runner.invoke(cli, args)
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    lines = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and not line.startswith("[fdec ")
    ]
    assert len(lines) == 1, result.stderr  # one line, no traceback
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not out.exists()
    assert [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []
    return lines[0]


def test_damaged_build_files_are_named_in_one_line(previous_build, tmp_path, cli_runner):
    """fdec run / bench / report / build-engine on a build whose JSON files or weights were
    damaged died with internal JSONDecodeError, TypeError or ONNX Runtime's Fail (fdec verify
    names the changed file, exit 1, as before)."""
    import shutil

    from fdec.cli import cli

    def refused(build, words, *commands):
        for command in commands:
            result = cli_runner.invoke(cli, [command[0], str(build), *command[1:]])
            lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
            assert result.exit_code == 2, (command, result.output, result.stderr)
            assert len(lines) == 1 and words in lines[0], (command, result.stderr)
            assert f"fdec verify {build}" in lines[0]

    run, bench = ["run", "-p", "hi", "-n", "2"], ["bench", "--batch", "1", "--rounds", "1"]
    for name, text, commands in (
        ("fdec-runtime.json", "{", (run, bench)),
        ("report.json", "[1, 2]", (["report"], ["build-engine"])),
        ("fdec-build.json", "{", (["build-engine"],)),
    ):
        build = tmp_path / name
        shutil.copytree(previous_build, build)
        (build / name).write_text(text)
        refused(build, f"{build / name} is damaged", *commands)
    build = tmp_path / "weights"
    shutil.copytree(previous_build, build)
    with open(build / "model.onnx.data", "r+b") as data:
        data.truncate(100)
    refused(build, "ONNX Runtime cannot load", run, bench)


def test_missing_tokenizer_falls_back_to_synthetic_ids(tmp_path, cli_runner):
    """Documented fallback: the build verifies on pseudo-random ids; `fdec run` then refuses."""
    folder = make_tiny_model(tmp_path / "model", "llama", tokenizer=False)
    out = tmp_path / "build"
    result = cli_runner.invoke(cli, ["compile", str(folder), "-o", str(out), *FP32])
    assert result.exit_code == 0, result.stderr
    assert "has no tokenizer (tokenizer.json / vocab.txt): verifying on synthetic" in result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["held_text"] == "synthetic token ids"
    assert report["verification"]["ok"] is True
    run = cli_runner.invoke(cli, ["run", str(out), "-p", "hi"])
    assert run.exit_code == 2
    assert (
        run.stderr.strip() == f"error: {out} has no tokenizer; compile from a model folder with one"
    )


def test_onnx_input_is_refused_as_unsupported(tmp_path, cli_runner):
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"\x08\x07this is not a valid ModelProto\xff\xff")  # fails onnx.checker
    out = tmp_path / "build"
    _expect_error(cli_runner, ["compile", str(broken), "-o", str(out)],
                  words=["is an ONNX file", "not ONNX graphs", "config.json"], out=out)  # fmt: skip


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("empty.txt", b"", ["has no text"]),
        ("blank.txt", b"\n\n  \n", ["has no text"]),
        ("binary.txt", b"\x7fELF\x02\x01\x00\x00\x00binary", ["is binary"]),
        ("latin1.txt", "café crème".encode("latin-1"), ["not UTF-8"]),
        ("bad.jsonl", b'{"text": "ok"}\n{"txt": 1}\n', ["line 2", "'text'"]),
        ("calib.bin", b"text", ["not .txt or .jsonl"]),
    ],
)
def test_bad_calibration_file(tiny_models, tmp_path, cli_runner, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "build"
    _expect_error(cli_runner, ["compile", str(tiny_models("llama")), "-o", str(out),
                               "--quantize", "int4-awq", "--calibration", str(path)],
                  words=["calibration", *words], out=out)  # fmt: skip


_TARGET = """\
name = "mygpu"
display_name = "My GPU"
vendor = "nvidia"
compute_capability = "8.9"
memory_gb = 24
memory_bandwidth_gbs = 1008
default_backend = "onnxruntime"
sparse_tensor_cores = true

[peak_tflops]
fp32 = 82.6

[default_recipe]
weights = "int4"
activations = "fp16"
kv_cache = "fp16"
"""


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (("memory_gb = 24", "memory_gb = -24"), ["memory_gb must be > 0"]),
        (('weights = "int4"', 'weights = "int3"'), ["names no known precision"]),
        (("memory_bandwidth_gbs = 1008\n", ""), ["missing memory_bandwidth_gbs"]),
        (("vendor", "vendorr"), ["unknown key 'vendorr'"]),
    ],
)
def test_bad_target_file(tiny_models, tmp_path, cli_runner, change, words):
    path = tmp_path / "mygpu.toml"
    path.write_text(_TARGET.replace(*change))
    out = tmp_path / "build"
    _expect_error(cli_runner, ["compile", str(tiny_models("llama")), "-o", str(out), "--target", str(path)],
                  words=[str(path), *words], out=out)  # fmt: skip


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (
            ["--emit", "hf-checkpoint", "--quantize", "int8", "--target", "h100"],
            ["--emit hf-checkpoint cannot write"],
        ),
        (["--keep-fp", "2", "--quantize", "none"], ["--keep-fp needs", "--quantize int4"]),
        (["--keep-fp", "2", "--quantize", "fp8", "--target", "h100"], ["--keep-fp works with"]),
        (["--quantize", "fp8"], ["FP8"]),  # the cpu target has no FP8
        (["--backend", "tensorrt"], ["needs a GPU target"]),
        (["--max-ppl-increase", "-3%"], ["is negative"]),
        (["--max-ppl-increase", "lots"], ["is not a fraction"]),
    ],
)
def test_conflicting_options(tiny_models, tmp_path, cli_runner, options, words):
    out = tmp_path / "build"
    result = cli_runner.invoke(
        cli, ["compile", str(tiny_models("llama")), "-o", str(out), *options]
    )
    assert result.exit_code == 2, result.stderr
    text = " ".join(result.stderr.split())
    for word in words:
        assert word in text, (word, result.stderr)
    assert "Traceback" not in result.stderr
    assert not out.exists() and _leftovers(out) == []


def test_read_only_output_path(tiny_models, cli_runner):
    """sysfs refuses new files even to root, where os.access says yes: the probe catches it."""
    out = pathlib.Path("/sys/fdec-build")
    result = cli_runner.invoke(cli, ["compile", str(tiny_models("llama")), "-o", str(out)])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error: cannot write to /sys")
    assert not out.exists()


def test_read_only_mount(tiny_models, tmp_path):
    """A real read-only file system (a private mount namespace; needs unshare as root)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare and root for a private read-only mount")
    script = (
        f"mount -t tmpfs -o size=64k,ro none {ro} || exit 99; "
        f"exec {sys.executable} -m fdec.cli compile {tiny_models('llama')} -o {ro}/build"
    )
    done = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    if done.returncode == 99:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"error: cannot write to {ro}; choose an -o path you can write to"


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_disk_full_mid_write_keeps_previous_build(previous_build, tiny_models):
    """RLIMIT_FSIZE makes the kernel refuse a write past 64 KB (EFBIG), like a full disk: the
    tiny model's weights (~370 KB) fail mid-write, after model.onnx began."""
    before = _snapshot(previous_build)
    run = _Fdec("compile", str(tiny_models("gpt2")), "-o", str(previous_build), *FP32,
                preexec_fn=_limit_file_size(64 * 1024))  # fmt: skip
    assert run.finish() == 1, run.stderr
    assert any("writing the ONNX Runtime build" in line for line in run.lines)
    assert run.messages() == [
        f"error: cannot write the build to {previous_build}: a file size limit was hit (File "
        "too large); free space or choose another -o; any previous build there is unchanged"
    ]
    assert _snapshot(previous_build) == before
    assert _leftovers(previous_build) == []
