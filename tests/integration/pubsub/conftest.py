"""Fixtures: one real Pub/Sub emulator per session, a unique topic prefix per test, the cloud-dev
config of a test root, a TCP proxy for outages."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.integration.pubsub.servers import EMULATOR, PROJECT, Emulator, Proxy
from tests.roots import copy_config

pytest.importorskip("google.cloud.pubsub_v1", reason="the gcp extra is not installed")

if not EMULATOR.exists():  # pragma: no cover
    pytest.skip(f"the Pub/Sub emulator is not installed ({EMULATOR}: package google-cloud-cli-pubsub-emulator)",
                allow_module_level=True)


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    server = Emulator(tmp_path_factory.mktemp("pubsub") / "emulator.log").start()
    yield server
    server.stop()


@pytest.fixture
def emulator_host(emulator, monkeypatch) -> str:
    """PUBSUB_EMULATOR_HOST set for the clients this test creates."""
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator.host)
    return emulator.host


@pytest.fixture
def proxy(emulator, monkeypatch):
    """A proxy in front of the emulator; PUBSUB_EMULATOR_HOST points the clients at it."""
    p = Proxy(emulator.port)
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", p.host)
    yield p
    p.close()


@pytest.fixture
def prefix() -> str:
    """A topic prefix of this test alone (the emulator is shared by the session)."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def registry_dir(tmp_path_factory) -> Path:
    from signalgen.models.train import train_demo_models

    path = tmp_path_factory.mktemp("registry")
    train_demo_models(path, seed=7, days=20, now=datetime.now(timezone.utc))
    return path


@pytest.fixture
def cloud_cfg(tmp_path, registry_dir, prefix):
    """The cloud-dev config (live mode) of a test root, with this test's topic prefix."""
    from signalgen.config.loader import load_config

    root = copy_config(tmp_path / "root", ["christian", "ikenna", "odum"])
    (root / "registry").symlink_to(registry_dir)
    env = root / "environments" / "cloud-dev.yaml"
    text = env.read_text()
    assert "  topic_prefix: signalgen\n" in text and f"project: {PROJECT}" in text
    env.write_text(text.replace("  topic_prefix: signalgen\n", f"  topic_prefix: {prefix}\n"))
    return load_config("cloud-dev", "live", root=root)
