"""Manager commands (start, stop, status, ...): registered on signalgen.cli.app.

`start` runs the StrategyProcessManager (in the foreground, or detached with --daemon). Every other
command talks to a running manager only through the control store: `status`, `monitor` and `logs`
read it (and the per-worker log files); `stop`, `stop-strategy`, `pause`, `resume`, `restart`,
`reload` and `add-strategy` insert a `strategy_commands` row and wait for the manager's result,
exactly what any other program may do with SQL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import deque
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Optional

import typer

from signalgen.cli import (EnvOpt, InferenceOpt, ModeOpt, RootOpt, SeedOpt, _environment, _load, app, console)
from signalgen.config.models import Environment, Mode
from signalgen.errors import ConfigError, SignalgenError
from signalgen.logs import excerpt

STREAMING_MODES = (Mode.MOCK, Mode.SIMULATION, Mode.LIVE)


class StatusOutput(StrEnum):
    TABLE = "table"
    YAML = "yaml"
    JSON = "json"


TargetOpt = Annotated[str, typer.Option("--strategy", "-s", help="Worker id (client.strategy.symbol.timeframe), "
                                        "a prefix (client, client.strategy) or a glob ('odum.*').")]
TimeoutOpt = Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the manager's result.")]


def control_path(env: Environment, root: Path | None) -> Path:
    """The environment's control store file (environments/<env>.yaml `control.path`, under the root)."""
    e, root = _environment(env, root)
    return root / e.control.path


def log_dir_of(control: Path) -> Path:
    """Per-worker logs live beside the control store: var/<env>/logs/<worker id>.log."""
    return control.parent / "logs"


def _control(env: Environment, root: Path | None):
    from signalgen.storage.control import ControlStore

    path = control_path(env, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    return ControlStore(path), path


def manager_pid(control: Path) -> int | None:
    """The pid of the manager holding `<control>.lock`, or None when no manager runs."""
    import fcntl

    lock = Path(f"{control}.lock")
    if not lock.exists():
        return None
    fd = os.open(lock, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# ---------------------------------------------------------------- start


def _client_ids(names: list[str] | None) -> list[str] | None:
    """The clients to load for NAMES: their first part, unless a glob reaches into it."""
    if not names or any(c in n.split(".")[0] for n in names for c in "*?["):
        return None
    return sorted({n.split(".")[0] for n in names})


def _daemonize(control: Path, pidfile: Path, logfile: Path) -> None:
    """Start this same `start` command detached (a new session); return once the manager is ready
    (it wrote its pid into `pidfile`), or raise with what it printed when it exited first.

    Nothing is touched before the lock is checked: a refused second start leaves the running
    manager's pidfile and logs alone. The manager logs to `logfile` (rotated); what it prints outside
    its log — a crash's traceback — goes to `<logfile stem>.out` beside it, read from where this
    start began."""
    running = manager_pid(control)
    if running is not None:
        raise SignalgenError(f"a manager (pid {running}) already runs on {control}; `stop` it first")
    argv = [a for a in sys.argv[1:] if a != "--daemon"] + ["--detached"]
    for option, value in (("--pidfile", pidfile), ("--logfile", logfile)):
        if option not in argv:
            argv += [option, str(value)]
    logfile.parent.mkdir(parents=True, exist_ok=True)
    out_path = logfile.with_suffix(".out")
    code = "import sys; from signalgen.cli import main; sys.exit(main(sys.argv[1:]))"
    with open(out_path, "ab") as out:
        begin = out.tell()
        child = subprocess.Popen([sys.executable, "-c", code, *argv], stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True, cwd=os.getcwd())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if child.poll() is not None:
            with open(out_path, "rb") as f:
                f.seek(begin)
                said = [excerpt(line.decode(errors="replace").rstrip(), 300)[1:-1]
                        for line in deque(f, maxlen=5) if line.strip()]
            error = SignalgenError(f"the manager exited during start-up with code {child.returncode}"
                                   + (": " + " | ".join(said) if said else ""))
            error.exit_code = 2 if child.returncode == 2 else 1  # a bad config stays exit 2
            raise error
        if _pid_in(pidfile) == child.pid:
            console.print(f"manager started: pid {child.pid}, log {logfile}", highlight=False)
            return
        time.sleep(0.1)
    raise SignalgenError(f"manager (pid {child.pid}) was not ready within 120 s; see {logfile}")


def _pid_in(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@app.command("start")
def start(names: Annotated[Optional[list[str]], typer.Argument(
              help="Client ids, client.strategy, worker ids or globs (default: every worker).")] = None,
          env: EnvOpt = Environment.LOCAL_DEV, mode: ModeOpt = Mode.MOCK, root: RootOpt = None,
          inference: InferenceOpt = None, seed: SeedOpt = None,
          shard: Annotated[Optional[str], typer.Option(help="i/N: run only shard i of N (rendezvous hashing "
                                                       "of worker ids), e.g. 0/3.")] = None,
          daemon: Annotated[bool, typer.Option(help="Detach: run in the background, log to --logfile.")] = False,
          pidfile: Annotated[Optional[Path], typer.Option(help="Write the manager's pid here "
                                                          "(default with --daemon: var/<env>/manager.pid).")] = None,
          logfile: Annotated[Optional[Path], typer.Option(help="The manager's own log, rotated at "
                                                          "process.log_max_mb (default with --daemon: "
                                                          "var/<env>/logs/manager.log).")] = None,
          detached: Annotated[bool, typer.Option(hidden=True, help="Set by --daemon: log to --logfile only.")]
          = False) -> None:
    """Start the manager: one supervised process per worker, until `stop`, SIGTERM or Ctrl-C."""
    from signalgen.config.workers import worker_specs
    from signalgen.modes import new_run_id
    from signalgen.process.manager import StrategyProcessManager, select_specs
    from signalgen.process.shard import parse_shard, take_shard
    from signalgen.storage.control import ControlStore

    if mode not in STREAMING_MODES:
        raise ConfigError(f"start runs streaming workers: --mode mock or simulation (or live, with Redis), "
                          f"not {mode.value} (use `run` for historical)", field="--mode")
    shards = parse_shard(shard) if shard else None
    control = control_path(env, root)
    if daemon:
        _daemonize(control, pidfile or control.parent / "manager.pid", logfile or log_dir_of(control) / "manager.log")
        return

    def load():
        cfg = _load(env, mode, root, clients=_client_ids(names), inference=inference, seed=seed)
        specs = select_specs(worker_specs(cfg), names)
        return cfg, take_shard(specs, *shards) if shards else specs

    cfg, specs = load()
    if not specs:
        raise ConfigError("no workers to start (every strategy disabled, or an empty shard)")
    store = ControlStore(control)
    manager = StrategyProcessManager(cfg, specs, control=store, log_dir=log_dir_of(control),
                                     run_id=new_run_id(datetime.now(timezone.utc)), loader=load,
                                     logfile=logfile, log_only=detached, pidfile=pidfile)
    try:
        code = manager.run()
    finally:
        store.close()
    raise typer.Exit(code)


# ---------------------------------------------------------------- commands through the control store


def submit_and_wait(env: Environment, root: Path | None, command: str, target: str | None = None,
                    parameters: dict | None = None, timeout: float = 30.0) -> dict:
    """Insert a command row, wait for the manager's result and return it.

    Raises SignalgenError with the manager's message when the command failed, or when no manager
    took it within `timeout` (the row is then marked failed, so no later manager runs it).
    """
    store, path = _control(env, root)
    try:
        if manager_pid(path) is None:
            raise SignalgenError(f"no manager runs on {path}; `start` one first")
        cid = store.submit(command, target, parameters)
        result = store.wait(cid, timeout)
        if result.status == "pending":
            store.fail(cid, f"no result within {timeout:g}s")
            raise SignalgenError(f"the manager did not answer command {cid} ({command}) within {timeout:g}s")
        if result.status == "failed":
            error = (result.result or {}).get("error") or "failed"
            raise SignalgenError(f"{command} failed: {error}")
        return result.result or {}
    finally:
        store.close()


def _report(command: str, result: dict) -> None:
    if "workers" in result:
        done, same = result["workers"], result.get("unchanged", [])
        console.print(f"{command}: {len(done)} worker(s) {' '.join(done)}".rstrip(), highlight=False)
        if same:
            console.print(f"unchanged (already in that state): {' '.join(same)}", highlight=False)
    elif "started" in result:
        for key in ("started", "stopped", "restarted"):
            console.print(f"{key}: {len(result[key])} {' '.join(result[key])}".rstrip(), highlight=False)
        console.print(f"unchanged: {result['unchanged']}", highlight=False)
    else:
        console.print(f"{command}: done", highlight=False)


def _worker_command(command: str, env: Environment, root: Path | None, target: str, timeout: float) -> None:
    _report(command, submit_and_wait(env, root, command, target, timeout=timeout))


@app.command("stop")
def stop(env: EnvOpt = Environment.LOCAL_DEV, root: RootOpt = None, timeout: TimeoutOpt = 120.0) -> None:
    """Stop the manager: every worker flushes and exits (SIGKILL after process.stop_timeout_s)."""
    submit_and_wait(env, root, "stop", timeout=timeout)
    console.print("manager stopped", highlight=False)


@app.command("stop-strategy")
def stop_strategy(strategy: TargetOpt, env: EnvOpt = Environment.LOCAL_DEV, root: RootOpt = None,
                  timeout: TimeoutOpt = 30.0) -> None:
    """Stop the matching workers (they stay STOPPED until `start` or `restart`)."""
    _worker_command("stop-strategy", env, root, strategy, timeout)


@app.command("pause")
def pause(strategy: TargetOpt, env: EnvOpt = Environment.LOCAL_DEV, root: RootOpt = None,
          timeout: TimeoutOpt = 30.0) -> None:
    """Pause the matching workers (SIGSTOP: they keep their memory and take no bars)."""
    _worker_command("pause", env, root, strategy, timeout)


@app.command("resume")
def resume(strategy: TargetOpt, env: EnvOpt = Environment.LOCAL_DEV, root: RootOpt = None,
           timeout: TimeoutOpt = 30.0) -> None:
    """Resume paused workers (SIGCONT, or a new process when the pause followed a failure)."""
    _worker_command("resume", env, root, strategy, timeout)


@app.command("restart")
def restart(strategy: TargetOpt, env: EnvOpt = Environment.LOCAL_DEV, root: RootOpt = None,
            timeout: TimeoutOpt = 30.0) -> None:
    """Restart the matching workers (graceful stop, then a new process resuming from its checkpoint)."""
    _worker_command("restart", env, root, strategy, timeout)


@app.command("reload")
def reload(env: EnvOpt = Environment.LOCAL_DEV, root: RootOpt = None, timeout: TimeoutOpt = 30.0) -> None:
    """Re-read the client YAMLs: new workers start, removed ones stop, changed ones restart."""
    _report("reload", submit_and_wait(env, root, "reload", timeout=timeout))


@app.command("add-strategy")
def add_strategy(client: Annotated[str, typer.Option("--client", "-c", help="The client id (clients/<id>.yaml).")],
                 config: Annotated[Path, typer.Option("--config", exists=True, dir_okay=False, help=
                                   "YAML: one strategy, a list of them, or `strategies:` (replaced by id).")],
                 env: EnvOpt = Environment.LOCAL_DEV, root: RootOpt = None, timeout: TimeoutOpt = 30.0) -> None:
    """Add (or replace, by id) strategies in a client's YAML, then reload."""
    _report("add-strategy", submit_and_wait(env, root, "add-strategy",
                                            parameters={"client": client, "config": config.read_text()},
                                            timeout=timeout))


# ---------------------------------------------------------------- status, monitor, logs


def _ago(ts, now: float) -> str:
    from signalgen.process.manager import _epoch

    t = _epoch(ts)
    return "" if t is None else _duration(now - t)


def _duration(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def status_rows(store) -> list[dict]:
    """One dict per worker: its instance row joined with its latest heartbeat (same pid)."""
    from signalgen.process.manager import _epoch

    now = time.time()
    beats = store.heartbeats()
    rows = []
    for inst in sorted(store.instances(), key=lambda r: r["id"]):
        beat = beats.get(inst["id"]) or {}
        if beat and inst.get("pid") is not None and beat.get("pid") != inst.get("pid"):
            beat = {k: beat.get(k) for k in ("checkpoint", "signals", "errors")}  # an earlier process's
        alive = inst["state"] in ("STARTING", "RUNNING", "PAUSED", "STOPPING")
        started = _epoch(inst.get("started_at"))
        rows.append({
            "worker": inst["id"], "state": inst["state"], "pid": inst.get("pid") if alive else None,
            "uptime_s": round(now - started, 1) if alive and started else None,
            "last_heartbeat_s": round(now - _epoch(beat["ts"]), 1) if beat.get("ts") else None,
            "last_bar_time": beat.get("last_bar_time"), "checkpoint": beat.get("checkpoint"),
            "signals": beat.get("signals"), "rejections": beat.get("rejections"), "errors": beat.get("errors"),
            "restarts": inst.get("restarts"), "exit_code": inst.get("exit_code"), "reason": inst.get("reason") or "",
        })
    return rows


@app.command("status")
def status(env: EnvOpt = Environment.LOCAL_DEV, root: RootOpt = None,
           strategy: Annotated[Optional[str], typer.Option("--strategy", "-s", help="Only matching workers.")] = None,
           output: Annotated[StatusOutput, typer.Option("--output", "-o", help="table, yaml or json.")]
           = StatusOutput.TABLE) -> None:
    """Every worker: state, pid, uptime, last heartbeat, checkpoint, signals, errors, restarts."""
    from rich.table import Table

    from signalgen.process.manager import matches

    store, path = _control(env, root)
    try:
        rows = [r for r in status_rows(store) if strategy is None or matches(r["worker"], strategy)]
    finally:
        store.close()
    pid = manager_pid(path)
    if output is StatusOutput.JSON:
        print(json.dumps({"manager_pid": pid, "control": str(path), "workers": rows}, indent=2, default=str))
        return
    if output is StatusOutput.YAML:
        import yaml

        print(yaml.safe_dump({"manager_pid": pid, "control": str(path), "workers": rows}, sort_keys=False), end="")
        return
    table = Table(title=f"manager: {'pid ' + str(pid) if pid else 'not running'}  ({path})", title_justify="left")
    for col in ("worker", "state", "pid", "uptime", "heartbeat", "checkpoint", "signals", "errors", "restarts",
                "reason"):
        table.add_column(col, justify="right" if col in ("pid", "signals", "errors", "restarts") else "left")
    colour = {"RUNNING": "green", "FATAL": "red", "BACKOFF": "yellow", "PAUSED": "cyan", "STARTING": "yellow"}
    for r in rows:
        state = f"[{colour[r['state']]}]{r['state']}[/]" if r["state"] in colour else r["state"]
        table.add_row(r["worker"], state, str(r["pid"] or ""),
                      _duration(r["uptime_s"]) if r["uptime_s"] is not None else "",
                      f"{_duration(r['last_heartbeat_s'])} ago" if r["last_heartbeat_s"] is not None else "",
                      str(r["checkpoint"] or "")[:19], str(r["signals"] if r["signals"] is not None else ""),
                      str(r["errors"] if r["errors"] is not None else ""), str(r["restarts"] or 0), r["reason"])
    console.print(table)
    if not rows:
        console.print("no workers recorded; `start` runs them", highlight=False)


def monitor_table(store, pattern: str | None):
    """A table of CPU% and memory per worker from the latest resource sample."""
    from rich.table import Table

    from signalgen.process.manager import matches

    resources = store.resources(latest_only=True)
    table = Table(title=f"signalgen workers  {datetime.now(timezone.utc):%H:%M:%S}Z", title_justify="left")
    for col in ("worker", "state", "pid", "cpu %", "rss MB", "uss MB", "signals", "errors"):
        table.add_column(col, justify="left" if col in ("worker", "state") else "right")
    total_cpu = total_uss = 0.0
    for r in status_rows(store):
        if pattern is not None and not matches(r["worker"], pattern):
            continue
        res = resources.get(r["worker"]) or {}
        cpu, uss = res.get("cpu_percent"), res.get("uss_mb")
        total_cpu += cpu or 0.0
        total_uss += uss or 0.0
        table.add_row(r["worker"], r["state"], str(r["pid"] or ""), f"{cpu:.1f}" if cpu is not None else "",
                      f"{res['rss_mb']:.1f}" if res.get("rss_mb") is not None else "",
                      f"{uss:.1f}" if uss is not None else "", str(r["signals"] or 0), str(r["errors"] or 0))
    table.add_section()
    table.add_row("total", "", "", f"{total_cpu:.1f}", "", f"{total_uss:.1f}", "", "")
    return table


@app.command("monitor")
def monitor(env: EnvOpt = Environment.LOCAL_DEV, root: RootOpt = None,
            strategy: Annotated[Optional[str], typer.Option("--strategy", "-s", help="Only matching workers.")] = None,
            interval: Annotated[float, typer.Option(min=0.2, help="Seconds between refreshes.")] = 2.0,
            count: Annotated[int, typer.Option(min=0, help="Stop after this many refreshes (0: until Ctrl-C).")] = 0
            ) -> None:
    """Live CPU% and memory per worker, refreshed in place (Ctrl-C to quit)."""
    from rich.live import Live

    store, _ = _control(env, root)
    try:
        with Live(monitor_table(store, strategy), console=console, auto_refresh=False) as live:
            shown = 1
            while count == 0 or shown < count:
                time.sleep(interval)
                live.update(monitor_table(store, strategy), refresh=True)
                shown += 1
    except KeyboardInterrupt:
        pass
    finally:
        store.close()


def _tail(path: Path, n: int) -> tuple[list[str], int]:
    """The last `n` lines of `path` and the file's size."""
    with open(path, "rb") as f:
        lines = deque(f, maxlen=n)
        return [line.decode(errors="replace") for line in lines], f.tell()


@app.command("logs")
def logs(strategy: TargetOpt, env: EnvOpt = Environment.LOCAL_DEV, root: RootOpt = None,
         tail: Annotated[int, typer.Option("--tail", "-n", min=1, help="Print the last N lines.")] = 50,
         follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines until Ctrl-C.")] = False
         ) -> None:
    """A worker's log file (var/<env>/logs/<worker id>.log, rotated by the worker)."""
    from signalgen.process.manager import matches

    folder = log_dir_of(control_path(env, root))
    path = folder / f"{strategy}.log"
    if not path.is_file():
        found = sorted(p for p in folder.glob("*.log") if matches(p.stem, strategy)) if folder.is_dir() else []
        if len(found) != 1:
            known = sorted(p.stem for p in folder.glob("*.log")) if folder.is_dir() else []
            what = f"{len(found)} logs match" if found else "no log matches"
            raise SignalgenError(f"{what} {strategy!r} in {folder}; give one worker id "
                                 f"(known: {', '.join(known[:8]) or 'none'}{' ...' if len(known) > 8 else ''})")
        path = found[0]
    lines, size = _tail(path, tail)
    sys.stdout.write("".join(lines))
    sys.stdout.flush()
    if not follow:
        return
    inode = path.stat().st_ino
    try:
        while True:
            time.sleep(0.5)
            try:
                st = path.stat()
            except FileNotFoundError:  # between rotation's rename and the new file
                continue
            if st.st_ino != inode or st.st_size < size:  # rotated: read the new file from its start
                inode, size = st.st_ino, 0
            if st.st_size > size:
                with open(path, "rb") as f:
                    f.seek(size)
                    chunk = f.read()
                size += len(chunk)
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
    except KeyboardInterrupt:
        return
