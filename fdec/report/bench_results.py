"""The bench results stored beside a build (bench.json, written by `fdec bench`): read and shown.

fdec.bench measures and writes them; the report (fdec.report) reads them from here, so the
report does not import the benchmark.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from fdec.errors import InputError

__all__ = [
    "BENCH_FILE",
    "BENCH_HTML",
    "BENCH_KEY",
    "bandwidth_method",
    "load_bench",
    "render_bench",
]

BENCH_KEY = "bench"  # the key `fdec report --json` shows bench.json under
# Written after the build (not outputs: the manifest does not hash them, `fdec verify` allows them).
BENCH_FILE = "bench.json"
BENCH_HTML = "bench.html"  # report.html rendered again with the "Measured speed" section


def load_bench(folder: pathlib.Path) -> dict[str, Any] | None:
    """BUILD/bench.json, or None when `fdec bench` has not run on the build."""
    path = pathlib.Path(folder) / BENCH_FILE
    if not path.is_file():
        return None
    try:
        bench = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(
            f"{path} is not readable JSON ({err})", f"run fdec bench {folder} again"
        ) from None
    if not isinstance(bench, dict) or not isinstance(bench.get("rows"), list):
        raise InputError(f"{path} has no bench rows", f"run fdec bench {folder} again")
    return bench


def bandwidth_method(bw: dict[str, Any]) -> str:
    """How the bandwidth figure was measured, for a report line."""
    if "threads" in bw:  # host memory: a threaded sum (fdec.bench.measure_bandwidth)
        return (
            f"sum of a {bw.get('array_mb')} MB array, {bw.get('threads')} threads, "
            f"best of {bw.get('tries')}"
        )
    # a GPU session: the device's own memory (fdec.bench.measure_device_bandwidth)
    return (
        f"{bw.get('device')}: copy of a {bw.get('array_mb')} MB tensor, best of {bw.get('tries')}"
    )


def render_bench(bench: dict[str, Any]) -> str:
    """The terminal table."""
    bw = bench["bandwidth"]
    lines = [
        f"{bench['build']}: {bench['prompt_len']}-token prompt, {bench['gen_len']} tokens, "
        f"median of {bench['rounds']} rounds, threads {bench['threads']}",
        f"{'batch':>5} {'prefill ms':>11} {'decode tok/s':>13} {'per row':>8} "
        f"{'MB/step':>8} {'bound steps/s':>14} {'of bound':>9}",
    ]
    for row in bench["rows"]:
        lines.append(
            f"{row['batch']:>5} {row['prefill_ms']:>11.1f} {row['decode_tok_s']:>13.1f} "
            f"{row['decode_tok_s_per_row']:>8.1f} {row['bytes_per_step'] / 1e6:>8.1f} "
            f"{row['bound_steps_s']:>14.1f} {row['bandwidth_fraction']:>8.0%}"
        )
    load = bench.get("load_average")
    how = bandwidth_method(bw)
    device = (bench.get("device") or {}).get("name")
    lines.append(
        (f"device {device}; " if device else "")
        + f"peak RSS {bench['peak_rss_mb']:.0f} MB; bandwidth {bw['gb_s']:.1f} GB/s ({how}); "
        f"weights {bench['weight_bytes'] / 1e6:.1f} MB ({bench['gathered_bytes'] / 1e6:.1f} MB "
        f"gathered a row per token)" + (f"; load average {load[0]:.1f}" if load else "")
    )
    return "\n".join(lines)
