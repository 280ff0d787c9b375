"""How target errors name what they found: quoted, described, with a did-you-mean."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

__all__ = ["cc_text", "describe", "did_you_mean", "quote", "shorten"]


def cc_text(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


def did_you_mean(word: str, choices: Mapping[str, Any] | tuple[str, ...]) -> str:
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {quote(matches[0])}? " if matches else ""


def shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def quote(text: str) -> str:
    return repr(shorten(text))


def describe(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    kind = kinds.get(type(value))
    if kind is None:
        kind = {list: "an array", dict: "a table"}.get(type(value), type(value).__name__)
        return kind
    return f"{kind} ({shorten(repr(value))})"
