#!/usr/bin/env bash
# A CI build step: compile quietly with a quality gate, read the JSON summary, fail the job on
# any non-zero exit.
#   examples/ci_build_step.sh MODEL OUT [MAX_PPL_INCREASE [more fdec compile options...]]
# Exit codes from fdec: 0 ok, 1 compile or verification failure, 2 bad input or usage,
# 3 a quality or capacity gate failed (the JSON says which layers or numbers).
set -euo pipefail
model=${1:-smollm2-135m}
out=${2:-build/ci}
gate=${3:-10%}
shift $(( $# < 3 ? $# : 3 ))
summary=$(fdec compile "$model" --target cpu -o "$out" --max-ppl-increase "$gate" --json --quiet "$@")
python3 - "$summary" <<'PY'
import json, sys
summary = json.loads(sys.argv[1])
v = summary["verification"]
growth = v["perplexity_build"] / v["perplexity_source"] - 1
print(f"built {summary['out']} with --quantize {summary['recipe']['quantize']}: "
      f"{summary['bytes'] / 1e6:.1f} MB, perplexity {growth:+.1%} against the source, "
      f"top-1 agreement {v['top1_agreement']:.1%}")
PY
fdec report "$out" > "$out/report.txt"
