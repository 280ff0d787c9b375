"""Calibration input: the built-in text corpus (or the user's file) and the token batches calibrating passes take.

`load_calibration_texts` reads fdec/data/calib (prose, chat dialogue, code, numbers) or a
`.txt` (paragraphs split on blank lines) or `.jsonl` (one object with a "text" field per
line); `calibration_batches` tokenizes them into `[1, seq_len]` int64 id arrays (fixed
pseudo-random ids when there is no tokenizer); `checked_batches` and `describe_batches` are how
a pass takes and reports them. fdec.calibrate re-exports all of them.
"""

from __future__ import annotations

import importlib.resources
import json
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from fdec.errors import InputError, UsageError

__all__ = [
    "CORPUS_DOMAINS",
    "calibration_batches",
    "checked_batches",
    "describe_batches",
    "load_calibration_texts",
]


def checked_batches(
    pass_name: str, batches: Sequence[np.ndarray] | None, *, min_seq: int = 1
) -> tuple[np.ndarray, ...] | None:
    """A pass's `batches` option as int64 [batch, seq] arrays, or a UsageError naming the pass."""
    if batches is None:
        return None
    arrays = tuple(np.asarray(ids, dtype=np.int64) for ids in batches)
    if not arrays or any(
        ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] < min_seq for ids in arrays
    ):
        seq = "seq" if min_seq <= 1 else f"seq ≥ {min_seq}"
        raise UsageError(
            f"{pass_name} batches must be non-empty [batch, {seq}] token id arrays",
            "make them with fdec.calibrate.calibration_batches",
        )
    return arrays


def describe_batches(batches: Sequence[np.ndarray] | None) -> str | None:
    """How a pass's `batches` option reads in a report: counts, not arrays."""
    if batches is None:
        return None
    return f"{len(batches)} batches, {sum(int(ids.size) for ids in batches)} tokens"


# The built-in corpus: one file per domain under fdec/data/calib, read in this order.
CORPUS_DOMAINS = ("prose", "dialogue", "code", "numbers")
_SUFFIXES = (".txt", ".jsonl")
_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t]*\n)+")
_SYNTHETIC_SEED = 4321  # not verify.py's 1234: calibration and held ids differ
# --- texts ------------------------------------------------------------------------------------


def _corpus_folder() -> Any:
    return importlib.resources.files("fdec").joinpath("data/calib")


def _paragraphs(text: str) -> list[str]:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [part.strip("\n") for part in _PARAGRAPH_BREAK.split(text) if part.strip()]


def load_calibration_texts(path: pathlib.Path | None = None) -> list[str]:
    """Calibration texts: the built-in corpus (None) or a `.txt` / `.jsonl` file.

    `.txt`: paragraphs separated by blank lines. `.jsonl`: one JSON object per line with a
    string "text" field (blank lines are skipped). Raises InputError for a missing, empty,
    binary or malformed file.
    """
    if path is None:
        folder = _corpus_folder()
        texts: list[str] = []
        for domain in CORPUS_DOMAINS:
            texts.extend(_paragraphs(folder.joinpath(f"{domain}.txt").read_text(encoding="utf-8")))
        return texts
    path = pathlib.Path(path)
    label = str(path)
    fix = "give a UTF-8 .txt file (paragraphs split by blank lines) or a .jsonl file with a 'text' field per line"
    if path.suffix.lower() not in _SUFFIXES:
        raise InputError(f"calibration file {label} is not .txt or .jsonl", fix)
    try:
        if path.is_dir():
            raise InputError(f"calibration path {label} is a folder", fix)
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"calibration file {label} does not exist", "check the path") from None
    except OSError as err:
        raise InputError(
            f"cannot read calibration file {label}: {err.strerror or err}",
            "check the path and its permissions",
        ) from None
    if b"\0" in raw:
        raise InputError(f"calibration file {label} is binary (it has NUL bytes)", fix)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(
            f"calibration file {label} is not UTF-8 text (bad byte at offset {err.start})", fix
        ) from None
    texts = _jsonl_texts(text, label) if path.suffix.lower() == ".jsonl" else _paragraphs(text)
    if not texts:
        raise InputError(f"calibration file {label} has no text", fix)
    return texts


def _jsonl_texts(text: str, label: str) -> list[str]:
    fix = 'write one JSON object per line, such as {"text": "..."}'
    texts: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{label}, line {number}: not JSON ({err.msg})", fix) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(f"{label}, line {number}: no string field 'text'", fix)
        if record["text"].strip():
            texts.append(record["text"])
    return texts


def calibration_batches(
    texts: Sequence[str],
    tokenizer: Any,
    vocab_size: int,
    *,
    seq_len: int = 128,
    max_samples: int = 16,
    max_positions: int = 0,
) -> list[np.ndarray]:
    """Token id batches (int64 [1, seq_len]) for calibration.

    The texts are tokenized as one stream (joined by blank lines, ids ≥ `vocab_size`
    dropped) and cut into `seq_len` pieces; when there are more than `max_samples`, evenly
    spaced pieces are kept, so every part of the corpus (every domain of the built-in one) is
    seen. A stream shorter than `seq_len` gives one shorter batch. Without a tokenizer (or
    with too little text), fixed pseudo-random ids are used. `max_positions` (the model's,
    0: unknown) shortens the pieces of a model with fewer positions than `seq_len`.
    """
    if max_positions:
        seq_len = min(seq_len, max_positions)
    if seq_len < 1 or max_samples < 1:
        raise InputError(
            f"calibration needs seq_len ≥ 1 and max_samples ≥ 1 (got {seq_len}, {max_samples})",
            "use positive values",
        )
    if tokenizer is not None and texts:
        ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
        ids = np.asarray([i for i in ids if i < vocab_size], dtype=np.int64)
        pieces = len(ids) // seq_len
        if pieces:
            chosen = np.unique(np.linspace(0, pieces - 1, num=min(pieces, max_samples)).round())
            return [ids[int(k) * seq_len : (int(k) + 1) * seq_len][None, :] for k in chosen]
        if len(ids) >= 8:
            return [ids[None, :]]
    rng = np.random.default_rng(_SYNTHETIC_SEED)
    return [
        rng.integers(0, vocab_size, size=(1, seq_len), dtype=np.int64) for _ in range(max_samples)
    ]
