"""What a messaging backend supplies (`Transport`), and the shapes its parts share.

A transport is chosen by the environment's `messaging.type` (`signalgen.transports.TRANSPORTS`) and
gives, in one place, everything the fleet needs of its backend:
- `open_sink`: a worker process's streaming sink (`StreamSink`), its run id and its checkpoint;
- `decision_host`: what the manager runs to take the workers' decisions to the store and on to the
  clients, routing applied (`DecisionHost`: the writer server, or a recorder);
- `live_feed`: a live worker's bars, where the backend carries market data (`live`);
- `host_program`: the command a deployment runs for the decision host (`strategy_runner.py writer`);
- what the stream commands do: `feed` (`blocked_series`, `publish_bars`), `consume`, `clients grant`.
Its batch output (a run's `internal` destination) is the output of the same name in
`signalgen.outputs.OUTPUTS`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, ClassVar, Protocol

import polars as pl

if TYPE_CHECKING:
    from signalgen.config.models import RunConfig
    from signalgen.config.workers import WorkerSpec
    from signalgen.brokers.codec import PublishStats
    from signalgen.signals.records import Decisions
    from signalgen.storage.base import SignalStore


class StreamSink(Protocol):
    """A worker process's sink: the one worker loop's `Sink`, plus what a long-lived worker needs."""

    def record(self, spec: WorkerSpec, decisions: Decisions) -> None: ...

    def record_bar_rejections(self, rejections: pl.DataFrame, run_id: str) -> None: ...

    @property
    def checkpoints(self) -> dict[str, datetime]: ...

    def resume_point(self, worker_id: str) -> datetime | None:
        """Where the worker resumes: the last bar time the store (or the broker) holds of it."""

    @property
    def paused_keys(self) -> int:
        """Ordering keys whose publishing failed and waits for a retry (Pub/Sub; 0 elsewhere)."""

    def flush(self, timeout: float | None = None) -> dict[str, datetime]:
        """Wait until everything recorded is held durably (None: as long as it takes); the
        checkpoints. TransientError when the backend did not confirm within `timeout`."""

    def close(self, timeout: float | None = None) -> None:
        """`flush`, then release the connection (also when flush raised)."""

    def abort(self) -> None:
        """Release the connection without waiting: what is unconfirmed is the next start's to resend."""


class DecisionHost(Protocol):
    """What the manager runs beside its workers: the store's one writer and the clients' streams'."""

    address: str  # what workers connect to ("" when they reach a broker instead)

    @property
    def stats(self) -> dict[str, int]: ...  # "bars" at least: signals + rejections + bad bars stored

    def start(self) -> None: ...

    def problems(self) -> list[str]:
        """Why it cannot take decisions now (a thread ended, the store or broker unreachable): what
        `/readyz` answers; empty when it can."""

    def reloaded(self, cfg: RunConfig, specs: list[WorkerSpec]) -> None:
        """A reload changed the config (before the new workers start): take every worker's decisions,
        new clients and strategies included."""

    def close(self) -> None:
        """After the workers stopped: store what they sent, then release everything."""


class Transport(Protocol):
    name: ClassVar[str]          # the `messaging.type` it serves
    live: ClassVar[bool]         # it carries market-data bars, so live workers can run on it
    host_program: ClassVar[str]  # the decision host's command in a deployment (supervisord)

    def open_sink(self, cfg: RunConfig, spec: WorkerSpec, *, run_id: str, writer_address: str, authkey: bytes,
                  control_path: str) -> tuple[StreamSink, str, datetime | None]:
        """(sink, run id, checkpoint) of a worker process. `run_id` is used where the backend has no
        run of its own; the control store at `control_path` keeps a worker's state where the backend
        keeps none. TransientError while the backend is away (the worker waits)."""

    def decision_host(self, cfg: RunConfig, store: SignalStore, *, run_id: str, address: str, authkey: bytes,
                      control_path: str) -> DecisionHost: ...

    def live_feed(self, cfg: RunConfig, spec: WorkerSpec, *, after: datetime | None,
                  stop: threading.Event) -> Iterator[dict]:
        """A live worker's bars (BAR_SCHEMA dicts), the warm-up history first."""

    # -- the stream commands: feed, consume, clients grant

    def blocked_series(self, cfg: RunConfig, series: list[tuple[str, str]],
                       max_ahead: timedelta) -> dict[tuple[str, str], str]:
        """(symbol, timeframe) series `feed` must skip, each with why and what to do."""

    def publish_bars(self, cfg: RunConfig, frames: Iterable[pl.DataFrame], *, speed: float, stop: threading.Event,
                     max_ahead: timedelta, on_publish: Callable | None = None) -> PublishStats:
        """Publish market-data bars paced at `speed` (0: at once), refusing bars from the future."""

    def consume(self, cfg: RunConfig, client_id: str, mode: str, *, from_start: bool, group: str | None,
                consumer: str | None, stop: threading.Event, on_batch: Callable[[list[bytes]], None],
                limit: int | None = None, idle_exit_s: float | None = None) -> int:
        """Read a client's signals as that client would (its own credentials and subscription or
        group), handing each batch's JSON lines to `on_batch`, acked after it returns; the count."""

    def grant(self, cfg: RunConfig, client_id: str) -> tuple[str, str | None]:
        """Give a client access to its own signals only: (what to print, a warning or None)."""
