"""Fixtures: a private redis-server per test, a demo root pointing local-integration at it, the
demo models (mock inference only needs their cards)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.integration.redis.servers import REDIS_SERVER, RedisServer
from tests.roots import REPO, copy_config  # noqa: F401 - REPO: the redis tests import it from here

pytest.importorskip("redis", reason="the redis extra is not installed")

if REDIS_SERVER is None:  # pragma: no cover
    pytest.skip("redis-server is not on PATH", allow_module_level=True)


@pytest.fixture
def redis_server(tmp_path: Path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def registry_dir(tmp_path_factory) -> Path:
    from signalgen.models.train import train_demo_models

    path = tmp_path_factory.mktemp("registry")
    train_demo_models(path, seed=7, days=20, now=datetime.now(timezone.utc))
    return path


def make_root(tmp_path: Path, registry_dir: Path, url: str, password_env: str | None = None) -> Path:
    """A private copy of the demo configs (without ada) with local-integration's Redis at `url`."""
    root = tmp_path / "root"
    copy_config(root, ["christian", "ikenna", "odum"])  # not ada: its daily models are not trained here
    (root / "registry").symlink_to(registry_dir)
    env = root / "environments" / "local-integration.yaml"
    text = env.read_text().replace("url: redis://127.0.0.1:6379/0", f"url: {url}")
    # the tests' bars are in 2030, after the session's models were trained: accept them (`max_ahead_s`)
    text = text.replace("  stream_prefix: signalgen\n", "  stream_prefix: signalgen\n  max_ahead_s: 1.0e+9\n")
    assert "max_ahead_s" in text, "local-integration.yaml changed: set max_ahead_s another way"
    if password_env:
        text = text.replace("# password_env: SIGNALGEN_REDIS_PASSWORD", f"password_env: {password_env}")
    env.write_text(text)
    return root


@pytest.fixture
def root(tmp_path: Path, registry_dir: Path, redis_server: RedisServer) -> Path:
    return make_root(tmp_path, registry_dir, redis_server.url)
