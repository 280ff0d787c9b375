"""benchmarks/compare_builds.py: one build scored against another on fdec's corpus."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_a_build_against_itself_and_against_its_int4_twin(tiny_models, tmp_path, cli_runner):
    from fdec.cli import cli

    hf = tiny_models("llama")
    for name, quantize in (("fp32", "none"), ("int4", "int4")):
        made = cli_runner.invoke(
            cli, ["compile", str(hf), "--quantize", quantize, "-o", str(tmp_path / name)]
        )
        assert made.exit_code == 0, made.output

    def compare(build: str) -> str:
        done = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks/compare_builds.py"), str(tmp_path / "fp32"),
             str(tmp_path / build), "--splits", "held:64,held:32"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    same = compare("fp32").splitlines()
    assert [line.split(" tokens")[0] for line in same] == [
        "held:64: 63",
        "held:32: 31",
    ]  # scored: all but the first
    assert all("(+0.000%), top-1 1.0000, KL 0.00e+00, max logit difference 0.0000" in line
               for line in same)  # fmt: skip
    int4 = compare("int4").splitlines()[0]
    top1 = float(re.search(r"top-1 ([0-9.]+)", int4).group(1))
    assert top1 < 1.0 and "(+0.000%)" not in int4
