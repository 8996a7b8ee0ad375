"""cloud-dev end to end: the real Pub/Sub emulator and the BigQuery emulator (one of each per
session, started on free ports and stopped by PID), a test root whose cloud-dev environment uses a
topic prefix and a dataset prefix of its own, and the variables that point every process at them."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.integration.bigquery.servers import bq_endpoint  # noqa: F401  (a session fixture)
from tests.integration.pubsub.servers import EMULATOR, Emulator
from tests.roots import REPO, copy_config

pytest.importorskip("google.cloud.pubsub_v1", reason="the gcp extra is not installed")
if not EMULATOR.exists():  # pragma: no cover
    pytest.skip(f"the Pub/Sub emulator is not installed ({EMULATOR}: package google-cloud-cli-pubsub-emulator)",
                allow_module_level=True)


@pytest.fixture(scope="session")
def pubsub_host(tmp_path_factory) -> str:
    server = Emulator(tmp_path_factory.mktemp("pubsub") / "emulator.log").start()
    yield server.host
    server.stop()


@pytest.fixture
def redis_url(tmp_path: Path) -> str:
    """A private redis-server of this test (started on a free port, stopped by PID)."""
    pytest.importorskip("redis", reason="the redis extra is not installed")
    from tests.integration.redis.servers import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Path:
    from signalgen.models.train import train_demo_models

    path = tmp_path_factory.mktemp("registry")
    train_demo_models(path, seed=7, days=20, now=datetime.now(timezone.utc))
    return path


@pytest.fixture
def cloud(tmp_path: Path, models: Path, pubsub_host: str, bq_endpoint: str, pg_dsn: str,
          monkeypatch) -> dict:  # noqa: F811
    """{root, vars}: a root with the demo clients, and the variables that point cloud-dev at the
    emulators under prefixes of this test alone (`SIGNALGEN_*` ones apply to any environment, so
    `cli` and `cloud_dev` set them for cloud-dev only). The emulator hosts are set in this process,
    and so is SIGNALGEN_CONTROL_DSN: cloud-dev's control store, a PostgreSQL database of this test."""
    root = copy_config(tmp_path / "root", ["christian", "ikenna", "odum"])
    (root / "registry").symlink_to(models)
    tag = "t" + uuid.uuid4().hex[:8]
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_host)
    return {"root": root, "vars": {"SIGNALGEN_STORAGE__API_ENDPOINT": bq_endpoint, "SIGNALGEN_CONTROL_DSN": pg_dsn,
                                   "SIGNALGEN_PROCESS__METRICS_PORT": "0",  # several managers on this host
                                   "SIGNALGEN_MESSAGING__TOPIC_PREFIX": tag, "SIGNALGEN_STORAGE__DATASET_PREFIX": tag}}


def cli(cloud: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`strategy_runner.py *args --root <root>`; cloud-dev's variables when args name cloud-dev."""
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    if "cloud-dev" in args:
        env.update(cloud["vars"])
    return subprocess.run([sys.executable, str(REPO / "strategy_runner.py"), *args, "--root", str(cloud["root"])],
                          cwd=cloud["root"], capture_output=True, text=True, timeout=timeout, env=env)


@contextmanager
def cloud_dev(cloud: dict):
    """Inside, this process sees cloud-dev's variables (to load its config, open its store)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in cloud["vars"].items():
            patch.setenv(name, value)
        yield
