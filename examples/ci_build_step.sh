#!/usr/bin/env bash
# A CI build step: compile quietly, read the JSON summary, fail the job on any non-zero exit.
#   examples/ci_build_step.sh MODEL OUT
# Exit codes from fdec: 0 ok, 1 compile or verification failure, 2 bad input or usage.
set -euo pipefail
model=${1:-smollm2-135m}
out=${2:-build/ci}
summary=$(fdec compile "$model" --target cpu -o "$out" --json --quiet)
python3 - "$summary" <<'PY'
import json, sys
summary = json.loads(sys.argv[1])
v = summary["verification"]
print(f"built {summary['out']}: {summary['bytes'] / 1e6:.1f} MB, "
      f"max logit error {v['max_abs_error']:.2e}, greedy identical: {v['greedy_identical']}")
PY
fdec report "$out" > "$out/report.txt"
