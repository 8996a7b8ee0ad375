"""Benchmark: a fleet of streaming mock workers under one StrategyProcessManager.

Starts `python strategy_runner.py start --inference mock` on a private root with N workers (clients
of 10 symbols each, one strategy of two models, one bar per second per worker) and measures:

- time from `start` until every worker is RUNNING (ready heartbeat), and how that grows;
- private memory (USS) per worker, median and p90, read with psutil from the processes themselves;
- the idle fleet's CPU: the CPU time of the manager (with its writer), the forkserver and every
  worker over a window, as % of one core;
- time from `kill -9` of a worker to RUNNING again (includes the first backoff, backoff_initial_s);
- time from an inserted `strategy_commands` row (pause / resume) to its effect (the process is
  SIGSTOPped / running again) and to the row's result;
- the cost of metrics: the manager's CPU over windows without and with a scrape of its `/metrics`
  every 15 s (alternating, in the same run), each scrape's time and size (series).

Prints the figures; `--write` also puts them and the command into docs/benchmarks.md (section
`## Fleet`, between markers).

    python bench/fleet.py --write            # 500 workers: the documented run
    python bench/fleet.py --workers 50
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
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from historical import machine, write_section  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- bench/fleet.py:begin -->", "<!-- bench/fleet.py:end -->"
SYMBOLS_PER_CLIENT = 10


def setup(root: Path, workers: int, process: dict) -> list[str]:
    """A root with `workers` workers: clients c000, c001, ... of up to 10 symbols each. Returns the ids."""
    for layer in ("environments", "modes"):
        subprocess.run(["cp", "-r", str(ROOT / layer), str(root / layer)], check=True)
    (root / "registry").symlink_to(ROOT / "registry")
    (root / "clients").mkdir()
    env_file = root / "environments" / "local-dev.yaml"
    env = yaml.safe_load(env_file.read_text())
    env["process"] = {**env.get("process", {}), **process}
    env["log_level"] = "WARNING"
    env_file.write_text(yaml.safe_dump(env, sort_keys=False))
    ids = []
    for c in range((workers + SYMBOLS_PER_CLIENT - 1) // SYMBOLS_PER_CLIENT):
        n = min(SYMBOLS_PER_CLIENT, workers - c * SYMBOLS_PER_CLIENT)
        symbols = [f"S{c:03d}X{i}" for i in range(n)]
        client = {"id": f"c{c:03d}", "routing": "internal",
                  "strategies": [{"id": "fleet_v1", "symbols": symbols, "timeframes": ["5m"],
                                  "models": [{"model_id": "swing_high", "confidence_threshold": 0.6},
                                             {"model_id": "swing_low", "confidence_threshold": 0.6}]}]}
        (root / "clients" / f"c{c:03d}.yaml").write_text(yaml.safe_dump(client, sort_keys=False))
        ids += [f"c{c:03d}.fleet_v1.{s}.5m" for s in symbols]
    return ids


class Control:
    def __init__(self, path: Path) -> None:
        self.path = path

    def rows(self, sql: str, *args) -> list[tuple]:
        if not self.path.exists():
            return []
        try:
            with sqlite3.connect(self.path, timeout=10) as con:
                return con.execute(sql, args).fetchall()
        except sqlite3.OperationalError:
            return []

    def states(self) -> dict[str, tuple[str, int | None]]:
        return {w: (s, p) for w, s, p in self.rows("SELECT id, state, pid FROM strategy_instances")}

    def bar_times(self) -> dict[str, float]:
        """worker id -> epoch seconds of the last bar it decided (from its heartbeat)."""
        out = {}
        for w, t in self.rows("SELECT worker_id, last_bar_time FROM heartbeats WHERE last_bar_time IS NOT NULL"):
            out[w] = datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()
        return out

    def submit(self, command: str, target: str) -> int:
        with sqlite3.connect(self.path, timeout=10) as con:
            return con.execute("INSERT INTO strategy_commands (strategy_id, command) VALUES (?, ?)",
                               (target, command)).lastrowid

    def status(self, cid: int) -> str:
        return self.rows("SELECT status FROM strategy_commands WHERE id = ?", cid)[0][0]


def wait_for(predicate, timeout: float, poll: float = 0.05) -> float | None:
    """Seconds until `predicate()` is true, or None after `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(poll)
    return None


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of `pid` and its descendants now alive."""
    total = 0.0
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def uss_mb(pids: list[int]) -> list[float]:
    out = []
    for pid in pids:
        try:
            out.append(psutil.Process(pid).memory_full_info().uss / 2**20)
        except psutil.NoSuchProcess:
            pass
    return out


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def metrics_cost(pid: int, url: str, *, window: float, pairs: int, interval: float = 15.0) -> dict:
    """The manager's CPU (% of one core) over `pairs` windows without and with a scrape of `url` every
    `interval` seconds, alternating (so a drift of the load hits both alike); each scrape's wall time, the
    manager's CPU during it beyond its rate without scraping, and the size of the answer."""
    import urllib.request

    off, on, took, cpu, size = [], [], [], [], (0, 0)
    for _ in range(pairs):
        c0, t0 = cpu_s(pid), time.monotonic()
        time.sleep(window)
        off.append((cpu_s(pid) - c0) / (time.monotonic() - t0))
        c0, t0 = cpu_s(pid), time.monotonic()
        due = t0
        while due < t0 + window:
            time.sleep(max(0.0, due - time.monotonic()))
            s0, w0 = cpu_s(pid), time.perf_counter()
            with urllib.request.urlopen(url, timeout=60) as r:
                body = r.read()
            spent = time.perf_counter() - w0
            took.append(spent)
            cpu.append(cpu_s(pid) - s0 - off[-1] * spent)
            size = (len(body), sum(1 for line in body.splitlines() if line and not line.startswith(b"#")))
            due += interval
        time.sleep(max(0.0, t0 + window - time.monotonic()))
        on.append((cpu_s(pid) - c0) / (time.monotonic() - t0))
    base, scraped = statistics.mean(off), statistics.mean(on)
    return {"window_s": window, "pairs": pairs, "interval_s": interval,
            "manager_cpu_pct_without": round(100 * base, 1), "manager_cpu_pct_with": round(100 * scraped, 1),
            "added_cpu_pct": round(100 * (scraped - base) / base, 1) if base else None,
            "windows_without": [round(100 * x, 1) for x in off], "windows_with": [round(100 * x, 1) for x in on],
            "scrape_ms": {"median": round(1000 * statistics.median(took)), "max": round(1000 * max(took))},
            "scrape_cpu_ms": {"median": round(1000 * statistics.median(cpu)), "max": round(1000 * max(cpu))},
            "scrapes": len(took), "bytes": size[0], "samples": size[1]}


def heartbeat_worker(args) -> None:
    """A worker process without the pipeline: ready heartbeats every heartbeat_interval_s until SIGTERM.
    With `--heartbeats-only` the fleet measures the supervision alone (manager, forkserver, control store)."""
    import threading

    from signalgen.storage.control import ControlStore

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    store = ControlStore(args.control_path)
    while True:
        store.heartbeat(args.spec.id, pid=os.getpid(), state="RUNNING", last_bar_time=None, checkpoint=None,
                        signals=0, rejections=0, errors=0, ready=True)
        if stop.wait(args.heartbeat_interval_s):
            sys.exit(0)


def heartbeat_manager(root: str) -> None:
    """A manager over `root` whose workers run `heartbeat_worker`."""
    from signalgen.config.loader import Overrides, load_config
    from signalgen.config.workers import worker_specs
    from signalgen.logs import configure
    from signalgen.process.manager import StrategyProcessManager
    from signalgen.storage.control import ControlStore

    configure("WARNING")
    cfg = load_config("local-dev", "mock", root=root, overrides=Overrides(inference="mock"))
    manager = StrategyProcessManager(cfg, worker_specs(cfg), control=ControlStore.from_config(cfg),
                                     log_dir=Path(root) / "var" / "local-dev" / "logs", run_id="fleet-heartbeats",
                                     worker_target=heartbeat_worker)
    sys.exit(manager.run())


def bench(workers: int, *, window: float, settle: float, repeats: int, start_timeout: float,
          heartbeats_only: bool = False, metrics_window: float = 0.0, metrics_pairs: int = 2) -> dict:
    port = free_port()
    process = {"mock_bar_interval_s": 1.0, "heartbeat_interval_s": 2.0, "heartbeat_threshold_s": 30.0,
               "resource_sample_s": 5.0, "backoff_initial_s": 1.0, "metrics_port": port}
    with tempfile.TemporaryDirectory(prefix="fleet-") as tmp:
        root = Path(tmp)
        ids = setup(root, workers, process)
        control = Control(root / "var" / "local-dev" / "control.sqlite")
        out = open(root / "manager.out", "wb")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        t0 = time.monotonic()
        if heartbeats_only:
            cmd = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import fleet; "
                   "fleet.heartbeat_manager(sys.argv[1])", str(root)]
        else:
            cmd = [sys.executable, str(ROOT / "strategy_runner.py"), "start", "--root", str(root), "--inference", "mock"]
        manager = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
        result: dict = {"workers": workers, "heartbeats_only": heartbeats_only, "process": process}
        try:
            progress: list[tuple[float, int]] = []
            startup_cpu: dict[int, float] = {}  # pid -> CPU seconds when first seen RUNNING: its start-up

            def all_running() -> bool:
                states = control.states()
                n = sum(s == "RUNNING" for s, _ in states.values())
                for s, pid in states.values():
                    if s == "RUNNING" and pid and pid not in startup_cpu:
                        try:
                            t = psutil.Process(pid).cpu_times()
                            startup_cpu[pid] = t.user + t.system
                        except psutil.NoSuchProcess:
                            pass
                if not progress or progress[-1][1] != n:
                    progress.append((round(time.monotonic() - t0, 2), n))
                return n == workers

            took = wait_for(all_running, start_timeout, poll=0.2)
            result["all_running_s"] = None if took is None else round(time.monotonic() - t0, 1)
            result["running_progress"] = progress[:: max(1, len(progress) // 12)] + progress[-1:]
            if startup_cpu:  # includes the few bars decided before the poll saw it RUNNING (0.2 s polls)
                cpu = list(startup_cpu.values())
                result["startup_cpu_ms"] = {"median": round(1000 * statistics.median(cpu)),
                                            "p90": round(1000 * pct(cpu, 0.9))}
            if took is None:
                result["running_at_timeout"] = progress[-1][1] if progress else 0
                result["manager_tail"] = (root / "manager.out").read_text(errors="replace")[-2000:]
                return result
            time.sleep(settle)
            if not heartbeats_only:  # bars are counted per worker from its beats: wait until each has reported one
                wait_for(lambda: len(control.bar_times()) == workers, 60)
            pids = [p for s, p in control.states().values() if p]
            mem = uss_mb(pids)
            result["uss_mb"] = {"median": round(statistics.median(mem), 1), "p90": round(pct(mem, 0.9), 1),
                                "max": round(max(mem), 1)}
            manager_mem = psutil.Process(manager.pid).memory_full_info()
            result["manager_uss_mb"] = round(manager_mem.uss / 2**20, 1)
            c0, w0, b0 = tree_cpu(manager.pid), time.monotonic(), control.bar_times()
            m0 = psutil.Process(manager.pid).cpu_times()
            time.sleep(window)
            c1, w1, b1 = tree_cpu(manager.pid), time.monotonic(), control.bar_times()
            m1 = psutil.Process(manager.pid).cpu_times()
            # bars decided per second by the whole fleet (5m bars: 300 s of bar time each), against
            # the `workers` bars per second the pace asks for
            bars = sum((b1[w] - b0[w]) / 300 for w in b1 if w in b0)  # none with --heartbeats-only
            result["bars_per_s"] = round(bars / (w1 - w0), 1)
            result["idle_cpu_pct_of_one_core"] = round(100 * (c1 - c0) / (w1 - w0), 1)
            result["manager_cpu_pct_of_one_core"] = round(
                100 * ((m1.user + m1.system) - (m0.user + m0.system)) / (w1 - w0), 1)
            # the workers' (and forkserver's) share, per worker per second: at one bar per second,
            # the CPU of one bar plus a second of idle threads (heartbeat, parent watch, sink)
            result["worker_cpu_ms_per_s"] = round(
                (result["idle_cpu_pct_of_one_core"] - result["manager_cpu_pct_of_one_core"]) * 10 / workers, 2)
            if metrics_window:  # before the kills and commands: the same steady fleet
                result["metrics"] = metrics_cost(manager.pid, f"http://127.0.0.1:{port}/metrics",
                                                 window=metrics_window, pairs=metrics_pairs)
            # kill -9 -> RUNNING again
            recover = []
            for wid in ids[1:: max(1, workers // repeats)][:repeats]:
                pid = control.states()[wid][1]
                os.kill(pid, signal.SIGKILL)
                back = wait_for(lambda: control.states()[wid][0] == "RUNNING" and control.states()[wid][1] != pid,
                                60)
                recover.append(round(back if back is not None else float("nan"), 2))
            result["kill9_to_running_s"] = recover
            # command row -> effect
            effect, done = [], []
            for wid in ids[2:: max(1, workers // repeats)][:repeats]:
                pid = control.states()[wid][1]
                cid = control.submit("pause", wid)
                t = time.monotonic()
                e = wait_for(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, 30, poll=0.01)
                d = wait_for(lambda: control.status(cid) != "pending", 30, poll=0.01)
                effect.append(round(e, 3) if e is not None else None)
                done.append(round(time.monotonic() - t, 3) if d is not None else None)
                cid = control.submit("resume", wid)
                wait_for(lambda: psutil.Process(pid).status() != psutil.STATUS_STOPPED, 30, poll=0.01)
            result["command_to_effect_s"] = effect
            result["command_to_result_s"] = done
            # graceful stop of the whole fleet
            t = time.monotonic()
            manager.send_signal(signal.SIGTERM)
            manager.wait(300)
            result["sigterm_to_exit_s"] = round(time.monotonic() - t, 1)
            result["exit_code"] = manager.returncode
        finally:
            if manager.poll() is None:
                for p in psutil.Process(manager.pid).children(recursive=True):
                    p.kill()
                manager.kill()
            out.close()
    return result


def markdown(results: list[dict], command: str) -> str:
    now = datetime.now(timezone.utc)
    lines = [MARK_BEGIN, "## Fleet", "",
             f"Command: `{command}` — run on {now:%Y-%m-%d}, {machine()}.", "",
             "Streaming mock workers (one bar per second each, mock inference), forked from a preloaded "
             "forkserver, one writer in the manager, heartbeats every 2 s (sent on the writer connection, relayed into the SQLite control store).", "",
             "| workers | all RUNNING after start | start-up CPU per worker, median (p90) | USS per worker, median "
             "(p90) | manager USS | fleet CPU at 1 bar/s/worker (% of one core; manager alone) | CPU per worker "
             "per second | bars/s decided (asked) | kill -9 -> RUNNING | command row -> effect (-> result) | "
             "SIGTERM -> exit |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if r.get("all_running_s") is None:
            lines.append(f"| {r['workers']} | not within the timeout: {r.get('running_at_timeout')} RUNNING "
                         "| | | | | | | | | |")
            continue
        rate = "heartbeats only" if r.get("heartbeats_only") else f"{r['bars_per_s']:.0f} ({r['workers']})"
        k = r["kill9_to_running_s"]
        e = [x for x in r["command_to_effect_s"] if x is not None]
        d = [x for x in r["command_to_result_s"] if x is not None]
        su = r.get("startup_cpu_ms", {})
        lines.append(
            f"| {r['workers']} | {r['all_running_s']:.1f} s | {su.get('median', '-')} ms ({su.get('p90', '-')}) | "
            f"{r['uss_mb']['median']:.1f} MB "
            f"({r['uss_mb']['p90']:.1f}) | {r['manager_uss_mb']:.0f} MB | {r['idle_cpu_pct_of_one_core']:.0f}% "
            f"({r['manager_cpu_pct_of_one_core']:.0f}%) | {r['worker_cpu_ms_per_s']:.2f} ms | {rate} | "
            f"{min(k):.1f}-{max(k):.1f} s | {min(e):.2f}-{max(e):.2f} s ({min(d):.2f}-{max(d):.2f} s) | "
            f"{r['sigterm_to_exit_s']:.0f} s |")
    measured = [r for r in results if r.get("metrics")]
    if measured:
        lines += ["", "Metrics: the manager's CPU (% of one core) over windows without and with a scrape of its "
                  "`/metrics` every 15 s, alternating in the same run (targets: at most 5% added CPU, a scrape "
                  "under 1% of the interval, 150 ms).", "",
                  "| workers | manager CPU without | with scraping | added | scrape time, median (max) | manager "
                  "CPU per scrape, median (max) | answer |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in measured:
            m = r["metrics"]
            lines.append(
                f"| {r['workers']} | {m['manager_cpu_pct_without']:.1f}% ({', '.join(map(str, m['windows_without']))}) "
                f"| {m['manager_cpu_pct_with']:.1f}% ({', '.join(map(str, m['windows_with']))}) | "
                f"{m['added_cpu_pct']:+.1f}% | {m['scrape_ms']['median']} ms ({m['scrape_ms']['max']}) | "
                f"{m['scrape_cpu_ms']['median']} ms ({m['scrape_cpu_ms']['max']}) | {m['samples']:,} samples, "
                f"{m['bytes'] / 1024:.0f} KiB |")
    lines += ["", MARK_END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[500])
    parser.add_argument("--window", type=float, default=30.0, help="seconds of idle CPU measurement")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds after all RUNNING before measuring")
    parser.add_argument("--repeats", type=int, default=5, help="kill -9 and command samples")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--heartbeats-only", action="store_true",
                        help="workers only write heartbeats: the supervision's own cost, without the pipeline")
    parser.add_argument("--metrics-window", type=float, default=60.0,
                        help="seconds per window of the metrics cost (0: not measured)")
    parser.add_argument("--metrics-pairs", type=int, default=2, help="windows without and with scraping, each")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md with these figures (default: print only)")
    args = parser.parse_args()
    results = []
    for n in args.workers:
        r = bench(n, window=args.window, settle=args.settle, repeats=args.repeats, start_timeout=args.start_timeout,
                  heartbeats_only=args.heartbeats_only, metrics_window=args.metrics_window,
                  metrics_pairs=args.metrics_pairs)
        print(json.dumps(r), flush=True)
        results.append(r)
    if args.write:
        write_section(markdown(results, "python bench/fleet.py " + " ".join(sys.argv[1:])))


if __name__ == "__main__":
    main()
