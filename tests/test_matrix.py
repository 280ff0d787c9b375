"""`fdec matrix`: cells checked before any work; a real local Ray cluster (a head and one extra
worker node, loopback only) builds a tiny Llama × 3 targets × 2 recipes byte-identical to serial
`fdec compile` runs, computing the shared front once; a killed worker's cell is retried and
completes; a second run builds nothing; the local executor keeps going past a failed cell."""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from fdec.cli import cli

TARGETS = ("cpu", "h100")  # a third target built 2 more cells, ~35 s of CI, and tested nothing new
RECIPES = {"int4": "int4", "int8": "int8"}  # cheap on a tiny model: no AWQ search
# report.json / report.html record wall times and cache hits: they differ between any two runs.
_TIMED = ("report.json", "report.html")
_HERE = pathlib.Path(__file__).parent


def _write_matrix(path: pathlib.Path, model: pathlib.Path, targets, recipes, **top) -> pathlib.Path:
    lines = [f'{key} = "{value}"' for key, value in top.items()]
    lines += [
        "[matrix]",
        f'models = {{ tiny = "{model}" }}',
        f"targets = {json.dumps(list(targets))}",
    ]
    for name, quantize in recipes.items():
        lines += [f"[matrix.recipes.{name}]", f'recipe.quantize = "{quantize}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def _outputs(folder: pathlib.Path) -> dict[str, dict]:
    outputs = json.loads((folder / "fdec-build.json").read_text())["outputs"]
    return {name: info for name, info in outputs.items() if name not in _TIMED}


_MAIN = "import sys; from fdec.cli import main; sys.argv[0] = 'fdec'; main()"


def _fdec(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`fdec ARGS` in its own process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-c", _MAIN, *args], capture_output=True, text=True, timeout=timeout,
        env=env,
    )  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """End a process group this module started: SIGTERM, then SIGKILL after 5 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # Ray's own children of the group
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A Ray head (`ray start --head`) and one extra worker node, one CPU each, on 127.0.0.1;
    yields (GCS address, the environment a driver joins it with). The cluster has a token of
    its own (Ray's token auth), so a token an earlier local ray.init() left in ~/.ray does not
    matter. A short temp folder: Ray's socket paths must stay under 108 bytes."""
    pytest.importorskip("ray", reason="the ray extra: pip install 'fdec[ray]'")
    temp = pathlib.Path(tempfile.mkdtemp(prefix="fdr", dir="/tmp"))
    logs = tmp_path_factory.mktemp("ray-logs")
    env = dict(
        os.environ,
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # a single-machine cluster: bind to loopback
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        XDG_CACHE_HOME=str(logs / "xdg"),
        HF_HUB_OFFLINE="1",
    )
    port = _free_port()
    address = f"127.0.0.1:{port}"
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
         "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1",
         "--include-dashboard=false", f"--object-store-memory={80 * 2**20}",
         f"--temp-dir={temp}", "--disable-usage-stats"],
        stdout=open(logs / "head.log", "w"), stderr=subprocess.STDOUT, env=env,
        start_new_session=True,
    )  # fmt: skip
    processes = [head]
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in (logs / "head.log").read_text():
            assert head.poll() is None, (logs / "head.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the Ray head did not start in 120 s"
            time.sleep(0.5)
        worker = subprocess.Popen(
            [sys.executable, str(_HERE / "ray_node.py"), address, str(temp)],
            stdout=subprocess.PIPE, stderr=open(logs / "worker.log", "w"), text=True,
            env=env, start_new_session=True,
        )  # fmt: skip
        processes.append(worker)
        assert worker.stdout.readline().strip() == "started", (logs / "worker.log").read_text()
        yield address, env
    finally:
        for process in reversed(processes):
            _stop(process)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    sys.path.insert(0, str(_HERE))
    from models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny", "llama")


@pytest.fixture(scope="module")
def serial(tiny, tmp_path_factory):
    """The serial builds: `fdec.compile` with the three targets, once per recipe."""
    import fdec

    root = tmp_path_factory.mktemp("serial")
    for name, quantize in RECIPES.items():
        fdec.compile(tiny, target=list(TARGETS), out=root / name, quantize=quantize,
                     cache_dir=str(root / "cache"))  # fmt: skip
    return root


@pytest.fixture(scope="module")
def first_run(tiny, ray_cluster, tmp_path_factory):
    """The matrix on the Ray cluster with a cold cache of its own."""
    root = tmp_path_factory.mktemp("matrix")
    path = _write_matrix(root / "matrix.toml", tiny, TARGETS, RECIPES, out="builds",
                         cache_dir="cache")  # fmt: skip
    started = time.monotonic()
    address, env = ray_cluster
    result = _fdec(
        "matrix", str(path), "--executor", "ray", "--address", address, "--json", env=env
    )
    return root, result, time.monotonic() - started


def test_ray_matrix_builds_what_serial_compiles_build(first_run, serial):
    root, result, _ = first_run
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout)
    assert outcome["ok"] is True and outcome["exit_code"] == 0
    cells = len(TARGETS) * len(RECIPES)
    assert outcome["counts"] == {"ok": cells, "up-to-date": 0, "failed": 0, "pending": 0}
    rows = {row["cell"]: row for row in outcome["cells"]}
    assert sorted(rows) == sorted(f"tiny/{t}/{r}" for t in TARGETS for r in RECIPES)
    for (cell, row), (target, recipe) in zip(
        sorted(rows.items()), sorted((t, r) for t in TARGETS for r in RECIPES)
    ):
        build = root / "builds" / "tiny" / target / recipe
        assert row["status"] == "ok" and row["attempts"] == 1, row
        # Byte-identical model, runtime and engine-plan files (the manifest's hashes).
        assert _outputs(build) == _outputs(serial / recipe / target), cell
        mine = json.loads((build / "report.json").read_text())["verification"]["numeric"]
        theirs = json.loads((serial / recipe / target / "report.json").read_text())
        assert mine["perplexity_build"] == theirs["verification"]["numeric"]["perplexity_build"]
        assert row["perplexity_build"] == mine["perplexity_build"]
        assert row["bytes"] == sum(i["bytes"] for i in _outputs(build).values()) + sum(
            i["bytes"]
            for n, i in json.loads((build / "fdec-build.json").read_text())["outputs"].items()
            if n in _TIMED
        )
        assert row["resources"]["num_cpus"] == 1 and row["resources"]["memory"] > 0
    # The front (export, reference) was computed once: by the model's first cell, which ran
    # alone; the others read it from the shared cache.
    exported = [cell for cell, row in rows.items() if not row["export_cached"]]
    assert exported == ["tiny/cpu/int4"]
    # Both nodes built cells: the extra worker node is part of the run.
    assert len({row["worker"]["node"] for row in rows.values()}) == 2
    # The matrix page links every build's report.
    page = (root / "builds" / "matrix.html").read_text()
    for cell in rows:
        assert f"href='{cell}/report.html'" in page
    assert json.loads((root / "builds" / "matrix.json").read_text())["cells"] == outcome["cells"]


def test_second_run_builds_nothing(first_run, ray_cluster):
    root, result, first_wall = first_run
    assert result.returncode == 0, result.stderr[-3000:]
    builds = root / "builds"
    manifests = {p: p.stat().st_mtime_ns for p in builds.rglob("fdec-build.json")}
    entries = sorted(p.name for p in (root / "cache" / "entries").iterdir())
    address, env = ray_cluster
    again = _fdec("matrix", str(root / "matrix.toml"), "--executor", "ray", "--address",
                  address, "--json", env=env)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    outcome = json.loads(again.stdout)
    cells = len(TARGETS) * len(RECIPES)
    assert outcome["counts"] == {"ok": 0, "up-to-date": cells, "failed": 0, "pending": 0}
    assert outcome["executor"].startswith("ray (not started")
    assert {p: p.stat().st_mtime_ns for p in builds.rglob("fdec-build.json")} == manifests
    assert sorted(p.name for p in (root / "cache" / "entries").iterdir()) == entries
    assert outcome["wall_s"] < first_wall / 4
    # A build whose output changed is built again; the others stay.
    victim = builds / "tiny" / "h100" / "int8" / "fdec-runtime.json"
    victim.write_text(victim.read_text() + " ")
    local = _fdec("matrix", str(root / "matrix.toml"), "--json")
    assert local.returncode == 0, local.stderr[-3000:]
    statuses = {row["cell"]: row["status"] for row in json.loads(local.stdout)["cells"]}
    assert statuses.pop("tiny/h100/int8") == "ok"
    assert set(statuses.values()) == {"up-to-date"}


def test_killed_worker_cell_is_retried_and_completes(tiny, ray_cluster, first_run, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="the rtx extra builds the TensorRT-RTX engine")
    # rtx4090: the build's staging phase includes a real engine build, a wide window to kill in.
    root, _, _ = first_run
    path = _write_matrix(tmp_path / "matrix.toml", tiny, ["rtx4090"], {"int4": "int4"},
                         out="builds", cache_dir=str(root / "cache"))  # fmt: skip
    address, env = ray_cluster
    run = subprocess.Popen(
        [sys.executable, "-c", _MAIN, "matrix", str(path), "--executor", "ray", "--address",
         address, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    parent = tmp_path / "builds" / "tiny" / "rtx4090"
    deadline = time.monotonic() + 300
    staging = []
    while not staging:  # the worker is writing the build: AtomicBuild's staging folder exists
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        staging = list(parent.glob(".int4.fdec-tmp-*")) if parent.is_dir() else []
        time.sleep(0.02)
    pid = int(staging[0].name.split(".fdec-tmp-")[1].split("-")[0])
    os.kill(pid, signal.SIGKILL)
    assert not (parent / "int4").exists()  # nothing half-written where the build goes
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-3000:]
    (row,) = json.loads(stdout)["cells"]
    assert row["status"] == "ok" and row["attempts"] == 2, row
    assert row["worker"]["pid"] != pid
    attempts = (tmp_path / "builds" / "matrix-logs" / "tiny--rtx4090--int4.attempts").read_text()
    assert [json.loads(line)["pid"] for line in attempts.splitlines()] == [
        pid,
        row["worker"]["pid"],
    ]
    from fdec.build import verify_build

    assert verify_build(parent / "int4")["ok"] is True  # a whole build, every hash checked
    assert sorted(p.name for p in parent.iterdir()) == ["int4"]  # no staging left behind
    assert row["engines"] == [
        {"backend": "tensorrt-rtx", "status": "built", "purpose": "deployable"}
    ]


def test_executor_ray_without_ray_says_how_to_install(tiny, tmp_path, cli_runner, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    path = _write_matrix(tmp_path / "m.toml", tiny, ["cpu"], {"none": "none"}, out="builds")
    result = cli_runner.invoke(cli, ["matrix", str(path), "--executor", "ray"])
    assert result.exit_code == 2
    assert "--executor ray needs Ray, which is not installed; pip install 'fdec[ray]'" in (
        result.stderr
    )
    assert not (tmp_path / "builds").exists()


def test_cells_are_checked_before_any_work(tiny, tmp_path, cli_runner):
    path = _write_matrix(tmp_path / "m.toml", tiny, ["cpu", "h100"], {"fp8": "fp8"}, out="b")
    result = cli_runner.invoke(cli, ["matrix", str(path)])
    assert result.exit_code == 2, result.output
    assert "1 of 2 cells refused before any build: tiny/cpu/fp8: FP8 needs" in result.stderr
    assert 'exclude = [{ target = "cpu", recipe = "fp8" }]' in result.stderr
    assert not (tmp_path / "b").exists()
    # Excluded, the other cell is planned; an exclude rule matching nothing is an error.
    text = path.read_text().replace("[matrix]\n", '[matrix]\nexclude = [{ target = "cpu" }]\n')
    path.write_text(text)
    result = cli_runner.invoke(cli, ["matrix", str(path), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    assert [c["cell"] for c in json.loads(result.stdout)["cells"]] == ["tiny/h100/fp8"]
    path.write_text(text.replace('target = "cpu"', 'target = "l4"'))
    result = cli_runner.invoke(cli, ["matrix", str(path), "--dry-run"])
    assert result.exit_code == 2 and "matches no cell" in result.stderr
    # Recipes are checked with fdec.toml's schema, naming the recipe.
    path.write_text(text.replace("recipe.quantize", "recipe.quantise"))
    result = cli_runner.invoke(cli, ["matrix", str(path), "--dry-run"])
    assert result.exit_code == 2
    assert "[matrix.recipes.fp8]: unknown key 'recipe.quantise'" in result.stderr
    assert "did you mean 'recipe.quantize'?" in result.stderr
    path.write_text(text.replace("exclude", "exclud"))
    result = cli_runner.invoke(cli, ["matrix", str(path), "--dry-run"])
    assert result.exit_code == 2 and "did you mean 'matrix.exclude'?" in result.stderr
    # fdec compile reads the same file and leaves [matrix] alone.
    from fdec.config import load_config

    assert load_config(path.with_name("m.toml")) is not None


def test_local_executor_goes_past_a_failed_cell(tiny, serial, tmp_path, cli_runner):
    import safetensors.torch

    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    weights = safetensors.torch.load_file(broken / "model.safetensors")
    name = next(n for n in weights if n.endswith("mlp.up_proj.weight"))
    weights[name][0, 0] = float("nan")
    safetensors.torch.save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    path = tmp_path / "m.toml"
    path.write_text(
        f'out = "builds"\ncache_dir = "{serial / "cache"}"\n[matrix]\n'
        f'models = {{ broken = "{broken}", tiny = "{tiny}" }}\ntargets = ["cpu"]\n'
        '[matrix.recipes.fp32]\nrecipe.quantize = "none"\n'
    )
    result = cli_runner.invoke(cli, ["matrix", str(path), "--json"])
    assert result.exit_code == 2, result.output  # the worst cell's: bad input
    outcome = json.loads(result.stdout)
    broken_row, tiny_row = outcome["cells"]
    assert broken_row["status"] == "failed" and broken_row["exit_code"] == 2
    assert "holds NaN or Inf values" in broken_row["error"]
    assert tiny_row["status"] == "ok" and tiny_row["exit_code"] == 0
    assert not (tmp_path / "builds" / "broken" / "cpu" / "fp32").exists()
    page = (tmp_path / "builds" / "matrix.html").read_text()
    assert "holds NaN or Inf values" in page and "href='tiny/cpu/fp32/report.html'" in page


def test_a_cell_is_refused_with_the_error_fdec_compile_gives(tiny, tmp_path, cli_runner):
    """Cells go through compile's own pre-load check (fdec.compile.resolve.check_before_load):
    an --emit hf-checkpoint with a quantization its loaders do not take is refused before any
    build, in the words `fdec compile` uses."""
    path = tmp_path / "m.toml"
    path.write_text(
        f'out = "b"\n[matrix]\nmodels = {{ tiny = "{tiny}" }}\ntargets = ["cpu"]\n'
        '[matrix.recipes.ckpt]\nrecipe.quantize = "int8-dynamic"\nrecipe.emit = ["hf-checkpoint"]\n'
    )
    result = cli_runner.invoke(cli, ["matrix", str(path), "--dry-run"])
    compiled = cli_runner.invoke(cli, ["compile", str(tiny), "-o", str(tmp_path / "c"),
                                       "--quantize", "int8-dynamic", "--emit", "hf-checkpoint"])  # fmt: skip
    assert result.exit_code == compiled.exit_code == 2, result.output
    problem = compiled.stderr.removeprefix("error: ").split(";")[0].strip()
    assert f"tiny/cpu/ckpt: {problem}" in result.stderr
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
