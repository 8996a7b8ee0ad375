"""/healthz, /readyz and /metrics of a running manager, through real HTTP (urllib and raw sockets),
the body parsed with prometheus_client's own parser: a real manager, real workers (mock inference),
one of them FATAL; the control store made unwritable under it; hostile requests."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.process.test_manager import CONTROL, REPO, client_yaml, cli, make_root, until

ODUM = {s: f"odum.momentum_v1.{s}.5m" for s in ("BTCUSD", "SOLUSD", "ETHUSD")}


def run_manager(root: str) -> None:
    """A manager of `root` (local-dev, mock) whose ETHUSD worker exits 2 (FATAL); the others are real."""
    from datetime import datetime, timezone

    from signalgen.config.loader import Overrides, load_config
    from signalgen.config.workers import worker_specs
    from signalgen.logs import configure
    from signalgen.process.manager import StrategyProcessManager
    from signalgen.storage.control import ControlStore

    configure("INFO")
    cfg = load_config("local-dev", "mock", root=root, overrides=Overrides(inference="mock"))
    manager = StrategyProcessManager(cfg, worker_specs(cfg), control=ControlStore.from_config(cfg),
                                     log_dir=Path(root) / "var/local-dev/logs",
                                     run_id=f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-test",
                                     worker_target=fatal_ethusd)
    sys.exit(manager.run())


def fatal_ethusd(args) -> None:
    """The real worker, except ETHUSD's, whose config is 'wrong': exit 2, FATAL at once."""
    if args.spec.symbol == "ETHUSD":
        sys.exit(2)
    from signalgen.process.worker import worker_process

    worker_process(args)


def get(url: str, method: str = "GET") -> tuple[int, str, dict]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def scrape(base: str) -> dict[str, dict[tuple, float]]:
    """/metrics as {sample name: {sorted label items: value}}."""
    code, body, headers = get(base + "/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4"), body[:300]
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def of(samples: dict[tuple, float], **labels) -> dict[tuple, float]:
    return {k: v for k, v in samples.items() if labels.items() <= dict(k).items()}


def raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    """What the server answers to `data` sent as it is on a new connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def manager(tmp_path: Path):
    root = make_root(tmp_path, {"odum": client_yaml("odum", list(ODUM))})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = root / "manager.out"
    with out.open("ab") as f:
        proc = subprocess.Popen([sys.executable, "-c", "import sys; from tests.unit.process.test_health import "
                                 "run_manager; run_manager(sys.argv[1])", str(root)], cwd=REPO, env=env, stdout=f,
                                stderr=subprocess.STDOUT)
    try:
        found: list[str] = []
        until(lambda: found.extend(re.findall(r"metrics: (http://127\.0\.0\.1:\d+)/metrics", out.read_text())) or
              found, 60, lambda: out.read_text()[-3000:])
        yield root, found[0], proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def states(base: str) -> dict[str, str]:
    """worker -> the state whose worker_state series is 1."""
    got = {}
    for key, value in scrape(base).get("signalgen_worker_state", {}).items():
        labels = dict(key)
        if value == 1:
            got[".".join(labels[k] for k in ("client", "strategy", "symbol", "timeframe"))] = labels["state"]
    return got


def test_health_readiness_and_metrics_of_a_running_manager(manager) -> None:
    root, base, proc = manager
    until(lambda: states(base) == {ODUM["BTCUSD"]: "RUNNING", ODUM["SOLUSD"]: "RUNNING", ODUM["ETHUSD"]: "FATAL"},
          60, lambda: (states(base), (root / "manager.out").read_text()[-2000:]))
    assert get(base + "/healthz")[:2] == (200, "ok\n")
    assert get(base + "/readyz")[:2] == (200, "ready\n")  # a FATAL worker does not make it unready
    m = scrape(base)
    # one series per worker, its current state's
    assert len(m["signalgen_worker_state"]) == 3 and set(m["signalgen_worker_state"].values()) == {1.0}
    fatal = dict(next(k for k, v in m["signalgen_worker_state"].items() if v == 1 and ("state", "FATAL") in k))
    assert fatal == {"client": "odum", "strategy": "momentum_v1", "symbol": "ETHUSD", "timeframe": "5m",
                     "state": "FATAL"}
    assert m["signalgen_control_store_up"] == {(): 1.0}
    until(lambda: sum(scrape(base).get("signalgen_signals_total", {}).values()) > 0, 60, "signals stored")
    m = scrape(base)
    assert len(m["signalgen_heartbeat_age_seconds"]) == 2  # the FATAL worker never beat
    assert all(0 <= v < 10 for v in m["signalgen_heartbeat_age_seconds"].values())
    assert all(v > 10 * 2**20 for v in of(m.get("signalgen_worker_rss_bytes", {})).values())
    assert "process_cpu_seconds_total" in m and "signalgen_writer_lag_seconds" in m

    # stop the two running workers: then every count stands still and can be compared
    assert cli(root, "stop-strategy", "--strategy", "odum.*").returncode == 0
    until(lambda: set(states(base).values()) == {"STOPPED", "FATAL"}, 30, lambda: states(base))
    m = scrape(base)
    counts = json.loads(cli(root, "signals", "count", "--mode", "mock", "--by", "mode", "-o", "json").stdout)
    stored_signals, stored_rejections = counts["total"]["signals"], counts["total"]["rejections"]
    assert sum(m["signalgen_signals_total"].values()) == stored_signals > 0
    assert sum(m["signalgen_bars_total"].values()) == stored_signals + stored_rejections
    assert sum(m["signalgen_rejections_total"].values()) >= stored_rejections > 0  # a reason each, at least
    assert {dict(k)["reason"] for k in m["signalgen_rejections_total"]} <= {
        "stale_data", "incomplete_window", "nan_feature", "model_unhealthy", "below_confidence", "no_consensus",
        "volatility_filter", "trend_unconfirmed", "duplicate_signal", "zero_size"}
    # every stored decision's latency observed, under its client and strategy
    assert m["signalgen_decision_latency_seconds_count"] == {
        (("client", "odum"), ("strategy", "momentum_v1")): stored_signals + stored_rejections}
    assert m["signalgen_writer_batch_rows_sum"] == {(): stored_signals + stored_rejections}
    assert m["signalgen_writer_lag_seconds"] == {(): 0.0}
    assert "signalgen_heartbeat_age_seconds" not in m  # a stopped worker is not expected to beat
    assert get(base + "/readyz")[0] == 200  # STOPPED on purpose: ready

    # `status --output json` and /metrics read the same rows
    status = {w["worker"]: w for w in json.loads(cli(root, "status", "--output", "json").stdout)["workers"]}
    assert states(base) == {w: s["state"] for w, s in status.items()}
    for name, field in (("signalgen_worker_restarts_total", "restarts"), ("signalgen_errors_total", "errors")):
        got = {".".join(dict(k)[x] for x in ("client", "strategy", "symbol", "timeframe")): v
               for k, v in m[name].items()}
        assert got == {w: s[field] for w, s in status.items() if s[field] is not None}, name

    # the control store cannot be written (a folder where its file was): /healthz says so, /metrics goes on
    store = root / CONTROL
    for suffix in ("", "-wal", "-shm"):
        Path(f"{store}{suffix}").unlink(missing_ok=True)
    store.mkdir()
    try:
        until(lambda: get(base + "/healthz")[0] == 503, 20, lambda: get(base + "/healthz"))
        code, body, _ = get(base + "/healthz")
        assert body.startswith("control store: ") and str(store) in body and len(body.splitlines()) == 1
        m = scrape(base)
        assert m["signalgen_control_store_up"] == {(): 0.0} and "signalgen_worker_state" not in m
        assert sum(m["signalgen_signals_total"].values()) == stored_signals  # the host's own counts stay
        assert get(base + "/readyz")[0] == 503
    finally:
        shutil.rmtree(store)
    until(lambda: get(base + "/healthz")[:2] == (200, "ok\n"), 20, lambda: get(base + "/healthz"))
    until(lambda: get(base + "/readyz")[0] == 200, 20, lambda: get(base + "/readyz"))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


def test_hostile_requests_are_answered_without_harm(manager) -> None:
    root, base, proc = manager
    port = int(base.rsplit(":", 1)[1])
    until(lambda: get(base + "/healthz")[0] == 200, 30, "healthy")
    code, body, _ = get(base + "/nothing/" + "x" * 5000)
    assert code == 404 and len(body) < 400 and "x" * 200 not in body  # the echo is clipped
    assert get(base + "/metrics?name[]=x")[0] == 200  # a query string is ignored
    code, body, headers = get(base + "/healthz", "HEAD")
    assert code == 200 and body == "" and headers["Content-Length"] == "3"
    for method in ("POST", "PUT", "DELETE"):
        assert get(base + "/metrics", method)[0] == 501
    assert raw(port, b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 414")
    assert b"Error code: 400" in raw(port, b"\x00\xffgarbage\r\n\r\n")  # not even HTTP: a bare page
    assert b"Error code: 505" in raw(port, b"GET /healthz HTTP/9.9\r\n\r\n")
    assert raw(port, b"GET /healthz HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n").startswith(b"HTTP/1.0 431")
    answer = raw(port, b"BREW /" + b"\x1b[31m" * 10 + b" HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 501") and b"\x1b" not in answer  # nothing unescaped echoed
    # connections that say nothing hold a slot each, at most 16 at once; the 17th is closed unanswered
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(16)]
    try:
        until(lambda: raw(port, b"GET /healthz HTTP/1.0\r\n\r\n") == b"", 10, "slots full")
    finally:
        for s in idle:
            s.close()
    until(lambda: get(base + "/healthz")[:2] == (200, "ok\n"), 15, "answering again")
    assert proc.poll() is None


def test_the_writer_program_serves_its_own_health_and_metrics(tmp_path: Path) -> None:
    """`writer`, as supervisord runs it beside `worker` programs: its own server, no worker series (its
    workers' states are supervisord's), the store's counters; SIGTERM ends both."""
    root = make_root(tmp_path, {"odum": client_yaml("odum", ["BTCUSD"])})
    out = root / "writer.out"
    with out.open("ab") as f:
        proc = subprocess.Popen([sys.executable, str(REPO / "strategy_runner.py"), "writer", "--root", str(root)],
                                cwd=root, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=f,
                                stderr=subprocess.STDOUT)
    try:
        found: list[str] = []
        until(lambda: found.extend(re.findall(r"metrics: (http://127\.0\.0\.1:\d+)/metrics", out.read_text())) or
              found, 60, lambda: out.read_text()[-3000:])
        base = found[0]
        assert get(base + "/healthz")[:2] == (200, "ok\n") and get(base + "/readyz")[:2] == (200, "ready\n")
        m = scrape(base)
        assert m["signalgen_writer_lag_seconds"] == {(): 0.0} and "signalgen_worker_state" not in m
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        with pytest.raises(urllib.error.URLError):
            get(base + "/healthz")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_taken_port_stops_start_with_exit_2_naming_the_field(tmp_path: Path) -> None:
    root = make_root(tmp_path, {"odum": client_yaml("odum", ["BTCUSD"])})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, str(REPO / "strategy_runner.py"), "start", "--inference", "mock",
                               "--root", str(root)], cwd=root, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(REPO), "SIGNALGEN_PROCESS__METRICS_PORT": str(port)})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(f"error: process.metrics_port: cannot serve metrics on "
                                                   f"127.0.0.1:{port}: Address already in use")


def test_readiness_waits_for_workers_on_their_way_and_not_for_fatal_ones() -> None:
    from signalgen.process.health import unready_workers

    def rows(*states: str) -> list[dict]:
        return [{"worker": f"w{i}", "state": s} for i, s in enumerate(states)]

    assert unready_workers(rows("RUNNING", "PAUSED", "STOPPED", "EXITED", "FATAL")) == []
    assert unready_workers(rows("RUNNING", "BACKOFF", "STARTING")) == [
        "2 worker(s) not settled: w1 BACKOFF, w2 STARTING"]
    many = unready_workers(rows(*["STOPPING"] * 7, "UNKNOWN"))
    assert many == ["8 worker(s) not settled: w0 STOPPING, w1 STOPPING, w2 STOPPING, w3 STOPPING, w4 STOPPING "
                    "and 3 more"]
