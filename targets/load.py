"""Finding targets: bundled ones by name (targets/data/*.toml), a user's by path."""

from __future__ import annotations

import functools
import importlib.resources
import logging
import os
from pathlib import Path
from typing import Any

from fdec.errors import InputError
from fdec.targets.messages import describe, did_you_mean, quote
from fdec.targets.target import Target
from fdec.targets.validate import parse_target

__all__ = ["list_targets", "load_target", "target_names"]

_log = logging.getLogger(__name__)


def load_target(name_or_path: str | os.PathLike[str]) -> Target:
    """A bundled target by name (case-insensitive) or a user's target file by path."""
    if isinstance(name_or_path, os.PathLike):
        return _load_user_file(Path(name_or_path))
    if not isinstance(name_or_path, str):
        raise InputError(
            f"a target must be a name or a path, got {describe(name_or_path)}", _known_fix()
        )
    text = name_or_path.strip()
    if not text:
        raise InputError("no target given", _known_fix())
    bundled = _bundled_files()
    if not _looks_like_path(text):
        if text.lower() in bundled:
            return _load_bundled(text.lower())
        if not _is_file(text):
            hint = did_you_mean(text.lower(), bundled)
            raise InputError(f"unknown target {quote(text)}", hint + _known_fix())
    return _load_user_file(Path(text).expanduser())


def list_targets() -> list[Target]:
    """Every bundled target, sorted by name."""
    return [_load_bundled(name) for name in target_names()]


def target_names() -> list[str]:
    """The names of the bundled targets, sorted."""
    return sorted(_bundled_files())


def _known_fix() -> str:
    return f"known targets: {', '.join(target_names())}; or give a path to a .toml target file"


def _looks_like_path(text: str) -> bool:
    separators = [os.sep, "/"] + ([os.altsep] if os.altsep else [])
    return text.lower().endswith(".toml") or any(s in text for s in separators)


def _is_file(text: str) -> bool:
    try:
        return Path(text).expanduser().is_file()
    except (OSError, ValueError):
        return False


@functools.cache
def _bundled_files() -> dict[str, Any]:
    data = importlib.resources.files(__package__ or __name__) / "data"
    return {
        entry.name[: -len(".toml")]: entry
        for entry in data.iterdir()
        if entry.name.endswith(".toml") and entry.is_file()
    }


@functools.cache
def _load_bundled(name: str) -> Target:
    entry = _bundled_files()[name]
    label = str(entry)
    target = parse_target(entry.read_text(encoding="utf-8"), label)
    if target.name != name:
        raise InputError(
            f"{label}: name is {quote(target.name)} but the file is {name}.toml",
            f'set name = "{name}" or rename the file',
        )
    return target


_MAX_FILE_BYTES = 1 << 20


def _load_user_file(path: Path) -> Target:
    label = str(path)
    try:
        if path.is_dir():
            raise InputError(
                f"{quote(label)} is a folder, not a target file",
                "give the path of a .toml target file",
            )
        if path.exists() and not path.is_file():
            raise InputError(
                f"{quote(label)} is not a regular file", "give the path of a .toml target file"
            )
        size = path.stat().st_size
        if size > _MAX_FILE_BYTES:
            raise InputError(
                f"{label}: {size} bytes is far too large for a target file",
                "give the path of a .toml target file (see targets/data/h100.toml)",
            )
        raw = path.read_bytes()
    except FileNotFoundError:
        stem = path.stem.lower()
        hint = f"use the built-in target '{stem}', or " if stem in _bundled_files() else ""
        raise InputError(
            f"target file {quote(label)} does not exist", f"{hint}check the path"
        ) from None
    except (OSError, ValueError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise InputError(
            f"cannot read target file {quote(label)}: {reason}",
            "check the path and its permissions",
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(
            f"{label}: not UTF-8 text", "a target file is TOML saved as UTF-8"
        ) from None
    _log.debug("loading target file %s", label)
    return parse_target(text, label)
