"""Health, readiness and Prometheus metrics over HTTP: one server per process (manager, writer, recorder).

`worker_rows` is the one reading of the fleet's per-worker state — control-store instances joined with
their heartbeats and latest resource sample — that both `status` (signalgen.cli.fleet.status_rows) and
`/metrics` (`FleetCollector`, computed at scrape time: nothing is counted twice) use. The decision host's
own counters (signals, rejections, latency, lag: `signalgen.metrics`) are served beside them.

Paths (docs/operations.md, "Health and metrics"): `/healthz` 200 while the process serves and its control
store can be written; `/readyz` 200 while its sink or store is reachable and every worker it owns is
RUNNING, or deliberately paused or stopped (a FATAL worker shows in the metrics and alerts, and does not
make the process unready); `/metrics` the Prometheus text format. Any other path is 404, any method but
GET and HEAD 501; requests are bounded (line, headers, time, concurrent connections).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from signalgen.errors import ConfigError
from signalgen.logs import excerpt

if TYPE_CHECKING:
    from signalgen.config.models import RunConfig

log = logging.getLogger(__name__)

UNKNOWN = "UNKNOWN"  # shown instead of a recorded state that no manager vouches for
NEEDS_MANAGER = ("STARTING", "RUNNING", "PAUSED", "STOPPING", "BACKOFF")  # true only while one supervises
SETTLED = ("RUNNING", "PAUSED", "STOPPED", "EXITED", "FATAL")  # what /readyz accepts (FATAL: alerts say it)
BEATING = ("STARTING", "RUNNING")  # states whose heartbeat age is exported (a stopped worker's only grows)
LABELS = ("client", "strategy", "symbol", "timeframe")
REQUEST_TIMEOUT_S = 5.0   # a client that sends nothing holds its thread at most this long
EXPOSITION = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes; every Prometheus reads it
MAX_CONNECTIONS = 16      # served at once; more are closed unanswered
ANSWER_TIMEOUT_S = 10.0  # longer than any answer takes (a control store waits up to 5 s for its lock)
MAX_REASONS = 5           # workers a /readyz answer names


def worker_rows(store, manager: str = "running", manager_started: float | None = None,
                leases: list[dict] | None = None) -> list[dict]:
    """One dict per worker: its instance row joined with its latest heartbeat (same pid) and resource
    sample. What `status` prints and `/metrics` exports.

    A recorded state that needs a supervising manager (RUNNING, BACKOFF, ...) is shown as UNKNOWN
    when `manager` is not "running", and so is every row written before `manager_started` (a
    previous manager's or another shard's, not yet rewritten by this one); `last_state` keeps what
    was recorded and `reason` says why. With `leases` (a shared store read by `status`), each row is
    judged by its shard's lease: UNKNOWN when it is not live; `shard` and `manager` (the holder) say
    whose it is.
    """
    from signalgen.process.manager import _epoch

    now = time.time()
    beats = store.heartbeats()
    resources = store.resources(latest_only=True)
    rows = []
    for inst in sorted(store.instances(), key=lambda r: r["id"]):
        beat = beats.get(inst["id"]) or {}
        if beat and inst.get("pid") is not None and beat.get("pid") != inst.get("pid"):
            beat = {k: beat.get(k) for k in ("checkpoint", "signals", "errors")}  # an earlier process's
        recorded, reason = inst["state"], inst.get("reason") or ""
        updated = _epoch(inst.get("updated_at"))
        lease = None
        if leases is not None:
            lease = next((x for x in leases if x["shard"] == inst.get("shard")), None)
            manager = "running" if lease and lease["live"] else f"of shard {inst.get('shard')} gone"
        if manager != "running" and recorded in NEEDS_MANAGER:
            doubt = f"manager {manager}"
        elif manager == "running" and manager_started and updated is not None and updated < manager_started:
            doubt = "a previous manager's row"
        else:
            doubt = ""
        state = UNKNOWN if doubt else recorded
        if doubt:
            last = f"last {recorded}" + (f" (pid {inst['pid']})" if inst.get("pid") else "")
            reason = f"{doubt}; {last}" + (f": {reason}" if reason not in ("", "ready") else "")
        alive = state in ("STARTING", "RUNNING", "PAUSED", "STOPPING")
        started = _epoch(inst.get("started_at"))
        rss = (resources.get(inst["id"]) or {}).get("rss_mb") if alive else None
        rows.append({
            "worker": inst["id"], "state": state, "last_state": recorded, "pid": inst.get("pid") if alive else None,
            "uptime_s": round(now - started, 1) if alive and started else None,
            "last_heartbeat_s": round(now - _epoch(beat["ts"]), 1) if beat.get("ts") else None,
            "last_bar_time": beat.get("last_bar_time"), "checkpoint": beat.get("checkpoint"),
            "signals": beat.get("signals"), "rejections": beat.get("rejections"), "errors": beat.get("errors"),
            "paused_keys": beat.get("paused_keys") or 0, "rss_mb": rss,
            "restarts": inst.get("restarts"), "exit_code": inst.get("exit_code"), "reason": reason,
            **{k: inst.get(k) or "" for k in LABELS},
            **({"shard": inst.get("shard"), "manager": f"pid {lease['pid']} on {lease['host']}" if lease else None}
               if leases is not None else {}),
        })
    return rows


class FleetCollector:
    """Per-worker gauges and counters computed at scrape time from `worker_rows` of the control store —
    the same reading `status` makes, so the two never disagree. A control store that cannot be read
    gives `signalgen_control_store_up 0` and no worker series, never a failed scrape."""

    def __init__(self, store, manager_started: float | None = None, *, ordering_keys: bool = False) -> None:
        self.store, self.manager_started, self.ordering_keys = store, manager_started, ordering_keys

    def rows(self) -> list[dict]:
        return worker_rows(self.store, "running", self.manager_started)

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("signalgen_control_store_up", "1 when the control store could be read for this "
                               "scrape.")
        try:
            rows = self.rows()
        except Exception as exc:  # noqa: BLE001 - the scrape goes on without the workers' series
            log.warning("metrics: cannot read the control store: %s", str(exc)[:300])
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        # the current state only (one series per worker, not one per state: a scrape of 500 workers is
        # 4,000 samples lighter); a state's series ends when the worker leaves it
        state = GaugeMetricFamily("signalgen_worker_state", "1, labelled with the worker's current state (as "
                                  "`status` shows it).", labels=(*LABELS, "state"))
        age = GaugeMetricFamily("signalgen_heartbeat_age_seconds", "Seconds since the last heartbeat of a worker "
                                "expected to beat (STARTING, RUNNING).", labels=LABELS)
        restarts = CounterMetricFamily("signalgen_worker_restarts", "Restarts of the worker since its manager "
                                       "started.", labels=LABELS)
        errors = CounterMetricFamily("signalgen_errors", "Errors the worker's current process reported (bad bars, "
                                     "failed predictions).", labels=LABELS)
        rss = GaugeMetricFamily("signalgen_worker_rss_bytes", "Resident memory of the worker's process (latest "
                                "sample).", labels=LABELS)
        paused = GaugeMetricFamily("signalgen_paused_ordering_keys", "Pub/Sub ordering keys whose publishing "
                                   "waits for a retry.", labels=LABELS)
        for r in rows:
            key = [r[k] for k in LABELS]
            state.add_metric([*key, r["state"]], 1.0)
            if r["last_heartbeat_s"] is not None and r["state"] in BEATING:
                age.add_metric(key, max(0.0, r["last_heartbeat_s"]))
            restarts.add_metric(key, r["restarts"] or 0)
            if r["errors"] is not None:
                errors.add_metric(key, r["errors"])
            if r["rss_mb"] is not None:
                rss.add_metric(key, r["rss_mb"] * 2**20)
            if self.ordering_keys:
                paused.add_metric(key, r["paused_keys"])
        yield from (state, age, restarts, errors, rss) + ((paused,) if self.ordering_keys else ())


def unready_workers(rows: list[dict]) -> list[str]:
    """Reasons why the workers of `rows` make their process unready: any not settled (SETTLED)."""
    waiting = [r for r in rows if r["state"] not in SETTLED]
    if not waiting:
        return []
    names = ", ".join(f"{r['worker']} {r['state']}" for r in waiting[:MAX_REASONS])
    more = f" and {len(waiting) - MAX_REASONS} more" if len(waiting) > MAX_REASONS else ""
    return [f"{len(waiting)} worker(s) not settled: {names}{more}"]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    app: HealthServer

    def process_request(self, request, client_address) -> None:
        if not self.app.slots.acquire(blocking=False):  # too many at once: closed unanswered
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.app.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.app.slots.release()

    def handle_error(self, request, client_address) -> None:
        log.debug("metrics: request from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    timeout = REQUEST_TIMEOUT_S
    server_version = "signalgen"
    sys_version = ""
    protocol_version = "HTTP/1.0"  # one request per connection: nothing to keep a thread for
    server: _Server

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        code, ctype, data = self.server.app.answer_on_its_thread(self.path.split("?", 1)[0])
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # the standard handler's page quotes the request (method, path): clipped here
        super().send_error(code, message and excerpt(message, 100), explain and excerpt(explain, 100))

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        log.debug("metrics: %s %s", self.address_string(), excerpt(format % args))


class HealthServer:
    """The HTTP server of one process: `/healthz`, `/readyz`, `/metrics` (module docstring).

    Args:
        host, port: where to listen (port 0: a free one, logged).
        registry: what `/metrics` serves.
        health: checks for `/healthz`; each returns None when fine, else a one-line reason.
        ready: returns the reasons the process is not ready (empty: ready).
    """

    def __init__(self, host: str, port: int, *, registry: CollectorRegistry,
                 health: list[Callable[[], str | None]], ready: Callable[[], list[str]]) -> None:
        self.host, self.port, self.registry = host, port, registry
        self.health, self.ready = health, ready
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        # answers are computed on this one thread, in turn: one control-store connection, and scrapes
        # that come together cost one reading at a time; the connections' threads only do the I/O
        self._answers = ThreadPoolExecutor(1, thread_name_prefix="metrics-answer")
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> HealthServer:
        """Listen and serve on a thread. ConfigError naming process.metrics_port when it cannot listen."""
        import socket

        _Server.address_family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            httpd = _Server((self.host, self.port), _Handler)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror or exc} (another "
                              "process on this host uses that port? give each its own port, or 0 for a free one)",
                              field="process.metrics_port") from None
        httpd.app = self
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="metrics-http", daemon=True)
        self._thread.start()
        log.info("metrics: %s/metrics (health %s/healthz, readiness %s/readyz)", self.url, self.url, self.url)
        return self

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        self._answers.shutdown(wait=False, cancel_futures=True)

    def answer_on_its_thread(self, path: str) -> tuple[int, str, bytes]:
        try:
            return self._answers.submit(self.answer, path).result(ANSWER_TIMEOUT_S)
        except TimeoutError:
            return 503, "text/plain; charset=utf-8", f"no answer within {ANSWER_TIMEOUT_S:g} s\n".encode()
        except RuntimeError:  # closing
            return 503, "text/plain; charset=utf-8", b"shutting down\n"

    def answer(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) of a GET of `path`."""
        text = "text/plain; charset=utf-8"
        try:
            if path == "/metrics":
                return 200, EXPOSITION, generate_latest(self.registry)
            if path == "/healthz":
                problems = [p for p in (check() for check in self.health) if p]
                return (503, text, ("; ".join(problems) + "\n").encode()) if problems else (200, text, b"ok\n")
            if path == "/readyz":
                problems = self.ready()
                return (503, text, ("\n".join(problems) + "\n").encode()) if problems else (200, text, b"ready\n")
        except Exception as exc:  # noqa: BLE001 - an answer, never a dead server thread
            log.warning("metrics: %s failed: %r", path, exc)
            return 500, text, f"{type(exc).__name__}: {excerpt(str(exc))}\n".encode()
        return 404, text, f"not found: {excerpt(path, 100)}; paths: /metrics /healthz /readyz\n".encode()


def _failure(call: Callable[[], object], what: str) -> Callable[[], str | None]:
    def check() -> str | None:
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - the reason is the answer
            return f"{what}: {' '.join(str(exc).split())[:300]}"
        return None
    return check


@contextmanager
def serve_health(cfg: RunConfig, *, control, problems: Callable[[], list[str]], fleet: bool = False,
                 alive: Callable[[], str | None] | None = None) -> Iterator[HealthServer]:
    """Serve `/healthz`, `/readyz` and `/metrics` for this process at `process.metrics_host:metrics_port`
    while the block runs.

    Args:
        control: the process's control store (`/healthz` pings it; with `fleet`, the workers are read from it).
        problems: why the process's sink or store is not reachable (the decision host's `problems`).
        fleet: the process owns workers (the manager): their metrics, and their states in `/readyz`.
        alive: an extra liveness check (the manager's supervision loop).
    """
    import psutil

    from signalgen.metrics import REGISTRY

    registry = CollectorRegistry(auto_describe=False)
    registry.register(REGISTRY)
    collector = None
    if fleet:
        collector = FleetCollector(control, psutil.Process().create_time(),
                                   ordering_keys=cfg.environment.messaging.type == "pubsub")
        registry.register(collector)

    def ready() -> list[str]:
        reasons = list(problems())
        if collector is not None:
            try:
                reasons += unready_workers(collector.rows())
            except Exception as exc:  # noqa: BLE001 - the reason is the answer
                reasons.append(f"control store: {' '.join(str(exc).split())[:300]}")
        return reasons

    limits = cfg.environment.process
    health = [_failure(control.ping, "control store")] + ([alive] if alive is not None else [])
    server = HealthServer(limits.metrics_host, limits.metrics_port, registry=registry, health=health,
                          ready=ready).start()
    try:
        yield server
    finally:
        server.close()
