"""Issue 9's "done when", end to end: `start --env local-integration --mode live` (the manager, its
live workers and its recorder) plus `feed` produce signals that `consume` shows per client; `status`
shows the workers RUNNING; a worker killed with SIGKILL is restarted by the manager and resumes from
its Redis checkpoint; after `stop` the store holds exactly the decisions the streams carried.

Real processes against a private redis-server; mock inference (model cards only) and short process
intervals from the private root's YAML."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import polars as pl
import pytest
import yaml
from polars.testing import assert_frame_equal

from signalgen.config.loader import load_config
from signalgen.brokers.redis import connect
from tests.integration.redis.helpers import KEYS, REPO, streamed, wait_for

pytestmark = pytest.mark.integration  # a private redis-server, a manager and its worker processes

FAST = {"heartbeat_interval_s": 0.2, "heartbeat_threshold_s": 10.0, "backoff_initial_s": 0.2,
        "backoff_max_s": 2.0, "stop_timeout_s": 10.0, "resource_sample_s": 0.5, "max_recovery_attempts": 3, "nice": 10}
PASSWORDS = {"ODUM_REDIS_PASSWORD": "odum-pw-1", "BEA_REDIS_PASSWORD": "bea-pw-2"}
ODUM_SOL = "odum.momentum_v1.SOLUSD.5m"


def client_yaml(client: str, symbols: list[str]) -> str:
    """An internal-routing client with its own Redis password variable (one 5m strategy)."""
    return yaml.safe_dump({
        "id": client, "routing": "internal", "redis_password_env": f"{client.upper()}_REDIS_PASSWORD",
        "strategies": [{"id": "momentum_v1", "symbols": symbols, "timeframes": ["5m"],
                        "models": [{"model_id": "swing_high", "confidence_threshold": 0.55, "lookback_window": 60},
                                   {"model_id": "swing_low", "confidence_threshold": 0.55,
                                    "lookback_window": 60}]}]}, sort_keys=False)


@pytest.fixture
def live_root(tmp_path: Path, registry_dir: Path, redis_server) -> Path:
    """Two clients, four workers; local-integration at the private server with short intervals."""
    root = tmp_path / "root"
    root.mkdir()
    for folder in ("environments", "modes"):
        subprocess.run(["cp", "-r", str(REPO / folder), str(root / folder)], check=True)
    (root / "registry").symlink_to(registry_dir)
    (root / "clients").mkdir()
    (root / "clients" / "odum.yaml").write_text(client_yaml("odum", ["BTCUSD", "SOLUSD"]))
    (root / "clients" / "bea.yaml").write_text(client_yaml("bea", ["BTCUSD", "ETHUSD"]))
    env_file = root / "environments" / "local-integration.yaml"
    env = yaml.safe_load(env_file.read_text())
    env["messaging"]["url"] = redis_server.url
    env["messaging"]["max_ahead_s"] = 86_400.0  # `feed --speed 3000` runs bar time ahead of the wall clock
    env["process"] = {**env["process"], **FAST}
    env_file.write_text(yaml.safe_dump(env, sort_keys=False))
    return root


def cli(root: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, **PASSWORDS, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "strategy_runner.py"), *args, "--env", "local-integration",
                           "--root", str(root)], cwd=root, capture_output=True, text=True, timeout=timeout, env=env)


def start_live(root: Path) -> subprocess.Popen:
    """`start --mode live` of `root`'s local-integration (mock inference), its output in manager.out."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with (root / "manager.out").open("ab") as out:
        return subprocess.Popen([sys.executable, str(REPO / "strategy_runner.py"), "start", "--env",
                                 "local-integration", "--mode", "live", "--inference", "mock", "--root", str(root)],
                                cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)


def workers(root: Path) -> dict[str, dict]:
    proc = cli(root, "status", "--output", "json")
    assert proc.returncode in (0, 3), proc.stderr  # 3: a worker in BACKOFF (after the kill), or no manager
    return {w["worker"]: w for w in json.loads(proc.stdout)["workers"]}


def niceness(pid: int, *, main_thread: bool = False) -> set[int]:
    """The CPU niceness of each thread of `pid`, or of its main thread (field 19 of /proc/.../stat)."""
    tasks = [Path(f"/proc/{pid}")] if main_thread else list(Path(f"/proc/{pid}/task").iterdir())
    return {int((task / "stat").read_text().rsplit(")", 1)[1].split()[16]) for task in tasks}


def decided_bars(frames: tuple[pl.DataFrame, pl.DataFrame]) -> pl.DataFrame:
    """(worker key, bar_time) of every decision, signals and rejections together."""
    key = ["client_id", "strategy_id", "symbol", "timeframe", "bar_time"]
    return pl.concat([f.select(key) for f in frames])


def test_start_live_feed_consume_kill_and_stop(live_root: Path, redis_server) -> None:
    root = live_root
    for client in ("odum", "bea"):
        proc = cli(root, "clients", "grant", "--client", client)
        assert proc.returncode == 0, proc.stderr
        assert f"signalgen-{client}:***@" in proc.stdout
    log = root / "manager.out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log.open("ab") as out:
        manager = subprocess.Popen([sys.executable, str(REPO / "strategy_runner.py"), "start", "--env",
                                    "local-integration", "--mode", "live", "--inference", "mock", "--root", str(root)],
                                   cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    feeder = None
    try:
        wait_for(lambda: len(w := workers(root)) == 4 and all(x["state"] == "RUNNING" for x in w.values()), 120,
                 "4 RUNNING live workers", interval=0.5)
        # the workers run process.nice (10) steps below the manager, every thread
        assert [niceness(w["pid"]) for w in workers(root).values()] == [{10}] * 4
        assert niceness(manager.pid, main_thread=True) == {0}
        assert 10 in niceness(manager.pid)  # the recorder's thread: background priority, as the workers
        # 80 bars that already ended (history; the older ones are stale_data on the wall clock), then
        # 100 bars paced at 10 bars per wall second (5m bars at speed 3000) for every series
        feeder = subprocess.Popen([sys.executable, str(REPO / "strategy_runner.py"), "feed", "--env",
                                   "local-integration", "--root", str(root), "--source", "synthetic", "--speed",
                                   "3000", "--backfill", "80", "--bars", "180"],
                                  cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        cfg = load_config("local-integration", "live", root=root)
        r = connect(cfg)
        sol = KEYS.bars("SOLUSD", "5m")

        def checkpoint_of(worker: str):
            raw = r.hget(KEYS.checkpoints("live"), worker)
            return raw and raw.decode()

        # mid-run: once SOLUSD has fresh bars flowing and odum's worker holds a checkpoint, kill it
        wait_for(lambda: r.xlen(sol) >= 100 and checkpoint_of(ODUM_SOL), 60, "bars flowing and a checkpoint")
        before = workers(root)[ODUM_SOL]
        os.kill(before["pid"], signal.SIGKILL)
        wait_for(lambda: (w := workers(root)[ODUM_SOL])["restarts"] == 1 and w["state"] == "RUNNING"
                 and w["pid"] != before["pid"], 60, "the killed worker restarted and RUNNING", interval=0.3)
        out, err = feeder.communicate(timeout=120)
        assert feeder.returncode == 0, err
        assert "published 540 bars" in out  # 3 series (BTCUSD is shared) x 180 bars
        last_bar = r.xrevrange(sol, count=1)[0][1][b"bar_time"].decode()
        # every worker has decided its stream's last bar
        wait_for(lambda: all(checkpoint_of(w) and checkpoint_of(w).startswith(last_bar[:19]) for w in workers(root)),
                 60, "every checkpoint at the last bar", interval=0.3)
        status = workers(root)
        assert all(w["state"] == "RUNNING" for w in status.values()), status
        assert status[ODUM_SOL]["restarts"] == 1 and all(
            w["restarts"] == 0 for wid, w in status.items() if wid != ODUM_SOL)

        # each client reads its own signals only, with its own ACL user
        odum = streamed(r, "live", "odum")
        assert odum[0].height > 5, "too few odum signals to prove anything"
        proc = cli(root, "consume", "--client", "odum", "--from-start", "--format", "json", "--max",
                   str(odum[0].height), "--idle-exit", "5")
        assert proc.returncode == 0, proc.stderr
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        assert len(lines) == odum[0].height
        assert {x["client_id"] for x in lines} == {"odum"} and {x["mode"] for x in lines} == {"live"}
        assert sorted(x["signal_id"] for x in lines) == sorted(odum[0]["signal_id"].to_list())
        proc = cli(root, "consume", "--client", "bea", "--from-start", "--format", "json", "--idle-exit", "3")
        assert proc.returncode == 0, proc.stderr
        assert {json.loads(line)["client_id"] for line in proc.stdout.splitlines()} == {"bea"}

        proc = cli(root, "stop")
        assert proc.returncode == 0, proc.stderr
        assert manager.wait(timeout=60) == 0
    finally:
        for p in (feeder, manager):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
    text = log.read_text()
    assert "manager stopped" in text, text[-3000:]

    # the streams: every bar of each worker's series decided exactly once (none lost to the kill,
    # none duplicated by the restart)
    bar_times = {sym: {f[b"bar_time"].decode() for _, f in r.xrange(KEYS.bars(sym, "5m"))}
                 for sym in ("BTCUSD", "SOLUSD", "ETHUSD")}
    carried = {c: streamed(r, "live", c) for c in ("odum", "bea")}
    for client, symbols in (("odum", ("BTCUSD", "SOLUSD")), ("bea", ("BTCUSD", "ETHUSD"))):
        decided = decided_bars(carried[client])
        assert decided.height == decided.unique().height, f"{client}: a bar decided twice"
        for sym in symbols:
            times = decided.filter(pl.col("symbol") == sym)["bar_time"]
            got = {t.strftime("%Y-%m-%dT%H:%M:%S.%fZ") for t in times}
            assert got == bar_times[sym], f"{client} {sym}: {len(bar_times[sym] - got)} bars not decided"
        for frame, id_col in zip(carried[client], ("signal_id", "rejection_id")):
            assert frame[id_col].n_unique() == frame.height
    # the restarted worker's decisions came after its own (the kill lost nothing, repeated nothing)
    assert workers(root)[ODUM_SOL]["state"] == "STOPPED"

    # the store (written only by the manager's recorder) holds exactly what the streams carried
    with duckdb.connect(str(root / "var/local-integration/signalgen.duckdb"), read_only=True) as con:
        con.execute("SET TimeZone = 'UTC'")
        for table, id_col, i in (("signals", "signal_id", 0), ("rejections", "rejection_id", 1)):
            got = con.sql(f"SELECT * FROM {table} WHERE mode = 'live' ORDER BY {id_col}").pl()
            want = pl.concat([carried[c][i] for c in ("odum", "bea")])
            assert got.height == want.height, f"{table}: stored {got.height}, streamed {want.height}"
            got = got.with_columns(pl.col(id_col).cast(pl.String))
            cols = [c for c in want.columns if c not in ("models",)]
            assert_frame_equal(got.select(cols).sort(id_col), want.select(cols).sort(id_col), check_dtypes=False,
                               check_exact=True)
        runs = con.sql("SELECT mode, status, bars, signals, rejections, elapsed_s FROM runs").fetchall()
    assert runs and runs[-1][:2] == ("live", "stopped") and runs[-1][2] == sum(
        carried[c][0].height + carried[c][1].height for c in carried)
    # the live run's counts and duration, as `runs list` shows them
    assert runs[-1][3:5] == (sum(carried[c][0].height for c in carried), sum(carried[c][1].height for c in carried))
    assert runs[-1][5] > 10
    # the mode is a namespace: nothing was written under another mode's keys (`clients grant` creates a
    # client's streams of every mode, empty)
    assert not [k for k in r.keys("signalgen:*") if not k.startswith((b"signalgen:live:", b"signalgen:bars:"))
                and r.xlen(k)]


def test_a_bad_redis_url_or_password_is_exit_2_naming_the_field(live_root: Path, tmp_path: Path) -> None:
    """`start` (the recorder connects first): exit 2, never a retry loop. A live worker process alone,
    whose Redis does not answer, waits for it (a transient failure: its manager reached Redis), and
    leaves when asked."""
    import multiprocessing

    from signalgen.config.workers import worker_specs
    from signalgen.process.worker import WorkerArgs, worker_process
    from tests.integration.redis.servers import RedisServer

    env_file = live_root / "environments" / "local-integration.yaml"
    env = yaml.safe_load(env_file.read_text())
    locked = RedisServer(tmp_path / "locked", extra=("--requirepass", "right")).start()
    try:
        env["messaging"]["url"] = locked.url
        env["messaging"]["password_env"] = "SIGNALGEN_REDIS_PASSWORD"
        env_file.write_text(yaml.safe_dump(env, sort_keys=False))
        proc = subprocess.run([sys.executable, str(REPO / "strategy_runner.py"), "start", "--env", "local-integration",
                               "--mode", "live", "--inference", "mock", "--root", str(live_root)], cwd=live_root,
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(REPO), "SIGNALGEN_REDIS_PASSWORD": "wrong"})
        assert proc.returncode == 2, proc.stderr
        assert "messaging.password_env" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        locked.stop()

    env["messaging"]["url"] = f"redis://127.0.0.1:{locked.port}/0"  # nothing listens there now
    env["messaging"].pop("password_env")
    env_file.write_text(yaml.safe_dump(env, sort_keys=False))
    cfg = load_config("local-integration", "live", root=live_root)
    spec = worker_specs(cfg)[0]
    log = tmp_path / "worker.log"
    args = WorkerArgs(spec=spec, cfg=cfg, writer_address="", authkey=b"", control_path=str(tmp_path / "c.sqlite"),
                      log_path=str(log), heartbeat_interval_s=0.2, run_id="r")
    worker = multiprocessing.get_context("fork").Process(target=worker_process, args=(args,))
    worker.start()
    wait_for(lambda: log.exists() and "cannot reach Redis" in log.read_text(), 30, "the worker waiting for Redis")
    worker.join(3)
    assert worker.exitcode is None  # waiting, not FATAL (it exited 2 before: a server away is no config error)
    assert log.read_text().count("cannot reach Redis") == 1  # one line for the outage, not one per retry
    os.kill(worker.pid, signal.SIGTERM)
    worker.join(30)
    assert worker.exitcode == 75  # TransientError: stopped while the sink was away


def test_a_client_added_by_reload_is_recorded(live_root: Path, redis_server) -> None:
    """`reload` adds bea's workers to a running live manager; the manager's recorder reads bea's
    streams from then on, so bea's decisions reach the store like everyone else's."""
    from datetime import datetime, timedelta, timezone

    from signalgen.data.redis_bars import publish_bars
    from signalgen.data.synthetic import synthetic_bars

    root = live_root
    bea = (root / "clients" / "bea.yaml").read_text()
    (root / "clients" / "bea.yaml").unlink()
    manager = start_live(root)
    try:
        wait_for(lambda: len(w := workers(root)) == 2 and all(x["state"] == "RUNNING" for x in w.values()), 120,
                 "odum's 2 RUNNING live workers", interval=0.5)
        (root / "clients" / "bea.yaml").write_text(bea)
        proc = cli(root, "reload")
        assert proc.returncode == 0, proc.stderr
        wait_for(lambda: len(w := workers(root)) == 4 and all(x["state"] == "RUNNING" for x in w.values()), 120,
                 "bea's workers RUNNING after the reload", interval=0.5)
        cfg = load_config("local-integration", "live", root=root)
        r = connect(cfg)
        end = datetime.now(timezone.utc).replace(second=0, microsecond=0)
        eth = synthetic_bars(["ETHUSD"], "5m", end - timedelta(minutes=5 * 150), end, 11)
        publish_bars(r, [eth], keys=KEYS)
        last = eth["bar_time"][-1].isoformat()[:19]
        wait_for(lambda: (raw := r.hget(KEYS.checkpoints("live"), "bea.momentum_v1.ETHUSD.5m")) is not None
                 and raw.decode().startswith(last), 60, "bea's ETHUSD worker at the last bar", interval=0.3)
        proc = cli(root, "stop")
        assert proc.returncode == 0, proc.stderr
        assert manager.wait(timeout=60) == 0
    finally:
        if manager.poll() is None:
            manager.send_signal(signal.SIGTERM)
            manager.wait(timeout=30)
    carried = streamed(r, "live", "bea")
    assert carried[0].height + carried[1].height >= 100
    with duckdb.connect(str(root / "var/local-integration/signalgen.duckdb"), read_only=True) as con:
        stored = [con.execute(f"SELECT count(*) FROM {t} WHERE client_id = 'bea' AND mode = 'live'").fetchone()[0]
                  for t in ("signals", "rejections")]
    assert stored == [carried[0].height, carried[1].height]
