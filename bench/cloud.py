"""Benchmark (issue 17): cloud-dev against its floors, on the real emulators this script starts itself.

It starts the Pub/Sub emulator and the BigQuery emulator (bqemulator, in .venv-bqemulator: see
scripts/bqemulator-venv) on free ports, and, for part 4, a private redis-server; each is stopped by its
PID at the end. Every figure is a ratio to a floor measured in the same run:

1. Pub/Sub path latency, p50 / p99 over `--messages` one-bar decisions paced at `--rate` per second,
   against the emulator's own floor (a raw google-cloud-pubsub publisher -> a streaming-pull subscriber
   on one topic, nothing of ours; the emulator's pusher polls every 50 ms). Our path is measured as
   its two hops: (a) a worker's `PubSubSink` (`Publisher`, unordered) -> its client's internal topic
   -> our `Subscriber` on the recorder's subscription, and (b) the recorder's `Publisher` (ordering key
   = the worker) -> the client's topic -> our `Subscriber` on the client's (ordered) subscription.
   Not the chain through `PubSubRecorder` itself: it stores a gather every GATHER_S (1 s) before it
   publishes, which part 3 measures, and on this branch no output publishes a client's signals to its
   Pub/Sub topic (routing `internal` on cloud-dev has no output backend), so the chain cannot be built.
2. BigQuery write throughput of a historical run, decisions/s: `run --env cloud-dev --mode historical
   --client ikenna` over `--days` days against the same run on local-dev (DuckDB), per wall second of
   the process (the run's own `elapsed_s`, from `--output json`, beside it).
3. Recorder lag under a fleet: `start --env cloud-dev --mode mock --inference mock` of `--workers`
   workers (one client of that many symbols, routed to QuantConnect), each deciding `--bars` bars
   paced one a second and then exiting: the time from the last worker's EXITED to the poll of BigQuery
   (every `--poll` s) that finds every decision stored, the rate it stores at meanwhile, then `stop`
   -> the manager's exit. (`generated_at` is the replay clock's time in mock and simulation, so it
   cannot time the recorder.)
4. Memory per worker: median USS (psutil) of that fleet's workers against a local-integration fleet
   (Redis) of the same workers, measured the same way after `--settle` s. Target <= 1.5x.

Prints the figures; `--write` also puts them and the command into docs/benchmarks.md (between markers).

    python bench/cloud.py --write
    python bench/cloud.py --messages 50 --days 1 --workers 10 --bars 20
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from historical import machine, write_section  # noqa: E402
from tests.integration.bigquery.servers import BQEMULATOR, BigQueryEmulator  # noqa: E402
from tests.integration.pubsub.servers import EMULATOR, PROJECT, Emulator, free_port  # noqa: E402
from tests.roots import copy_config  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- bench/cloud.py:begin -->", "<!-- bench/cloud.py:end -->"
START = datetime(2025, 1, 1, tzinfo=timezone.utc)
MODE = "mock"  # the mode of part 1's topics


def pct(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


def stats_ms(lat_s: list[float]) -> dict:
    return {"n": len(lat_s), "p50_ms": round(1000 * pct(lat_s, 50), 1), "p99_ms": round(1000 * pct(lat_s, 99), 1)}


def wait_for(what, timeout: float, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(poll)
    return None


@contextmanager
def env_vars(values: dict[str, str]):
    """These variables in this process's environment, inside."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cloud_vars(bq_endpoint: str, tag: str) -> dict[str, str]:
    return {"SIGNALGEN_STORAGE__API_ENDPOINT": bq_endpoint, "SIGNALGEN_MESSAGING__TOPIC_PREFIX": tag,
            "SIGNALGEN_STORAGE__DATASET_PREFIX": tag}


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **(extra or {})}


# ---------------------------------------------------------------- 1. Pub/Sub latency


def one_bar_decisions(spec, registry: Path, n: int) -> list:
    """`n` one-bar batches of `spec` on consecutive 5m bars (signals and rejections alternating)."""
    from signalgen.models.registry import ModelRegistry
    from signalgen.modes.engine import strategy_params
    from signalgen.signals.pipeline import evaluate
    from signalgen.signals.records import Decisions

    cards = [ModelRegistry(registry).card(m.model_id) for m in spec.strategy.models]
    params = strategy_params(spec, cards)
    out = []
    for i in range(n):
        t = np.array([int((START + timedelta(minutes=5 * (i + 1))).timestamp() * 1e6)], dtype=np.int64)
        preds = np.full((1, len(cards)), 0.9 if i % 2 == 0 else 0.5)
        ev = evaluate(params, t, t, np.full((1, 15), 0.001), preds, np.ones(len(cards), bool), np.ones(1, bool))
        out.append(Decisions(params, ev, t, t, preds, MODE, "bench", 0))
    return out


class Arrivals:
    """Arrival times (monotonic) by message id, from any number of callback threads."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.lock = threading.Lock()

    def add(self, key: str) -> None:
        t = time.monotonic()
        with self.lock:
            self.at.setdefault(key, t)

    def __len__(self) -> int:
        with self.lock:
            return len(self.at)


def paced(items: list, rate: float, send) -> dict:
    """send(item) -> keys, at `rate` items per second; {key: monotonic time just before its send}."""
    sent: dict[str, float] = {}
    t0 = time.monotonic()
    for i, item in enumerate(items):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        t = time.monotonic()
        for key in send(item):
            sent[key] = t
    return sent


def latencies(sent: dict[str, float], arrivals: Arrivals, timeout: float = 30.0) -> list[float]:
    def arrived() -> bool:
        with arrivals.lock:
            return all(k in arrivals.at for k in sent)

    wait_for(arrived, timeout, poll=0.05)
    with arrivals.lock:
        return [arrivals.at[k] - t for k, t in sent.items() if k in arrivals.at]


def floor_latency(tag: str, n: int, rate: float) -> dict:
    """A raw library publisher -> streaming pull on one topic: nothing of ours."""
    from google.cloud import pubsub_v1

    pub, sub = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topic, subscription = f"projects/{PROJECT}/topics/{tag}.floor", f"projects/{PROJECT}/subscriptions/{tag}.floor"
    pub.create_topic(name=topic)
    sub.create_subscription(name=subscription, topic=topic)
    arrivals = Arrivals()

    def on(message) -> None:
        arrivals.add(message.attributes["k"])
        message.ack()

    future = sub.subscribe(subscription, on)
    try:
        time.sleep(1.0)  # the streaming pull is open before the first publish
        paced([str(i) for i in range(10)], rate, lambda k: [pub.publish(topic, b"warm", k="w" + k) and "w" + k])
        time.sleep(0.5)
        sent = paced([str(i) for i in range(n)], rate,
                     lambda k: [pub.publish(topic, b'{"x": 1}', k=k) and k])
        return stats_ms(latencies(sent, arrivals))
    finally:
        future.cancel()
        sub.close()
        pub.transport.close()


def our_hops(cfg, registry: Path, control: Path, n: int, rate: float) -> tuple[dict, dict]:
    """(a) worker sink -> internal topic -> recorder subscription; (b) recorder publisher -> client
    topic -> client subscription. Each with our classes on both ends; handlers ack at once."""
    from signalgen.brokers.pubsub import (RECORDER_GROUP, Publisher, Subscriber, TopicNames, decision_messages,
                                          ensure_client)
    from signalgen.config.workers import worker_specs
    from signalgen.storage.control import ControlStore
    from signalgen.transports.pubsub import PubSubSink

    spec = worker_specs(cfg)[0]
    client, m = spec.client.id, cfg.environment.messaging
    names = TopicNames(m.topic_prefix)
    ensure_client(m, client, (MODE,))
    batches = one_bar_decisions(spec, registry, n + 10)
    keys = [[msg.attributes.get("signal_id") or msg.attributes["rejection_id"] for _, msg in decision_messages(spec, d)]
            for d in batches]
    results = []
    # (a) the worker's hop
    arrivals = Arrivals()

    def on_recorder(received) -> None:
        arrivals.add(received.attributes.get("signal_id") or received.attributes["rejection_id"])
        received.ack()

    subs = [Subscriber.from_config(cfg, names.subscription(names.internal(MODE, kind, client), RECORDER_GROUP),
                                   on_recorder).start() for kind in ("signals", "rejections")]
    sink = PubSubSink(cfg, spec, ControlStore(control))
    try:
        time.sleep(1.0)
        paced(list(range(10)), rate, lambda i: (sink.record(spec, batches[i]), keys[i])[1])  # warm-up
        time.sleep(0.5)
        sent = paced(list(range(10, n + 10)), rate, lambda i: (sink.record(spec, batches[i]), keys[i])[1])
        results.append(stats_ms(latencies(sent, arrivals)))
        sink.close(30)
    finally:
        for s in subs:
            s.stop()
    # (b) the recorder's hop to the client (as PubSubRecorder._publish_rejections: ordering key = worker)
    arrivals = Arrivals()

    def on_client(received) -> None:
        arrivals.add(received.attributes.get("signal_id") or received.attributes["rejection_id"])
        received.ack()

    messages = [[(kind, msg) for kind, msg in decision_messages(spec, d)] for d in batches]
    subs = [Subscriber.from_config(cfg, names.subscription(t, client), on_client).start()
            for t in names.client_topics(MODE, client)]
    publisher = Publisher.from_config(cfg, client)

    def send(i: int) -> list[str]:
        for kind, msg in messages[i]:
            publisher.publish(names.signals(MODE, client) if kind == "signals" else names.rejections(MODE, client), msg)
        return keys[i]

    try:
        time.sleep(1.0)
        paced(list(range(10)), rate, send)
        time.sleep(0.5)
        sent = paced(list(range(10, n + 10)), rate, send)
        results.append(stats_ms(latencies(sent, arrivals)))
        publisher.close(30)
    finally:
        for s in subs:
            s.stop()
    return results[0], results[1]


def part_latency(tmp: Path, registry: Path, bq_endpoint: str, n: int, rate: float) -> dict:
    from signalgen.config.loader import load_config

    tag = "b" + uuid.uuid4().hex[:8]
    root = copy_config(tmp / "latency", ["ikenna"])
    (root / "registry").symlink_to(registry)
    with env_vars(cloud_vars(bq_endpoint, tag)):
        cfg = load_config("cloud-dev", MODE, root=root)
    floor = floor_latency(tag, n, rate)
    worker, client = our_hops(cfg, registry, tmp / "latency-control.sqlite", n, rate)
    return {"messages": n, "rate": rate, "floor": floor, "worker_hop": worker, "client_hop": client}


# ---------------------------------------------------------------- 2. BigQuery historical throughput


def historical_run(root: Path, env: str, days: int, extra: dict[str, str]) -> dict:
    end = START + timedelta(days=days)
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "strategy_runner.py"), "run", "--env", env, "--mode", "historical",
                           "--client", "ikenna", "--start", f"{START:%Y-%m-%d}", "--end", f"{end:%Y-%m-%d}",
                           "--output", "json", "--root", str(root)],
                          cwd=root, env=cli_env(extra), capture_output=True, text=True, timeout=1800)
    wall = time.monotonic() - t0
    if done.returncode != 0:
        raise RuntimeError(f"run --env {env} exited {done.returncode}: {done.stdout[-1500:]} {done.stderr[-1500:]}")
    report = json.loads(done.stdout[done.stdout.index("{"):])
    decisions = int(report["totals"]["signals"]) + int(report["totals"]["rejections"])
    return {"env": env, "decisions": decisions, "elapsed_s": report["elapsed_s"], "wall_s": round(wall, 2),
            "per_s": round(decisions / report["elapsed_s"]), "per_wall_s": round(decisions / wall)}


def part_bigquery(tmp: Path, registry: Path, bq_endpoint: str, pubsub_host: str, days: int) -> dict:
    root = copy_config(tmp / "historical", ["ikenna"])
    (root / "registry").symlink_to(registry)
    tag = "h" + uuid.uuid4().hex[:8]
    local = historical_run(root, "local-dev", days, {})
    cloud = historical_run(root, "cloud-dev", days, {**cloud_vars(bq_endpoint, tag), "PUBSUB_EMULATOR_HOST": pubsub_host})
    return {"days": days, "local": local, "cloud": cloud}


# ---------------------------------------------------------------- 3 + 4. fleets


def fleet_root(path: Path, registry: Path, workers: int, bars: int) -> Path:
    """A root with one client `fleet` of `workers` symbols (one strategy of two models, 5m), whose mock
    range holds `bars` bars per worker (paced one a second; the warm-up before it goes at once)."""
    root = copy_config(path, [])
    mode_file = root / "modes" / "mock.yaml"
    mode = yaml.safe_load(mode_file.read_text())
    mode["end"] = (START + timedelta(minutes=5 * bars)).isoformat().replace("+00:00", "Z")
    mode["start"] = START.isoformat().replace("+00:00", "Z")
    mode_file.write_text(yaml.safe_dump(mode, sort_keys=False))
    (root / "registry").symlink_to(registry)
    symbols = [f"S{i:03d}" for i in range(workers)]
    client = {"id": "fleet", "routing": "quantconnect",
              "strategies": [{"id": "fleet_v1", "symbols": symbols, "timeframes": ["5m"],
                              "models": [{"model_id": m, "confidence_threshold": 0.6}
                                         for m in ("swing_high", "swing_low")]}]}
    (root / "clients" / "fleet.yaml").write_text(yaml.safe_dump(client, sort_keys=False))
    return root


def instances(control: Path) -> dict[str, tuple[str, int | None]]:
    if not control.exists():
        return {}
    try:
        with sqlite3.connect(control, timeout=5) as con:
            return {w: (s, p) for w, s, p in con.execute("SELECT id, state, pid FROM strategy_instances")}
    except sqlite3.Error:
        return {}


def uss_mb(pids: list[int]) -> list[float]:
    out = []
    for pid in pids:
        try:
            out.append(psutil.Process(pid).memory_full_info().uss / 2**20)
        except psutil.Error:
            pass
    return out


class Fleet:
    """`start --env <env> --mode mock --inference mock` on `root`, in the background."""

    def __init__(self, root: Path, env: str, extra: dict[str, str], workers: int) -> None:
        self.root, self.env, self.extra, self.workers = root, env, extra, workers
        self.control = root / "var" / env / "control.sqlite"
        self.out = (root / f"manager-{env}.out").open("ab")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "strategy_runner.py"), "start", "--env", env, "--mode",
                                      "mock", "--inference", "mock", "--root", str(root)],
                                     cwd=root, env=cli_env(extra), stdout=self.out, stderr=subprocess.STDOUT)

    def running(self, timeout: float) -> float:
        ok = wait_for(lambda: sum(s in ("RUNNING", "EXITED") for s, _ in instances(self.control).values())
                      == self.workers or self.proc.poll() is not None, timeout)
        if not ok or self.proc.poll() is not None:
            raise RuntimeError(f"{self.env} fleet: not all {self.workers} RUNNING within {timeout:.0f} s: "
                               f"{(self.root / f'manager-{self.env}.out').read_text(errors='replace')[-2000:]}")
        return time.monotonic() - self.t0

    def uss(self) -> list[float]:
        return uss_mb([p for s, p in instances(self.control).values() if s == "RUNNING" and p])

    def stop(self) -> float:
        """`stop`; seconds until the manager exited."""
        t = time.monotonic()
        done = subprocess.run([sys.executable, str(ROOT / "strategy_runner.py"), "stop", "--env", self.env,
                               "--root", str(self.root)], cwd=self.root, env=cli_env(self.extra),
                              capture_output=True, text=True, timeout=300)
        try:
            self.proc.wait(timeout=300)
        finally:
            self.kill()
        if done.returncode != 0:
            print(f"stop --env {self.env} exited {done.returncode}: {done.stdout[-500:]} {done.stderr[-500:]}",
                  file=sys.stderr)
        return time.monotonic() - t

    def kill(self) -> None:
        if self.proc.poll() is None:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                p.kill()
            self.proc.kill()
            self.proc.wait(30)
        self.out.close()


def bq_client(endpoint: str):
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    return bigquery.Client(project=PROJECT, credentials=AnonymousCredentials(),
                           client_options=ClientOptions(api_endpoint=endpoint))


def stored_ids(client, dataset: str) -> list[str]:
    """The id of every decision in `dataset` (none before its first write)."""
    from google.api_core.exceptions import NotFound

    sql = (f"SELECT signal_id AS id FROM `{PROJECT}.{dataset}.signals` "
           f"UNION ALL SELECT rejection_id AS id FROM `{PROJECT}.{dataset}.rejections`")
    try:
        return [r["id"] for r in client.query(sql).result()]
    except NotFound:
        return []


def part_fleets(tmp: Path, registry: Path, bq_endpoint: str, pubsub_host: str, workers: int, bars: int,
                settle: float, poll: float, start_timeout: float) -> dict:
    result: dict = {"workers": workers, "bars": bars}
    # the local-integration fleet on a private Redis: the memory floor
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                                        text=True).stdout.strip() == "PONG", 20)
        fleet = Fleet(fleet_root(tmp / "fleet-redis", registry, workers, bars), "local-integration",
                      {"SIGNALGEN_MESSAGING__URL": f"redis://127.0.0.1:{port}/0"}, workers)
        try:
            result["redis_running_s"] = round(fleet.running(start_timeout), 1)
            time.sleep(settle)
            result["redis_uss_mb"] = fleet.uss()
            fleet.stop()
        finally:
            fleet.kill()
    finally:
        os.kill(redis.pid, signal.SIGTERM)
        redis.wait(30)
    # the cloud-dev fleet: memory, then how long after its last worker's finish BigQuery holds everything
    tag = "f" + uuid.uuid4().hex[:8]
    # the control store in SQLite, as the Redis fleet's: this part measures the Pub/Sub and BigQuery path
    # (and reads the workers' states from the file); the PostgreSQL control store is docs/control.md's
    extra = {**cloud_vars(bq_endpoint, tag), "PUBSUB_EMULATOR_HOST": pubsub_host, "SIGNALGEN_CONTROL__TYPE": "sqlite"}
    fleet = Fleet(fleet_root(tmp / "fleet-cloud", registry, workers, bars), "cloud-dev", extra, workers)
    try:
        result["cloud_running_s"] = round(fleet.running(start_timeout), 1)
        time.sleep(settle)
        result["cloud_uss_mb"] = fleet.uss()
        client, dataset, want = bq_client(bq_endpoint), f"{tag}_fleet", workers * bars
        seen: dict[str, float] = {}     # decision id -> the first poll that returned it (time.monotonic)
        exited: dict[str, float] = {}   # worker id -> the first poll that saw it EXITED
        query_s: list[float] = []
        deadline = time.monotonic() + bars + start_timeout
        while time.monotonic() < deadline and (len(seen) < want or len(exited) < workers):
            t = time.monotonic()
            for wid, (state, _) in instances(fleet.control).items():
                if state == "EXITED":
                    exited.setdefault(wid, t)
            ids = stored_ids(client, dataset)
            now = time.monotonic()
            query_s.append(now - t)
            for key in ids:
                seen.setdefault(key, now)
            time.sleep(max(0.0, poll - (time.monotonic() - t)))
        stored_at = sorted(seen.values())
        result["lag"] = {
            "stored": len(seen), "want": want, "exited": len(exited), "query_p50_s": round(pct(query_s, 50), 2),
            "last_exit_to_all_stored_s": (round(stored_at[-1] - max(exited.values()), 1)
                                          if exited and len(seen) >= want else None),
            "first_exit_to_all_stored_s": (round(stored_at[-1] - min(exited.values()), 1)
                                           if exited and len(seen) >= want else None),
            "stored_per_s": (round((len(stored_at) - 1) / (stored_at[-1] - stored_at[0]), 1)
                             if len(stored_at) > 1 and stored_at[-1] > stored_at[0] else None),
        }
        result["stop_to_exit_s"] = round(fleet.stop(), 1)
        result["exit_code"] = fleet.proc.returncode
        result["stored_after_stop"] = len(set(stored_ids(client, dataset)))
        client.close()
    finally:
        fleet.kill()
    return result


# ---------------------------------------------------------------- report


def figures(r: dict) -> dict:
    """Ratios of the measured figures to their floors."""
    lat, bq, fl = r["latency"], r["bigquery"], r["fleets"]
    f = lat["floor"]
    cloud_uss, redis_uss = statistics.median(fl["cloud_uss_mb"]), statistics.median(fl["redis_uss_mb"])
    return {
        "worker_hop_p50_ratio": lat["worker_hop"]["p50_ms"] / f["p50_ms"],
        "worker_hop_p99_ratio": lat["worker_hop"]["p99_ms"] / f["p99_ms"],
        "client_hop_p50_ratio": lat["client_hop"]["p50_ms"] / f["p50_ms"],
        "client_hop_p99_ratio": lat["client_hop"]["p99_ms"] / f["p99_ms"],
        "bigquery_ratio": bq["cloud"]["per_s"] / bq["local"]["per_s"],
        "bigquery_wall_ratio": bq["cloud"]["per_wall_s"] / bq["local"]["per_wall_s"],
        "cloud_uss_mb": cloud_uss, "redis_uss_mb": redis_uss, "uss_ratio": cloud_uss / redis_uss,
    }


def _s(value) -> str:
    return "not reached" if value is None else f"{value:.1f} s"


def markdown(r: dict, command: str) -> str:
    lat, bq, fl, x = r["latency"], r["bigquery"], r["fleets"], figures(r)
    f, a, b = lat["floor"], lat["worker_hop"], lat["client_hop"]
    lg = fl["lag"]
    uss_ok = "met" if x["uss_ratio"] <= 1.5 else "missed"
    lines = [
        MARK_BEGIN, "## cloud-dev: Pub/Sub and BigQuery against their floors", "",
        f"Command: `{command}` — run on {datetime.now(timezone.utc):%Y-%m-%d}, {machine()}; {r['versions']}. "
        "The Pub/Sub emulator, bqemulator and a redis-server run on the same 2 shared cores, started by the "
        "script on free ports and stopped by PID.", "",
        f"**1. Pub/Sub latency**, {lat['messages']} one-bar decisions at {lat['rate']:g}/s per path, publish call -> "
        "the subscriber's handler (same process, monotonic clock):", "",
        "| path | p50 | p99 | ratio to the floor, p50 / p99 |", "| --- | --- | --- | --- |",
        f"| floor: raw library publisher -> streaming pull, one topic | {f['p50_ms']:.1f} ms | {f['p99_ms']:.1f} ms | 1 |",
        f"| (a) worker: `PubSubSink` (`Publisher`, no ordering key) -> internal topic -> `Subscriber` on the recorder's "
        f"subscription | {a['p50_ms']:.1f} ms | {a['p99_ms']:.1f} ms | **{x['worker_hop_p50_ratio']:.2f}** / "
        f"{x['worker_hop_p99_ratio']:.2f} |",
        f"| (b) recorder -> client: `Publisher` (ordering key = worker) -> client topic -> `Subscriber` on the client's "
        f"ordered subscription | {b['p50_ms']:.1f} ms | {b['p99_ms']:.1f} ms | **{x['client_hop_p50_ratio']:.2f}** / "
        f"{x['client_hop_p99_ratio']:.2f} |", "",
        "Measured as two hops: between them `PubSubRecorder` holds a gather for GATHER_S (1 s) and stores it before it "
        "publishes (part 3), and on this branch no output publishes a client's signals to its topic, so the chain "
        "through the recorder cannot be driven end to end. No absolute target: the emulator polls every 50 ms.", "",
        f"**2. BigQuery write throughput**, `run --mode historical --client ikenna` over {bq['days']} days "
        "(4 workers, 5m bars; decisions = signals + rejections; rate over the run's own `elapsed_s`, "
        "process wall time beside it):", "",
        "| store | decisions | elapsed | decisions/s | process wall | decisions per wall second |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, name in (("local", "local-dev (DuckDB): floor"), ("cloud", "cloud-dev (BigQuery emulator)")):
        v = bq[key]
        lines.append(f"| {name} | {v['decisions']:,} | {v['elapsed_s']:.1f} s | {v['per_s']:,} | {v['wall_s']:.1f} s "
                     f"| {v['per_wall_s']:,} |")
    lines += [
        "", f"**Ratio BigQuery / DuckDB, per wall second: {x['bigquery_wall_ratio']:.2f}** (over `elapsed_s`: "
        f"{x['bigquery_ratio']:.2f}; `elapsed_s` ends when the last worker has handed its batches to the writer, "
        "before the writer's queue drains at close, so the wall time is the whole write).", "",
        f"**3. Recorder lag under a fleet** of {fl['workers']} streaming mock workers on cloud-dev (mock inference; "
        f"each decides {fl['bars']} bars paced one a second, then exits; all RUNNING {fl['cloud_running_s']:.0f} s "
        f"after `start`). BigQuery polled every {r['args']['poll']:g} s (query p50 {lg['query_p50_s']:.2f} s) for the "
        "ids it holds, the control store for EXITED workers. `generated_at` cannot give the lag in mock or "
        "simulation: it is the replay clock's time (the bar's), not the wall's.", "",
        "| decisions stored (asked) | workers EXITED | stored per second while running (decided: one per worker) | "
        "last worker EXITED -> all stored | first worker EXITED -> all stored | `stop` -> manager exit |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {lg['stored']:,} ({lg['want']:,}) | {lg['exited']} | {lg['stored_per_s']} ({fl['workers']}) | "
        f"**{_s(lg['last_exit_to_all_stored_s'])}** | {_s(lg['first_exit_to_all_stored_s'])} | "
        f"{fl['stop_to_exit_s']:.1f} s (exit code {fl['exit_code']}) |", "",
        f"**4. Memory per worker**, median USS of the RUNNING workers {r['args']['settle']:g} s after all were RUNNING, "
        f"same {fl['workers']} workers, client and mock inference:", "",
        "| fleet | USS per worker, median (max) |", "| --- | --- |",
        f"| local-integration (Redis): floor | {x['redis_uss_mb']:.1f} MB ({max(fl['redis_uss_mb']):.1f}) |",
        f"| cloud-dev (Pub/Sub client loaded) | {x['cloud_uss_mb']:.1f} MB ({max(fl['cloud_uss_mb']):.1f}) |", "",
        f"**Ratio cloud-dev / Redis: {x['uss_ratio']:.2f}** — target <= 1.5: {uss_ok}.", "",
        MARK_END,
    ]
    return "\n".join(lines)


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in ("google-cloud-pubsub", "google-cloud-bigquery", "grpcio"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=300, help="part 1: decisions per path")
    ap.add_argument("--rate", type=float, default=20.0, help="part 1: decisions per second")
    ap.add_argument("--days", type=int, default=7, help="part 2: days of 5m bars of the historical run")
    ap.add_argument("--workers", type=int, default=100, help="parts 3 and 4: workers per fleet")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds after all RUNNING before USS is read")
    ap.add_argument("--bars", type=int, default=60, help="parts 3 and 4: bars per worker, paced one a second")
    ap.add_argument("--poll", type=float, default=0.5, help="part 3: seconds between BigQuery polls")
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--train-days", type=int, default=20, help="days of synthetic bars the demo models train on")
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md with these figures (default: print only)")
    args = ap.parse_args()
    if not EMULATOR.exists():
        sys.exit(f"the Pub/Sub emulator is not installed ({EMULATOR})")
    if not BQEMULATOR.exists():
        sys.exit(f"no bqemulator at {BQEMULATOR}: run scripts/bqemulator-venv")

    from signalgen.models.train import train_demo_models

    with tempfile.TemporaryDirectory(prefix="signalgen-bench-cloud-") as name:
        tmp = Path(name)
        registry = tmp / "registry"
        train_demo_models(registry, seed=7, days=args.train_days, now=datetime.now(timezone.utc))
        pubsub = Emulator(tmp / "pubsub.log").start()
        bq = None
        try:
            bq = BigQueryEmulator(tmp / "bqemulator").start()
            os.environ["PUBSUB_EMULATOR_HOST"] = pubsub.host  # before any client is made
            r: dict = {"args": vars(args), "versions": versions()}
            r["latency"] = part_latency(tmp, registry, bq.endpoint, args.messages, args.rate)
            print(json.dumps({"latency": r["latency"]}), flush=True)
            r["bigquery"] = part_bigquery(tmp, registry, bq.endpoint, pubsub.host, args.days)
            print(json.dumps({"bigquery": r["bigquery"]}), flush=True)
            r["fleets"] = part_fleets(tmp, registry, bq.endpoint, pubsub.host, args.workers, args.bars, args.settle,
                                      args.poll, args.start_timeout)
            print(json.dumps({"fleets": {k: v for k, v in r["fleets"].items() if not k.endswith("uss_mb")}}), flush=True)
        finally:
            if bq is not None:
                bq.stop()
            pubsub.stop()
    section = markdown(r, "python bench/cloud.py " + " ".join(sys.argv[1:]))
    print(section)
    if args.write:
        print(f"wrote {write_section(section)}")


if __name__ == "__main__":
    main()
