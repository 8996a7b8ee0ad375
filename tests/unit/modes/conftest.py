"""A demo root (clients/, environments/, modes/) with freshly trained models, per test."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from signalgen.models.train import train_daily_models, train_demo_models
from tests.roots import REPO, copy_config  # noqa: F401 - REPO: test_recorder imports it from here



@pytest.fixture(scope="session")
def registry_dir(tmp_path_factory) -> Path:
    """The demo models trained on 20 days (fast), created now so their age is healthy."""
    path = tmp_path_factory.mktemp("registry")
    train_demo_models(path, seed=7, days=20, now=datetime.now(timezone.utc))
    train_daily_models(path, now=datetime.now(timezone.utc))  # for ada's daily demo
    return path


@pytest.fixture
def root(tmp_path: Path, registry_dir: Path) -> Path:
    """A private copy of the demo configs whose var/ output lands in tmp_path."""
    copy_config(tmp_path)
    (tmp_path / "registry").symlink_to(registry_dir)
    return tmp_path
