"""`fdec diff` between real int8 and int4 builds: the differing passes, the recipe, per-pass
figures, and the size and accuracy deltas (computed from each build's own report); exit 2 with
one line when a path is not a build."""

from __future__ import annotations

import copy
import json

import pytest
from test_report_html import built

from fdec.cli import cli
from fdec.report.diff import MODEL_SUFFIXES, diff_reports


@pytest.fixture
def pair(tiny_models, tmp_path_factory):
    return built("int8", tiny_models, tmp_path_factory), built(
        "int4", tiny_models, tmp_path_factory
    )


def _report(build):
    return json.loads((build / "report.json").read_text())


def _model_bytes(build):
    outputs = json.loads((build / "fdec-build.json").read_text())["outputs"]
    return sum(v["bytes"] for k, v in outputs.items() if k.endswith(MODEL_SUFFIXES))


def test_diff_int8_int4_json_shows_passes_size_and_accuracy_deltas(pair, cli_runner):
    a, b = pair
    result = cli_runner.invoke(cli, ["diff", str(a), str(b), "--json"])
    assert result.exit_code == 0, result.stderr
    diff = json.loads(result.stdout)
    ra, rb = _report(a), _report(b)

    pipeline = diff["pipeline"]
    assert pipeline["a"] == ra["pipeline"] and pipeline["b"] == rb["pipeline"]
    assert not pipeline["same"]
    only_a = [n for n in ra["pipeline"] if n not in rb["pipeline"]]
    only_b = [n for n in rb["pipeline"] if n not in ra["pipeline"]]
    assert "quantize-int8-wo" in pipeline["removed"] and "quantize-mixed" in pipeline["added"]
    assert set(pipeline["removed"]) == set(only_a) and set(pipeline["added"]) == set(only_b)
    # quantize-embedding runs in both with the same options: no change reported; a changed
    # option of a pass both run is reported by pass and key.
    assert not any(c["pass"] == "quantize-embedding" for c in pipeline["options_changed"])
    altered = copy.deepcopy(ra)
    record = next(p for p in altered["passes"] if p["name"] == "quantize-embedding")
    record["options"]["skip_shared"] = not record["options"]["skip_shared"]
    changed = diff_reports(ra, altered)["pipeline"]["options_changed"]
    assert [(c["pass"], c["key"]) for c in changed] == [("quantize-embedding", "skip_shared")]

    assert {"key": "recipe.quantize", "a": "int8", "b": "int4"} in diff["options"]
    assert diff["versions"] == []  # same machine, same packages

    size = diff["size"]["model_bytes"]
    assert size["a"] == _model_bytes(a) and size["b"] == _model_bytes(b)
    assert size["delta"] == size["b"] - size["a"] != 0
    last_a, last_b = ra["passes"][-1]["after"], rb["passes"][-1]["after"]
    assert diff["size"]["parameters"]["delta"] == last_b["parameters"] - last_a["parameters"]

    na, nb = ra["verification"]["numeric"], rb["verification"]["numeric"]
    accuracy = diff["accuracy"]
    for key in ("perplexity_build", "top1_agreement", "kl_divergence", "max_abs_error"):
        assert accuracy[key]["a"] == na[key] and accuracy[key]["b"] == nb[key]
        assert accuracy[key]["delta"] == pytest.approx(nb[key] - na[key])
    growth_a = na["perplexity_build"] / na["perplexity_source"] - 1
    assert accuracy["perplexity_increase"]["a"] == pytest.approx(growth_a)
    # Measured here: int4 loses more than int8 against the same source.
    assert accuracy["kl_divergence"]["delta"] > 0

    rows = {(r["name"], r["in"]): r for r in pipeline["passes"]}
    assert ("quantize-int8-wo", "a") in rows and ("quantize-mixed", "b") in rows
    shared = rows[("fold-constants", "both")]
    first_a, first_b = (
        next(p for p in r["passes"] if p["name"] == "fold-constants") for r in (ra, rb)
    )
    assert shared["nodes"] == {"a": first_a["after"]["nodes"], "b": first_b["after"]["nodes"],
                               "delta": 0, "ratio": 1.0}  # fmt: skip
    assert shared["wall_s"]["a"] == first_a["wall_s"]


def test_diff_text_names_the_differences(pair, cli_runner):
    a, b = pair
    result = cli_runner.invoke(cli, ["diff", str(a), str(b)])
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    assert "\x1b[" not in text  # not a terminal: plain
    assert "- quantize-int8-wo (only in a)" in text and "+ quantize-mixed (only in b)" in text
    assert "~ recipe.quantize: int8 → int4" in text
    assert "model_bytes" in text and "Δ" in text
    for key in ("perplexity_build", "top1_agreement", "kl_divergence", "max_abs_error"):
        assert key in text


def test_diff_of_a_build_with_itself_is_empty(pair):
    report = _report(pair[0])
    diff = diff_reports(report, report)
    assert diff["pipeline"]["same"] and not diff["options"] and not diff["versions"]
    assert all(
        row["in"] == "both" and not row["options_changed"] for row in diff["pipeline"]["passes"]
    )
    assert all(entry.get("delta", 0) == 0 for entry in diff["accuracy"].values())


def test_diff_with_a_path_that_is_not_a_build_exits_2_with_one_line(pair, tmp_path, cli_runner):
    for args in ([str(pair[0]), str(tmp_path)], [str(tmp_path / "missing"), str(pair[0])]):
        result = cli_runner.invoke(cli, ["diff", *args])
        assert result.exit_code == 2, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and "report.json" in result.stderr
    (tmp_path / "report.json").write_text("{not json")
    broken = cli_runner.invoke(cli, ["diff", str(pair[0]), str(tmp_path), "--json"])
    assert broken.exit_code == 2 and json.loads(broken.stdout)["ok"] is False
