"""The signal writer: the one writer of the signal store, and the router of signals to client outputs.

Input: decisions of any number of workers, `record(spec, decisions)` — called in the process that
holds the store (a batch run calls it directly; worker processes will send their decisions to it).
Acknowledgement: the checkpoint — per worker, the last bar time whose decisions the store holds and
every routed output confirmed — returned by `flush()`. A worker may advance (and, after a crash,
resume) from its checkpoint; nothing after it may be assumed durable.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import polars as pl

from signalgen.config.models import RunConfig
from signalgen.config.workers import WorkerSpec
from signalgen.errors import SignalgenError
from signalgen.outputs import DESTINATIONS, build_output
from signalgen.outputs.base import Output
from signalgen.storage.base import SignalStore

if TYPE_CHECKING:
    from signalgen.signals.records import Decisions

log = logging.getLogger(__name__)


def _last_bar_time(signals: pl.DataFrame, rejections: pl.DataFrame) -> datetime | None:
    last = [t for t in (signals["bar_time"].max(), rejections["bar_time"].max()) if t is not None]
    return max(last) if last else None


class SignalWriter:
    """Stores every decision and bar rejection, then hands each client's signals to its routed outputs.

    Building records, store writes and output writes run on one writer thread fed by a bounded
    queue: polars and the store work (without the GIL) while the caller computes the next batch, and
    when the writer falls `queue_batches` behind, `record()` blocks — backpressure, not an
    unbounded buffer. A failed write is raised by the next `record()`, `flush()` or `close()`;
    nothing is dropped silently, and no checkpoint advances past it.

    `outputs` maps (client id, destination) to an opened output; `from_config` opens one per client
    and destination, for the run's mode only, so a client's signals can only ever reach that
    client's files and streams of that mode. One failing output does not stop the others: flush
    tries them all and raises the first error afterwards.
    """

    def __init__(self, store: SignalStore, outputs: Mapping[tuple[str, str], Output], *, mode: str,
                 queue_batches: int = 1) -> None:
        self.store, self.mode = store, mode
        self._outputs = dict(outputs)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_batches)
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._stored: dict[str, datetime] = {}       # worker id -> last bar time in the store, unconfirmed
        self._checkpoints: dict[str, datetime] = {}  # worker id -> last bar time stored and delivered
        # called on the writer thread with each write's (signals, rejections) once the store holds
        # them: a decision host's metrics (signalgen.metrics.observe_stored); None in batch runs
        self.on_stored: Callable[[pl.DataFrame, pl.DataFrame], None] | None = None
        self._writer = threading.Thread(target=self._write_loop, name="signal-writer", daemon=True)
        self._writer.start()

    @classmethod
    def from_config(cls, cfg: RunConfig, store: SignalStore, queue_batches: int = 1) -> SignalWriter:
        """A writer to `store` with every routed output of `cfg`'s clients opened now, so a destination
        this environment cannot serve stops the run before any work (ConfigError), not halfway."""
        outputs: dict[tuple[str, str], Output] = {}
        try:
            for c in cfg.clients:
                for d in sorted({d for s in c.strategies for d in DESTINATIONS[c.routing_for(s)]}):
                    outputs[(c.id, d)] = out = build_output(cfg, c.id, d)
                    out.open()
        except BaseException:
            for out in outputs.values():  # nothing was written to them yet
                out.close()
            raise
        return cls(store, outputs, mode=cfg.mode.name.value, queue_batches=queue_batches)

    def open_outputs(self, cfg: RunConfig, spec: WorkerSpec) -> None:
        """Open the outputs `spec` routes to that this writer does not have yet (a client added
        while a long-lived writer runs). ConfigError when this environment cannot serve one."""
        if spec.run.get("mode", self.mode) != self.mode:
            raise ValueError(f"worker {spec.id} is not of mode {self.mode!r}")
        for destination in DESTINATIONS[spec.routing]:
            key = (spec.client.id, destination)
            if key not in self._outputs:
                out = build_output(cfg, spec.client.id, destination)
                out.open()
                self._outputs[key] = out

    def _write_loop(self) -> None:
        from signalgen.threads import background_priority

        background_priority()
        while (item := self._queue.get()) is not None:
            write, args = item
            try:
                if self._error is None:  # after a failure, drain without writing
                    write(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                self._error = exc
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _raise_failed_write(self) -> None:
        if isinstance(self._error, SignalgenError):
            raise self._error
        if self._error is not None:
            raise SignalgenError(f"recording failed: {self._error!r}") from self._error

    def record(self, spec: WorkerSpec, decisions: Decisions) -> None:
        """Queue one batch of `spec`'s decisions (anything with `frames()` -> (signals, rejections)):
        its records are built, stored and routed on the writer thread."""
        self._raise_failed_write()
        self._queue.put((self._write, (spec, decisions)))

    def _write(self, spec: WorkerSpec, decisions: Decisions) -> None:
        signals, rejections = decisions.frames()
        written = self.store.write_decisions(signals, rejections)
        self._stored_hook(signals, rejections)
        self._note_stored(spec, _last_bar_time(signals, rejections))
        self._deliver(written.stream, {(spec.client.id, spec.strategy.id): spec})

    def record_group(self, items: Sequence[tuple[WorkerSpec, Decisions]]) -> None:
        """Queue batches of several workers to be stored in ONE store transaction (a group commit:
        a transaction costs milliseconds however few rows it holds), then routed per worker."""
        if items:
            self._raise_failed_write()
            self._queue.put((self._write_group, (list(items),)))

    def _write_group(self, items: list[tuple[WorkerSpec, Decisions]]) -> None:
        from signalgen.signals.records import Records

        # batches sent as plain rows (streaming workers: a bar or a few) become ONE frame for the
        # whole group, not one per batch (~0.3 ms of polars each); the others keep their frames
        rows = [(spec, d) for spec, d in items if isinstance(d, Records)]
        for spec, records in rows:
            # a worker's rows are its own client's and strategy's: `_deliver` routes by the rows'
            # columns, so a row of another tenant stops here, before the store (as `client_batch` would)
            key = (spec.client.id, spec.strategy.id)
            if any((r[1], r[2]) != key for part in (records.signals, records.rejections) for r in part):
                raise ValueError(f"worker {spec.id} sent records of another client or strategy")
        built = [(spec, *d.frames()) for spec, d in items if not isinstance(d, Records)]
        parts: list[tuple[pl.DataFrame, pl.DataFrame]] = [(b[1], b[2]) for b in built]
        if rows:
            parts.append(Records.join([d for _, d in rows]).frames())
        signals, rejections = pl.concat([p[0] for p in parts]), pl.concat([p[1] for p in parts])
        written = self.store.write_decisions(signals, rejections)
        self._stored_hook(signals, rejections)
        for spec, signals, rejections in built:
            self._note_stored(spec, _last_bar_time(signals, rejections))
        for spec, records in rows:
            self._note_stored(spec, records.last_bar_time)
        self._deliver(written.stream, {(spec.client.id, spec.strategy.id): spec for spec, _ in items})

    def _stored_hook(self, signals: pl.DataFrame, rejections: pl.DataFrame) -> None:
        if self.on_stored is not None:
            try:
                self.on_stored(signals, rejections)
            except Exception as exc:  # noqa: BLE001 - a metric must never fail a stored write
                log.warning("counting stored decisions failed: %r", exc)

    def _note_stored(self, spec: WorkerSpec, last: datetime | None) -> None:
        """The worker's decisions up to `last` are in the store (not yet confirmed by its outputs)."""
        if last is not None:
            with self._lock:
                old = self._stored.get(spec.id)
                self._stored[spec.id] = last if old is None or last > old else old

    def _deliver(self, stream: pl.DataFrame, specs: dict[tuple[str, str], WorkerSpec]) -> None:
        """Hand the stream rows the store returned (signals with their revisions, retractions) to the
        outputs of their strategy's routing: one write per strategy of the group, in the rows' order."""
        if not stream.height:
            return
        if len(specs) == 1:
            parts = [(next(iter(specs)), stream)]
        else:
            parts = stream.partition_by(["client_id", "strategy_id"], maintain_order=True, as_dict=True).items()
        for key, part in parts:
            spec = specs[key]
            for destination in DESTINATIONS[spec.routing]:
                self._outputs[(spec.client.id, destination)].write(part)

    def record_bar_rejections(self, rejections: pl.DataFrame, run_id: str) -> None:
        """Queue rejected bars (BAR_REJECTION_SCHEMA) of this run for the store."""
        if rejections.height:
            self._raise_failed_write()
            self._queue.put((self.store.write_bar_rejections, (rejections, run_id, self.mode)))

    def own(self, spec: WorkerSpec, start: datetime, end: datetime) -> None:
        """A batch run finished `spec`'s strategy over (start, end]: each output it routes to may
        replace that range by this run's signals at the next flush (`Output.own`)."""
        for destination in DESTINATIONS[spec.routing]:
            self._outputs[(spec.client.id, destination)].own(spec.strategy.id, start, end)

    def flush(self) -> dict[str, datetime]:
        """Wait until the store holds everything recorded, flush every output, then advance and
        return the checkpoints (worker id -> last bar time durable everywhere).

        If a store write or an output flush failed, this raises and no checkpoint advances: what
        was recorded since the last successful flush must be recorded again.
        """
        self._queue.join()
        with self._lock:
            stored, self._stored = self._stored, {}
        self._raise_failed_write()
        self._flush_outputs()
        with self._lock:
            self._checkpoints.update(stored)
            return dict(self._checkpoints)

    @property
    def checkpoints(self) -> dict[str, datetime]:
        """The acknowledged checkpoints so far (see flush)."""
        with self._lock:
            return dict(self._checkpoints)

    def _flush_outputs(self) -> None:
        by_backend: dict[type, list] = {}
        for out in self._outputs.values():
            by_backend.setdefault(type(out), []).append(out)
        errors: list[Exception] = []
        for backend, outputs in by_backend.items():
            errors += backend.flush_all(outputs)  # every output is an Output: one by one unless it does better
        for exc in errors[1:]:
            log.error("output failed to flush: %s", exc)
        if errors and isinstance(errors[0], SignalgenError):
            raise errors[0]  # as it is: a StorageError stays one line naming its path
        if errors:
            raise SignalgenError(f"output failed to flush: {errors[0]}") from errors[0]

    def close(self) -> None:
        """Flush, then stop the writer thread and close every output."""
        failed: list[Exception] = []
        try:
            self.flush()
        finally:
            self._queue.put(None)
            self._writer.join()
            for out in self._outputs.values():  # every one, however many fail: none is left open
                try:
                    out.close()
                except Exception as exc:  # noqa: BLE001 - raised below, unless flush's error is on its way
                    failed.append(exc)
            self._outputs.clear()
        if failed:
            raise failed[0]
