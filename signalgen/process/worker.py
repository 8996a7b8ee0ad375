"""The worker process: one client x strategy x symbol x timeframe, streaming in mock, simulation or live mode.

`worker_process(args)` is the multiprocessing target the manager starts (in a forkserver child
that already imported `signalgen.process.preload`); `signalgen.cli.worker` runs the same
`worker_main` in the foreground for supervisord. A worker:

1. dies with its parent: PR_SET_PDEATHSIG(SIGKILL), and a thread that watches the parent's pid;
   runs `process.nice` steps nicer than the manager (above 0, Redis, consumers and the manager win
   the cores from a burst of workers);
2. logs to its own rotated file (`args.log_path`);
3. opens its sink from the environment's transport (`open_sink`, `signalgen.transports`): with
   `messaging.type: redis` its client's internal Redis streams (`RedisSink`: checkpoint in Redis,
   advanced with the entries; the manager's recorder takes them on), with `local` the manager's
   writer (`RemoteSink`: hello returns run id and checkpoint);
4. feeds its bars after the checkpoint, with the history bars before it for warm-up: mock paced at
   one bar per `mock_bar_interval_s` wall seconds, simulation at the preset's `replay_speed` (0: as
   fast as possible), both from `resume_feed`; live from the transport's market-data feed (`Transport.live_feed`;
   Redis: XREAD BLOCK) on the wall clock (`WallClock`: late bars are `stale_data`). The mode changes
   only feed, clock and sink: the loop is the same;
5. runs the one worker loop (`modes.worker.run_worker`) into the sink, writing heartbeats to the
   control store every `heartbeat_interval_s`, through the writer's connection when it relays them
   (ready=1 once its models and first bar are loaded; live: once its models are loaded, since the
   stream may be quiet);
6. on SIGTERM / SIGINT stops taking bars, waits until the sink holds everything, exits 0.

Exit codes: 0 range done or stopped after flushing; 1 failure (restart it); 2 config error (never);
75 transient (a store, broker or disk was away: retried within seconds, never counted as a failure).
"""

from __future__ import annotations

import ctypes
import logging
import logging.handlers
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from signalgen.config.models import Mode, RunConfig, timeframe_delta
from signalgen.config.workers import WorkerSpec
from signalgen.data.validation import validate_bars
from signalgen.errors import ConfigError, TransientError
from signalgen.logs import Outage, log_to_file
from signalgen.signals.records import epoch_us
from signalgen.config.workers import history_bars
from signalgen.threads import background_priority
from signalgen.modes import new_run_id
from signalgen.modes.sources import bar_chunks, per_bar_feed
from signalgen.modes.worker import ReplayClock, WallClock, WorkerContext, bar_feed, run_worker
from signalgen.process.states import CONFIG_ERROR_EXIT, TRANSIENT_EXIT, State
from signalgen.storage.control import ControlStore, now_iso
from signalgen.transports import transport_for
from signalgen.transports.base import Transport

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
STREAMING_MODES = (Mode.MOCK, Mode.SIMULATION, Mode.LIVE)
PARENT_CHECK_S = 0.5


@dataclass(frozen=True)
class WorkerArgs:
    """Everything a worker process needs, picklable: config only, no connection (each worker opens
    its own). `authkey` is the writer's shared key: kept out of repr, so it is never logged."""

    spec: WorkerSpec
    cfg: RunConfig
    writer_address: str
    authkey: bytes = field(repr=False)
    control_path: str
    log_path: str
    heartbeat_interval_s: float
    run_id: str = ""  # the manager's run, carried by a Redis-backed worker's records (else the writer's hello)


# --------------------------------------------------------------------------------------------- feeds


def resume_from(cfg: RunConfig, checkpoint: datetime | None) -> datetime:
    """Where a worker's decisions start: after its checkpoint, or after the range's start."""
    return cfg.start if checkpoint is None or checkpoint < cfg.start else checkpoint


def resume_feed(cfg: RunConfig, spec: WorkerSpec, emit_from: datetime) -> Iterator[dict]:
    """The worker's raw bars after `emit_from`, one at a time, preceded by the last
    `history_bars(spec)` valid bars at or before it (features' warm-up and the lookback window).

    The bars are the run's own series (`modes.sources.bar_chunks` from `cfg.start`), so a worker
    resumed after a checkpoint sees exactly the bars, and makes exactly the decisions, of a worker
    that never stopped (features depend only on the last WARMUP_BARS bars).
    """
    if emit_from <= cfg.start:
        yield from per_bar_feed(cfg, spec)
        return
    need = history_bars(spec)
    frames = bar_chunks(cfg, spec.symbol, spec.timeframe, cfg.mode.chunk_bars, history=need)
    first = validate_bars(next(frames), spec.timeframe)
    history, last_time = first.bars.tail(need), first.last_time
    for frame in frames:
        # rows without a time go with the rest: validation rejects them again (an idempotent upsert)
        after = pl.col("bar_time").is_null() | (pl.col("bar_time") > emit_from)
        before, rest = frame.filter(~after), frame.filter(after)
        if before.height:
            checked = validate_bars(before, spec.timeframe, last_time=last_time)
            last_time = checked.last_time or last_time
            history = pl.concat([history, checked.bars]).tail(need) if history.height else checked.bars.tail(need)
        if rest.height:
            yield from bar_feed([history, rest])
            yield from bar_feed(frames)
            return
    yield from bar_feed([history])  # nothing after the checkpoint: the range is done


class PacedClock:
    """A `ReplayClock` that paces only the bars after `emit_from_us`: history bars warm up at once,
    then each new bar is due `bar length / speed` wall seconds after the previous one."""

    def __init__(self, speed: float, emit_from_us: int, sleep=time.sleep) -> None:
        self.replay = ReplayClock(speed, sleep=sleep)
        self.emit_from_us = emit_from_us
        self._now: int | None = None

    def advance(self, bar_time_us: int) -> None:
        if bar_time_us > self.emit_from_us:
            self.replay.advance(bar_time_us)  # sleeps until the bar is due
        self._now = bar_time_us if self._now is None else max(self._now, bar_time_us)

    def now_us(self) -> int:
        if self._now is None:
            raise RuntimeError("PacedClock.now_us before any bar")
        return self._now


def replay_speed(cfg: RunConfig, spec: WorkerSpec) -> float:
    """Bar-time seconds per wall second: mock one bar per `mock_bar_interval_s`, simulation the
    preset's `replay_speed` (0 = as fast as possible)."""
    if cfg.mode.name is Mode.MOCK:
        interval = cfg.environment.process.mock_bar_interval_s
        return 0.0 if interval <= 0 else timeframe_delta(spec.timeframe).total_seconds() / interval
    return cfg.mode.replay_speed or 0.0


# --------------------------------------------------------------------------------------------- process


class _Counts:
    """What the heartbeat reports, updated by the sink wrapper as the worker goes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state = State.STARTING  # what the heartbeat says: always a State
        self._ready = False
        self.wake = threading.Event()  # set when the worker becomes ready: the heartbeat says so at once
        self.bars = self.signals = self.rejections = self.errors = 0
        self.last_bar_us: int | None = None  # the newest decided bar's time, epoch µs (a datetime when beating)
        self.checkpoint: datetime | None = None

    @property
    def ready(self) -> bool:
        return self._ready

    @ready.setter
    def ready(self, value: bool) -> None:
        if value and not self._ready:
            self.wake.set()
        self._ready = value


class _CountingSink:
    """Passes everything to the real sink and counts it for the heartbeat."""

    def __init__(self, inner, counts: _Counts) -> None:
        self.inner, self.counts = inner, counts

    def record(self, spec: WorkerSpec, decisions) -> None:
        self.inner.record(spec, decisions)
        with self.counts.lock:
            c = self.counts
            c.bars += decisions.bars
            c.signals += decisions.signals
            c.rejections += decisions.bars - decisions.signals
            if decisions.bars:
                c.last_bar_us = int(decisions.bar_time_us[-1])
            # the checkpoint is read when a heartbeat is written (Heartbeat.beat), not per bar: for a
            # RemoteSink that read polls the writer's socket, which record() has just done

    def record_bar_rejections(self, rejections: pl.DataFrame, run_id: str) -> None:
        self.inner.record_bar_rejections(rejections, run_id)
        with self.counts.lock:
            self.counts.errors += rejections.height  # bad bars: rejected and counted

    @property
    def checkpoints(self) -> dict[str, datetime]:
        return self.inner.checkpoints


class Heartbeat:
    """Writes the worker's heartbeat row every `interval` seconds on its own thread (and once more
    at the end). A control store that cannot be written is logged, never fatal."""

    def __init__(self, args: WorkerArgs, counts: _Counts, sink_ref: list) -> None:
        self.args, self.counts, self.sink_ref = args, counts, sink_ref
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._store = None

    def start(self) -> None:
        self._thread.start()

    def beat(self) -> None:
        """One heartbeat: through the writer's connection when the sink relays them (`RemoteSink`:
        one small message instead of a control-store transaction), else into the control store."""
        sink = self.sink_ref[0] if self.sink_ref else None
        with self.counts.lock:
            c = self.counts
            if sink is not None:
                c.checkpoint = sink.checkpoints.get(self.args.spec.id, c.checkpoint)
            last_bar = None if c.last_bar_us is None else datetime.fromtimestamp(c.last_bar_us / 1e6, timezone.utc)
            fields = dict(pid=os.getpid(), state=c.state, last_bar_time=_iso(last_bar),
                          checkpoint=_iso(c.checkpoint), signals=c.signals, rejections=c.rejections,
                          errors=c.errors, ready=c.ready, ts=now_iso(),
                          paused_keys=0 if sink is None else sink.paused_keys)
        if sink is not None and getattr(sink, "send_heartbeat", None) and sink.send_heartbeat(fields):
            return
        if self._store is None:
            self._store = ControlStore(self.args.control_path)
        self._store.heartbeat(self.args.spec.id, **fields)

    def _loop(self) -> None:
        wake = self.counts.wake
        while True:
            wake.clear()  # before the beat: a ready flag set during it brings the next one at once
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - a missed heartbeat is the manager's to notice
                log.warning("heartbeat failed: %r", exc, extra={"worker": self.args.spec.id})
            # the next beat after the interval, or at once when the worker became ready (the manager
            # counts it RUNNING from its ready heartbeat: up to an interval sooner after a start)
            if self._stop.is_set() or (wake.wait(self.args.heartbeat_interval_s) and self._stop.is_set()):
                return

    def stop(self) -> None:
        """Stop the thread and write the final heartbeat (its state as the worker leaves)."""
        self._stop.set()
        self.counts.wake.set()
        self._thread.join(timeout=5)
        try:
            self.beat()
        except Exception as exc:  # noqa: BLE001
            log.warning("final heartbeat failed: %r", exc, extra={"worker": self.args.spec.id})
        if self._store is not None:
            self._store.close()


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(timezone.utc).isoformat()


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send `sig` to this process when its parent dies (PR_SET_PDEATHSIG); False where
    unsupported (the parent watch still works)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def watch_parent(ppid: int, interval: float = PARENT_CHECK_S) -> threading.Thread:
    """A thread that kills this process (SIGKILL, as PDEATHSIG would) once its parent is gone:
    re-parented, or — for a forkserver child, whose OS parent is the fork server — the process that
    started it (`multiprocessing.parent_process()`) no longer exists.

    On Linux ≥ 5.3 the thread blocks on pidfds of both processes (readable when one exits): no
    wake-up at all while they live (500 workers polling every 0.5 s were 1000 wake-ups a second).
    Elsewhere it polls every `interval` seconds.
    """
    import multiprocessing

    starter = multiprocessing.parent_process()
    starter_pid = starter.pid if starter is not None else None

    def orphaned() -> bool:
        return os.getppid() != ppid or (starter_pid is not None and not _pid_alive(starter_pid))

    def gone() -> None:
        log.error("parent process is gone; exiting", extra={"ppid": ppid})
        os.kill(os.getpid(), signal.SIGKILL)

    def poll_loop() -> None:
        while not orphaned():
            time.sleep(interval)
        gone()

    def pidfd_loop(fds: list[int]) -> None:
        import select

        select.select(fds, [], [])  # returns once one of them exited
        gone()

    fds = _pidfds([ppid] + ([starter_pid] if starter_pid is not None else []))
    if orphaned():  # died before we could ask for PDEATHSIG (or before the pidfds)
        os.kill(os.getpid(), signal.SIGKILL)
    target, args = (pidfd_loop, (fds,)) if fds is not None else (poll_loop, ())
    thread = threading.Thread(target=target, args=args, name="parent-watch", daemon=True)
    thread.start()
    return thread


def _pidfds(pids: list[int]) -> list[int] | None:
    """A pidfd per pid (os.pidfd_open, Linux ≥ 5.3), or None where unsupported / a pid is gone."""
    if not hasattr(os, "pidfd_open"):
        return None
    fds: list[int] = []
    try:
        for pid in pids:
            fds.append(os.pidfd_open(pid))
    except OSError:
        for fd in fds:
            os.close(fd)
        return None
    return fds


def configure_worker_logging(log_path: str, cfg: RunConfig) -> None:
    """`signalgen.*` records to the worker's own file, rotated at `process.log_max_mb` with
    `process.log_backups` old files, in the project's key=value format."""
    limits = cfg.environment.process
    log_to_file(log_path, max_mb=limits.log_max_mb, backups=limits.log_backups, level=cfg.environment.log_level,
                only=True)


def open_sink(args: WorkerArgs, transport: Transport):
    """(sink, run id, checkpoint) of this worker, from the environment's transport, for every mode
    (`signalgen.transports`): the manager's writer server over local IPC, or a broker. A run id is
    made here for a worker started without one (by supervisord), where the transport has none."""
    return transport.open_sink(args.cfg, args.spec, run_id=args.run_id or new_run_id(datetime.now(timezone.utc)),
                               writer_address=args.writer_address, authkey=args.authkey,
                               control_path=args.control_path)


def open_sink_waiting(args: WorkerArgs, transport: Transport, stop: threading.Event) -> tuple:
    """`open_sink`, waiting out a sink that is away (TransientError: a broker or the writer not
    answering) with retries from 0.1 s doubling to 2 s: the worker stays STARTING, heartbeating, and
    takes its first bar once the sink is back. Stopped meanwhile: the TransientError is raised."""
    delay, outage = 0.1, Outage(log, f"opening the sink of {args.spec.id}")
    while True:
        try:
            opened = open_sink(args, transport)
        except TransientError as exc:
            outage.failed(exc)
            if stop.wait(delay):
                raise
            delay = min(2 * delay, 2.0)
            continue
        outage.ok()
        return opened


def worker_main(args: WorkerArgs) -> int:
    """Run one worker until its range ends or SIGTERM / SIGINT; the exit code (0, 1 or 2)."""
    ppid = os.getppid()
    set_parent_death_signal()
    # `process.nice` steps below the manager, set before the first thread: Linux keeps a niceness per
    # thread, and the threads started after inherit it
    background_priority(args.cfg.environment.process.nice)
    watch_parent(ppid)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stop.set())  # a flag only; the loop acts on it
    spec, cfg = args.spec, args.cfg
    fields = {"worker": spec.id, "client": spec.client.id, "strategy": spec.strategy.id, "symbol": spec.symbol}
    try:
        configure_worker_logging(args.log_path, cfg)
    except OSError as exc:
        print(f"worker {spec.id}: cannot write log {args.log_path}: {exc}", file=sys.stderr)
        return 1
    counts, sink_ref = _Counts(), []
    heartbeat = Heartbeat(args, counts, sink_ref)
    heartbeat.start()
    sink = None
    code = 1
    try:
        if cfg.mode.name not in STREAMING_MODES:
            raise ConfigError(f"a worker process streams mock, simulation or live, not {cfg.mode.name.value}",
                              file=cfg.files.get("mode"), field="name")
        transport = transport_for(cfg.environment, cfg.files.get("environment"))  # one per worker: its sink and feed
        sink, run_id, checkpoint = open_sink_waiting(args, transport, stop)
        sink_ref.append(sink)
        emit_from = resume_from(cfg, checkpoint)
        log.info("worker started (pid %d), resuming after %s", os.getpid(), emit_from,
                 extra={**fields, "run_id": run_id})
        ctx = WorkerContext(registry_dir=str(Path(cfg.root) / cfg.environment.paths.registry_dir),
                            backend="mock" if cfg.inference == "mock" else cfg.backend,
                            started_at=datetime.now(timezone.utc), mode=cfg.mode.name.value,
                            run_id=run_id, emit_from=emit_from, seed=cfg.seed)
        live = cfg.mode.name is Mode.LIVE
        if live:
            bars, clock = transport.live_feed(cfg, spec, after=checkpoint, stop=stop), WallClock()
        else:
            bars = resume_feed(cfg, spec, emit_from)
            clock = PacedClock(replay_speed(cfg, spec), epoch_us(emit_from), sleep=stop.wait)

        def ready() -> None:
            with counts.lock:
                counts.ready, counts.state = True, State.RUNNING
            log.info("worker ready", extra=fields)

        def ready_feed() -> Iterator[dict]:
            # run_worker loads the models before it asks for the first bar. Replay: ready once that
            # bar exists. Live: ready now — the stream may stay quiet for a long time, and the sink
            # already reached Redis
            if live:
                ready()
            for i, bar in enumerate(bars):
                if i == 0 and not live:
                    ready()
                yield bar

        outcome = run_worker(spec, ready_feed(), _CountingSink(sink, counts), clock, ctx, stop)
        for problem in outcome.problems:
            log.warning("%s", problem, extra=fields)
        with counts.lock:
            counts.state = State.STOPPING
        sink.close(timeout=cfg.environment.process.stop_timeout_s if stop.is_set() else None)
        with counts.lock:
            counts.checkpoint = sink.checkpoints.get(spec.id, counts.checkpoint)
            counts.state = State.STOPPED if outcome.stopped or stop.is_set() else State.EXITED
        log.info("worker %s: %d bars, %d signals, checkpoint %s",
                 "stopped" if outcome.stopped or stop.is_set() else "finished",
                 outcome.bars, outcome.signals, counts.checkpoint, extra=fields)
        code = 0
    except ConfigError as exc:
        log.error("config error: %s", exc, extra=fields)
        code = CONFIG_ERROR_EXIT
    except TransientError as exc:  # a store, broker or disk away: the manager retries soon, uncounted
        log.warning("transient failure, exiting for a retry: %s", exc, extra=fields)
        code = TRANSIENT_EXIT
    except Exception as exc:  # noqa: BLE001 - the manager restarts a failed worker
        log.exception("worker failed: %s", exc, extra=fields)
        code = 1
    finally:
        if sink is not None:
            sink.abort()  # a no-op after close; otherwise what is unconfirmed is the next start's
        if code != 0:  # the process ends by itself; what follows is the manager's to decide (FATAL: known)
            with counts.lock:
                counts.state = State.FATAL if code == CONFIG_ERROR_EXIT else State.EXITED
        heartbeat.stop()
        logging.shutdown()
    return code


def worker_process(args: WorkerArgs) -> None:
    """multiprocessing target: `worker_main` as the process's exit code."""
    sys.exit(worker_main(args))
