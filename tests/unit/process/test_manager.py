"""StrategyProcessManager with real processes: a manager subprocess (`start`, or `run_manager` below with
a stand-in worker target), real forkserver workers, the real control store, commands as raw SQL rows.

Intervals are shortened through the environment YAML of a private root; inference is mock (models are
not the point here). Functions that run in child processes live at module level.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
CONTROL = Path("var/local-dev/control.sqlite")
FAST = {"heartbeat_interval_s": 0.2, "heartbeat_threshold_s": 5.0, "backoff_initial_s": 0.2,
        "backoff_max_s": 2.0, "stop_timeout_s": 5.0, "resource_sample_s": 0.5, "mock_bar_interval_s": 0.05,
        "max_recovery_attempts": 3}


# ---------------------------------------------------------------- fixtures and helpers (shared with the CLI tests)


def client_yaml(client: str, symbols: list[str], *, threshold: float = 0.6, recovery: str = "restart",
                strategy: str = "momentum_v1") -> str:
    """A small internal-routing client (one strategy, 5m) in the demo's shape."""
    return yaml.safe_dump({
        "id": client, "routing": "internal",
        "strategies": [{"id": strategy, "symbols": symbols, "timeframes": ["5m"], "recovery": recovery,
                        "models": [{"model_id": "swing_high", "confidence_threshold": threshold,
                                    "lookback_window": 60},
                                   {"model_id": "swing_low", "confidence_threshold": threshold,
                                    "lookback_window": 60}]}]}, sort_keys=False)


def make_root(tmp_path: Path, clients: dict[str, str], **process) -> Path:
    """A private root: the repo's environments, modes and registry; only `clients`; process settings
    FAST updated by `process`."""
    root = tmp_path / "root"
    root.mkdir()
    for layer in ("environments", "modes"):
        subprocess.run(["cp", "-r", str(REPO / layer), str(root / layer)], check=True)
    (root / "registry").symlink_to(REPO / "registry")
    (root / "clients").mkdir()
    for cid, text in clients.items():
        (root / "clients" / f"{cid}.yaml").write_text(text)
    env_file = root / "environments" / "local-dev.yaml"
    env = yaml.safe_load(env_file.read_text())
    env["process"] = {**env.get("process", {}), **FAST, **process}
    env_file.write_text(yaml.safe_dump(env, sort_keys=False))
    return root


def cli(root: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "strategy_runner.py"), *args, "--root", str(root)],
                          cwd=root, capture_output=True, text=True, timeout=timeout, env=env)


class Manager:
    """A manager subprocess: `start --inference mock` (or `run_manager` with a stand-in `target`)."""

    def __init__(self, root: Path, *args: str, target: str | None = None) -> None:
        self.root = root
        self.log = root / "manager.out"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if target:
            cmd = [sys.executable, "-c", "import sys; from tests.unit.process.test_manager import run_manager; "
                   "run_manager(sys.argv[1], sys.argv[2])", str(root), target]
        else:
            cmd = [sys.executable, str(REPO / "strategy_runner.py"), "start", "--root", str(root),
                   "--inference", "mock", *args]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.store = sqlite_path(root)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def instances(self) -> dict[str, dict]:
        return {r["id"]: r for r in self.query("SELECT * FROM strategy_instances")}

    def states(self) -> dict[str, str]:
        return {w: r["state"] for w, r in self.instances().items()}

    def wait_states(self, want: str | dict[str, str], timeout: float = 60, count: int | None = None) -> dict:
        """Poll until every worker (or the given ones) is in the wanted state."""
        def ok() -> bool:
            states = self.states()
            if isinstance(want, str):
                return bool(states) and (count is None or len(states) == count) and \
                    all(s == want for s in states.values())
            return all(states.get(w) == s for w, s in want.items())
        until(ok, timeout, lambda: f"states {want}; have {self.states()}\n{self.output()[-3000:]}")
        return self.instances()

    def submit(self, command: str, strategy_id: str | None = None, parameters: str = "{}") -> int:
        """A command row inserted with plain SQL, as any program may."""
        with sqlite3.connect(self.store, timeout=5) as con:
            cur = con.execute("INSERT INTO strategy_commands (strategy_id, command, parameters_json) "
                              "VALUES (?, ?, ?)", (strategy_id, command, parameters))
            return int(cur.lastrowid)

    def command(self, cid: int, timeout: float = 10) -> dict:
        def row() -> dict:
            with sqlite3.connect(self.store, timeout=5) as con:
                con.row_factory = sqlite3.Row
                return dict(con.execute("SELECT * FROM strategy_commands WHERE id = ?", (cid,)).fetchone())
        until(lambda: row()["status"] != "pending", timeout, lambda: f"command {cid} still pending")
        return row()

    def query(self, sql: str, *args) -> list[dict]:
        """Rows of `sql`, or none while the manager has not created the store yet."""
        if not self.store.exists():
            return []
        with sqlite3.connect(self.store, timeout=5) as con:
            con.row_factory = sqlite3.Row
            try:
                return [dict(r) for r in con.execute(sql, args)]
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return []
                raise

    def events(self, worker_id: str) -> list[dict]:
        return self.query("SELECT * FROM events WHERE worker_id = ? ORDER BY id", worker_id)

    def heartbeat(self, worker_id: str) -> dict:
        rows = self.query("SELECT * FROM heartbeats WHERE worker_id = ?", worker_id)
        return rows[0] if rows else {}

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def sqlite_path(root: Path) -> Path:
    return root / CONTROL


def until(predicate, timeout: float, message) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {message() if callable(message) else message}")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def managers():
    """Every manager started by a test is killed (with its process tree) at the end."""
    started: list[Manager] = []
    yield started
    for m in started:
        try:
            tree = psutil.Process(m.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        m.kill()
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def start(managers: list, root: Path, *args: str, target: str | None = None) -> Manager:
    m = Manager(root, *args, target=target)
    managers.append(m)
    return m


# ---------------------------------------------------------------- stand-in workers (targets for run_manager)


def run_manager(root: str, target: str) -> None:
    """A manager whose workers run `target` (a function of this module) instead of the real worker."""
    from datetime import datetime, timezone

    from signalgen.config.loader import Overrides, load_config
    from signalgen.config.workers import worker_specs
    from signalgen.logs import configure
    from signalgen.process.manager import StrategyProcessManager
    from signalgen.storage.control import ControlStore

    configure("INFO")
    cfg = load_config("local-dev", "mock", root=root, overrides=Overrides(inference="mock"))
    control = ControlStore.from_config(cfg)
    manager = StrategyProcessManager(cfg, worker_specs(cfg), control=control,
                                     log_dir=Path(root) / "var/local-dev/logs",
                                     run_id=f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-test",
                                     worker_target=globals()[target])
    sys.exit(manager.run())


def _beat(args, *, ready: bool = True, errors: int = 0) -> None:
    from signalgen.storage.control import ControlStore

    ControlStore(args.control_path).heartbeat(args.spec.id, pid=os.getpid(), state="RUNNING", last_bar_time=None,
                                              checkpoint=None, signals=0, rejections=0, errors=errors, ready=ready)


def exit_two(args) -> None:
    """A worker whose config is wrong: exit 2 (ConfigError)."""
    sys.exit(2)


def beat_once_then_hang(args) -> None:
    """Ready once, then never again: its heartbeat goes stale."""
    _beat(args)
    time.sleep(3600)


def beat_and_hog_memory(args) -> None:
    """Healthy heartbeats, but 200 MB of private memory (over a 64 MB memory_mb)."""
    hog = bytearray(200 * 2**20)
    for i in range(0, len(hog), 4096):
        hog[i] = 1  # touch every page: private (USS), not just reserved
    while True:
        _beat(args)
        time.sleep(0.2)


def beat_with_errors(args) -> None:
    """Healthy heartbeats whose error count grows by 5 per beat (far above 10 a minute)."""
    n = 0
    while True:
        n += 5
        _beat(args, errors=n)
        time.sleep(0.2)


# ---------------------------------------------------------------- tests: stand-in workers


def test_exit_two_goes_fatal_without_restart(tmp_path: Path, managers) -> None:
    root = make_root(tmp_path, {"odum": client_yaml("odum", ["BTCUSD", "SOLUSD"])})
    m = start(managers, root, target="exit_two")
    rows = m.wait_states("FATAL", timeout=60, count=2)
    time.sleep(1.5)  # several backoff periods (0.2 s): nothing restarts
    rows = m.instances()
    assert all(r["state"] == "FATAL" and r["restarts"] == 0 and r["exit_code"] == 2 for r in rows.values()), rows
    for wid in rows:
        assert sum(e["kind"] == "failure" for e in m.events(wid)) == 1
    assert m.proc.poll() is None  # the manager lives on
    assert m.stop() == 0


def test_stale_heartbeat_is_killed_backs_off_and_goes_fatal_after_max_attempts(tmp_path: Path, managers) -> None:
    root = make_root(tmp_path, {"odum": client_yaml("odum", ["BTCUSD"])}, heartbeat_threshold_s=1.0,
                     max_recovery_attempts=2)
    m = start(managers, root, target="beat_once_then_hang")
    wid = "odum.momentum_v1.BTCUSD.5m"
    m.wait_states({wid: "RUNNING"}, timeout=30)
    first = m.instances()[wid]["pid"]
    rows = m.wait_states({wid: "FATAL"}, timeout=60)
    assert rows[wid]["restarts"] == 2 and rows[wid]["pid"] is None
    assert gone(first)
    kinds = [e["kind"] for e in m.events(wid)]
    assert kinds.count("heartbeat") == 3 and kinds.count("failure") == 3
    assert "heartbeat" in rows[wid]["reason"]
    assert m.stop() == 0


def test_worker_over_memory_limit_is_restarted_with_an_event(tmp_path: Path, managers) -> None:
    root = make_root(tmp_path, {"odum": client_yaml("odum", ["BTCUSD"])}, memory_mb=64)
    m = start(managers, root, target="beat_and_hog_memory")
    wid = "odum.momentum_v1.BTCUSD.5m"
    until(lambda: any(e["kind"] == "memory" for e in m.events(wid)), 60, lambda: m.events(wid))
    until(lambda: m.instances()[wid]["restarts"] >= 1, 30, lambda: m.instances())
    [memory, *_] = [e for e in m.events(wid) if e["kind"] == "memory"]
    assert "over the limit 64 MB" in memory["detail"]
    assert m.stop() == 0


def test_errors_above_the_rate_mark_a_worker_unhealthy(tmp_path: Path, managers) -> None:
    root = make_root(tmp_path, {"odum": client_yaml("odum", ["BTCUSD"])})
    m = start(managers, root, target="beat_with_errors")
    wid = "odum.momentum_v1.BTCUSD.5m"
    until(lambda: any(e["kind"] == "unhealthy" for e in m.events(wid)), 30, lambda: m.events(wid))
    until(lambda: "unhealthy" in (m.instances()[wid]["reason"] or ""), 10, lambda: m.instances())
    assert m.instances()[wid]["state"] == "RUNNING"  # unhealthy is reported, not acted on
    assert m.stop() == 0
