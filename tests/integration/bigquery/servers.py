"""A private BigQuery emulator for tests (bqemulator, in its own venv built by scripts/bqemulator-venv):
own ports, own data folder, stopped by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration.redis.servers import free_port

REPO = Path(__file__).resolve().parents[3]
VENV = Path(os.environ.get("SIGNALGEN_BQEMULATOR_VENV", REPO / ".venv-bqemulator"))
BQEMULATOR = VENV / "bin" / "bqemulator"
PROJECT = "signalgen-dev"


class BigQueryEmulator:
    """`bqemulator` serving REST on 127.0.0.1:`port` for project `PROJECT`, its data in `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port, self.grpc_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> BigQueryEmulator:
        log = open(self.folder / "bqemulator.log", "wb")  # noqa: SIM115 - the child writes it until stop
        # HOME: where the one-time spatial extension import left the extension (scripts/bqemulator-venv)
        self.proc = subprocess.Popen(
            [str(BQEMULATOR), "start", "--rest-host", "127.0.0.1", "--rest-port", str(self.port),
             "--grpc-port", str(self.grpc_port), "--data-dir", str(self.folder / "data"), "--project", PROJECT],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HOME": str(VENV / "home")})
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bqemulator exited with {self.proc.returncode}: "
                                   f"{(self.folder / 'bqemulator.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/healthz", timeout=0.5) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"bqemulator on port {self.port} did not answer /healthz within {timeout} s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the emulator by its PID and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture(scope="session")
def bq_endpoint(tmp_path_factory) -> str:
    """The endpoint of one emulator for the whole session (tests keep apart by dataset prefix)."""
    pytest.importorskip("google.cloud.bigquery", reason="the gcp extra is not installed")
    if not BQEMULATOR.exists():  # built here once (~25 s) so that `pytest` alone runs these tests
        built = subprocess.run([str(REPO / "scripts" / "bqemulator-venv")], capture_output=True, text=True,
                               env={**os.environ, "SIGNALGEN_BQEMULATOR_VENV": str(VENV)}, timeout=900)
        if built.returncode != 0 or not BQEMULATOR.exists():
            pytest.skip(f"no BigQuery emulator at {BQEMULATOR}, and scripts/bqemulator-venv could not build "
                        f"it (no package index?): {(built.stderr or built.stdout)[-300:]}")
    server = BigQueryEmulator(tmp_path_factory.mktemp("bqemulator")).start()
    yield server.endpoint
    server.stop()
