"""`fdec bench` results in the build's report: BUILD/bench.json (atomic, newest run wins) shown by
`fdec report` as text, --json ("bench") and html ("Measured speed"), without breaking
`fdec verify`; a build never benched says nothing about it."""

from __future__ import annotations

import json

import pytest

import fdec
from fdec.bench import BENCH_FILE, BENCH_HTML, load_bench
from fdec.build import MANIFEST, refresh_manifest
from fdec.cli import cli
from fdec.errors import InputError

_SMALL = ["--prompt-len", "6", "--gen-len", "4", "--rounds", "1"]


@pytest.fixture(scope="module")
def tiny_build(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-report") / "b"
    fdec.compile(tiny_models("llama"), target="cpu", out=out, quantize="none")
    return out


def _bench(cli_runner, build, batches):
    result = cli_runner.invoke(cli, ["bench", str(build), "--batch", batches, *_SMALL, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_without_bench_json_the_report_says_nothing_about_it(tiny_build, cli_runner):
    assert not (tiny_build / BENCH_FILE).exists()
    text = cli_runner.invoke(cli, ["report", str(tiny_build)])
    assert text.exit_code == 0, text.output
    assert "measured speed" not in text.stdout and "peak RSS" not in text.stdout
    as_json = cli_runner.invoke(cli, ["report", str(tiny_build), "--json"])
    assert "bench" not in json.loads(as_json.stdout)
    page = tiny_build / "page.html"
    out = cli_runner.invoke(cli, ["report", str(tiny_build), "--html-out", str(page)])
    assert out.exit_code == 0, out.output
    assert "Measured speed" not in page.read_text()
    html = cli_runner.invoke(cli, ["report", str(tiny_build), "--html"])
    assert html.stdout.strip() == str(tiny_build / "report.html")
    page.unlink()


def test_bench_json_is_shown_by_every_report_and_verify_still_passes(tiny_build, cli_runner):
    manifest = (tiny_build / MANIFEST).read_text()
    report_json = (tiny_build / "report.json").read_text()
    report_html = (tiny_build / "report.html").read_text()
    first = _bench(cli_runner, tiny_build, "1")
    bench = _bench(cli_runner, tiny_build, "2,1")  # the newest run replaces the old
    stored = json.loads((tiny_build / BENCH_FILE).read_text())
    assert stored == bench != first and [r["batch"] for r in stored["rows"]] == [1, 2]
    assert stored["batches"] == [1, 2] and stored["gen_len"] == 4 and stored["prompt_len"] == 6
    assert stored["measured_at"].endswith("Z") and stored["machine"]["platform"]
    assert stored["bandwidth"]["gb_s"] > 0 and stored["cpu_count"] >= 1
    assert not list(tiny_build.glob("*.tmp"))
    # the build's own outputs are untouched: the manifest still vouches for what compile wrote
    assert (tiny_build / MANIFEST).read_text() == manifest
    assert (tiny_build / "report.json").read_text() == report_json
    assert (tiny_build / "report.html").read_text() == report_html
    verify = cli_runner.invoke(cli, ["verify", str(tiny_build)])
    assert verify.exit_code == 0, verify.output

    text = cli_runner.invoke(cli, ["report", str(tiny_build)])
    assert text.exit_code == 0, text.output
    tail = text.stdout.split("measured speed (fdec bench, " + stored["measured_at"])[1]
    for row in stored["rows"]:
        line = next(x for x in tail.splitlines() if x.split()[:1] == [str(row["batch"])])
        assert f"{row['prefill_ms']:.1f}" in line and f"{row['decode_tok_s']:.1f}" in line
        assert f"{row['bandwidth_fraction']:.0%}" in line
    assert f"peak RSS {stored['peak_rss_mb']:.0f} MB" in tail

    as_json = cli_runner.invoke(cli, ["report", str(tiny_build), "--json"])
    assert json.loads(as_json.stdout)["bench"] == stored

    page = tiny_build.parent / "out.html"
    out = cli_runner.invoke(cli, ["report", str(tiny_build), "--html-out", str(page)])
    assert out.exit_code == 0, out.output
    printed = cli_runner.invoke(cli, ["report", str(tiny_build), "--html"]).stdout.strip()
    assert printed == str(tiny_build / BENCH_HTML)
    for html in (page.read_text(), (tiny_build / BENCH_HTML).read_text()):
        section = html.split('<h2 id="measured">Measured speed</h2>')[1].split("<h2")[0]
        for row in stored["rows"]:
            assert f"<td>{row['prefill_ms']:,.2f}</td>" in section
            assert f"<td>{row['decode_tok_s']:,.2f}</td>" in section
            assert f"<td>{row['bandwidth_fraction']:.1%}</td>" in section
        assert f"{stored['peak_rss_mb']:,.2f} MB" in section
        assert f"{stored['bandwidth']['gb_s']:,.2f} GB/s" in section

    # a later manifest refresh (an engine built on the GPU machine) does not adopt bench files
    refresh_manifest(tiny_build)
    listed = json.loads((tiny_build / MANIFEST).read_text())["outputs"]
    assert BENCH_FILE not in listed and BENCH_HTML not in listed
    _bench(cli_runner, tiny_build, "1")
    verify = cli_runner.invoke(cli, ["verify", str(tiny_build)])
    assert verify.exit_code == 0, verify.output


def test_verify_still_catches_a_changed_output_after_bench(tiny_build, cli_runner):
    if not (tiny_build / BENCH_FILE).exists():
        _bench(cli_runner, tiny_build, "1")
    report = tiny_build / "report.json"
    original = report.read_text()
    try:
        report.write_text(original.replace("{", "{ ", 1))
        verify = cli_runner.invoke(cli, ["verify", str(tiny_build)])
        assert verify.exit_code != 0 and "report.json" in verify.output
    finally:
        report.write_text(original)


def test_a_damaged_bench_json_is_an_input_error(tmp_path, cli_runner):
    (tmp_path / BENCH_FILE).write_text("{not json")
    with pytest.raises(InputError, match="fdec bench"):
        load_bench(tmp_path)
    (tmp_path / BENCH_FILE).write_text("[]")
    with pytest.raises(InputError, match="no bench rows"):
        load_bench(tmp_path)
    assert load_bench(tmp_path / "none") is None
