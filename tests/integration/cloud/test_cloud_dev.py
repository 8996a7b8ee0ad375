"""cloud-dev gives the decisions local-dev gives: the same config and bars stored in BigQuery (through
the emulator) and in DuckDB are equal, column for column, apart from what differs between any two
runs (run id, generation time, compute latency)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from contextlib import nullcontext

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from signalgen.config.loader import load_environment
from signalgen.errors import StorageError, TransientError
from signalgen.storage import store_for
from signalgen.storage.reads import ReadQuery
from tests.integration.cloud.conftest import cli, cloud_dev
from tests.roots import REPO

pytestmark = pytest.mark.integration  # the Pub/Sub and BigQuery emulators

PER_RUN = ["run_id", "generated_at", "latency_us"]
RANGE = ("--start", "2025-01-01", "--end", "2025-01-03")  # = the simulation preset's range


def decisions(cloud: dict, env: str, kind: str, client: str, drop: list[str] = PER_RUN) -> pl.DataFrame:
    with cloud_dev(cloud) if env == "cloud-dev" else nullcontext():
        environment = load_environment(env, root=cloud["root"])
    df = store_for(environment, cloud["root"]).read(ReadQuery(kind=kind, clients=(client,)))
    key = "signal_id" if kind == "signals" else "rejection_id"
    return df.drop([c for c in drop if c in df.columns]).sort(key)


def sample(name: str, label: str | None = None, value: str | None = None) -> float:
    """The sum of this process's `name` samples (signalgen.metrics) whose `label` is `value`."""
    from signalgen.metrics import REGISTRY

    return sum(s.value for m in REGISTRY.collect() for s in m.samples
               if s.name == name and (label is None or s.labels.get(label) == value))


@pytest.mark.parametrize("client", ["ikenna", "odum"])
def test_historical_on_cloud_dev_stores_what_local_dev_stores(cloud, client):
    for env in ("local-dev", "cloud-dev"):
        done = cli(cloud, "run", "--env", env, "--mode", "historical", "--client", client, *RANGE)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for kind in ("signals", "rejections"):
        local, cloud_rows = (decisions(cloud, env, kind, client) for env in ("local-dev", "cloud-dev"))
        assert local.height > 0
        assert_frame_equal(cloud_rows, local)


@pytest.mark.parametrize("mode", ["simulation", "mock"])
def test_run_in_every_batch_mode_on_cloud_dev_stores_what_local_dev_stores(cloud, mode):
    """`run --mode simulation` (one bar at a time) and `mock` (mock inference) on cloud-dev: BigQuery
    holds what DuckDB holds after the same run on local-dev, in that mode's namespace alone."""
    for env in ("local-dev", "cloud-dev"):
        done = cli(cloud, "run", "--env", env, "--mode", mode, "--client", "odum", *RANGE)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for kind in ("signals", "rejections"):
        local, cloud_rows = (decisions(cloud, env, kind, "odum") for env in ("local-dev", "cloud-dev"))
        assert local.height > 0 and set(cloud_rows["mode"]) == {mode}
        assert_frame_equal(cloud_rows, local)


def start(cloud: dict, mode: str, *clients: str) -> subprocess.Popen:
    """`start --env cloud-dev --mode <mode>` of `clients` (mock inference off: the real models), in the
    background; its output in <root>/manager.out."""
    env = {**os.environ, **cloud["vars"], "PYTHONPATH": str(REPO)}
    out = (cloud["root"] / "manager.out").open("ab")
    return subprocess.Popen([sys.executable, str(REPO / "strategy_runner.py"), "start", *clients, "--env", "cloud-dev",
                             "--mode", mode, "--root", str(cloud["root"])], cwd=cloud["root"], env=env, stdout=out,
                            stderr=subprocess.STDOUT)


def wait_for(what, timeout: float, message: str):
    """`what()` once it is true; a StorageError meanwhile is a store still being created (a dataset
    whose tables the recorder has not made yet): looked at again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = what()
        except StorageError:
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s: {message}")


def test_a_simulation_fleet_on_cloud_dev_decides_what_historical_decides(cloud):
    """Worker processes publish to Pub/Sub, the manager's recorder stores in BigQuery: the stored
    decisions equal a local-dev historical run over the same bars (simulation = historical)."""
    done = cli(cloud, "run", "--env", "local-dev", "--mode", "historical", "--client", "ikenna", *RANGE)
    assert done.returncode == 0, done.stderr[-2000:]
    want = {kind: decisions(cloud, "local-dev", kind, "ikenna").drop("mode") for kind in ("signals", "rejections")}
    manager = start(cloud, "simulation", "ikenna")
    try:
        wait_for(lambda: all(decisions(cloud, "cloud-dev", kind, "ikenna").height >= want[kind].height
                             for kind in want), 240, "the fleet's decisions in BigQuery")
    finally:
        stopped = cli(cloud, "stop", "--env", "cloud-dev")
        manager.wait(timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert manager.returncode == 0, (cloud["root"] / "manager.out").read_text()[-3000:]
    for kind, rows in want.items():
        got = decisions(cloud, "cloud-dev", kind, "ikenna")
        assert set(got["mode"]) == {"simulation"}
        assert_frame_equal(got.drop("mode"), rows)


def test_the_recorder_stores_a_strategy_only_once_its_config_has_it(cloud):
    """Decisions of a strategy the recorder's config lacks (added by a reload it has not seen yet) are
    never acked and lost: nacked, redelivered, and stored once `reloaded` brings the strategy."""
    from signalgen.config.loader import Overrides, load_config
    from signalgen.config.workers import worker_specs
    from signalgen.modes.engine import WorkerEngine
    from signalgen.models.registry import ModelRegistry
    from signalgen.signals.records import epoch_us
    from signalgen.storage import open_store
    from signalgen.storage.control import ControlStore
    from signalgen.transports.pubsub import PubSubRecorder, PubSubSink
    from signalgen.data.synthetic import synthetic_bars

    with cloud_dev(cloud):
        root = cloud["root"]
        narrow = load_config("cloud-dev", "simulation", root=root, clients=["christian"],
                             overrides=Overrides(strategies=("consensus_v1",)))
        full = load_config("cloud-dev", "simulation", root=root, clients=["christian"])
        spec = next(s for s in worker_specs(full) if s.strategy.id == "reversal_v1")
        store = open_store(full)
        recorder = PubSubRecorder(narrow, store, run_id="r")
        recorder.start()
        try:
            start = datetime(2025, 1, 1, tzinfo=timezone.utc)
            bars = synthetic_bars([spec.symbol], spec.timeframe, start, start + timedelta(hours=6), 7)
            engine = WorkerEngine(spec, ModelRegistry(root / "registry"), backend="onnx", now=datetime.now(timezone.utc),
                                  mode="simulation", run_id="r")
            decided = engine.decide(engine.prepare(bars, epoch_us(start + timedelta(hours=4))))
            sink = PubSubSink(full, spec, ControlStore(root / "control.sqlite"))
            sink.record(spec, decided)
            sink.close(timeout=30)
            time.sleep(3)  # a few gathers: the decisions arrive, and are not stored
            assert decisions(cloud, "cloud-dev", "rejections", "christian").height == 0
            recorder.reloaded(full, worker_specs(full))
            wait_for(lambda: decisions(cloud, "cloud-dev", "rejections", "christian").height
                     + decisions(cloud, "cloud-dev", "signals", "christian").height == decided.bars, 120,
                     "the strategy's decisions stored after the reload")
        finally:
            recorder.close()
            store.close()


def test_a_foreign_or_broken_record_is_dead_lettered_alone(cloud):
    """A message on christian's internal topic claiming another client, and one whose record does not
    decode, go to the dead-letter topic; the worker's decisions around them are stored all the same,
    even though the store's first write fails."""
    import json as _json

    from google.cloud import pubsub_v1

    from signalgen.brokers.pubsub import TopicNames, topic_path
    from signalgen.config.loader import load_config
    from signalgen.config.workers import worker_specs
    from signalgen.modes.engine import WorkerEngine
    from signalgen.models.registry import ModelRegistry
    from signalgen.signals.records import epoch_us
    from signalgen.storage import open_store
    from signalgen.storage.control import ControlStore
    from signalgen.transports.pubsub import PubSubRecorder, PubSubSink
    from signalgen.data.synthetic import synthetic_bars

    with cloud_dev(cloud):
        root = cloud["root"]
        cfg = load_config("cloud-dev", "simulation", root=root, clients=["christian"])
        spec = worker_specs(cfg)[0]
        store = open_store(cfg)
        recorder = PubSubRecorder(cfg, store, run_id="r")
        recorder.start()
        try:
            before = {k: sample(*k) for k in (
                ("signalgen_dead_letters_total", "reason", "foreign_record"),
                ("signalgen_dead_letters_total", "reason", "undecodable_record"),
                ("signalgen_writer_failures_total",), ("signalgen_bars_total", "client", "christian"))}
            m = cfg.environment.messaging
            topic = topic_path(m.project, TopicNames(m.topic_prefix).internal("simulation", "rejections", "christian"))
            raw = pubsub_v1.PublisherClient()
            attrs = {"v": "1", "rejection_id": "x", "client_id": "christian", "strategy_id": spec.strategy.id,
                     "symbol": spec.symbol, "timeframe": spec.timeframe, "mode": "simulation"}
            raw.publish(topic, _json.dumps({"client_id": "odum", "mode": "simulation"}).encode(), **attrs).result()
            raw.publish(topic, _json.dumps({"client_id": "christian", "mode": "simulation",
                                            "strategy_id": spec.strategy.id, "bar_time": "not a time"}).encode(),
                        **{**attrs, "rejection_id": "y"}).result()
            start = datetime(2025, 1, 1, tzinfo=timezone.utc)
            bars = synthetic_bars([spec.symbol], spec.timeframe, start, start + timedelta(hours=6), 7)
            engine = WorkerEngine(spec, ModelRegistry(root / "registry"), backend="onnx", now=datetime.now(timezone.utc),
                                  mode="simulation", run_id="r")
            decided = engine.decide(engine.prepare(bars, epoch_us(start + timedelta(hours=4))))
            # and the store fails the first write it is given (a store away): the recorder goes on after it
            real, failures = store.write_decisions, []

            def flaky(*args, **kwargs):
                if not failures:
                    failures.append(1)
                    raise TransientError("BigQuery away (test)")
                return real(*args, **kwargs)

            store.write_decisions = flaky
            sink = PubSubSink(cfg, spec, ControlStore(root / "control.sqlite"))
            sink.record(spec, decided)
            sink.close(timeout=30)
            wait_for(lambda: decisions(cloud, "cloud-dev", "rejections", "christian").height
                     + decisions(cloud, "cloud-dev", "signals", "christian").height == decided.bars, 120,
                     "the worker's decisions stored beside the bad messages, after a failed write")
            assert failures == [1]
            # the two bad ones were never stored (counted once the gather is delivered too: after the store holds it)
            wait_for(lambda: recorder.counts["messages"] == decided.bars, 30, "the gather counted")
            # and the metrics say so: each dead letter by its reason, the failed write, what was stored
            after = {k: sample(*k) for k in before}
            assert after[("signalgen_dead_letters_total", "reason", "foreign_record")] == \
                before[("signalgen_dead_letters_total", "reason", "foreign_record")] + 1
            assert after[("signalgen_dead_letters_total", "reason", "undecodable_record")] == \
                before[("signalgen_dead_letters_total", "reason", "undecodable_record")] + 1
            assert after[("signalgen_writer_failures_total",)] == before[("signalgen_writer_failures_total",)] + 1
            assert after[("signalgen_bars_total", "client", "christian")] == \
                before[("signalgen_bars_total", "client", "christian")] + decided.bars
        finally:
            recorder.close()
            store.close()
