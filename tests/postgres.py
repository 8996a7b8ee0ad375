"""A fresh PostgreSQL database per test on the machine's server (127.0.0.1:5432, user postgres,
trust auth), dropped after it; and private servers a test may stop (`PrivateServer`)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=5"
BIN = Path("/usr/lib/postgresql/15/bin")


@contextmanager
def fresh_database(admin: str = ADMIN_DSN) -> Iterator[str]:
    """The DSN of a new, empty database, dropped (its sessions ended) when the block ends."""
    psycopg = pytest.importorskip("psycopg", reason="the postgres extra is not installed")
    try:
        con = psycopg.connect(admin, autocommit=True)
    except psycopg.OperationalError as exc:  # pragma: no cover - the machine has one
        pytest.skip(f"no PostgreSQL server at {admin}: {exc}")
    name = f"sg_test_{uuid.uuid4().hex[:12]}"
    with con:
        con.execute(f"CREATE DATABASE {name}")
        try:
            yield admin.replace("dbname=postgres", f"dbname={name}")
        finally:
            con.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateServer:
    """A PostgreSQL server of one test (initdb, then pg_ctl on a free port), which the test may stop
    and start again; `remove()` at the end stops it (pg_ctl, by its data directory's pid file) and
    deletes its folder. As root it runs as the user postgres (initdb refuses root), in a folder of
    its own under /tmp (a test's tmp_path is private to root)."""

    def __init__(self) -> None:
        if not (BIN / "initdb").exists():
            pytest.skip(f"no PostgreSQL binaries at {BIN}")
        self.folder = Path(tempfile.mkdtemp(prefix="sg-pg-"))
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.data, self.log, self.port = self.folder / "data", self.folder / "postgres.log", free_port()

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres connect_timeout=2"

    def _ctl(self, *args: str, check: bool = True) -> None:
        subprocess.run([*self.as_user, str(BIN / "pg_ctl"), "-D", str(self.data), *args], check=check,
                       capture_output=True, timeout=90)

    def init(self) -> PrivateServer:
        subprocess.run([*self.as_user, str(BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                        "-N"], check=True, capture_output=True, timeout=120)
        return self.start()

    def start(self) -> PrivateServer:
        self._ctl("-l", str(self.log), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        return self

    def stop(self) -> None:
        self._ctl("-m", "immediate", "-w", "stop", check=False)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
