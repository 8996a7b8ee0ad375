"""The signal writer: failures surface, a slow store applies backpressure, checkpoints advance only once
durable, routing by client; and whole runs: modes apart, byte-identical re-runs, storage faults."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

import duckdb
import numpy as np
import polars as pl
import pytest

from signalgen.config.loader import Overrides, load_config
from signalgen.errors import SignalgenError, StorageError, TransientError
from signalgen.models.train import train_demo_models
from signalgen.modes import run_mode
from signalgen.modes.engine import strategy_params
from signalgen.signals.records import Decisions
from signalgen.models.registry import ModelRegistry
from signalgen.outputs import DESTINATIONS
from signalgen.outputs.memory import ListOutput
from signalgen.storage import open_store
from signalgen.storage.writer import SignalWriter
from signalgen.config.workers import worker_specs
from signalgen.signals.pipeline import evaluate

from tests.unit.modes.conftest import REPO
from tests.unit.storage.faults import fill, read_only, small_disk

START = datetime(2025, 1, 1, tzinfo=timezone.utc)


class SlowOrFailingStore:
    """Test double of the store: records calls; can block until released, or fail on a given call."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.calls, self.fail_on = 0, fail_on
        self.release = threading.Event()
        self.release.set()

    def write_decisions(self, signals, rejections):
        from signalgen.signals.types import stream_rows
        from signalgen.storage.base import Written

        self.release.wait()
        self.calls += 1
        if self.calls == self.fail_on:
            raise OSError("disk full")
        return Written(signals.height + rejections.height, stream_rows(signals))  # every signal new


def decisions(spec, registry_dir, n: int = 4) -> Decisions:
    """A small batch of this worker, every bar a signal."""
    cards = [ModelRegistry(registry_dir).card(m.model_id) for m in spec.strategy.models]
    params = strategy_params(spec, cards)
    t = np.arange(1, n + 1, dtype=np.int64) * 300_000_000
    preds = np.full((n, len(cards)), 0.9)
    ev = evaluate(params, t, t, np.full((n, 15), 0.001), preds, np.ones(len(cards), bool), np.ones(n, bool))
    return Decisions(params, ev, t, t, preds, "historical", "r", 0)


@pytest.fixture
def recorder_for(root):
    cfg = load_config("local-dev", "historical", root=root, overrides=Overrides(start=START))
    made = []

    def make(store):
        outputs = {(c.id, d): ListOutput(c.id) for c in cfg.clients for s in c.strategies
                   for d in DESTINATIONS[c.routing_for(s)]}
        rec = SignalWriter(store, outputs, mode="historical", queue_batches=2)
        made.append(rec)
        return rec, worker_specs(cfg), root / "registry"

    yield make
    for rec in made:
        rec._queue.put(None)  # stop writer threads the test left running


def test_failed_store_write_is_raised_not_dropped(recorder_for):
    store = SlowOrFailingStore(fail_on=1)
    rec, specs, registry = recorder_for(store)
    rec.record(specs[0], decisions(specs[0], registry))
    with pytest.raises(SignalgenError, match="disk full"):
        rec.flush()
    with pytest.raises(SignalgenError, match="disk full"):
        rec.record(specs[0], decisions(specs[0], registry))


def test_slow_store_blocks_the_producer(recorder_for):
    store = SlowOrFailingStore()
    store.release.clear()
    rec, specs, registry = recorder_for(store)
    batch = decisions(specs[0], registry)
    done = []

    def produce():
        for _ in range(5):
            rec.record(specs[0], batch)
            done.append(1)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    deadline = time.monotonic() + 2
    while len(done) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    # one batch held by the writer + two queued: the fourth record() waits for the store
    assert len(done) == 3 and producer.is_alive()
    store.release.set()
    producer.join(timeout=5)
    rec.flush()
    assert len(done) == 5 and store.calls == 5


def _writer(root, store):
    """A writer over `store` with a memory output per client and destination; and those outputs."""
    cfg = load_config("local-dev", "historical", root=root, overrides=Overrides(start=START))
    outputs = {(c.id, d): ListOutput(c.id) for c in cfg.clients for s in c.strategies
               for d in DESTINATIONS[c.routing_for(s)]}
    return SignalWriter(store, outputs, mode="historical"), outputs, worker_specs(cfg)


def test_close_closes_every_output_when_one_fails(root):
    # the first output that failed to close left the others open: on a full disk a failed run kept
    # its stream files open (umount: target is busy)
    from signalgen.storage.duckdb import DuckDBStore

    class BrokenClose(ListOutput):
        def close(self) -> None:
            raise TransientError("cannot close: simulated")

    outputs = {("a", "internal"): BrokenClose("a"), ("b", "internal"): ListOutput("b"),
               ("c", "quantconnect"): ListOutput("c")}
    with DuckDBStore(root / "w.duckdb") as store:
        writer = SignalWriter(store, outputs, mode="historical")
        with pytest.raises(TransientError, match="cannot close"):
            writer.close()
    assert outputs[("b", "internal")].closed and outputs[("c", "quantconnect")].closed


def test_the_checkpoint_advances_only_after_the_store_and_every_output_confirm(root):
    from signalgen.storage.duckdb import DuckDBStore

    with DuckDBStore(root / "w.duckdb") as store:
        writer, outputs, specs = _writer(root, store)
        spec = next(s for s in specs if s.client.id == "ikenna")
        batch = decisions(spec, root / "registry", n=4)
        last = datetime(1970, 1, 1, 0, 20, tzinfo=timezone.utc)  # the 4th 5-minute bar
        try:
            writer.record(spec, batch)
            assert writer.checkpoints == {}  # queued is not durable
            failing = next(o for (c, _), o in outputs.items() if c == spec.client.id)
            failing.fail_next_flush = 1
            with pytest.raises(SignalgenError, match="simulated sink failure"):
                writer.flush()
            # the store holds the bars, but an output lost them: no acknowledgement
            assert sum(store.count(t, client_id=spec.client.id) for t in ("signals", "rejections")) == 4
            assert writer.checkpoints == {}
            assert writer.flush() == {}  # a later good flush does not acknowledge what was lost
            writer.record(spec, batch)  # the replay from the checkpoint
            other = next(s for s in specs if s.client.id == "christian")
            writer.record(other, decisions(other, root / "registry", n=2))
            assert writer.flush() == {spec.id: last, other.id: datetime(1970, 1, 1, 0, 10, tzinfo=timezone.utc)}
            assert failing.signals["signal_id"].n_unique() == batch.signals > 0
        finally:
            writer.close()


def test_a_failed_store_write_never_advances_the_checkpoint(root):
    writer, _, specs = _writer(root, SlowOrFailingStore(fail_on=2))
    try:
        writer.record(specs[0], decisions(specs[0], root / "registry"))
        assert set(writer.flush()) == {specs[0].id}
        first = writer.checkpoints
        writer.record(specs[0], decisions(specs[0], root / "registry", n=8))
        with pytest.raises(SignalgenError, match="disk full"):
            writer.flush()
        assert writer.checkpoints == first
    finally:
        writer._queue.put(None)


def test_owning_a_range_reaches_only_the_outputs_the_strategy_routes_to(root):
    writer, outputs, specs = _writer(root, SlowOrFailingStore())
    try:
        for spec in specs:
            writer.own(spec, START, START + timedelta(days=1))
        for (client, destination), out in outputs.items():
            routed = {s.strategy.id for s in specs if s.client.id == client and destination in DESTINATIONS[s.routing]}
            assert {o[0] for o in out.owned} == routed
    finally:
        writer.close()


@pytest.fixture
def private_redis(tmp_path):
    """A redis-server of this test only (own port, stopped by PID), never the shared one."""
    pytest.importorskip("redis", reason="the redis extra is not installed")
    from tests.integration.redis.servers import REDIS_SERVER, RedisServer

    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH")
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def _with_messaging(cfg, messaging):
    return cfg.model_copy(update={"environment": cfg.environment.model_copy(update={"messaging": messaging})})


def test_outputs_are_built_by_the_registry_for_the_run_mode_and_refused_when_unavailable(root, private_redis):
    from signalgen.config.models import PubSubMessagingConfig, RedisMessagingConfig
    from signalgen.errors import ConfigError
    from signalgen.outputs import build_output
    from signalgen.outputs.local import LocalStreamOutput
    from signalgen.outputs.quantconnect import QuantConnectCsvOutput
    from signalgen.brokers.codec import decode_rows
    from signalgen.brokers.redis import connect
    from signalgen.outputs.redis import RedisOutput
    from signalgen.signals.types import SIGNAL_SCHEMA

    cfg = load_config("local-dev", "mock", root=root, overrides=Overrides(start=START))
    qc, stream = build_output(cfg, "ikenna", "quantconnect"), build_output(cfg, "ikenna", "internal")
    assert isinstance(qc, QuantConnectCsvOutput) and qc.root == root / "var/local-dev/out/mock/quantconnect/ikenna"
    assert isinstance(stream, LocalStreamOutput) and stream.file == root / "var/local-dev/stream/mock/ikenna.jsonl"
    # redis (local-integration): the run mode's stream of the client, on a real server
    redis_cfg = _with_messaging(cfg, RedisMessagingConfig(type="redis", url=private_redis.url))
    out = build_output(redis_cfg, "ikenna", "internal")
    assert isinstance(out, RedisOutput) and out.key == "signalgen:mock:signals:ikenna"
    spec = next(s for s in worker_specs(cfg) if s.client.id == "ikenna")
    signals, _ = decisions(spec, root / "registry").frames()
    signals = signals.with_columns(pl.lit("mock").alias("mode"))
    out.open()
    out.write(signals)
    out.close()
    r = connect(redis_cfg)
    assert r.keys("signalgen:*") == [b"signalgen:mock:signals:ikenna"]
    got = decode_rows([f[b"data"] for _, f in r.xrange(out.key)], SIGNAL_SCHEMA)
    assert got.equals(signals.select(SIGNAL_SCHEMA.names()))
    # pubsub (cloud-dev): built for the client and mode, connecting only on open()
    pubsub = _with_messaging(cfg, PubSubMessagingConfig(type="pubsub", project="p"))
    assert type(build_output(pubsub, "ikenna", "internal")).__name__ == "PubSubOutput"
    unknown = _with_messaging(cfg, RedisMessagingConfig(type="redis")).environment.messaging.model_copy(
        update={"type": "kafka"})
    with pytest.raises(ConfigError, match="messaging type 'kafka' is not available"):
        build_output(_with_messaging(cfg, unknown), "ikenna", "internal")


def test_the_batch_redis_output_sends_revisions_and_retractions(root, private_redis):
    """Entries carry `revision` and `retracted` in `data` (docs/streams.md); plain signals go out as
    first deliveries. Before: a correction and a withdrawal were indistinguishable from the first copy."""
    from signalgen.config.models import RedisMessagingConfig
    from signalgen.brokers.codec import decode_rows
    from signalgen.brokers.redis import connect
    from signalgen.outputs.redis import RedisOutput
    from signalgen.signals.types import STREAM_SCHEMA, stream_rows

    cfg = _with_messaging(load_config("local-dev", "mock", root=root, overrides=Overrides(start=START)),
                          RedisMessagingConfig(type="redis", url=private_redis.url))
    spec = next(s for s in worker_specs(cfg) if s.client.id == "ikenna")
    signals = decisions(spec, root / "registry").frames()[0].with_columns(mode=pl.lit("mock"))
    later = stream_rows(signals.head(2)).with_columns(revision=pl.lit(1, pl.Int32),
                                                      retracted=pl.Series([False, True]))
    out = RedisOutput(cfg, "ikenna")
    out.open()
    out.write(signals)
    out.flush()
    out.write(later)
    out.close()
    got = decode_rows([f[b"data"] for _, f in connect(cfg).xrange(out.key)], STREAM_SCHEMA)
    assert got.equals(pl.concat([stream_rows(signals), later]))


def test_a_historical_run_in_local_integration_writes_only_its_own_mode_streams(root, private_redis):
    """Batch modes route internal signals to Redis in local-integration: `<p>:historical:signals:<client>`
    only (modes are namespaces), carrying exactly the signals the store holds for those clients."""
    from signalgen.brokers.codec import decode_rows
    from signalgen.brokers.redis import connect
    from signalgen.signals.types import SIGNAL_SCHEMA

    env = root / "environments" / "local-integration.yaml"
    env.write_text(env.read_text().replace("url: redis://127.0.0.1:6379/0", f"url: {private_redis.url}"))
    cfg = load_config("local-integration", "historical", root=root,
                      overrides=Overrides(start=START, end=START + timedelta(days=1)))
    run_mode(cfg)
    r = connect(cfg)
    internal = sorted({c.id for c in cfg.clients for s in c.strategies
                       if "internal" in DESTINATIONS[c.routing_for(s)]})
    assert internal == ["christian", "odum"]
    assert sorted(r.keys("signalgen:*")) == [f"signalgen:historical:signals:{c}".encode() for c in internal]
    with duckdb.connect(str(root / "var/local-integration/signalgen.duckdb"), read_only=True) as con:
        con.execute("SET TimeZone = 'UTC'")
        for client in internal:
            streamed = decode_rows([f[b"data"] for _, f in r.xrange(f"signalgen:historical:signals:{client}")],
                                   SIGNAL_SCHEMA)
            stored = con.sql(f"SELECT signal_id::VARCHAR AS signal_id, bar_time, mode FROM signals "
                             f"WHERE client_id = '{client}' ORDER BY bar_time, signal_id").pl()
            assert streamed.height == stored.height > 0
            assert set(streamed["mode"]) == {"historical"}
            assert sorted(streamed["signal_id"]) == sorted(stored["signal_id"])


# ---------------------------------------------------------------- whole runs: modes apart, re-runs, faults

DAY = timedelta(days=1)


def _run(root, mode: str = "historical", days: int = 1, **overrides):
    cfg = load_config("local-dev", mode, root=root, overrides=Overrides(start=START, end=START + days * DAY,
                                                                        **overrides))
    return run_mode(cfg)


def _files(root, *under: str) -> dict[str, bytes]:
    """Every output file under var/local-dev/<under...> by path, with its bytes."""
    base = root / "var/local-dev"
    return {p.relative_to(base).as_posix(): p.read_bytes()
            for u in under for p in sorted((base / u).rglob("*")) if p.is_file()}


def _table(root, sql: str) -> pl.DataFrame:
    with duckdb.connect(str(root / "var/local-dev/signalgen.duckdb"), read_only=True) as con:
        return con.sql(sql).pl()


def _mode_rows(root, mode: str) -> dict[str, pl.DataFrame]:
    return {t: _table(root, f"SELECT * EXCLUDE (run_id) FROM {t} WHERE mode = '{mode}' ORDER BY ALL")
            for t in ("signals", "rejections", "bar_rejections")}


def test_a_mock_run_changes_nothing_a_historical_run_wrote(root):
    _run(root)
    rows, files = _mode_rows(root, "historical"), _files(root, "out/historical", "stream/historical")
    assert rows["signals"].height > 0 and any(p.endswith(".csv") for p in files)
    _run(root, "mock", inference="mock")
    # before the fix: the mock run deleted the historical signals sharing its ids and wrote mock
    # rows into the same CSV files
    after = _mode_rows(root, "historical")
    assert all(after[t].equals(rows[t]) for t in rows)
    assert _files(root, "out/historical", "stream/historical") == files
    mock = _files(root, "out/mock", "stream/mock")
    assert mock and _table(root, "SELECT count(*) FROM signals WHERE mode = 'mock'").item() > 0
    assert all(line.endswith(b",mock") for p, data in mock.items() if p.endswith(".csv")
               for line in data.splitlines()[1:])
    assert all(json.loads(line)["mode"] == "mock" for p, data in mock.items() if p.endswith(".jsonl")
               for line in data.splitlines())
    assert not (root / "var/local-dev/stream/live").exists()  # nothing but live reaches live consumers


def test_four_identical_runs_leave_every_output_byte_identical(root):
    _run(root)
    first = _files(root, "out", "stream")
    assert any(p.endswith(".jsonl") for p in first) and any(p.endswith(".csv") for p in first)
    for _ in range(3):
        _run(root)
    assert _files(root, "out", "stream") == first  # the stream grew by every signal per run before


def test_a_new_model_version_leaves_one_current_decision_per_bar_and_the_csv_equal(root):
    private = root / "registry"
    shared = private.resolve()
    private.unlink()
    shutil.copytree(shared, private)
    _run(root)
    train_demo_models(private, seed=8, days=20, now=datetime.now(timezone.utc))  # a new version of each model
    _run(root)
    key = "client_id, strategy_id, symbol, timeframe, bar_time, mode"
    per_bar = _table(root, f"SELECT {key}, count(*) n FROM (SELECT {key} FROM signals UNION ALL "
                           f"SELECT {key} FROM rejections) GROUP BY ALL")
    assert per_bar["n"].max() == 1  # before the fix: the old and the new decision of every bar
    assert _table(root, "SELECT count(*) FROM superseded_signals").item() > 0
    for client in ("ikenna", "christian"):
        csv_ids = {line.split(",")[-2] for p, data in _files(root, f"out/historical/quantconnect/{client}").items()
                   for line in data.decode().splitlines()[1:]}
        strategies = [p.name for p in (root / f"var/local-dev/out/historical/quantconnect/{client}").iterdir()]
        stored = set(_table(root, f"SELECT CAST(signal_id AS VARCHAR) s FROM signals WHERE client_id = '{client}' "
                                  f"AND strategy_id IN ({', '.join(repr(s) for s in strategies)})")["s"])
        assert csv_ids == stored


def test_a_killed_run_is_marked_abandoned_by_the_next_start(root):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(root)], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        wal = root / "var/local-dev/signalgen.duckdb.wal"
        while not wal.exists() and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.05)
        assert wal.exists(), child.stderr.read().decode()[-2000:] if child.poll() is not None else "no WAL yet"
        time.sleep(0.5)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    cfg = load_config("local-dev", "historical", root=root, overrides=Overrides(start=START, end=START + DAY))
    open_store(cfg).close()
    runs = _table(root, "SELECT status, finished_at FROM runs")
    assert runs.height == 1 and runs["status"].to_list() == ["abandoned"]
    assert runs["finished_at"].is_not_null().all()


KILLED_RUN = """
import sys
from datetime import datetime, timezone
from signalgen.config.loader import Overrides, load_config
from signalgen.modes import run_mode
cfg = load_config("local-dev", "historical", root=sys.argv[1],
                  overrides=Overrides(start=datetime(2025, 1, 1, tzinfo=timezone.utc),
                                      end=datetime(2025, 12, 31, tzinfo=timezone.utc)))
run_mode(cfg)
"""


def _fails_cleanly(root, before: dict[str, pl.DataFrame], *needles: str, recorded: bool = True) -> None:
    """The next run raises one StorageError line naming the path and reason; the store keeps its rows."""
    with pytest.raises(StorageError) as caught:
        _run(root, days=2)
    message = str(caught.value)
    assert "\n" not in message and all(n in message for n in needles), message
    assert _mode_rows(root, "historical")["signals"].height >= before["signals"].height
    # every earlier decision still there (the failed run may have rewritten it: same id and values)
    what = ["signal_id", "bar_time", "direction", "confidence", "weight"]
    old = _mode_rows(root, "historical")["signals"].join(before["signals"], on=what, how="semi")
    assert old.height == before["signals"].height
    statuses = _table(root, "SELECT status FROM runs ORDER BY started_at")["status"].to_list()
    assert statuses == (["ok", "failed"] if recorded else ["ok"])


def test_read_only_stream_folder(root):
    _run(root)
    before = _mode_rows(root, "historical")
    with read_only(root / "var/local-dev/stream"):
        _fails_cleanly(root, before, "var/local-dev/stream/historical/", "Read-only file system")


def test_read_only_csv_folder(root):
    _run(root)
    before = _mode_rows(root, "historical")
    with read_only(root / "var/local-dev/out"):
        _fails_cleanly(root, before, "var/local-dev/out/historical/quantconnect/", "Read-only file system")


def test_read_only_var_folder(root):
    _run(root)
    before = _mode_rows(root, "historical")
    with read_only(root / "var"):  # the store cannot even open: nothing can record the run
        _fails_cleanly(root, before, "var/local-dev/signalgen.duckdb", "Read-only file system", recorded=False)


def test_full_disk(root):
    with small_disk(root / "var/local-dev", 4096):
        _run(root)
        before = _mode_rows(root, "historical")
        # room for the run's own record (its config snapshot is ~7 KB), not for its decisions
        filler = fill(root / "var/local-dev", leave_bytes=64 << 10)
        try:
            _fails_cleanly(root, before, "var/local-dev/", "No space left on device")
        finally:
            filler.unlink()
        _run(root)  # space again: the same store takes the next run
