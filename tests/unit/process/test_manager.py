"""StrategyProcessManager with real processes: a manager subprocess (`start`, or `run_manager` below with
a stand-in worker target), real forkserver workers, the real control store, commands as raw SQL rows.

Intervals are shortened through the environment YAML of a private root; inference is mock (models are
not the point here). Functions that run in child processes live at module level.
"""

from __future__ import annotations

import json
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
FAST = {"heartbeat_interval_s": 0.2, "heartbeat_threshold_s": 30.0, "backoff_initial_s": 0.2,
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


def idle_worker(args) -> None:
    """Ready heartbeats until SIGTERM; no death signal of its own (the manager's worker_entry arms one)."""
    import threading

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(0.2):
        _beat(args)
    sys.exit(0)


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


def test_forkserver_and_workers_die_with_a_manager_killed_by_sigkill(tmp_path: Path, managers) -> None:
    # the forkserver stays up while any child holds its "alive" pipe: worker_entry closes the
    # worker's copy, so the forkserver exits with the manager and the death signal kills the workers
    root = make_root(tmp_path, {"odum": client_yaml("odum", ["BTCUSD", "SOLUSD", "ETHUSD"])})
    m = start(managers, root, target="idle_worker")
    m.wait_states("RUNNING", count=3)
    tree = psutil.Process(m.pid).children(recursive=True)
    assert set(pids(m).values()) <= {p.pid for p in tree}
    m.kill()
    until(lambda: all(gone(p.pid) for p in tree), 10,
          lambda: [(p.pid, p.cmdline()[-1][:80]) for p in tree if not gone(p.pid)])


def test_exit_two_goes_fatal_without_restart(tmp_path: Path, managers) -> None:
    root = make_root(tmp_path, {"odum": client_yaml("odum", ["BTCUSD", "SOLUSD"])})
    m = start(managers, root, target="exit_two")
    rows = m.wait_states("FATAL", timeout=60, count=2)
    time.sleep(1.5)  # several backoff periods (0.2 s): nothing restarts
    rows = m.instances()
    assert all(r["state"] == "FATAL" and r["restarts"] == 0 and r["exit_code"] == 2 for r in rows.values()), rows
    for wid in rows:
        assert sum(e["kind"] == "failure" for e in m.events(wid)) == 1
        # every state change is an event of the worker's state object, kept in the control store
        changes = [json.loads(e["detail"]) for e in m.events(wid) if e["kind"] == "state"]
        assert [(c["from"], c["to"], c["exit_code"]) for c in changes] == [("STOPPED", "STARTING", None),
                                                                         ("STARTING", "FATAL", 2)]
        assert changes[1]["reason"] == "exit code 2" and changes[0]["pid"] == changes[1]["pid"] is not None
    assert m.proc.poll() is None  # the manager lives on
    proc = cli(root, "status")
    assert proc.returncode == 3 and proc.stdout.count("FATAL") == 2  # a worker is not as it should be
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


# ---------------------------------------------------------------- tests: real workers (`start`)

ODUM_BTC, ODUM_SOL = "odum.momentum_v1.BTCUSD.5m", "odum.momentum_v1.SOLUSD.5m"
BEA_BTC, BEA_ETH = "bea.momentum_v1.BTCUSD.5m", "bea.momentum_v1.ETHUSD.5m"


@pytest.fixture
def two_clients(tmp_path: Path) -> Path:
    """odum and bea, two workers each."""
    return make_root(tmp_path, {"odum": client_yaml("odum", ["BTCUSD", "SOLUSD"]),
                                "bea": client_yaml("bea", ["BTCUSD", "ETHUSD"])})


def pids(m: Manager) -> dict[str, int]:
    return {w: r["pid"] for w, r in m.instances().items()}


def test_start_runs_one_process_per_worker_and_sigterm_stops_them_all(two_clients: Path, managers) -> None:
    m = start(managers, two_clients)
    rows = m.wait_states("RUNNING", count=4)
    assert sorted(rows) == sorted([ODUM_BTC, ODUM_SOL, BEA_BTC, BEA_ETH])
    tree = {p.pid for p in psutil.Process(m.pid).children(recursive=True)}
    workers = pids(m)
    assert len(set(workers.values())) == 4 and set(workers.values()) <= tree
    assert all(psutil.pid_exists(p) for p in workers.values())
    until(lambda: all(m.heartbeat(w).get("ready") for w in workers), 30, "ready heartbeats")
    assert m.stop() == 0
    assert all(gone(p) for p in workers.values())
    assert set(m.states().values()) == {"STOPPED"}


def test_pause_and_resume_through_inserted_rows(two_clients: Path, managers) -> None:
    # a paused worker's heartbeat goes stale (threshold 1 s): that must not get it killed
    root = two_clients
    env_file = root / "environments" / "local-dev.yaml"
    env = yaml.safe_load(env_file.read_text())
    env["process"]["heartbeat_threshold_s"] = 1.0
    env_file.write_text(yaml.safe_dump(env))
    m = start(managers, root)
    m.wait_states("RUNNING", count=4)
    before = pids(m)
    row = m.command(m.submit("pause", "odum.*"))
    assert row["status"] == "completed", row
    assert sorted(yaml.safe_load(row["result_json"])["workers"]) == [ODUM_BTC, ODUM_SOL]
    assert m.states()[ODUM_BTC] == "PAUSED" and m.states()[BEA_BTC] == "RUNNING"
    assert psutil.Process(before[ODUM_BTC]).status() == psutil.STATUS_STOPPED
    time.sleep(2.5)  # more than the heartbeat threshold
    assert m.states()[ODUM_BTC] == "PAUSED" and pids(m) == before
    assert m.command(m.submit("resume", ODUM_BTC))["status"] == "completed"
    m.wait_states({ODUM_BTC: "RUNNING", ODUM_SOL: "PAUSED"}, timeout=20)
    assert pids(m) == before  # the same processes, continued
    assert psutil.Process(before[ODUM_BTC]).status() != psutil.STATUS_STOPPED
    assert m.stop() == 0  # a paused worker is continued to stop: nothing left behind
    assert all(gone(p) for p in before.values())


def test_unknown_worker_or_command_fails_its_row_and_the_manager_lives_on(two_clients: Path, managers) -> None:
    m = start(managers, two_clients)
    m.wait_states("RUNNING", count=4)
    row = m.command(m.submit("pause", "nobody.*"))
    assert row["status"] == "failed" and "no worker matches 'nobody.*'" in row["result_json"], row
    row = m.command(m.submit("explode", ODUM_BTC))
    assert row["status"] == "failed" and "unknown command 'explode'" in row["result_json"], row
    row = m.command(m.submit("restart", None))
    assert row["status"] == "failed" and "needs a worker id" in row["result_json"], row
    assert m.proc.poll() is None and set(m.states().values()) == {"RUNNING"}
    assert m.stop() == 0


def test_reload_starts_stops_and_restarts_exactly_the_changed_workers(two_clients: Path, managers) -> None:
    root = two_clients
    m = start(managers, root)
    m.wait_states("RUNNING", count=4)
    before, hashes = pids(m), {w: r["config_hash"] for w, r in m.instances().items()}
    # odum: SOLUSD removed, ETHUSD added, BTCUSD untouched; bea: a threshold changed (both workers)
    (root / "clients" / "odum.yaml").write_text(client_yaml("odum", ["BTCUSD", "ETHUSD"]))
    (root / "clients" / "bea.yaml").write_text(client_yaml("bea", ["BTCUSD", "ETHUSD"], threshold=0.65))
    row = m.command(m.submit("reload"))
    assert row["status"] == "completed", row
    result = yaml.safe_load(row["result_json"])
    assert result == {"started": ["odum.momentum_v1.ETHUSD.5m"], "stopped": [ODUM_SOL],
                      "restarted": [BEA_BTC, BEA_ETH], "unchanged": 1}
    until(lambda: ODUM_SOL not in m.instances(), 30, lambda: m.instances())
    rows = m.wait_states("RUNNING", count=4)
    after = pids(m)
    assert after[ODUM_BTC] == before[ODUM_BTC]  # untouched: same process
    assert after[BEA_BTC] != before[BEA_BTC] and after[BEA_ETH] != before[BEA_ETH]
    assert gone(before[ODUM_SOL]) and gone(before[BEA_BTC])
    assert rows[BEA_BTC]["config_hash"] != hashes[BEA_BTC] and rows[ODUM_BTC]["config_hash"] == hashes[ODUM_BTC]
    assert m.stop() == 0


def test_reload_with_invalid_yaml_fails_and_changes_nothing(two_clients: Path, managers) -> None:
    root = two_clients
    m = start(managers, root)
    m.wait_states("RUNNING", count=4)
    before = pids(m)
    (root / "clients" / "bea.yaml").write_text(client_yaml("bea", ["BTCUSD"]).replace("threshold", "treshold"))
    row = m.command(m.submit("reload"))
    assert row["status"] == "failed", row
    assert "bea.yaml" in row["result_json"] and "treshold" in row["result_json"]
    time.sleep(1.0)
    assert pids(m) == before and set(m.states().values()) == {"RUNNING"}
    assert m.stop() == 0


def test_reload_of_a_recovery_policy_keeps_the_process_and_applies_the_policy(tmp_path: Path, managers) -> None:
    root = make_root(tmp_path, {"odum": client_yaml("odum", ["BTCUSD"])})
    m = start(managers, root)
    m.wait_states("RUNNING", count=1)
    first = pids(m)[ODUM_BTC]
    (root / "clients" / "odum.yaml").write_text(client_yaml("odum", ["BTCUSD"], recovery="pause"))
    row = m.command(m.submit("reload"))
    assert row["status"] == "completed", row
    assert yaml.safe_load(row["result_json"]) == {"started": [], "stopped": [], "restarted": [], "unchanged": 1}
    assert pids(m)[ODUM_BTC] == first
    os.kill(first, signal.SIGKILL)
    rows = m.wait_states({ODUM_BTC: "PAUSED"}, timeout=20)  # the new policy: parked, not restarted
    assert rows[ODUM_BTC]["pid"] is None
    assert m.stop() == 0


def test_recovery_policy_pause_parks_a_crashed_worker_until_resume(tmp_path: Path, managers) -> None:
    root = make_root(tmp_path, {"odum": client_yaml("odum", ["BTCUSD"], recovery="pause")})
    m = start(managers, root)
    m.wait_states("RUNNING", count=1)
    first = pids(m)[ODUM_BTC]
    os.kill(first, signal.SIGKILL)
    rows = m.wait_states({ODUM_BTC: "PAUSED"}, timeout=20)
    assert rows[ODUM_BTC]["pid"] is None and "SIGKILL" in rows[ODUM_BTC]["reason"]
    assert m.command(m.submit("resume", ODUM_BTC))["status"] == "completed"
    rows = m.wait_states({ODUM_BTC: "RUNNING"}, timeout=30)
    assert rows[ODUM_BTC]["pid"] not in (None, first)
    assert m.stop() == 0


def test_manager_killed_with_sigkill_leaves_no_orphans(two_clients: Path, managers) -> None:
    m = start(managers, two_clients)
    m.wait_states("RUNNING", count=4)
    tree = psutil.Process(m.pid).children(recursive=True)  # the forkserver and the workers
    assert len(tree) >= 5
    m.kill()
    until(lambda: all(gone(p.pid) for p in tree), 10,
          lambda: [(p.pid, p.cmdline()) for p in tree if not gone(p.pid)])


def decisions(root: Path, client: str) -> tuple[dict, dict]:
    """bar_time -> what the client's worker decided (signals; rejections by reason), from the store."""
    from signalgen.config.loader import load_environment
    from signalgen.storage import store_for
    from signalgen.storage.reads import ReadQuery

    store = store_for(load_environment("local-dev", root=root), root)
    sig = store.read(ReadQuery(kind="signals", clients=(client,), modes=("mock",)))
    rej = store.read(ReadQuery(kind="rejections", clients=(client,), modes=("mock",)))
    assert sig["signal_id"].n_unique() == sig.height  # one row per signal id
    signals = {r["bar_time"]: (r["direction"], r["confidence"], r["strength"], r["weight"])
               for r in sig.iter_rows(named=True)}
    assert len(signals) == sig.height  # one signal per bar
    assert rej["rejection_id"].n_unique() == rej.height
    rejections = {r["bar_time"]: (tuple(r["reasons"]), r["direction"], r["confidence"])
                  for r in rej.iter_rows(named=True)}
    assert len(rejections) == rej.height  # one rejected candidate per bar
    return signals, rejections


def test_worker_killed_with_sigkill_restarts_and_loses_or_duplicates_no_signal(tmp_path: Path, managers) -> None:
    # odum and bea run the same strategy on the same symbol: bea's uninterrupted worker is the
    # reference for the bars odum's worker decides around three kill -9s
    root = make_root(tmp_path, {"odum": client_yaml("odum", ["BTCUSD"]), "bea": client_yaml("bea", ["BTCUSD"])},
                     mock_bar_interval_s=0.02, backoff_initial_s=0.3)
    m = start(managers, root)
    m.wait_states("RUNNING", count=2)
    pid = pids(m)[ODUM_BTC]
    for _ in range(3):
        until(lambda: (m.heartbeat(ODUM_BTC).get("signals") or 0) > 0, 30, "signals before the kill")
        os.kill(pid, signal.SIGKILL)
        m.wait_states({ODUM_BTC: "BACKOFF"}, timeout=10)
        m.wait_states({ODUM_BTC: "RUNNING"}, timeout=30)
        assert pids(m)[ODUM_BTC] != pid
        pid = pids(m)[ODUM_BTC]
    checkpoint = m.heartbeat(ODUM_BTC)["checkpoint"]
    until(lambda: (m.heartbeat(ODUM_BTC).get("checkpoint") or "") > checkpoint, 30, "progress after restarts")
    assert m.instances()[ODUM_BTC]["restarts"] == 3 and m.instances()[BEA_BTC]["restarts"] == 0
    assert m.stop() == 0
    killed, reference = decisions(root, "odum"), decisions(root, "bea")
    times = set(killed[0]) | set(killed[1])
    ref_times = set(reference[0]) | set(reference[1])
    common = (max(min(times), min(ref_times)), min(max(times), max(ref_times)))
    assert common[1] > common[0]
    for got, want in zip(killed, reference):
        got = {t: v for t, v in got.items() if common[0] <= t <= common[1]}
        want = {t: v for t, v in want.items() if common[0] <= t <= common[1]}
        assert got == want
    assert sum(1 for t in reference[0] if common[0] <= t <= common[1]) > 0  # signals were compared
    # the internal stream got each of odum's signals once
    from signalgen.outputs.local import read_stream

    stream = read_stream(root / "var" / "local-dev" / "stream" / "mock" / "odum.jsonl", dedupe=False)
    assert stream["signal_id"].n_unique() == stream.height and stream.height == len(killed[0])
