"""The build directory: written in a temporary sibling and moved into place, with a manifest of hashes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Any

from fdec.errors import InputError

__all__ = [
    "MANIFEST",
    "AtomicBuild",
    "check_output_path",
    "refresh_manifest",
    "sha256_file",
    "write_manifest",
]

logger = logging.getLogger(__name__)

MANIFEST = "fdec-build.json"
_TMP_MARK = ".fdec-tmp-"
_OLD_MARK = ".fdec-old-"


def sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_output_path(out: pathlib.Path) -> None:
    """Fail before any work when the build could not be written to `out`."""
    if out.exists() and not out.is_dir():
        raise InputError(
            f"output path {out} is a file", "pass -o a directory path (it will be created)"
        )
    parent = out.parent if out.parent != pathlib.Path("") else pathlib.Path(".")
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"cannot create {out}: {existing} is a file", "choose another -o path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to {existing}", "choose an -o path you can write to")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AtomicBuild:
    """Context manager giving a temporary folder that replaces `out` only on success.

    On error (or Ctrl-C) the temporary folder is removed and any previous build at `out` is
    left as it was. Leftovers of killed runs (their pid gone) are cleaned on entry.
    """

    def __init__(self, out: pathlib.Path):
        self.out = pathlib.Path(out).absolute()
        self.tmp: pathlib.Path | None = None

    def __enter__(self) -> pathlib.Path:
        check_output_path(self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._clean_leftovers()
        prefix = f".{self.out.name}{_TMP_MARK}{os.getpid()}-"
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}{_OLD_MARK}{os.getpid()}"
            os.replace(self.out, old)
        try:
            os.replace(self.tmp, self.out)
        except OSError:
            if old is not None:
                os.replace(old, self.out)
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _clean_leftovers(self) -> None:
        for mark in (_TMP_MARK, _OLD_MARK):
            for path in self.out.parent.glob(f".{self.out.name}{mark}*"):
                pid_text = path.name.split(mark, 1)[1].split("-", 1)[0]
                if pid_text.isdigit() and not _pid_alive(int(pid_text)):
                    if mark == _OLD_MARK and not self.out.exists():
                        os.replace(path, self.out)  # a killed swap: put the old build back
                        continue
                    logger.info("removing %s left by an interrupted compile", path)
                    shutil.rmtree(path, ignore_errors=True)


def write_manifest(folder: pathlib.Path, data: dict[str, Any]) -> pathlib.Path:
    """fdec-build.json: inputs, pipeline, versions and the sha256 of every output file."""
    outputs = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        outputs[str(path.relative_to(folder))] = {
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
        }
    manifest = {**data, "outputs": outputs}
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def refresh_manifest(folder: pathlib.Path) -> pathlib.Path:
    """Re-hash a build's files after a later step (an engine built on the GPU machine)."""
    path = folder / MANIFEST
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.pop("outputs", None)
    return write_manifest(folder, data)
