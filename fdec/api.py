"""fdec's Python API (`fdec.compile`, `fdec.load`, `Build`) and the multi-target compile both it
and `fdec compile --target a,b` use."""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fdec.config import SCHEMA, Config, convert, load_config, merge
from fdec.errors import (
    EXIT_DOES_NOT_FIT,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_QUALITY_GATE,
    EXIT_USAGE,
    CompileError,
    FdecError,
    InputError,
    UsageError,
)

__all__ = [
    "Build",
    "TargetOutcome",
    "compile",
    "compile_options",
    "compile_targets",
    "load",
    "resolve_settings",
    "split_targets",
    "worst_exit_code",
]

_REPORT = "report.json"
_RUNTIME = "fdec-runtime.json"
_MANIFEST = "fdec-build.json"


class Build:
    """A build folder: `path`, its `report` (report.json as a dict), `run(prompt)`."""

    def __init__(self, path: pathlib.Path | str, report: dict[str, Any] | None = None):
        self.path = pathlib.Path(path)
        self._report = report
        self._loaded: Any = None

    @property
    def report(self) -> dict[str, Any]:
        if self._report is None:
            from fdec.report.diff import load_build

            self._report = load_build(self.path)
        return self._report

    @property
    def ok(self) -> bool:
        return bool((self.report.get("verification") or {}).get("ok"))

    @property
    def target(self) -> str | None:
        return (self.report.get("target") or {}).get("name")

    def run(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        chat_template: bool = True,
        stream: Callable[[str], None] | None = None,
        speculative: str | None = None,
        k: int = 4,
        draft_build: pathlib.Path | str | None = None,
        draft_min_probability: float = 0.0,
    ) -> dict[str, Any]:
        """Generate from `prompt` (what `fdec run --json` prints): text, tokens, timings. The
        ONNX Runtime session is opened on the first call and kept. `speculative`
        ("prompt-lookup" or "draft", greedy only) verifies up to `k` drafts per step; "draft"
        drafts with `draft_build` (default: the build's draft/ folder), stopping at a token it
        gives less than `draft_min_probability`."""
        from fdec.runner import load_build, run_prompt

        if self._loaded is None:
            self._loaded = load_build(self.path)
        return run_prompt(
            self._loaded, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
            top_k=top_k, top_p=top_p, seed=seed, chat_template=chat_template, stream=stream,
            speculative=speculative, k=k, draft_build=draft_build,
            draft_min_probability=draft_min_probability,
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"Build({str(self.path)!r})"


def load(path: pathlib.Path | str) -> Build:
    """The build in `path` (a folder `fdec compile` wrote); InputError when it is not one."""
    path = pathlib.Path(path)
    if (path / _REPORT).is_file() and (path / _RUNTIME).is_file():
        return Build(path)
    names = sorted(p.parent.name for p in path.glob(f"*/{_REPORT}")) if path.is_dir() else []
    if names:
        raise InputError(
            f"{path} holds one build per target ({', '.join(names)})",
            f"load one of them: fdec.load('{path / names[0]}')",
        )
    raise InputError(f"{path} is not an fdec build (no {_REPORT})", "run fdec compile first")


# --- targets ---


def split_targets(target: str | Sequence[str]) -> list[str]:
    """`"h100,a100"` or `["h100", "a100"]` as a list of names (or .toml paths)."""
    items = target.split(",") if isinstance(target, str) else list(target)
    names = [str(item).strip() for item in items if str(item).strip()]
    if not names:
        raise UsageError("no target given", "pass --target cpu, or several: --target h100,a100")
    return names


# Which exit code a multi-target build returns when targets fail differently: a failure of
# fdec or of the model (1) outranks a missed quality gate (3), which outranks a model that does
# not fit the target's memory (4), which outranks an option the target refuses (2, e.g. fp8 on
# an a100).
_SEVERITY = {EXIT_OK: 0, EXIT_USAGE: 1, EXIT_DOES_NOT_FIT: 2, EXIT_QUALITY_GATE: 3, EXIT_FAILURE: 4}


def worst_exit_code(codes: Sequence[int]) -> int:
    return max(codes, key=lambda code: _SEVERITY.get(code, 5), default=EXIT_OK)


@dataclasses.dataclass
class TargetOutcome:
    """One target of a multi-target build: its folder and its report, or its error."""

    target: str
    out: pathlib.Path
    report: dict[str, Any] | None = None
    error: FdecError | None = None

    @property
    def exit_code(self) -> int:
        return self.error.exit_code if self.error else EXIT_OK


def _check_targets(targets: list[str], out: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
    """Every target loaded before any work (an unknown name fails here, exit 2); the folder
    each builds into: OUT/<target name>."""
    from fdec.targets import load_target

    folders: dict[str, str] = {}
    planned = []
    for given in targets:
        name = load_target(given).name
        if name in folders:
            raise UsageError(
                f"target {name} is given twice ({folders[name]!r} and {given!r})",
                "list each target once",
            )
        folders[name] = given
        planned.append((given, out / name))
    if (out / _MANIFEST).is_file():
        raise UsageError(
            f"{out} holds a single-target build; a multi-target build writes {out}/<target>/",
            "choose another -o folder",
        )
    return planned


def compile_targets(
    options: Any,
    targets: Sequence[str],
    *,
    progress: Callable[[str], None] = lambda message: None,
    wait: bool = True,
) -> list[TargetOutcome]:
    """Compile `options` (a CompileOptions) once per target into `options.out/<target>`.

    The targets run one after another with the same cache folder, so the export, the PyTorch
    reference, calibration statistics and target-independent passes computed for the first are
    read from fdec's cache by the next (fdec.cache). One target failing does not stop the
    others: each outcome holds its report or its error. Unknown targets fail before any work.
    """
    from fdec.build import build_lock
    from fdec.compile import compile_model

    out = pathlib.Path(options.out)
    planned = _check_targets(list(targets), out)
    outcomes = []
    for given, folder in planned:
        name = folder.name

        def tagged(message: str, name: str = name) -> None:
            progress(f"[{name}] {message}")

        outcome = TargetOutcome(name, folder)
        try:
            with build_lock(folder, wait=wait, progress=tagged):
                result = compile_model(
                    dataclasses.replace(options, target=given, out=folder), tagged
                )
            outcome.report = result.report
        except FdecError as err:
            outcome.error = err
        except Exception as err:
            outcome.error = CompileError(
                f"internal error {type(err).__name__}: {err}", "rerun this target alone with -vv"
            )
        tagged("ok" if outcome.error is None else f"failed: {outcome.error.one_line()}")
        outcomes.append(outcome)
    return outcomes


# --- settings: command line or keyword arguments, over a config file ---

_KEYS = {key.option: key for key in SCHEMA}


def resolve_settings(
    given: Mapping[str, Any],
    explicit: Callable[[str], bool],
    config: Config | None,
) -> dict[str, Any]:
    """Compile settings from `given` values (the command line's or the API's keywords) over a
    checked config: `model`, `out`, `targets` (a list) and CompileOptions fields."""
    values = merge(config, given, explicit)
    if not values.get("model"):
        raise UsageError("no MODEL given", 'pass MODEL, or set model = "..." in fdec.toml')
    if values.get("out") is None:
        raise UsageError("no build folder given", 'pass -o DIR, or set out = "..." in fdec.toml')
    target = values.pop("target", None)
    values["targets"] = split_targets("cpu" if target is None else target)  # "" is refused
    if isinstance(values.get("passes"), list):
        values["passes"] = ",".join(values["passes"])
    if values.get("emit") is not None:
        values["emit"] = tuple(values["emit"])
    return values


def _compile_fields() -> list[str]:
    from fdec.compile import CompileOptions

    return [field.name for field in dataclasses.fields(CompileOptions)]


def compile_options(
    model: str | pathlib.Path | None = None,
    target: str | Sequence[str] | None = None,
    out: str | pathlib.Path | None = None,
    *,
    config: str | pathlib.Path | None = None,
    **options: Any,
) -> tuple[Any, list[str]]:
    """The CompileOptions `fdec.compile(model, target, out, config=config, **options)` builds
    (for its first target), and its targets: keywords checked and converted as the config file's
    values are. fdec.matrix checks its cells with it."""
    from fdec.compile import CompileOptions

    fields = _compile_fields()
    for name in options:
        if name not in fields or name in ("model", "out", "target"):
            near = difflib.get_close_matches(name, fields, n=1)
            raise UsageError(
                f"fdec.compile() got an unknown option {name!r}",
                f"did you mean {near[0]!r}?" if near else f"options: {', '.join(fields)}",
            )
    base = pathlib.Path.cwd()
    given: dict[str, Any] = {}
    for name, value in options.items():
        key = _KEYS.get(name)
        if key is not None and value is not None:
            if key.kind == "strs" and isinstance(value, tuple):
                value = list(value)
            value = convert(key, value, base, "fdec.compile()", label=name)
        elif name == "dump_dir" and value is not None:
            value = pathlib.Path(value)
        given[name] = value
    given.update(model=str(model) if model is not None else None, target=target)
    given["out"] = pathlib.Path(out) if out is not None else None
    loaded = load_config(pathlib.Path(config)) if config is not None else None
    explicit = {name for name, value in given.items() if value is not None}
    if given["out"] is None and (loaded is None or "out" not in loaded.values):
        given["out"] = pathlib.Path(tempfile.mkdtemp(prefix="fdec-")) / "build"
    settings = resolve_settings(given, explicit.__contains__, loaded)
    targets = settings.pop("targets")
    settings = {name: value for name, value in settings.items() if value is not None}
    return CompileOptions(**settings, target=targets[0]), targets


def compile(
    model: str | pathlib.Path | None = None,
    target: str | Sequence[str] | None = None,
    out: str | pathlib.Path | None = None,
    *,
    config: str | pathlib.Path | None = None,
    progress: Callable[[str], None] | None = None,
    wait: bool = True,
    **options: Any,
) -> Any:
    """Compile `model` for `target` into `out`, like `fdec compile`; returns a `Build`.

    `options` are `fdec compile`'s options as keywords (quantize="int4", keep_fp=2,
    max_ppl_increase="5%" or 0.05, calibration=path, emit=["hf-checkpoint"], passes=[...],
    backend, max_batch, max_seq_len, cache_dir, verify_each, ...). `config` reads an fdec.toml
    (or a pyproject.toml's [tool.fdec]) whose values apply where no argument is given. Without
    `out` the build goes to a new temporary folder. Several targets (a list or "a,b") return
    {target name: Build}; when any fails, the worst error is raised after all were tried, with
    the builds that succeeded in its `builds` attribute. Errors are fdec.errors types.
    """
    asked, targets = compile_options(model, target, out, config=config, **options)
    report_progress = progress or (lambda message: None)
    if len(targets) > 1:
        outcomes = compile_targets(asked, targets, progress=report_progress, wait=wait)
        builds = {o.target: Build(o.out, o.report) for o in outcomes if o.error is None}
        failed = [o for o in outcomes if o.error is not None]
        if failed:
            code = worst_exit_code([o.exit_code for o in failed])
            error = next(o.error for o in failed if o.exit_code == code)
            error.builds = builds  # type: ignore[union-attr]
            error.errors = {o.target: o.error for o in failed}  # type: ignore[union-attr]
            raise error  # type: ignore[misc]
        return builds
    from fdec.build import build_lock
    from fdec.compile import compile_model

    with build_lock(asked.out, wait=wait, progress=progress):
        result = compile_model(asked, report_progress)
    return Build(result.out, result.report)
