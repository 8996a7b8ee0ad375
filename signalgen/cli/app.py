"""The typer app every command registers on, the options they share, and how a command loads its
config (`_load`) and prints (`show`). Commands live in the other modules of `signalgen.cli`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from signalgen import __version__
from signalgen.config.models import Environment, Mode
from signalgen.errors import ConfigError

log = logging.getLogger(__name__)


def _width(stream) -> int | None:
    """A terminal's own width; piped output (CI logs, files) takes COLUMNS when set, else 200 (rich's
    default would be 80). Tables are built to fit 80 columns either way (`--wide` shows more)."""
    if stream.isatty():
        return None
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else 200


console = Console(width=_width(sys.stdout))
err_console = Console(stderr=True, width=_width(sys.stderr))

app = typer.Typer(help="signalgen: ML model predictions -> trading signals, per client.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
config_app = typer.Typer(help="Validate and show the resolved configuration.", no_args_is_help=True)
data_app = typer.Typer(help="Market data: sample import.", no_args_is_help=True)
models_app = typer.Typer(help="Train, list and compare the models in the registry.", no_args_is_help=True)
signals_app = typer.Typer(help="List, tail and export stored signals and rejections (works during a run).",
                          no_args_is_help=True)
runs_app = typer.Typer(help="Past runs: status, counts, durations, problems.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.add_typer(signals_app, name="signals")
app.add_typer(runs_app, name="runs")


class Kind(StrEnum):
    SIGNALS = "signals"
    REJECTIONS = "rejections"


class Format(StrEnum):
    TABLE = "table"
    JSON = "json"
    CSV = "csv"
    PARQUET = "parquet"


class Output(StrEnum):
    TABLE = "table"
    JSON = "json"


def _version(value: bool) -> None:
    if value:
        console.print(f"signalgen {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _app(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """signalgen: ML model predictions -> trading signals, per client."""


_AGO = re.compile(r"-?(\d{1,6})\s*(s|m|h|d|w)")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """A time as an operator types it, in UTC: ISO 8601 (`2025-02-01`, `2025-02-01T12:30`, `...Z`,
    `...+01:00`; no zone = UTC), `now`, `today` / `yesterday` (midnight UTC), or an age before now:
    `30m`, `-2h`, `7d`, `1w` (s, m, h, d, w). Raises ValueError saying what is accepted."""
    now = now or datetime.now(timezone.utc)
    word = text.strip().lower()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if word in ("now", "today", "yesterday"):
        return {"now": now, "today": midnight, "yesterday": midnight - timedelta(days=1)}[word]
    if m := _AGO.fullmatch(word):
        return now - timedelta(**{_UNITS[m[2]]: int(m[1])})
    try:
        t = datetime.fromisoformat(word.upper().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a time: {text[:40]!r}; use ISO 8601 (2025-02-01, 2025-02-01T12:30), "
                         "now, today, yesterday, or an age such as 30m, -2h, 7d") from None
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def _time_option(value: str) -> datetime:
    """Parses a `--start` / `--end` / `--since` value (see `parse_time`); usage error (exit 2) otherwise."""
    try:
        return parse_time(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


TIME_HELP = "UTC; ISO 8601, today, yesterday, or an age such as 2h, 30m, 7d"


def environment_ref(value: str | Environment | Path) -> Environment | Path:
    """`--env`: a shipped environment's name, or a path to an environment file (it holds a / or ends in
    .yaml); the file's `name:` then names the environment."""
    if isinstance(value, (Environment, Path)):
        return value
    if value in set(Environment):
        return Environment(value)
    if "/" in value or value.endswith((".yaml", ".yml")):
        return Path(value)
    raise typer.BadParameter(f"{value[:200]!r} is not one of {', '.join(Environment)}, nor a path to an "
                             "environment file (a path holds a '/' or ends in .yaml)")


# Environment or Path: typer takes no union, so the annotation names the usual case.
EnvOpt = Annotated[Environment, typer.Option(
    "--env", "-e", parser=environment_ref, metavar=f"<{'|'.join(Environment)}|PATH>",
    help="Environment profile: a name (environments/<name>.yaml) or the path to an environment file.")]
ModeOpt = Annotated[Mode, typer.Option("--mode", "-m", help="Mode preset (modes/<name>.yaml).")]
RootOpt = Annotated[Optional[Path], typer.Option(
    "--root", help="Folder holding clients/, environments/, modes/ (default: the nearest one from here up).")]
ClientOpt = Annotated[Optional[list[str]], typer.Option("--client", "-c", help="Only this client (repeatable).")]
StrategyOpt = Annotated[Optional[list[str]], typer.Option("--strategy", "-s", help="Only this strategy (repeatable).")]
StartOpt = Annotated[Optional[datetime], typer.Option(parser=_time_option,
                                                     help=f"Start of the date range ({TIME_HELP}).")]
EndOpt = Annotated[Optional[datetime], typer.Option(
    parser=_time_option, help=f"End of the date range ({TIME_HELP}); bars ending in (start, end] run.")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Seed for synthetic data and mock inference.")]
BackendOpt = Annotated[Optional[str], typer.Option(help="Inference backend: onnx (default) or lightgbm.")]
InferenceOpt = Annotated[Optional[str], typer.Option(help="ml_inference override: local or mock.")]
SourceOpt = Annotated[Optional[str], typer.Option("--data-source", help="synthetic, files or stream.")]
OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="table (for people) or json (for programs).")]
WideOpt = Annotated[bool, typer.Option("--wide", help="Every column (the default table fits 80 columns).")]


def find_root(root: Path | None, cwd: Path | None = None) -> Path:
    """`root` as given, or the nearest folder from `cwd` up that holds `clients/`; ConfigError if none."""
    if root is not None:
        return root
    cwd = (cwd or Path.cwd()).resolve()
    for folder in (cwd, *cwd.parents):
        if (folder / "clients").is_dir():
            return folder
    raise ConfigError(f"no clients/ in {cwd}; pass --root")


def _load(env: Environment | Path, mode: Mode, root: Path, clients=None, strategies=None, start=None, end=None,
          seed=None, backend=None, inference=None, data_source=None):
    from signalgen.config.loader import Overrides, load_config

    overrides = Overrides(start=start, end=end, seed=seed, backend=backend, inference=inference,
                          data_source=data_source, strategies=tuple(strategies or ()))
    cfg = load_config(env, mode, root=find_root(root), clients=clients, overrides=overrides)
    _apply(cfg.environment)
    return cfg


def _apply(environment) -> None:
    """What the environment sets for this process: the log level, and the umask every file and folder
    signalgen creates is made with (`paths.umask`, default 077: 0600 files, 0700 folders)."""
    from signalgen.logs import configure

    configure(environment.log_level)
    os.umask(int(environment.paths.umask, 8))


def show(renderable, *, wide: bool = False) -> None:
    """Print a table: the default ones fit the terminal (80 columns); `--wide` ones take their full
    width, past the terminal's (which then wraps their lines)."""
    if not wide:
        console.print(renderable)
        return
    width = console.width
    console.width = 10_000  # Console.print(width=...) cannot exceed the console's own
    try:
        console.print(renderable, crop=False)
    finally:
        console.width = width


def _print_json(data) -> None:
    # plain print: rich would wrap long lines and colour the JSON
    print(json.dumps(data, indent=2, default=str))


def _environment(env: Environment | Path, root: Path | None):
    """The environment profile and the project root; configures logging from its log_level."""
    from signalgen.config.loader import load_environment

    root = find_root(root)
    e = load_environment(env, root=root)
    _apply(e)
    return e, Path(root)


def _registry_dir(env: Environment | Path, root: Path | None) -> Path:
    e, root = _environment(env, root)
    return root / e.paths.registry_dir


def _store(env: Environment | Path, root: Path | None):
    """The environment's signal store, unopened: reads go through a run that holds it."""
    from signalgen.storage import store_for

    e, root = _environment(env, root)
    return store_for(e, root)
