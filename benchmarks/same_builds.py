"""Build a fixed matrix of compiles and check that a code change left their outputs identical.

    python benchmarks/same_builds.py --save /tmp/redesign-before       # record the baseline
    python benchmarks/same_builds.py --compare /tmp/redesign-before    # rebuild and compare
    python benchmarks/same_builds.py --compare DIR --only cpu-int8,rtx4090
    python benchmarks/same_builds.py --compare DIR --model smollm2-135m --only cpu-int8

Each build runs `fdec compile` in a subprocess with its own empty cache (FDEC_CACHE_DIR), so no
build is served from another's cache entries. Recorded per build: the sha256 of every output
file the manifest lists (report.json/report.html excepted: they hold timings and the
environment) and report.json with its timings, paths and environment removed ("report
numbers"). TensorRT-RTX engine files are left out: two builds of the same model.onnx give
different engine bytes on unchanged code. The tiny model (tests/models.py, llama, seed 0) is written once under the baseline
folder and reused by --compare, so both sides compile the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent

# name -> fdec compile arguments (after MODEL)
CONFIGS = {
    "cpu-none": ["--target", "cpu", "--quantize", "none"],
    "cpu-int8": ["--target", "cpu", "--quantize", "int8"],
    "cpu-int4-awq": ["--target", "cpu", "--quantize", "int4-awq"],
    "h100-fp8": ["--target", "h100", "--quantize", "fp8"],
    "rtx4090": ["--target", "rtx4090"],
    "cpu-prune": ["--target", "cpu", "--quantize", "none", "--prune", "heads=0.5,mlp=0.3,layers=1"],
    "cpu-draft": ["--target", "cpu", "--draft", "layers=1/2,distill=3,quantize=int4"],
    "cpu-hf-checkpoint": ["--target", "cpu", "--emit", "hf-checkpoint"],
}
# Report keys whose values are timings, paths or the machine, not results.
_VOLATILE = {"wall_s", "cached_wall_s", "environment", "folder", "cache", "calibration_cache",
             "seconds", "elapsed_s", "build_s", "export"}  # fmt: skip
_NOT_COMPARED = ("report.json", "report.html")


# TensorRT-RTX engines differ between two builds of the same model.onnx (the builder's own
# output is not deterministic: seen on unchanged code): their report records are compared.
# distill-report.json names the temporary folder the student was distilled in.
_NONDETERMINISTIC = (".engine", "distill-report.json")
_TMP = re.compile(r"^/tmp/(fdec-[^/]+|tmp[^/]+)/")


def _normalize(value, key=""):
    if isinstance(value, dict):
        return {k: _normalize(v, k) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    if isinstance(value, str) and _TMP.match(value):
        return _TMP.sub("<tmp>/", value)  # a temporary folder's random name
    return value


def _summary(build: pathlib.Path) -> dict:
    summary = {}
    for prefix, folder in (("", build), ("draft/", build / "draft")):
        manifest = folder / "fdec-build.json"
        if not manifest.is_file():
            continue
        outputs = json.loads(manifest.read_text())["outputs"]
        summary[prefix + "outputs"] = {
            name: info["sha256"]
            for name, info in outputs.items()
            if pathlib.PurePosixPath(name).name not in _NOT_COMPARED
            and not name.endswith(_NONDETERMINISTIC)
        }
        summary[prefix + "report"] = _normalize(json.loads((folder / "report.json").read_text()))
    return summary


def _model(base: pathlib.Path, name: str) -> str:
    if name != "tiny-llama":
        return name
    folder = base / "tiny-llama"
    if not (folder / "config.json").is_file():
        sys.path.insert(0, str(HERE.parent / "tests"))
        from models import make_tiny_model

        make_tiny_model(folder, "llama")
    return str(folder)


def _build(model: str, name: str, work: pathlib.Path) -> dict:
    out = work / name
    with tempfile.TemporaryDirectory(prefix="fdec-same-cache-") as cache:
        env = dict(os.environ, FDEC_CACHE_DIR=cache, HF_HUB_OFFLINE="1")
        command = ["fdec", "compile", model, *CONFIGS[name], "-o", str(out), "-q", "--json"]
        ran = subprocess.run(command, env=env, capture_output=True, text=True)
    if ran.returncode != 0:
        return {"error": f"exit {ran.returncode}: {ran.stderr.strip()[-2000:]}"}
    return _summary(out)


def _differences(want, got, path="") -> list[str]:
    if isinstance(want, dict) and isinstance(got, dict):
        lines = []
        for key in sorted(set(want) | set(got)):
            if key not in got:
                lines.append(f"{path}/{key}: missing now")
            elif key not in want:
                lines.append(f"{path}/{key}: new")
            else:
                lines += _differences(want[key], got[key], f"{path}/{key}")
        return lines
    if want != got:
        return [f"{path}: {json.dumps(want)[:200]} -> {json.dumps(got)[:200]}"]
    return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save", type=pathlib.Path, help="write the baseline to this folder")
    mode.add_argument("--compare", type=pathlib.Path, help="compare against this baseline")
    parser.add_argument("--only", help="comma-separated config names (default: all)")
    parser.add_argument("--model", default="tiny-llama", help="tiny-llama or a model fdec takes")
    args = parser.parse_args()
    base = args.save or args.compare
    base.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else list(CONFIGS)
    model = _model(base, args.model)
    tag = args.model.replace("/", "_")
    failed = 0
    with tempfile.TemporaryDirectory(prefix="fdec-same-") as work:
        for name in names:
            got = _build(model, name, pathlib.Path(work))
            record = base / f"{tag}--{name}.json"
            if args.save:
                record.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
                print(f"{name}: saved ({'error' if 'error' in got else 'ok'})", flush=True)
                continue
            want = json.loads(record.read_text())
            lines = _differences(want, got)
            failed += bool(lines)
            print(f"{name}: {'DIFFERENT' if lines else 'identical'}", flush=True)
            for line in lines[:40]:
                print(f"  {line}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
