"""The page's top: summary cards and the warnings a reader should not miss."""

from __future__ import annotations

from typing import Any

from fdec.report.html.text import esc, fmt, fmt_bytes, is_number, pct

__all__ = ["summary_section", "warnings"]

_NEAR_TIE = 0.1  # greedy divergence with a source top-1/top-2 margin below this is a near tie


def _model_bytes(report: dict[str, Any]) -> tuple[int | None, str]:
    outputs = report.get("outputs") or {}
    model_files = {
        name: item["bytes"]
        for name, item in outputs.items()
        if name.endswith((".onnx", ".onnx.data", ".data", ".engine", ".plan"))
    }
    if model_files:
        return sum(model_files.values()), f"{len(model_files)} model files on disk"
    passes = report.get("passes") or []
    if passes and (passes[-1].get("after") or {}).get("bytes") is not None:
        return passes[-1]["after"]["bytes"], "weights after the last pass"
    return None, ""


def warnings(report: dict[str, Any]) -> list[str]:
    """Everything a reader should not miss: failures, deferred work, fallbacks, near ties."""
    found: list[str] = []
    verification = report.get("verification") or {}
    if verification and not verification.get("ok"):
        found.append(f"verification failed: {verification.get('failure', 'see the figures')}")
    greedy = verification.get("greedy") or {}
    if greedy and not greedy.get("identical"):
        margin = greedy.get("source_margin_at_divergence")
        text = f"greedy tokens diverge from the source at step {greedy.get('first_divergence')}"
        if is_number(margin):
            tie = " (a near tie)" if margin < _NEAR_TIE else ""
            text += f"; the source's top-1/top-2 logit margin there was {margin:.3g}{tie}"
        found.append(text)
    for record in report.get("passes") or []:
        name = record.get("name")
        for check, result in (record.get("checks") or {}).items():
            if isinstance(result, dict) and result.get("ok") is False:
                problems = result.get("problems") or []
                found.append(f"pass {name}: {check} check failed {'; '.join(map(str, problems))}")
        stats = record.get("stats") or {}
        if stats.get("fallback"):
            found.append(f"pass {name}: fallback: {stats['fallback']}")
        skipped = stats.get("skipped")
        if isinstance(skipped, str) and skipped:
            found.append(f"pass {name} skipped: {skipped}")
        elif isinstance(skipped, dict) and skipped:
            found.append(f"pass {name} skipped {len(skipped)}: " + ", ".join(map(str, skipped)))
    for engine in report.get("engines") or []:
        status = engine.get("status")
        if status not in ("built", "ok"):
            what = engine.get("purpose") or "engine"
            reason = f": {engine['reason']}" if engine.get("reason") else ""
            found.append(f"{engine.get('backend')} {what} {status}{reason}")
    capacity = report.get("capacity") or {}
    if capacity and capacity.get("fits") is False:
        found.append("the KV capacity plan does not fit the target's memory")
    note = (report.get("estimate") or {}).get("note")
    if note:
        found.append(f"estimate: {note}")
    return found


def _card(key: str, value: str, note: str = "") -> str:
    extra = f'<div class="n">{esc(note)}</div>' if note else ""
    return f'<div class="card"><div class="k">{esc(key)}</div><div class="v">{esc(value)}</div>{extra}</div>'


def summary_section(report: dict[str, Any]) -> str:
    source = report.get("source") or {}
    target = report.get("target") or {}
    recipe = report.get("recipe") or {}
    verification = report.get("verification") or {}
    numeric = verification.get("numeric") or {}
    estimate = report.get("estimate") or {}
    cards = [
        _card("model", str(source.get("given", "?")), str(source.get("architecture", ""))),
        _card(
            "target",
            str(target.get("name", "?")),
            f"{target.get('display_name', '')}; backend {report.get('backend', '?')}",
        ),
        _card(
            "recipe", f"--quantize {recipe.get('quantize', '?')}", str(recipe.get("chosen_by", ""))
        ),
    ]
    size, size_note = _model_bytes(report)
    cards.append(_card("size", fmt_bytes(size), size_note))
    if estimate.get("decode_tokens_per_s"):
        cards.append(
            _card(
                "estimated decode",
                f"~{estimate['decode_tokens_per_s']:,.0f} tok/s",
                f"roofline, not measured; batch 1, {estimate.get('context_tokens')}-token context, "
                f"{estimate.get('decode_bound')}-bound",
            )
        )
    measured = report.get("measured") or report.get("benchmark") or {}
    bench_rows = (report.get("bench") or {}).get("rows") or []
    if not measured and bench_rows and isinstance(bench_rows[0], dict):
        first = bench_rows[0]
        measured = {
            "decode_tokens_per_s": first.get("decode_tok_s"),
            "where": f"fdec bench, batch {first.get('batch')}",
        }
    if is_number(measured.get("decode_tokens_per_s")):
        cards.append(
            _card(
                "measured decode",
                f"{measured['decode_tokens_per_s']:,.1f} tok/s",
                str(measured.get("where", measured.get("providers", ""))),
            )
        )
    if "perplexity_source" in numeric:
        growth = numeric["perplexity_build"] / numeric["perplexity_source"] - 1.0
        cards.append(
            _card(
                "perplexity",
                f"{numeric['perplexity_source']:.4g} → {numeric['perplexity_build']:.4g}",
                f"source → build ({growth:+.2%}) on {numeric.get('tokens_scored', '?')} held tokens",
            )
        )
    if "top1_agreement" in numeric:
        cards.append(_card("top-1 agreement", pct(numeric["top1_agreement"]), "with the source"))
    if "kl_divergence" in numeric:
        cards.append(_card("KL divergence", fmt(numeric["kl_divergence"]), "source ‖ build, mean"))
    if "max_abs_error" in numeric:
        limit = (verification.get("tolerance") or {}).get("max_abs_error")
        cards.append(
            _card(
                "max abs error",
                fmt(numeric["max_abs_error"]),
                f"{numeric.get('worst_output', '')}; limit {fmt(limit)}",
            )
        )
    greedy = verification.get("greedy")
    if greedy:
        same = (
            "identical"
            if greedy.get("identical")
            else f"diverge at {greedy.get('first_divergence')}"
        )
        cards.append(_card("greedy tokens", same, f"{greedy.get('steps')} steps vs the source"))
    return '<h2 id="summary">Summary</h2><div class="cards">' + "".join(cards) + "</div>"
