"""Fixtures for config tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import copy_demo


@pytest.fixture
def demo_root(tmp_path: Path) -> Path:
    """A writable copy of the demo clients/, environments/, modes/ plus a fake registry."""
    return copy_demo(tmp_path / "demo")
