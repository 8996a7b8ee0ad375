"""The Pub/Sub emulator and a TCP proxy in front of it, for tests.

The emulator keeps its state in memory only, so an outage is made by cutting the connection (the
proxy), never by stopping the emulator.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

EMULATOR = Path("/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator")
PROJECT = "signalgen-dev"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """`cloud-pubsub-emulator` on 127.0.0.1:`port`; the script execs java, so the Popen pid is the JVM."""

    def __init__(self, log: Path) -> None:
        self.port, self.log = free_port(), log
        self.proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> Emulator:
        ready = f"Server started, listening on {self.port}"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([str(EMULATOR), "--host=127.0.0.1", f"--port={self.port}",
                                          f"--projects={PROJECT}"], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready in self.log.read_text(errors="replace"):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"the emulator exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the emulator did not print {ready!r} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        self.proc = None


class Proxy:
    """A TCP proxy 127.0.0.1:`port` -> `target`. `cut()` closes every connection and refuses new
    ones until `restore()`; `freeze()` stops forwarding on the connections open now (they stay open
    and silent, as a dead link looks) while new ones work."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.cut_off = False
        self._lock = threading.Lock()
        self._conns: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cut(self) -> None:
        with self._lock:
            self.cut_off = True
            conns, self._conns = self._conns, []
        for a, b, _ in conns:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def restore(self) -> None:
        with self._lock:
            self.cut_off = False

    def freeze(self) -> None:
        with self._lock:
            for _, _, frozen in self._conns:
                frozen.set()

    def drop_frozen(self) -> None:
        """Close the frozen connections, as the peers' keepalive would end a dead link at last."""
        with self._lock:
            frozen = [c for c in self._conns if c[2].is_set()]
            self._conns = [c for c in self._conns if not c[2].is_set()]
        for a, b, _ in frozen:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self.cut()
        self.server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            with self._lock:
                if self.cut_off:
                    client.close()
                    continue
                try:
                    upstream = socket.create_connection(("127.0.0.1", self.target_port))
                except OSError:
                    client.close()
                    continue
                frozen = threading.Event()
                self._conns.append((client, upstream, frozen))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst, frozen), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, frozen: threading.Event) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                while frozen.is_set():  # hold what was read: the link is silent, not broken
                    time.sleep(0.1)
                    if src.fileno() < 0:
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
