"""Compile a model and generate with the build from Python (fdec's API mirrors `fdec compile`).

python examples/python_api.py MODEL [OUT]
"""

from __future__ import annotations

import sys

import fdec
from fdec.errors import FdecError


def main(model: str, out: str = "build/example") -> int:
    try:
        # Keyword options are `fdec compile`'s: quantize="int4", max_ppl_increase="5%", ...
        build = fdec.compile(model, target="cpu", out=out, max_ppl_increase="100%")
    except FdecError as err:  # one line naming the problem and the fix; err.exit_code as the CLI's
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    numeric = build.report["verification"]["numeric"]
    print(f"verified: max logit error {numeric['max_abs_error']:.2e}")
    print(f"recipe: --quantize {build.report['recipe']['quantize']}, build in {build.path}")
    answer = fdec.load(build.path).run("Why is the sky blue?", max_new_tokens=32)
    print(answer.get("text", answer))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
