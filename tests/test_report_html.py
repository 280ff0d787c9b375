"""report.html: written into every build, self-contained (no network, no scripts), escaped, with
the pass / per-layer charts; rendered by headless Chromium into a non-blank screenshot. Also
`fdec report` (plain text when stdout is not a terminal, --html, --html-out)."""

from __future__ import annotations

import copy
import html.parser
import json
import pathlib
import shutil
import struct
import subprocess
import zlib

import numpy as np
import pytest

from fdec.cli import cli
from fdec.report import render_report
from fdec.report.diff import load_build
from fdec.report.html import HTML_FILE, render_html

_BUILDS: dict[str, pathlib.Path] = {}
_OPTIONS = {
    "int4": ["--quantize", "int4", "--keep-fp", "1"],  # mixed: records a sensitivity table
    "int8": ["--quantize", "int8"],
}


def built(kind: str, tiny_models, tmp_path_factory) -> pathlib.Path:
    """A real build of the tiny llama, made once per test session (shared with test_diff)."""
    if kind not in _BUILDS:
        from click.testing import CliRunner

        out = tmp_path_factory.mktemp(f"report-{kind}") / "build"
        model = str(tiny_models("llama"))
        result = CliRunner().invoke(cli, ["compile", model, "-o", str(out), "-q", *_OPTIONS[kind]])
        assert result.exit_code == 0, result.output + result.stderr
        _BUILDS[kind] = out
    return _BUILDS[kind]


@pytest.fixture
def int4_build(tiny_models, tmp_path_factory):
    return built("int4", tiny_models, tmp_path_factory)


class _Page(html.parser.HTMLParser):
    """Every tag with its attributes, and the text inside <svg> elements."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.svg_depth = 0
        self.svg_text: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.svg_depth += tag == "svg"

    def handle_endtag(self, tag):
        self.svg_depth -= tag == "svg"

    def handle_data(self, data):
        self.text.append(data)
        if self.svg_depth:
            self.svg_text.append(data)


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser


def _assert_self_contained(parser: _Page, page: str) -> None:
    names = {tag for tag, _ in parser.tags}
    assert not names & {"script", "link", "iframe", "object", "embed", "img"}, names
    for tag, attrs in parser.tags:
        for key, value in attrs.items():
            assert not key.startswith("on"), (tag, key)  # no event handlers
            if key in ("src", "href", "xlink:href", "action"):
                assert not (value or "").lower().startswith(("http:", "https:", "//")), (tag, value)
    assert "@import" not in page and "url(" not in page


def test_every_build_has_report_html_hashed_in_the_manifest(int4_build):
    page = int4_build / HTML_FILE
    assert page.is_file()
    manifest = json.loads((int4_build / "fdec-build.json").read_text())
    import hashlib

    entry = manifest["outputs"][HTML_FILE]
    assert entry["sha256"] == hashlib.sha256(page.read_bytes()).hexdigest()
    # The page is the report.json beside it, rendered: the same figures, nothing stale.
    report = json.loads((int4_build / "report.json").read_text())
    assert page.read_text() == render_html(report)


def test_report_html_is_self_contained_with_every_pass_and_the_sensitivity_chart(int4_build):
    page = (int4_build / HTML_FILE).read_text()
    report = json.loads((int4_build / "report.json").read_text())
    parser = _parse(page)
    _assert_self_contained(parser, page)
    text = "".join(parser.text)
    for record in report["passes"]:
        assert record["name"] in text
    # The sensitivity table is drawn as bars, one per unit, with its metrics as axis titles.
    mixed = next(r for r in report["passes"] if r["name"] == "quantize-mixed")
    units = [row["unit"] for row in mixed["stats"]["sensitivity"]]
    assert set(units) == {"layers.0", "layers.1", "lm_head"}
    svg_text = " ".join(parser.svg_text)
    for unit in units:
        assert unit in svg_text
    assert "quantize-mixed: sensitivity — kl" in svg_text
    bars = [a for t, a in parser.tags if t == "rect" and a.get("rx") == "2"]
    assert len(bars) >= 3 * len(units)  # kl, top1, ppl: a bar per unit each
    # Summary figures are the verification's own numbers.
    numeric = report["verification"]["numeric"]
    assert f"{numeric['perplexity_source']:.4g} → {numeric['perplexity_build']:.4g}" in text
    assert f"{numeric['top1_agreement']:.1%}" in text
    for section in ("Summary", "Warnings", "Passes", "Per-layer figures", "KV capacity plan",
                    "Environment"):  # fmt: skip
        assert section in text
    assert report["environment"]["packages"]["onnxruntime"] in text
    # Weight bytes / nodes across the passes: one point per pass plus the export.
    points = [a for t, a in parser.tags if t == "circle"]
    assert len(points) >= 2 * (len(report["passes"]) + 1)


def test_hostile_text_is_escaped(int4_build):
    report = json.loads((int4_build / "report.json").read_text())
    hostile = '<script>alert("x")</script>'
    report["source"]["given"] = hostile
    report["passes"][0]["name"] = '"><img src=https://evil.example/x onerror=alert(1)>'
    mixed = next(r for r in report["passes"] if r["name"] == "quantize-mixed")
    mixed["stats"]["sensitivity"][0]["unit"] = "</text><script>bad()</script>"
    report["engines"] = [{"backend": "tensorrt", "status": "deferred", "reason": "<b>no GPU</b>"}]
    page = render_html(report)
    parser = _parse(page)
    _assert_self_contained(parser, page)
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    text = "".join(parser.text)
    assert hostile in text and "</text><script>bad()</script>" in text  # shown, as text
    assert "tensorrt engine deferred: <b>no GPU</b>" in text  # a warning, escaped


def test_any_per_unit_stat_table_gets_a_bar_chart(int4_build):
    """Generic: a later pass's table (pruning importance) is charted without code for it."""
    report = copy.deepcopy(json.loads((int4_build / "report.json").read_text()))
    report["passes"][-1]["stats"]["importance"] = [
        {"name": "layers.0.mlp", "importance": 0.25, "pruned": 0},
        {"name": "layers.1.mlp", "importance": 0.75, "pruned": 16},
    ]
    parser = _parse(render_html(report))
    svg_text = " ".join(parser.svg_text)
    name = report["passes"][-1]["name"]
    assert f"{name}: importance — importance" in svg_text
    assert f"{name}: importance — pruned" in svg_text
    assert "layers.0.mlp" in svg_text and "layers.1.mlp" in svg_text


def test_warnings_name_deferred_engines_near_ties_and_failed_checks(int4_build):
    report = json.loads((int4_build / "report.json").read_text())
    report["verification"]["greedy"] = {
        "steps": 32, "identical": False, "first_divergence": 5, "source_margin_at_divergence": 0.01,
    }  # fmt: skip
    report["engines"] = [
        {"backend": "tensorrt", "status": "deferred", "purpose": "engine", "reason": "no GPU here"}
    ]
    report["passes"][1]["checks"]["structure"] = {"ok": False, "problems": ["dangling input x"]}
    text = "".join(_parse(render_html(report)).text)
    assert "greedy tokens diverge from the source at step 5" in text and "near tie" in text
    assert "tensorrt engine deferred: no GPU here" in text
    assert f"pass {report['passes'][1]['name']}: structure check failed dangling input x" in text


# ------------------------------------------------------------------------- fdec report


def test_fdec_report_plain_when_not_a_tty_html_path_and_html_out(int4_build, cli_runner, tmp_path):
    report = json.loads((int4_build / "report.json").read_text())
    plain = cli_runner.invoke(cli, ["report", str(int4_build)])
    assert plain.exit_code == 0, plain.stderr
    assert "\x1b[" not in plain.stdout  # CliRunner's stdout is not a terminal
    for record in report["passes"]:
        assert record["name"] in plain.stdout
    assert "verification PASS" in plain.stdout
    styled = render_report(report, style=True)  # what a terminal gets: bold header, green PASS
    assert "\x1b[1m" in styled and "\x1b[32m\x1b[1mPASS" in styled
    # The same text as the renderer's, with the build's size from fdec-build.json.
    assert plain.stdout.strip() == render_report(load_build(int4_build)).strip()
    assert "build size: " in plain.stdout

    as_json = cli_runner.invoke(cli, ["report", str(int4_build), "--json"])
    assert json.loads(as_json.stdout)["passes"] == report["passes"]

    path = cli_runner.invoke(cli, ["report", str(int4_build), "--html"])
    assert path.exit_code == 0 and path.stdout.strip() == str(int4_build / HTML_FILE)

    out = tmp_path / "again.html"
    again = cli_runner.invoke(cli, ["report", str(int4_build), "--html-out", str(out)])
    assert again.exit_code == 0, again.stderr
    page = out.read_text()
    _assert_self_contained(_parse(page), page)
    assert "model files on disk" in page  # sizes from fdec-build.json's outputs

    missing = cli_runner.invoke(cli, ["report", str(tmp_path), "--html"])
    assert missing.exit_code == 2 and "has no report.json" in missing.stderr


# ------------------------------------------------------------------------- Chromium


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _png_pixels(path: pathlib.Path) -> np.ndarray:
    """Decode an 8-bit RGB/RGBA, non-interlaced PNG (what Chromium writes) into an array."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except ImportError:
        pass
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, []
    while pos < len(data):
        (size,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + size]
        pos += 12 + size
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
        elif kind == b"IDAT":
            idat.append(body)
    bpp = 3 if color == 2 else 4
    stride = width * bpp
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:]
        if kind == 0:
            row = line.copy()
        elif kind == 1:  # Sub: a running sum per channel
            row = (line.reshape(-1, bpp).astype(np.int64).cumsum(axis=0) % 256).astype(np.uint8)
            row = row.reshape(-1)
        elif kind == 2:  # Up
            row = line + prev
        else:  # Average / Paeth depend on the left byte just decoded: byte by byte
            row = bytearray(line.tobytes())
            up = prev.tobytes()
            for i in range(stride):
                a = row[i - bpp] if i >= bpp else 0
                b = up[i]
                if kind == 3:
                    row[i] = (row[i] + ((a + b) >> 1)) & 255
                    continue
                c = up[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            row = np.frombuffer(bytes(row), np.uint8)
        out[y] = row
        prev = row
    return out.reshape(height, width, bpp)[:, :, :3]


def test_report_html_renders_in_headless_chromium(int4_build, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip(
            "no chromium on PATH: install Debian's chromium package (apt-get install chromium)"
        )
    shot = tmp_path / "report.png"
    page = (int4_build / HTML_FILE).resolve()
    run = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = _png_pixels(shot)
    assert pixels.shape == (2400, 1280, 3)
    # Not blank: text, cards, lines and colored bars give many colors and real contrast.
    colors = np.unique(pixels[::2, ::2].reshape(-1, 3), axis=0)
    assert len(colors) > 200, len(colors)
    assert pixels.std() > 15
    dark = (pixels.max(axis=2) < 100).mean()  # text
    blue = ((pixels[..., 2] > 180) & (pixels[..., 0] < 80)).mean()  # chart bars and lines
    # The bars' lengths follow measured pass times: on a loaded machine one pass dominates and
    # the others' bars shrink (0.00058 seen on a busy run, 0.001+ idle); none drawn gives 0.
    assert dark > 0.002 and blue > 0.0002, (dark, blue)
    # Content all the way down, not one header on an empty page.
    for band in np.array_split(pixels[:2000], 5):
        assert band.std() > 5
