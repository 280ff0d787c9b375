"""Compile a model and generate with the build from Python.

python examples/python_api.py MODEL [OUT]
"""

from __future__ import annotations

import pathlib
import sys

from fdec.compile import CompileOptions, compile_model
from fdec.runner import load_build, run_prompt


def main(model: str, out: str = "build/example") -> int:
    result = compile_model(CompileOptions(model=model, out=pathlib.Path(out), target="cpu"))
    numeric = result.report["verification"]["numeric"]
    print(f"verified: max logit error {numeric['max_abs_error']:.2e}")
    build = load_build(result.out)
    answer = run_prompt(build, "Why is the sky blue?", max_new_tokens=32)
    print(answer.get("text", answer))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
