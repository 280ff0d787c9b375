"""Speculative decoding (prompt-lookup and draft-model drafts) against plain greedy decoding, in one run.

    python benchmarks/speculative.py                 # build/smollm2-fp32-fused, compiled if missing
    python benchmarks/speculative.py --build build/x --quantize int4 --k 4 --k 8 --rounds 3
    python benchmarks/speculative.py --build B --draft-build B/draft   # B/draft is the default
    python benchmarks/speculative.py --draft-build self   # the target drafts for itself

The task is input-grounded: the prompt holds a paragraph with typos and asks for it back
corrected, so most of the answer is copied from the prompt and n-gram drafts get accepted.
Every side runs the same prompt, threads and greedy decoding; rounds are interleaved and
medians reported. The speculative tokens must equal the plain greedy ones (asserted).
Rows: plain greedy over IOBinding (what `fdec run` does by default), plain greedy through
numpy (the loop speculative decoding builds on), prompt-lookup for each --k, and a draft model
for each --k when there is one: --draft-build DIR, else BUILD/draft (`fdec compile --draft`);
"self" makes the target its own draft (acceptance 100 %: a check of the loop and the cost of
drafting, never a speed-up). Draft rows also give the seconds spent in the draft (its prompt
prefill included) and in the target's verifying calls; lookup+draft rows ask the draft model
only where prompt lookup finds nothing.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import warnings

PARAGRAPH = (
    "The lighthouse stood on the northern cliff for more then two hundred years. Every night "
    "the keeper climbed the hundred and twelve steps to light the lamp, and every morning he "
    "wrote the wether, the ships he had seen and the state of the sea in a leather book. When "
    "the light was finaly automated, the last keeper left the book on the table by the door, "
    "open at the page where he had written his last entry."
)
TASK = "Repeat the following paragraph exactly, correcting only its spelling mistakes:\n\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--build", default="build/smollm2-fp32-fused")
    parser.add_argument("--quantize", default="none", help="recipe when the build is compiled")
    parser.add_argument("--k", action="append", type=int, help="draft length (repeatable)")
    parser.add_argument("--ngram", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--draft-build", help="draft build for the draft rows (default BUILD/draft; 'self')"
    )
    parser.add_argument(
        "--draft-min-prob",
        action="append",
        type=float,
        help="draft rows also with the draft stopping at tokens it gives less (repeatable)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    from fdec.runner import DRAFT_FOLDER, load_build, load_draft
    from fdec.runtime import generate
    from fdec.runtime.speculative import (
        DraftModelDrafter,
        FirstDrafter,
        PromptLookupDrafter,
        generate_speculative,
    )

    folder = pathlib.Path(args.build)
    if not (folder / "model.onnx").exists():
        from fdec.compile import CompileOptions, compile_model

        print(f"compiling {args.model} into {folder} ({args.quantize}) ...", file=sys.stderr)
        compile_model(CompileOptions(model=args.model, out=folder, quantize=args.quantize))
    build = load_build(folder)
    model, tokenizer = build.model, build.tokenizer
    draft_folder = args.draft_build
    if draft_folder is None and (folder / DRAFT_FOLDER / "model.onnx").exists():
        draft_folder = folder / DRAFT_FOLDER
    if draft_folder == "self":
        draft = load_build(folder)  # its own session and cache
    else:
        draft = load_draft(build, draft_folder) if draft_folder else None
    text = TASK + PARAGRAPH
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        if hasattr(prompt, "keys"):
            prompt = prompt["input_ids"]
    else:
        prompt = tokenizer(text + "\n\nCorrected paragraph:\n")["input_ids"]
    prompt = list(prompt)
    n = args.new_tokens
    ks = args.k or [4, 8]

    def plain(bound: bool):
        return generate(model, prompt, max_new_tokens=n, bound=bound)

    sides = {"plain_bound": lambda: plain(True), "plain_numpy": lambda: plain(False)}
    for k in ks:
        sides[f"prompt_lookup_k{k}"] = lambda k=k: generate_speculative(
            model, prompt, max_new_tokens=n, k=k, ngram=args.ngram
        )
    for k in ks if draft else []:
        for p in args.draft_min_prob or [0.0]:
            name = f"draft_k{k}" + (f"_p{p:g}" if p else "")
            sides[name] = lambda k=k, p=p: generate_speculative(
                model, prompt, max_new_tokens=n, k=k,
                draft=DraftModelDrafter(draft.model, min_probability=p),
            )  # fmt: skip
        sides[f"lookup+draft_k{k}"] = lambda k=k: generate_speculative(
            model, prompt, max_new_tokens=n, k=k,
            draft=FirstDrafter(PromptLookupDrafter(args.ngram), DraftModelDrafter(draft.model)),
        )  # fmt: skip
    reference = plain(True).tokens  # also the warm-up
    rates: dict[str, list[float]] = {name: [] for name in sides}
    seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    last = {}
    for _ in range(args.rounds):
        for name, side in sides.items():
            result = side()
            assert result.tokens == reference, f"{name} tokens differ from plain greedy"
            rates[name].append(result.decode_tokens_per_s)
            seconds[name].append(
                (getattr(result, "draft_s", 0.0), getattr(result, "target_s", 0.0))
            )
            last[name] = result
    base = statistics.median(rates["plain_bound"])
    rows = {}
    for name, result in last.items():
        rate = statistics.median(rates[name])
        rows[name] = {
            "decode_tok_s": round(rate, 2),
            "speedup_vs_plain_bound": round(rate / base, 3),
            "speedup_vs_plain_numpy": round(rate / statistics.median(rates["plain_numpy"]), 3),
        }
        if hasattr(result, "acceptance_rate"):
            rows[name].update(
                steps=result.steps,
                drafted=result.drafted,
                accepted=result.accepted,
                acceptance_rate=round(result.acceptance_rate, 3),
                tokens_per_step=round(result.tokens_per_step, 2),
            )
        if "draft" in name:
            rows[name].update(
                draft_s=round(statistics.median(d for d, _ in seconds[name]), 3),
                target_s=round(statistics.median(t for _, t in seconds[name]), 3),
            )
    summary = {
        "build": str(folder),
        "kv_buffer": model.kv_buffer,
        "draft_build": None if draft is None else str(draft_folder),
        "draft_layers": None if draft is None else draft.model.num_layers,
        "target_layers": model.num_layers,
        "prompt_tokens": len(prompt),
        "new_tokens": len(reference),
        "identical_tokens": True,
        "rows": rows,
        "output": tokenizer.decode(reference, skip_special_tokens=True),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"{folder} ({model.kv_buffer} KV), prompt {len(prompt)} tokens, {len(reference)} new "
        f"tokens, speculative tokens identical to plain greedy; medians of {args.rounds} rounds"
    )
    if draft is not None:
        print(
            f"draft: {draft_folder} ({draft.model.num_layers} of {model.num_layers} layers"
            + (", the target itself)" if draft_folder == "self" else ")")
        )
    print(
        f"{'side':<20} {'tok/s':>8} {'vs bound':>9} {'vs numpy':>9} {'accept':>7} {'tok/step':>9}"
        f" {'draft s':>8} {'target s':>9}"
    )
    for name, row in rows.items():
        accept = f"{row['acceptance_rate']:.0%}" if "acceptance_rate" in row else "-"
        per_step = f"{row['tokens_per_step']:.2f}" if "tokens_per_step" in row else "1.00"
        times = f" {row['draft_s']:>8.2f} {row['target_s']:>9.2f}" if "draft_s" in row else ""
        print(
            f"{name:<20} {row['decode_tok_s']:>8.1f} {row['speedup_vs_plain_bound']:>8.2f}x "
            f"{row['speedup_vs_plain_numpy']:>8.2f}x {accept:>7} {per_step:>9}{times}"
        )
    print(f"output: {summary['output'][:200]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
