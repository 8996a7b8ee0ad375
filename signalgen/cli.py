"""The command line: `python strategy_runner.py <command>`.

Commands stay thin: parse, load config, call one function, print. Errors map to exit codes
in `main()` only: ConfigError -> 2, other SignalgenError -> its exit_code; no tracebacks.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from signalgen.config.models import Environment, Mode
from signalgen.errors import SignalgenError

# piped output (CI logs, files) gets wide tables instead of rich's 80-column default
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

app = typer.Typer(help="signalgen: ML model predictions -> trading signals, per client.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
config_app = typer.Typer(help="Validate and show the resolved configuration.", no_args_is_help=True)
data_app = typer.Typer(help="Market data: sample import.", no_args_is_help=True)
models_app = typer.Typer(help="Train, list and compare the models in the registry.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")

EnvOpt = Annotated[Environment, typer.Option("--env", "-e", help="Environment profile (environments/<name>.yaml).")]
ModeOpt = Annotated[Mode, typer.Option("--mode", "-m", help="Mode preset (modes/<name>.yaml).")]
RootOpt = Annotated[Path, typer.Option("--root", help="Folder holding clients/, environments/, modes/.")]
ClientOpt = Annotated[Optional[list[str]], typer.Option("--client", "-c", help="Only this client (repeatable).")]
StrategyOpt = Annotated[Optional[list[str]], typer.Option("--strategy", "-s", help="Only this strategy (repeatable).")]
StartOpt = Annotated[Optional[datetime], typer.Option(help="Start of the date range (UTC).")]
EndOpt = Annotated[Optional[datetime], typer.Option(help="End of the date range (UTC); bars ending in (start, end] run.")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Seed for synthetic data and mock inference.")]
BackendOpt = Annotated[Optional[str], typer.Option(help="Inference backend: onnx (default) or lightgbm.")]
InferenceOpt = Annotated[Optional[str], typer.Option(help="ml_inference override: local or mock.")]
SourceOpt = Annotated[Optional[str], typer.Option("--data-source", help="synthetic, files or stream.")]


def _load(env: Environment, mode: Mode, root: Path, clients=None, strategies=None, start=None, end=None,
          seed=None, backend=None, inference=None, data_source=None):
    from signalgen.config.loader import Overrides, load_config

    overrides = Overrides(start=start, end=end, seed=seed, backend=backend, inference=inference,
                          data_source=data_source, strategies=tuple(strategies or ()))
    return load_config(env, mode, root=root, clients=clients, overrides=overrides)


@config_app.command("validate")
def config_validate(env: EnvOpt = Environment.LOCAL_DEV, mode: ModeOpt = Mode.HISTORICAL,
                    root: RootOpt = Path("."), client: ClientOpt = None) -> None:
    """Load and check every config layer; list the workers it expands to."""
    from signalgen.process.specs import worker_specs
    from signalgen.report import workers_table

    cfg = _load(env, mode, root, clients=client)
    specs = worker_specs(cfg)
    console.print(workers_table(specs))
    console.print(f"[green]ok[/green]: {len(cfg.clients)} clients, {len(specs)} workers, "
                  f"config hash {cfg.config_hash[:12]}")


@config_app.command("show")
def config_show(env: EnvOpt = Environment.LOCAL_DEV, mode: ModeOpt = Mode.HISTORICAL,
                root: RootOpt = Path("."), client: ClientOpt = None) -> None:
    """Print the resolved configuration as YAML, secrets redacted."""
    import yaml

    from signalgen.config.loader import redacted

    cfg = _load(env, mode, root, clients=client)
    console.print(yaml.safe_dump(redacted(cfg), sort_keys=False), markup=False, highlight=False)


@data_app.command("import-sample")
def data_import_sample(env: EnvOpt = Environment.LOCAL_DEV, root: RootOpt = Path("."),
                       data_dir: Annotated[Optional[Path], typer.Option(help="Override paths.data_dir.")] = None) -> None:
    """Import real daily bars shipped offline by bokeh_sampledata into the files source."""
    from signalgen.data.sample import import_sample

    if data_dir is None:
        cfg = _load(env, Mode.HISTORICAL, root)
        data_dir = Path(cfg.root) / cfg.environment.paths.data_dir
    for path, rows in import_sample(data_dir):
        console.print(f"{path}  {rows} bars")


@models_app.command("train")
def models_train(env: EnvOpt = Environment.LOCAL_DEV, root: RootOpt = Path("."), seed: int = 7,
                 registry: Annotated[Optional[Path], typer.Option(help="Override paths.registry_dir.")] = None) -> None:
    """Train the demo LightGBM models (5m synthetic, 1d real sample bars); register LightGBM text + ONNX."""
    from signalgen.models.train import train_daily_models, train_demo_models
    from signalgen.report import cards_table

    registry = registry or _registry_dir(env, root)
    cards = train_demo_models(registry, seed=seed) + train_daily_models(registry, seed=seed)
    console.print(cards_table(cards))


@models_app.command("list")
def models_list(env: EnvOpt = Environment.LOCAL_DEV, root: RootOpt = Path("."),
                registry: Annotated[Optional[Path], typer.Option(help="Override paths.registry_dir.")] = None) -> None:
    """List the models in the registry (latest version of each)."""
    from signalgen.models.registry import ModelRegistry
    from signalgen.report import cards_table

    reg = ModelRegistry(registry or _registry_dir(env, root))
    console.print(cards_table([reg.card(m) for m in reg.ids()]))


@models_app.command("parity")
def models_parity(env: EnvOpt = Environment.LOCAL_DEV, mode: ModeOpt = Mode.HISTORICAL,
                  root: RootOpt = Path("."), bars: Annotated[int, typer.Option(help="Bars per symbol.")] = 20_000,
                  seed: int = 11) -> None:
    """Compare ONNX Runtime and LightGBM outputs on the same bars; count threshold flips per client."""
    from signalgen.models.parity import parity_report
    from signalgen.report import parity_table

    cfg = _load(env, mode, root)
    console.print(parity_table(parity_report(cfg, bars_per_symbol=bars, seed=seed)))


@app.command("run")
def run(env: EnvOpt = Environment.LOCAL_DEV, mode: ModeOpt = Mode.HISTORICAL, root: RootOpt = Path("."),
        client: ClientOpt = None, strategy: StrategyOpt = None, start: StartOpt = None, end: EndOpt = None,
        seed: SeedOpt = None, backend: BackendOpt = None, inference: InferenceOpt = None,
        data_source: SourceOpt = None,
        progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True) -> None:
    """Run the strategy channels: bars -> features -> models -> signals -> store and outputs."""
    from signalgen.modes import run_mode
    from signalgen.report import summary_table

    cfg = _load(env, mode, root, client, strategy, start, end, seed, backend, inference, data_source)
    report = run_mode(cfg, progress=progress and console.is_terminal)
    console.print(summary_table(report))


def _registry_dir(env: Environment, root: Path) -> Path:
    from signalgen.config.loader import load_environment

    e = load_environment(env, root=root)
    return Path(root) / e.paths.registry_dir


def main(argv: list[str] | None = None) -> int:
    """Entry point; the one place errors become exit codes.

    Usage errors are typer's (exit 2 with usage). Our errors print one line, no traceback:
    ConfigError -> 2, TransientError -> 75, any other SignalgenError -> 1.
    """
    try:
        app(args=argv)  # standalone: raises SystemExit with typer's own exit code
    except SignalgenError as exc:
        err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
