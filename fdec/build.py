"""The build directory: written in a temporary sibling and moved into place, with a manifest of hashes."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from fdec.errors import BusyError, CompileError, InputError

__all__ = [
    "MANIFEST",
    "AtomicBuild",
    "FileLock",
    "build_lock",
    "check_output_path",
    "check_replaceable",
    "pid_alive",
    "read_build_json",
    "refresh_manifest",
    "scratch_folder",
    "sha256_file",
    "verify_build",
    "write_manifest",
]

logger = logging.getLogger(__name__)

MANIFEST = "fdec-build.json"
_TMP_MARK = ".fdec-tmp-"
_OLD_MARK = ".fdec-old-"
_LOCK_MARK = ".fdec-lock"
# Write failures that say "this place cannot hold the build", not "fdec is broken".
_NO_ROOM = {errno.ENOSPC: "the disk is full", errno.EFBIG: "a file size limit was hit",
            errno.EDQUOT: "the disk quota is used up", errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied"}  # fmt: skip


def sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_output_path(
    out: pathlib.Path,
    *,
    force: bool = False,
    keep: Iterable[pathlib.Path] = (),
) -> list[str]:
    """Fail before any work when the build could not be written to `out`, or when writing it
    would delete what fdec did not write (`check_replaceable`). Returns the files `--force`
    will remove (empty without it)."""
    out = pathlib.Path(out)
    if out.is_symlink():
        check_replaceable(out, force=force, keep=keep)  # names the link before what it points to
    _check_writable(out)
    return check_replaceable(out, force=force, keep=keep, announce=True)


def nearest_existing(path: pathlib.Path) -> pathlib.Path:
    """`path`, or its nearest parent that exists (where a folder at `path` would be made)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(out: pathlib.Path) -> None:
    """Fail when no folder can be created at `out` (a file on the way, no permission)."""
    if out.exists() and not out.is_dir():
        raise InputError(
            f"output path {out} is a file", "pass -o a directory path (it will be created)"
        )
    existing = nearest_existing(out.parent if out.parent != pathlib.Path("") else pathlib.Path("."))
    if not existing.is_dir():
        raise InputError(f"cannot create {out}: {existing} is a file", "choose another -o path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to {existing}", "choose an -o path you can write to")
    # os.access says yes to root everywhere and knows nothing of sysfs or full disks: try.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fdec-probe-", dir=existing))
    except OSError as err:
        raise InputError(
            f"cannot write to {existing}: {err.strerror or err}",
            "choose an -o path you can write to",
        ) from None


def check_replaceable(
    out: pathlib.Path,
    *,
    force: bool = False,
    keep: Iterable[pathlib.Path] = (),
    announce: bool = False,
) -> list[str]:
    """May fdec replace `out` with a new build? Yes when it does not exist, is an empty folder or
    a previous fdec output (a manifest, fdec-build.json, lists every file there). Anything else
    is an InputError naming what is there, unless `force`: then the user's files that will be
    removed are returned (sorted, relative) for the caller to print. Never, even with `force`:
    a file, a symbolic link, a filesystem root or mount point, the home or current directory
    (or a folder holding them), and the folders in `keep` (the source model, the cache) or a
    folder holding one of them. With `announce`, what `force` removes is logged as a warning.
    """
    out = pathlib.Path(out)
    if out.is_symlink():
        raise InputError(
            f"-o {out} is a symbolic link (to {os.path.realpath(out)}); fdec replaces the "
            "folder it writes, so it would replace the link",
            "give the folder path itself, or a new path",
        )
    if not out.exists():
        return []
    if not out.is_dir():
        raise InputError(
            f"output path {out} is a file", "pass -o a directory path (it will be created)"
        )
    real = out.resolve()
    never = [(pathlib.Path(real.anchor), "a filesystem root")]
    if os.path.ismount(real):
        never.append((real, "a mount point"))
    home = os.environ.get("HOME")
    if home:
        never.append((pathlib.Path(home).resolve(), "your home directory"))
    never.append((pathlib.Path.cwd().resolve(), "the current directory"))
    for path in keep:
        path = pathlib.Path(path).expanduser()
        if path.exists():
            path = path.resolve()
            never.append((path if path.is_dir() else path.parent, f"where {path} lives"))
    for path, what in never:
        if real == path or real in path.parents:
            inside = "" if real == path else f" (it holds {what.removeprefix('where ')})"
            name = what if real == path else "a folder"
            raise InputError(
                f"-o {out} is {name}{inside}; fdec would replace the whole folder",
                "give -o a new or empty folder, or a previous fdec build",
            )
    foreign = _foreign_files(real)
    if not foreign:
        return []
    shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    if not force:
        raise InputError(
            f"-o {out} holds files fdec did not write ({len(foreign)}: {shown})",
            "give -o a new or empty folder or a previous fdec build, or pass --force to "
            "replace this folder",
        )
    if announce:
        logger.warning(
            "--force: %s will be replaced; removing %d files fdec did not write: %s",
            out, len(foreign), ", ".join(foreign),
        )  # fmt: skip
    return foreign


def _foreign_files(folder: pathlib.Path) -> list[str]:
    """The files and links in `folder` that no fdec manifest there lists (relative, sorted)."""
    present = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_symlink() or not p.is_dir()
    )
    if not present:
        return []
    try:
        listed = set(json.loads((folder / MANIFEST).read_text())["outputs"])
    except (OSError, ValueError, KeyError, TypeError):
        return present  # no manifest, or not one fdec wrote: nothing there is fdec's
    return [
        name
        for name in present
        if name not in listed
        and pathlib.PurePosixPath(name).name != MANIFEST  # a nested build's (draft/)
        and not name.startswith(_RUNTIME_WRITTEN)
    ]


class FileLock:
    """An exclusive `fcntl.flock` on `path`, taken in this process at most once (re-entrant).

    Waiting polls, so the first wait can be reported and Ctrl-C ends it. The lock file holds the
    owner's pid (for the waiting message) and is removed on release; a lock on a file another
    process already removed is retaken on the new file. The kernel drops the lock of a killed
    process, so a stale file never blocks anyone.
    """

    _held: ClassVar[dict[str, list[Any]]] = {}  # path -> [fd, depth], per process

    def __init__(
        self,
        path: pathlib.Path,
        *,
        wait: bool = True,
        what: str = "this file",
        progress: Callable[[str], None] | None = None,
        poll_s: float = 0.2,
    ):
        self.path = pathlib.Path(path).absolute()
        self.wait = wait
        self.what = what
        self.progress = progress or (lambda message: None)
        self.poll_s = poll_s

    def __enter__(self) -> FileLock:
        key = str(self.path)
        if key in self._held:
            self._held[key][1] += 1
            return self
        reported = False
        while True:
            fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_pid(fd)
                os.close(fd)
                if not self.wait:
                    raise BusyError(
                        f"another compile{_pid_text(owner)} is writing {self.what}",
                        "wait for it to finish, or drop --no-wait to queue behind it",
                    ) from None
                if not reported:
                    self.progress(
                        f"waiting for another compile{_pid_text(owner)} writing {self.what}"
                    )
                    reported = True
                time.sleep(self.poll_s)
                continue
            except BaseException:
                os.close(fd)
                raise
            # The holder may have removed the file between our open and our flock.
            try:
                same = os.fstat(fd).st_ino == os.stat(key).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self._held[key] = [fd, 1]
            return self

    def __exit__(self, *exc: Any) -> None:
        key = str(self.path)
        entry = self._held[key]
        entry[1] -= 1
        if entry[1]:
            return
        del self._held[key]
        try:
            os.unlink(key)  # while still locked: a waiter then retakes the lock on a new file
        except FileNotFoundError:
            pass
        os.close(entry[0])


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _pid_text(pid: int | None) -> str:
    return f" (pid {pid})" if pid else ""


def build_lock(
    out: pathlib.Path,
    *,
    wait: bool = True,
    progress: Callable[[str], None] | None = None,
) -> FileLock:
    """The lock two compiles into the same `out` share: `.<name>.fdec-lock` beside `out`.

    Checks `out` can be written first and creates its parent folder (the lock lives there).
    """
    out = pathlib.Path(out).absolute()
    _check_writable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(
        out.parent / f".{out.name}{_LOCK_MARK}", wait=wait, what=str(out), progress=progress
    )


def pid_alive(pid: int) -> bool:
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
    left as it was. Leftovers of killed runs (their pid gone) are cleaned on entry. The build's
    lock (`build_lock`) is held from entry to the swap, so two compiles never mix their files;
    a write that fails for want of room or permission becomes a one-line CompileError. Right
    before the swap `out` is checked again (`check_replaceable` with `force` and `keep`): a
    folder that gained files fdec did not write meanwhile is never replaced.
    """

    def __init__(
        self,
        out: pathlib.Path,
        *,
        wait: bool = True,
        progress: Callable[[str], None] | None = None,
        force: bool = False,
        keep: Iterable[pathlib.Path] = (),
    ):
        self.out = pathlib.Path(out).absolute()
        self.tmp: pathlib.Path | None = None
        self.wait = wait
        self.progress = progress
        self.force = force
        self.keep = tuple(keep)

    def __enter__(self) -> pathlib.Path:
        self._lock = build_lock(self.out, wait=self.wait, progress=self.progress)
        self._lock.__enter__()
        try:
            self._clean_leftovers()
            prefix = f".{self.out.name}{_TMP_MARK}{os.getpid()}-"
            self.tmp = pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir=self.out.parent))
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._finish(exc_type, exc)
        finally:
            self._lock.__exit__(None, None, None)

    def _finish(self, exc_type, exc) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno in _NO_ROOM:
                raise CompileError(
                    f"cannot write the build to {self.out}: {_NO_ROOM[exc.errno]} "
                    f"({exc.strerror or exc})",
                    "free space or choose another -o; any previous build there is unchanged",
                ) from None
            return
        try:
            check_replaceable(self.out, force=self.force, keep=self.keep)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
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
                if pid_text.isdigit() and not pid_alive(int(pid_text)):
                    if mark == _OLD_MARK and not self.out.exists():
                        os.replace(path, self.out)  # a killed swap: put the old build back
                        continue
                    logger.info("removing %s left by an interrupted compile", path)
                    shutil.rmtree(path, ignore_errors=True)


def scratch_folder(out: pathlib.Path, label: str) -> pathlib.Path:
    """A new folder beside `out` for a compile's scratch files, named like AtomicBuild's
    temporary folder, so a killed compile's is removed by the next compile into `out`."""
    out = pathlib.Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}{_TMP_MARK}{os.getpid()}-{label}-"
    return pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))


def write_manifest(folder: pathlib.Path, data: dict[str, Any]) -> pathlib.Path:
    """fdec-build.json: inputs, pipeline, versions and the sha256 of every output file."""
    outputs = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        if path.relative_to(folder).as_posix().startswith(_AFTER_BUILD):
            continue  # a bench run before refresh_manifest: still not an output
        outputs[str(path.relative_to(folder))] = {
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
        }
    manifest = {**data, "outputs": outputs}
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


# Written into a build after it is built: not outputs. ONNX Runtime's TensorRT provider's cache,
# and `fdec bench`'s results (bench.json, bench.html, and their temp files while written).
_AFTER_BUILD = ("bench.json", "bench.html")
_RUNTIME_WRITTEN = ("engines/ort-tensorrt-cache/", *_AFTER_BUILD)


def read_build_json(path: pathlib.Path) -> dict[str, Any]:
    """A build's JSON file (fdec-runtime.json, report.json, ...) as a dict; a file that does
    not parse or holds no JSON object is an InputError naming it (a damaged build), where the
    commands reading it died with an internal JSONDecodeError or TypeError."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise InputError(
            f"{path.parent} is not an fdec build (no {path.name})",
            "give the folder `fdec compile -o` wrote",
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InputError(
            f"{path} is damaged ({' '.join(str(err).split())[:160]})",
            f"`fdec verify {path.parent}` names the files that changed; compile the build again",
        ) from None
    if not isinstance(data, dict):
        raise InputError(
            f"{path} is damaged (a JSON {type(data).__name__}, not an object)",
            f"`fdec verify {path.parent}` names the files that changed; compile the build again",
        )
    return data


def verify_build(folder: pathlib.Path) -> dict[str, Any]:
    """Re-hash the outputs `fdec-build.json` lists. Returns {"ok", "checked", "problems"}: each
    problem names a file and what is wrong with it (missing, changed, extra), in that order,
    files sorted by name. A folder without a manifest is an InputError."""
    folder = pathlib.Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise InputError(f"{folder} has no {MANIFEST}", "give a folder written by fdec compile")
    try:
        outputs = json.loads(path.read_text())["outputs"]
        listed = {
            str(name): (int(info["bytes"]), str(info["sha256"])) for name, info in outputs.items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        problem = {"file": MANIFEST, "problem": "unreadable", "detail": "not a valid manifest"}
        return {"ok": False, "checked": 0, "problems": [problem]}
    root = folder.resolve()
    problems: list[dict[str, str]] = []
    for name, (size, digest) in sorted(listed.items()):
        file = folder / name
        if not file.resolve().is_relative_to(root):
            problems.append(
                {"file": name, "problem": "outside", "detail": "names a path outside the build"}
            )
        elif not file.is_file():
            problems.append(
                {
                    "file": name,
                    "problem": "missing",
                    "detail": "listed in the manifest, not in the build",
                }
            )
        elif file.stat().st_size != size or sha256_file(file) != digest:
            problems.append(
                {
                    "file": name,
                    "problem": "changed",
                    "detail": "its sha256 differs from the manifest's",
                }
            )
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = file.relative_to(folder).as_posix()
        if file.name != MANIFEST and name not in listed and not name.startswith(_RUNTIME_WRITTEN):
            problems.append(
                {"file": name, "problem": "extra", "detail": "not listed in the manifest"}
            )
    return {"ok": not problems, "checked": len(listed), "problems": problems}


def refresh_manifest(folder: pathlib.Path) -> pathlib.Path:
    """Re-hash a build's files after a later step (an engine built on the GPU machine)."""
    path = folder / MANIFEST
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.pop("outputs", None)
    return write_manifest(folder, data)
