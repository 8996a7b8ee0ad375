"""The decision host's own Prometheus metrics: what only the process that stores the decisions knows.

One registry per process (`REGISTRY`), served with the fleet's metrics by `signalgen.process.health`.
The writer server, the Redis recorder and the Pub/Sub recorder call `observe_stored` after each store
write; the Pub/Sub wire counts its failed publishes and dead letters here. Per-worker state (state,
heartbeat, restarts, errors, memory) is not here: it is read from the control store at scrape time,
as `status` reads it (`signalgen.process.health.FleetCollector`). Names and labels are fixed (alerts
rely on them): docs/operations.md, "Metrics".
"""

from __future__ import annotations

import time
import collections
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, disable_created_metrics

if TYPE_CHECKING:
    import polars as pl

WORKER = ("client", "strategy", "symbol", "timeframe")
KEY_COLUMNS = ("client_id", "strategy_id", "symbol", "timeframe")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROW_BUCKETS = (1, 10, 100, 1_000, 10_000, 100_000)

# no `*_created` series: they double every counter's samples (500 workers: thousands per scrape) and
# nothing here reads them (rate() and increase() do without)
disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=True)

BARS = Counter("signalgen_bars", "Bars decided and stored (signals + rejections), per worker.", WORKER,
               registry=REGISTRY)
SIGNALS = Counter("signalgen_signals", "Signals stored, per worker.", WORKER, registry=REGISTRY)
REJECTIONS = Counter("signalgen_rejections", "Rejected candidates stored, per worker and reason (a candidate "
                     "with two reasons counts under each).", (*WORKER, "reason"), registry=REGISTRY)
# client and strategy only: 16 series per strategy, not per worker (docs/operations.md, "Cardinality")
LATENCY = Histogram("signalgen_decision_latency_seconds", "Bar close to decision stored (live); in mock and "
                    "simulation, whose bar times are replayed history, the decision's arrival at the host "
                    "to stored.", ("client", "strategy"), buckets=LATENCY_BUCKETS, registry=REGISTRY)
BATCH_ROWS = Histogram("signalgen_writer_batch_rows", "Decision rows per store write (a group commit or a "
                       "recorder's gather).", buckets=ROW_BUCKETS, registry=REGISTRY)
PUBLISH_FAILURES = Counter("signalgen_publish_failures", "Pub/Sub publish attempts of this process that "
                           "failed (each retried in order; its ordering key paused meanwhile).", registry=REGISTRY)
DEAD_LETTERS = Counter("signalgen_dead_letters", "Messages sent to a dead-letter stream or topic, by reason.",
                       ("reason",), registry=REGISTRY)
WRITE_FAILURES = Counter("signalgen_writer_failures", "Store writes of the decision host that failed (each "
                         "retried or redelivered).", registry=REGISTRY)
_LAG = Gauge("signalgen_writer_lag_seconds", "Age of the oldest decision the host received and has not stored "
             "yet (0 when everything received is stored): the writer's or the recorder's lag.", registry=REGISTRY)
_lag_sources: list[Callable[[], float | None]] = []


def _lag() -> float:
    now = time.monotonic()
    oldest = [t for t in (source() for source in list(_lag_sources)) if t is not None]
    return max(0.0, now - min(oldest)) if oldest else 0.0


_LAG.set_function(_lag)


def track_lag(oldest: Callable[[], float | None]) -> Callable[[], None]:
    """Report a decision host's lag: `oldest()` is the monotonic time of its oldest decision received
    and not yet stored (None when there is none). Returns the function that stops reporting it."""
    _lag_sources.append(oldest)
    return lambda: _lag_sources.remove(oldest) if oldest in _lag_sources else None


_children: dict[tuple, object] = {}  # (metric, labels) -> its child: `labels()` costs ~20 us a call


def _child(metric, *labels: str):
    child = _children.get((metric, labels))
    if child is None:
        child = _children[(metric, labels)] = metric.labels(*labels)
    return child


def observe_stored(mode: str, signals: pl.DataFrame, rejections: pl.DataFrame, *, received: float | None = None,
                   now: float | None = None) -> None:
    """Count decisions a host has just stored (SIGNAL_SCHEMA / REJECTION_SCHEMA frames): bars, signals
    and rejections by reason per worker, the write's rows, and each decision's latency — from its bar's
    close in live mode, else from `received` (wall time the host received the oldest of them)."""
    now = time.time() if now is None else now
    rows = signals.height + rejections.height
    if not rows:
        return
    BATCH_ROWS.observe(rows)
    # plain Python over the columns: a write holds a few hundred rows, where polars' group_by costs more
    sig_keys = list(zip(*(signals[c].to_list() for c in KEY_COLUMNS))) if signals.height else []
    rej_keys = list(zip(*(rejections[c].to_list() for c in KEY_COLUMNS))) if rejections.height else []
    for key, n in collections.Counter(sig_keys).items():
        _child(SIGNALS, *key).inc(n)
        _child(BARS, *key).inc(n)
    for key, n in collections.Counter(rej_keys).items():
        _child(BARS, *key).inc(n)
    if rej_keys:
        reasons = collections.Counter((key, reason)
                                      for key, names in zip(rej_keys, rejections["reasons"].to_list())
                                      for reason in (names or ("none",)))
        for (key, reason), n in reasons.items():
            _child(REJECTIONS, *key, reason).inc(n)
    if mode == "live":
        times = [t for f in (signals, rejections) if f.height for t in f["bar_time"].dt.epoch("us").to_list()]
        ages = [now - t / 1e6 for t in times]
    elif received is not None:
        ages = [now - received] * rows
    else:
        return
    for (client, strategy, *_), age in zip(sig_keys + rej_keys, ages):
        _child(LATENCY, client, strategy).observe(max(0.0, age))


_DEAD_LETTER_BACKLOG = Gauge("signalgen_dead_letter_entries", "Entries in the Redis dead-letter stream of market "
                             "data (poison bars the live workers set aside), read at scrape time.",
                             registry=REGISTRY)
_backlog_sources: list[Callable[[], float | None]] = []
_DEAD_LETTER_BACKLOG.set_function(lambda: sum(n for n in (f() for f in list(_backlog_sources)) if n is not None))


def count_recorder(recorder) -> Callable[[], None]:
    """Have a Redis recorder (`storage.recorder.Recorder`) count what it stores, report its lag and the
    dead-letter stream's length. Returns the function that stops reporting."""
    mode = recorder.mode

    def stored(signals, rejections, since: float) -> None:
        observe_stored(mode, signals, rejections, received=time.time() - (time.monotonic() - since))

    def backlog() -> float | None:
        if recorder.redis_down:
            return None
        try:
            return float(recorder.client.xlen(recorder.keys.deadletter))
        except Exception:  # noqa: BLE001 - a scrape never fails for Redis: the gauge is left out
            return None

    recorder.on_stored = stored
    untrack = track_lag(recorder.oldest_unstored)
    _backlog_sources.append(backlog)

    def stop() -> None:
        untrack()
        if backlog in _backlog_sources:
            _backlog_sources.remove(backlog)
    return stop


ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, process_resident_memory_bytes, ... of the host
