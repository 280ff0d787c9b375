"""A content-addressed cache of compile results (export, PyTorch reference, pass outputs), keyed by their inputs.

Layout under the cache folder (`fdec.frontend.source.default_cache_dir`, or `--cache-dir`):

    entries/<key>/            one entry: its files plus `fdec-entry.json`, the manifest naming
                              every file's size and sha256, the entry's kind and small metadata
    entries/.tmp-<pid>-*      an entry being written (renamed into place when whole)
    digests.json              sha256 of input files, keyed by (path, size, mtime_ns, ctime_ns,
                              inode), so an unchanged 540 MB weights file is not hashed again

Keys are sha256 digests of everything a result depends on (`digest_of`): the input files'
hashes, the options, fdec's version and a digest of its own code, the versions of the
libraries that shape the graph (`tool_versions`) and the host CPU's feature flags. An entry is
checked against its manifest whenever it is read: a damaged entry is reported once, deleted
and recomputed, never used. Entries are written to a temporary folder and renamed, so two
compiles writing the same key at once are harmless (the second rename loses and is dropped).
The cache keeps under a size cap (`FDEC_CACHE_MAX_GB`, default 20) by evicting the least
recently used entries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import pathlib
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

from fdec.build import pid_alive, sha256_file
from fdec.errors import InputError, UsageError
from fdec.lower.onnxruntime import SIDE_FILES  # what a build copies = what it depends on

__all__ = [
    "DEFAULT_MAX_GB",
    "KEYED_PACKAGES",
    "Cache",
    "DigestIndex",
    "Entry",
    "cache_info",
    "clear_cache",
    "digest_of",
    "fingerprint",
    "source_inputs",
    "tool_versions",
]

logger = logging.getLogger(__name__)

ENTRIES = "entries"
ENTRY_MANIFEST = "fdec-entry.json"
DIGEST_INDEX = "digests.json"
DEFAULT_MAX_GB = 20.0
MAX_GB_ENV = "FDEC_CACHE_MAX_GB"
# Libraries whose versions change what an export or a pass produces.
KEYED_PACKAGES = ("torch", "transformers", "onnx", "onnx-ir", "onnxscript", "onnxruntime")
# Bump when the layout of entries or the meaning of keys changes: old entries are then unused.
_FORMAT = 1
_TMP = ".tmp-"
_BAD = ".bad-"
_DIGEST_INDEX_LIMIT = 4096  # entries kept in digests.json (the most recent)
_RACY_NS = 2 * 10**9
_KEY = re.compile(r"[0-9a-f]{64}")
# Source folders fdec converted or downloaded (fdec.frontend.source): kept by `clear` unless
# asked for everything, since making them again is slow (a GGUF or int4 checkpoint read as
# float weights, a hub download).
SOURCE_FOLDERS = ("gguf", "int4", "hub")


# --- keys ---------------------------------------------------------------------------------------


def fingerprint(value: Any) -> Any:
    """A JSON-able, deterministic stand-in for `value` (pass options, arrays, nested data):
    arrays become their dtype, shape and sha256; mappings are sorted; dataclasses become their
    class name and fields."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if hasattr(value, "dtype") and hasattr(value, "shape") and hasattr(value, "tobytes"):
        import numpy as np

        array = np.ascontiguousarray(value)
        return {
            "ndarray": str(array.dtype),
            "shape": list(array.shape),
            "sha256": hashlib.sha256(array.tobytes()).hexdigest(),
        }
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return fingerprint(value.item())  # numpy scalars
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {"map": sorted([str(k), fingerprint(v)] for k, v in value.items())}
    if isinstance(value, (list, tuple)):
        return [fingerprint(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return {"set": sorted(json.dumps(fingerprint(v), sort_keys=True) for v in value)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            "class": f"{type(value).__module__}.{type(value).__qualname__}",
            "fields": {
                f.name: fingerprint(getattr(value, f.name)) for f in dataclasses.fields(value)
            },
        }
    if hasattr(value, "value") and type(value).__module__.startswith("fdec"):  # enums
        return {"enum": type(value).__qualname__, "value": fingerprint(value.value)}
    return {"repr": repr(value)}  # an unknown object: a repr with an address only costs a miss


def digest_of(kind: str, **parts: Any) -> str:
    """The cache key of a result of `kind` computed from `parts` (any fingerprint-able data)."""
    text = json.dumps(
        {"format": _FORMAT, "kind": kind, "parts": fingerprint(parts)},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(text.encode()).hexdigest()


_VERSIONS: dict[str, Any] | None = None


def tool_versions() -> dict[str, Any]:
    """fdec's version and a digest of its code, the keyed libraries' versions, Python, and a
    digest of the CPU's feature flags (kernels such as the int8 weight packer choose by them)."""
    global _VERSIONS
    if _VERSIONS is None:
        packages = {}
        for name in ("fdec", *KEYED_PACKAGES):
            try:
                packages[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                packages[name] = None
        _VERSIONS = {
            "packages": packages,
            "fdec_code": _code_digest(),
            "python": platform.python_version(),
            "host": _host_digest(),
        }
    return dict(_VERSIONS)


def _code_digest() -> str:
    """sha256 of fdec's own source and data files (fdec, fdec.passes, fdec.targets): a changed
    pass invalidates what it computed even when the version number stays the same."""
    digest = hashlib.sha256()
    seen: set[pathlib.Path] = set()
    for package in ("fdec", "fdec.passes", "fdec.targets"):
        spec = importlib.util.find_spec(package)
        for location in (spec.submodule_search_locations or []) if spec else []:
            root = pathlib.Path(location).resolve()
            if root in seen:
                continue
            seen.add(root)
            for path in sorted(root.rglob("*")):
                if not path.is_file() or "__pycache__" in path.parts or path.suffix == ".pyc":
                    continue
                if any(part.startswith(".") for part in path.relative_to(root).parts):
                    continue
                digest.update(f"{package}/{path.relative_to(root).as_posix()}\n".encode())
                digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _host_digest() -> str:
    flags = ""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                break
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()}|{flags}".encode()).hexdigest()[:16]


# --- input files ----------------------------------------------------------------------------


class DigestIndex:
    """sha256 of files, remembered by (path, size, mtime_ns, ctime_ns, inode) in one JSON file.

    `save` adds its new digests to the file atomically; two writers at the same instant may
    lose each other's additions (the files are then hashed again, nothing worse).
    With `folder=None` nothing is remembered (every file is hashed).
    """

    def __init__(self, folder: pathlib.Path | None):
        self.path = pathlib.Path(folder) / DIGEST_INDEX if folder is not None else None
        self._data = self._read()
        self._added: dict[str, list[Any]] = {}
        self.hashed = self.remembered = 0

    def _read(self) -> dict[str, list[Any]]:
        try:
            data = json.loads(self.path.read_text()) if self.path is not None else {}
        except (OSError, ValueError):
            return {}
        return (
            {k: v for k, v in data.items() if isinstance(v, list)} if isinstance(data, dict) else {}
        )

    def sha256(self, path: pathlib.Path) -> str:
        path = pathlib.Path(path).resolve()
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
        known = self._data.get(str(path))
        if known and known[:4] == stamp and isinstance(known[4], str):
            self.remembered += 1
            return known[4]
        digest = sha256_file(path)
        self.hashed += 1
        # A file modified within the last seconds may change again within the same mtime tick
        # (git's "racy" files): hash it again next time rather than trust its stamp.
        if self.path is not None and time.time_ns() - stat.st_mtime_ns > _RACY_NS:
            self._data[str(path)] = self._added[str(path)] = [*stamp, digest]
        return digest

    def save(self) -> None:
        """Add this index's new digests to the file as it is now (another compile, or another
        index of this one, may have written it since it was read)."""
        if self.path is None or not self._added:
            return
        data = self._read()
        for name, row in self._added.items():
            data.pop(name, None)
            data[name] = row
        data = dict(list(data.items())[-_DIGEST_INDEX_LIMIT:])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
            partial.write_text(json.dumps(data))
            os.replace(partial, self.path)
            self._added = {}
        except OSError as err:
            logger.warning("digest index not written (%s): %s", self.path, err)


def source_inputs(source: Any, index: DigestIndex) -> dict[str, str]:
    """File name → sha256 of everything of a model folder a build depends on: config.json,
    the weight files, the tokenizer and generation config files."""
    folder = pathlib.Path(source.folder)
    files = {pathlib.Path(path) for path in source.weight_files}
    files |= {folder / name for name in SIDE_FILES if (folder / name).is_file()}
    return {
        str(path.relative_to(folder) if path.is_relative_to(folder) else path): index.sha256(path)
        for path in sorted(files)
    }


# --- entries --------------------------------------------------------------------------------


@dataclasses.dataclass
class Entry:
    """A checked cache entry: its folder, kind and the metadata stored with it."""

    key: str
    kind: str
    path: pathlib.Path
    meta: dict[str, Any]
    bytes: int


def _max_bytes(max_gb: float | None) -> int:
    if max_gb is None:
        text = os.environ.get(MAX_GB_ENV, "").strip()
        try:
            max_gb = float(text) if text else DEFAULT_MAX_GB
        except ValueError:
            raise UsageError(
                f"{MAX_GB_ENV}={text!r} is not a number", f"set {MAX_GB_ENV} to a size in GB"
            ) from None
    if not math.isfinite(max_gb) or max_gb < 0:
        raise UsageError(f"cache size cap {max_gb!r} GB is not usable", "give a size ≥ 0 GB")
    return int(max_gb * 1e9)


class Cache:
    """The entries under `<folder>/entries`, with hit/miss/corruption counts for the report.

    `enabled=False` makes every lookup a miss and every store a no-op (`--no-cache`).
    `progress` receives the one line reporting a damaged entry.
    """

    def __init__(
        self,
        folder: pathlib.Path,
        *,
        enabled: bool = True,
        max_gb: float | None = None,
        progress: Callable[[str], None] = lambda message: None,
    ):
        self.folder = pathlib.Path(folder)
        self.enabled = enabled
        self.max_bytes = _max_bytes(max_gb)
        self.progress = progress
        self.index = DigestIndex(self.folder if enabled else None)
        self.hits: list[str] = []
        self.misses: list[str] = []
        self.stored: list[str] = []
        self.corrupt: list[str] = []
        self.evicted = 0
        self._used: set[str] = set()

    @property
    def entries(self) -> pathlib.Path:
        return self.folder / ENTRIES

    def get(self, key: str, kind: str) -> Entry | None:
        """The entry of `key`, checked file by file against its manifest; None when absent or
        damaged (a damaged entry is reported, deleted and counted)."""
        if not self.enabled:
            return None
        path = self.entries / key
        if not _KEY.fullmatch(key) or not path.is_dir():  # a key read from a manifest included
            self.misses.append(kind)
            return None
        entry, problem = _check_entry(path, key)
        if entry is None or entry.kind != kind:
            problem = problem or f"it holds a {entry.kind if entry else '?'} result, not {kind}"
            self.corrupt.append(f"{kind} {key[:12]}: {problem}")
            message = f"cache entry {key[:12]} ({kind}) is damaged: {problem}; recomputing it"
            logger.warning("%s", message)
            self.progress(message)
            self._discard(path)
            self.misses.append(kind)
            return None
        try:
            os.utime(path / ENTRY_MANIFEST)  # least recently used goes first
        except OSError:
            pass
        self._used.add(key)
        self.hits.append(kind)
        return entry

    def exists(self, key: str) -> bool:
        """Whether an entry of `key` is present (not checked: `get` checks)."""
        return self.enabled and (self.entries / key / ENTRY_MANIFEST).is_file()

    def put(
        self,
        key: str,
        kind: str,
        write: Callable[[pathlib.Path], None],
        meta: dict[str, Any] | None = None,
    ) -> bool:
        """Store an entry: `write(folder)` writes its files into a temporary folder, which is
        renamed into place once its manifest is written. Returns whether it was stored (a cache
        that cannot be written costs time, never the build)."""
        if not self.enabled or not _KEY.fullmatch(key):
            return False
        final = self.entries / key
        if (final / ENTRY_MANIFEST).is_file():
            return True  # another compile stored it meanwhile
        staging: pathlib.Path | None = None
        try:
            self.entries.mkdir(parents=True, exist_ok=True)
            staging = pathlib.Path(
                tempfile.mkdtemp(prefix=f"{_TMP}{os.getpid()}-", dir=self.entries)
            )
            write(staging)
            files = {
                path.relative_to(staging).as_posix(): {
                    "bytes": path.stat().st_size,
                    "sha256": sha256_file(path),
                }
                for path in sorted(staging.rglob("*"))
                if path.is_file()
            }
            manifest = {"format": _FORMAT, "key": key, "kind": kind, "meta": meta or {}}
            manifest["files"] = files
            (staging / ENTRY_MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            try:
                os.rename(staging, final)
            except OSError:
                if not (final / ENTRY_MANIFEST).is_file():
                    raise
                # a concurrent writer of the same key won; its entry is as good as ours
            staging = None if not staging.exists() else staging
        except OSError as err:
            logger.warning("cache entry %s not stored (%s): %s", key[:12], self.entries, err)
            self.progress(f"cache entry not stored ({err.strerror or err}); the build goes on")
            return False
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        self._used.add(key)
        self.stored.append(kind)
        return True

    def _discard(self, path: pathlib.Path) -> None:
        bad = path.with_name(f"{_BAD}{os.getpid()}-{path.name}")
        try:
            os.rename(path, bad)
        except OSError:
            bad = path
        shutil.rmtree(bad, ignore_errors=True)

    def finish(self) -> None:
        """Save the digest index, drop leftovers of killed writers, and evict least recently
        used entries until the cache is under its size cap (never entries used by this run)."""
        if not self.enabled:
            return
        self.index.save()
        if not self.entries.is_dir():
            return
        for path in self.entries.iterdir():
            if path.name.startswith((_TMP, _BAD)):
                pid = path.name.split("-", 2)[1] if "-" in path.name else ""
                if pid.isdigit() and not pid_alive(int(pid)):
                    shutil.rmtree(path, ignore_errors=True)
        listed = _list_entries(self.entries)
        total = sum(size for _, _, size in listed)
        for used_at, path, size in sorted(listed):
            if total <= self.max_bytes:
                break
            if path.name in self._used:
                continue
            self._discard(path)
            total -= size
            self.evicted += 1
            logger.info("cache: evicted %s (%d bytes, last used %s)", path.name, size, used_at)

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "enabled": self.enabled,
            "hits": len(self.hits),
            "misses": len(self.misses),
            "stored": len(self.stored),
            "corrupt": list(self.corrupt),
            "evicted": self.evicted,
            "max_bytes": self.max_bytes,
        }


def _check_entry(path: pathlib.Path, key: str) -> tuple[Entry | None, str | None]:
    """The entry at `path` if every file matches its manifest, else (None, the problem)."""
    try:
        manifest = json.loads((path / ENTRY_MANIFEST).read_text())
        files = manifest["files"]
        kind = manifest["kind"]
        if manifest.get("format") != _FORMAT or manifest.get("key") != key:
            return None, "its manifest belongs to another key or format"
    except FileNotFoundError:
        return None, "its manifest is missing"
    except (OSError, ValueError, KeyError, TypeError):
        return None, "its manifest is unreadable"
    present = {
        p.relative_to(path).as_posix()
        for p in path.rglob("*")
        if p.is_file() and p.name != ENTRY_MANIFEST
    }
    if present != set(files):
        extra, missing = sorted(present - set(files)), sorted(set(files) - present)
        return None, (f"file {missing[0]} is missing" if missing else f"extra file {extra[0]}")
    total = 0
    for name, info in sorted(files.items()):
        file = path / name
        try:
            size = file.stat().st_size
            if size != info["bytes"] or sha256_file(file) != info["sha256"]:
                return None, f"file {name} does not match its sha256"
        except (OSError, KeyError, TypeError):
            return None, f"file {name} is unreadable"
        total += size
    return Entry(key, kind, path, dict(manifest.get("meta") or {}), total), None


def _list_entries(entries: pathlib.Path) -> list[tuple[float, pathlib.Path, int]]:
    """(last used, folder, bytes) of every whole entry, from the manifests (not re-hashed)."""
    listed = []
    for path in entries.iterdir():
        if path.name.startswith("."):
            continue
        manifest = path / ENTRY_MANIFEST
        try:
            data = json.loads(manifest.read_text())
            size = sum(int(info["bytes"]) for info in data["files"].values())
            listed.append((manifest.stat().st_mtime, path, size))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return listed


# --- fdec cache info | clear ------------------------------------------------------------------


def cache_info(folder: pathlib.Path) -> dict[str, Any]:
    """What the cache holds: entries by kind and their bytes, the other folders' bytes, the cap."""
    folder = pathlib.Path(folder)
    kinds: dict[str, dict[str, int]] = {}
    entries = folder / ENTRIES
    for _, path, size in _list_entries(entries) if entries.is_dir() else []:
        try:
            kind = json.loads((path / ENTRY_MANIFEST).read_text())["kind"]
        except (OSError, ValueError, KeyError):
            continue
        row = kinds.setdefault(kind, {"entries": 0, "bytes": 0})
        row["entries"] += 1
        row["bytes"] += size
    others = {}
    for name in ("calibration", *SOURCE_FOLDERS):
        path = folder / name
        if path.is_dir():
            others[name] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return {
        "folder": str(folder),
        "entries": kinds,
        "entry_bytes": sum(row["bytes"] for row in kinds.values()),
        "other_bytes": others,
        "max_bytes": _max_bytes(None),
    }


# What fdec itself puts at the top of its cache folder; anything else is the user's.
_CACHE_NAMES = (ENTRIES, "calibration", DIGEST_INDEX, *SOURCE_FOLDERS)


def _check_cache_folder(folder: pathlib.Path) -> None:
    """Refuse to clear a folder that holds more than fdec's cache (a --cache-dir typo)."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise InputError(
            f"cache folder {folder} is not a folder",
            "give --cache-dir the folder fdec caches into",
        )
    if not folder.is_dir():
        return
    others = sorted(
        p.name
        for p in folder.iterdir()
        if p.name not in _CACHE_NAMES and not p.name.startswith(f".{DIGEST_INDEX}.")
    )
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise InputError(
            f"{folder} holds files that are not fdec's cache ({shown}); nothing was cleared",
            "give --cache-dir the folder fdec caches into (fdec cache info shows it)",
        )


def clear_cache(folder: pathlib.Path, *, everything: bool = False) -> int:
    """Delete the cached results (entries, calibration statistics, the digest index); with
    `everything`, converted GGUF and int4 models and hub downloads too. Returns the bytes
    freed."""
    folder = pathlib.Path(folder)
    _check_cache_folder(folder)
    names = [ENTRIES, "calibration", DIGEST_INDEX] + (list(SOURCE_FOLDERS) if everything else [])
    freed = 0
    for name in names:
        path = folder / name
        if path.is_dir():
            freed += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file():
            freed += path.stat().st_size
            path.unlink(missing_ok=True)
    return freed
