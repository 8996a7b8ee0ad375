"""The recorder: the one writer of the signal store, and the router of signals to client outputs."""

from __future__ import annotations

import logging
import queue
import threading
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from signalgen.config.models import Routing, RunConfig
from signalgen.errors import ConfigError, SignalgenError
from signalgen.modes.engine import Decisions
from signalgen.modes.sources import background_priority
from signalgen.outputs import output_class
from signalgen.outputs.base import Output
from signalgen.process.specs import WorkerSpec

log = logging.getLogger(__name__)

DESTINATIONS = {Routing.QUANTCONNECT: ("quantconnect",), Routing.INTERNAL: ("internal",),
                Routing.BOTH: ("quantconnect", "internal")}


def open_store(cfg: RunConfig):
    """The environment's signal store, opened; runs a killed process left without a status are
    marked 'abandoned' (the store's file lock proves their writer is gone)."""
    storage = cfg.environment.storage
    if storage.type != "duckdb":
        raise ConfigError(f"storage type {storage.type!r} is not available in this release; use duckdb",
                          file=cfg.files.get("environment"), field="storage.type")
    from signalgen.storage.duckdb import DuckDBStore

    store = DuckDBStore(Path(cfg.root) / storage.path)
    store.open()
    try:
        for run_id in store.abandon_stale_runs(datetime.now(timezone.utc)):
            log.warning("run %s never finished; marked abandoned", run_id, extra={"run_id": run_id})
    except BaseException:
        store.close()
        raise
    return store


class Recorder:
    """Stores every signal and rejection, then hands each client's signals to its routed outputs.

    Building records, store writes and output writes run on one writer thread fed by a bounded
    queue: polars and DuckDB work (without the GIL) while the caller computes the next batch, and
    when the writer falls `queue_batches` behind, `record()` blocks — backpressure, not an
    unbounded buffer. A failed write is raised by the next `record()`, `flush()` or `close()`;
    nothing is dropped silently.

    Outputs are opened when the recorder is created, one per client and destination, for the
    run's mode only (`<output_dir>/<mode>/...`, `<messaging.path>/<mode>/...`), so a client's
    signals can only ever reach that client's files and streams of that mode: a historical or mock
    run never writes where live consumers read. One failing output does not stop the others:
    flush tries them all and raises the first error afterwards.
    """

    def __init__(self, cfg: RunConfig, store, queue_batches: int = 1) -> None:
        self.cfg, self.store = cfg, store
        # every routed output is opened now, so a destination this environment cannot serve stops
        # the run before any work (ConfigError), not halfway through it
        self._outputs: dict[tuple[str, str], Output] = {}
        try:
            for c in cfg.clients:
                for d in sorted({d for s in c.strategies for d in DESTINATIONS[c.routing_for(s)]}):
                    self._outputs[(c.id, d)] = self._open_output(c.id, d)
        except BaseException:
            for out in self._outputs.values():  # nothing was written to them yet
                out.close()
            raise
        self._queue: queue.Queue = queue.Queue(maxsize=queue_batches)
        self._error: BaseException | None = None
        self._writer = threading.Thread(target=self._write_loop, name="recorder-writer", daemon=True)
        self._writer.start()

    def _write_loop(self) -> None:
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

    def _open_output(self, client_id: str, destination: str) -> Output:
        root, env, mode = Path(self.cfg.root), self.cfg.environment, self.cfg.mode.name.value
        if destination == "quantconnect":
            out = output_class("quantconnect")(root / env.paths.output_dir, client_id, mode)
        elif env.messaging.type == "local":
            out = output_class("local")(root / env.messaging.path, client_id, mode)
        else:
            raise ConfigError(f"messaging type {env.messaging.type!r} is not available in this release; "
                              "use local", file=self.cfg.files.get("environment"), field="messaging.type")
        out.open()
        return out

    def record(self, spec: WorkerSpec, decisions: Decisions) -> None:
        """Queue a batch: its records are built, stored and routed on the writer thread."""
        self._raise_failed_write()
        self._queue.put((self._write, (spec, decisions)))

    def _write(self, spec: WorkerSpec, decisions: Decisions) -> None:
        signals, rejections = decisions.frames()
        self.store.write_decisions(signals, rejections)
        if signals.height:
            for destination in DESTINATIONS[spec.routing]:
                self._outputs[(spec.client.id, destination)].write(signals)

    def own(self, client_id: str, strategy_id: str, start: datetime, end: datetime) -> None:
        """A batch run finished (client, strategy) over (start, end]: its CSV files of that interval
        are replaced by this run's signals at the next flush (see QuantConnectCsvOutput.own)."""
        client = self.cfg.client(client_id)
        strategy = next(s for s in client.strategies if s.id == strategy_id)
        if "quantconnect" in DESTINATIONS[client.routing_for(strategy)]:
            self._outputs[(client_id, "quantconnect")].own(strategy_id, start, end)

    def record_bar_rejections(self, rejections: pl.DataFrame, run_id: str) -> None:
        if rejections.height:
            self._raise_failed_write()
            self._queue.put((self.store.write_bar_rejections, (rejections, run_id, self.cfg.mode.name.value)))

    def flush(self) -> None:
        """Wait until the store holds everything recorded, then flush every output."""
        self._queue.join()
        self._raise_failed_write()
        self._flush_outputs()

    def _flush_outputs(self) -> None:
        errors: list[Exception] = []
        for out in self._outputs.values():
            try:
                out.flush()
            except Exception as exc:  # noqa: BLE001 - one failing output must not block the others
                errors.append(exc)
        for exc in errors[1:]:
            log.error("output failed to flush: %s", exc)
        if errors and isinstance(errors[0], SignalgenError):
            raise errors[0]  # as it is: a StorageError stays one line naming its path
        if errors:
            raise SignalgenError(f"output failed to flush: {errors[0]}") from errors[0]

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._queue.put(None)
            self._writer.join()
            for out in self._outputs.values():
                out.close()
            self._outputs.clear()
