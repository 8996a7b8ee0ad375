"""Reads that never stop a run: the writer serves them, otherwise a brief read-only connection.

A store file that one process holds (DuckDB: a read-only connection blocks a writer as much as a
writer blocks it) is read through its holder: the process that holds the store (a run) serves read
queries on a unix socket next to the file (`<db>.sock`) by calling `SignalStore.read` on a thread:
readers get committed rows while the run writes. When no process holds the file, the reader falls
back to the backend's one-query read-only path, so a run starting meanwhile waits at most that long.

Wire format (one query per connection): the client sends a `ReadQuery` as JSON (at most
`MAX_REQUEST` bytes) and shuts down its side; the server answers `A` + an Arrow IPC stream, or
`E` + a one-line UTF-8 message. The socket accepts query specs only, never SQL.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from pathlib import Path

import polars as pl
import pyarrow as pa
from pydantic import ValidationError

from signalgen.errors import SignalgenError, StorageError, TransientError
from signalgen.storage.base import SignalStore
from signalgen.storage.reads import ReadQuery

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
_SUN_PATH_MAX = 100  # sockaddr_un holds 108 bytes on Linux, 104 on macOS


def socket_path(db_path: Path | str) -> Path:
    """Where the holder of `db_path` serves reads: `<db>.sock`, or a hashed name in the temp
    folder when that path is too long for a unix socket (both sides compute the same)."""
    db = Path(db_path).resolve()
    path = db.with_name(db.name + ".sock")
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        return path
    digest = hashlib.sha256(os.fsencode(db)).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / f"signalgen-{digest}.sock"


# ------------------------------------------------------------------ server (in the writer)


@contextmanager
def serve_reads(store: SignalStore, db_path: Path | str) -> Iterator[Path]:
    """Serve read queries on `store` (opened, holding `db_path`) until the block ends; yields the
    socket path.

    Queries run one at a time on a thread through `store.read` (the DuckDB backend reads on its own
    cursor), so they see committed rows and never wait for the writer's transaction.
    """
    path = socket_path(db_path)
    with suppress(FileNotFoundError):
        path.unlink()  # left by a killed holder: we hold the file lock now, so it is stale
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    os.chmod(path, 0o600)  # the store's owner only
    server.listen(8)
    server.settimeout(0.2)  # how long close waits for the accept loop at most
    stop = threading.Event()
    thread = threading.Thread(target=_serve, args=(server, store, stop), name="read-server", daemon=True)
    thread.start()
    log.debug("serving reads", extra={"path": str(path)})
    try:
        yield path
    finally:
        stop.set()
        thread.join()
        server.close()
        with suppress(FileNotFoundError):
            path.unlink()


def _serve(server: socket.socket, store: SignalStore, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        with closing(conn):
            conn.settimeout(10)
            try:
                conn.sendall(_answer(_recv_all(conn, MAX_REQUEST), store))
            except OSError as exc:  # the reader went away; the next one is served
                log.debug("read client dropped: %s", exc)


def _answer(request: bytes | None, store: SignalStore) -> bytes:
    if request is None:
        return b"E" + f"request larger than {MAX_REQUEST} bytes".encode()
    try:
        table = store.read(ReadQuery.model_validate_json(request)).to_arrow()
    except ValidationError as exc:
        return b"E" + f"bad read query: {exc.error_count()} errors, first: {exc.errors()[0]['msg']}".encode()
    except SignalgenError as exc:
        return b"E" + str(exc).splitlines()[0][:300].encode()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return b"A" + sink.getvalue().to_pybytes()


def _recv_all(conn: socket.socket, limit: int | None) -> bytes | None:
    """Everything until EOF; None when more than `limit` bytes arrive."""
    chunks, size = [], 0
    while chunk := conn.recv(1 << 16):
        chunks.append(chunk)
        size += len(chunk)
        if limit is not None and size > limit:
            return None
    return b"".join(chunks)


# ------------------------------------------------------------------ client


def read(db_path: Path | str, query: ReadQuery, read_file: Callable[[ReadQuery], pa.Table | None], *,
         wait_s: float = 5.0) -> pl.DataFrame:
    """Run `query` on the store at `db_path`, whoever holds it.

    Asks the holder's socket first; when nothing serves it, `read_file(query)` (the backend's
    one-query read-only path; None when another process holds the file). A file held by a process that serves no reads (an older version, or one still starting)
    is retried until `wait_s`, then TransientError (exit 75).
    """
    db = Path(db_path)
    if not db.exists():
        raise StorageError(f"no signal store at {db}; run `strategy_runner.py run` first")
    deadline = time.monotonic() + wait_s
    while True:
        table = _ask(socket_path(db), query)
        if table is None:
            table = read_file(query)
        if table is not None:
            return pl.from_arrow(table)
        if time.monotonic() >= deadline:
            raise TransientError(f"{db} is held by another process that serves no reads; try again")
        time.sleep(0.1)


def _ask(path: Path, query: ReadQuery) -> pa.Table | None:
    """The holder's answer, or None when no holder listens there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with closing(sock):
        sock.settimeout(60)  # a large export may take a while; a hung holder must not hang us
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        sock.sendall(query.model_dump_json().encode())
        sock.shutdown(socket.SHUT_WR)
        answer = _recv_all(sock, None)
    if not answer:
        return None  # the holder closed while we asked: try again
    if answer[:1] == b"E":
        raise StorageError(f"{path}: {answer[1:301].decode(errors='replace')}")
    return pa.ipc.open_stream(answer[1:]).read_all()
