"""Commands of the store and the batch run: run, config, data, models, signals, runs.

Registered on `signalgen.cli.app.app`; `signalgen.cli` imports this module so they exist.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from signalgen.cli.app import (
    BackendOpt, ClientOpt, EndOpt, EnvOpt, Format, InferenceOpt, Kind, ModeOpt, Output, OutputOpt,
    RootOpt, SeedOpt, SourceOpt, StartOpt, StrategyOpt, TIME_HELP, WideOpt, _environment, _load,
    _print_json, _registry_dir, _store, _time_option, app, config_app, console, data_app, err_console,
    find_root, models_app, runs_app, show, signals_app,
)
from signalgen.config.models import Environment, Mode
from signalgen.errors import ConfigError, SignalgenError


@config_app.command("validate")
def config_validate(env: EnvOpt = Environment.LOCAL_DEV, mode: ModeOpt = Mode.HISTORICAL,
                    root: RootOpt = None, client: ClientOpt = None, output: OutputOpt = Output.TABLE,
                    wide: WideOpt = False) -> None:
    """Load and check every config layer and what `run` needs (models, data, outputs); list the workers.

    Exit 2 when `run` would refuse or degrade anything: every problem is listed, one line each.
    """
    from signalgen.modes.preflight import preflight
    from signalgen.errors import ConfigError
    from signalgen.config.workers import worker_specs
    from signalgen.report import workers_table

    try:
        cfg = _load(env, mode, root, clients=client)
    except ConfigError as exc:
        if output is Output.JSON:
            _print_json({"ok": False, "clients": [], "workers": [], "config_hash": None, "problems": [str(exc)]})
        raise
    specs = worker_specs(cfg)
    problems = preflight(cfg)
    if output is Output.JSON:
        workers = [{"id": s.id, "client": s.client.id, "strategy": s.strategy.id, "symbol": s.symbol,
                    "timeframe": s.timeframe, "routing": s.routing.value,
                    "models": [m.model_id for m in s.strategy.models]} for s in specs]
        _print_json({"ok": not problems, "clients": [c.id for c in cfg.clients], "workers": workers,
                     "config_hash": cfg.config_hash, "problems": problems})
    else:
        show(workers_table(specs, wide=wide), wide=wide)
        for problem in problems:
            console.print(f"[red]problem[/red]: {escape(problem)}", highlight=False)
        if not problems:
            console.print(f"[green]ok[/green]: {len(cfg.clients)} clients, {len(specs)} workers, "
                          f"config hash {cfg.config_hash[:12]}")
    if problems:
        err_console.print(f"[bold red]error:[/bold red] {len(problems)} problem(s): `run` would refuse this "
                          "config or reject some workers' bars", highlight=False)
        raise typer.Exit(2)


@config_app.command("show")
def config_show(env: EnvOpt = Environment.LOCAL_DEV, mode: ModeOpt = Mode.HISTORICAL,
                root: RootOpt = None, client: ClientOpt = None) -> None:
    """Print the resolved configuration as YAML, secrets redacted."""
    import yaml

    from signalgen.config.loader import redacted

    cfg = _load(env, mode, root, clients=client)
    console.print(yaml.safe_dump(redacted(cfg), sort_keys=False), markup=False, highlight=False)


@data_app.command("import-sample")
def data_import_sample(env: EnvOpt = Environment.LOCAL_DEV, root: RootOpt = None,
                       data_dir: Annotated[Optional[Path], typer.Option(help="Override paths.data_dir.")] = None) -> None:
    """Import real daily bars shipped offline by bokeh_sampledata into the files source."""
    from signalgen.data.sample import import_sample

    if data_dir is None:
        environment, root = _environment(env, root)
        data_dir = root / environment.paths.data_dir
    for path, rows in import_sample(data_dir):
        console.print(f"{path}  {rows} bars")


@models_app.command("train")
def models_train(env: EnvOpt = Environment.LOCAL_DEV, root: RootOpt = None, seed: int = 7,
                 registry: Annotated[Optional[Path], typer.Option(help="Override paths.registry_dir.")] = None) -> None:
    """Train the demo LightGBM models (5m synthetic, 1d real sample bars); register LightGBM text + ONNX."""
    from signalgen.models.train import train_daily_models, train_demo_models
    from signalgen.report import cards_table

    registry = registry or _registry_dir(env, root)
    cards = train_demo_models(registry, seed=seed) + train_daily_models(registry, seed=seed)
    console.print(cards_table(cards))


@models_app.command("list")
def models_list(env: EnvOpt = Environment.LOCAL_DEV, root: RootOpt = None,
                registry: Annotated[Optional[Path], typer.Option(help="Override paths.registry_dir.")] = None) -> None:
    """List the models in the registry (latest version of each)."""
    from signalgen.models.registry import ModelRegistry
    from signalgen.report import cards_table

    reg = ModelRegistry(registry or _registry_dir(env, root))
    console.print(cards_table([reg.card(m) for m in reg.ids()]))


@models_app.command("parity")
def models_parity(env: EnvOpt = Environment.LOCAL_DEV, mode: ModeOpt = Mode.HISTORICAL,
                  root: RootOpt = None, bars: Annotated[int, typer.Option(help="Bars per symbol.")] = 20_000,
                  seed: int = 11) -> None:
    """Compare ONNX Runtime and LightGBM outputs on the same bars; count threshold flips per client."""
    from signalgen.models.parity import parity_report
    from signalgen.report import parity_table

    cfg = _load(env, mode, root)
    console.print(parity_table(parity_report(cfg, bars_per_symbol=bars, seed=seed)))


@app.command("run")
def run(env: EnvOpt = Environment.LOCAL_DEV, mode: ModeOpt = Mode.HISTORICAL, root: RootOpt = None,
        client: ClientOpt = None, strategy: StrategyOpt = None, start: StartOpt = None, end: EndOpt = None,
        seed: SeedOpt = None, backend: BackendOpt = None, inference: InferenceOpt = None,
        data_source: SourceOpt = None,
        progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
        workers: Annotated[int, typer.Option(
            "--workers", "-w", min=0, help="Worker processes for historical and mock runs (0: one per core; "
                                           "1: in this process).")] = 1,
        shard: Annotated[Optional[str], typer.Option(
            help="i/N: run only shard i of N, the share `start --shard i/N` takes (rendezvous hashing of "
                 "worker ids); N such runs together decide what one run decides. Concurrent runs need a "
                 "store many processes write (cloud-dev); DuckDB takes one writer: use --workers.")] = None,
        output: OutputOpt = Output.TABLE) -> None:
    """Run the strategy channels: bars -> features -> models -> signals -> store and outputs.

    Exits 1 after the summary when a worker failed; 130 / 143 when stopped by SIGINT / SIGTERM.
    """
    from signalgen.config.workers import worker_specs
    from signalgen.modes import run_mode
    from signalgen.modes.parallel import default_processes
    from signalgen.process.shard import parse_shard, take_shard
    from signalgen.report import report_dict, summary_table

    shards = parse_shard(shard) if shard is not None else None
    cfg = _load(env, mode, root, client, strategy, start, end, seed, backend, inference, data_source)
    share = (f"{shards[0]}/{shards[1]}", take_shard(worker_specs(cfg), *shards)) if shards else None
    report = run_mode(cfg, progress=progress and console.is_terminal and output is Output.TABLE,
                      processes=workers or default_processes(), shard=share)
    if output is Output.JSON:
        _print_json(report_dict(report))
    else:
        console.print(summary_table(report))
    if report.status == "failed":
        raise typer.Exit(1)


# ---------------------------------------------------------------- signals


SignalClientOpt = Annotated[Optional[list[str]], typer.Option("--client", "-c", help="Only this client (repeatable).")]
SymbolOpt = Annotated[Optional[list[str]], typer.Option("--symbol", help="Only this symbol (repeatable).")]
ModesOpt = Annotated[Optional[list[Mode]], typer.Option(
    "--mode", "-m", help="Only signals of this mode (repeatable; default: every mode).")]
KindOpt = Annotated[Kind, typer.Option("--kind", help="signals, or rejected candidates with their reasons.")]
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="table, json (one object per line), csv, parquet.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Write to this file instead of stdout (parquet needs it).")]
BarStartOpt = Annotated[Optional[datetime], typer.Option(parser=_time_option,
                                                        help=f"Only bars ending after this time ({TIME_HELP}).")]
BarEndOpt = Annotated[Optional[datetime], typer.Option(parser=_time_option,
                                                      help=f"Only bars ending at or before this time ({TIME_HELP}).")]


def _signals_query(root: Path | None, kind: Kind, client, strategy, symbol, mode, start, end, **more):
    """The ReadQuery of the `signals` commands. As `run` does, exit 2 (ConfigError) for a client with no
    clients/<id>.yaml or a start that is not before the end."""
    from signalgen.config.loader import _client_paths
    from signalgen.storage.reads import ReadQuery

    if client:
        _client_paths(find_root(root), client)  # the loader's own check and message
    if start is not None and end is not None and start >= end:
        raise ConfigError(f"start ({start.isoformat()}) must be before end ({end.isoformat()})", field="--start")
    return ReadQuery(kind=kind.value, clients=tuple(client or ()), strategies=tuple(strategy or ()),
                     symbols=tuple(symbol or ()), modes=tuple(m.value for m in mode or ()),
                     start=start, end=end, **more)


def _emit(df, kind: Kind, fmt: Format, out: Path | None, *, header: bool = True, wide: bool = False) -> None:
    """Print or write signal/rejection rows in `fmt`."""
    from signalgen.report import flat_records, records_table

    if fmt is Format.PARQUET:
        if out is None:
            raise ConfigError("--format parquet needs --out FILE")
        df.write_parquet(out)
    elif fmt is Format.TABLE:
        if out is not None:
            raise ConfigError("--out needs --format json, csv or parquet")
        show(records_table(df, kind.value, show_header=header, wide=wide), wide=wide)
        return
    else:
        text = (df.write_ndjson() if fmt is Format.JSON
                else flat_records(df).write_csv(include_header=header, datetime_format="%Y-%m-%dT%H:%M:%S%.6fZ"))
        if out is None:
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            out.write_text(text)
    if out is not None:
        err_console.print(f"{df.height:,} {kind.value} -> {out}", highlight=False)


@signals_app.command("list")
def signals_list(env: EnvOpt = Environment.LOCAL_DEV, root: RootOpt = None, client: SignalClientOpt = None,
                 strategy: StrategyOpt = None, symbol: SymbolOpt = None, mode: ModesOpt = None,
                 start: BarStartOpt = None, end: BarEndOpt = None, kind: KindOpt = Kind.SIGNALS,
                 limit: Annotated[int, typer.Option(min=1, max=9_999_999,
                                                    help="At most this many rows (oldest first).")] = 100,
                 fmt: FormatOpt = Format.TABLE, out: OutOpt = None, wide: WideOpt = False) -> None:
    """List stored signals (or rejections) by bar time, oldest first.

    At most --limit rows; a line on stderr says when more match."""
    query = _signals_query(root, kind, client, strategy, symbol, mode, start, end, limit=limit + 1)
    df = _store(env, root).read(query)
    _emit(df.head(limit), kind, fmt, out, wide=wide)
    if df.height > limit:
        last = df["bar_time"][limit - 1]
        err_console.print(f"--limit {limit:,} reached: more {kind.value} match after {last:%Y-%m-%d %H:%M:%S} "
                          "(raise --limit or pass --start)", highlight=False, soft_wrap=True)


@signals_app.command("export")
def signals_export(env: EnvOpt = Environment.LOCAL_DEV, root: RootOpt = None, client: SignalClientOpt = None,
                   strategy: StrategyOpt = None, symbol: SymbolOpt = None, mode: ModesOpt = None,
                   start: BarStartOpt = None, end: BarEndOpt = None, kind: KindOpt = Kind.SIGNALS,
                   fmt: Annotated[Format, typer.Option("--format", "-f", help="csv, json (one object per line), "
                                                       "parquet.")] = Format.CSV,
                   out: OutOpt = None) -> None:
    """Export every matching signal (or rejection), oldest first, as csv, json or parquet."""
    if fmt is Format.TABLE:
        raise ConfigError("export writes csv, json or parquet; use `signals list` for a table")
    df = _store(env, root).read(_signals_query(root, kind, client, strategy, symbol, mode, start, end))
    _emit(df, kind, fmt, out)


class CountBy(StrEnum):
    CLIENT = "client"
    STRATEGY = "strategy"
    SYMBOL = "symbol"
    TIMEFRAME = "timeframe"
    MODE = "mode"


@signals_app.command("count")
def signals_count(env: EnvOpt = Environment.LOCAL_DEV, root: RootOpt = None, client: SignalClientOpt = None,
                  strategy: StrategyOpt = None, symbol: SymbolOpt = None, mode: ModesOpt = None,
                  start: BarStartOpt = None, end: BarEndOpt = None,
                  by: Annotated[Optional[list[CountBy]], typer.Option(
                      "--by", help="Count per client, strategy, symbol, timeframe and/or mode (repeatable; "
                                   "default: client, strategy, mode).")] = None,
                  output: OutputOpt = Output.TABLE) -> None:
    """How many signals and rejections were stored, per client, strategy and mode (`--by`).

    For example `--client odum --start today`: one line per group, then the total."""
    import polars as pl

    from signalgen.report import counts_table

    by = list(dict.fromkeys(by)) if by is not None else [CountBy.CLIENT, CountBy.STRATEGY, CountBy.MODE]
    cols = tuple("client_id" if b is CountBy.CLIENT else "strategy_id" if b is CountBy.STRATEGY else b.value
                 for b in by)
    store = _store(env, root)
    frames = [store.read(_signals_query(root, kind, client, strategy, symbol, mode, start, end, count_by=cols))
              .rename({"count": kind.value}) for kind in Kind]
    if cols:
        df = frames[0].join(frames[1], on=list(cols), how="full", coalesce=True).sort(list(cols))
    else:
        df = pl.concat(frames, how="horizontal")
    df = df.with_columns(pl.col(k.value).fill_null(0) for k in Kind).rename(
        {"client_id": "client", "strategy_id": "strategy"}, strict=False)
    total = {k.value: int(df[k.value].sum()) for k in Kind}
    if output is Output.JSON:
        _print_json({"start": start and start.isoformat(), "end": end and end.isoformat(),
                     "by": [b.value for b in by], "rows": df.to_dicts(), "total": total})
    else:
        console.print(counts_table(df, [b.value for b in by], total, start=start, end=end))


FOLLOW_OVERLAP_S = 120  # rows generated up to this long before the newest seen are checked again


@signals_app.command("tail")
def signals_tail(env: EnvOpt = Environment.LOCAL_DEV, root: RootOpt = None, client: SignalClientOpt = None,
                 strategy: StrategyOpt = None, symbol: SymbolOpt = None, mode: ModesOpt = None,
                 kind: KindOpt = Kind.SIGNALS,
                 n: Annotated[int, typer.Option("-n", "--lines", min=1, max=100_000,
                                                help="How many of the newest rows.")] = 20,
                 follow: Annotated[bool, typer.Option("--follow", help="Keep printing new rows until Ctrl-C.")] = False,
                 interval: Annotated[float, typer.Option(min=0.2, max=60.0, help="Seconds between polls.")] = 2.0,
                 fmt: Annotated[Format, typer.Option("--format", "-f",
                                                     help="table, json (one object per line) or csv.")] = Format.TABLE,
                 wide: WideOpt = False) -> None:
    """Print the newest N signals (by bar time); with --follow, then every new one as it is stored."""
    from datetime import timedelta

    import polars as pl

    if fmt is Format.PARQUET:
        raise ConfigError("tail prints table, json or csv; use `signals export --format parquet --out FILE`")
    store = _store(env, root)
    query = _signals_query(root, kind, client, strategy, symbol, mode, None, None)
    df = store.read(query.model_copy(update={"limit": n, "newest": True})).reverse()
    _emit(df, kind, fmt, None, wide=wide)
    if not follow:
        return
    id_col = "signal_id" if kind is Kind.SIGNALS else "rejection_id"
    # A row is new when its id was not printed yet; ids generated before the watermark minus the
    # overlap are forgotten, so memory stays bounded however long the tail runs.
    seen = dict(zip(df[id_col], df["generated_at"]))
    mark = df["generated_at"].max() if df.height else None
    try:
        while True:
            time.sleep(interval)
            since = None if mark is None else mark - timedelta(seconds=FOLLOW_OVERLAP_S)
            new = store.read(query.model_copy(update={"since": since}))
            new = new.filter(~pl.col(id_col).is_in(list(seen)))
            if new.height:
                new = new.sort("generated_at", "bar_time", maintain_order=True)
                _emit(new, kind, fmt, None, header=fmt is Format.TABLE, wide=wide)
                seen.update(zip(new[id_col], new["generated_at"]))
                mark = max(d for d in (mark, new["generated_at"].max()) if d is not None)
                floor = mark - timedelta(seconds=FOLLOW_OVERLAP_S)
                seen = {k: g for k, g in seen.items() if g >= floor}
    except KeyboardInterrupt:
        return


# ---------------------------------------------------------------- runs


@runs_app.command("list")
def runs_list(env: EnvOpt = Environment.LOCAL_DEV, root: RootOpt = None, client: SignalClientOpt = None,
              mode: ModesOpt = None,
              limit: Annotated[int, typer.Option(min=1, max=9_999_999, help="At most this many runs.")] = 20,
              output: OutputOpt = Output.TABLE, wide: WideOpt = False) -> None:
    """The newest runs: status, duration and counts."""
    from signalgen.report import runs_table, run_dict
    from signalgen.storage.reads import ReadQuery

    df = _store(env, root).read(ReadQuery(kind="runs", clients=tuple(client or ()),
                                          modes=tuple(m.value for m in mode or ()), limit=limit, newest=True))
    if output is Output.JSON:  # the config snapshots are for `runs show`
        _print_json([run_dict(r) for r in df.drop("config", strict=False).iter_rows(named=True)])
    else:
        show(runs_table(df, wide=wide, now=datetime.now(timezone.utc)), wide=wide)


@runs_app.command("show")
def runs_show(run_id: Annotated[str, typer.Argument(help="The run id (as `runs list` shows it).")],
              env: EnvOpt = Environment.LOCAL_DEV, root: RootOpt = None, output: OutputOpt = Output.TABLE) -> None:
    """Everything recorded about one run: status, times, counts, what produced its bars (data source,
    seed, data files' sha256; the config it ran with `--output json`), rejections by reason."""
    from signalgen.report import run_detail, run_dict
    from signalgen.storage.reads import ReadQuery

    store = _store(env, root)
    df = store.read(ReadQuery(kind="runs", run_id=run_id[:200], limit=1))
    if df.is_empty():
        raise SignalgenError(f"no run {run_id[:80]!r} in {store}; `runs list` shows the recorded runs")
    row = df.row(0, named=True)
    if output is Output.JSON:
        _print_json(run_dict(row))
    else:
        console.print(run_detail(row))
