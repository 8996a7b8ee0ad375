"""Worker-process commands (worker, writer): registered on signalgen.cli.app.app.

What supervisord runs (`deploy supervisor`): one `writer` program, which holds the signal store and
the outputs, and one `worker --id <id>` program per worker, which reach the writer over its socket.

Socket and key: by default the writer listens on `<folder of the control store>/writer-<mode>.sock`
(`--writer` / `--address` to choose another path; a Unix socket path has at most 107 bytes). Its
key is the file `<socket>.key`: 32 random bytes (hex), created 0600 by whichever of writer or worker
starts first, read by the others; a key file readable by group or others is refused. The key
only ever travels inside the HMAC challenge and is never printed or logged.
"""

from __future__ import annotations

import os
import secrets
import stat
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer

from signalgen.cli.app import EnvOpt, ModeOpt, RootOpt, _load, app, console
from signalgen.config.models import Environment, Mode, RunConfig
from signalgen.errors import ConfigError
from signalgen.storage.control import control_path_of

KEY_BYTES = 32

WorkerIdOpt = Annotated[str, typer.Option("--id", help="Worker id: client.strategy.symbol.timeframe "
                                          "(`config validate` lists them).")]
SocketOpt = Annotated[Optional[Path], typer.Option(help="The writer's socket (default: "
                                                   "<folder of the control store>/writer-<mode>.sock).")]


def default_address(cfg: RunConfig) -> Path:
    """The writer's socket, beside the environment's control store (one writer per environment and
    mode), whatever the signal store is."""
    return control_path_of(cfg).parent / f"writer-{cfg.mode.name.value}.sock"


def key_path(address: Path | str) -> Path:
    return Path(f"{address}.key")


def load_authkey(path: Path) -> bytes:
    """The shared key in `path`, created (0600, atomically) if it does not exist yet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_hex(KEY_BYTES).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process created it meanwhile: theirs wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"writer key file {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
                          "chmod 600 it")
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise ConfigError(f"writer key file {path} does not hold a hex key of at least 16 bytes")
    return key


def worker_log_path(cfg: RunConfig, worker_id: str) -> Path:
    """`<folder of the control store>/logs/<worker id>.log`, where the manager puts them too."""
    return control_path_of(cfg).parent / "logs" / f"{worker_id}.log"


@app.command("worker")
def worker(worker_id: WorkerIdOpt, env: EnvOpt = Environment.LOCAL_DEV, mode: ModeOpt = Mode.MOCK,
           root: RootOpt = None, writer: SocketOpt = None) -> None:
    """Run one worker in the foreground (what supervisord runs).

    It resumes after its checkpoint, streams its bars to the writer and exits 0 on SIGTERM after the
    writer acked everything."""
    from signalgen.config.workers import worker_specs
    from signalgen.process.worker import WorkerArgs, worker_main

    cfg = _load(env, mode, root)
    specs = {s.id: s for s in worker_specs(cfg)}
    if worker_id not in specs:
        raise ConfigError(f"no worker {worker_id!r} in this config; workers: {', '.join(sorted(specs)) or 'none'}")
    address = writer or default_address(cfg)
    args = WorkerArgs(spec=specs[worker_id], cfg=cfg, writer_address=str(address), authkey=load_authkey(key_path(address)),
                      control_path=str(control_path_of(cfg)),
                      log_path=str(worker_log_path(cfg, worker_id)),
                      heartbeat_interval_s=cfg.environment.process.heartbeat_interval_s)
    raise typer.Exit(worker_main(args))


@app.command("writer")
def writer(env: EnvOpt = Environment.LOCAL_DEV, mode: ModeOpt = Mode.MOCK, root: RootOpt = None,
           address: SocketOpt = None) -> None:
    """Run the writer of the signal store until SIGTERM / SIGINT (what supervisord runs beside the workers).

    It stores and routes the workers' decisions and acknowledges their checkpoints."""
    cfg = _load(env, mode, root)
    serve_writer(cfg, Path(address or default_address(cfg)))


def serve_writer(cfg: RunConfig, address: Path, stop: threading.Event | None = None) -> None:
    """Hold the store, record a run, serve workers on `address` until `stop` (SIGTERM / SIGINT)."""
    from contextlib import closing

    from signalgen.config.workers import worker_specs
    from signalgen.modes import new_run_id, run_record, stop_on_signals
    from signalgen.process.health import serve_health
    from signalgen.storage.control import ControlStore
    from signalgen.transports.local import STREAMING_WINDOW, WriterServer, host_outcome
    from signalgen.storage import open_store

    stop = stop or threading.Event()
    started_at = datetime.now(timezone.utc)
    run_id = new_run_id(started_at)
    authkey = load_authkey(key_path(address))
    with closing(open_store(cfg)) as store, store.serve_reads(), stop_on_signals(stop):
        store.start_run(run_record(cfg, worker_specs(cfg), run_id, started_at))
        server = WriterServer(cfg, store, run_id=run_id, address=str(address), authkey=authkey,
                              control_path=str(control_path_of(cfg)), **STREAMING_WINDOW)
        status = "failed"
        try:
            with server, serve_health(cfg, control=ControlStore(control_path_of(cfg)), problems=server.problems):
                console.print(f"writer {run_id} serving on {address}", highlight=False)
                while not stop.wait(1.0):
                    pass
            status = "stopped"
        finally:
            store.finish_run(run_id, **host_outcome(server.stats, started_at, status))
