"""The local transport (`messaging.type: local`): the writer of a fleet of worker processes, the one
process that holds the signal store and the CSV / stream outputs, serving workers over local IPC
(docs/writer.md). `LocalTransport` at the end is what the registry hands out.

DuckDB allows one writing process per file, so worker processes never open it: each hands its
decisions to the `WriterServer` through a `RemoteSink` (a `modes.worker.Sink`), over an AF_UNIX
socket of `multiprocessing.connection` authenticated with a shared key (HMAC challenge both ways).

Protocol (pickled tuples, one connection per worker; see docs/writer.md):

    worker -> writer   ("hello", {"worker_id", "pid", "spec"})
    writer -> worker   ("welcome", {"run_id", "checkpoint", "heartbeats"})  |  ("refused", reason)
    worker -> writer   ("batch", seq, Records | Frames, bar_rejections | None)      (seq = 1, 2, ...)
    writer -> worker   ("ack", seq, checkpoint)  |  ("failed", seq, reason)
    worker -> writer   ("beat", fields)     (only when the welcome said "heartbeats": True)
    worker -> writer   ("bye",)

Group commit: the writer gathers the batches of every connected worker for `commit_interval_s`
after the first arrives (or until `max_group_bars`) — longer when commits are slow: for
COMMIT_WAIT_FACTOR times the last commit's duration, at most `max_commit_wait_s`, so the fixed cost
of a group (a DuckDB transaction, the outputs' fsync, the checkpoint write: milliseconds to tens of
milliseconds) takes at most about a ninth of the writer's time (up to the cap) however many small
batches a fleet sends; a writer serving streaming workers gathers 0.5-1 s (`STREAMING_WINDOW`). It stores them in one transaction (`SignalWriter.record_group`), flushes
the outputs (`SignalWriter.flush`), records the workers' checkpoints in the store
(`SignalStore.write_checkpoints`), and only then acks each batch with its worker's checkpoint. A failed write acks nothing of the group: its workers get "failed", keep their
old checkpoint and restart from it (every write is an upsert, so the replay is harmless).

Heartbeats: a writer given the control store (`control_path`) relays its workers' heartbeats into
it, the newest of each worker every HEARTBEAT_RELAY_S in one transaction. A fleet of 500 workers
beating every 2 s wrote 250 SQLite transactions a second, one per beat, each ~0.6 ms of the worker's
CPU (its share of WAL appends and checkpoints); now a worker's beat is one small message on the
connection it already has.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from multiprocessing.connection import Client, Connection, answer_challenge, deliver_challenge
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
import pyarrow as pa

from signalgen.config.models import RunConfig
from signalgen.config.workers import WorkerSpec
from signalgen.errors import ConfigError, SignalgenError, TransientError, is_transient
from signalgen.logs import Outage
from signalgen.storage.base import SignalStore
from signalgen.storage.writer import SignalWriter

if TYPE_CHECKING:
    from signalgen.signals.records import Records

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the terminating NUL
HANDSHAKE_TIMEOUT_S = 10.0
COMMIT_WAIT_FACTOR = 8  # gather batches for 8x the last commit's duration: commits ~1/9 of the time
# The group window of a writer serving streaming workers (the manager's, `writer`): 0.5-1 s, so a
# fleet of hundreds of workers at one bar per second pays a group's fixed cost (store transaction,
# outputs' fsync, checkpoint write) about once a second, not 4-20 times; a decision is durable and
# acked within ~1 s (mock and simulation on local-dev). Batch runs (`run --workers`) keep the
# defaults: their batches fill a group (`max_group_bars`) at once.
STREAMING_WINDOW = {"commit_interval_s": 0.5, "max_commit_wait_s": 1.0}
HEARTBEAT_RELAY_S = 0.5  # relayed heartbeats reach the control store within this long
ANSWER_WAIT_S = 1.0  # a worker waiting for acks (flush, backpressure) looks again at least this often
RETRY_INITIAL_S, RETRY_MAX_S = 0.1, 1.0  # a group that met a full disk is tried again this often


@dataclass(frozen=True)
class Frames:
    """One batch of a worker's decision records, built in the worker (so record building runs on
    every worker's core, not the writer's): what `SignalWriter.record_group` takes."""

    signals: pl.DataFrame
    rejections: pl.DataFrame

    def frames(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        return self.signals, self.rejections

    @property
    def bars(self) -> int:
        return self.signals.height + self.rejections.height

    @property
    def last_bar_time(self) -> datetime | None:
        times = [t for t in (self.signals["bar_time"].max(), self.rejections["bar_time"].max()) if t is not None]
        return max(times).astimezone(timezone.utc) if times else None

    def __reduce__(self):
        # sent as Arrow IPC streams: the writer reads them back without copying (250k decision rows,
        # 65 MB: 20 ms where unpickling the polars frames took 78 ms), on the writer's busy core
        return _frames_from_ipc, (_to_ipc(self.signals), _to_ipc(self.rejections))


def _to_ipc(df: pl.DataFrame) -> bytes:
    table = df.to_arrow()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as stream:
        stream.write_table(table)
    return sink.getvalue().to_pybytes()


def _frames_from_ipc(signals: bytes, rejections: bytes) -> Frames:
    return Frames(*(pl.from_arrow(pa.ipc.open_stream(b).read_all()) for b in (signals, rejections)))


# --------------------------------------------------------------------------------------------- server


class _Inbound:
    """Messages of one connection, cut from whatever a read returned (`multiprocessing.connection`'s
    framing: a 4-byte big-endian length, or -1 and an 8-byte length, then the pickle).

    The reader thread reads once per readable event, so it never blocks on one connection: a worker
    stopped mid-message (`pause` is SIGSTOP) or sending a large batch slowly holds up no other."""

    def __init__(self) -> None:
        self._head = bytearray()          # bytes after the last complete message, up to a header's end
        self._body: bytearray | None = None  # a message whose header is read and body not yet complete
        self._filled = 0

    def read(self, fd: int) -> list[bytearray]:
        """The messages one read of the readable `fd` completed; EOFError when the peer closed."""
        done: list[bytearray] = []
        if self._body is None:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise EOFError
            self._head += chunk
        else:
            n = os.readv(fd, [memoryview(self._body)[self._filled:]])
            if not n:
                raise EOFError
            self._filled += n
            if self._filled < len(self._body):
                return done
            done.append(self._body)  # pickle reads a bytearray as it is: no copy of a large batch
            self._body = None
        buf = self._head
        while len(buf) >= 4:
            (size,) = struct.unpack_from("!i", buf)
            start = 4
            if size == -1:
                if len(buf) < 12:
                    break
                (size,) = struct.unpack_from("!Q", buf, 4)
                start = 12
            if len(buf) - start >= size:
                done.append(buf[start:start + size])
                del buf[:start + size]
                continue
            self._body = bytearray(size)  # read straight into it from now on
            self._filled = len(buf) - start
            self._body[:self._filled] = buf[start:]
            buf.clear()
            break
        return done


@dataclass(eq=False)
class _Worker:
    """One connected worker, as the writer sees it."""

    spec: WorkerSpec
    conn: Connection
    pid: int
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    failed: bool = False  # a write of its batches failed: drop its later batches, ack nothing more
    closed: bool = False
    inbound: _Inbound = field(default_factory=_Inbound)  # read by the reader thread after the hello

    def send(self, message: tuple) -> None:
        """Send if still connected; a worker gone meanwhile is not the writer's problem."""
        with self.send_lock:
            if self.closed:
                return
            try:
                _send(self.conn, message)
            except (OSError, ValueError):
                self.closed = True


@dataclass(eq=False)
class _Batch:
    worker: _Worker
    seq: int
    frames: Frames | Records  # rows for a small batch (up to SMALL_BATCH bars), frames for a bigger one
    bar_rejections: pl.DataFrame | None
    arrived: float = field(default_factory=time.monotonic)

    @property
    def bars(self) -> int:
        return self.frames.bars + (self.bar_rejections.height if self.bar_rejections is not None else 0)


class WriterServer:
    """Serves worker processes: stores their decisions, routes their signals, acks their checkpoints.

    `start()` opens the outputs, loads the checkpoints of `cfg`'s mode and listens on `address`
    (an AF_UNIX socket path, created 0600; a stale one is replaced, a live one is refused);
    `close()` commits and acks what arrived, closes the outputs and removes the socket. The store
    is the caller's: opened before, closed after.

    One worker disconnecting or crashing affects no other: its committed batches stay committed,
    its unacked ones are simply re-sent by its next incarnation after the checkpoint the hello
    returns.
    """

    def __init__(self, cfg: RunConfig, store: SignalStore, *, run_id: str, address: str, authkey: bytes,
                 commit_interval_s: float = 0.05, max_commit_wait_s: float = 0.25, max_group_bars: int = 100_000,
                 writer: SignalWriter | None = None, control_path: str | None = None, metrics: bool = False) -> None:
        if len(os.fsencode(address)) > MAX_SOCKET_PATH:
            raise ConfigError(f"writer socket path is {len(os.fsencode(address))} bytes, over the "
                              f"{MAX_SOCKET_PATH} a Unix socket allows: {address}; pass a shorter --writer/--address")
        self.cfg, self.store, self.run_id = cfg, store, run_id
        self.address, self._authkey = address, authkey
        self.commit_interval_s, self.max_group_bars = commit_interval_s, max_group_bars
        self.max_commit_wait_s = max(max_commit_wait_s, commit_interval_s)
        self._last_commit_s = 0.0
        self.mode = cfg.mode.name.value
        # a run's own writer (`run --workers`: it owns the run's range at the end): flushed, not closed
        self._writer: SignalWriter | None = writer
        self._own_writer = writer is None
        self._checkpoints: dict[str, datetime] = {}
        self._workers: dict[str, _Worker] = {}
        self._lock = threading.Lock()
        self._outputs_lock = threading.Lock()  # opening outputs: hello threads and the commit thread
        # batches for the commit thread: woken when the first of a group arrives, when a group is
        # full (max_group_bars) and at close; not per batch (a fleet sends hundreds a second)
        self._inbox: deque[_Batch] = deque()
        self._inbox_bars = 0
        self._inbox_ready = threading.Condition(self._lock)
        self._drained = False  # closing, and the reader has stopped: the commit thread ends when the inbox is empty
        # one reader thread for every worker's connection (epoll) instead of a thread per connection:
        # a fleet of 500 workers wakes one thread per message burst, not 500 threads in turn
        self._epoll = select.epoll()
        self._readers: dict[int, _Worker] = {}  # fd -> worker; only the reader thread closes these
        self.control_path = control_path
        self._beats: dict[str, dict] = {}  # worker id -> its newest heartbeat not yet relayed
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._closing = threading.Event()
        # bars = decisions (signals + rejections) + bad bars, as a run counts them; stored ones only
        self.stats = {"groups": 0, "batches": 0, "bars": 0, "signals": 0, "rejections": 0, "bar_rejections": 0,
                      "failed_groups": 0, "retries": 0, "commit_s": 0.0}
        self._outage = Outage(log, "storing decisions (their workers wait for the acks)")
        # Prometheus (signalgen.metrics): a long-lived writer's decisions and lag; not a batch run's
        self.metrics = metrics
        self._committing: list[_Batch] = []  # the group being written
        self._untrack_lag: Callable[[], None] | None = None
        # called with (group size in batches, bars, seconds the commit took); for benchmarks
        self.on_commit: Callable[[int, int, float], None] | None = None

    # ----------------------------------------------------------------------------- lifecycle

    def start(self) -> WriterServer:
        if self._writer is None:
            self._writer = SignalWriter.from_config(self.cfg, self.store)
        self._count(self._writer)
        if self.metrics:
            from signalgen.metrics import track_lag

            self._untrack_lag = track_lag(self._oldest_unstored)
        self._checkpoints = self.store.checkpoints(self.mode)
        _claim_socket_path(self.address)
        # authkey=None here: the challenge runs on each connection's own thread (with a timeout),
        # so a client that connects and says nothing cannot block accepting the others
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is created 0600
        try:
            self._listener.bind(self.address)
        finally:
            os.umask(old)
        self._listener.listen(512)
        self._listener.settimeout(0.2)  # accept() wakes up to see close(): closing a socket does not
        loops = [("writer-accept", self._accept_loop), ("writer-read", self._read_loop),
                 ("writer-commit", self._commit_loop)]
        if self.control_path:
            loops.append(("writer-beats", self._relay_loop))
        for name, target in loops:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("writer serving %d checkpoints on %s", len(self._checkpoints), self.address,
                 extra={"run_id": self.run_id, "path": self.address})
        return self

    def __enter__(self) -> WriterServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def reloaded(self, cfg: RunConfig, specs: list[WorkerSpec]) -> None:
        """Nothing to do: a worker's outputs open at its hello, whichever client it belongs to."""

    def problems(self) -> list[str]:
        """Why this writer is not ready (empty: it is): a thread ended, or the store cannot be written."""
        out = [f"writer thread {t.name} ended" for t in self._threads if not t.is_alive()]
        if self._outage.since is not None:
            out.append(f"storing decisions fails since {time.monotonic() - self._outage.since:.0f} s")
        return out

    def _count(self, writer: SignalWriter) -> None:
        """Have `writer` count what it stores into the metrics (a long-lived writer only)."""
        if self.metrics:
            from signalgen.metrics import observe_stored

            writer.on_stored = lambda signals, rejections: observe_stored(
                self.mode, signals, rejections, received=self._received())

    def _received(self) -> float | None:
        """Wall time the oldest batch of the group being written arrived."""
        group = self._committing
        return time.time() - (time.monotonic() - min(b.arrived for b in group)) if group else None

    def _oldest_unstored(self) -> float | None:
        times = [self._committing[0].arrived] if self._committing else []
        try:
            times.append(self._inbox[0].arrived)
        except IndexError:
            pass
        return min(times) if times else None

    def close(self) -> None:
        """Stop accepting, commit and ack every batch received, close the outputs, remove the socket."""
        if self._closing.is_set():
            return
        self._closing.set()
        if self._untrack_lag is not None:
            self._untrack_lag()
        for thread in self._threads:
            if thread.name == "writer-commit":  # after the reader: nothing arrives any more
                with self._lock:
                    self._drained = True
                    self._inbox_ready.notify()
            thread.join()
        if self._listener is not None:
            self._listener.close()
            Path(self.address).unlink(missing_ok=True)
        with self._lock:
            workers, self._workers = list(self._workers.values()), {}
        for w in workers + list(self._readers.values()):
            _close_conn(w)
        self._readers.clear()
        self._epoll.close()
        if self._writer is not None:
            if self._own_writer:
                self._writer.close()
            else:
                self._writer.flush()
            self._writer = None

    @property
    def checkpoints(self) -> dict[str, datetime]:
        """Worker id -> checkpoint (committed and recorded in the store)."""
        with self._lock:
            return dict(self._checkpoints)

    def connected(self) -> list[str]:
        """Ids of the workers connected now."""
        with self._lock:
            return sorted(self._workers)

    # ----------------------------------------------------------------------------- connections

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                log.error("writer stopped accepting: %r", exc, extra={"path": self.address})
                return
            sock.setblocking(True)
            conn = Connection(sock.detach())
            threading.Thread(target=self._serve, args=(conn,), name="writer-conn", daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        """A new connection's handshake and hello (on a thread of its own: a client that says nothing
        cannot hold up the others); then the reader thread reads its messages."""
        worker: _Worker | None = None
        try:
            if self._authenticate(conn) and conn.poll(HANDSHAKE_TIMEOUT_S):
                worker = self._hello(conn, conn.recv())
        except (EOFError, OSError):
            pass
        except Exception as exc:  # noqa: BLE001 - a malformed peer must not take the writer down
            log.warning("worker handshake failed: %r", exc)
        if worker is None:
            conn.close()
            return
        self._readers[conn.fileno()] = worker  # before register: the reader looks it up on the first event
        try:
            self._epoll.register(conn.fileno(), select.EPOLLIN)
        except (OSError, ValueError):  # closing meanwhile
            self._leave(worker)

    def _read_loop(self) -> None:
        """Every connected worker's messages: batches into the inbox, beats for the relay. A worker
        whose connection ends (bye, exit, crash, kill -9) is dropped; its unacked batches are re-sent
        by its next incarnation."""
        while not self._closing.is_set():
            try:
                events = self._epoll.poll(HEARTBEAT_RELAY_S)
            except InterruptedError:
                continue
            for fd, _ in events:
                worker = self._readers.get(fd)
                if worker is None:
                    continue
                try:
                    keep = not worker.closed
                    for raw in worker.inbound.read(fd) if keep else ():
                        keep = self._handle(worker, pickle.loads(raw))
                        if not keep:
                            break
                except (EOFError, OSError):
                    keep = False  # the worker went away
                except Exception as exc:  # noqa: BLE001 - a malformed peer must not take the writer down
                    log.warning("worker connection failed: %r", exc, extra={"worker": worker.spec.id})
                    keep = False
                if not keep:
                    self._readers.pop(fd, None)
                    try:
                        self._epoll.unregister(fd)
                    except (OSError, ValueError):
                        pass
                    self._leave(worker)

    def _handle(self, worker: _Worker, message: tuple) -> bool:
        """One message of a connected worker; False when its connection is to end."""
        kind = message[0]
        if kind == "batch":
            _, seq, frames, bar_rejections = message
            batch = _Batch(worker, seq, frames, bar_rejections)
            with self._lock:
                first = not self._inbox
                self._inbox.append(batch)
                before, self._inbox_bars = self._inbox_bars, self._inbox_bars + batch.bars
                if first or before < self.max_group_bars <= self._inbox_bars:
                    self._inbox_ready.notify()
            return True
        if kind == "beat":
            with self._lock:
                self._beats[worker.spec.id] = message[1]
            return True
        if kind != "bye":
            log.warning("unknown message %r from worker; closing", kind, extra={"worker": worker.spec.id})
        return False

    def _leave(self, worker: _Worker) -> None:
        with self._lock:
            if self._workers.get(worker.spec.id) is worker:
                del self._workers[worker.spec.id]
        _close_conn(worker)
        log.info("worker disconnected", extra={"worker": worker.spec.id, "pid": worker.pid})

    def _authenticate(self, conn: Connection) -> bool:
        """The HMAC challenge both ways (what Listener(authkey=...) does), bounded by a timeout."""
        import multiprocessing

        # deliver_challenge sends first; answer_challenge waits for the client's challenge
        try:
            deliver_challenge(conn, self._authkey)
            if not conn.poll(HANDSHAKE_TIMEOUT_S):
                raise multiprocessing.AuthenticationError("no challenge from the client")
            answer_challenge(conn, self._authkey)
            return True
        except (multiprocessing.AuthenticationError, EOFError, OSError) as exc:
            log.warning("writer refused a connection: authentication failed (%s)", type(exc).__name__,
                        extra={"path": self.address})
            return False

    def _hello(self, conn: Connection, message) -> _Worker | None:
        if not (isinstance(message, tuple) and message and message[0] == "hello"):
            conn.send(("refused", "expected hello"))
            return None
        info = message[1]
        spec: WorkerSpec = info["spec"]
        mode = spec.run.get("mode")
        if mode != self.mode:
            conn.send(("refused", f"worker {spec.id} runs mode {mode!r}; this writer serves {self.mode!r}"))
            return None
        try:
            with self._outputs_lock:  # a client added since the writer started (reload): refuse early if unservable
                if self._writer is not None:
                    self._writer.open_outputs(self.cfg, spec)
        except SignalgenError as exc:
            conn.send(("refused", f"outputs of {spec.id}: {exc}"))
            return None
        worker = _Worker(spec, conn, int(info.get("pid", 0)))
        with self._lock:
            old = self._workers.get(spec.id)
            self._workers[spec.id] = worker
            checkpoint = self._checkpoints.get(spec.id)
        if old is not None:
            # a restarted worker whose old connection is not closed yet: the newest one is the worker
            log.warning("worker connected again; dropping its previous connection", extra={"worker": spec.id})
            _shut_conn(old)  # the reader sees its end and closes it (it owns the fds it polls)
        worker.send(("welcome", {"run_id": self.run_id, "checkpoint": checkpoint,
                                 "heartbeats": bool(self.control_path)}))
        log.info("worker connected, resuming after %s", checkpoint, extra={"worker": spec.id, "pid": worker.pid})
        return worker

    def _relay_loop(self) -> None:
        """Every HEARTBEAT_RELAY_S, the workers' newest heartbeats into the control store (and once
        more at close). A control store that cannot be written is logged; the next round retries."""
        from signalgen.storage.control import ControlStore

        control = ControlStore(self.control_path)
        outage = Outage(log, "relaying heartbeats to the control store")
        try:
            while True:
                closing = self._closing.wait(HEARTBEAT_RELAY_S)
                with self._lock:
                    beats, self._beats = self._beats, {}
                if beats:
                    try:
                        control.relay_heartbeats(beats)
                        outage.ok()
                    except Exception as exc:  # noqa: BLE001 - a missed heartbeat is the manager's to notice
                        outage.failed(exc)
                if closing:
                    return
        finally:
            control.close()

    # ----------------------------------------------------------------------------- group commit

    def _commit_loop(self) -> None:
        while True:
            with self._lock:
                self._inbox_ready.wait_for(lambda: self._inbox or self._drained)
                if not self._inbox:
                    return  # closed, nothing left
                if not self._drained:  # gather the group: until its window ends or it is full
                    wait = min(self.max_commit_wait_s,
                               max(self.commit_interval_s, COMMIT_WAIT_FACTOR * self._last_commit_s))
                    self._inbox_ready.wait_for(lambda: self._inbox_bars >= self.max_group_bars or self._drained,
                                               wait)
                group, self._inbox, self._inbox_bars = list(self._inbox), deque(), 0
                self._committing = group
            try:
                self._commit(group)  # at close: whatever was received is committed and acked too
            finally:
                self._committing = []

    def _commit(self, group: list[_Batch]) -> None:
        """Write one group, flush, record checkpoints, then ack; on failure ack nothing.

        A transient failure (a full disk) keeps the group and tries again, every RETRY_INITIAL_S
        doubling to RETRY_MAX_S, until it is written or the writer closes: its workers wait for their
        acks, and stop taking bars when their windows fill (backpressure); nobody exits, nothing is
        counted as a crash, and the first try after the disk has room again acks them all."""
        started = time.perf_counter()
        group = [b for b in group if not b.worker.failed]
        if not group:
            return
        by_worker: dict[str, list[_Batch]] = {}
        for b in group:
            by_worker.setdefault(b.worker.spec.id, []).append(b)
        delay = RETRY_INITIAL_S
        while True:
            try:
                moved = self._write_group(by_worker)
                break
            except Exception as exc:  # noqa: BLE001 - waited out, or reported to the workers
                self._drop_writer()
                if self.metrics:
                    from signalgen.metrics import WRITE_FAILURES

                    WRITE_FAILURES.inc()
                if is_transient(exc) and not self._closing.is_set():
                    self.stats["retries"] += 1
                    self._outage.failed(exc)
                    self._closing.wait(delay)
                    delay = min(2 * delay, RETRY_MAX_S)
                    continue
                self._fail_group(group, exc)
                return
        self._outage.ok()
        with self._lock:
            self._checkpoints.update(moved)
            acked = dict(self._checkpoints)
        spent = time.perf_counter() - started
        self._last_commit_s = spent
        bars = sum(b.bars for b in group)
        self.stats["groups"] += 1
        self.stats["batches"] += len(group)
        self.stats["bars"] += bars
        self.stats["signals"] += sum(len(b.frames.signals) for b in group)
        self.stats["rejections"] += sum(len(b.frames.rejections) for b in group)
        self.stats["bar_rejections"] += sum(b.bar_rejections.height for b in group if b.bar_rejections is not None)
        self.stats["commit_s"] += spent
        if self.on_commit is not None:
            self.on_commit(len(group), bars, spent)
        for b in group:  # last: a worker that has its ack finds the group counted
            b.worker.send(("ack", b.seq, acked.get(b.worker.spec.id)))

    def _write_group(self, by_worker: dict[str, list[_Batch]]) -> dict[str, datetime]:
        """Store and route one group's decisions, then its checkpoints; the checkpoints that moved."""
        moved: dict[str, datetime] = {}
        writer = self._writer_or_rebuild()
        items = []
        for wid, batches in by_worker.items():
            parts = [b.frames for b in batches if b.frames.bars]
            if parts:
                items.append((batches[-1].worker.spec, _joined(parts)))
                last = max(p.last_bar_time for p in parts)
                old = self._checkpoints.get(wid)
                if old is None or last > old:
                    moved[wid] = last
            rejected = [b.bar_rejections for b in batches if b.bar_rejections is not None]
            if rejected:
                writer.record_bar_rejections(pl.concat(rejected), self.run_id)
        with self._outputs_lock:
            for spec, _ in items:
                writer.open_outputs(self.cfg, spec)
        writer.record_group(items)
        writer.flush()
        self.store.write_checkpoints(self.mode, moved)
        return moved

    def _fail_group(self, group: list[_Batch], exc: Exception) -> None:
        """Ack nothing of the group: its workers exit and resume from their checkpoints."""
        self.stats["failed_groups"] += 1
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        log.error("group commit failed, %d batches not acknowledged: %s", len(group), reason,
                  extra={"run_id": self.run_id})
        for b in group:
            b.worker.failed = True
            b.worker.send(("failed", b.seq, reason))

    def _writer_or_rebuild(self) -> SignalWriter:
        """The signal writer; after a failed write a fresh one (a SignalWriter stops writing after
        its first failure, and the outputs drop what they had pending)."""
        if self._writer is None:
            with self._outputs_lock:
                self._writer = SignalWriter.from_config(self.cfg, self.store)
            self._count(self._writer)
            self._own_writer = True  # a run's writer that failed is not handed back to the run
        return self._writer

    def _drop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None and self._own_writer:
            try:
                writer.close()
            except Exception as exc:  # noqa: BLE001 - it already failed; its error was reported
                log.debug("closing the failed signal writer: %r", exc)


RUN_COUNTS = ("bars", "signals", "rejections", "bar_rejections")


def host_outcome(stats: dict, started_at: datetime, status: str) -> dict:
    """What `SignalStore.finish_run` records for a run whose decisions a host stored (the writer
    server or the recorder host, by their `stats`): status, counts, duration and rate."""
    finished = datetime.now(timezone.utc)
    elapsed = (finished - started_at).total_seconds()
    counts = {k: int(stats.get(k, 0)) for k in RUN_COUNTS}
    return {"finished_at": finished, "status": status, "elapsed_s": elapsed,
            "bars_per_s": counts["bars"] / max(elapsed, 1e-9), **counts}


def _joined(parts: list) -> Frames | Records:
    """One worker's batches of a group as one item: rows stay rows (the writer builds one frame for
    the group's rows), anything else becomes one Frames."""
    from signalgen.signals.records import Records  # imported on first use: keeps the manager's start light

    if all(isinstance(p, Records) for p in parts):
        return Records.join(parts)
    frames = [p.frames() for p in parts]
    return Frames(pl.concat([f[0] for f in frames]), pl.concat([f[1] for f in frames]))


def _send(conn: Connection, message: tuple) -> None:
    """`conn.send(message)` without multiprocessing's ForkingPickler (a pickler and a copy of its
    dispatch table per message); our messages need no fork-aware reducers. `conn.recv` reads it."""
    conn.send_bytes(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))


def _close_conn(worker: _Worker) -> None:
    with worker.send_lock:
        worker.closed = True
        try:
            worker.conn.close()
        except OSError:
            pass


def _shut_conn(worker: _Worker) -> None:
    """End a connection without closing its descriptor (the reader thread closes it when it sees
    the end): a descriptor closed under the reader could be reused by the next connection."""
    with worker.send_lock:
        worker.closed = True
        try:
            sock = socket.fromfd(worker.conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            sock.close()  # the duplicate


def _claim_socket_path(address: str) -> None:
    """Make `address` free to bind: create its folder; remove a socket no process listens on; refuse
    one that a live writer serves (TransientError) or a path that is not a socket (ConfigError)."""
    path = Path(address)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"writer socket path {address} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(address)
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # left by a killed writer
        return
    finally:
        probe.close()
    raise TransientError(f"another writer is serving {address}")


# --------------------------------------------------------------------------------------------- client


class RemoteSink:
    """A worker's sink in another process than the writer (`modes.worker.Sink`).

    `record()` queues decisions and sends them as one batch while fewer than `max_in_flight`
    batches await their ack: a worker producing faster than the writer commits sends bigger
    batches, not more of them (a worker at one bar per second sends each bar at once). When
    `max_pending_bars` wait unsent and the in-flight window is full, `record()` blocks until an
    ack frees it: backpressure, never an unbounded buffer. `checkpoints` advances only on an ack.

    The writer's answers are read by whoever calls in — `record()`, `checkpoints`, `flush()` — not
    by a thread of their own: an ack waits in the socket until the worker next looks (its next bar,
    or its heartbeat), so a paced worker wakes once per bar, not twice (a 500-worker fleet: 500
    thread wake-ups a second less).

    A failed commit ("failed") or a lost writer makes the next `record()` / `flush()` raise
    TransientError: the worker exits and its next incarnation resumes after the checkpoint.
    """

    def __init__(self, address: str, authkey: bytes, spec: WorkerSpec, *, max_in_flight: int = 4,
                 max_pending_bars: int = 8192, connect_timeout_s: float = 30.0) -> None:
        self.spec, self.address = spec, address
        self.max_in_flight, self.max_pending_bars = max_in_flight, max_pending_bars
        self._conn = _connect(address, authkey, connect_timeout_s)
        try:
            self._conn.send(("hello", {"worker_id": spec.id, "pid": os.getpid(), "spec": spec}))
            if not self._conn.poll(connect_timeout_s):
                raise TransientError(f"writer at {address} did not answer the hello of {spec.id}")
            reply = self._conn.recv()
        except (EOFError, OSError) as exc:
            self._conn.close()
            raise TransientError(f"writer at {address} closed the connection of {spec.id}: {exc!r}") from exc
        if reply[0] != "welcome":
            self._conn.close()
            raise ConfigError(f"writer at {address} refused worker {spec.id}: {reply[1]}")
        self.run_id: str = reply[1]["run_id"]
        self._resume: datetime | None = reply[1]["checkpoint"]
        self.relays_heartbeats: bool = bool(reply[1].get("heartbeats"))
        self._checkpoint = self._resume
        self._answers = select.poll()  # one poll object for the connection (Connection.poll builds a selector per call)
        self._answers.register(self._conn.fileno(), select.POLLIN)
        self._lock = threading.Lock()       # state and sending (the worker's loop and its heartbeat thread)
        self._recv_lock = threading.Lock()  # reading the writer's answers; taken before _lock, never inside it
        self._pending: list = []          # Decisions not yet sent
        self._pending_bars = 0
        self._bar_rejections: list[pl.DataFrame] = []
        self._in_flight: dict[int, float] = {}  # seq -> monotonic time sent
        self._seq = 0
        self._error: SignalgenError | None = None
        self._closing = False
        self.ack_latencies: deque[float] = deque(maxlen=4096)  # seconds from send to ack, newest batches (benchmarks)

    # ----------------------------------------------------------------------------- Sink

    def record(self, spec: WorkerSpec, decisions) -> None:
        """Queue one batch of this worker's decisions; blocks while the writer is too far behind."""
        self.read_answers()
        with self._lock:
            self._raise_error()
            self._pending.append(decisions)
            self._pending_bars += decisions.bars
            self._pump()
        while self._pending_bars >= self.max_pending_bars:
            self.read_answers(wait=ANSWER_WAIT_S)
            with self._lock:
                self._raise_error()
                self._pump()

    def record_bar_rejections(self, rejections: pl.DataFrame, run_id: str) -> None:
        """Queue rejected bars; they travel with the next batch (or the final flush)."""
        if rejections.height:
            with self._lock:
                self._raise_error()
                self._bar_rejections.append(rejections)

    @property
    def checkpoints(self) -> dict[str, datetime]:
        self.read_answers()
        with self._lock:
            return self._checkpoints()

    def send_heartbeat(self, fields: dict) -> bool:
        """Hand the worker's heartbeat (`ControlStore.heartbeat`'s fields with `ts`) to the writer,
        which relays it into the control store; False if this writer does not, or the connection is
        closed or lost: the caller writes the control store itself."""
        with self._lock:
            if not self.relays_heartbeats or self._closing or self._error is not None:
                return False
            try:
                _send(self._conn, ("beat", fields))
            except (OSError, ValueError):
                return False
            return True

    paused_keys = 0  # no ordering keys to pause here (StreamSink)

    def resume_point(self, worker_id: str) -> datetime | None:
        """The checkpoint the writer's welcome gave (where this worker resumes)."""
        if worker_id != self.spec.id:
            raise ValueError(f"this sink is {self.spec.id}'s, not {worker_id}'s")
        return self._resume

    # ----------------------------------------------------------------------------- flush / close

    def flush(self, timeout: float | None = None) -> dict[str, datetime]:
        """Send everything queued and wait until the writer acked it all; the checkpoints then.
        TransientError when the writer failed or did not ack within `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.read_answers()
            with self._lock:
                self._raise_error()
                self._pump(final=True)
                if not self._pending and not self._bar_rejections and not self._in_flight:
                    return self._checkpoints()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TransientError(f"writer did not acknowledge {len(self._in_flight)} batches of "
                                     f"{self.spec.id} in {timeout:.0f} s")
            self.read_answers(wait=ANSWER_WAIT_S if left is None else min(left, ANSWER_WAIT_S))

    def close(self, timeout: float | None = None) -> None:
        """Flush (wait for every ack), say bye, close the connection. Raises what flush raises
        (after closing)."""
        try:
            self.flush(timeout)
        finally:
            self.abort(bye=True)

    def abort(self, bye: bool = False) -> None:
        """Close without waiting: unacked batches are the next incarnation's to re-send."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            if bye:
                try:
                    self._conn.send(("bye",))
                except OSError:
                    pass
        with self._recv_lock:
            self._conn.close()

    # ----------------------------------------------------------------------------- internals

    def _checkpoints(self) -> dict[str, datetime]:
        return {self.spec.id: self._checkpoint} if self._checkpoint is not None else {}

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _pump(self, final: bool = False) -> None:
        """Send the queued decisions as one batch if the in-flight window has room (lock held)."""
        if len(self._in_flight) >= self.max_in_flight:
            return
        if not self._pending and not (final and self._bar_rejections):
            return
        from signalgen.signals.records import SMALL_BATCH, Decisions, Records  # the worker has it loaded

        if self._pending_bars > SMALL_BATCH:
            records: Frames | Records = Frames(*Decisions.concat(self._pending).frames())
        else:  # a bar or a few (a paced worker): plain rows, ~30 us instead of ~1.3 ms of polars
            records = Records.join([d.records() for d in self._pending]) if self._pending else Records([], [])
        bar_rejections = pl.concat(self._bar_rejections) if self._bar_rejections else None
        self._seq += 1
        try:
            _send(self._conn, ("batch", self._seq, records, bar_rejections))
        except (OSError, ValueError) as exc:
            self._error = TransientError(f"lost the writer at {self.address}: {exc!r}")
            raise self._error from exc
        self._in_flight[self._seq] = time.monotonic()
        self._pending, self._pending_bars, self._bar_rejections = [], 0, []

    def read_answers(self, wait: float = 0.0) -> None:
        """Apply the acks (and failures) the writer sent, waiting up to `wait` seconds for the first
        (a caller that idles can wait here to see acks as they arrive: bench/writer_server.py)."""
        with self._recv_lock:
            if self._closing:
                return
            try:
                ready = self._answers.poll(int(wait * 1000))
                while ready:
                    self._answer(self._conn.recv())
                    ready = self._answers.poll(0)
            except (EOFError, OSError) as exc:
                with self._lock:
                    if not self._closing and self._error is None:
                        self._error = TransientError(f"lost the writer at {self.address}: {exc!r}")

    def _answer(self, message: tuple) -> None:
        with self._lock:
            kind, seq = message[0], message[1]
            sent = self._in_flight.pop(seq, None)
            if kind == "ack":
                if sent is not None:
                    self.ack_latencies.append(time.monotonic() - sent)
                if self._error is None and message[2] is not None:
                    self._checkpoint = message[2]
                if self._error is None and not self._closing:
                    try:
                        self._pump()  # the window has room again: what waited goes now
                    except TransientError:
                        pass  # kept in self._error
            elif kind == "failed":
                self._error = TransientError(f"writer could not store a batch of {self.spec.id}: {message[2]}")


def _connect(address: str, authkey: bytes, timeout: float) -> Connection:
    """Connect to the writer, waiting up to `timeout` for it to come up (under supervisord the
    writer and the workers start together)."""
    import multiprocessing

    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            return Client(address, family="AF_UNIX", authkey=authkey)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if time.monotonic() >= deadline:
                raise TransientError(f"no writer at {address} after {timeout:.0f} s") from exc
        except multiprocessing.AuthenticationError as exc:
            raise ConfigError(f"writer at {address} rejected this worker's key (wrong key file?)") from exc
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


class LocalTransport:
    """Workers hand their decisions to the manager's `WriterServer` over local IPC; no market data
    travels here, so live mode needs another transport (Redis)."""

    name, live, host_program = "local", False, "writer"

    def open_sink(self, cfg: RunConfig, spec: WorkerSpec, *, run_id: str, writer_address: str, authkey: bytes,
                  control_path: str) -> tuple[RemoteSink, str, datetime | None]:
        if not self.live and cfg.mode.name.value == "live":
            raise self.no_live_feed(cfg)
        sink = RemoteSink(writer_address, authkey, spec)
        return sink, sink.run_id, sink.resume_point(spec.id)

    def decision_host(self, cfg: RunConfig, store: SignalStore, *, run_id: str, address: str, authkey: bytes,
                      control_path: str) -> WriterServer:
        return WriterServer(cfg, store, run_id=run_id, address=address, authkey=authkey, control_path=control_path,
                            metrics=True, **STREAMING_WINDOW)

    def live_feed(self, cfg: RunConfig, spec: WorkerSpec, *, after, stop):
        raise self.no_live_feed(cfg)

    def blocked_series(self, cfg: RunConfig, series, max_ahead):
        raise self.no_live_feed(cfg)

    def publish_bars(self, cfg: RunConfig, frames, **_):
        raise self.no_live_feed(cfg)

    def consume(self, cfg: RunConfig, client_id: str, mode: str, **_) -> int:
        raise ConfigError(f"messaging.type local keeps each client's stream in a file: read "
                          f"{cfg.environment.messaging.path}/{mode}/{client_id}.jsonl", field="messaging.type",
                          file=cfg.files.get("environment"))

    def grant(self, cfg: RunConfig, client_id: str):
        raise ConfigError("messaging.type local has no client access to grant (its streams are files)",
                          field="messaging.type", file=cfg.files.get("environment"))

    @staticmethod
    def no_live_feed(cfg: RunConfig) -> ConfigError:
        return ConfigError(f"live mode reads bars from a broker, and messaging.type "
                           f"{cfg.environment.messaging.type} carries none: use an environment with Redis, "
                           "such as --env local-integration", file=cfg.files.get("environment"),
                           field="messaging.type")
