"""Manager commands (start, stop, status, ...): registered on signalgen.cli.app.app.

`start` runs the StrategyProcessManager (in the foreground, or detached with --daemon). Every other
command talks to a running manager only through the control store: `status`, `events`, `monitor` and
`logs` read it (and the manager's lock, and the per-worker log files); `stop`, `stop-strategy`, `pause`, `resume`, `restart`,
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

from signalgen.cli.app import (TIME_HELP, EnvOpt, InferenceOpt, ModeOpt, Output, OutputOpt, RootOpt, SeedOpt, WideOpt,
                           _environment, _load, _time_option, app, console, err_console, show)
from signalgen.config.models import Environment, Mode
from signalgen.errors import ConfigError, SignalgenError
from signalgen.logs import excerpt
from signalgen.process.health import UNKNOWN  # shown instead of a recorded state that no manager vouches for

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
    """(the environment's control store, what names it: its file, or a PostgreSQL store's address)."""
    from signalgen.storage.control import control_for

    e, root = _environment(env, root)
    if e.control.type == "sqlite":
        (root / e.control.path).parent.mkdir(parents=True, exist_ok=True)
    store = control_for(e, root)
    return store, getattr(store, "where", None) or store.path


def _fleet_state(store, path) -> tuple[int | None, str, float | None, list[dict] | None]:
    """(pid, state, start time, leases) of the managers of `store`: with a file lock, the one
    manager's (`manager_state`; leases None); with leases (PostgreSQL), "running" while any lease
    is live (pid: the holder's when there is one lease), else "gone"."""
    if not store.shared:  # a SQLite file: one manager, by its flock
        return (*manager_state(path), None)
    leases = store.leases()
    live = [lease for lease in leases if lease["live"]]
    return (live[0]["pid"] if len(live) == 1 else None), ("running" if live else "gone"), None, leases


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
    from signalgen.process.manager import read_pid

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
        if read_pid(pidfile) == child.pid:
            console.print(f"manager started: pid {child.pid}, log {logfile}", highlight=False, soft_wrap=True)
            return
        time.sleep(0.1)
    raise SignalgenError(f"manager (pid {child.pid}) was not ready within 120 s; see {logfile}")


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
    from signalgen.storage.control import open_control

    if mode not in STREAMING_MODES:
        raise ConfigError(f"start runs streaming workers: --mode mock or simulation (or live, with Redis), "
                          f"not {mode.value} (use `run` for historical)", field="--mode")
    if mode is Mode.LIVE:  # refused here, before any worker starts (each would go FATAL on its own)
        from signalgen.transports import transport_for

        e, _ = _environment(env, root)
        if not transport_for(e).live:
            raise ConfigError(f"live mode reads bars from a broker, and environment {e.name} has none "
                              f"(messaging.type {e.messaging.type}): use an environment with Redis, such as "
                              "--env local-integration", field="messaging.type")
    shards = parse_shard(shard) if shard else None
    control = control_path(env, root)
    if _environment(env, root)[0].control.type != "sqlite":  # leases, no lock file: beside the spool
        from signalgen.storage.control import spool_path

        control = spool_path(control, shards)
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
    store = open_control(cfg, shards or (0, 1))
    manager = StrategyProcessManager(cfg, specs, control=store, log_dir=log_dir_of(control),
                                     run_id=new_run_id(datetime.now(timezone.utc)), loader=load,
                                     logfile=logfile, log_only=detached, pidfile=pidfile, shard=shards or (0, 1))
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

    With several managers (PostgreSQL leases) the row is fanned out, one child per shard: their
    results are merged (`_merged`).
    """
    store, path = _control(env, root)
    try:
        _, state, _, leases = _fleet_state(store, path)
        if state == "gone":
            raise SignalgenError(f"no manager runs on {path}; `start` one first")
        deadline = time.monotonic() + timeout
        cid = store.submit(command, target, parameters)
        result = _answer(store, path, command, cid, timeout)
        children = result.get("children") if leases is not None else None
        if not isinstance(children, dict):
            return result
        answers = {shard: _answer(store, path, command, int(child), max(deadline - time.monotonic(), 0.1), shard)
                   for shard, child in sorted(children.items())}
        return _merged(command, answers)
    finally:
        store.close()


def _answer(store, path, command: str, cid: int, timeout: float, shard: str | None = None) -> dict:
    """The result of command row `cid` once it is done (the error as {"error": ...} for a child row
    of `shard`); SignalgenError for a row of no shard that failed or was not answered in time."""
    try:
        result = store.wait(cid, timeout)
    except KeyError:
        raise SignalgenError(f"command {cid} ({command}) is gone: the control store {path} was replaced while "
                             "it waited (see the manager's log); run it again") from None
    who = f"the manager of shard {shard}" if shard else "the manager"
    if result.status == "pending":
        store.fail(cid, f"no result within {timeout:g}s")
        if shard:
            return {"error": f"{who} did not answer within {timeout:g}s"}
        raise SignalgenError(f"{who} did not answer command {cid} ({command}) within {timeout:g}s")
    if result.status == "failed":
        error = (result.result or {}).get("error") or "failed"
        if shard:
            return {"error": error}
        raise SignalgenError(f"{command} failed: {error}")
    return result.result or {}


def _merged(command: str, answers: dict[str, dict]) -> dict:
    """One result from every shard's: lists joined, counts added. A shard owning no matching worker
    is no failure while another shard did the command; any other failure is (SignalgenError naming
    each shard's error)."""
    done = {shard: r for shard, r in answers.items() if "error" not in r}
    errors = {shard: r["error"] for shard, r in answers.items() if "error" in r}
    real = {shard: e for shard, e in errors.items() if not (done and str(e).startswith("no worker matches"))}
    if real or not done:
        raise SignalgenError(f"{command} failed: " + "; ".join(f"shard {s}: {e}" for s, e in sorted(real.items())))
    merged: dict = {}
    for result in done.values():
        for key, value in result.items():
            if isinstance(value, list):
                merged[key] = sorted({*merged.get(key, []), *value})
            elif isinstance(value, int) and not isinstance(value, bool):
                merged[key] = merged.get(key, 0) + value
            else:
                merged.setdefault(key, value)
    merged["shards"] = sorted(done)
    return merged


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


# ---------------------------------------------------------------- status, events, monitor, logs


STATUS_PROBLEM = 3  # `status` exit code: a worker FATAL, BACKOFF or unknown, or no manager supervising
_NOT_SUPERVISING = ("stopped", "tracing-stop", "zombie", "dead")  # psutil statuses of a frozen or dead manager


def manager_state(control: Path) -> tuple[int | None, str, float | None]:
    """(pid, state, start time) of the manager holding `control`: state "running" (it supervises),
    "frozen" (SIGSTOPped, or a zombie: its workers go unsupervised), or "gone" (no manager; pid None)."""
    import psutil

    pid = manager_pid(control)
    if pid is None:
        return None, "gone", None
    try:
        proc = psutil.Process(pid)
        status, started = proc.status(), proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):  # pid -1 (unreadable), or another pid space
        return pid, "running", None
    return pid, "frozen" if status in _NOT_SUPERVISING else "running", started


def status_rows(store, manager: str = "running", manager_started: float | None = None,
                leases: list[dict] | None = None) -> list[dict]:
    """One dict per worker (`signalgen.process.health.worker_rows`: the reading `/metrics` makes too).

    A recorded state that needs a supervising manager (RUNNING, BACKOFF, ...) is shown as UNKNOWN
    when `manager` is not "running", and so is every row written before `manager_started`; with
    `leases` (a shared store), each row is judged by its shard's lease."""
    from signalgen.process.health import worker_rows

    return worker_rows(store, manager, manager_started, leases)


@app.command("status")
def status(env: EnvOpt = Environment.LOCAL_DEV, root: RootOpt = None,
           strategy: Annotated[Optional[str], typer.Option("--strategy", "-s", help="Only matching workers.")] = None,
           output: Annotated[StatusOutput, typer.Option("--output", "-o", help="table, yaml or json.")]
           = StatusOutput.TABLE, wide: WideOpt = False) -> None:
    """Every worker: state, pid, last heartbeat, signals, restarts, reason (--wide: uptime, checkpoint, ...).

    Exit 0 when every worker is as it should be, 3 when one is FATAL, BACKOFF or UNKNOWN (its manager
    is gone or SIGSTOPped, or has not rewritten a previous manager's row yet) or no manager runs.
    """
    from signalgen.process.manager import matches
    from signalgen.report import status_table

    store, path = _control(env, root)
    try:
        pid, state, started, leases = _fleet_state(store, path)  # before reading: a manager starting meanwhile is seen
        rows = [r for r in status_rows(store, state, started, leases)
                if strategy is None or matches(r["worker"], strategy)]
    finally:
        store.close()
    doc = {"manager_pid": pid, "manager": state, "control": str(path), "workers": rows}
    if leases is not None:
        doc["leases"] = leases
    if output is StatusOutput.JSON:
        print(json.dumps(doc, indent=2, default=str))
    elif output is StatusOutput.YAML:
        import yaml

        print(yaml.safe_dump(doc, sort_keys=False), end="")
    else:
        who = f"pid {pid}" if state == "running" else f"pid {pid} frozen (SIGSTOP)" if pid else "not running"
        if leases is not None:
            who = ", ".join(f"{x['shard']} pid {x['pid']} on {x['host']}" + ("" if x["live"] else " (lease expired)")
                            for x in leases) or "not running"
        show(status_table(rows, f"manager{'s' if leases else ''}: {who}  ({path})", wide=wide), wide=wide)
        if not rows:
            console.print("no workers recorded; `start` runs them", highlight=False)
    if state != "running" or any(r["state"] in ("FATAL", "BACKOFF", UNKNOWN) for r in rows) or (
            leases and not all(x["live"] for x in leases)):
        raise typer.Exit(STATUS_PROBLEM)


@app.command("events")
def events(env: EnvOpt = Environment.LOCAL_DEV, root: RootOpt = None,
           strategy: Annotated[Optional[str], typer.Option("--strategy", "-s", help=
                               "Only matching workers (worker id, prefix or glob); default: every event.")] = None,
           since: Annotated[Optional[datetime], typer.Option(parser=_time_option, help=f"Only events at or after "
                                                             f"this time ({TIME_HELP}).")] = None,
           limit: Annotated[int, typer.Option(min=1, max=1_000_000, help="At most the newest N events.")] = 100,
           output: OutputOpt = Output.TABLE, wide: WideOpt = False) -> None:
    """The workers' history, oldest first: state changes, exits and their reasons, restarts, commands.

    Read from the control store, so it outlives the manager (which keeps the newest 10,000 events)."""
    from signalgen.process.manager import matches
    from signalgen.report import event_dict, events_table

    store, path = _control(env, root)
    try:
        rows = store.events(limit=store.events_keep)  # every kept event: few enough to filter here
    finally:
        store.close()
    cutoff = since and since.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    rows = sorted((r for r in rows if (cutoff is None or str(r["ts"]) >= cutoff)
                   and (strategy is None or r["worker_id"] is not None and matches(r["worker_id"], strategy))),
                  key=lambda r: (str(r["ts"]), r["id"]))
    more = len(rows) - limit
    rows = [event_dict(r) for r in rows[-limit:]]
    if output is Output.JSON:
        print(json.dumps(rows, indent=2, default=str))
    else:
        show(events_table(rows, wide=wide), wide=wide)
        if not rows:
            console.print(f"no events{' of ' + repr(strategy[:200]) if strategy else ''}"
                          f"{' since ' + cutoff if cutoff else ''} in {path}", highlight=False)
    if more > 0:
        err_console.print(f"showing the newest {limit:,} events; {more:,} older ones match (--limit, --since)",
                          highlight=False)


def monitor_table(store, pattern: str | None, manager: tuple[str, float | None] = ("running", None)):
    """A table of CPU% and memory per worker from the latest resource sample (states as `status` shows
    them, given the manager's state and start time)."""
    from rich.table import Table

    from signalgen.process.manager import matches

    resources = store.resources(latest_only=True)
    table = Table(title=f"signalgen workers  {datetime.now(timezone.utc):%H:%M:%S}Z", title_justify="left")
    for col in ("worker", "state", "pid", "cpu %", "rss MB", "uss MB", "signals", "errors"):
        table.add_column(col, justify="left" if col in ("worker", "state") else "right")
    total_cpu = total_uss = 0.0
    for r in status_rows(store, *manager):
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

    store, path = _control(env, root)

    def table():
        return monitor_table(store, strategy, _fleet_state(store, path)[1:3])

    try:
        with Live(table(), console=console, auto_refresh=False) as live:
            shown = 1
            while count == 0 or shown < count:
                time.sleep(interval)
                live.update(table(), refresh=True)
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
    """The log files of the matching workers (var/<env>/logs/<worker id>.log).

    Several are printed one after another, each under a `==> file <==` line, as tail(1) does."""
    from signalgen.process.manager import matches

    folder = log_dir_of(control_path(env, root))
    found = sorted(p for p in folder.glob("*.log") if matches(p.stem, strategy)) if folder.is_dir() else []
    if not found:
        raise SignalgenError(f"no log matches {strategy[:200]!r} in {folder}; give a worker id, a prefix "
                             "(client, client.strategy) or a glob, as `status` lists them")
    sizes = {}
    for i, path in enumerate(found):
        lines, sizes[path] = _tail(path, tail)
        if len(found) > 1:
            sys.stdout.write(("\n" if i else "") + f"==> {path} <==\n")
        sys.stdout.write("".join(lines))
    sys.stdout.flush()
    if follow:
        _follow(sizes, headers=len(found) > 1)


def _follow(sizes: dict[Path, int], headers: bool) -> None:
    """Print what is appended to each file until Ctrl-C; a rotated file is read from its start."""
    inodes = {p: p.stat().st_ino for p in sizes}
    last = None
    try:
        while True:
            time.sleep(0.5)
            for path in sizes:
                try:
                    st = path.stat()
                except FileNotFoundError:  # between rotation's rename and the new file
                    continue
                if st.st_ino != inodes[path] or st.st_size < sizes[path]:  # rotated: the new file from its start
                    inodes[path], sizes[path] = st.st_ino, 0
                if st.st_size > sizes[path]:
                    with open(path, "rb") as f:
                        f.seek(sizes[path])
                        chunk = f.read()
                    sizes[path] += len(chunk)
                    if headers and path != last:
                        sys.stdout.write(f"\n==> {path} <==\n")
                    last = path
                    sys.stdout.write(chunk.decode(errors="replace"))
                    sys.stdout.flush()
    except KeyboardInterrupt:
        return
