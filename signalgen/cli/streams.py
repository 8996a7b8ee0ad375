"""Stream commands (feed, consume, clients grant, recorder): registered on signalgen.cli.app.app.

Redis Streams layout and contract: docs/streams.md. Commands stay thin: load config, call one
function, print.
"""

from __future__ import annotations

import heapq
import signal
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from typing import Annotated, Optional

import typer

from signalgen.cli.app import EnvOpt, ModeOpt, RootOpt, _load, app, console, err_console
from signalgen.config.models import Environment, Mode, RunConfig
from signalgen.errors import ConfigError

clients_app = typer.Typer(help="Per-client access to the environment's streams.", no_args_is_help=True)
app.add_typer(clients_app, name="clients")

class FeedSource(StrEnum):
    SYNTHETIC = "synthetic"
    FILES = "files"


class ConsumeFormat(StrEnum):
    TABLE = "table"
    JSON = "json"


def _stop_on_signals() -> threading.Event:
    """An event set by SIGINT / SIGTERM (handlers only set the flag)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


# ---------------------------------------------------------------- feed


def _series(cfg: RunConfig, symbols: list[str] | None, timeframes: list[str] | None = None) -> list[tuple[str, str]]:
    """(symbol, timeframe) of every enabled strategy, optionally only `symbols` and `timeframes`."""
    found = sorted({(sym, tf) for c in cfg.clients for s in c.strategies if s.enabled
                    for sym in s.symbols for tf in s.timeframes})
    for wanted, i, option, what in ((timeframes, 1, "--timeframes", "uses timeframe"), (symbols, 0, "--symbols",
                                                                                         "trades")):
        if wanted:
            known = sorted({series[i] for series in found})
            unknown = sorted(set(wanted) - set(known))
            if unknown:
                raise ConfigError(f"no enabled strategy {what} {', '.join(unknown)}; known: {', '.join(known)}",
                                  field=option)
            found = [series for series in found if series[i] in wanted]
    return found


def merged_frames(frames_per_series: list[Iterator], rows_per_frame: int = 1000):
    """Frames of several series merged into one bar-time order (each series already in order)."""
    import polars as pl

    from signalgen.data.schema import BAR_SCHEMA

    def rows(frames):
        for frame in frames:
            yield from frame.select(BAR_SCHEMA.names()).iter_rows(named=True)

    batch = []
    for row in heapq.merge(*(rows(f) for f in frames_per_series), key=lambda r: r["bar_time"]):
        batch.append(row)
        if len(batch) >= rows_per_frame:
            yield pl.DataFrame(batch, schema=BAR_SCHEMA)
            batch = []
    if batch:
        yield pl.DataFrame(batch, schema=BAR_SCHEMA)


def feed_frames(cfg: RunConfig, series: list[tuple[str, str]], source: FeedSource, *, start: datetime | None,
                bars: int, backfill: int) -> tuple[Iterator, int]:
    """The bars `feed` publishes, merged by time, and how many: synthetic from `start` (default:
    `backfill` bars before now), `bars` per series; files: each series' whole file (rows the reader
    flagged are skipped)."""
    from pathlib import Path

    from signalgen.config.models import timeframe_delta

    parts, total = [], 0
    for symbol, tf in series:
        step = timeframe_delta(tf)
        if source is FeedSource.SYNTHETIC:
            from signalgen.data.synthetic import iter_synthetic_chunks

            origin = start
            if origin is None:
                now = datetime.now(timezone.utc)
                epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
                origin = epoch + ((now - epoch) // step) * step - backfill * step
            parts.append(iter_synthetic_chunks(symbol, tf, origin, origin + bars * step, cfg.seed, 1000))
            total += bars
        else:
            import polars as pl

            from signalgen.data.files import FilesSource

            frame = FilesSource(Path(cfg.root) / cfg.environment.paths.data_dir).load(symbol, tf)
            frame = frame.filter(pl.col("problem").is_null() & pl.col("bar_time").is_not_null())
            parts.append(iter([frame]))
            total += frame.height
    return merged_frames(parts), total


def duration(text: str, option: str) -> timedelta:
    """Seconds ("300") or a count of a unit ("5m", "4h", "1d"); ConfigError naming `option` otherwise."""
    from signalgen.config.models import timeframe_delta

    try:
        return timedelta(seconds=float(text))
    except ValueError:
        pass
    try:
        return timeframe_delta(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not a duration (seconds, or e.g. 5m, 4h, 1d)", field=option) from None


@app.command("feed")
def feed(env: EnvOpt = Environment.LOCAL_INTEGRATION, root: RootOpt = None,
         source: Annotated[FeedSource, typer.Option(help="synthetic (seeded) or files (<data_dir>).")] = FeedSource.SYNTHETIC,
         speed: Annotated[float, typer.Option(min=0, help="Bar time per real time (1: real time, 0: as fast "
                                                          "as possible).")] = 1.0,
         symbols: Annotated[Optional[list[str]], typer.Option("--symbols", help="Only these symbols (repeatable).")] = None,
         timeframes: Annotated[Optional[list[str]], typer.Option("--timeframes", help="Only these timeframes "
                                                                 "(repeatable).")] = None,
         bars: Annotated[int, typer.Option(min=1, help="Synthetic: bars per symbol.")] = 100_000,
         backfill: Annotated[int, typer.Option(min=0, help="Synthetic: start this many bars before now.")] = 500,
         start: Annotated[Optional[datetime], typer.Option(help="Synthetic: first bar's start (UTC).")] = None,
         max_ahead: Annotated[Optional[str], typer.Option(help="Refuse bars ending more than one bar interval "
                                                          "plus this after the wall clock (seconds or 5m, 4h, 1d; "
                                                          "default: messaging.max_ahead_s).")] = None,
         seed: Annotated[Optional[int], typer.Option(help="Seed of synthetic bars.")] = None) -> None:
    """Publish bars to the environment's market-data streams (docs/streams.md), paced at --speed.

    Bars from too far in the future are refused (exit 1, listed): once in a stream, Redis would refuse
    every real bar before them."""
    from signalgen.brokers.codec import PublishStats
    from signalgen.errors import DataError
    from signalgen.transports import transport_for

    cfg = _load(env, Mode.LIVE, root, seed=seed)
    transport = transport_for(cfg.environment, cfg.files.get("environment"))
    if start is not None and start.tzinfo is None:
        start = start.replace(tzinfo=timezone.utc)
    m = cfg.environment.messaging
    ahead = duration(max_ahead, "--max-ahead") if max_ahead is not None else timedelta(seconds=m.max_ahead_s)
    series = _series(cfg, symbols, timeframes)
    blocked = transport.blocked_series(cfg, series, ahead)
    for (symbol, tf), why in blocked.items():
        err_console.print(f"{symbol}:{tf}: not published: {why}", highlight=False, markup=False)
    series = [x for x in series if x not in blocked]
    stop = _stop_on_signals()
    err_console.print(f"feeding {len(series)} series ({', '.join(f'{s}:{t}' for s, t in series)}) at speed {speed:g}",
                      highlight=False)
    frames, total = feed_frames(cfg, series, source, start=start, bars=bars, backfill=backfill)
    past, rest = split_at(frames, datetime.now(timezone.utc))
    with _progress() as progress:
        task = progress.add_task("bars", total=total)

        def advance(_bar_time, n: int) -> None:
            progress.advance(task, n)

        # bars that already ended go out at once (history for the workers), the rest at --speed
        runs = [transport.publish_bars(cfg, past, speed=0, stop=stop, max_ahead=ahead, on_publish=advance),
                transport.publish_bars(cfg, rest, speed=speed, stop=stop, max_ahead=ahead, on_publish=advance)]
    stats = PublishStats(sum(r.published for r in runs), sum(r.already_there for r in runs),
                         sum(r.refused for r in runs), [e for r in runs for e in r.refused_examples][:3])
    console.print(f"published {stats.published:,} bars ({stats.already_there:,} already there)", highlight=False)
    problems = []
    if stats.refused:
        problems.append(f"refused {stats.refused:,} bars ending more than one bar interval + "
                        f"{ahead.total_seconds():g} s after the wall clock (first: {', '.join(stats.refused_examples)}); --max-ahead allows more")
    if blocked:
        problems.append(f"{len(blocked)} series not published, their streams end in the future: "
                        f"{', '.join(f'{s}:{t}' for s, t in blocked)}")
    if problems:
        raise DataError("; ".join(problems))


def _progress():
    """A progress bar on stderr when it is a terminal (nothing otherwise)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    return Progress("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), "eta",
                    TimeRemainingColumn(), console=err_console, disable=not err_console.is_terminal)


def split_at(frames: Iterator, cut: datetime) -> tuple[list, Iterator]:
    """(the frames' rows ending at or before `cut`, as a list; an iterator over the rest)."""
    import itertools

    past = []
    for frame in frames:
        head = frame.filter(frame["bar_time"] <= cut)
        if head.height:
            past.append(head)
        if head.height < frame.height:
            return past, itertools.chain([frame.slice(head.height)], frames)
    return past, iter(())


# ---------------------------------------------------------------- consume


@app.command("consume")
def consume(client: Annotated[str, typer.Option("--client", "-c", help="Whose signals (with that client's "
                                                                     "Redis credentials).")],
            env: EnvOpt = Environment.LOCAL_INTEGRATION, root: RootOpt = None, mode: ModeOpt = Mode.LIVE,
            from_start: Annotated[bool, typer.Option("--from-start", help="Start at the stream's first entry "
                                                     "(default: only new signals).")] = False,
            fmt: Annotated[ConsumeFormat, typer.Option("--format", "-f", help="table or json (one object per "
                                                       "line).")] = ConsumeFormat.TABLE,
            group: Annotated[Optional[str], typer.Option(help="Consumer group (default: the client id).")] = None,
            consumer: Annotated[Optional[str], typer.Option(help="Consumer name (default: the host name).")] = None,
            limit: Annotated[Optional[int], typer.Option("--max", min=1, help="Exit after this many signals.")] = None,
            idle_exit: Annotated[Optional[float], typer.Option(help="Exit after this many seconds without a "
                                                               "signal.")] = None) -> None:
    """Print a client's signals as they arrive, read with that client's credentials and consumer group."""
    from signalgen.brokers.codec import decode_rows
    from signalgen.report import records_table
    from signalgen.signals.types import SIGNAL_SCHEMA
    from signalgen.transports import transport_for

    cfg = _load(env, mode, root)
    first = [True]

    def show(lines: list[bytes]) -> None:
        if fmt is ConsumeFormat.JSON:
            sys.stdout.write(b"\n".join(lines).decode() + "\n")
            sys.stdout.flush()
        else:
            console.print(records_table(decode_rows(lines, SIGNAL_SCHEMA), "signals", show_header=first[0]))
            first[0] = False

    transport_for(cfg.environment, cfg.files.get("environment")).consume(
        cfg, client, mode.value, from_start=from_start, group=group, consumer=consumer, stop=_stop_on_signals(),
        on_batch=show, limit=limit, idle_exit_s=idle_exit)


# ---------------------------------------------------------------- clients grant


@clients_app.command("grant")
def clients_grant(client: Annotated[str, typer.Option("--client", "-c", help="The client to grant.")],
                  env: EnvOpt = Environment.LOCAL_INTEGRATION, root: RootOpt = None) -> None:
    """Give the client access to its own signals and rejections only. Redis: create its ACL user and
    print its connection URL (password masked). Pub/Sub: create its subscriptions and print the IAM
    bindings it needs, as JSON for gcloud (docs/cloud.md)."""
    from signalgen.transports import transport_for

    cfg = _load(env, Mode.LIVE, root)
    text, warning = transport_for(cfg.environment, cfg.files.get("environment")).grant(cfg, client)
    console.print(text, highlight=False, markup=False, soft_wrap=True)
    if warning:
        err_console.print(f"warning: {warning}", highlight=False, markup=False)


# ---------------------------------------------------------------- recorder


@app.command("recorder")
def recorder(env: EnvOpt = Environment.LOCAL_INTEGRATION, root: RootOpt = None, mode: ModeOpt = Mode.LIVE,
             consumer: Annotated[Optional[str], typer.Option(help="Consumer name (default: the host name).")] = None
             ) -> None:
    """The decision host of a mode, until Ctrl-C: the workers' decisions on to their clients' streams
    (as routing says), the QuantConnect files and the store.

    The recorder is the store's and the clients' streams' only writer; `signals list` reads through it
    meanwhile."""
    from signalgen.metrics import count_recorder
    from signalgen.process.health import serve_health
    from signalgen.storage import open_store
    from signalgen.storage.control import ControlStore
    from signalgen.storage.recorder import Recorder
    from signalgen.transports import transport_for

    cfg = _load(env, mode, root)
    transport = transport_for(cfg.environment, cfg.files.get("environment"))
    if transport.name != "redis":  # Pub/Sub: the decision host a manager runs, on its own
        _host_decisions(cfg, transport)
        return
    stop = _stop_on_signals()
    store = open_store(cfg)
    try:
        with store.serve_reads():
            rec = Recorder.from_config(cfg, store, consumer=consumer)
            err_console.print(f"recording {len(rec.streams)} streams of mode {mode.value} into {store}",
                              highlight=False)
            untrack = count_recorder(rec)
            try:
                with serve_health(cfg, control=ControlStore.from_config(cfg),
                                  problems=lambda: ["Redis unreachable (retrying)"] if rec.redis_down else []):
                    stats = rec.run(stop)
            finally:
                untrack()
                rec.close()
    finally:
        store.close()
    console.print(f"recorded {stats.entries:,} entries: {stats.signals:,} signals, {stats.rejections:,} "
                  f"rejections, {stats.bar_rejections:,} bar rejections ({stats.bad} skipped); "
                  f"{stats.forwarded:,} written on to the clients' streams", highlight=False)


def _host_decisions(cfg: RunConfig, transport) -> None:
    """Run `transport`'s decision host (what a manager hosts: on Pub/Sub the PubSubRecorder) until
    SIGINT / SIGTERM, recording a run as `writer` does: workers without a manager (supervisord), or
    more recorders beside the managers (they share the recorder subscriptions)."""
    from contextlib import closing

    from signalgen.config.workers import worker_specs
    from signalgen.modes import new_run_id, run_record
    from signalgen.storage import open_store
    from signalgen.transports.local import host_outcome

    stop = _stop_on_signals()
    started_at = datetime.now(timezone.utc)
    run_id = new_run_id(started_at)
    with closing(open_store(cfg)) as store, store.serve_reads():
        store.start_run(run_record(cfg, worker_specs(cfg), run_id, started_at))
        host = transport.decision_host(cfg, store, run_id=run_id, address="", authkey=b"", control_path="")
        status = "failed"
        try:
            host.start()
            err_console.print(f"recording mode {cfg.mode.name.value} of {len(cfg.clients)} clients into {store} "
                              f"(run {run_id})", highlight=False)
            while not stop.wait(1.0):
                pass
            status = "stopped"
        finally:
            host.close()
            store.finish_run(run_id, **host_outcome(host.stats, started_at, status))
    console.print(f"recorded {host.stats.get('signals', 0):,} signals, {host.stats.get('rejections', 0):,} "
                  f"rejections", highlight=False)
