"""The StrategyProcessManager: one supervised OS process per worker spec.

The manager forks every worker from a forkserver that has already imported the heavy modules
(`signalgen.process.preload`), so a worker costs little private memory and starts fast; nothing
live crosses the fork (a worker gets picklable `WorkerArgs` and opens its own connections). It
hosts the one writer of the signal store (`WriterServer`), which workers reach over a local socket;
with Redis messaging (local-integration) it hosts the recorder instead (`decision_host`).

Supervision is one loop (`run`), ticking at most every `TICK_S`: it wakes early when a worker
exits (process sentinels), reaps exits, promotes STARTING workers whose heartbeat says ready,
kills workers whose heartbeat is stale or whose memory is over the limit, restarts failed workers
after their backoff, samples resources and executes the commands found in the control store.
Every state change goes through `states.WorkerProcess.change` and is written to the control store's
`strategy_instances` (failures, kills, commands and health changes also to `events`), which is all
`status` and `monitor` read. Pause is SIGSTOP (the process stays, frozen), resume SIGCONT.

Signal handlers only set a flag (`modes.stop_on_signals`); the loop stops the workers gracefully
(SIGTERM, SIGKILL after `stop_timeout_s`) and `run` returns 0.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import stat
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack, closing
from datetime import datetime, timezone
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from signalgen.config.models import RunConfig
from signalgen.config.workers import WorkerSpec, worker_specs
from signalgen.errors import ConfigError, SignalgenError
from signalgen.config.edit import write_atomic
from signalgen.logs import Outage, excerpt, log_to_file
from signalgen.process.health import serve_health
from signalgen.process.states import (TRANSIENT_EXIT, TRANSITIONS, InvalidTransition, State, StateEvent, WorkerProcess,
                                      after_exit, backoff_delay)
from signalgen.storage.control import ControlStoreCorrupt, LeaseLost, control_path_of, iso

log = logging.getLogger(__name__)

TICK_S = 0.5  # the loop's longest sleep: commands are picked up within it
START_SLICE_S = 0.5  # at start-up, workers are started for this long per tick, then the loop does its rounds
PRELOAD = "signalgen.process.preload"
ERROR_WINDOW_S = 60.0
STALL_S = 2.0  # a tick this long after the last ended (4 x TICK_S): the manager was stopped (SIGSTOP, GC, swap)
TRANSIENT_BACKOFF_MAX_S = 2.0  # the longest wait before restarting a worker that left for a transient cause
LOOP_STALLED_S = 60.0  # /healthz fails when the supervision loop has not ticked for this long
MAX_UNWRITTEN_EVENTS = 10_000  # events kept while the control store cannot be written
COMMANDS = ("start", "stop-strategy", "pause", "resume", "restart", "stop", "reload", "add-strategy")

SpecLoader = Callable[[], tuple[RunConfig, list[WorkerSpec]]]


def worker_entry(target: Callable, args: Any) -> None:
    """What a worker process runs first, then `target(args)`: it ties the worker's life to the manager's.

    A forkserver child holds a copy of the forkserver's "alive" pipe, which keeps the forkserver up
    while any child lives; the worker closes its copy, so the forkserver exits as soon as the manager
    dies, and PR_SET_PDEATHSIG (the forkserver is the parent) then kills the worker: a manager killed
    with SIGKILL leaves no orphan. Without this, forkserver and workers would wait on each other forever.
    """
    from multiprocessing import forkserver

    from signalgen.process.worker import set_parent_death_signal

    fd = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)
    if fd is not None:
        forkserver._forkserver._forkserver_alive_fd = None
        try:
            os.close(fd)
        except OSError:
            pass
    parent = os.getppid()
    set_parent_death_signal()
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)
    target(args)


class CommandError(SignalgenError):
    """A command that cannot be applied: the row is marked failed with this message."""


def matches(worker_id: str, pattern: str) -> bool:
    """A worker id matches its own id, a glob over ids (`odum.*.BTCUSD.*`), or a prefix of whole
    parts (`odum`, `odum.momentum_v1`)."""
    return worker_id == pattern or worker_id.startswith(pattern + ".") or fnmatch.fnmatchcase(worker_id, pattern)


def select_specs(specs: list[WorkerSpec], names: list[str] | None) -> list[WorkerSpec]:
    """The specs matching any of `names` (see `matches`); all when none is given.

    Raises ConfigError naming the names that match no worker.
    """
    if not names:
        return list(specs)
    unknown = [n for n in names if not any(matches(s.id, n) for s in specs)]
    if unknown:
        raise ConfigError(f"no worker matches {', '.join(map(repr, unknown))}; names are client ids, "
                          "client.strategy, worker ids (client.strategy.symbol.timeframe) or globs")
    return [s for s in specs if any(matches(s.id, n) for n in names)]


def decision_host(cfg: RunConfig, store, *, run_id: str, address: str, authkey: bytes, control_path: str):
    """What takes the workers' decisions to the store: the environment's transport's decision host
    (`signalgen.transports`): with Redis the recorder (the store's and the clients' streams' one
    writer, a consumer group over the internal streams), with `local` the `WriterServer` that workers
    reach at `address`, which also relays their heartbeats into the control store at `control_path`.
    Both: `start()`, `reloaded()` (a reload changed the config), `close()` (after the workers stopped),
    `address`, `stats["bars"]`."""
    from signalgen.transports import transport_for

    return transport_for(cfg.environment, cfg.files.get("environment")).decision_host(
        cfg, store, run_id=run_id, address=address, authkey=authkey, control_path=control_path)


def default_loader(cfg: RunConfig) -> SpecLoader:
    """Reload every client of `cfg`'s root with the same environment, mode and run settings."""
    from signalgen.config.loader import Overrides, load_config

    def load() -> tuple[RunConfig, list[WorkerSpec]]:
        overrides = Overrides(start=cfg.start, end=cfg.end, seed=cfg.seed, backend=cfg.backend,
                              inference=cfg.inference, data_source=cfg.data_source)
        new = load_config(cfg.environment_ref, cfg.mode.name.value, root=cfg.root, overrides=overrides)
        return new, worker_specs(new)

    return load


def socket_dir(control_path: str) -> str:
    """The folder of the manager's writer socket, made empty with mode 0700: one per control store
    (`/tmp/signalgen-<uid>-<hash of its path>`; short, as AF_UNIX paths are at most 107 bytes), so a
    manager killed with -9 leaves nothing the next one does not clean up. Call it holding the lock.
    A path someone else owns, or a symlink, is refused rather than followed."""
    digest = hashlib.sha256(os.path.abspath(control_path).encode()).hexdigest()[:12]
    path = os.path.join(tempfile.gettempdir(), f"signalgen-{os.getuid()}-{digest}")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise SignalgenError(f"{path} exists and is not a folder of this user's: remove it, then start")
        shutil.rmtree(path)  # a killed manager's: the lock we hold says it is gone
    os.mkdir(path, 0o700)
    return path


def read_pid(path: Path) -> int | None:
    """The pid in a pidfile, or None (missing, empty, not a number)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _epoch(value: Any) -> float | None:
    """A control-store timestamp (epoch float or ISO text) as epoch seconds."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime):
        return value.timestamp()
    try:
        return float(value)
    except (TypeError, ValueError):
        t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


class StrategyProcessManager:
    """Starts, supervises and controls one process per `WorkerSpec`.

    Everything about one worker lives in its `WorkerProcess` (`self.procs`): spec, state, process
    handle, the kill or stop under way, last proof of life, error window. Every state change is a
    `StateEvent`; the manager's listener turns it into the worker's `strategy_instances` row and an
    `events` row (kind `state`), written with the other events in one transaction per tick.

    Args:
        cfg: the run's config (workers get it in their `WorkerArgs`).
        specs: the workers to run.
        control: the control store (commands in; instances, events, resources out).
        log_dir: one log file per worker, `<log_dir>/<worker id>.log`.
        run_id: the id every worker's records carry.
        loader: re-reads the config for `reload` / `add-strategy` (default: every client of cfg.root).
        worker_target: the module-level function a worker process runs with its `WorkerArgs`
            (default `process.worker.worker_process`; tests pass their own).
        logfile: the manager's own log, rotated as the workers' are (process.log_max_mb and
            log_backups); opened once the manager holds its lock, so a refused manager never writes
            into the running one's log. `log_only`: nowhere else (a detached manager has no console).
        pidfile: written with the manager's pid once it is ready (lock held, store open, decisions
            host up, pending rows vetted), removed when it stops.
        shard: (i, N), the share of the workers this manager runs (`start --shard`): names its lease
            in a shared (PostgreSQL) control store.
    """

    def __init__(self, cfg: RunConfig, specs: list[WorkerSpec], *, control, log_dir: Path, run_id: str,
                 loader: SpecLoader | None = None, worker_target: Callable | None = None,
                 logfile: Path | None = None, log_only: bool = False, pidfile: Path | None = None,
                 shard: tuple[int, int] = (0, 1)) -> None:
        self.cfg, self.control, self.run_id, self.shard = cfg, control, run_id, shard
        self.logfile, self.log_only, self.pidfile = logfile, log_only, pidfile
        self.log_dir = Path(log_dir)
        self.limits = cfg.environment.process
        self.loader = loader or default_loader(cfg)
        self.worker_target = worker_target
        self.procs: dict[str, WorkerProcess] = {}
        self._dirty: set[str] = set()  # workers whose instance row is to be written
        self._events: deque[tuple[str, str | None, str, str]] = deque(maxlen=MAX_UNWRITTEN_EVENTS)
        for spec in specs:
            self._add(spec)
        self._over_memory: deque[tuple[str, int, float]] = deque()  # from the sampler thread
        self._shutdown = False
        self._stop_command: int | None = None
        self._to_start: deque[str] = deque()  # initial start-up, in slices of START_SLICE_S
        self._ctx = None
        self._server = None
        self._run_outcome: dict = {}
        self._address = ""
        self._authkey = b""
        self._control_path = str(getattr(control, "path", "") or control_path_of(cfg))
        # what the manager could observe: heartbeats are judged only from here on (see _check_heartbeats)
        self._observed_since = time.time()
        self._last_tick = time.monotonic()
        self._control_outage = Outage(log, "the control store (supervising from memory meanwhile; heartbeats "
                                            "not judged)")
        self._generation = getattr(control, "generation", 0)  # the control store's file we last wrote

    @property
    def specs(self) -> dict[str, WorkerSpec]:
        return {wid: proc.spec for wid, proc in self.procs.items()}

    def _add(self, spec: WorkerSpec) -> WorkerProcess:
        proc = self.procs[spec.id] = WorkerProcess(worker_id=spec.id, spec=spec)
        proc.listeners.append(self._on_change)
        self._dirty.add(spec.id)
        return proc

    def _on_change(self, event: StateEvent) -> None:
        log.info("%s -> %s: %s", event.old.value, event.new.value, event.reason, extra={"worker": event.worker_id})
        self._dirty.add(event.worker_id)
        self._event(event.worker_id, "state", event.detail(), event.at)

    def _event(self, wid: str | None, kind: str, detail: str | dict, at: float | None = None) -> None:
        """An event for the control store, written with this tick's other rows (`_flush`)."""
        text = detail if isinstance(detail, str) else json.dumps(detail, default=str, sort_keys=True)
        self._events.append((iso(at if at is not None else time.time()), wid, kind, text))

    # ------------------------------------------------------------ run

    def run(self, stop: threading.Event | None = None) -> int:
        """Run until `stop` is set, SIGINT/SIGTERM arrives or a `stop` command; then stop every
        worker gracefully. Returns 0; a `stop` command is answered once the manager has let go of the
        store."""
        stop = stop or threading.Event()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._run(stop)
        except BaseException as exc:
            if self._stop_command is not None:
                self._try(self.control.fail, self._stop_command, f"the manager failed while stopping: {exc!r}")
            raise
        finally:
            if self.pidfile is not None and read_pid(self.pidfile) == os.getpid():
                self.pidfile.unlink(missing_ok=True)
        # answered only now: the writer has drained, the store is closed and the manager's lock
        # released, so whoever waited on `stop` can open the store at once
        if self._stop_command is not None:
            self._try(self.control.complete, self._stop_command, {"stopped": sorted(self.procs)})
        log.info("manager stopped", extra={"run_id": self.run_id})
        return 0

    def _run(self, stop: threading.Event) -> None:
        from signalgen.modes import stop_on_signals
        from signalgen.storage import open_store

        with ExitStack() as held:
            held.enter_context(self._lock())
            if self.logfile is not None:
                log_to_file(self.logfile, max_mb=self.limits.log_max_mb, backups=self.limits.log_backups,
                            only=self.log_only)
            sock_dir = socket_dir(self._control_path)
            held.callback(shutil.rmtree, sock_dir, ignore_errors=True)
            self._ctx = multiprocessing.get_context("forkserver")
            # "__main__" too: otherwise every worker re-imports the manager's main script (for
            # strategy_runner.py: the whole CLI) when it starts; imported once here, it is inherited
            # (this module too: each worker runs its worker_entry)
            self._ctx.set_forkserver_preload(["__main__", __name__, PRELOAD])
            store = held.enter_context(closing(open_store(self.cfg)))
            held.enter_context(store.serve_reads())  # `signals` / `runs` read through the manager meanwhile
            self._record_run(store, held)
            self._authkey = os.urandom(32)
            server = decision_host(self.cfg, store, run_id=self.run_id,
                                   address=os.path.join(sock_dir, "writer.sock"), authkey=self._authkey,
                                   control_path=self._control_path)
            server.start()
            self._server = server
            held.callback(server.close)  # after the workers stopped (they wait for their last acks)
            self._address = server.address
            held.callback(self._kill_all)  # on an unexpected error: never leave workers behind
            held.enter_context(serve_health(self.cfg, control=self.control, problems=server.problems, fleet=True,
                                            alive=self._loop_alive))
            signals = held.enter_context(stop_on_signals(stop))
            sampling = threading.Event()
            sampler = threading.Thread(target=self._sampler, args=(sampling,), name="sampler", daemon=True)
            sampler.start()
            held.callback(sampler.join)
            held.callback(sampling.set)
            self._reset_instances()
            if self.pidfile is not None:  # ready: whoever waits for the pidfile may count on us now
                write_atomic(self.pidfile, f"{os.getpid()}\n")
            log.info("manager started: %d workers, %s mode", len(self.procs), self.cfg.mode.name.value,
                     extra={"run_id": self.run_id, "pid": os.getpid()})
            self._to_start.extend(self.procs)  # started a slice per tick: the loop stays responsive
            while self._live() or not self._shutdown:
                if stop.is_set() and not self._shutdown:
                    why = f"signal {signal.Signals(signals[0]).name}" if signals else "stop requested"
                    self._begin_shutdown(time.time(), why)
                self.tick()
            self._flush()
            self._run_outcome["status"] = "stopped"

    def _loop_alive(self) -> str | None:
        """/healthz: the supervision loop ticks (a tick sleeps at most TICK_S)."""
        late = time.monotonic() - self._last_tick
        return f"supervision loop stalled for {late:.0f} s" if late > LOOP_STALLED_S else None

    def _record_run(self, store, held: ExitStack) -> None:
        """The manager's run in the store's `runs` (status `stopped` after a clean stop, else `failed`)."""
        from signalgen.modes import run_record

        from signalgen.transports.local import host_outcome

        started_at = datetime.now(timezone.utc)
        store.start_run(run_record(self.cfg, self.specs, self.run_id, started_at))
        outcome = {"status": "failed"}
        self._run_outcome = outcome

        def finish() -> None:
            stats = self._server.stats if self._server is not None else {}
            store.finish_run(self.run_id, **host_outcome(stats, started_at, outcome["status"]))

        held.callback(finish)

    def _live(self) -> list[WorkerProcess]:
        return [p for p in self.procs.values() if p.running]

    def tick(self) -> None:
        """One round of supervision; sleeps at most TICK_S, less when a worker exits."""
        wait([p.handle.sentinel for p in self._live()], timeout=0 if self._to_start else TICK_S)
        now = time.time()
        self._notice_stall(now)
        self._start_slice(now)
        self._reap(now)
        self._check_heartbeats(now)
        self._expire(now)
        self._memory_kills()
        if not self._shutdown:
            self._commands(now)
        self._flush()
        self._last_tick = time.monotonic()

    def _notice_stall(self, now: float) -> None:
        """A manager that was not running (SIGSTOP, a long GC or swap stall) saw no heartbeat for that
        long — nor did its writer relay any: the gap is its own, so heartbeats are judged afresh from now.
        The gap is measured from the end of the last tick: a slow tick (a start-up slice, a reload) is
        work, not a stall."""
        gap = time.monotonic() - self._last_tick
        if gap > STALL_S:
            log.warning("the manager did not run for %.1f s: heartbeats are judged from now on", gap)
            self._event(None, "stall", f"the manager did not run for {gap:.1f} s", now)
            self._observed_since = now

    def _lock(self):
        """One manager per shard of the control store (`hold`): SQLite's flock on `<path>.lock`,
        PostgreSQL's lease on the shard."""
        return self.control.hold(self.shard, self.run_id)

    # ------------------------------------------------------------ processes

    def _spawn(self, wid: str, now: float, reason: str) -> None:
        now = max(now, time.time())  # a long start-up loop: each worker's clock starts at its own start
        from signalgen.process.worker import WorkerArgs, worker_process

        target = self.worker_target or worker_process
        proc = self.procs[wid]
        args = WorkerArgs(spec=proc.spec, cfg=self.cfg, writer_address=self._address, authkey=self._authkey,
                          control_path=self._control_path, log_path=str(self.log_dir / f"{wid}.log"),
                          heartbeat_interval_s=self.limits.heartbeat_interval_s, run_id=self.run_id)
        handle = self._ctx.Process(target=worker_entry, args=(target, args), name=wid)
        try:
            handle.start()
        except OSError as exc:  # fork failed (no memory, too many processes): a failure like a crash
            log.error("cannot start worker: %s", exc, extra={"worker": wid})
            proc.change(State.STARTING, now, reason)
            proc.kill_reason = f"cannot start: {exc}"
            self._exited(proc, 1, now)
            return
        # the first start also starts the forkserver (seconds): the worker's clock starts when it exists
        proc.handle, proc.pid, proc.started_at, proc.exit_code = handle, handle.pid, now, None
        proc.alive_at = time.time()
        proc.errors.clear()
        proc.change(State.STARTING, now, reason)

    def _start_slice(self, now: float) -> None:
        """Start waiting workers for up to START_SLICE_S (a fork from the forkserver takes 10-100 ms)."""
        deadline = time.monotonic() + START_SLICE_S
        while self._to_start and time.monotonic() < deadline and not self._shutdown:
            proc = self.procs.get(self._to_start.popleft())
            if proc is not None and proc.state is State.STOPPED and not proc.running:
                self._spawn(proc.worker_id, now, "start")
        if self._shutdown:
            self._to_start.clear()

    def _reap(self, now: float) -> None:
        for proc in self._live():
            handle = proc.handle
            if handle.exitcode is None:
                continue
            code = handle.exitcode
            handle.join(0)
            handle.close()
            proc.handle = None
            self._exited(proc, code, now)

    def _exited(self, proc: WorkerProcess, code: int, now: float) -> None:
        """The worker's process ended with `code` (negative: killed by that signal)."""
        wid = proc.worker_id
        stopping = proc.state is State.STOPPING
        proc.stop_deadline = None
        killed, proc.kill_reason = proc.kill_reason, None
        proc.exit_code = code
        if proc.state is State.PAUSED:  # a SIGSTOPped worker was killed: it stays paused, without a process
            proc.pid = None
            self._event(wid, "exit", f"paused process ended ({killed or code}); `resume` starts a new one")
            self._dirty.add(wid)
            return
        new = after_exit(proc, code, policy=proc.spec.strategy.recovery, max_attempts=self.limits.max_recovery_attempts)
        transient = not stopping and code == TRANSIENT_EXIT
        failure = not stopping and code != 0 and not transient
        why = killed or (f"killed by {signal.Signals(-code).name}" if code < 0 else
                         "exit code 75: a store, broker or disk was away" if transient else f"exit code {code}")
        if failure:
            proc.failures += 1
        proc.transient = proc.transient + 1 if transient else 0
        if self._shutdown and new is State.BACKOFF:
            new = State.STOPPED
        self._change(proc, new, now, why)  # the event names the process that ended
        proc.pid = None
        if failure:
            self._event(wid, "failure", f"{why}; {new.value} (failure {proc.failures})")
            log.warning("worker failed: %s -> %s", why, new.value, extra={"worker": wid})
        if new is State.BACKOFF:
            # a transient exit waits no longer than TRANSIENT_BACKOFF_MAX_S: the fleet resumes within
            # seconds of the resource's return, and the count of failures is not spent
            delay = (min(backoff_delay(proc.transient, self.limits.backoff_initial_s, self.limits.backoff_max_s),
                         TRANSIENT_BACKOFF_MAX_S) if transient else
                     backoff_delay(proc.failures, self.limits.backoff_initial_s, self.limits.backoff_max_s))
            proc.backoff_until = now + delay
        then, proc.then = proc.then, None
        if then == "remove":
            self._remove(wid)
        elif then == "start" and not self._shutdown:
            proc.failures = 0
            self._spawn(wid, now, "restart")

    def _signal(self, proc: WorkerProcess, signum: int) -> None:
        if proc.handle is None or proc.handle.pid is None:
            return
        try:
            os.kill(proc.handle.pid, signum)
        except ProcessLookupError:  # already gone: the reaper sees it next
            log.info("worker already exited", extra={"worker": proc.worker_id})

    def _kill(self, proc: WorkerProcess, kind: str, reason: str) -> None:
        """SIGKILL, reaped as a failure with `reason` (stale heartbeat, memory); an event of `kind`."""
        if proc.kill_reason is not None:
            return
        proc.kill_reason = reason
        self._event(proc.worker_id, kind, reason)
        self._signal(proc, signal.SIGKILL)

    def _stop(self, proc: WorkerProcess, now: float, reason: str) -> None:
        """Graceful stop: SIGTERM (SIGCONT too when SIGSTOPped), SIGKILL after stop_timeout_s."""
        if proc.running:
            if proc.state is State.STOPPING:
                return
            paused = proc.state is State.PAUSED
            if paused:  # SIGSTOPped: it must run again to handle SIGTERM (PAUSED -> STARTING -> STOPPING)
                self._change(proc, State.STARTING, now, "continued to stop")
            self._change(proc, State.STOPPING, now, reason)
            self._signal(proc, signal.SIGTERM)
            if paused:
                self._signal(proc, signal.SIGCONT)
            proc.stop_deadline = now + self.limits.stop_timeout_s
        elif State.STOPPED in TRANSITIONS[proc.state]:  # no process: BACKOFF, or PAUSED after a failure
            proc.backoff_until = None
            self._change(proc, State.STOPPED, now, reason)

    def _expire(self, now: float) -> None:
        """SIGKILL for workers past their stop timeout; BACKOFF workers whose delay passed start again."""
        for proc in self._live():
            if proc.stop_deadline is not None and now >= proc.stop_deadline:
                self._kill(proc, "stop-timeout", f"no exit {self.limits.stop_timeout_s:g}s after SIGTERM: SIGKILL")
        if self._shutdown:
            return
        for wid, proc in list(self.procs.items()):
            if proc.state is State.BACKOFF and proc.backoff_until is not None and now >= proc.backoff_until:
                proc.backoff_until = None
                proc.restarts += 1
                self._spawn(wid, now, f"restart after {'transient exit' if proc.transient else 'failure'} "
                                      f"{proc.transient or proc.failures}")
            elif proc.state is State.RUNNING and proc.failures and now - proc.state_since > self.limits.backoff_max_s:
                proc.failures = 0  # it has run long enough: the next failure starts the backoff anew
                self._dirty.add(wid)

    def _kill_all(self) -> None:
        live = self._live()
        for proc in live:
            self._signal(proc, signal.SIGKILL)
        for proc in live:
            proc.handle.join(5)

    def _begin_shutdown(self, now: float, why: str) -> None:
        log.info("stopping every worker: %s", why, extra={"run_id": self.run_id})
        self._shutdown = True
        for proc in self.procs.values():
            proc.then = None
            self._stop(proc, now, f"manager stopping: {why}")

    # ------------------------------------------------------------ heartbeats and resources

    def _check_heartbeats(self, now: float) -> None:
        """Promote ready workers; kill those whose last proof of life is older than the threshold.

        A worker is judged only on what the manager could have observed: not before `_observed_since`
        (the manager's own start, or its last stall) and not while the control store, which carries
        the heartbeats, cannot be read or written (a full disk stops the heartbeats with it)."""
        try:
            beats = self.control.heartbeats()
        except SignalgenError as exc:
            self._control_failed(exc)
            return
        threshold = self.limits.heartbeat_threshold_s
        for proc in self._live():
            if proc.state not in (State.STARTING, State.RUNNING):
                continue  # PAUSED (SIGSTOPped) and STOPPING workers are not expected to beat
            beat = beats.get(proc.worker_id)
            if beat is not None and beat.get("pid") == proc.pid:
                ts = _epoch(beat.get("ts")) or 0.0
                proc.alive_at = max(proc.alive_at, ts)
                self._count_errors(proc, ts, int(beat.get("errors") or 0), now)
                # ready, said after this STARTING began (a resumed worker's last beat predates its pause)
                if beat.get("ready") and proc.state is State.STARTING and ts >= proc.state_since - 0.01:
                    self._change(proc, State.RUNNING, now, "ready")
            age = now - max(proc.alive_at, self._observed_since)
            if age > threshold and self._control_outage.since is None:
                self._kill(proc, "heartbeat", f"heartbeat {age:.0f}s old (threshold {threshold:g}s)")

    def _count_errors(self, proc: WorkerProcess, ts: float, errors: int, now: float) -> None:
        """Mark a worker unhealthy while its errors in the last minute exceed max_errors_per_minute."""
        window = proc.errors
        if not window or window[-1][0] != ts:
            window.append((ts, errors))
        while len(window) > 1 and window[1][0] <= now - ERROR_WINDOW_S:
            window.popleft()
        recent = window[-1][1] - window[0][1]
        limit = self.limits.max_errors_per_minute
        if recent > limit and not proc.unhealthy:
            proc.unhealthy = True
            detail = f"unhealthy: {recent} errors in the last minute (limit {limit})"
            self._event(proc.worker_id, "unhealthy", detail)
            proc.reason = detail
            self._dirty.add(proc.worker_id)
            log.warning(detail, extra={"worker": proc.worker_id})
        elif recent <= limit and proc.unhealthy:
            proc.unhealthy = False
            self._event(proc.worker_id, "healthy", f"{recent} errors in the last minute")
            self._dirty.add(proc.worker_id)

    def _sampler(self, stop: threading.Event) -> None:
        """Thread: CPU% and memory of every worker into the control store every resource_sample_s.

        Off the supervision loop. USS needs /proc/<pid>/smaps_rollup (~1 ms per process: 500
        workers every 5 s were a quarter of the manager's CPU), so each round reads only the cheap
        counters (/proc/<pid>/stat and statm) and refreshes the USS of a few workers
        (`_UssCache`); a worker whose RSS is over memory_mb has its USS read at once, so the
        memory limit acts as before. Workers above memory_mb go to `_over_memory` for the loop.
        """
        import psutil

        limit = self.limits.memory_mb
        procs: dict[int, psutil.Process] = {}  # cpu_percent needs the same object between samples
        uss_cache = _UssCache(self.limits.resource_sample_s)
        outage = Outage(log, "recording resource samples")
        while not stop.wait(self.limits.resource_sample_s):
            rows = []
            live = {p.worker_id: p.pid for p in list(self.procs.values()) if p.running and p.pid is not None}
            refresh = uss_cache.due(list(live.values()))
            for wid, pid in live.items():
                try:
                    ps = procs.get(pid)
                    if ps is None:
                        ps = procs[pid] = psutil.Process(pid)
                    cpu, rss = ps.cpu_percent(None), ps.memory_info().rss / 2**20
                    uss = uss_cache.uss(ps, rss, force=pid in refresh or rss > limit)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, ValueError):
                    continue
                rows.append((wid, cpu, rss, uss))
                if uss > limit:
                    self._over_memory.append((wid, pid, uss))
            for pid in set(procs) - set(live.values()):
                del procs[pid]
            uss_cache.forget(set(live.values()))
            if rows:
                try:
                    self.control.record_resources(rows)
                    outage.ok()
                except Exception as exc:  # noqa: BLE001 - sampling must not die with one failed write
                    outage.failed(exc)

    def _memory_kills(self) -> None:
        while self._over_memory:
            wid, pid, uss = self._over_memory.popleft()
            proc = self.procs.get(wid)
            if proc is None or proc.pid != pid or proc.state is State.STOPPING:
                continue
            self._kill(proc, "memory", f"memory {uss:.0f} MB over the limit {self.limits.memory_mb} MB")

    # ------------------------------------------------------------ control store

    def _change(self, proc: WorkerProcess, new: State, now: float, reason: str = "") -> None:
        if proc.state is new:  # the same state, a new reason: the row changes, no state event
            proc.reason = reason
            self._dirty.add(proc.worker_id)
        else:
            proc.change(new, now, reason)

    def _try(self, write: Callable, *args) -> bool:
        """A control-store call that may fail (disk full, file deleted or corrupt) without stopping
        the manager: False, and the store is marked down until a write succeeds again."""
        try:
            write(*args)
        except SignalgenError as exc:
            self._control_failed(exc)
            return False
        return True

    def _control_failed(self, exc: Exception) -> None:
        """The control store failed: supervise from memory meanwhile. A damaged file is moved aside
        (the next write creates a new store, which `_flush` fills with every worker's row)."""
        self._control_outage.failed(exc)
        if isinstance(exc, LeaseLost) and not self._shutdown:  # another manager runs our workers now
            log.error("%s: stopping every worker", exc)
            self._event(None, "lease-lost", str(exc))
            self._begin_shutdown(time.time(), "lease lost")
        if isinstance(exc, ControlStoreCorrupt):
            moved = self.control.quarantine()
            log.error("control store %s is damaged: moved to %s; a new one is created", self._control_path, moved)
            self._event(None, "control-store", f"damaged ({exc}); moved to {moved}")

    def _reset_instances(self) -> None:
        """Rows of a previous manager describe processes that are gone: start from the current specs."""
        for row in self.control.instances():
            if row["id"] not in self.procs:
                self.control.remove_instance(row["id"])
        # rows older than this process were meant for a manager that is gone: never run them late
        import psutil

        born = psutil.Process().create_time()
        for command in self.control.pending():
            if (_epoch(command.created_at) or 0.0) < born:
                self.control.fail(command.id, "submitted before this manager started; not executed")

    def _row(self, proc: WorkerProcess) -> dict:
        spec = proc.spec
        reason = f"unhealthy; {proc.reason}" if proc.unhealthy and proc.reason else (
            "unhealthy" if proc.unhealthy else proc.reason)
        return {"id": proc.worker_id, "client": spec.client.id, "strategy": spec.strategy.id, "symbol": spec.symbol,
                "timeframe": spec.timeframe, "mode": self.cfg.mode.name.value, "config_hash": spec.config_hash,
                "state": proc.state.value, "pid": proc.pid, "started_at": proc.started_at,
                "state_since": proc.state_since, "restarts": proc.restarts, "failures": proc.failures,
                "exit_code": proc.exit_code, "reason": reason}

    def _flush(self) -> None:
        """This tick's instance rows and events in one transaction. While the store cannot be written
        they wait (events bounded by MAX_UNWRITTEN_EVENTS, the oldest dropped); the first write that
        succeeds again ends the outage, and heartbeats are judged afresh from then."""
        if self.control.generation != self._generation:  # a new file (deleted, replaced, quarantined)
            self._generation = self.control.generation
            self._dirty |= set(self.procs)
            log.warning("control store %s was deleted or replaced: a new one holds every worker's row",
                        self._control_path)
        rows = [self._row(self.procs[w]) for w in sorted(self._dirty) if w in self.procs]
        events = list(self._events)
        try:
            self.control.record(rows, events, manager=(os.getpid(), self.run_id))
        except SignalgenError as exc:
            self._control_failed(exc)
            return
        self._dirty.clear()
        for _ in events:
            self._events.popleft()
        if self.control.generation != self._generation:  # recreated during this write: rewrite every row
            self._dirty |= set(self.procs)
        if self._control_outage.ok():  # heartbeats could not arrive meanwhile: judged afresh from now
            self._observed_since = time.time()

    def _remove(self, wid: str) -> None:
        self.procs.pop(wid, None)
        self._dirty.discard(wid)
        if self._try(self.control.remove_instance, wid):
            self._event(wid, "removed", "no longer in the client config (reload)")

    def _commands(self, now: float) -> None:
        try:
            pending = self.control.pending()
        except SignalgenError as exc:
            self._control_failed(exc)
            return
        for command in pending:
            if self._shutdown:  # a stop came first in this batch
                self._try(self.control.fail, command.id, "the manager is stopping")
                continue
            try:
                result = self.execute(command.command, command.strategy_id, command.parameters or {}, now,
                                      command_id=command.id)
            except (CommandError, ConfigError, InvalidTransition) as exc:
                log.warning("command %s failed: %s", excerpt(command.command, 60), exc,
                            extra={"command_id": command.id})
                self._try(self.control.fail, command.id, str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - a bad command must never take the manager down
                log.exception("command %s failed", excerpt(command.command, 60), extra={"command_id": command.id})
                self._try(self.control.fail, command.id, f"{type(exc).__name__}: {excerpt(str(exc))}")
                continue
            if result is not None:  # None: completed later (stop: once every worker stopped)
                self._try(self.control.complete, command.id, result)

    def _targets(self, pattern: str | None, command: str) -> list[WorkerProcess]:
        if not pattern:
            raise CommandError(f"{command} needs a worker id or glob (client.strategy.symbol.timeframe)")
        found = [w for w in self.procs if matches(w, pattern)]
        if not found:
            known = sorted(self.procs)
            sample = ", ".join(known[:5]) + (f" and {len(known) - 5} more" if len(known) > 5 else "")
            raise CommandError(f"no worker matches {excerpt(pattern)} (known: {sample or 'none'})")
        return [self.procs[w] for w in sorted(found)]

    def execute(self, command: str, target: str | None, parameters: dict, now: float,
                *, command_id: int | None = None) -> dict | None:
        """Apply one command; returns its result, or None when it completes later (stop).

        Raises CommandError (or ConfigError for reload / add-strategy) when it cannot apply.
        """
        if command not in COMMANDS:
            raise CommandError(f"unknown command {excerpt(command)}; known: {', '.join(COMMANDS)}")
        if command == "stop":
            self._stop_command = command_id
            self._begin_shutdown(now, "stop command")
            return None
        if command == "reload":
            return self.reload(now)
        if command == "add-strategy":
            return self.add_strategy(parameters.get("client"), parameters.get("config"), now)
        done, skipped = [], []
        for proc in self._targets(target, command):
            wid = proc.worker_id
            if command == "pause":
                if proc.running and proc.state in (State.STARTING, State.RUNNING):
                    self._signal(proc, signal.SIGSTOP)
                    self._change(proc, State.PAUSED, now, "paused (SIGSTOP)")
                elif proc.state is State.BACKOFF:
                    proc.backoff_until = None
                    self._change(proc, State.PAUSED, now, "paused while in backoff")
                else:
                    skipped.append(wid)
                    continue
            elif command == "resume":
                if proc.state is not State.PAUSED:
                    skipped.append(wid)
                    continue
                if proc.running:  # PAUSED -> STARTING; RUNNING again with its next ready heartbeat
                    self._signal(proc, signal.SIGCONT)
                    proc.alive_at = now  # its heartbeat is as old as the pause
                    self._change(proc, State.STARTING, now, "resumed (SIGCONT)")
                else:
                    proc.failures = 0
                    self._spawn(wid, now, "resumed")
            elif command == "start":
                if proc.running:
                    skipped.append(wid)
                    continue
                proc.failures, proc.backoff_until = 0, None
                self._spawn(wid, now, "start command")
            elif command == "stop-strategy":
                if wid in self._to_start:
                    self._to_start.remove(wid)
                if not proc.running and State.STOPPED not in TRANSITIONS[proc.state]:
                    skipped.append(wid)
                    continue
                proc.then = None
                self._stop(proc, now, "stop-strategy command")
            elif command == "restart":
                proc.failures, proc.backoff_until = 0, None
                if proc.running:
                    proc.then = "start"
                    self._stop(proc, now, "restart command")
                else:
                    self._spawn(wid, now, "restart command")
            done.append(wid)
            self._event(wid, "command", command)
        return {"workers": done, "unchanged": skipped}

    def reload(self, now: float) -> dict:
        """Re-read the client YAMLs: new workers start, removed ones stop, changed ones (config_hash)
        restart, the others keep their process. An invalid config raises ConfigError, changing nothing."""
        cfg, specs = self.loader()
        new = {s.id: s for s in specs}
        old = self.specs
        added = sorted(set(new) - set(old))
        removed = sorted(set(old) - set(new))
        changed = sorted(w for w in set(new) & set(old) if new[w].config_hash != old[w].config_hash)
        if self._server is not None:
            self._server.reloaded(cfg, specs)  # before the new workers start: their decisions are taken
        self.cfg = cfg
        for wid in removed:
            proc = self.procs[wid]
            if proc.running:
                proc.then = "remove"
                self._stop(proc, now, "removed by reload")
            else:
                self._remove(wid)
        for wid in changed:
            proc = self.procs[wid]
            proc.spec = new[wid]
            if proc.running:
                proc.then = "start"
                self._stop(proc, now, "config changed (reload)")
            elif proc.state in (State.BACKOFF, State.FATAL, State.EXITED):
                proc.failures = 0
                self._spawn(wid, now, "config changed (reload)")
            # STOPPED and PAUSED without a process keep their state; the new config applies at their start
            self._dirty.add(wid)
        for wid in set(new) - set(added) - set(changed):
            self.procs[wid].spec = new[wid]  # the same worker config; what only the manager reads (recovery) may differ
        for wid in added:
            self._add(new[wid])
            self._spawn(wid, now, "added by reload")
        result = {"started": added, "stopped": removed, "restarted": changed,
                  "unchanged": len(set(new) - set(added) - set(changed))}
        log.info("reload: %d started, %d stopped, %d restarted", len(added), len(removed), len(changed))
        return result

    def add_strategy(self, client: Any, text: Any, now: float) -> dict:
        """Add or replace strategies in `clients/<client>.yaml` (comments and layout kept), then reload;
        the file is restored when the new config is invalid. `client` must be a safe name whose file
        is inside `clients/`: the row that carries it may come from any program."""
        from signalgen.config.edit import client_file, merge_strategies

        if not client or text is None:
            raise CommandError("add-strategy needs parameters {client, config (YAML text)}")
        path = client_file(Path(self.cfg.root) / "clients", client)
        old = path.read_text()
        write_atomic(path, merge_strategies(old, text, file=f"add-strategy --client {client}"))
        try:
            return self.reload(now)
        except BaseException:
            write_atomic(path, old)
            raise


class _UssCache:
    """Each worker's last USS reading (psutil `memory_full_info`, which parses smaps_rollup).

    A worker's USS is read when it is new, when its RSS moved by more than `RSS_SLACK_MB` since
    the reading, when forced (RSS over the limit), and otherwise in turn: `due` names the workers
    with the oldest readings, enough that each is read again about every `REFRESH_S`.
    """

    REFRESH_S = 300.0  # a read costs ~4 ms of CPU (the kernel walks a 300 MB mapping): 500 workers
    # every 60 s were ~3% of a core; RSS moves and the limit still trigger a read at once
    RSS_SLACK_MB = 8.0

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self._read: dict[int, tuple[float, float, float]] = {}  # pid -> (uss MB, rss MB then, monotonic)

    def due(self, pids: list[int]) -> set[int]:
        """The pids whose turn it is this round."""
        per_round = max(1, math.ceil(len(pids) * self.period_s / self.REFRESH_S))
        known = sorted((self._read[p][2], p) for p in pids if p in self._read)
        return {p for _, p in known[:per_round]}

    def uss(self, ps, rss_mb: float, force: bool = False) -> float:
        last = self._read.get(ps.pid)
        if force or last is None or abs(rss_mb - last[1]) > self.RSS_SLACK_MB:
            mem = ps.memory_full_info()
            uss = getattr(mem, "uss", mem.rss) / 2**20
            self._read[ps.pid] = last = (uss, rss_mb, time.monotonic())
        return last[0]

    def forget(self, live: set[int]) -> None:
        for pid in set(self._read) - live:
            del self._read[pid]

