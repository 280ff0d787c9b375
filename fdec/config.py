"""fdec's config file: `fdec.toml` or `[tool.fdec]` in pyproject.toml, checked against one schema.

`SCHEMA` is the single table of keys: it validates files (unknown keys name the nearest valid
one, wrong types name the key and the type wanted), maps keys to `fdec compile` options, and
renders docs/config.md (`python -m fdec.config > docs/config.md`; a test keeps them equal).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import pathlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

from fdec.backends import backend_names
from fdec.errors import InputError, UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "CONFIG_FILE",
    "SCHEMA",
    "Config",
    "Key",
    "convert",
    "discover_config",
    "load_config",
    "merge",
    "parse_config",
    "parse_fraction",
    "read_config_table",
    "render_docs",
    "suggest_key",
]

CONFIG_FILE = "fdec.toml"
PYPROJECT_FILE = "pyproject.toml"
# A table `fdec matrix` reads (fdec.matrix checks it); `fdec compile` leaves it alone.
MATRIX_TABLE = "matrix"


def parse_fraction(value: Any) -> float:
    """`3%` or `0.03` (a number or a string) as a finite non-negative float; ValueError else."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a fraction")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        text = value.strip()
        number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    else:
        raise ValueError(f"{type(value).__name__} is not a fraction")
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{value!r} is not a finite non-negative fraction")
    return number


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key: where it lives, what it holds, and the compile option it sets."""

    path: str  # dotted: "recipe.quantize"
    kind: str  # "str", "int", "bool", "path", "fraction", "strs" (a string or a list of them)
    option: str  # the `fdec compile` parameter (and CompileOptions field) it sets
    help: str
    example: str  # TOML value as written in the file
    choices: tuple[str, ...] = ()
    minimum: int | None = None

    @property
    def section(self) -> str:
        return self.path.rpartition(".")[0]

    @property
    def name(self) -> str:
        return self.path.rpartition(".")[2]

    @property
    def type_text(self) -> str:
        if self.choices:
            listed = ", ".join(f'"{c}"' for c in self.choices)
            return (
                f"a list of strings, each one of {listed}"
                if self.kind == "strs"
                else f"one of {listed}"
            )
        text = {
            "str": "a string",
            "int": "an integer",
            "bool": "a boolean",
            "path": "a path (a string; relative to the config file)",
            "fraction": 'a fraction ("5%" or 0.05)',
            "strs": "a string or a list of strings",
            "pass_options": "a table per pass name, of that pass's options",
        }[self.kind]
        if self.minimum is not None:
            text += f" >= {self.minimum}"
        return text


SCHEMA: tuple[Key, ...] = (
    Key("model", "str", "model", "Model folder, .gguf file, hub id or bundled name (MODEL).",
        '"smollm2-135m"'),
    Key("target", "strs", "target", "Target name or .toml file; a list (or \"a,b\") builds one "
        "folder per target under `out`.", '["cpu", "rtx4090"]'),
    Key("out", "path", "out", "Build folder (-o); with several targets, their parent.",
        '"build/smollm2"'),
    Key("backend", "str", "backend", "Engine backend (default: the target's).", '"onnxruntime"',
        choices=backend_names()),
    Key("max_batch", "int", "max_batch", "Largest batch engines serve.", "1", minimum=1),
    Key("max_seq_len", "int", "max_seq_len", "Longest context (prompt + generated) engines "
        "serve.", "2048", minimum=1),
    Key("cache_dir", "path", "cache_dir", "fdec's cache (default ~/.cache/fdec).",
        '".fdec-cache"'),
    Key("passes", "strs", "passes", "Pass list ('default' = the default pipeline; `fdec "
        "passes` lists them).", '["default", "untie-embeddings"]'),
    Key("verify_each", "bool", "verify_each", "Check structure and numerics after every pass.",
        "false"),
    Key("trust_remote_code", "bool", "trust_remote_code", "Allow model code from the model "
        "folder.", "false"),
    Key("trust_pickle", "bool", "trust_pickle", "Allow .bin (pickle) weights, loaded "
        "weights-only.", "false"),
    Key("recipe.quantize", "str", "quantize", "none, int4, int4-awq, int4-awq-mixed, int8, "
        "int8-wo, int8-smoothquant, fp8, fp4, fp4-wo (default: the target's recipe).", '"int4-awq"'),
    Key("recipe.keep_fp", "int", "keep_fp", "Keep the N most sensitive layers in fp32 "
        "(int4 / int8-dynamic).", "2", minimum=0),
    Key("recipe.calibration", "path", "calibration", "Calibration text (.txt or .jsonl) for "
        "static quantization.", '"calib.txt"'),
    Key("recipe.emit", "strs", "emit", "Extra outputs.", '["hf-checkpoint"]',
        choices=("hf-checkpoint", "genai")),
    Key("recipe.sparsity", "str", "sparsity", "2:4: semi-structured sparsity on the MLP "
        "weights before quantization (targets with sparse tensor cores).", '"2:4"',
        choices=("none", "2:4")),
    Key("recipe.prune", "str", "prune", "Structured pruning before the compile: shares of "
        "query heads and MLP channels, and layers, to remove.", '"heads=0.25,mlp=0.3,layers=2"'),
    Key("recipe.draft", "str", "draft", "Also build a draft model (the source keeping that "
        "share, or N, of its layers) in OUT/draft for speculative decoding.", '"layers=1/4"'),
    Key("kv_cache.dtype", "str", "kv_dtype", "KV-cache storage (int8/fp8: per-head scales "
        "from calibration).", '"int8"', choices=("fp32", "fp16", "int8", "fp8")),
    Key("kv_cache.window", "int", "kv_window", "Keep the last W cache positions (sliding "
        "window).", "1024", minimum=1),
    Key("kv_cache.sink", "int", "kv_sink", "With a window: also keep the first K positions "
        "(attention sink).", "4", minimum=0),
    Key("gates.max_ppl_increase", "fraction", "max_ppl_increase", "Fail (exit 3) when "
        "perplexity grows more than this against the source model.", '"5%"'),
    Key("pass_options", "pass_options", "pass_options", "Options of passes the pipeline runs, "
        "one table per pass (`[pass_options.quantize-int4-awq]` block_size = 64); `fdec passes` "
        "lists them. A pass the build does not run is an error.",
        '{ "quantize-int4-awq" = { block_size = 64 } }'),
)  # fmt: skip

_BY_PATH = {key.path: key for key in SCHEMA}
_SECTIONS = sorted({key.section for key in SCHEMA if key.section})


@dataclasses.dataclass
class Config:
    """A checked config file: compile option name -> value, and where it came from."""

    source: pathlib.Path  # the file read (fdec.toml or pyproject.toml)
    values: dict[str, Any]

    def describe(self) -> str:
        table = " [tool.fdec]" if self.source.name == PYPROJECT_FILE else ""
        return f"{self.source}{table}"


def suggest_key(path: str) -> str | None:
    """The valid key nearest to an unknown dotted `path`: the same name in another section
    first (recipe.max_ppl_increase -> gates.max_ppl_increase), else difflib's closest."""
    name = path.rpartition(".")[2]
    same_name = [key.path for key in SCHEMA if key.name == name]
    if same_name:
        return same_name[0]
    candidates = [key.path for key in SCHEMA] + _SECTIONS
    close = difflib.get_close_matches(path, candidates, n=1, cutoff=0.6)
    if not close:  # compare the last part alone: "quantise" -> recipe.quantize
        names = {key.name: key.path for key in SCHEMA}
        near = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
        close = [names[near[0]]] if near else []
    return close[0] if close else None


def _type_name(value: Any) -> str:
    return {str: "string", int: "integer", float: "float", bool: "boolean", list: "list",
            dict: "table"}.get(type(value), type(value).__name__)  # fmt: skip


def convert(key: Key, value: Any, base: pathlib.Path, where: str, label: str | None = None) -> Any:
    """`value` checked and converted for `key` (paths made absolute against `base`); a
    UsageError naming `label` (default: the key's path) and the type wanted otherwise."""

    def wrong(detail: str = "") -> UsageError:
        got = f"{value!r} ({_type_name(value)})" if not isinstance(value, dict) else "a table"
        return UsageError(
            f"{where}: {label or key.path} must be {key.type_text}, got {got}{detail}",
            f"see docs/config.md, e.g. {key.path.rpartition('.')[2]} = {key.example}",
        )

    if key.kind == "pass_options":
        return _pass_options(value, where, wrong)
    if key.kind == "bool":
        if not isinstance(value, bool):
            raise wrong()
        return value
    if key.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong()
        if key.minimum is not None and value < key.minimum:
            raise wrong()
        return value
    if key.kind == "fraction":
        try:
            return parse_fraction(value)
        except ValueError:
            raise wrong() from None
    if key.kind == "strs":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise wrong()
        items = [item.strip() for item in items if item.strip()]
        if not items:
            raise wrong(" (empty)")
        for item in items:
            if key.choices and item not in key.choices:
                raise wrong()
        return items
    if not isinstance(value, str) or not value.strip():
        raise wrong()
    if key.choices and value not in key.choices:
        raise wrong()
    if key.kind == "path":
        path = pathlib.Path(value).expanduser()
        return path if path.is_absolute() else base / path
    return value


def _pass_options(
    value: Any, where: str, wrong: Callable[[], UsageError]
) -> dict[str, dict[str, Any]]:
    """{pass name: {option: value}}, names checked against fdec's pass registry and each
    pass's options (the pass checks the values when the pipeline is planned)."""
    from fdec.passes import REGISTRY

    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise wrong()
    checked: dict[str, dict[str, Any]] = {}
    for name, options in value.items():
        cls = REGISTRY.get(name)
        if cls is None:
            near = difflib.get_close_matches(name, sorted(REGISTRY), n=1)
            raise UsageError(
                f"{where}: pass_options names unknown pass {name!r}",
                f"did you mean {near[0]!r}?" if near else "`fdec passes` lists the passes",
            )
        fields = (
            sorted(f.name for f in dataclasses.fields(cls) if f.init)
            if dataclasses.is_dataclass(cls)
            else []
        )
        for option in options:
            if option not in fields:
                near = difflib.get_close_matches(option, fields, n=1)
                raise UsageError(
                    f"{where}: pass {name} has no option {option!r}",
                    (f"did you mean {near[0]!r}? " if near else "")
                    + f"its options: {', '.join(fields) or 'none'}",
                )
        checked[name] = dict(options)
    return checked


def parse_config(
    data: Mapping[str, Any], source: pathlib.Path, *, where: str | None = None
) -> Config:
    """Check a config table (fdec.toml's top level or pyproject's [tool.fdec]) against SCHEMA.
    `where` names the table in errors (default: the file, and [tool.fdec] in a pyproject)."""
    where = where or str(source) + (" [tool.fdec]" if source.name == PYPROJECT_FILE else "")
    prefix = "tool.fdec." if source.name == PYPROJECT_FILE else ""
    flat: dict[str, Any] = {}

    def walk(table: Mapping[str, Any], path: str) -> None:
        for name, value in table.items():
            dotted = f"{path}{name}"
            if dotted == MATRIX_TABLE:
                continue  # fdec matrix's table (fdec.matrix)
            if isinstance(value, dict) and dotted in _SECTIONS:
                walk(value, dotted + ".")
            elif dotted in _BY_PATH:
                flat[dotted] = value
            else:
                near = suggest_key(dotted)
                raise UsageError(
                    f"{where}: unknown key {prefix}{dotted!r}",
                    f"did you mean {prefix}{near!r}? (keys: docs/config.md)"
                    if near
                    else "see docs/config.md for the keys",
                )

    walk(data, "")
    base = source.parent
    values = {_BY_PATH[path].option: convert(_BY_PATH[path], value, base, where)
              for path, value in flat.items()}  # fmt: skip
    return Config(source, values)


def _read_toml(path: pathlib.Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except OSError as err:
        raise InputError(
            f"cannot read config file {path}: {err.strerror or err}", "check the --config path"
        ) from None
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{path} is not valid TOML: {err}", "fix the file's syntax") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text", "save the config file as UTF-8") from None


def read_config_table(path: pathlib.Path) -> dict[str, Any]:
    """fdec's table of `path`, unchecked: an fdec.toml's top level, or a pyproject's
    [tool.fdec]."""
    path = pathlib.Path(path)
    data = _read_toml(path)
    if path.name == PYPROJECT_FILE:
        table = data.get("tool", {}).get("fdec")
        if table is None:
            raise InputError(f"{path} has no [tool.fdec] table", "add one, or pass fdec.toml")
        if not isinstance(table, dict):
            raise UsageError(f"{path}: tool.fdec must be a table", "write [tool.fdec]")
        data = table
    return data


def load_config(path: pathlib.Path) -> Config:
    """Read and check `path`: an fdec.toml-style file, or a pyproject.toml's [tool.fdec]."""
    path = pathlib.Path(path)
    return parse_config(read_config_table(path), path.absolute())


def discover_config(folder: pathlib.Path | None = None) -> Config | None:
    """The config of `folder` (default: the current directory): its fdec.toml, else its
    pyproject.toml's [tool.fdec] table, else None."""
    folder = pathlib.Path.cwd() if folder is None else pathlib.Path(folder)
    own = folder / CONFIG_FILE
    if own.is_file():
        return load_config(own)
    pyproject = folder / PYPROJECT_FILE
    if pyproject.is_file():
        data = _read_toml(pyproject)
        if isinstance(data.get("tool"), dict) and "fdec" in data["tool"]:
            return load_config(pyproject)
    return None


def merge(
    config: Config | None,
    given: Mapping[str, Any],
    explicit: Callable[[str], bool],
) -> dict[str, Any]:
    """Compile options: an explicitly given command-line value wins, then the config's, then the
    command line's default. `explicit(option)` says whether the user typed the option."""
    values = dict(given)
    for option, value in (config.values if config else {}).items():
        if not explicit(option):
            values[option] = value
    return values


def render_docs() -> str:
    """docs/config.md, generated from SCHEMA."""
    lines = [
        "# fdec config file",
        "",
        "<!-- generated by `python -m fdec.config > docs/config.md` from fdec/config.py's "
        "SCHEMA; tests/test_config.py checks they match -->",
        "",
        "`fdec compile` reads `--config FILE`, else `fdec.toml` in the current directory, else "
        "the `[tool.fdec]` table of `./pyproject.toml`. Options given on the command line "
        "override the file. Unknown keys and wrong types are errors (exit 2) naming the key; "
        "an unknown key names the nearest valid one. Relative paths are relative to the file. "
        "A `[matrix]` table (models × targets × recipes) is read by `fdec matrix` (README, "
        '"Build matrices") and left alone by `fdec compile`.',
        "",
        "| key | type | `fdec compile` option | meaning |",
        "|---|---|---|---|",
    ]
    for key in SCHEMA:
        flag = "MODEL" if key.option == "model" else "--" + key.option.replace("_", "-")
        flag = "-o/--out" if key.option == "out" else flag
        lines.append(f"| `{key.path}` | {key.type_text} | `{flag}` | {key.help} |")
    lines += ["", "Example (`fdec.toml`; in pyproject.toml the same keys go under `[tool.fdec]`, "
              "`[tool.fdec.recipe]`, `[tool.fdec.gates]`):", "", "```toml"]  # fmt: skip
    for section in ["", *_SECTIONS]:
        if section:
            lines += ["", f"[{section}]"]
        lines += [f"{key.name} = {key.example}" for key in SCHEMA if key.section == section]
    lines += ["```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render_docs())
